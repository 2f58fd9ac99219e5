// Rotary position embedding, rotate_half layout (HF Llama/Nemotron): for each head and
// i < rot_dim / 2, (x[i], x[i + rot_dim/2]) is rotated by angle position * inv_freq[i]; dims
// from rot_dim on are left alone (partial rotary). Applied in place to the first `heads` heads
// of each token's row (q heads then k heads of the fused QKV output). Positions are per token,
// so packed sequences each start at 0. inv_freq comes from the host (llama3 scaling included).
//
// CPU mirror: c = bf16(cos(p·f)), s = bf16(sin(p·f)); x1' = bf16(bf16(x1·c) − bf16(x2·s)),
// x2' = bf16(bf16(x2·c) + bf16(x1·s)).

// One rotated pair (x1, x2) at `angle`, rounded as the CPU mirror; also the rotary half of
// fp8.cu's scale epilogue, so the fused and unfused paths share one arithmetic.
__device__ __forceinline__ void rotate_pair(float x1, float x2, float angle, float& y1, float& y2) {
    const float c = bfr(cosf(angle)), s = bfr(sinf(angle));
    y1 = bfr(x1 * c) - bfr(x2 * s);
    y2 = bfr(x2 * c) + bfr(x1 * s);
}

__device__ void rotary_body(bf16* x, int tokens, int heads, int head_dim, int row_stride, int rot_dim,
                            const unsigned int* positions, const float* inv_freq) {
    const int half = rot_dim / 2;
    // 16-byte accesses: eight rotated pairs per step when the halves, heads and rows allow.
    if (half % 8 == 0 && head_dim % 8 == 0 && row_stride % 8 == 0 && aligned16(x)) {
        const int chunks = half / 8;
        const long long total = (long long)tokens * heads * chunks;
        for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
             idx += (long long)gridDim.x * blockDim.x) {
            const int i0 = (int)(idx % chunks) * 8;
            const long long th = idx / chunks;
            const int h = (int)(th % heads);
            const int t = (int)(th / heads);
            bf16* p = x + (size_t)t * row_stride + (size_t)h * head_dim;
            float x1[8], x2[8], y1[8], y2[8];
            unpack8(*reinterpret_cast<const uint4*>(p + i0), x1);
            unpack8(*reinterpret_cast<const uint4*>(p + i0 + half), x2);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                rotate_pair(x1[k], x2[k], (float)positions[t] * inv_freq[i0 + k], y1[k], y2[k]);
            }
            *reinterpret_cast<uint4*>(p + i0) = pack8(y1);
            *reinterpret_cast<uint4*>(p + i0 + half) = pack8(y2);
        }
        return;
    }
    const long long total = (long long)tokens * heads * half;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const long long th = idx / half;
        const int h = (int)(th % heads);
        const int t = (int)(th / heads);
        bf16* p = x + (size_t)t * row_stride + (size_t)h * head_dim;
        float y1, y2;
        rotate_pair(bf(p[i]), bf(p[i + half]), (float)positions[t] * inv_freq[i], y1, y2);
        p[i] = to_bf(y1);
        p[i + half] = to_bf(y2);
    }
}

extern "C" __global__ void rotary_bf16(
    bf16* x,                        // [tokens, row_stride]; heads at h * head_dim
    int tokens, int heads, int head_dim, int row_stride, int rot_dim,
    const unsigned int* positions,  // [tokens]
    const float* inv_freq           // [rot_dim / 2]
) {
    rotary_body(x, tokens, heads, head_dim, row_stride, rot_dim, positions, inv_freq);
}
