//! A model stage on one GPU: the CUDA counterpart of [`crate::model::stage::Stage`], with the
//! same inputs and outputs (packed batch + token ids or hidden states → hidden states or
//! scores). Weights are read with the CPU loader (so FP8 checkpoints are dequantized exactly
//! as on the CPU), then, in FP8 ([`Precision::Fp8`]), quantized per output channel to E4M3
//! with the shared quantizer ([`crate::engine::reference::fp8`]), or in bf16 kept as the
//! checkpoint's bf16 values, and uploaded layer by layer. The embedding lives on
//! the GPU in bf16; the final norm runs on the GPU over the last tokens only; the reward head
//! (a few rows) runs on the CPU with the CPU engine's own [`RewardHead`].
//!
//! Hidden states between stages travel through the host (a device-to-device copy is the next
//! step for multi-GPU pipelines).

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::compile::default_cache_dir;
use super::device::{DeviceBuf, GpuDevice};
use super::gemm::Gemm;
use super::layer::{forward, HostLinear, HostWeight, LayerConfig, LayerWeights, Workspace};
use super::plan::LayerShape;
use super::precision::Precision;
use super::CudaError;
use crate::engine::reference::fp8;
use crate::model::config::{Activation, ArchConfig, NormKind};
use crate::model::head::RewardHead;
use crate::model::layers::Linear;
use crate::model::packed::Packed;
use crate::model::stage::{Activations, StageOutput};
use crate::model::weights::Vb;
use crate::model::ModelError;

type Result<T> = std::result::Result<T, CudaError>;

/// Layers `range` of a model on one GPU.
pub struct CudaStage {
    pub range: Range<usize>,
    dev: GpuDevice,
    precision: Precision,
    gemm: Gemm,
    ws: Workspace,
    layers: Vec<(LayerConfig, LayerWeights)>,
    /// `[vocab, hidden]` bf16 and the vocabulary size, on the first stage.
    embed: Option<(DeviceBuf, usize)>,
    /// Token ids of the current batch (`[max_tokens]` u32).
    ids: DeviceBuf,
    /// Final norm (weight, bias) and head, on the last stage.
    tail: Option<(DeviceBuf, Option<DeviceBuf>, RewardHead)>,
    hidden: usize,
    ln1p: bool,
    eps: f32,
}

fn model_err(e: ModelError) -> CudaError {
    CudaError::Model(e)
}

fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).map_err(|e| model_err(e.into()))
}

/// The layer's shape and switches from the model config, checked for GEMMs in `precision`.
pub fn layer_config(cfg: &ArchConfig, index: usize, precision: Precision) -> Result<LayerConfig> {
    if ![16, 32, 64, 128, 192].contains(&cfg.head_dim) {
        return Err(CudaError::Unsupported(format!("head_dim {}", cfg.head_dim)));
    }
    let gated = !matches!(cfg.activation, Activation::Relu2);
    let shape = LayerShape {
        hidden: cfg.hidden_size,
        heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        inter: cfg.intermediate_size,
        gated,
    };
    shape.check_gemms(precision).map_err(CudaError::Shape)?;
    Ok(LayerConfig {
        shape,
        ln1p: cfg.norm == NormKind::LayerNorm1P,
        act: cfg.activation,
        rot_dim: cfg.rotary_dim,
        eps: cfg.norm_eps as f32,
        window: cfg.sliding_window.get(index).copied().flatten().unwrap_or(0),
        qk_norm: cfg.qk_norm,
    })
}

/// Concatenate the rows of several linear layers (`names` under `vb`, each `[out_i, in]`),
/// then quantize each output channel to E4M3 (FP8) or round to bf16 (exact for a bf16
/// checkpoint).
fn host_linear(vb: &Vb, names: &[&str], outs: &[usize], inp: usize, bias: bool, precision: Precision) -> Result<HostLinear> {
    let mut w = Vec::new();
    let mut b = bias.then(Vec::new);
    for (name, &out) in names.iter().zip(outs) {
        let lin = Linear::load(&vb.pp(name), inp, out, false).map_err(model_err)?;
        w.extend(f32_vec(&lin.weight(DType::F32).map_err(model_err)?)?);
        if let Some(b) = b.as_mut() {
            b.extend(f32_vec(&vb.pp(name).get_as(out, "bias", DType::F32).map_err(model_err)?)?);
        }
    }
    let weight = match precision {
        Precision::Fp8 => {
            let (codes, scales) = fp8::quantize_rows(&w, inp);
            HostWeight::Fp8 { codes, scales }
        }
        Precision::Bf16 => HostWeight::Bf16(to_bf16_bits(&w)),
    };
    Ok(HostLinear { weight, bias: b })
}

fn host_norm(vb: &Vb, dim: usize, ln1p: bool) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let w = f32_vec(&vb.get_as(dim, "weight", DType::F32).map_err(model_err)?)?;
    if !ln1p {
        return Ok((w, None));
    }
    let b = f32_vec(&vb.get_as(dim, "bias", DType::F32).map_err(model_err)?)?;
    Ok((w.into_iter().map(|v| v + 1.0).collect(), Some(b)))
}

fn upload_f32(dev: &GpuDevice, v: &[f32]) -> Result<DeviceBuf> {
    let b = dev.alloc(v.len() * 4)?;
    dev.upload(b.ptr, v)?;
    Ok(b)
}

fn to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
}

impl CudaStage {
    /// Load layers `range` onto GPU `ordinal`; `vb` is the checkpoint root read as f32 on the
    /// CPU (`Vb::new(weights, DType::F32, Device::Cpu)`). Activation buffers are sized once for
    /// `max_tokens` tokens in up to `max_seqs` sequences. The linear layers run in `precision`
    /// (chosen by [`super::precision::choose`]; a GPU that cannot run it is refused here too).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        ordinal: usize,
        vb: &Vb,
        cfg: &ArchConfig,
        range: Range<usize>,
        reward_row: usize,
        attribute_weights: Option<&[f32]>,
        precision: Precision,
        max_tokens: usize,
        max_seqs: usize,
    ) -> Result<Self> {
        let dev = GpuDevice::open(ordinal, &default_cache_dir(), precision)?;
        let first = layer_config(cfg, range.start.min(cfg.num_layers.saturating_sub(1)), precision)?;
        let inv = crate::model::rope::inv_freq(cfg.rope_theta, cfg.rotary_dim, &cfg.rope_scaling);
        let ws = Workspace::new(&dev, &first.shape, max_tokens, max_seqs, &inv, precision)?;
        let model = vb.pp("model");
        let mut layers = Vec::with_capacity(range.len());
        for i in range.clone() {
            let lc = layer_config(cfg, i, precision)?;
            layers.push((lc, Self::load_layer(&dev, &model.pp("layers").pp(i), cfg, &lc, precision)?));
        }
        let (h, ln1p) = (cfg.hidden_size, cfg.norm == NormKind::LayerNorm1P);
        let embed = if range.start == 0 {
            let t = model.pp("embed_tokens").get_as((cfg.vocab_size, h), "weight", DType::F32).map_err(model_err)?;
            let table = dev.alloc(cfg.vocab_size * h * 2)?;
            dev.upload(table.ptr, &to_bf16_bits(&f32_vec(&t)?))?;
            Some((table, cfg.vocab_size))
        } else {
            None
        };
        let tail = if range.end == cfg.num_layers {
            let (w, b) = host_norm(&model.pp("norm"), h, ln1p)?;
            let head = RewardHead::load(vb, cfg, reward_row, attribute_weights).map_err(model_err)?;
            Some((upload_f32(&dev, &w)?, b.as_deref().map(|b| upload_f32(&dev, b)).transpose()?, head))
        } else {
            None
        };
        let gemm = Gemm::new(&dev)?;
        let ids = dev.alloc(max_tokens * 4)?;
        Ok(Self { range, dev, precision, gemm, ws, layers, embed, ids, tail, hidden: h, ln1p, eps: cfg.norm_eps as f32 })
    }

    fn load_layer(dev: &GpuDevice, vb: &Vb, cfg: &ArchConfig, lc: &LayerConfig, p: Precision) -> Result<LayerWeights> {
        let s = &lc.shape;
        let (h, kv) = (s.hidden, s.kv_heads * s.head_dim);
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        let qkv = host_linear(&attn, &["q_proj", "k_proj", "v_proj"], &[s.attn_width(), kv, kv], h, cfg.qkv_bias, p)?;
        let o = host_linear(&attn, &["o_proj"], &[h], s.attn_width(), cfg.o_bias, p)?;
        let up = if s.gated {
            host_linear(&mlp, &["gate_proj", "up_proj"], &[s.inter, s.inter], h, cfg.mlp_bias, p)?
        } else {
            host_linear(&mlp, &["up_proj"], &[s.inter], h, cfg.mlp_bias, p)?
        };
        let down = host_linear(&mlp, &["down_proj"], &[h], s.inter, cfg.mlp_bias, p)?;
        let norms = [host_norm(&vb.pp("input_layernorm"), h, lc.ln1p)?, host_norm(&vb.pp("post_attention_layernorm"), h, lc.ln1p)?];
        let mut w = LayerWeights::upload(dev, [qkv, o, up, down], norms)?;
        if lc.qk_norm {
            let head = |name: &str| host_norm(&attn.pp(name), s.head_dim, false).and_then(|(w, _)| upload_f32(dev, &w));
            w.qk_norm = Some((head("q_norm")?, head("k_norm")?));
        }
        Ok(w)
    }

    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    /// What the linear layers compute in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Run the packed batch through this stage.
    pub fn forward(&mut self, packed: &Packed, input: Activations) -> Result<StageOutput> {
        let (t, h) = (packed.num_tokens(), self.hidden);
        let cu: Vec<u32> = packed.cu_seqlens.iter().map(|&c| c as u32).collect();
        self.ws.set_batch(&self.dev, &cu)?;
        let x = self.ws.at(self.ws.plan.x);
        match (input, &self.embed) {
            (Activations::Tokens, Some((table, vocab))) => {
                if let Some(bad) = packed.ids.iter().find(|&&i| i as usize >= *vocab) {
                    return Err(CudaError::Shape(format!("token id {bad} is outside the vocabulary of {vocab}")));
                }
                self.dev.upload(self.ids.ptr, &packed.ids)?;
                self.dev.gather_rows(table.ptr, *vocab, h, self.ids.ptr, t, x)?;
            }
            (Activations::Hidden(hid), _) => self.dev.upload(x, &to_bf16_bits(&f32_vec(&hid)?))?,
            (Activations::Tokens, None) => {
                return Err(CudaError::Shape(format!("stage {:?} holds no embedding but got token ids", self.range)))
            }
        }
        if t == 0 {
            return Ok(StageOutput::Scores(Vec::new()));
        }
        for (i, (lc, w)) in self.layers.iter().enumerate() {
            forward(&self.dev, &mut self.gemm, lc, w, &self.ws, i > 0)?;
        }
        if !self.layers.is_empty() {
            self.dev.add(x, self.ws.at(self.ws.plan.h), t * h)?;
        }
        let Some((norm_w, norm_b, head)) = &self.tail else {
            let bits = self.dev.download::<u16>(x, t * h)?;
            let v: Vec<f32> = bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
            let hidden = Tensor::from_vec(v, (t, h), &Device::Cpu).and_then(|t| t.to_dtype(DType::BF16));
            return Ok(StageOutput::Hidden(hidden.map_err(|e| model_err(e.into()))?));
        };
        let rows: Vec<u32> = head.read_positions(packed).into_iter().map(|i| i as u32).collect();
        let (idx, last) = (self.ws.at(self.ws.plan.last_idx), self.ws.at(self.ws.plan.last_rows));
        self.dev.upload(idx, &rows)?;
        self.dev.gather_rows(x, t, h, idx, rows.len(), last)?;
        let bias = norm_b.as_ref().map_or(0, |b| b.ptr);
        self.dev.norm(self.ln1p, last, 0, norm_w.ptr, bias, self.eps, rows.len(), h, last, 0, 0)?;
        let bits = self.dev.download::<u16>(last, rows.len() * h)?;
        let v: Vec<f32> = bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let normed = Tensor::from_vec(v, (rows.len(), h), &Device::Cpu).map_err(|e| model_err(e.into()))?;
        Ok(StageOutput::Scores(head.forward(&normed).map_err(model_err)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> ArchConfig {
        ArchConfig::from_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).expect("fixture config")
    }

    #[test]
    fn qwen3_layers_run_with_their_head_norm_in_both_precisions() {
        let mut cfg = fixture("qwen3_seqcls");
        assert!(cfg.qk_norm);
        // The fixture's head_dim of 24 has no attention kernel; Qwen3's checkpoints use 128.
        let e = layer_config(&cfg, 0, Precision::Bf16).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("head_dim 24") && !e.contains("q/k"), "{e}");
        cfg.head_dim = 32;
        for p in [Precision::Fp8, Precision::Bf16] {
            let lc = layer_config(&cfg, 0, p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            assert!(lc.qk_norm, "{p:?}");
        }
        assert!(!layer_config(&fixture("arith"), 0, Precision::Bf16).expect("arith").qk_norm);
    }
}
