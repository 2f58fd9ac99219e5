#!/usr/bin/env bash
# The one script to run on a Hopper GPU machine (H100/H200, driver ≥ 580 / CUDA 13.0; on an
# Ampere GPU it runs the bf16 parts and notes the FP8 ones as skipped), built to
# run unattended in a short slot: at most GPU_CHECK_BUDGET_S seconds (default 470, under 8
# minutes on an H200), each step under its own timeout within that budget, each step's output
# written to its own file under $OUT as it runs (a step cut off by its timeout keeps the lines
# it printed), a failed or timed-out step never stops the later ones, and the table printed last.
#
# Build here (no CUDA toolkit, no GPU), then run there with the binary and the CUBINs carried:
#   scripts/gpu_check_prepare.sh     # target/gpu/gpu_bench (stripped) and target/kernels
#   scripts/gpu_check.sh             # there, with target/gpu and target/kernels carried
#
# Steps (file under $OUT, default timeout in seconds; GPU_CHECK_TIMEOUT_<STEP> overrides):
#   probe.jsonl   40  nvidia-smi; driver, NVRTC, cuBLASLt versions and files; GPU; free memory
#   check.jsonl   60  every kernel and both GEMMs (FP8, bf16) against their CPU references
#                     (outputs poisoned with NaN first)
#   parity.jsonl  90  the CUDA stage, in FP8 and in bf16, against the CPU stage on every fixture;
#                     then each fixture loaded on the device and on the host, every weight byte
#                     compared (the GPU's FP8 quantization against the CPU's)
#   gemm.jsonl    60  cuBLASLt FP8 and bf16 GEMM ceilings (8192³ and the 70B projections)
#   time.jsonl    45  each kernel alone at the 70B shape (attention's TFLOP/s)
#   layers.jsonl 200  70B-shape layer loop: FP8 on as many layers as fit (80 on an H200), then
#                     bf16 (the Ampere path, measured here on Hopper) on 16 layers
#   torch.jsonl  150  PyTorch bf16 and torch._scaled_mm FP8 on the same shapes, GEMM-only and
#                     attention-only (benches/gpu/torch_ref.py)
#   hop.jsonl     60  two stages on one GPU against one (scores, bit for bit), and the hop of a
#                     70B-shape 16k-token batch timed against one layer and the host round trip
#   load.jsonl   120  a 70B-shaped bf16 checkpoint of as many layers as the disk holds (at most
#                     GPU_BENCH_LOAD_MAX_LAYERS, default 12, to fit the slot; 80 for the whole
#                     disk) written to GPU_BENCH_LOAD_DIR (not under $OUT; removed after), dropped
#                     from the page cache, loaded on the device in FP8 and bf16, and one layer by
#                     the host path: seconds and GB/s
#   table.md      15  benches/gpu/report.py over the files above (printed last)
# Issue 11's comparisons (gemm, time, layers, torch) run before issue 14's hop and load, which
# the budget cuts first. Ten files in all. Each step's file ends with a {"kind":"step",...} line: ok, failed (exit
# code), timeout, or skipped (budget spent). The script exits 1 when any step did not end ok.
#
# Overrides for a dry run (tests/gpu_check_dry_run.rs): GPU_BENCH (the bench command, instead
# of $1), TORCH_REF (the PyTorch command), GPU_CHECK_SKIP_SETUP=1 (no library path set-up).
set -uo pipefail
cd "$(dirname "$0")/.."
# The stripped bench of scripts/gpu_check_prepare.sh, else the release build's.
default_bin=target/gpu/gpu_bench
[ -x "$default_bin" ] || default_bin=target/release/gpu_bench
BIN=${1:-${GPU_BENCH:-$default_bin}}
TORCH_REF=${TORCH_REF:-python3 benches/gpu/torch_ref.py}
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
REPORT_RESERVE=15
STEPS=(probe check parity gemm time layers torch hop load)
mkdir -p "$OUT"
for s in "${STEPS[@]}"; do rm -f "$OUT/$s.jsonl"; done
rm -f "$OUT/table.md"

if [ "${GPU_CHECK_SKIP_SETUP:-0}" != 1 ]; then
    # cuBLASLt and the CUDA headers: the nvidia-* wheels beside PyTorch, else the toolkit.
    # NVRTC is chosen by the engine itself (highest version the driver supports; see
    # src/engine/cuda/nvrtc.rs) unless prebuilt CUBINs make it unnecessary.
    NV=$(python3 -c 'import nvidia, os
for p in nvidia.__path__:
    d = os.path.join(p, "cu13")
    if os.path.isdir(d): print(d); break' 2>/dev/null || true)
    for d in "$NV/lib" /usr/local/cuda/lib64; do
        [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
    done
    for d in "$NV/include" /usr/local/cuda/include; do
        if [ -f "$d/cuda_fp8.h" ]; then export SCORESTREAM_CUDA_INCLUDE="$d"; break; fi
    done
    if [ -z "${SCORESTREAM_PREBUILT_KERNELS:-}" ] && [ -f target/kernels/kernels-sm_90a.json ]; then
        export SCORESTREAM_PREBUILT_KERNELS="$PWD/target/kernels"
    fi
    export SCORESTREAM_KERNEL_CACHE="${SCORESTREAM_KERNEL_CACHE:-/tmp/scorestream-kernel-cache}"
fi
export PYTHONUNBUFFERED=1
echo "gpu_check: bench=$BIN out=$OUT budget=${BUDGET}s prebuilt=${SCORESTREAM_PREBUILT_KERNELS:-none}"

status=0
# step NAME DEFAULT_TIMEOUT COMMAND: run COMMAND (a shell line) with stdout and stderr in
# $OUT/NAME.jsonl, under min(timeout, budget left), then append the step's status line.
step() {
    local name=$1 limit=$2 cmd=$3
    local var="GPU_CHECK_TIMEOUT_${name^^}"
    limit=${!var:-$limit}
    local left=$((BUDGET - SECONDS - REPORT_RESERVE))
    local file="$OUT/$name.jsonl"
    if [ "$left" -lt 5 ]; then
        echo "{\"kind\":\"step\",\"step\":\"$name\",\"status\":\"skipped\",\"rc\":null,\"seconds\":0,\"limit\":0}" >> "$file"
        echo "gpu_check: $name skipped (budget spent)"
        status=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" bash -c "$cmd" >> "$file" 2>&1
    local rc=$? st=ok
    case $rc in
        0) ;;
        124 | 137) st=timeout ;;
        *) st=failed ;;
    esac
    [ "$st" = ok ] || status=1
    echo "{\"kind\":\"step\",\"step\":\"$name\",\"status\":\"$st\",\"rc\":$rc,\"seconds\":$((SECONDS - t0)),\"limit\":$limit}" >> "$file"
    echo "gpu_check: $name $st (rc $rc, $((SECONDS - t0)) s of $limit s)"
}

export BIN
step probe 40 'nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free,clocks.max.sm --format=csv 2>&1 || true; "$BIN" probe'
step check 60 '"$BIN" check'
step parity 90 '"$BIN" parity tests/fixtures; a=$?; "$BIN" load-parity tests/fixtures; b=$?; exit $((a | b))'
step gemm 60 '"$BIN" gemm'
step time 45 '"$BIN" time'
step layers 200 '"$BIN" layers'
step torch 150 "$TORCH_REF"
step hop 60 '"$BIN" hop tests/fixtures'
step load 120 '"$BIN" load'

files=()
for s in "${STEPS[@]}"; do [ -f "$OUT/$s.jsonl" ] && files+=("$OUT/$s.jsonl"); done
timeout --kill-after=2 "$REPORT_RESERVE" python3 benches/gpu/report.py "${files[@]}" > "$OUT/table.md" 2>&1 || status=1
cat "$OUT/table.md"
exit $status
