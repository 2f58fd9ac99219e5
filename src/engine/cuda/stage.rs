//! A model stage on one GPU: the CUDA counterpart of [`crate::model::stage::Stage`], with the
//! same inputs and outputs (packed batch + token ids or hidden states → hidden states or
//! scores). On the host path, weights are read with the CPU loader (so FP8 checkpoints are
//! dequantized exactly as on the CPU), then, in FP8 ([`Precision::Fp8`]), quantized per output channel to E4M3
//! with the shared quantizer ([`crate::engine::reference::fp8`]), or in bf16 kept as the
//! checkpoint's bf16 values, and uploaded layer by layer. The embedding lives on
//! the GPU in bf16; the final norm runs on the GPU over the last tokens only; the reward head
//! (a few rows) runs on the CPU with the CPU engine's own [`RewardHead`].
//!
//! Weights are loaded on the device where the checkpoint allows ([`super::upload`]: read,
//! uploaded and quantized overlapped), else by the host path above. Hidden states between two
//! CUDA stages stay on the GPU ([`super::hop`]); next to a CPU stage they travel through the
//! host.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::compile::default_cache_dir;
use super::device::{DeviceBuf, GpuDevice};
use super::gemm::Gemm;
use super::launch::{attention_kernel, AttentionKernel};
use super::layer::{forward, HostLinear, HostWeight, LayerConfig, LayerWeights, Workspace};
use super::plan::LayerShape;
use super::precision::Precision;
use super::hop::{Arrived, HopKind, Inbox, Outbox};
use super::upload;
use super::upload_plan::LoadStats;
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
    /// What the on-device load moved, when the stage was loaded that way.
    pub load_stats: Option<LoadStats>,
    /// This stage's input slots, when the stage before it is a CUDA stage.
    inbox: Option<Arc<Inbox>>,
    /// The next stage's input slots, when it is a CUDA stage.
    outbox: Option<Outbox>,
}

/// What a CUDA stage takes: token ids or hidden states from the host, or hidden states waiting
/// in its input slot ([`super::hop`]).
pub(crate) enum StageInput {
    Host(Activations),
    Device(Arrived),
}

/// What a CUDA stage passes on: scores or hidden states on the host, or hidden states copied
/// into the next stage's input slot.
pub(crate) enum Sent {
    Host(StageOutput),
    Device(Arrived),
}

impl Drop for CudaStage {
    fn drop(&mut self) {
        // A sender waiting for one of this stage's slots stops waiting.
        if let Some(inbox) = &self.inbox {
            inbox.gate.close();
        }
    }
}

/// How a stage's weights reach the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPath {
    /// Read, uploaded and (FP8) quantized on the device, overlapped ([`super::upload`]); a
    /// stage with tensors that path does not take falls back to the host path.
    Device,
    /// Converted and quantized on the CPU, then uploaded layer by layer.
    Host,
}

fn model_err(e: ModelError) -> CudaError {
    CudaError::Model(e)
}

fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).map_err(|e| model_err(e.into()))
}

/// The layer's shape and switches from the model config, checked for GEMMs in `precision`
/// and for an `attention` kernel of its head size.
pub(crate) fn layer_config(cfg: &ArchConfig, index: usize, precision: Precision, attention: AttentionKernel) -> Result<LayerConfig> {
    attention_kernel(attention, cfg.head_dim).map_err(CudaError::Unsupported)?;
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
    for (name, &out) in names.iter().zip(outs) {
        let lin = Linear::load(&vb.pp(name), inp, out, false).map_err(model_err)?;
        w.extend(f32_vec(&lin.weight(DType::F32).map_err(model_err)?)?);
    }
    let b = host_bias(vb, names, outs, bias)?;
    let weight = match precision {
        Precision::Fp8 => {
            let (codes, scales) = fp8::quantize_rows(&w, inp);
            HostWeight::Fp8 { codes, scales }
        }
        Precision::Bf16 => HostWeight::Bf16(to_bf16_bits(&w)),
    };
    Ok(HostLinear { weight, bias: b })
}

/// The f32 biases of the linears `names` (`[out_i]` each), concatenated, when `bias`.
fn host_bias(vb: &Vb, names: &[&str], outs: &[usize], bias: bool) -> Result<Option<Vec<f32>>> {
    if !bias {
        return Ok(None);
    }
    let mut b = Vec::new();
    for (name, &out) in names.iter().zip(outs) {
        b.extend(f32_vec(&vb.pp(name).get_as(out, "bias", DType::F32).map_err(model_err)?)?);
    }
    Ok(Some(b))
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
    /// Load layers `range` onto GPU `ordinal` by `path` (the engine's is [`LoadPath::Device`];
    /// the GPU check loads both and compares); `vb` is the checkpoint root read as f32 on the
    /// CPU (`Vb::new(weights, DType::F32, Device::Cpu)`). Activation buffers are sized once for
    /// `max_tokens` tokens in up to `max_seqs` sequences. The linear layers run in `precision`
    /// (chosen by [`super::precision::choose`]; a GPU that cannot run it is refused here too);
    /// attention with the `attention` kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        path: LoadPath,
        ordinal: usize,
        vb: &Vb,
        cfg: &ArchConfig,
        range: Range<usize>,
        reward_row: usize,
        attribute_weights: Option<&[f32]>,
        precision: Precision,
        max_tokens: usize,
        max_seqs: usize,
        attention: AttentionKernel,
    ) -> Result<Self> {
        let dev = GpuDevice::open(ordinal, &default_cache_dir(), precision)?;
        let first = layer_config(cfg, range.start.min(cfg.num_layers.saturating_sub(1)), precision, attention)?;
        let inv = crate::model::rope::inv_freq(cfg.rope_theta, cfg.rotary_dim, &cfg.rope_scaling);
        let mut ws = Workspace::new(&dev, &first.shape, max_tokens, max_seqs, &inv, precision)?;
        ws.attention = attention;
        let model = vb.pp("model");
        let lcs = range.clone().map(|i| Ok((i, layer_config(cfg, i, precision, attention)?))).collect::<Result<Vec<_>>>()?;
        let (h, ln1p) = (cfg.hidden_size, cfg.norm == NormKind::LayerNorm1P);
        let on_device = match path {
            LoadPath::Device => {
                let finish = |vb: &Vb, lc: &LayerConfig, bufs| Self::finish_layer(&dev, vb, cfg, lc, precision, bufs);
                upload::load_on_device(&dev, &model, cfg, &lcs, range.start == 0, precision, finish)?
            }
            LoadPath::Host => None,
        };
        let (layers, embed, load_stats) = match on_device {
            Some(d) => {
                let s = &d.stats;
                tracing::info!(
                    gpu = ordinal, layers = ?range, read_gb = s.read_bytes as f64 / 1e9, device_gb = s.device_bytes as f64 / 1e9,
                    seconds = s.seconds, gb_per_s = s.read_gb_per_s(), read_seconds = s.read_seconds, upload_wait_seconds = s.wait_seconds,
                    "loaded layers {range:?} on cuda:{ordinal} on the device: {:.2} GB read in {:.1} s ({:.2} GB/s)",
                    s.read_bytes as f64 / 1e9, s.seconds, s.read_gb_per_s()
                );
                let layers: Vec<(LayerConfig, LayerWeights)> = lcs.iter().map(|(_, lc)| *lc).zip(d.layers).collect();
                (layers, d.embed.map(|t| (t, cfg.vocab_size)), Some(d.stats))
            }
            None => {
                let mut layers = Vec::with_capacity(range.len());
                for (i, lc) in &lcs {
                    layers.push((*lc, Self::load_layer(&dev, &model.pp("layers").pp(i), cfg, lc, precision)?));
                }
                let embed = if range.start == 0 {
                    let t = model.pp("embed_tokens").get_as((cfg.vocab_size, h), "weight", DType::F32).map_err(model_err)?;
                    let table = dev.alloc(cfg.vocab_size * h * 2)?;
                    dev.upload(table.ptr, &to_bf16_bits(&f32_vec(&t)?))?;
                    Some((table, cfg.vocab_size))
                } else {
                    None
                };
                (layers, embed, None)
            }
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
        Ok(Self { range, dev, precision, gemm, ws, layers, embed, ids, tail, hidden: h, ln1p, eps: cfg.norm_eps as f32, load_stats, inbox: None, outbox: None })
    }

    /// A layer whose linears the device load filled: its biases and norms (small) from the host.
    fn finish_layer(dev: &GpuDevice, vb: &Vb, cfg: &ArchConfig, lc: &LayerConfig, precision: Precision,
                    bufs: [(DeviceBuf, Option<DeviceBuf>); 4]) -> Result<LayerWeights> {
        let s = &lc.shape;
        let (h, kv) = (s.hidden, s.kv_heads * s.head_dim);
        let (attn, mlp) = (vb.pp("self_attn"), vb.pp("mlp"));
        let up: (Vec<&str>, Vec<usize>) = if s.gated { (vec!["gate_proj", "up_proj"], vec![s.inter, s.inter]) } else { (vec!["up_proj"], vec![s.inter]) };
        let biases = [
            host_bias(&attn, &["q_proj", "k_proj", "v_proj"], &[s.attn_width(), kv, kv], cfg.qkv_bias)?,
            host_bias(&attn, &["o_proj"], &[h], cfg.o_bias)?,
            host_bias(&mlp, &up.0, &up.1, cfg.mlp_bias)?,
            host_bias(&mlp, &["down_proj"], &[h], cfg.mlp_bias)?,
        ];
        let bias = biases.map(|b| b.map(|b| upload_f32(dev, &b)));
        let [b0, b1, b2, b3] = bias;
        let bias = [b0.transpose()?, b1.transpose()?, b2.transpose()?, b3.transpose()?];
        let (n1, n1b) = host_norm(&vb.pp("input_layernorm"), h, lc.ln1p)?;
        let (n2, n2b) = host_norm(&vb.pp("post_attention_layernorm"), h, lc.ln1p)?;
        let [(w0, s0), (w1, s1), (w2, s2), (w3, s3)] = bufs;
        let scale: Vec<DeviceBuf> = [s0, s1, s2, s3].into_iter().flatten().collect();
        if precision == Precision::Fp8 && scale.len() != 4 {
            return Err(CudaError::Shape("an FP8 layer without its four scale buffers".into()));
        }
        let mut w = LayerWeights {
            precision,
            w: [w0, w1, w2, w3],
            scale,
            bias,
            norm1: upload_f32(dev, &n1)?,
            norm1_bias: n1b.as_deref().map(|v| upload_f32(dev, v)).transpose()?,
            norm2: upload_f32(dev, &n2)?,
            norm2_bias: n2b.as_deref().map(|v| upload_f32(dev, v)).transpose()?,
            qk_norm: None,
        };
        if lc.qk_norm {
            let head = |name: &str| host_norm(&attn.pp(name), s.head_dim, false).and_then(|(w, _)| upload_f32(dev, &w));
            w.qk_norm = Some((head("q_norm")?, head("k_norm")?));
        }
        Ok(w)
    }

    /// The layers' configs and device weights (the GPU check compares the two load paths).
    pub fn layer_weights(&self) -> &[(LayerConfig, LayerWeights)] {
        &self.layers
    }

    /// The bf16 embedding table, on the first stage.
    pub fn embedding(&self) -> Option<&DeviceBuf> {
        self.embed.as_ref().map(|(t, _)| t)
    }

    /// The GPU this stage runs on.
    pub fn device(&self) -> &GpuDevice {
        &self.dev
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

    /// What the linear layers compute in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Input slots for hidden states from a CUDA stage before this one (`kind`: on this GPU or
    /// from another), sized for the largest batch.
    pub(crate) fn make_inbox(&mut self, kind: HopKind) -> Result<Arc<Inbox>> {
        let inbox = Inbox::new(&self.dev, self.ws.plan.max_tokens * self.hidden * 2, kind)?;
        self.inbox = Some(inbox.clone());
        Ok(inbox)
    }

    /// Send hidden states to the next stage's `inbox` on the device from now on.
    pub(crate) fn attach_outbox(&mut self, inbox: Arc<Inbox>) -> Result<()> {
        self.outbox = Some(Outbox::attach(&self.dev, inbox)?);
        Ok(())
    }

    /// Run the packed batch through this stage.
    pub fn forward(&mut self, packed: &Packed, input: Activations) -> Result<StageOutput> {
        match self.forward_hop(packed, StageInput::Host(input))? {
            Sent::Host(out) => Ok(out),
            Sent::Device(_) => Err(CudaError::Shape("the stage sent its hidden states to the next GPU stage".into())),
        }
    }

    /// Run the packed batch through this stage, taking and passing hidden states on the device
    /// where the stages around it are CUDA stages.
    pub(crate) fn forward_hop(&mut self, packed: &Packed, input: StageInput) -> Result<Sent> {
        let (t, h) = (packed.num_tokens(), self.hidden);
        let x = self.ws.at(self.ws.plan.x);
        // First of all, so the slot is released whatever happens to the batch afterwards.
        let input = match input {
            StageInput::Device(a) => {
                let inbox = self.inbox.as_ref().ok_or_else(|| CudaError::Shape("hidden states arrived on the device without an inbox".into()))?;
                inbox.take(&self.dev, &a, x)?;
                if a.tokens != t || a.bytes != t * h * 2 {
                    return Err(CudaError::Shape(format!("{} hidden rows arrived for a batch of {t} tokens", a.tokens)));
                }
                None
            }
            StageInput::Host(a) => Some(a),
        };
        let cu: Vec<u32> = packed.cu_seqlens.iter().map(|&c| c as u32).collect();
        self.ws.set_batch(&self.dev, &cu)?;
        if let Some(input) = input {
            self.take_host(packed, input, self.embed.as_ref().map(|(table, vocab)| (table.ptr, *vocab)), x)?;
        }
        if t == 0 {
            return Ok(Sent::Host(StageOutput::Scores(Vec::new())));
        }
        for (i, (lc, w)) in self.layers.iter().enumerate() {
            forward(&self.dev, &mut self.gemm, lc, w, &self.ws, i > 0)?;
        }
        if !self.layers.is_empty() {
            self.dev.add(x, self.ws.at(self.ws.plan.h), t * h)?;
        }
        if self.tail.is_none() {
            if let Some(out) = self.outbox.as_mut() {
                return Ok(Sent::Device(out.send(&self.dev, x, t, t * h * 2)?));
            }
        }
        self.finish_host(packed, x).map(Sent::Host)
    }

    /// Token ids gathered from the embedding, or hidden states from the host, into `x`.
    fn take_host(&self, packed: &Packed, input: Activations, embed: Option<(u64, usize)>, x: u64) -> Result<()> {
        let (t, h) = (packed.num_tokens(), self.hidden);
        match (input, embed) {
            (Activations::Tokens, Some((table, vocab))) => {
                if let Some(bad) = packed.ids.iter().find(|&&i| i as usize >= vocab) {
                    return Err(CudaError::Shape(format!("token id {bad} is outside the vocabulary of {vocab}")));
                }
                self.dev.upload(self.ids.ptr, &packed.ids)?;
                self.dev.gather_rows(table, vocab, h, self.ids.ptr, t, x)
            }
            (Activations::Hidden(hid), _) => self.dev.upload(x, &to_bf16_bits(&f32_vec(&hid)?)),
            (Activations::Tokens, None) => Err(CudaError::Shape(format!("stage {:?} holds no embedding but got token ids", self.range))),
        }
    }

    /// Hidden states to the host (a CPU stage next), or the scores on the last stage.
    fn finish_host(&mut self, packed: &Packed, x: u64) -> Result<StageOutput> {
        let (t, h) = (packed.num_tokens(), self.hidden);
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
        // The fixture's head_dim of 24 has a v2 attention kernel only; Qwen3's checkpoints use 128.
        let e = layer_config(&cfg, 0, Precision::Bf16, AttentionKernel::V1).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("not 24") && e.contains("attention v1") && !e.contains("q/k"), "{e}");
        let lc = layer_config(&cfg, 0, Precision::Bf16, AttentionKernel::V2).unwrap_or_else(|e| panic!("v2: {e}"));
        assert!(lc.qk_norm && lc.shape.head_dim == 24);
        cfg.head_dim = 32;
        for p in [Precision::Fp8, Precision::Bf16] {
            for a in [AttentionKernel::V1, AttentionKernel::V2] {
                let lc = layer_config(&cfg, 0, p, a).unwrap_or_else(|e| panic!("{p:?} {a:?}: {e}"));
                assert!(lc.qk_norm, "{p:?}");
            }
        }
        assert!(!layer_config(&fixture("arith"), 0, Precision::Bf16, AttentionKernel::V1).expect("arith").qk_norm);
    }
}
