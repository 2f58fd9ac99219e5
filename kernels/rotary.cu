// Rotary position embedding, rotate_half layout (HF Llama/Nemotron): for each head and
// i < rot_dim / 2, (x[i], x[i + rot_dim/2]) is rotated by angle position * inv_freq[i]; dims
// from rot_dim on are left alone (partial rotary). Applied in place to the first `heads` heads
// of each token's row (q heads then k heads of the fused QKV output). Positions are per token,
// so packed sequences each start at 0. inv_freq comes from the host (llama3 scaling included).
//
// CPU mirror: c = bf16(cos(p·f)), s = bf16(sin(p·f)); x1' = bf16(bf16(x1·c) − bf16(x2·s)),
// x2' = bf16(bf16(x2·c) + bf16(x1·s)).

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
                const float angle = (float)positions[t] * inv_freq[i0 + k];
                const float c = bfr(cosf(angle)), s = bfr(sinf(angle));
                y1[k] = bfr(x1[k] * c) - bfr(x2[k] * s);
                y2[k] = bfr(x2[k] * c) + bfr(x1[k] * s);
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
        const float angle = (float)positions[t] * inv_freq[i];
        const float c = bfr(cosf(angle)), s = bfr(sinf(angle));
        bf16* p = x + (size_t)t * row_stride + (size_t)h * head_dim;
        const float x1 = bf(p[i]), x2 = bf(p[i + half]);
        p[i] = to_bf(bfr(x1 * c) - bfr(x2 * s));
        p[i + half] = to_bf(bfr(x2 * c) + bfr(x1 * s));
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
