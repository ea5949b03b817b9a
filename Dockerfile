# The mesh-agent image: multi-stage, small runtime.
#
# Not built in this workplace (no container engine runs here); kept simple so that it builds
# as written on any machine with Docker/Podman/BuildKit:
#   docker build -t switchyard/mesh-agent:dev .
#
# Stage 1 builds the eBPF object (nightly rust-src + bpf-linker against LLVM, as
# `cargo xtask setup` installs them) and the agent, which embeds that object.
FROM rust:1.95-trixie AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
# The versions verified with this workspace (see README: aya 0.14 needs this pairing).
RUN rustup toolchain install nightly-2026-05-19 --component rust-src --profile minimal \
 && rustup toolchain link nightly "$(rustc +nightly-2026-05-19 --print sysroot)" \
 && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 \
      --no-default-features --features llvm-22 --locked
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mesh-agent \
 && cp target/release/mesh-agent /mesh-agent

# Stage 2: just the binary (it needs glibc and nothing else; no shell, no package manager).
# The runtime has the glibc of the build stage (trixie = Debian 13).
FROM gcr.io/distroless/cc-debian13:nonroot AS runtime
COPY --from=build /mesh-agent /usr/local/bin/mesh-agent
# The DaemonSet runs it with the capabilities it needs (BPF, PERFMON, NET_ADMIN, SYS_ADMIN,
# SYS_RESOURCE); the image itself asks for nothing.
USER 0
ENTRYPOINT ["/usr/local/bin/mesh-agent"]
CMD ["run", "--kubernetes"]
