//! References of the memory-bound kernels: norms (+ residual add, + per-token FP8), rotary,
//! MLP activations (+ FP8), residual add, the per-channel-scale epilogue, row gather, and the
//! FP8 GEMM itself (E4M3 × E4M3 with f32 accumulation, scaled per token and per channel).

use super::bf16r;
use super::fp8;

pub use crate::model::config::{Activation, NormKind};

/// `norm_bf16` kernels: when `res` is given, `x += res` first (x is updated, bf16). Returns the
/// normalized rows `[tokens, hidden]` (bf16-exact).
pub fn norm(
    kind: NormKind,
    x: &mut [f32],
    res: Option<&[f32]>,
    w: &[f32],
    b: Option<&[f32]>,
    eps: f32,
    hidden: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for (t, (row, out)) in x.chunks_mut(hidden).zip(y.chunks_mut(hidden)).enumerate() {
        if let Some(res) = res {
            for (v, r) in row.iter_mut().zip(&res[t * hidden..(t + 1) * hidden]) {
                *v = bf16r(*v + r);
            }
        }
        let n = hidden as f32;
        match kind {
            NormKind::Rms => {
                let var = row.iter().map(|v| v * v).sum::<f32>() / n;
                let d = (var + eps).sqrt();
                for ((o, v), w) in out.iter_mut().zip(row.iter()).zip(w) {
                    *o = bf16r(bf16r(v / d) * bf16r(*w));
                }
            }
            NormKind::LayerNorm1P => {
                let mean = row.iter().sum::<f32>() / n;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
                let d = (var + eps).sqrt();
                for (i, (o, v)) in out.iter_mut().zip(row.iter()).enumerate() {
                    let mut r = bf16r((v - mean) / d * w[i]);
                    if let Some(b) = b {
                        r = bf16r(r + bf16r(b[i]));
                    }
                    *o = r;
                }
            }
        }
    }
    y
}

/// `rotary_bf16`: rotate the first `heads` heads of each row of `x: [tokens, row_stride]` in
/// place, first `rot_dim` dims of each head, rotate_half layout.
#[allow(clippy::too_many_arguments)]
pub fn rotary(
    x: &mut [f32],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    row_stride: usize,
    rot_dim: usize,
    positions: &[u32],
    inv_freq: &[f32],
) {
    let half = rot_dim / 2;
    for t in 0..tokens {
        for h in 0..heads {
            let p = &mut x[t * row_stride + h * head_dim..][..head_dim];
            for i in 0..half {
                let angle = positions[t] as f32 * inv_freq[i];
                let (c, s) = (bf16r(angle.cos()), bf16r(angle.sin()));
                let (x1, x2) = (p[i], p[i + half]);
                p[i] = bf16r(bf16r(x1 * c) - bf16r(x2 * s));
                p[i + half] = bf16r(bf16r(x2 * c) + bf16r(x1 * s));
            }
        }
    }
}

/// `*_quant_bf16` activations: `[tokens, inter]` bf16-exact (quantize with `fp8::quantize_rows`).
pub fn activation(act: Activation, input: &[f32], inter: usize) -> Vec<f32> {
    let width = if act == Activation::Relu2 { inter } else { 2 * inter };
    input
        .chunks(width)
        .flat_map(|row| {
            (0..inter).map(move |i| match act {
                Activation::Relu2 => {
                    let u = row[i].max(0.0);
                    bf16r(u * u)
                }
                Activation::SwiGlu => {
                    let g = row[i];
                    bf16r(bf16r(g / bf16r(1.0 + bf16r((-g).exp()))) * row[inter + i])
                }
                Activation::GeGluTanh => {
                    let g = row[i];
                    let a = 0.5 * g * (1.0 + (0.797_884_6 * g * (1.0 + 0.044715 * g * g)).tanh());
                    bf16r(bf16r(a) * row[inter + i])
                }
            })
        })
        .collect()
}

/// `add_bf16`: `a = bf16(a + b)`.
pub fn add(a: &mut [f32], b: &[f32]) {
    for (a, b) in a.iter_mut().zip(b) {
        *a = bf16r(*a + b);
    }
}

/// `scale_epilogue_bf16`: `y = bf16(bf16(y · rs[t] · cs[n]) + bias[n])` in place.
pub fn scale_epilogue(y: &mut [f32], cols: usize, row_scale: &[f32], col_scale: &[f32], bias: Option<&[f32]>) {
    for (t, row) in y.chunks_mut(cols).enumerate() {
        for (n, v) in row.iter_mut().enumerate() {
            let mut r = bf16r(*v * (row_scale[t] * col_scale[n]));
            if let Some(b) = bias {
                r = bf16r(r + bf16r(b[n]));
            }
            *v = r;
        }
    }
}

/// `scale_epilogue_bf16` with rotary over the first `heads` heads of each row, in the kernel's
/// order: each pair `(j, j + rot_dim / 2)` of a rotated head goes through the epilogue and is
/// rotated at once; other columns only through the epilogue. Equal, bit for bit, to
/// [`scale_epilogue`] then [`rotary`] (the engine's unfused order, which parity is held to).
#[allow(clippy::too_many_arguments)]
pub fn scale_epilogue_rotary(y: &mut [f32], cols: usize, row_scale: &[f32], col_scale: &[f32], bias: Option<&[f32]>,
                             (heads, head_dim, rot_dim): (usize, usize, usize), positions: &[u32], inv_freq: &[f32]) {
    let epi = |v: f32, t: usize, n: usize| {
        let r = bf16r(v * (row_scale[t] * col_scale[n]));
        bias.map_or(r, |b| bf16r(r + bf16r(b[n])))
    };
    let half = rot_dim / 2;
    for (t, row) in y.chunks_mut(cols).enumerate() {
        for c in 0..cols {
            let j = c % head_dim.max(1);
            if c < heads * head_dim && j < rot_dim {
                if j < half {
                    let (x1, x2) = (epi(row[c], t, c), epi(row[c + half], t, c + half));
                    let angle = positions[t] as f32 * inv_freq[j];
                    let (co, si) = (bf16r(angle.cos()), bf16r(angle.sin()));
                    row[c] = bf16r(bf16r(x1 * co) - bf16r(x2 * si));
                    row[c + half] = bf16r(bf16r(x2 * co) + bf16r(x1 * si));
                }
                continue;
            }
            row[c] = epi(row[c], t, c);
        }
    }
}

/// `head_rmsnorm_bf16`: Qwen3's per-head RMSNorm in place on the first `q_heads + kv_heads`
/// heads of each `row_stride`-wide row (q heads with `q_w`, k heads with `k_w`).
#[allow(clippy::too_many_arguments)]
pub fn head_rms_norm(x: &mut [f32], tokens: usize, q_heads: usize, kv_heads: usize, head_dim: usize, row_stride: usize,
                     q_w: &[f32], k_w: &[f32], eps: f32) {
    for t in 0..tokens {
        for h in 0..q_heads + kv_heads {
            let at = t * row_stride + h * head_dim;
            let w = if h < q_heads { q_w } else { k_w };
            let y = norm(NormKind::Rms, &mut x[at..at + head_dim], None, w, None, eps, head_dim);
            x[at..at + head_dim].copy_from_slice(&y);
        }
    }
}

/// `add_bias_bf16`: `y = bf16(y + bf16(bias[n]))`.
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_mut(bias.len().max(1)) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v = bf16r(*v + bf16r(*b));
        }
    }
}

/// The bf16 GEMM (cuBLASLt, f32 accumulation): `y [t, n] = bf16(x [t, k] · w [n, k]ᵀ)`, inputs
/// already bf16 values.
pub fn bf16_gemm(x: &[f32], w: &[f32], k: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(x.len() / k.max(1) * (w.len() / k.max(1)));
    for row in x.chunks(k) {
        for wrow in w.chunks(k) {
            y.push(bf16r(row.iter().zip(wrow).map(|(a, b)| a * b).sum()));
        }
    }
    y
}

/// `gather_rows_bf16`: `dst[m] = src[idx[m]]`, zeros for an index past the end.
pub fn gather_rows(src: &[f32], cols: usize, idx: &[u32]) -> Vec<f32> {
    let rows = src.len() / cols.max(1);
    idx.iter()
        .flat_map(|&i| {
            let i = i as usize;
            (0..cols).map(move |c| if i < rows { src[i * cols + c] } else { 0.0 })
        })
        .collect()
}

/// The FP8 GEMM: `y[t, n] = bf16(Σ_k e4m3(a[t, k]) · e4m3(w[n, k]) · a_scale[t] · w_scale[n])`,
/// `a: [tokens, k]` and `w: [n, k]` as E4M3 bytes. f32 accumulation (the GPU's order of the
/// sums differs; compare with a relative tolerance).
pub fn fp8_gemm(a: &[u8], a_scale: &[f32], w: &[u8], w_scale: &[f32], k: usize) -> Vec<f32> {
    let wf: Vec<f32> = w.iter().map(|&b| fp8::e4m3_to_f32(b)).collect();
    let n = w_scale.len();
    let mut y = Vec::with_capacity(a_scale.len() * n);
    for (t, row) in a.chunks(k).enumerate() {
        let af: Vec<f32> = row.iter().map(|&b| fp8::e4m3_to_f32(b)).collect();
        for (j, wrow) in wf.chunks(k).enumerate() {
            let dot: f32 = af.iter().zip(wrow).map(|(x, y)| x * y).sum();
            y.push(bf16r(dot * a_scale[t] * w_scale[j]));
        }
    }
    y
}

/// `‖a − b‖ / ‖b‖` in f64; NaN anywhere gives infinity.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_adds_the_residual_and_normalizes() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        let res = vec![1.0, 0.0, 1.0, 0.0];
        let y = norm(NormKind::Rms, &mut x, Some(&res), &[1.0, 2.0], None, 0.0, 2);
        assert_eq!(x, vec![2.0, 2.0, 4.0, 4.0]);
        // rms of (2, 2) is 2: (1, 1) · w.
        assert_eq!(y, vec![1.0, 2.0, 1.0, 2.0]);
    }

    #[test]
    fn layernorm1p_centers_scales_and_shifts() {
        let mut x = vec![1.0, 3.0];
        let y = norm(NormKind::LayerNorm1P, &mut x, None, &[1.0, 1.0], Some(&[0.5, 0.5]), 0.0, 2);
        assert_eq!(y, vec![-0.5, 1.5]);
    }

    #[test]
    fn rotary_turns_pairs_and_leaves_the_partial_tail() {
        // One token at position 1, one head of 6 dims, rot_dim 4, inv_freq (π/2, 0).
        let mut x = vec![1.0, 1.0, 0.0, 0.0, 7.0, 9.0];
        rotary(&mut x, 1, 1, 6, 6, 4, &[1], &[std::f32::consts::FRAC_PI_2, 0.0]);
        // Pair (x0, x2) = (1, 0) turns by 90° → (≈0, 1); pair (x1, x3) has angle 0.
        assert!(x[0].abs() < 1e-6 && x[2] == 1.0);
        assert_eq!((x[1], x[3], x[4], x[5]), (1.0, 0.0, 7.0, 9.0));
    }

    #[test]
    fn activations_follow_their_formulas() {
        let relu2 = activation(Activation::Relu2, &[-1.0, 3.0], 2);
        assert_eq!(relu2, vec![0.0, 9.0]);
        let swiglu = activation(Activation::SwiGlu, &[0.0, 2.0, 5.0, 1.0], 2);
        assert_eq!(swiglu[0], 0.0);
        assert!((swiglu[1] - 2.0 / (1.0 + (-2f32).exp())).abs() < 1e-2);
    }

    #[test]
    fn fp8_gemm_applies_both_scales() {
        let a = [fp8::e4m3_from_f32(2.0), fp8::e4m3_from_f32(1.0)];
        let w = [fp8::e4m3_from_f32(3.0), fp8::e4m3_from_f32(4.0)];
        assert_eq!(fp8_gemm(&a, &[0.5], &w, &[2.0], 2), vec![10.0]);
        assert_eq!(gather_rows(&[1.0, 2.0, 3.0, 4.0], 2, &[1, 9]), vec![3.0, 4.0, 0.0, 0.0]);
        assert!(rel_err(&[1.0, f32::NAN], &[1.0, 1.0]).is_infinite());
    }

    #[test]
    fn head_norm_normalizes_each_q_and_k_head_and_leaves_v() {
        // One token: 1 q head, 1 k head, 1 v head of 2 values.
        let mut x = vec![3.0, 4.0, 1.0, 1.0, 7.0, 8.0];
        head_rms_norm(&mut x, 1, 1, 1, 2, 6, &[1.0, 2.0], &[0.5, 0.5], 0.0);
        let r = (12.5f32).sqrt();
        assert_eq!(x[..2], [bf16r(bf16r(3.0 / r)), bf16r(bf16r(4.0 / r) * 2.0)]);
        assert_eq!(x[2..], [0.5, 0.5, 7.0, 8.0]);
    }

    #[test]
    fn the_fused_epilogue_rotary_equals_the_epilogue_then_rotary_bit_for_bit() {
        // 3 tokens; q, k, v heads of 8 dims (2 q heads + 1 k head rotated), partial rotary
        // (6 of 8 dims), a bias; values of a GEMM's scale so every rounding matters.
        let (tokens, heads, d, rot) = (3usize, 3usize, 8usize, 6usize);
        let cols = (heads + 1) * d;
        let wave = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| bf16r(((i as f32 * k).sin() * 37.0).fract() * 300.0)).collect() };
        let (y, rs, cs, bias) = (wave(tokens * cols, 1.7), wave(tokens, 0.3), wave(cols, 0.9), wave(cols, 2.3));
        let (rs, cs): (Vec<f32>, Vec<f32>) = (rs.iter().map(|v| v / 3e4).collect(), cs.iter().map(|v| v / 7e3).collect());
        let pos = [0u32, 5, 4099];
        let inv: Vec<f32> = (0..rot / 2).map(|i| 10_000f32.powf(-((2 * i) as f32) / rot as f32)).collect();
        let mut want = y.clone();
        scale_epilogue(&mut want, cols, &rs, &cs, Some(&bias));
        rotary(&mut want, tokens, heads, d, cols, rot, &pos, &inv);
        let mut got = y.clone();
        scale_epilogue_rotary(&mut got, cols, &rs, &cs, Some(&bias), (heads, d, rot), &pos, &inv);
        assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        // The v head and each head's unrotated tail only went through the epilogue.
        let mut plain = y.clone();
        scale_epilogue(&mut plain, cols, &rs, &cs, Some(&bias));
        assert_eq!(got[heads * d..cols], plain[heads * d..cols]);
        assert_eq!(got[cols + rot..cols + d], plain[cols + rot..cols + d]);
        assert_ne!(got[cols..cols + rot], plain[cols..cols + rot], "position 5 turns the pairs");
        // Zero heads: the plain epilogue.
        let mut none = y.clone();
        scale_epilogue_rotary(&mut none, cols, &rs, &cs, Some(&bias), (0, d, rot), &pos, &inv);
        assert_eq!(none, plain);
    }

    #[test]
    fn bf16_gemm_and_its_bias() {
        let mut y = bf16_gemm(&[1.0, 2.0, 3.0, 4.0], &[1.0, 1.0, 0.5, -1.0], 2);
        assert_eq!(y, vec![3.0, -1.5, 7.0, -2.5]);
        add_bias(&mut y, &[1.0, 0.25]);
        assert_eq!(y, vec![4.0, -1.25, 8.0, -2.25]);
    }
}
