// Small memory-bound kernels: residual add, per-token quantization of a bf16 row, the
// per-channel-scale epilogue of an FP8 GEMM (when cuBLASLt cannot apply outer-vector scales),
// row gather (embedding lookup and the reward head's last tokens), and device-side random
// fill for benchmarks (so 70B of random weights need no host transfer).

// a = bf16(a + b), n elements.
extern "C" __global__ void add_bf16(long long n, bf16* a /* [n] in/out */, const bf16* b /* [n] */) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        a[i] = to_bf(bf(a[i]) + bf(b[i]));
}

// One block per row: q = e4m3(x / scale), scale = max(amax, 1e-12) / 448.
extern "C" __global__ void quant_rows_bf16(const bf16* x /* [rows, cols] */, int cols, fp8* q /* [rows, cols] */,
                                           float* q_scale /* [rows] */) {
    __shared__ float red[32];
    const size_t base = (size_t)blockIdx.x * cols;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) amax = fmaxf(amax, fabsf(bf(x[base + i])));
    amax = block_reduce<true>(amax, red);
    const float scale = fmaxf(amax, MIN_AMAX) / E4M3_MAX;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) q[base + i] = to_e4m3(bf(x[base + i]) / scale);
    if (threadIdx.x == 0) q_scale[blockIdx.x] = scale;
}

// y = bf16(bf16(y · row_scale[t] · col_scale[n]) + bias[n]) in place; bias may be null.
extern "C" __global__ void scale_epilogue_bf16(bf16* y /* [rows, cols] */, long long rows, int cols,
                                               const float* row_scale /* [rows] */,
                                               const float* col_scale /* [cols] */,
                                               const float* bias /* [cols] or null */) {
    const long long n = rows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / cols;
        const int c = (int)(i % cols);
        float v = bfr(bf(y[i]) * (row_scale[r] * col_scale[c]));
        if (bias) v = bfr(v + bfr(bias[c]));
        y[i] = to_bf(v);
    }
}

// dst[m] = src[idx[m]]; rows whose index is out of range (>= src_rows) are written as zeros.
extern "C" __global__ void gather_rows_bf16(const bf16* src /* [src_rows, cols] */, long long src_rows, int cols,
                                            const unsigned int* idx /* [rows] */, int rows,
                                            bf16* dst /* [rows, cols] */) {
    const long long n = (long long)rows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long m = i / cols;
        const int c = (int)(i % cols);
        const unsigned int s = idx[m];
        dst[i] = (long long)s < src_rows ? src[(size_t)s * cols + c] : to_bf(0.0f);
    }
}

__device__ __forceinline__ float hash_uniform(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
}

// out[i] = uniform in [-amp, amp), from a counter-based hash of (seed, i).
extern "C" __global__ void fill_uniform_bf16(long long n, bf16* out, unsigned long long seed, float amp) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = to_bf((2.0f * hash_uniform(seed, i) - 1.0f) * amp);
}

extern "C" __global__ void fill_uniform_e4m3(long long n, fp8* out, unsigned long long seed, float amp) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = to_e4m3((2.0f * hash_uniform(seed, i) - 1.0f) * amp);
}

// Every byte of `n` set to `value`: poisons output buffers before a check.
extern "C" __global__ void fill_bytes(long long n, unsigned char* out, unsigned char value) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = value;
}
