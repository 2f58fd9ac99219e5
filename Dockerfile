# syntax=docker/dockerfile:1
# scorestream worker image: build with the `cuda` feature, then copy the binary into a slim CUDA
# runtime. Not built in this repository's CI (no container engine there); build it with
#   docker build -t scorestream:dev .
#
# The binary needs no CUDA toolkit to build (cudarc loads the libraries at run time). At run time
# it loads:
#   libcuda.so.1        the driver API: comes from the host's NVIDIA driver (the NVIDIA container
#                       toolkit mounts it into the container); must support CUDA 13.0
#   libnvrtc.so.13      compiles the kernels in kernels/*.cu at start-up (cuda-nvrtc-13-0); NVRTC 13
#                       has no built-in cuda_bf16.h / cuda_fp8.h: they (and cuda_fp16.h) come from
#                       cuda-cudart-dev-13-0 under $CUDA_HOME/include
#   libcublasLt.so.13   FP8 and bf16 GEMMs (libcublas-13-0)

ARG RUST_VERSION=1.95
ARG CUDA_VERSION=13.0.0

# The image's binary is stripped (no symbols, no debug info: Cargo.toml keeps `debug = 1` in the
# release profile for local profiling only).
FROM rust:${RUST_VERSION}-bookworm AS build
# The build context has no .git: pass the revision for `--version` and scorestream_build_info,
#   docker build --build-arg GIT_REVISION=$(git rev-parse --short=12 HEAD) -t scorestream:dev .
ARG GIT_REVISION=unknown
ENV SCORESTREAM_GIT_REVISION=${GIT_REVISION}
# librdkafka's cmake build needs cmake and curl headers (librdkafka#5135); `ssl` needs OpenSSL.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --features cuda --bin scorestream \
 && install -m 0755 target/release/scorestream /usr/local/bin/scorestream

FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu24.04
# Only what the worker loads, not the full runtime image (cuFFT, cuSPARSE, NPP, ...).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      cuda-nvrtc-13-0 libcublas-13-0 cuda-cudart-dev-13-0 \
      libssl3t64 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp scorestream
COPY --from=build /usr/local/bin/scorestream /usr/local/bin/scorestream
ENV CUDA_HOME=/usr/local/cuda \
    LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    HOME=/tmp
# The chart runs this with a read-only root filesystem: /tmp and the kernel caches are volumes.
USER 10001:10001
WORKDIR /tmp
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/scorestream"]
CMD ["run", "--config", "/etc/scorestream/config/config.toml"]
