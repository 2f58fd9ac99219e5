// Shared helpers of every scorestream kernel. The Rust side compiles common.cuh followed by each
// .cu file as one NVRTC program (no nvcc at build time). Numerics mirror the CPU engine:
// bf16 values are rounded after each operation the CPU rounds, FP8 is E4M3 with
// round-to-nearest-even and saturation at ±448, per-token scale = max(amax, 1e-12) / 448.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

typedef __nv_bfloat16 bf16;
typedef unsigned char fp8;

#define E4M3_MAX 448.0f
#define MIN_AMAX 1e-12f
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ bf16 to_bf(float v) { return __float2bfloat16_rn(v); }
// Round an f32 to the nearest bf16 and back: what the CPU's bf16 tensor op stores.
__device__ __forceinline__ float bfr(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// E4M3 with saturation (values beyond ±448 become ±448) and round-to-nearest-even.
__device__ __forceinline__ fp8 to_e4m3(float v) {
    return (fp8)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reduction; every thread gets the result. `red` holds 32 floats of shared memory.
template <bool MAX>
__device__ float block_reduce(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();  // `red` may still be read by a previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = lane < warps ? red[lane] : (MAX ? 0.0f : 0.0f);
    r = MAX ? warp_max(r) : warp_sum(r);
    return r;
}

// Quantize `n` values already held in shared memory as bf16 to E4M3 with one scale, given
// their absolute maximum. Writes q[0..n) and *scale_out (thread 0).
__device__ void quantize_row(const bf16* vals, int n, float amax, fp8* q, float* scale_out) {
    const float scale = fmaxf(amax, MIN_AMAX) / E4M3_MAX;
    for (int i = threadIdx.x; i < n; i += blockDim.x) q[i] = to_e4m3(bf(vals[i]) / scale);
    if (threadIdx.x == 0) *scale_out = scale;
}
