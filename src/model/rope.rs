//! Rotary position embeddings: frequencies (default, linear and llama3 scaling, computed in f32
//! the way transformers computes them) and their application in the `rotate_half` layout to the
//! first `rotary_dim` dimensions of each head (partial rotary leaves the rest untouched).

use candle_core::{DType, Device, Tensor, D};

use super::config::{ArchConfig, RopeScaling};

/// Inverse frequencies, `rotary_dim / 2` of them, as transformers computes them in f32.
pub fn inv_freq(theta: f64, rotary_dim: usize, scaling: &RopeScaling) -> Vec<f32> {
    let base = theta as f32;
    let plain = (0..rotary_dim)
        .step_by(2)
        .map(|i| 1.0f32 / base.powf(i as f32 / rotary_dim as f32));
    match *scaling {
        RopeScaling::None => plain.collect(),
        RopeScaling::Linear { factor } => plain.map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max } => {
            let (factor, low, high, old) =
                (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max as f32);
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            plain
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// cos and sin for a set of token positions: `[tokens, rotary_dim / 2]` each, in `dtype`.
#[derive(Debug, Clone)]
pub struct RotaryTables {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

/// The rotary embedding of one model.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
    rotary_dim: usize,
}

impl Rotary {
    pub fn new(cfg: &ArchConfig) -> Self {
        Self { inv_freq: inv_freq(cfg.rope_theta, cfg.rotary_dim, &cfg.rope_scaling), rotary_dim: cfg.rotary_dim }
    }

    /// Tables for the given positions (one per packed token).
    pub fn tables(&self, positions: &[u32], dtype: DType, device: &Device) -> candle_core::Result<RotaryTables> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = f * p as f32;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), half);
        Ok(RotaryTables {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }

    /// Rotate `x: [tokens, heads, head_dim]` in place of its first `rotary_dim` dims.
    pub(crate) fn apply(&self, x: &Tensor, t: &RotaryTables) -> candle_core::Result<Tensor> {
        let (_, _, head_dim) = x.dims3()?;
        let half = self.rotary_dim / 2;
        let cos = t.cos.unsqueeze(1)?;
        let sin = t.sin.unsqueeze(1)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        if self.rotary_dim == head_dim {
            Tensor::cat(&[r1, r2], D::Minus1)
        } else {
            let pass = x.narrow(D::Minus1, self.rotary_dim, head_dim - self.rotary_dim)?;
            Tensor::cat(&[r1, r2, pass], D::Minus1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let scaling = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max: 8192.0 };
        let plain = inv_freq(500_000.0, 128, &RopeScaling::None);
        let scaled = inv_freq(500_000.0, 128, &scaling);
        assert_eq!(plain[0], scaled[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12);
        assert!(scaled.iter().zip(&plain).any(|(s, p)| s < p && *s > p / 8.0), "some frequencies are smoothed");
    }

    #[test]
    fn partial_rotary_leaves_the_tail() -> candle_core::Result<()> {
        let rot = Rotary { inv_freq: inv_freq(10_000.0, 4, &RopeScaling::None), rotary_dim: 4 };
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((2, 1, 8))?;
        let t = rot.tables(&[0, 3], DType::F32, &Device::Cpu)?;
        let y = rot.apply(&x, &t)?;
        // Position 0 is the identity; the last 4 dims never move.
        assert_eq!(y.get(0)?.flatten_all()?.to_vec1::<f32>()?, x.get(0)?.flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(y.narrow(2, 4, 4)?.flatten_all()?.to_vec1::<f32>()?, x.narrow(2, 4, 4)?.flatten_all()?.to_vec1::<f32>()?);
        assert_ne!(y.get(1)?.narrow(1, 0, 4)?.flatten_all()?.to_vec1::<f32>()?, x.get(1)?.narrow(1, 0, 4)?.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
