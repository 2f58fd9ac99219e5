//! Reference of the attention kernels (`attention_varlen_d*_bf16`, `attention_v2_d*_bf16`):
//! causal attention inside each packed segment, with grouped K/V heads, an optional sliding
//! window and the tree layout of shared prefixes (a suffix segment attends to its prefix
//! segment's keys, then its own), computed with the kernels' online softmax over the same
//! key tiles so that the bf16 rounding of the probabilities matches.

use super::bf16r;

/// Keys per tile of `attention_varlen_d*_bf16`.
pub const KEY_TILE: usize = 64;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Elements per token row of the fused QKV buffer (q heads, then k heads, then v heads).
    pub qkv_stride: usize,
    pub softmax_scale: f32,
    /// 0 = no sliding window.
    pub window: usize,
}

/// `qkv: [tokens, qkv_stride]`, `cu_seqlens: [seqs + 1]` → `[tokens, heads · head_dim]`: the
/// plain layout, 64-key tiles.
pub fn attention(qkv: &[f32], cu_seqlens: &[u32], s: &AttnShape) -> Vec<f32> {
    attention_tree(qkv, cu_seqlens, &[], s, KEY_TILE)
}

/// The keys of segment `seg`: `(first token of its prefix, prefix length, first own token,
/// own length)`; `prefix_of` as the kernels take it (−1 or empty: no prefix).
pub(crate) fn key_range(cu_seqlens: &[u32], prefix_of: &[i32], seg: usize) -> (usize, usize, usize, usize) {
    let (s0, len) = (cu_seqlens[seg] as usize, (cu_seqlens[seg + 1] - cu_seqlens[seg]) as usize);
    match prefix_of.get(seg).copied().filter(|&p| p >= 0) {
        Some(p) => {
            let p = p as usize;
            (cu_seqlens[p] as usize, (cu_seqlens[p + 1] - cu_seqlens[p]) as usize, s0, len)
        }
        None => (0, 0, s0, len),
    }
}

/// Attention over segments `cu_seqlens: [segments + 1]`, where segment `i` continues the
/// shared prefix held by segment `prefix_of[i]` (−1, or `prefix_of` empty: none), with the
/// online softmax over tiles of `key_tile` keys aligned in each segment's key index (prefix
/// keys first, then its own). → `[tokens, heads · head_dim]`, every segment's rows.
pub fn attention_tree(qkv: &[f32], cu_seqlens: &[u32], prefix_of: &[i32], s: &AttnShape, key_tile: usize) -> Vec<f32> {
    let d = s.head_dim;
    let tokens = cu_seqlens.last().copied().unwrap_or(0) as usize;
    let mut out = vec![0f32; tokens * s.heads * d];
    let group = s.heads / s.kv_heads.max(1);
    let log2e = std::f32::consts::LOG2_E;
    for seg in 0..cu_seqlens.len().saturating_sub(1) {
        let (p0, plen, s0, len) = key_range(cu_seqlens, prefix_of, seg);
        let token = |v: usize| if v < plen { p0 + v } else { s0 + v - plen };
        for h in 0..s.heads {
            let kvh = h / group;
            let k_off = (s.heads + kvh) * d;
            let v_off = (s.heads + s.kv_heads + kvh) * d;
            for qi in 0..len {
                let q = &qkv[(s0 + qi) * s.qkv_stride + h * d..][..d];
                let qv = plen + qi;
                let first = if s.window > 0 { (qv + 1).saturating_sub(s.window) } else { 0 };
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                let mut o = vec![0f32; d];
                let mut kt = first / key_tile * key_tile;
                while kt <= qv {
                    let keys: Vec<usize> = (kt..(kt + key_tile).min(qv + 1)).filter(|&j| j >= first).collect();
                    let scores: Vec<f32> = keys
                        .iter()
                        .map(|&j| {
                            let k = &qkv[token(j) * s.qkv_stride + k_off..][..d];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * (s.softmax_scale * log2e)
                        })
                        .collect();
                    let m_new = scores.iter().copied().fold(m, f32::max);
                    let alpha = if m_new == f32::NEG_INFINITY { 1.0 } else { (m - m_new).exp2() };
                    for v in o.iter_mut() {
                        *v *= alpha;
                    }
                    let mut psum = 0f32;
                    for (&j, &sc) in keys.iter().zip(&scores) {
                        let p = bf16r((sc - m_new).exp2());
                        psum += p;
                        let v = &qkv[token(j) * s.qkv_stride + v_off..][..d];
                        for (o, v) in o.iter_mut().zip(v) {
                            *o += p * v;
                        }
                    }
                    l = l * alpha + psum;
                    m = m_new;
                    kt += key_tile;
                }
                let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
                let dst = &mut out[((s0 + qi) * s.heads + h) * d..][..d];
                for (d, o) in dst.iter_mut().zip(&o) {
                    *d = bf16r(o * inv);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(qkv: &[f32], cu: &[u32], s: &AttnShape) -> Vec<f32> {
        let d = s.head_dim;
        let tokens = *cu.last().unwrap() as usize;
        let mut out = vec![0f32; tokens * s.heads * d];
        for w in cu.windows(2) {
            let (s0, len) = (w[0] as usize, (w[1] - w[0]) as usize);
            for h in 0..s.heads {
                let kvh = h / (s.heads / s.kv_heads);
                for i in 0..len {
                    let q = &qkv[(s0 + i) * s.qkv_stride + h * d..][..d];
                    let lo = if s.window > 0 { (i + 1).saturating_sub(s.window) } else { 0 };
                    let sc: Vec<f64> = (lo..=i)
                        .map(|j| {
                            let k = &qkv[(s0 + j) * s.qkv_stride + (s.heads + kvh) * d..][..d];
                            q.iter().zip(k).map(|(a, b)| f64::from(a * b)).sum::<f64>() * f64::from(s.softmax_scale)
                        })
                        .collect();
                    let mx = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let den: f64 = sc.iter().map(|v| (v - mx).exp()).sum();
                    for c in 0..d {
                        let num: f64 = (lo..=i)
                            .zip(&sc)
                            .map(|(j, v)| {
                                (v - mx).exp()
                                    * f64::from(qkv[(s0 + j) * s.qkv_stride + (s.heads + s.kv_heads + kvh) * d + c])
                            })
                            .sum();
                        out[((s0 + i) * s.heads + h) * d + c] = (num / den) as f32;
                    }
                }
            }
        }
        out
    }

    fn inputs(tokens: usize, stride: usize) -> Vec<f32> {
        (0..tokens * stride).map(|i| bf16r(((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.8)).collect()
    }

    /// Best-of-3 over a 70-token prompt (suffixes of 5, 0 and 90 tokens) and a sequence alone,
    /// packed as the engine packs them, with the sequences as the tree stands for them.
    fn tree_batch() -> (Vec<Vec<u32>>, crate::model::packed::Packed) {
        let prompt: Vec<u32> = (0..70).collect();
        let mut seqs: Vec<Vec<u32>> = [5usize, 0, 90].iter().map(|&n| prompt.iter().copied().chain((0..n as u32).map(|i| 1000 + i)).collect()).collect();
        seqs.push((0..40).map(|i| 5000 + i).collect());
        let packed = crate::model::packed::Packed::shared(&seqs, 16);
        assert!(packed.is_tree() && packed.shared_tokens() == 2 * 70, "{packed:?}");
        (seqs, packed)
    }

    fn prefix_of(p: &crate::model::packed::Packed) -> Vec<i32> {
        p.prefix_of.iter().map(|o| o.map_or(-1, |i| i as i32)).collect()
    }

    fn cu_of(p: &crate::model::packed::Packed) -> Vec<u32> {
        p.cu_seqlens.iter().map(|&c| c as u32).collect()
    }

    #[test]
    fn a_suffix_in_the_tree_gets_exactly_what_its_whole_sequence_gets_alone() {
        let (heads, kv, d) = (6, 2, 8);
        let stride = (heads + 2 * kv) * d;
        let (seqs, packed) = tree_batch();
        let tokens = packed.num_tokens();
        let qkv = inputs(tokens, stride);
        // Each sequence alone: its prefix rows then its suffix rows of the tree's qkv.
        for key_tile in [64, 32] {
            for window in [0, 50, 100] {
                let s = AttnShape { heads, kv_heads: kv, head_dim: d, qkv_stride: stride, softmax_scale: 0.35, window };
                let tree = attention_tree(&qkv, &cu_of(&packed), &prefix_of(&packed), &s, key_tile);
                for i in 0..seqs.len() {
                    let (pre, own) = packed.seq_parts(i);
                    let rows: Vec<usize> = pre.clone().chain(own.clone()).collect();
                    assert_eq!(rows.len(), seqs[i].len());
                    let alone_qkv: Vec<f32> = rows.iter().flat_map(|&r| qkv[r * stride..][..stride].iter().copied()).collect();
                    let alone = attention_tree(&alone_qkv, &[0, rows.len() as u32], &[], &s, key_tile);
                    let w = heads * d;
                    for (j, r) in own.clone().enumerate() {
                        let at = pre.len() + j;
                        assert_eq!(&tree[r * w..][..w], &alone[at * w..][..w], "tile {key_tile} window {window} sequence {i} token {at}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_tree_reference_equals_the_cpu_engines_tree_attention() {
        use candle_core::{Device, Tensor};
        let (heads, kv, d) = (6, 2, 16);
        let stride = (heads + 2 * kv) * d;
        let (_, packed) = tree_batch();
        let tokens = packed.num_tokens();
        let qkv = inputs(tokens, stride);
        let part = |from: usize, n: usize| -> Tensor {
            let v: Vec<f32> = (0..tokens).flat_map(|t| qkv[t * stride + from * d..][..n * d].iter().copied()).collect();
            Tensor::from_vec(v, (tokens, n, d), &Device::Cpu).expect("tensor")
        };
        let (q, k, v) = (part(0, heads), part(heads, kv), part(heads + kv, kv));
        for window in [None, Some(50)] {
            let core = crate::model::layers::PackedAttention { num_heads: heads, num_kv_heads: kv, head_dim: d, sliding_window: window };
            let engine: Vec<f32> = core.forward(&q, &k, &v, &packed).and_then(|t| Ok(t.flatten_all()?.to_vec1()?)).expect("engine attention");
            let s = AttnShape { heads, kv_heads: kv, head_dim: d, qkv_stride: stride, softmax_scale: 1.0 / (d as f32).sqrt(), window: window.unwrap_or(0) };
            for key_tile in [64, 32] {
                let reference = attention_tree(&qkv, &cu_of(&packed), &prefix_of(&packed), &s, key_tile);
                assert_eq!(engine.len(), reference.len());
                let err = super::super::kernels::rel_err(&reference, &engine);
                assert!(err < 5e-3, "window {window:?} tile {key_tile}: rel err {err}");
            }
        }
    }

    #[test]
    fn online_tiles_match_plain_softmax_across_sequences_gqa_and_window() {
        let (heads, kv, d) = (4, 2, 8);
        let stride = (heads + 2 * kv) * d;
        let cu = [0u32, 70, 71, 200];
        let n = 200 * stride;
        // Deterministic pseudo-random inputs, bf16-exact.
        let qkv: Vec<f32> = (0..n).map(|i| bf16r(((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.8)).collect();
        for window in [0, 50] {
            let s = AttnShape { heads, kv_heads: kv, head_dim: d, qkv_stride: stride, softmax_scale: 0.35, window };
            let got = attention(&qkv, &cu, &s);
            let want = naive(&qkv, &cu, &s);
            let err = super::super::kernels::rel_err(&got, &want);
            assert!(err < 5e-3, "window {window}: rel err {err}");
        }
    }
}
