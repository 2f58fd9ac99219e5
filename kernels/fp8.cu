// The kernels only the FP8 path uses, compiled only for architectures with FP8 tensor cores
// (sm_89 and later; see src/engine/cuda/precision.rs): per-token quantization of a bf16 row,
// the per-channel-scale epilogue of an FP8 GEMM (when cuBLASLt cannot apply outer-vector
// scales), and E4M3 random fill for benchmarks. The norm and activation kernels' fused
// quantization is compiled everywhere but reached only when the host passes an E4M3 output.

// One block per row: q = e4m3(x / scale), scale = max(amax, 1e-12) / 448.
extern "C" __global__ void quant_rows_bf16(const bf16* x /* [rows, cols] */, int cols, fp8* q /* [rows, cols] */,
                                           float* q_scale /* [rows] */) {
    __shared__ float red[32];
    const size_t base = (size_t)blockIdx.x * cols;
    float amax = 0.0f;
    int done = 0;
    if (cols % 8 == 0 && aligned16(x)) {  // 16-byte loads
        for (int c = threadIdx.x; c < cols / 8; c += blockDim.x) {
            float f[8];
            unpack8(reinterpret_cast<const uint4*>(x + base)[c], f);
#pragma unroll
            for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fabsf(f[k]));
        }
        done = cols;
    }
    for (int i = done + threadIdx.x; i < cols; i += blockDim.x) amax = fmaxf(amax, fabsf(bf(x[base + i])));
    amax = block_reduce<true>(amax, red);
    quantize_row(x + base, cols, amax, q + base, q_scale + blockIdx.x);
}

// One value through the epilogue: bf16(bf16(v · rs · cs) + bf16(bias)) (no bias when null).
__device__ __forceinline__ float epilogue_value(bf16 v, float rs, float cs, const float* bias, int c) {
    float r = bfr(bf(v) * (rs * cs));
    if (bias) r = bfr(r + bfr(bias[c]));
    return r;
}

// y = bf16(bf16(y · row_scale[t] · col_scale[n]) + bias[n]) in place; bias may be null.
// With rot_heads > 0, rotary (rotary.cu) follows in the same pass on the first rot_heads heads
// of each row (the QKV GEMM's q and k heads): the thread of dim j < rot_dim / 2 of a head takes
// the pair (j, j + rot_dim / 2) through the epilogue, then rotates it with rotary_bf16's
// arithmetic, so the result equals scale_epilogue then rotary_bf16 bit for bit while y is read
// and written once instead of twice.
extern "C" __global__ void scale_epilogue_bf16(bf16* y /* [rows, cols] */, long long rows, int cols,
                                               const float* row_scale /* [rows] */,
                                               const float* col_scale /* [cols] */,
                                               const float* bias /* [cols] or null */,
                                               int rot_heads /* 0: no rotary */, int head_dim, int rot_dim,
                                               const unsigned int* positions /* [rows] or null */,
                                               const float* inv_freq /* [rot_dim / 2] or null */) {
    const long long n = rows * cols;
    const int rot_cols = rot_heads * head_dim, half = rot_dim / 2;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / cols;
        const int c = (int)(i % cols);
        if (c < rot_cols) {
            const int j = c % head_dim;
            if (j < half) {
                const float x1 = epilogue_value(y[i], row_scale[r], col_scale[c], bias, c);
                const float x2 = epilogue_value(y[i + half], row_scale[r], col_scale[c + half], bias, c + half);
                float y1, y2;
                rotate_pair(x1, x2, (float)positions[r] * inv_freq[j], y1, y2);
                y[i] = to_bf(y1);
                y[i + half] = to_bf(y2);
                continue;
            }
            if (j < rot_dim) continue;  // the pair's second half: written by the thread of j − half
        }
        y[i] = to_bf(epilogue_value(y[i], row_scale[r], col_scale[c], bias, c));
    }
}

extern "C" __global__ void fill_uniform_e4m3(long long n, fp8* out, unsigned long long seed, float amp) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = to_e4m3((2.0f * hash_uniform(seed, i) - 1.0f) * amp);
}
