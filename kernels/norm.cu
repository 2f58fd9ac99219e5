// RMSNorm and Nemotron's LayerNorm1P over each token's row (and Qwen3's per-head q/k RMSNorm
// at the end of this file), optionally adding the residual
// first (x += res, written back: the residual stream), and writing the normalized row as bf16
// and/or quantized per token to E4M3 (+ one f32 scale per token).
// One block per token row; the row lives in dynamic shared memory (hidden * 2 bytes).
//
// CPU mirror (src/engine/reference): RMS: y = bf16(bf16(x / sqrt(mean(x²) + eps)) * w);
// LayerNorm1P: y = bf16(bf16((x - mean) / sqrt(var + eps) * w) + bf16(b)) with w = weight + 1.

template <bool LN1P>
__device__ void norm_body(
    bf16* x,          // [tokens, hidden] residual stream; updated in place when res != null
    const bf16* res,  // [tokens, hidden] or null
    const float* w,   // [hidden] (LayerNorm1P: weight + 1 already)
    const float* b,   // [hidden] or null (LayerNorm1P bias)
    float eps, int hidden,
    bf16* y,          // [tokens, hidden] or null
    fp8* q,           // [tokens, hidden] or null
    float* q_scale    // [tokens] or null
) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* row = reinterpret_cast<bf16*>(smem_raw);
    __shared__ float red[32];
    const size_t base = (size_t)blockIdx.x * hidden;

    // 16-byte accesses where the row allows (hidden % 8 == 0, aligned pointers): eight values
    // per step, the same arithmetic per value; else one value per step.
    const bool vec = hidden % 8 == 0 && aligned16(x) && (!res || aligned16(res)) && (!y || aligned16(y));
    float sum = 0.0f;
    for (int c = threadIdx.x; vec && c < hidden / 8; c += blockDim.x) {
        float v[8], r[8];
        unpack8(reinterpret_cast<const uint4*>(x + base)[c], v);
        if (res) {
            unpack8(reinterpret_cast<const uint4*>(res + base)[c], r);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = bfr(v[k] + r[k]);
            reinterpret_cast<uint4*>(x + base)[c] = pack8(v);
        }
        reinterpret_cast<uint4*>(row)[c] = pack8(v);
#pragma unroll
        for (int k = 0; k < 8; ++k) sum += LN1P ? v[k] : v[k] * v[k];
    }
    for (int i = vec ? hidden : threadIdx.x; i < hidden; i += blockDim.x) {
        float v = bf(x[base + i]);
        if (res) {
            v = bfr(v + bf(res[base + i]));
            x[base + i] = to_bf(v);
        }
        row[i] = to_bf(v);
        sum += LN1P ? v : v * v;
    }
    sum = block_reduce<false>(sum, red);
    float mean = 0.0f, var;
    if (LN1P) {
        mean = sum / hidden;
        float c2 = 0.0f;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            float c = bf(row[i]) - mean;
            c2 += c * c;
        }
        var = block_reduce<false>(c2, red) / hidden;
    } else {
        var = sum / hidden;
    }
    const float denom = sqrtf(var + eps);
    float amax = 0.0f;
    for (int c = threadIdx.x; vec && c < hidden / 8; c += blockDim.x) {
        float v[8];
        unpack8(reinterpret_cast<const uint4*>(row)[c], v);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int i = c * 8 + k;
            if (LN1P) {
                v[k] = bfr((v[k] - mean) / denom * w[i]);
                if (b) v[k] = bfr(v[k] + bfr(b[i]));
            } else {
                v[k] = bfr(bfr(v[k] / denom) * bfr(w[i]));
            }
            amax = fmaxf(amax, fabsf(v[k]));
        }
        const uint4 packed = pack8(v);
        reinterpret_cast<uint4*>(row)[c] = packed;
        if (y) reinterpret_cast<uint4*>(y + base)[c] = packed;
    }
    for (int i = vec ? hidden : threadIdx.x; i < hidden; i += blockDim.x) {
        float v;
        if (LN1P) {
            v = bfr((bf(row[i]) - mean) / denom * w[i]);
            if (b) v = bfr(v + bfr(b[i]));
        } else {
            v = bfr(bfr(bf(row[i]) / denom) * bfr(w[i]));
        }
        row[i] = to_bf(v);
        if (y) y[base + i] = to_bf(v);
        amax = fmaxf(amax, fabsf(v));
    }
    if (!q) return;
    amax = block_reduce<true>(amax, red);
    quantize_row(row, hidden, amax, q + base, q_scale + blockIdx.x);
}

extern "C" __global__ void rmsnorm_bf16(bf16* x, const bf16* res, const float* w, float eps, int hidden,
                                        bf16* y, fp8* q, float* q_scale) {
    norm_body<false>(x, res, w, nullptr, eps, hidden, y, q, q_scale);
}

extern "C" __global__ void layernorm1p_bf16(bf16* x, const bf16* res, const float* w, const float* b, float eps,
                                            int hidden, bf16* y, fp8* q, float* q_scale) {
    norm_body<true>(x, res, w, b, eps, hidden, y, q, q_scale);
}

// Qwen3's per-head RMSNorm of q and k, in place on the fused QKV rows, before rotary: each of
// the first q_heads + kv_heads heads of a token's row is normalized over its head_dim values
// (q heads with q_w, k heads with k_w). One warp per (token, head), grid-stride.
// CPU mirror: as rmsnorm_bf16 with hidden = head_dim: y = bf16(bf16(x / sqrt(mean(x²) + eps)) * w).
// With ROTARY, the same warp then applies rotary_bf16's rotation to the normalized head (the
// values it just stored, after __syncwarp): rotary fused into its neighbour, one pass over q
// and k instead of two.
template <bool ROTARY>
__device__ void head_norm_body(bf16* x, int tokens, int q_heads, int kv_heads, int head_dim, int row_stride,
                               const float* q_w, const float* k_w, float eps, int rot_dim,
                               const unsigned int* positions, const float* inv_freq) {
    const int heads = q_heads + kv_heads, lane = threadIdx.x & 31;
    const long long rows = (long long)tokens * heads;
    const long long step = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += step) {
        const int t = (int)(r / heads), h = (int)(r % heads);
        bf16* p = x + (size_t)t * row_stride + (size_t)h * head_dim;
        const float* w = h < q_heads ? q_w : k_w;
        float sum = 0.0f;
        for (int i = lane; i < head_dim; i += 32) {
            const float v = bf(p[i]);
            sum += v * v;
        }
        const float denom = sqrtf(warp_sum(sum) / head_dim + eps);
        for (int i = lane; i < head_dim; i += 32) p[i] = to_bf(bfr(bfr(bf(p[i]) / denom) * bfr(w[i])));
        if (!ROTARY) continue;
        __syncwarp();
        const int half = rot_dim / 2;
        for (int i = lane; i < half; i += 32) {
            const float angle = (float)positions[t] * inv_freq[i];
            const float c = bfr(cosf(angle)), s = bfr(sinf(angle));
            const float x1 = bf(p[i]), x2 = bf(p[i + half]);
            p[i] = to_bf(bfr(x1 * c) - bfr(x2 * s));
            p[i + half] = to_bf(bfr(x2 * c) + bfr(x1 * s));
        }
        __syncwarp();  // the next head's reads start after this head's writes
    }
}

extern "C" __global__ void head_rmsnorm_bf16(bf16* x /* [tokens, row_stride] */, int tokens, int q_heads, int kv_heads,
                                             int head_dim, int row_stride, const float* q_w /* [head_dim] */,
                                             const float* k_w /* [head_dim] */, float eps) {
    head_norm_body<false>(x, tokens, q_heads, kv_heads, head_dim, row_stride, q_w, k_w, eps, 0, nullptr, nullptr);
}

// head_rmsnorm_bf16 then rotary_bf16 over the same q and k heads, in one kernel.
extern "C" __global__ void head_rmsnorm_rotary_bf16(bf16* x /* [tokens, row_stride] */, int tokens, int q_heads,
                                                    int kv_heads, int head_dim, int row_stride,
                                                    const float* q_w /* [head_dim] */, const float* k_w /* [head_dim] */,
                                                    float eps, int rot_dim, const unsigned int* positions /* [tokens] */,
                                                    const float* inv_freq /* [rot_dim / 2] */) {
    head_norm_body<true>(x, tokens, q_heads, kv_heads, head_dim, row_stride, q_w, k_w, eps, rot_dim, positions, inv_freq);
}
