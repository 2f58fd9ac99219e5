// Small memory-bound kernels: residual add, the bias of a bf16 GEMM, row gather (embedding
// lookup and the reward head's last tokens), and device-side random fill for benchmarks (so
// 70B of random weights need no host transfer). The FP8-only ones are in fp8.cu.

// a = bf16(a + b), n elements: eight per 16-byte access when both are 16-byte aligned, the
// last n % 8 one by one.
extern "C" __global__ void add_bf16(long long n, bf16* a /* [n] in/out */, const bf16* b /* [n] */) {
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x, step = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (aligned16(a) && aligned16(b)) {
        uint4* av = reinterpret_cast<uint4*>(a);
        const uint4* bv = reinterpret_cast<const uint4*>(b);
        for (long long i = first; i < n / 8; i += step) {
            float x[8], y[8];
            unpack8(av[i], x);
            unpack8(bv[i], y);
#pragma unroll
            for (int k = 0; k < 8; ++k) x[k] += y[k];
            av[i] = pack8(x);
        }
        done = n / 8 * 8;
    }
    for (long long i = done + first; i < n; i += step) a[i] = to_bf(bf(a[i]) + bf(b[i]));
}

// y = bf16(y + bf16(bias[n])) in place: the bias of a bf16 GEMM (the FP8 path adds it in
// scale_epilogue_bf16).
extern "C" __global__ void add_bias_bf16(bf16* y /* [rows, cols] */, long long rows, int cols,
                                         const float* bias /* [cols] */) {
    const long long n = rows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = to_bf(bf(y[i]) + bfr(bias[(int)(i % cols)]));
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

// Every byte of `n` set to `value`: poisons output buffers before a check.
extern "C" __global__ void fill_bytes(long long n, unsigned char* out, unsigned char value) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = value;
}
