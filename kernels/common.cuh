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

// 16-byte accesses: 8 bf16 values as one uint4 (bf16 → f32 is exact: the bits shifted up;
// f32 → bf16 rounds to nearest even, as to_bf). The small kernels take this path when a row's
// length is a multiple of 8 and the pointers are 16-byte aligned, else one value at a time.
__device__ __forceinline__ bool aligned16(const void* p) { return ((size_t)p & 15) == 0; }

__device__ __forceinline__ void unpack8(const uint4 u, float f[8]) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = __uint_as_float(w[k] << 16);
        f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}

__device__ __forceinline__ unsigned pack_bf2(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(to_bf(lo)) | ((unsigned)__bfloat16_as_ushort(to_bf(hi)) << 16);
}

__device__ __forceinline__ uint4 pack8(const float f[8]) {
    return make_uint4(pack_bf2(f[0], f[1]), pack_bf2(f[2], f[3]), pack_bf2(f[4], f[5]), pack_bf2(f[6], f[7]));
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
// Eight values per thread (16-byte reads, 8-byte writes) when n is a multiple of 8 and both
// pointers allow it.
__device__ void quantize_row(const bf16* vals, int n, float amax, fp8* q, float* scale_out) {
    const float scale = fmaxf(amax, MIN_AMAX) / E4M3_MAX;
    int done = 0;
    if (n % 8 == 0 && aligned16(vals) && ((size_t)q & 7) == 0) {
        for (int c = threadIdx.x; c < n / 8; c += blockDim.x) {
            float f[8];
            unpack8(reinterpret_cast<const uint4*>(vals)[c], f);
            unsigned lo = 0, hi = 0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                lo |= (unsigned)to_e4m3(f[k] / scale) << (8 * k);
                hi |= (unsigned)to_e4m3(f[k + 4] / scale) << (8 * k);
            }
            reinterpret_cast<uint2*>(q)[c] = make_uint2(lo, hi);
        }
        done = n;
    }
    for (int i = done + threadIdx.x; i < n; i += blockDim.x) q[i] = to_e4m3(bf(vals[i]) / scale);
    if (threadIdx.x == 0) *scale_out = scale;
}
