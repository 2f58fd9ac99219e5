// Attention v2: the same computation as attention.cu (causal, GQA, sliding window, tree layout
// of shared prefixes; f32 online softmax with bf16 probabilities, bf16 output), built for the
// tensor cores' pace:
//  - one block serves all query heads of one KV group: its 64 rows are (token, head) pairs,
//    token-major (row r = token r / G, head r % G of the group, G = min(group, 64)), so each
//    K/V tile staged in shared memory feeds every head that reads it, and a block spans only
//    64 / G tokens of the causal diagonal;
//  - K/V tiles are double-buffered with cp.async (16-byte copies, zero-filled past the last
//    key), so the next tile loads while this one is computed;
//  - shared memory is read with ldmatrix (x4, .trans for V), conflict-free: rows of a multiple
//    of 8 chunks (16 bytes each) are XOR-swizzled (chunk ^ (row & 7)), other widths padded to
//    an odd number of chunks;
//  - head sizes that are not a multiple of 16 (Qwen3's fixture: 24) are zero-padded to one.
// Work split: block = (schedule tile of 64 tokens of one segment, KV head, head chunk, sub-tile
// of 64 / G tokens), 4 warps of 16 rows; grid (tiles, blocks per tile), or tile-major
// (blocks per tile, tiles) when the output is quantized in the kernel. Key tiles: 64 keys for padded head sizes up to 128,
// 32 above (so two buffers of K and V fit sm_86/sm_89's 99 KB at head size 256).
//
// Optionally the output's per-token FP8 quantization too (attention_v2_quantize_tile).
//
// CPU mirror: src/engine/reference/attention.rs `attention_tree` with key_tile = AV2 key tile.

#define AV2_ROWS 64
#define AV2_WARPS 4
#define AV2_TILE 64  // tokens per schedule tile (the host's tile list, as attention.cu's)

// A [rows][C chunks of 16 bytes] bf16 tile in shared memory: chunk index of (row, chunk).
template <int C>
struct Av2Tile {
    static constexpr bool SWIZZLE = C % 8 == 0;
    static constexpr int STRIDE = SWIZZLE ? C : C + 1;  // chunks per row (odd when padded)
    __device__ static __forceinline__ int at(int row, int chunk) {
        return row * STRIDE + (SWIZZLE ? (chunk ^ (row & 7)) : chunk);
    }
};

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 16 bytes global → shared, asynchronously; `valid == false` writes 16 zero bytes instead.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(unsigned r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// Stage key rows kt .. kt + BK − 1 of one head (`col` elements into each token row) of K and V
// into their tiles: C chunks per row, those at or past D / 8 (padding) and rows past the last
// key zero-filled.
template <int D, int C, int BK>
__device__ __forceinline__ void av2_load_kv(uint4* sk, uint4* sv, const bf16* qkv, int stride, int kcol, int vcol,
                                            int kt, const KeyRange& kr) {
    for (int i = threadIdx.x; i < BK * C; i += AV2_WARPS * 32) {
        const int r = i / C, c = i % C, v = kt + r;
        const bool ok = v < kr.total() && c < D / 8;
        const bf16* row = qkv + (size_t)(ok ? kr.token(v) : 0) * stride + c * 8;
        cp_async16(sk + Av2Tile<C>::at(r, c), ok ? row + kcol : qkv, ok);
        cp_async16(sv + Av2Tile<C>::at(r, c), ok ? row + vcol : qkv, ok);
    }
}

template <int D>
__device__ void attention_v2_body(const bf16* qkv, bf16* out, const int* tiles, const int* cu_seqlens,
                                  const int* prefix_of, int qkv_stride, int heads, int kv_heads, float softmax_scale,
                                  int window, unsigned* amax, int tile, int by) {
    constexpr int DP = (D + 15) / 16 * 16;  // padded head size: the mma's k step
    constexpr int C = DP / 8;               // 16-byte chunks per row
    constexpr int BK = DP <= 128 ? 64 : 32; // keys per tile
    constexpr bool Q_IN_REGS = DP <= 128;   // else reread from shared memory per tile
    typedef Av2Tile<C> T;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    uint4* sq = reinterpret_cast<uint4*>(smem_raw);  // [AV2_ROWS][STRIDE]
    uint4* sk = sq + AV2_ROWS * T::STRIDE;           // [2][BK][STRIDE]
    uint4* sv = sk + 2 * BK * T::STRIDE;             // [2][BK][STRIDE]

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    // Which rows: group geometry as the host computes it (launch.rs attention_v2_grid).
    const int group = heads / kv_heads, G = min(group, AV2_ROWS), hc = (group + G - 1) / G;
    const int Qt = AV2_ROWS / G, S = (AV2_TILE + Qt - 1) / Qt;
    const int kvh = by / (hc * S), chunk = by % (hc * S) / S, sub = by % S;
    const int seg = tiles[2 * tile], q0 = tiles[2 * tile + 1];
    const KeyRange kr = key_range(cu_seqlens, prefix_of, seg);
    const int P = kr.P;
    const int qb = q0 + sub * Qt, qb_end = min(qb + Qt, min(q0 + AV2_TILE, kr.len));
    if (qb >= qb_end) return;  // a sub-tile past the segment's end (uniform over the block)
    // Rows 0 .. rows_valid − 1 hold a real (token, head).
    const int rows_valid = hc == 1 ? (qb_end - qb) * G : min(G, group - chunk * G);
    const int head0 = kvh * group + chunk * G;
    const int kcol = (heads + kvh) * D, vcol = (heads + kv_heads + kvh) * D;

    // Q rows → shared memory (one cp.async group), then K/V tile 0 (the next group).
    for (int i = threadIdx.x; i < AV2_ROWS * C; i += AV2_WARPS * 32) {
        const int r = i / C, c = i % C;
        const bool ok = r < rows_valid && c < D / 8;
        const bf16* src = qkv + (size_t)(kr.s0 + qb + r / G) * qkv_stride + (size_t)(head0 + r % G) * D + c * 8;
        cp_async16(sq + T::at(r, c), ok ? src : qkv, ok);
    }
    cp_async_commit();
    const int k_begin = window > 0 ? max(0, P + qb - window + 1) / BK * BK : 0;
    const int k_last = P + qb_end - 1;  // the block's last query, as a key index
    const int n_tiles = (k_last - k_begin) / BK + 1;
    av2_load_kv<D, C, BK>(sk, sv, qkv, qkv_stride, kcol, vcol, k_begin, kr);
    cp_async_commit();

    // This thread's two rows (g and g + 8 of its warp's 16) and the warp's extent.
    const int w0 = warp * 16;
    const int rrow[2] = {w0 + g, w0 + g + 8};
    const bool rvalid[2] = {rrow[0] < rows_valid, rrow[1] < rows_valid};
    const int rkey[2] = {P + qb + rrow[0] / G, P + qb + rrow[1] / G};  // each row's query as a key index
    const bool warp_any = w0 < rows_valid, warp_all = w0 + 15 < rows_valid;
    const int warp_first_key = P + qb + w0 / G;
    const int warp_last_key = P + qb + (min(w0 + 15, rows_valid - 1)) / G;

    const float scale_log2 = softmax_scale * 1.4426950408889634f;
    float o[DP / 8][4];
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    unsigned qa[Q_IN_REGS ? DP / 16 : 1][4];

    for (int it = 0; it < n_tiles; ++it) {
        const int kt = k_begin + it * BK, buf = it & 1;
        if (it + 1 < n_tiles) {
            // The other buffer was last read in iteration it − 1, before its closing barrier.
            av2_load_kv<D, C, BK>(sk + (buf ^ 1) * BK * T::STRIDE, sv + (buf ^ 1) * BK * T::STRIDE, qkv, qkv_stride,
                                  kcol, vcol, kt + BK, kr);
            cp_async_commit();
            cp_async_wait<1>();  // everything but the tile just issued has landed
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // this thread's copies are done; the barrier makes everyone's visible
        const uint4* skb = sk + buf * BK * T::STRIDE;
        const uint4* svb = sv + buf * BK * T::STRIDE;
        if (Q_IN_REGS && it == 0) {
#pragma unroll
            for (int kk = 0; kk < (Q_IN_REGS ? DP / 16 : 1); ++kk)
                ldsm_x4(qa[kk], sq + T::at(w0 + (lane & 15), kk * 2 + (lane >> 4)));
        }
        const bool outside_window = window > 0 && kt + BK <= warp_first_key - window + 1;
        if (warp_any && kt <= warp_last_key && !outside_window) {
            float s[BK / 8][4];
#pragma unroll
            for (int n = 0; n < BK / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < DP / 16; ++kk) {
                unsigned a[4];
                if (Q_IN_REGS) {
                    a[0] = qa[Q_IN_REGS ? kk : 0][0];
                    a[1] = qa[Q_IN_REGS ? kk : 0][1];
                    a[2] = qa[Q_IN_REGS ? kk : 0][2];
                    a[3] = qa[Q_IN_REGS ? kk : 0][3];
                } else {
                    ldsm_x4(a, sq + T::at(w0 + (lane & 15), kk * 2 + (lane >> 4)));
                }
#pragma unroll
                for (int nb = 0; nb < BK / 16; ++nb) {
                    unsigned b[4];
                    ldsm_x4(b, skb + T::at(nb * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
                    mma_bf16_16816(s[2 * nb], a, b[0], b[1]);
                    mma_bf16_16816(s[2 * nb + 1], a, b[2], b[3]);
                }
            }
            // Masking only where some (row, key) of the tile is not visible.
            const bool full = warp_all && kt + BK - 1 <= warp_first_key && (window <= 0 || warp_last_key - kt < window);
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int n = 0; n < BK / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1, kj = kt + n * 8 + 2 * t + (e & 1);
                    const bool ok =
                        full || (rvalid[r] && kj <= rkey[r] && (window <= 0 || rkey[r] - kj < window));
                    s[n][e] = ok ? s[n][e] * scale_log2 : NEG_INF;
                    mx[r] = fmaxf(mx[r], s[n][e]);
                }
            }
            online_softmax_step<BK / 8, DP / 8>(s, mx, m, l, o);
            // O += P V: P's A fragments are the S accumulators of key blocks 2kk and 2kk + 1;
            // V's B fragments come transposed out of ldmatrix, two 8-column blocks per x4.
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                const unsigned pa[4] = {pack_floats(s[2 * kk][0], s[2 * kk][1]), pack_floats(s[2 * kk][2], s[2 * kk][3]),
                                        pack_floats(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                        pack_floats(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int nb = 0; nb < DP / 16; ++nb) {
                    unsigned b[4];
                    ldsm_x4_trans(b, svb + T::at(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), nb * 2 + (lane >> 4)));
                    mma_bf16_16816(o[2 * nb], pa, b[0], b[1]);
                    mma_bf16_16816(o[2 * nb + 1], pa, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // everyone is done with buffer `buf` before iteration it + 1 refills it
    }

    // O rows → out (bf16); with `amax`, each row's |O| (of the bf16 values written) max-ed into
    // its token's amax. Every lane of the warp reaches the shuffles (rvalid is per quad).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        const int tok = kr.s0 + qb + rrow[r] / G, head = head0 + rrow[r] % G;
        float mx = 0.0f;
        if (rvalid[r]) {
            bf16* dst = out + (size_t)tok * heads * D + (size_t)head * D;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                const unsigned u = pack_floats(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
                *reinterpret_cast<unsigned*>(dst + j * 8 + 2 * t) = u;
                mx = fmaxf(mx, fmaxf(fabsf(__uint_as_float(u << 16)), fabsf(__uint_as_float(u & 0xffff0000u))));
            }
        }
        if (amax) {
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // Floats ≥ 0 order like their bit patterns: an integer max is the float max.
            if (rvalid[r] && t == 0) atomicMax(amax + tok, __float_as_uint(mx));
        }
    }
}

// The attention output's per-token FP8 quantization, fused ("last block quantizes", the CUDA
// threadFenceReduction pattern). A token's scale spans all its heads, which several blocks
// compute: each block has max-ed its rows' |O| into amax[token] (above); it then counts itself
// in arrived[tile] after a fence, and the block that arrives last for a schedule tile (all
// blocks of the tile, those past the segment's end included) quantizes the tile's
// tokens, reading O back from L2, with quant_rows_bf16's arithmetic (scale = max(amax, 1e-12) /
// 448, q = e4m3(x / scale)), then zeroes the tile's amax and counter for the next launch. The
// max does not depend on the blocks' order, so q and q_scale equal quant_rows_bf16 of the same
// O bit for bit. Each token lies in exactly one schedule tile.
// CPU mirror: src/engine/reference/attn_quant.rs.
// Not inlined: inlined, ptxas spilled 12 bytes at d16 on sm_89 (NVRTC 13.0); apart, every head
// size compiles without spills (tests/nvrtc_compile.rs).
// The grid is tile-major here (grid = (blocks per tile, tiles)), so a tile's blocks run close
// together and the tile's O is still in L2 when its last block reads it back.
__device__ __noinline__ void attention_v2_quantize_tile(const bf16* out, int width, const int* tiles, const int* cu_seqlens,
                                           fp8* q, float* q_scale, unsigned* amax, unsigned* arrived, int tile,
                                           unsigned blocks) {
    __shared__ bool last;
    __threadfence();  // this thread's O and amax writes are visible device-wide before the count
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(arrived + tile, 1u) == blocks - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int seg = tiles[2 * tile], q0 = tiles[2 * tile + 1];
    const int s0 = cu_seqlens[seg], end = min(q0 + AV2_TILE, cu_seqlens[seg + 1] - s0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const bool vec = width % 8 == 0 && aligned16(out) && ((size_t)q & 7) == 0;
    // One warp per token row; O and amax come from L2 (__ldcg): other blocks wrote them.
    for (int tok = s0 + q0 + warp; tok < s0 + end; tok += AV2_WARPS) {
        const float scale = fmaxf(__uint_as_float(__ldcg(amax + tok)), MIN_AMAX) / E4M3_MAX;
        const bf16* x = out + (size_t)tok * width;
        fp8* qr = q + (size_t)tok * width;
        int done = 0;
        if (vec) {
            for (int c = lane; c < width / 8; c += 32) {
                float f[8];
                unpack8(__ldcg(reinterpret_cast<const uint4*>(x) + c), f);
                unsigned lo = 0, hi = 0;
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    lo |= (unsigned)to_e4m3(f[k] / scale) << (8 * k);
                    hi |= (unsigned)to_e4m3(f[k + 4] / scale) << (8 * k);
                }
                reinterpret_cast<uint2*>(qr)[c] = make_uint2(lo, hi);
            }
            done = width;
        }
        for (int i = done + lane; i < width; i += 32) {
            const unsigned short b = __ldcg(reinterpret_cast<const unsigned short*>(x) + i);
            qr[i] = to_e4m3(__uint_as_float((unsigned)b << 16) / scale);
        }
        if (lane == 0) q_scale[tok] = scale;
    }
    __syncthreads();  // every warp has read its rows' amax
    for (int tok = s0 + q0 + threadIdx.x; tok < s0 + end; tok += blockDim.x) amax[tok] = 0u;
    if (threadIdx.x == 0) arrived[tile] = 0u;
}

// q == null: bf16 output only; grid = (tiles, blocks per tile). Else also the per-token E4M3
// output q [tokens, heads * D] and q_scale [tokens] (attention_v2_quantize_tile), with amax
// [tokens] and arrived [num_tiles] zero at launch (they are left zero); grid = (blocks per
// tile, tiles).
#define ATTENTION_V2_KERNEL(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(AV2_WARPS * 32) attention_v2_d##D##_bf16(                      \
        const bf16* qkv /* [tokens, qkv_stride] */, bf16* out /* [tokens, heads * D] */,                        \
        const int* tiles /* [num_tiles, 2] */, const int* cu_seqlens /* [segments + 1] */,                      \
        const int* prefix_of /* [segments] or null */, int qkv_stride, int heads, int kv_heads,                 \
        float softmax_scale, int window, fp8* q /* [tokens, heads * D] or null */,                              \
        float* q_scale /* [tokens] */, unsigned* amax /* [tokens] */, unsigned* arrived /* [num_tiles] */) {    \
        const int tile = q ? blockIdx.y : blockIdx.x, by = q ? blockIdx.x : blockIdx.y;                         \
        attention_v2_body<D>(qkv, out, tiles, cu_seqlens, prefix_of, qkv_stride, heads, kv_heads, softmax_scale, \
                             window, q ? amax : nullptr, tile, by);                                             \
        if (q) attention_v2_quantize_tile(out, heads * D, tiles, cu_seqlens, q, q_scale, amax, arrived, tile,    \
                                          gridDim.x);                                                           \
    }

ATTENTION_V2_KERNEL(16)
ATTENTION_V2_KERNEL(24)
ATTENTION_V2_KERNEL(32)
ATTENTION_V2_KERNEL(64)
ATTENTION_V2_KERNEL(80)
ATTENTION_V2_KERNEL(96)
ATTENTION_V2_KERNEL(128)
ATTENTION_V2_KERNEL(192)
ATTENTION_V2_KERNEL(256)
