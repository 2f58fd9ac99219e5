#!/usr/bin/env bash
# The one script to run on a Hopper GPU machine (H100/H200, driver ≥ 580 / CUDA 13.0).
#
# Build here (no CUDA toolkit needed), then run there with the binary carried along:
#   cargo build --release --features cuda --bin gpu_bench
#   scripts/gpu_check.sh target/release/gpu_bench
#
# Steps: every kernel against its CPU reference (fresh random inputs, outputs poisoned, no NaN,
# rel err ≤ 1e-2 for bf16); the CUDA stage against the CPU stage on tests/fixtures; the cuBLASLt FP8 GEMM ceiling (8192³ and the 70B layer shapes);
# the FP8 layer loop at the Llama-3.1-70B shape for 4k/16k/64k-token batches (as many layers
# as fit); PyTorch bf16 and torch._scaled_mm FP8 on the same shapes (bench/torch_ref.py); then
# one Markdown table (bench/report.py) for BENCHMARKS.md. Logs go to $OUT (default /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/gpu_bench}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
: > "$OUT/parity.jsonl"

# NVRTC, cuBLASLt and the CUDA headers: the nvidia-* wheels beside PyTorch, else the toolkit.
NV=$(python3 -c 'import nvidia, os
for p in nvidia.__path__:
    d = os.path.join(p, "cu13")
    if os.path.isdir(d): print(d); break' 2>/dev/null || true)
for d in "$NV/lib" /usr/local/cuda/lib64; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
[ -n "$NV" ] && export SCORESTREAM_NVRTC_LIB="$NV/lib"
for d in "$NV/include" /usr/local/cuda/include; do
    if [ -f "$d/cuda_fp8.h" ]; then export SCORESTREAM_CUDA_INCLUDE="$d"; break; fi
done
export SCORESTREAM_KERNEL_CACHE="${SCORESTREAM_KERNEL_CACHE:-/tmp/scorestream-kernel-cache}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH SCORESTREAM_CUDA_INCLUDE=${SCORESTREAM_CUDA_INCLUDE:-none}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/nvidia-smi.txt"

status=0
"$BIN" check | tee "$OUT/check.jsonl" || status=1
if [ -d tests/fixtures ]; then "$BIN" parity tests/fixtures | tee "$OUT/parity.jsonl" || status=1; fi
"$BIN" gemm | tee "$OUT/gemm.jsonl" || status=1
"$BIN" layers | tee "$OUT/layers.jsonl" || status=1
PYTHONUNBUFFERED=1 python3 bench/torch_ref.py | tee "$OUT/torch.jsonl" || status=1
python3 bench/report.py "$OUT"/parity.jsonl "$OUT"/check.jsonl "$OUT"/gemm.jsonl "$OUT"/layers.jsonl "$OUT"/torch.jsonl | tee "$OUT/table.md"
exit $status
