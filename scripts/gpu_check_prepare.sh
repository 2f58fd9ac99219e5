#!/usr/bin/env bash
# Build, here (no GPU, no CUDA toolkit; NVRTC 13.0 from `pip install "nvidia-cuda-nvrtc==13.0.*"
# "nvidia-cuda-runtime==13.0.*"`), what scripts/gpu_check.sh runs on the GPU machine, small
# enough to carry there (a device call carries at most 64 MiB besides the working tree):
# - target/gpu/gpu_bench: the release gpu_bench without its debug info (~6 MB; the release
#   profile keeps line tables, ~190 MB);
# - target/kernels: every kernel as CUBIN for GPU_ARCH (default sm_90a, Hopper), so the GPU
#   machine needs no NVRTC.
# Then, on the GPU machine, with both carried: scripts/gpu_check.sh (it finds both).
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${GPU_ARCH:-sm_90a}
cargo build --release --locked --features cuda --bin gpu_bench
mkdir -p target/gpu
strip -o target/gpu/gpu_bench target/release/gpu_bench
target/gpu/gpu_bench kernels --arch "$arch" --out target/kernels
bytes=$(du -cb target/gpu/gpu_bench target/kernels | tail -1 | cut -f1)
echo "gpu_check_prepare: carry target/gpu and target/kernels: $((bytes / 1024 / 1024)) MiB in all"
if [ "$bytes" -gt $((48 * 1024 * 1024)) ]; then
    echo "gpu_check_prepare: over 48 MiB: too close to the 64 MiB a device call carries" >&2
    exit 1
fi
