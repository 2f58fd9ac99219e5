//! Attention v2's fused FP8 output (kernels/attention_v2.cu `attention_v2_quantize_tile`, "last
//! block quantizes") emulated on the CPU, block by block in any order the grid may run them:
//! each block max-es the |O| of its (token, head) rows into its tokens' amax (as f32 bits, an
//! integer max) and counts itself in its schedule tile; the block that completes a tile
//! quantizes the tile's tokens with `quant_rows_bf16`'s arithmetic and zeroes the tile's
//! bookkeeping. The tests hold the emulation to `fp8::quantize_rows` of the same output, for
//! any order: each tile quantized exactly once, after every row of it, and the bookkeeping left
//! zero for the next layer.

use super::fp8;
use crate::engine::cuda::launch::attention_v2_grid_y;

/// Tokens per schedule tile (the host's tile list; `AV2_TILE` in the kernel).
const TILE: usize = 64;

/// The `(query in its segment, head)` rows block `y` of the v2 grid computes for the schedule
/// tile starting at query `q0` of a `len`-token segment: the kernel's `G`, `hc`, `Qt` and `S`.
/// Empty for a sub-tile past the segment's end (that block only counts itself).
pub fn v2_block_rows(heads: usize, kv_heads: usize, y: usize, q0: usize, len: usize) -> Vec<(usize, usize)> {
    let group = heads / kv_heads;
    let g = group.min(64);
    let hc = group.div_ceil(g);
    let qt = 64 / g;
    let s = TILE.div_ceil(qt);
    let (kvh, chunk, sub) = (y / (hc * s), y % (hc * s) / s, y % s);
    let qb = q0 + sub * qt;
    let qb_end = (qb + qt).min((q0 + TILE).min(len));
    if qb >= qb_end {
        return Vec::new();
    }
    let rows_valid = if hc == 1 { (qb_end - qb) * g } else { g.min(group - chunk * g) };
    (0..rows_valid).map(|r| (qb + r / g, kvh * group + chunk * g + r % g)).collect()
}

/// What one launch leaves: the E4M3 output (0xFF where nothing was written), the scales (NaN
/// where none), how many times each tile was quantized, whether a tile was quantized before
/// all its rows were in, and the bookkeeping left behind (zero when all went well).
#[derive(Debug, Clone, PartialEq)]
pub struct FusedQuant {
    pub q: Vec<u8>,
    pub scales: Vec<f32>,
    pub quantized: Vec<u32>,
    pub premature: bool,
    pub amax_left: Vec<u32>,
    pub arrived_left: Vec<u32>,
}

/// Run the grid's blocks `(tile, y)` in `order` over the attention output `o: [tokens, heads ·
/// head_dim]` (bf16-exact values) of the batch `cu_seqlens` with schedule `tiles`.
pub fn quantize_by_last_block(o: &[f32], heads: usize, kv_heads: usize, head_dim: usize, cu_seqlens: &[u32], tiles: &[[i32; 2]],
                              order: &[(usize, usize)]) -> FusedQuant {
    let width = heads * head_dim;
    let tokens = o.len() / width.max(1);
    let grid_y = attention_v2_grid_y(heads, kv_heads);
    let mut out = FusedQuant {
        q: vec![0xFF; o.len()],
        scales: vec![f32::NAN; tokens],
        quantized: vec![0; tiles.len()],
        premature: false,
        amax_left: vec![0; tokens],
        arrived_left: vec![0; tiles.len()],
    };
    let mut rows_in = vec![0u32; tokens * heads];
    for &(x, y) in order {
        let [seg, q0] = tiles[x];
        let (s0, len) = (cu_seqlens[seg as usize] as usize, (cu_seqlens[seg as usize + 1] - cu_seqlens[seg as usize]) as usize);
        for (qi, head) in v2_block_rows(heads, kv_heads, y, q0 as usize, len) {
            let tok = s0 + qi;
            let row = &o[tok * width + head * head_dim..][..head_dim];
            let mx = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            out.amax_left[tok] = out.amax_left[tok].max(mx.to_bits());
            rows_in[tok * heads + head] += 1;
        }
        out.arrived_left[x] += 1;
        if out.arrived_left[x] as usize != grid_y {
            continue;
        }
        // The last block of tile x: quantize its tokens, then zero its bookkeeping.
        out.quantized[x] += 1;
        for tok in s0 + q0 as usize..s0 + (q0 as usize + TILE).min(len) {
            out.premature |= rows_in[tok * heads..(tok + 1) * heads].iter().any(|&n| n != 1);
            let scale = fp8::scale_for_amax(f32::from_bits(out.amax_left[tok]));
            let (src, dst) = (&o[tok * width..(tok + 1) * width], &mut out.q[tok * width..(tok + 1) * width]);
            fp8::quantize_with_scale(src, scale, dst);
            out.scales[tok] = scale;
            out.amax_left[tok] = 0;
        }
        out.arrived_left[x] = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cuda::plan::{attention_tiles, attention_tiles_tree};
    use crate::engine::reference::bf16r;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.next() as usize % (i + 1));
            }
        }
    }

    fn blocks(tiles: usize, grid_y: usize) -> Vec<(usize, usize)> {
        (0..tiles).flat_map(|x| (0..grid_y).map(move |y| (x, y))).collect()
    }

    #[test]
    fn the_last_block_of_each_tile_quantizes_it_once_as_quant_rows_does_in_any_order() {
        let mut rng = Lcg(17);
        // GQA 8/2 (4 heads a block, 16 tokens), 14/2 (7 heads, 9 tokens: sub-tiles past a
        // short segment's end), 4/4 (one head a block, 64 tokens); plain and tree layouts.
        for (heads, kv, d) in [(8usize, 2usize, 16usize), (14, 2, 8), (4, 4, 24)] {
            for (cu, prefix_len) in [(vec![0u32, 1, 301, 365, 494], vec![0u32; 4]), (vec![0, 150, 220, 220, 420, 421], vec![0, 150, 150, 150, 150])] {
                let tokens = *cu.last().expect("segments") as usize;
                let width = heads * d;
                // A row's values spread over 2^±10 so the scales differ, one row all zero.
                let mut o: Vec<f32> = (0..tokens * width).map(|_| bf16r(((rng.next() % 2001) as f32 - 1000.0) * 2f32.powi((rng.next() % 21) as i32 - 10))).collect();
                o[5 * width..6 * width].fill(0.0);
                let tiles = if prefix_len.iter().all(|&p| p == 0) { attention_tiles(&cu) } else { attention_tiles_tree(&cu, &prefix_len) };
                let (want_q, want_s) = fp8::quantize_rows(&o, width);
                let mut order = blocks(tiles.len(), attention_v2_grid_y(heads, kv));
                for round in 0..4 {
                    if round > 0 {
                        rng.shuffle(&mut order);
                    }
                    let got = quantize_by_last_block(&o, heads, kv, d, &cu, &tiles, &order);
                    let what = format!("{heads}/{kv} d{d} cu {cu:?} round {round}");
                    assert!(got.quantized.iter().all(|&n| n == 1), "{what}: {:?}", got.quantized);
                    assert!(!got.premature, "{what}");
                    assert_eq!(got.q, want_q, "{what}");
                    assert_eq!(got.scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(), want_s.iter().map(|s| s.to_bits()).collect::<Vec<_>>(), "{what}");
                    assert!(got.amax_left.iter().chain(&got.arrived_left).all(|&v| v == 0), "{what}: bookkeeping left dirty");
                }
            }
        }
    }

    #[test]
    fn a_tile_missing_a_block_is_never_quantized() {
        let (heads, kv, d) = (8usize, 2usize, 16usize);
        let cu = [0u32, 100];
        let tiles = attention_tiles(&cu);
        let o = vec![1.0f32; 100 * heads * d];
        let mut order = blocks(tiles.len(), attention_v2_grid_y(heads, kv));
        let dropped = order.remove(3);
        let got = quantize_by_last_block(&o, heads, kv, d, &cu, &tiles, &order);
        assert_eq!(got.quantized[dropped.0], 0);
        assert_eq!(got.arrived_left[dropped.0] as usize, attention_v2_grid_y(heads, kv) - 1);
        assert!(got.scales.iter().any(|s| s.is_nan()));
    }
}
