//! FP8 (E4M3) numerics, emulated on the CPU exactly as the GPU path computes them: weights
//! quantized per output channel, activations per token, `scale = amax / 448`, round to nearest
//! even with saturation (values are clamped to ±448 before conversion). Dequantizing and running
//! the f32 matmul gives the same products as an FP8 GEMM with f32 accumulation, up to the order
//! of the sums.

use candle_core::{DType, Tensor, D};

/// Largest finite E4M3 value.
pub const E4M3_MAX: f64 = 448.0;

/// Smallest amax that gets its own scale; an all-zero row keeps scale `MIN_AMAX / 448` so it
/// quantizes to zeros instead of dividing by zero.
const MIN_AMAX: f64 = 1e-12;

/// Quantize each row of `x: [rows, cols]` to E4M3: `(q [rows, cols] F8E4M3, scale [rows, 1] f32)`,
/// with `x ≈ q · scale`.
pub fn quantize_rows(x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let x = x.to_dtype(DType::F32)?;
    // Divide (not multiply by 1/448, which `Tensor / f64` does): the scale must round exactly as
    // `amax / 448` does everywhere else.
    let amax = x.abs()?.max_keepdim(D::Minus1)?.clamp(MIN_AMAX, f64::MAX)?;
    let scale = amax.broadcast_div(&Tensor::new(E4M3_MAX as f32, x.device())?)?;
    let q = quantize_with_scale(&x, &scale)?;
    Ok((q, scale))
}

/// Quantize `x` with a given scale (broadcast over the last dimension, or a scalar).
pub fn quantize_with_scale(x: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(DType::F32)?
        .broadcast_div(scale)?
        .clamp(-E4M3_MAX, E4M3_MAX)?
        .to_dtype(DType::F8E4M3)
}

/// `q · scale` in f32.
pub fn dequantize(q: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    q.to_dtype(DType::F32)?.broadcast_mul(&scale.to_dtype(DType::F32)?)
}

/// Quantize then dequantize each row: what an FP8 GEMM sees of `x`.
pub fn fake_quant_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let (q, scale) = quantize_rows(x)?;
    dequantize(&q, &scale)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn roundtrip(values: &[f32], scale: f32) -> Vec<f32> {
        let x = Tensor::new(values, &Device::Cpu).unwrap();
        let s = Tensor::new(&[scale], &Device::Cpu).unwrap();
        dequantize(&quantize_with_scale(&x, &s).unwrap(), &s).unwrap().to_vec1().unwrap()
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
        let (q, s) = quantize_rows(&x).unwrap();
        let s: Vec<f32> = s.flatten_all().unwrap().to_vec1().unwrap();
        assert!((s[0] - 2.0 / 448.0).abs() < 1e-9 && (s[2] - 100.0 / 448.0).abs() < 1e-7);
        let back = dequantize(&q, &Tensor::new(s.as_slice(), &Device::Cpu).unwrap().reshape((3, 1)).unwrap()).unwrap();
        let back: Vec<Vec<f32>> = back.to_vec2().unwrap();
        assert_eq!(back[0][1], -2.0);
        assert_eq!(back[1], vec![0.0, 0.0, 0.0]);
        assert!((back[2][0] - 100.0).abs() < 1e-4);
    }
}
