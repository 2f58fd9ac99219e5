// Causal attention over packed variable-length sequences (flash-style): bf16 Q/K/V read from
// the fused QKV rows, f32 online softmax, bf16 output; no L×L matrix is ever stored.
// Grouped K/V heads (GQA): query head h reads kv head h / (heads / kv_heads). Optional sliding
// window (window > 0: key j is visible from query i when i − window < j ≤ i).
//
// Tree layout (shared prefixes, src/model/packed.rs): `prefix_of[seg]` is the segment holding
// the shared prefix that segment `seg` continues, or −1 (null: none anywhere). A suffix's keys
// are its prefix's P tokens then its own, so key index v < P is prefix token v and v ≥ P is
// own token v − P; its query i sits at key index P + i (its position). Plain segments have
// P = 0. Key tiles are aligned on multiples of the tile size in this key index.
//
// Work split: block = (one 64-query tile of one segment, one query head), 4 warps, each warp
// owns 16 query rows. The host lists the tiles ([tile] = (segment, first query)), heaviest
// first. Q, K and V tiles (64 rows) are staged in shared memory with 16-byte loads; Q·Kᵀ and
// P·V run on the tensor cores through inline PTX `mma.sync.m16n8k16` (bf16 in, f32
// accumulate; no header beyond cuda_bf16.h). The S accumulators are reused in registers as
// the A operand of P·V (the FlashAttention-2 layout): P never touches shared memory.
//
// Fragment layout of m16n8k16 (g = lane / 4, t = lane % 4): A regs (g, 2t..), (g+8, 2t..),
// (g, 2t+8..), (g+8, 2t+8..); B regs (k = 2t.., n = g), (k = 2t+8.., n = g); C (g, 2t..),
// (g+8, 2t..). Each thread thus owns rows g and g+8 of its warp's 16.
//
// CPU mirror (src/engine/reference/attention.rs `attention_tree`, 64-key tiles): s = (q·k) ·
// scale in f32; running max m; p = bf16(exp(s − m)); l = Σ p; o = Σ p·v (f32), rescaled by
// exp(m_old − m_new) when the max grows; out = bf16(o / l).

#define ATT_BQ 64
#define ATT_BK 64
#define ATT_WARPS 4

__device__ __forceinline__ void mma_bf16_16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned ld_pair(const bf16* p) { return *reinterpret_cast<const unsigned*>(p); }

__device__ __forceinline__ unsigned pack_pair(bf16 lo, bf16 hi) {
    return (unsigned)__bfloat16_as_ushort(lo) | ((unsigned)__bfloat16_as_ushort(hi) << 16);
}

__device__ __forceinline__ unsigned pack_floats(float lo, float hi) { return pack_pair(to_bf(lo), to_bf(hi)); }

// One online-softmax step over a key tile for the two query rows a thread holds (both kernels):
// the rows' maxima across the quad, S turned in place into bf16-rounded probabilities, and the
// running sums `l` and outputs `o` rescaled to the new maxima.
template <int NB, int DB>
__device__ __forceinline__ void online_softmax_step(float (&s)[NB][4], float (&mx)[2], float (&m)[2], float (&l)[2],
                                                    float (&o)[DB][4]) {
    float alpha[2], m_new[2], psum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        m_new[r] = fmaxf(m[r], mx[r]);
        alpha[r] = m_new[r] == NEG_INF ? 1.0f : exp2f(m[r] - m_new[r]);
    }
#pragma unroll
    for (int n = 0; n < NB; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const float p = m_new[r] == NEG_INF ? 0.0f : bfr(exp2f(s[n][e] - m_new[r]));
            s[n][e] = p;
            psum[r] += p;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        psum[r] += __shfl_xor_sync(0xffffffffu, psum[r], 1);
        psum[r] += __shfl_xor_sync(0xffffffffu, psum[r], 2);
        l[r] = l[r] * alpha[r] + psum[r];
        m[r] = m_new[r];
    }
#pragma unroll
    for (int j = 0; j < DB; ++j) {
        o[j][0] *= alpha[0];
        o[j][1] *= alpha[0];
        o[j][2] *= alpha[1];
        o[j][3] *= alpha[1];
    }
}

// The keys a segment's queries see: its prefix's tokens (first token p0, count P), then its own
// (first token s0, count len). Key index v maps to a token row of the packed batch.
struct KeyRange {
    int p0, P, s0, len;
    __device__ __forceinline__ int total() const { return P + len; }
    __device__ __forceinline__ int token(int v) const { return v < P ? p0 + v : s0 + (v - P); }
};

__device__ __forceinline__ KeyRange key_range(const int* cu_seqlens, const int* prefix_of, int seg) {
    KeyRange r;
    r.s0 = cu_seqlens[seg];
    r.len = cu_seqlens[seg + 1] - r.s0;
    const int p = prefix_of ? prefix_of[seg] : -1;
    r.p0 = p >= 0 ? cu_seqlens[p] : 0;
    r.P = p >= 0 ? cu_seqlens[p + 1] - r.p0 : 0;
    return r;
}

// Copy key rows kt .. kt + rows − 1 (key indices of `kr`) of one head (`col` elements into each
// token row) into shared memory, zero-filling rows past the last key. 16-byte accesses.
template <int D>
__device__ __forceinline__ void load_keys(bf16* dst, const bf16* qkv, int stride, int col, int kt, int rows,
                                          const KeyRange& kr) {
    constexpr int VEC = D / 8;  // uint4 per row
    for (int i = threadIdx.x; i < rows * VEC; i += blockDim.x) {
        const int r = i / VEC, c = i % VEC, v = kt + r;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (v < kr.total()) val = reinterpret_cast<const uint4*>(qkv + (size_t)kr.token(v) * stride + col)[c];
        reinterpret_cast<uint4*>(dst + r * D)[c] = val;
    }
}

// Copy `rows` rows of D bf16 (row stride `stride` elements) into shared memory, zero-filling
// rows at or past `valid`. 16-byte accesses.
template <int D>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int stride, int rows, int valid) {
    constexpr int VEC = D / 8;  // uint4 per row
    for (int i = threadIdx.x; i < rows * VEC; i += blockDim.x) {
        const int r = i / VEC, c = i % VEC;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < valid) val = reinterpret_cast<const uint4*>(src + (size_t)r * stride)[c];
        reinterpret_cast<uint4*>(dst + r * D)[c] = val;
    }
}

template <int D>
__device__ void attention_body(const bf16* qkv, bf16* out, const int* tiles, const int* cu_seqlens,
                               const int* prefix_of, int qkv_stride, int heads, int kv_heads, float softmax_scale,
                               int window) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* sq = reinterpret_cast<bf16*>(smem_raw);  // [BQ][D]
    bf16* sk = sq + ATT_BQ * D;                     // [BK][D]
    bf16* sv = sk + ATT_BK * D;                     // [BK][D]

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int seq = tiles[2 * blockIdx.x], q0 = tiles[2 * blockIdx.x + 1];
    const int head = blockIdx.y, kvh = head / (heads / kv_heads);
    const KeyRange kr = key_range(cu_seqlens, prefix_of, seq);
    const int s0 = kr.s0, len = kr.len, P = kr.P;
    const bf16* base = qkv + (size_t)s0 * qkv_stride;
    const int kcol = (heads + kvh) * D, vcol = (heads + kv_heads + kvh) * D;

    load_tile<D>(sq, base + (size_t)q0 * qkv_stride + (size_t)head * D, qkv_stride, ATT_BQ, len - q0);
    __syncthreads();
    unsigned qa[D / 16][4];
    const bf16* qw = sq + warp * 16 * D;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        qa[kk][0] = ld_pair(qw + g * D + kk * 16 + 2 * t);
        qa[kk][1] = ld_pair(qw + (g + 8) * D + kk * 16 + 2 * t);
        qa[kk][2] = ld_pair(qw + g * D + kk * 16 + 8 + 2 * t);
        qa[kk][3] = ld_pair(qw + (g + 8) * D + kk * 16 + 8 + 2 * t);
    }

    const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    const float scale_log2 = softmax_scale * 1.4426950408889634f;
    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};

    // In key indices (the prefix's P keys come first): the block's last query and its warp's.
    const int q_last = P + min(q0 + ATT_BQ, len) - 1;
    const int warp_first = q0 + warp * 16;
    const int warp_last = P + min(warp_first + 15, len - 1);
    int k_begin = 0;
    if (window > 0) k_begin = max(0, P + q0 - window + 1) / ATT_BK * ATT_BK;

    for (int kt = k_begin; kt <= q_last; kt += ATT_BK) {
        __syncthreads();  // everyone is done with the previous K/V tile
        load_keys<D>(sk, qkv, qkv_stride, kcol, kt, ATT_BK, kr);
        load_keys<D>(sv, qkv, qkv_stride, vcol, kt, ATT_BK, kr);
        __syncthreads();
        if (warp_first >= len || kt > warp_last) continue;  // nothing visible for this warp

        float s[ATT_BK / 8][4];
#pragma unroll
        for (int n = 0; n < ATT_BK / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            const bf16* kr = sk + (n * 8 + g) * D;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                mma_bf16_16816(s[n], qa[kk], ld_pair(kr + kk * 16 + 2 * t), ld_pair(kr + kk * 16 + 8 + 2 * t));
        }

        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int n = 0; n < ATT_BK / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1, kj = kt + n * 8 + 2 * t + (e & 1), qi = row[r], qk = P + qi;
                const bool ok = qi < len && kj <= qk && (window <= 0 || qk - kj < window);
                s[n][e] = ok ? s[n][e] * scale_log2 : NEG_INF;
                mx[r] = fmaxf(mx[r], s[n][e]);
            }
        }
        online_softmax_step<ATT_BK / 8, D / 8>(s, mx, m, l, o);
        // O += P V: P's A fragments are the S accumulators of key blocks 2kk and 2kk + 1.
#pragma unroll
        for (int kk = 0; kk < ATT_BK / 16; ++kk) {
            const unsigned pa[4] = {pack_floats(s[2 * kk][0], s[2 * kk][1]), pack_floats(s[2 * kk][2], s[2 * kk][3]),
                                    pack_floats(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack_floats(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const bf16* v0 = sv + (kk * 16 + 2 * t) * D;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                const int col = j * 8 + g;
                const unsigned b0 = pack_pair(v0[col], v0[D + col]);
                const unsigned b1 = pack_pair(v0[8 * D + col], v0[9 * D + col]);
                mma_bf16_16816(o[j], pa, b0, b1);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (row[r] >= len) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        bf16* dst = out + (size_t)(s0 + row[r]) * heads * D + (size_t)head * D;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<unsigned*>(dst + j * 8 + 2 * t) = pack_floats(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
    }
}

#define ATTENTION_KERNEL(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attention_varlen_d##D##_bf16(               \
        const bf16* qkv /* [tokens, qkv_stride] */, bf16* out /* [tokens, heads * D] */,                     \
        const int* tiles /* [num_tiles, 2] */, const int* cu_seqlens /* [segments + 1] */,                   \
        const int* prefix_of /* [segments] or null */, int qkv_stride, int heads, int kv_heads,              \
        float softmax_scale, int window) {                                                                   \
        attention_body<D>(qkv, out, tiles, cu_seqlens, prefix_of, qkv_stride, heads, kv_heads, softmax_scale, \
                          window);                                                                           \
    }

ATTENTION_KERNEL(16)
ATTENTION_KERNEL(32)
ATTENTION_KERNEL(64)
ATTENTION_KERNEL(128)
ATTENTION_KERNEL(192)
