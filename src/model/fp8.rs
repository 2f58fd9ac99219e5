//! FP8 E4M3 ("e4m3fn": no infinities, one NaN pattern, largest finite 448), the one definition
//! for the whole crate: bit-exact on `f32` slices (the CPU references of the CUDA kernels, the
//! GPU stage's weight preparation) and on candle tensors (the CPU engine's FP8 emulation,
//! `scorestream quantize`). Both agree with `torch.float8_e4m3fn` conversion of values already
//! clamped to ±448 and with CUDA's `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)`: round
//! to nearest, ties to even, and saturation (anything beyond ±448, infinities included, becomes
//! ±448). NaN stays NaN; a test holds the two conversions together on every bf16 value.
//!
//! The per-token (and per-channel) scheme shared by the CPU FP8 path and the GPU kernels:
//! `scale = max(amax, 1e-12) / 448`, `q = e4m3(x / scale)`, `x ≈ e4m3_to_f32(q) · scale`.
//! Dequantizing and running the f32 matmul gives the same products as an FP8 GEMM with f32
//! accumulation, up to the order of the sums.

use candle_core::{DType, Tensor, D};

/// Largest finite E4M3 value.
pub(crate) const E4M3_MAX: f32 = 448.0;

/// Smallest amax that gets its own scale; an all-zero row keeps `MIN_AMAX / 448` so it
/// quantizes to zeros instead of dividing by zero.
pub(crate) const MIN_AMAX: f32 = 1e-12;

/// The NaN encoding (sign bit clear).
pub(crate) const E4M3_NAN: u8 = 0x7F;

/// Convert an f32 to E4M3 with saturation and round-to-nearest-even.
pub fn e4m3_from_f32(x: f32) -> u8 {
    if x.is_nan() {
        return E4M3_NAN;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    // Below the smallest normal (2^-6) the spacing is 2^-9: code k means k · 2^-9, and k = 8
    // is exactly the smallest normal's code (exponent 1, mantissa 0).
    if a < 2f32.powi(-6) {
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32 - 127; // -6..=8
    let mant = bits & 0x7F_FFFF;
    // Keep 3 of the 23 mantissa bits, ties to even.
    let keep = mant >> 20;
    let rest = mant & 0xF_FFFF;
    let half = 0x8_0000;
    let mut m = keep + u32::from(rest > half || (rest == half && keep & 1 == 1));
    let mut e = exp + 7;
    if m == 8 {
        m = 0;
        e += 1;
    }
    let code = ((e as u32) << 3 | m).min(0x7E) as u8;
    sign | code
}

/// Decode an E4M3 byte.
pub(crate) fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = i32::from((b >> 3) & 0x0F);
    let m = f32::from(b & 0x07);
    if e == 15 && b & 0x07 == 7 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m * 2f32.powi(-9)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// The per-token scale for a row whose absolute maximum is `amax`.
pub(crate) fn scale_for_amax(amax: f32) -> f32 {
    amax.max(MIN_AMAX) / E4M3_MAX
}

/// Quantize one row with a given scale: `q[i] = e4m3(x[i] / scale)`.
pub(crate) fn quantize_with_scale(x: &[f32], scale: f32, q: &mut [u8]) {
    for (q, &v) in q.iter_mut().zip(x) {
        *q = e4m3_from_f32(v / scale);
    }
}

/// Quantize one row with its own scale (from its amax); returns the scale.
pub(crate) fn quantize_row(x: &[f32], q: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = scale_for_amax(amax);
    quantize_with_scale(x, scale, q);
    scale
}

/// Quantize `x: [rows, cols]` row by row: `(q [rows, cols], scales [rows])`.
pub fn quantize_rows(x: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; x.len()];
    let scales = x.chunks(cols.max(1)).zip(q.chunks_mut(cols.max(1))).map(|(r, q)| quantize_row(r, q)).collect();
    (q, scales)
}

/// `q · scale` for each row.
pub fn dequantize_rows(q: &[u8], scales: &[f32], cols: usize) -> Vec<f32> {
    q.chunks(cols.max(1)).zip(scales).flat_map(|(r, &s)| r.iter().map(move |&b| e4m3_to_f32(b) * s)).collect()
}

// Candle tensors.

/// Quantize each row of `x: [rows, cols]` to E4M3: `(q [rows, cols] F8E4M3, scale [rows, 1] f32)`,
/// with `x ≈ q · scale`.
pub(crate) fn quantize_tensor_rows(x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let x = x.to_dtype(DType::F32)?;
    // Divide (not multiply by 1/448, which `Tensor / f64` does): the scale must round exactly as
    // `amax / 448` does everywhere else.
    let amax = x.abs()?.max_keepdim(D::Minus1)?.clamp(f64::from(MIN_AMAX), f64::MAX)?;
    let scale = amax.broadcast_div(&Tensor::new(E4M3_MAX, x.device())?)?;
    let q = quantize_tensor(&x, &scale)?;
    Ok((q, scale))
}

/// Quantize `x` with a given scale (broadcast over the last dimension, or a scalar).
pub(crate) fn quantize_tensor(x: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(DType::F32)?
        .broadcast_div(scale)?
        .clamp(-f64::from(E4M3_MAX), f64::from(E4M3_MAX))?
        .to_dtype(DType::F8E4M3)
}

/// `q · scale` in f32.
pub(crate) fn dequantize_tensor(q: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    q.to_dtype(DType::F32)?.broadcast_mul(&scale.to_dtype(DType::F32)?)
}

/// Quantize then dequantize each row: what an FP8 GEMM sees of `x`.
pub(crate) fn fake_quant_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let (q, scale) = quantize_tensor_rows(x)?;
    dequantize_tensor(&q, &scale)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn known_values_match_torch_float8_e4m3fn() {
        let cases: &[(f32, u8)] = &[
            (0.0, 0x00),
            (-0.0, 0x80),
            (1.0, 0x38),
            (-2.0, 0xC0),
            (0.1, 0x1D),      // 0.1015625
            (240.0, 0x77),
            (448.0, 0x7E),
            (1.0625, 0x38),   // tie between 1.0 and 1.125 → even mantissa
            (1.1875, 0x3A),   // tie between 1.125 and 1.25 → even (1.25)
            (1.1, 0x39),
            (2f32.powi(-6), 0x08),        // smallest normal
            (2f32.powi(-9), 0x01),        // smallest subnormal
            (2f32.powi(-10), 0x00),       // half of it: tie → 0
            (3.0 * 2f32.powi(-10), 0x02), // 1.5 subnormal steps → 2
            (5.0 * 2f32.powi(-10), 0x02), // 2.5 steps → 2 (even)
            (7.5 * 2f32.powi(-9), 0x08),  // 7.5 steps → 8 = smallest normal
            (-7.0 * 2f32.powi(-9), 0x87),
        ];
        for &(x, code) in cases {
            assert_eq!(e4m3_from_f32(x), code, "{x}");
        }
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        for x in [449.0f32, 464.0, 500.0, 1e30, f32::INFINITY] {
            assert_eq!(e4m3_from_f32(x), 0x7E, "{x}");
            assert_eq!(e4m3_from_f32(-x), 0xFE, "{x}");
        }
        assert_eq!(e4m3_from_f32(f32::NAN), E4M3_NAN);
        assert!(e4m3_to_f32(E4M3_NAN).is_nan());
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
    }

    #[test]
    fn every_finite_code_round_trips_and_midpoints_round_to_even() {
        let finite: Vec<u8> = (0u8..=0x7E).collect();
        for &c in &finite {
            let v = e4m3_to_f32(c);
            assert_eq!(e4m3_from_f32(v), c, "code {c:#x} = {v}");
            assert_eq!(e4m3_from_f32(-v), c | 0x80, "code {c:#x}");
        }
        for w in finite.windows(2) {
            let (lo, hi) = (e4m3_to_f32(w[0]), e4m3_to_f32(w[1]));
            let mid = (lo + hi) / 2.0;
            let even = if w[0] & 1 == 0 { w[0] } else { w[1] };
            assert_eq!(e4m3_from_f32(mid), even, "midpoint of {lo} and {hi}");
            assert_eq!(e4m3_from_f32(f32::from_bits(mid.to_bits() + 1)), w[1]);
            assert_eq!(e4m3_from_f32(f32::from_bits(mid.to_bits() - 1)), w[0]);
        }
    }

    #[test]
    fn rows_map_their_amax_to_448_and_zero_rows_stay_zero() {
        let x = [1.0f32, -2.0, 0.5, 0.0, 0.0, 0.0];
        let (q, s) = quantize_rows(&x, 3);
        assert_eq!(s[0], 2.0 / 448.0);
        assert_eq!(q[1], 0xFE);
        assert_eq!(&q[3..], &[0, 0, 0]);
        let back = dequantize_rows(&q, &s, 3);
        assert_eq!(back[1], -2.0);
        assert_eq!(&back[3..], &[0.0, 0.0, 0.0]);
    }

    fn roundtrip(values: &[f32], scale: f32) -> Vec<f32> {
        let x = Tensor::new(values, &Device::Cpu).unwrap();
        let s = Tensor::new(&[scale], &Device::Cpu).unwrap();
        dequantize_tensor(&quantize_tensor(&x, &s).unwrap(), &s).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn e4m3_rounds_to_nearest_even_and_saturates() {
        // Representable values survive; 1.0625 is half-way between 1.0 and 1.125 and rounds to
        // the even mantissa (1.0); 1.1 rounds to 1.125; beyond 448 saturates.
        assert_eq!(roundtrip(&[1.0, 1.0625, 1.1, 1.1875, 448.0, 500.0, -1000.0], 1.0), vec![1.0, 1.0, 1.125, 1.25, 448.0, 448.0, -448.0]);
        // Subnormals: the smallest is 2^-9; half of it rounds to zero (even), 0.75 of it up.
        let tiny = 2f32.powi(-9);
        assert_eq!(roundtrip(&[tiny, tiny * 0.5, tiny * 0.75], 1.0), vec![tiny, 0.0, tiny]);
    }

    #[test]
    fn per_row_scales_map_each_amax_to_448() {
        let x = Tensor::new(&[[1f32, -2.0, 0.5], [0.0, 0.0, 0.0], [100.0, 3.0, -7.0]], &Device::Cpu).unwrap();
        let (q, s) = quantize_tensor_rows(&x).unwrap();
        let s: Vec<f32> = s.flatten_all().unwrap().to_vec1().unwrap();
        assert!((s[0] - 2.0 / 448.0).abs() < 1e-9 && (s[2] - 100.0 / 448.0).abs() < 1e-7);
        let back = dequantize_tensor(&q, &Tensor::new(s.as_slice(), &Device::Cpu).unwrap().reshape((3, 1)).unwrap()).unwrap();
        let back: Vec<Vec<f32>> = back.to_vec2().unwrap();
        assert_eq!(back[0][1], -2.0);
        assert_eq!(back[1], vec![0.0, 0.0, 0.0]);
        assert!((back[2][0] - 100.0).abs() < 1e-4);
    }

    /// The candle conversion (the CPU engine) and the bit-level one (the kernel references,
    /// the GPU weights) give the same E4M3 value for every bf16 input, after the same clamp.
    #[test]
    fn candle_and_bit_level_conversions_agree_on_every_bf16_value() {
        let xs: Vec<f32> = (0..=u16::MAX).map(|b| half::bf16::from_bits(b).to_f32()).collect();
        let one = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let q = quantize_tensor(&Tensor::new(xs.as_slice(), &Device::Cpu).unwrap(), &one).unwrap();
        let candle: Vec<f32> = q.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        let mut differ = Vec::new();
        for (x, c) in xs.iter().zip(&candle) {
            let bits = e4m3_to_f32(e4m3_from_f32(*x));
            let same = (bits.is_nan() && c.is_nan()) || bits.to_bits() == c.to_bits();
            if !same {
                differ.push((*x, *c, bits));
            }
        }
        assert!(differ.is_empty(), "{} of 65536 bf16 values differ, e.g. (x, candle, bits) {:?}", differ.len(), &differ[..differ.len().min(8)]);
    }
}
