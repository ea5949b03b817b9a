//! Builds the eBPF object (mesh-ebpf) for the bpfel target with the nightly toolchain and
//! bpf-linker, so `cargo build` of the agent always embeds programs that match its sources.
//! Also generates the gRPC code of Istio's CA API from `proto/ca.proto` (protoc).
//! `cargo xtask setup` installs what this needs.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto/ca.proto");
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_protos(&["proto/ca.proto"], &["proto"])
        .context("generating the CA API code from proto/ca.proto failed: is protoc installed? (`cargo xtask setup`)")?;
    // The fuzz targets (`fuzz/`) need the parsers, not the programs: an empty object keeps
    // their build free of the nightly eBPF build (and of the fuzzer's compiler flags).
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_FUZZING");
    if std::env::var_os("CARGO_FEATURE_FUZZING").is_some() {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
        std::fs::write(out.join("mesh-ebpf"), []).context("writing the empty eBPF object")?;
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "mesh-ebpf")
        .ok_or_else(|| anyhow!("mesh-ebpf package not found in the workspace"))?;
    let root = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("mesh-ebpf manifest has no parent"))?;
    // mesh-common is compiled into the object too.
    println!("cargo:rerun-if-changed={}", root.join("../mesh-common/src"));
    aya_build::build_ebpf(
        [aya_build::Package { name: ebpf.name.as_str(), root_dir: root.as_str(), ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs failed: run `cargo xtask setup` (bpf-linker, nightly rust-src)")
}
