//! Reference of `attention_varlen_d*_bf16`: causal attention inside each packed sequence, with
//! grouped K/V heads and an optional sliding window, computed with the kernel's online softmax
//! over the same 64-key tiles so that the bf16 rounding of the probabilities matches.

use super::bf16r;

/// Keys per tile, as in the kernel.
pub(crate) const KEY_TILE: usize = 64;

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

/// `qkv: [tokens, qkv_stride]`, `cu_seqlens: [seqs + 1]` → `[tokens, heads · head_dim]`.
pub fn attention(qkv: &[f32], cu_seqlens: &[u32], s: &AttnShape) -> Vec<f32> {
    let d = s.head_dim;
    let tokens = cu_seqlens.last().copied().unwrap_or(0) as usize;
    let mut out = vec![0f32; tokens * s.heads * d];
    let group = s.heads / s.kv_heads.max(1);
    let log2e = std::f32::consts::LOG2_E;
    for w in cu_seqlens.windows(2) {
        let (s0, len) = (w[0] as usize, (w[1] - w[0]) as usize);
        for h in 0..s.heads {
            let kvh = h / group;
            let k_off = (s.heads + kvh) * d;
            let v_off = (s.heads + s.kv_heads + kvh) * d;
            for qi in 0..len {
                let q = &qkv[(s0 + qi) * s.qkv_stride + h * d..][..d];
                let first = if s.window > 0 { (qi + 1).saturating_sub(s.window) } else { 0 };
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                let mut o = vec![0f32; d];
                let mut kt = first / KEY_TILE * KEY_TILE;
                while kt <= qi {
                    let keys: Vec<usize> = (kt..(kt + KEY_TILE).min(qi + 1)).filter(|&j| j >= first).collect();
                    let scores: Vec<f32> = keys
                        .iter()
                        .map(|&j| {
                            let k = &qkv[(s0 + j) * s.qkv_stride + k_off..][..d];
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
                        let v = &qkv[(s0 + j) * s.qkv_stride + v_off..][..d];
                        for (o, v) in o.iter_mut().zip(v) {
                            *o += p * v;
                        }
                    }
                    l = l * alpha + psum;
                    m = m_new;
                    kt += KEY_TILE;
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
