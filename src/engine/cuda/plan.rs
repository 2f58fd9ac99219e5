//! Host-side planning for the CUDA engine, free of any GPU call: the shape of one decoder
//! layer, the persistent activation buffers sized once for `max_batch_tokens` (one arena, no
//! allocation per batch), the attention tile schedule, and launch dimensions clamped to what
//! the hardware accepts (never a grid or block taken straight from a tensor dimension).

use std::ops::Range;

use super::precision::Precision;

/// Bytes every buffer in the arena is aligned to (cuBLASLt wants 16; 256 keeps rows of
/// different buffers off shared cache lines).
pub(crate) const ALIGN: usize = 256;

/// Queries per attention block, as in `kernels/attention.cu`.
pub(crate) const ATTN_QUERY_TILE: usize = 64;

/// The dimensions of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    /// Gated MLP (gate | up, SwiGLU/GeGLU) or plain up (relu²).
    pub gated: bool,
}

impl LayerShape {
    /// Llama-3.1-70B.
    pub const LLAMA_70B: Self = Self { hidden: 8192, heads: 64, kv_heads: 8, head_dim: 128, inter: 28672, gated: true };

    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
    pub fn attn_width(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn up_width(&self) -> usize {
        if self.gated { 2 * self.inter } else { self.inter }
    }
    /// Parameters of the four projections (what FP8 holds), `(out, in)` each.
    pub fn linears(&self) -> [(usize, usize); 4] {
        [
            (self.qkv_width(), self.hidden),
            (self.hidden, self.attn_width()),
            (self.up_width(), self.hidden),
            (self.hidden, self.inter),
        ]
    }
    pub fn linear_params(&self) -> usize {
        self.linears().iter().map(|(o, i)| o * i).sum()
    }
    /// Device bytes of one layer: weights (E4M3 + f32 per-channel scales, or bf16), two f32 norms.
    pub fn layer_bytes(&self, precision: Precision) -> usize {
        let scales: usize = match precision {
            Precision::Fp8 => self.linears().iter().map(|(o, _)| o * 4).sum(),
            Precision::Bf16 => 0,
        };
        self.linear_params() * precision.weight_bytes() + scales + 2 * self.hidden * 4
    }
    /// FLOPs of the layer's linear layers per token (2 per multiply-add).
    pub fn linear_flops_per_token(&self) -> f64 {
        2.0 * self.linear_params() as f64
    }
    /// FLOPs of causal attention (QKᵀ and PV) for one sequence of `len` tokens.
    pub fn attention_flops(&self, len: usize) -> f64 {
        // Each query i sees i + 1 keys; two products of head_dim MACs per key and head.
        let pairs = (len * (len + 1) / 2) as f64;
        4.0 * pairs * (self.heads * self.head_dim) as f64
    }
}

/// cuBLASLt's FP8 (E4M3) GEMM needs 16-byte aligned leading dimensions: the inner dimension
/// `k` (one byte per E4M3 value in A and B) a multiple of 16 and the bf16 output's `n` a
/// multiple of 8. Checked before planning, so a bad shape reads as itself instead of
/// cuBLASLt's "no algorithm". `tokens` is free.
pub(crate) fn check_fp8_gemm_shape(tokens: usize, n: usize, k: usize) -> Result<(), String> {
    let mut bad = Vec::new();
    if k == 0 || k % 16 != 0 {
        bad.push(format!("the inner dimension k = {k} must be a positive multiple of 16"));
    }
    if n == 0 || n % 8 != 0 {
        bad.push(format!("the output dimension n = {n} must be a positive multiple of 8"));
    }
    if bad.is_empty() {
        return Ok(());
    }
    Err(format!("FP8 GEMM {tokens}x{n}x{k} (tokens x out x in) cannot run on cuBLASLt: {}", bad.join("; ")))
}

/// cuBLASLt's bf16 GEMM takes any positive shape (unaligned ones run slower kernels).
pub(crate) fn check_bf16_gemm_shape(tokens: usize, n: usize, k: usize) -> Result<(), String> {
    if n == 0 || k == 0 {
        return Err(format!("bf16 GEMM {tokens}x{n}x{k} (tokens x out x in): empty weight"));
    }
    Ok(())
}

impl LayerShape {
    /// The GEMM shape check of `precision` for each of the layer's four projections.
    pub(crate) fn check_gemms(&self, precision: Precision) -> Result<(), String> {
        let names = ["qkv", "o", "gate|up", "down"];
        for (name, (out, inp)) in names.iter().zip(self.linears()) {
            let check = match precision {
                Precision::Fp8 => check_fp8_gemm_shape(1, out, inp),
                Precision::Bf16 => check_bf16_gemm_shape(1, out, inp),
            };
            check.map_err(|e| format!("{name} projection: {e}"))?;
        }
        Ok(())
    }
}

/// One buffer of the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: usize,
    pub bytes: usize,
}

impl Region {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.bytes
    }
}

/// The persistent activation buffers of one stage, as offsets into one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferPlan {
    pub max_tokens: usize,
    pub(crate) max_seqs: usize,
    /// `[tokens, hidden]` bf16: the residual stream.
    pub x: Region,
    /// `[tokens, hidden]` bf16: a block's output before it is added to `x`.
    pub h: Region,
    /// `[tokens, qkv_width]` bf16.
    pub qkv: Region,
    /// `[tokens, attn_width]` bf16.
    pub attn: Region,
    /// `[tokens, up_width]` bf16.
    pub up: Region,
    /// `[tokens, max(hidden, attn_width, inter)]`: the next GEMM's input, E4M3 (FP8) or bf16.
    pub q8: Region,
    /// `[tokens]` f32: its per-token scales (FP8).
    pub q_scale: Region,
    /// `[tokens]` u32 positions.
    pub positions: Region,
    /// `[segments + 1]` i32 (a tree-packed batch has up to [`max_segments`]).
    pub cu_seqlens: Region,
    /// `[segments]` i32: the shared-prefix segment each segment continues, or −1.
    pub prefix_of: Region,
    /// `[tiles, 2]` i32 attention schedule.
    pub tiles: Region,
    /// `[seqs]` u32 row indices of the last tokens, and `[seqs, hidden]` bf16 rows.
    pub(crate) last_idx: Region,
    pub(crate) last_rows: Region,
    /// `[tokens]` u32 and `[tiles]` u32: attention v2's fused FP8 output's per-token |O| max
    /// and per-tile arrival count; zeroed once when the arena is made, and every launch leaves
    /// them zero.
    pub(crate) attn_amax: Region,
    pub(crate) attn_arrived: Region,
    pub total: usize,
}

/// Most segments of a batch of `max_seqs` sequences: one per sequence, plus one per shared
/// prefix in the tree layout (a prefix is shared by two sequences or more).
pub(crate) fn max_segments(max_seqs: usize) -> usize {
    max_seqs + max_seqs / 2
}

/// Most attention tiles a batch can need: one partial tile per segment plus full ones.
pub(crate) fn max_tiles(max_tokens: usize, max_seqs: usize) -> usize {
    max_tokens / ATTN_QUERY_TILE + max_segments(max_seqs)
}

/// Lay out the buffers for batches of up to `max_tokens` tokens in `max_seqs` sequences, with
/// GEMM inputs in `precision`.
pub(crate) fn plan_buffers(shape: &LayerShape, max_tokens: usize, max_seqs: usize, precision: Precision) -> BufferPlan {
    let t = max_tokens;
    let mut next = 0usize;
    let mut take = |bytes: usize| {
        let r = Region { offset: next, bytes };
        next = (next + bytes).div_ceil(ALIGN) * ALIGN;
        r
    };
    let widest_q = shape.hidden.max(shape.attn_width()).max(shape.inter);
    let x = take(t * shape.hidden * 2);
    let h = take(t * shape.hidden * 2);
    let qkv = take(t * shape.qkv_width() * 2);
    let attn = take(t * shape.attn_width() * 2);
    let up = take(t * shape.up_width() * 2);
    let q8 = take(t * widest_q * precision.weight_bytes());
    let q_scale = take(t * 4);
    let positions = take(t * 4);
    let cu_seqlens = take((max_segments(max_seqs) + 1) * 4);
    let prefix_of = take(max_segments(max_seqs) * 4);
    let tiles = take(max_tiles(t, max_seqs) * 8);
    let last_idx = take(max_seqs * 4);
    let last_rows = take(max_seqs * shape.hidden * 2);
    let attn_amax = take(t * 4);
    let attn_arrived = take(max_tiles(t, max_seqs) * 4);
    BufferPlan {
        max_tokens,
        max_seqs,
        x,
        h,
        qkv,
        attn,
        up,
        q8,
        q_scale,
        positions,
        cu_seqlens,
        prefix_of,
        tiles,
        last_idx,
        last_rows,
        attn_amax,
        attn_arrived,
        total: next,
    }
}

impl BufferPlan {
    /// Every buffer (the tests check they are disjoint).
    #[cfg(test)]
    fn regions(&self) -> [Region; 15] {
        [
            self.x,
            self.h,
            self.qkv,
            self.attn,
            self.up,
            self.q8,
            self.q_scale,
            self.positions,
            self.cu_seqlens,
            self.prefix_of,
            self.tiles,
            self.last_idx,
            self.last_rows,
            self.attn_amax,
            self.attn_arrived,
        ]
    }
}

/// The attention schedule: `(segment, first query)` per 64-query tile, longest-running tiles
/// (those furthest into their segment, which see the most keys) first. In the tree layout a
/// suffix's tiles see its prefix's keys too: [`attention_tiles_tree`].
pub fn attention_tiles(cu_seqlens: &[u32]) -> Vec<[i32; 2]> {
    let mut tiles: Vec<[i32; 2]> = cu_seqlens
        .windows(2)
        .enumerate()
        .flat_map(|(s, w)| (0..(w[1] - w[0]) as usize).step_by(ATTN_QUERY_TILE).map(move |q| [s as i32, q as i32]))
        .collect();
    tiles.sort_by_key(|t| std::cmp::Reverse(t[1]));
    tiles
}

/// [`attention_tiles`] for the tree layout: tiles ordered by the keys they see (the shared
/// prefix's length `prefix_len[segment]` plus their first query), heaviest first.
pub fn attention_tiles_tree(cu_seqlens: &[u32], prefix_len: &[u32]) -> Vec<[i32; 2]> {
    let mut tiles = attention_tiles(cu_seqlens);
    tiles.sort_by_key(|t| std::cmp::Reverse(prefix_len.get(t[0] as usize).copied().unwrap_or(0) as i64 + i64::from(t[1])));
    tiles
}

/// Threads for a one-block-per-row kernel over `cols` columns: a multiple of 32 in 32..=1024.
pub(crate) fn row_block(cols: usize) -> u32 {
    (cols.div_ceil(8).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// `(grid, block)` for a grid-stride loop over `n` elements: at most `max_blocks` blocks.
pub(crate) fn grid_stride(n: usize, block: u32, max_blocks: u32) -> (u32, u32) {
    let blocks = n.div_ceil(block as usize).clamp(1, max_blocks as usize) as u32;
    (blocks, block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_disjoint_and_sized_for_the_batch() {
        let s = LayerShape::LLAMA_70B;
        let p = plan_buffers(&s, 16384, 64, Precision::Fp8);
        let mut regions = p.regions().to_vec();
        regions.sort_by_key(|r| r.offset);
        for w in regions.windows(2) {
            assert!(w[0].range().end <= w[1].offset, "{w:?} overlap");
        }
        assert!(regions.iter().all(|r| r.offset % ALIGN == 0));
        assert_eq!(p.up.bytes, 16384 * 2 * 28672 * 2);
        assert_eq!(p.q8.bytes, 16384 * 28672);
        assert_eq!(p.qkv.bytes, 16384 * 10240 * 2);
        assert_eq!((p.attn_amax.bytes, p.attn_arrived.bytes), (16384 * 4, max_tiles(16384, 64) * 4));
        assert!(p.total >= regions.last().unwrap().range().end);
        // 70B at 16k tokens stays under 4 GiB of activations.
        assert!(p.total < 4 << 30, "{}", p.total);
        // bf16 GEMM inputs take two bytes per value.
        let b = plan_buffers(&s, 16384, 64, Precision::Bf16);
        assert_eq!(b.q8.bytes, 2 * p.q8.bytes);
        assert_eq!(b.total - p.total, p.q8.bytes.div_ceil(ALIGN) * ALIGN);
    }

    #[test]
    fn bf16_layers_hold_two_bytes_per_weight_and_take_any_shape() {
        let s = LayerShape::LLAMA_70B;
        assert_eq!(s.layer_bytes(Precision::Bf16), 2 * s.linear_params() + 2 * 8192 * 4);
        let odd = LayerShape { hidden: 100, heads: 4, kv_heads: 2, head_dim: 25, inter: 300, gated: true };
        assert!(odd.check_gemms(Precision::Fp8).is_err());
        assert_eq!(odd.check_gemms(Precision::Bf16), Ok(()));
        assert!(check_bf16_gemm_shape(4, 0, 8).is_err());
    }

    #[test]
    fn llama_70b_layer_counts() {
        let s = LayerShape::LLAMA_70B;
        // 80 layers of these linears are ~68.5 B of the model's 70.6 B parameters.
        assert_eq!(s.linear_params(), 8192 * 10240 + 8192 * 8192 + 2 * 28672 * 8192 + 8192 * 28672);
        assert!((s.linear_params() * 80) as f64 > 68e9);
        assert!(s.layer_bytes(Precision::Fp8) > s.linear_params());
    }

    #[test]
    fn tiles_cover_every_query_once_heaviest_first() {
        let cu = [0u32, 130, 130, 200];
        let tiles = attention_tiles(&cu);
        assert_eq!(tiles.len(), 3 + 2);
        assert_eq!(tiles[0], [0, 128]);
        let mut covered = vec![0; 200];
        for [s, q] in &tiles {
            let (start, end) = (cu[*s as usize] as usize, cu[*s as usize + 1] as usize);
            let first = start + *q as usize;
            covered[first..(first + ATTN_QUERY_TILE).min(end)].iter_mut().for_each(|c| *c += 1);
        }
        assert!(covered.iter().all(|&c| c == 1));
        assert!(tiles.len() <= max_tiles(200, 3));
    }

    #[test]
    fn fp8_gemm_shapes_are_checked_up_front() {
        assert_eq!(check_fp8_gemm_shape(7, 10240, 8192), Ok(()));
        let e = check_fp8_gemm_shape(7, 100, 8192).unwrap_err();
        assert!(e.contains("n = 100 must be a positive multiple of 8") && !e.contains("inner"), "{e}");
        let e = check_fp8_gemm_shape(7, 96, 1000).unwrap_err();
        assert!(e.contains("k = 1000 must be a positive multiple of 16") && e.contains("7x96x1000"), "{e}");
        assert!(check_fp8_gemm_shape(1, 0, 0).unwrap_err().contains("n = 0"));
        assert_eq!(LayerShape::LLAMA_70B.check_gemms(Precision::Fp8), Ok(()));
        let odd = LayerShape { hidden: 100, heads: 4, kv_heads: 2, head_dim: 25, inter: 300, gated: true };
        assert!(odd.check_gemms(Precision::Fp8).unwrap_err().starts_with("qkv projection: "));
    }

    #[test]
    fn launch_dims_are_clamped() {
        assert_eq!(row_block(8192), 1024);
        assert_eq!(row_block(1), 32);
        assert_eq!(row_block(1000), 128);
        assert_eq!(grid_stride(0, 256, 1024), (1, 256));
        assert_eq!(grid_stride(1 << 40, 256, 4096), (4096, 256));
    }
}
