//! The blocks of the one decoder: linear layers, norms, attention over packed sequences, MLPs.
//! Families differ only through [`ArchConfig`] switches (bias, norm kind, activation, q/k norm,
//! rotary fraction, sliding window), never through copied code.

use candle_core::{DType, Device, Module, Tensor, D};

use super::config::{Activation, ArchConfig, NormKind};
use super::fp8;
use super::packed::Packed;
use super::rope::{Rotary, RotaryTables};
use super::weights::Vb;
use super::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

/// Queries attended at once; bounds the `[heads, chunk, keys]` score matrix.
const QUERY_CHUNK: usize = 512;

/// How a linear layer treats its input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum InputQuant {
    /// Full precision.
    None,
    /// FP8 E4M3 per token, scale from each token's amax (dynamic).
    PerToken,
    /// FP8 E4M3 with one static scale from the checkpoint (`input_scale`).
    Static(f32),
}

/// `y = x Wᵀ + b` over `[tokens, in]`. In FP8 mode the weight holds its dequantized E4M3
/// values (per-channel scales already applied) and the input is quantized before the product.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    /// `[out, in]`: the weight itself, or its E4M3 codes when `weight_scale` is set.
    weight: Tensor,
    /// `[out, 1]` per-channel scales of an FP8 weight (kept as codes to hold 1 byte per weight).
    weight_scale: Option<Tensor>,
    /// `[out]`
    bias: Option<Tensor>,
    input_quant: InputQuant,
}

impl Linear {
    /// Load `weight` (and `bias`): a plain tensor, or an FP8 `weight` with `weight_scale`
    /// (compressed-tensors) which is dequantized. With `vb.fp8` a plain weight is quantized
    /// per output channel here, and inputs are quantized per token.
    pub fn load(vb: &Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        let stored_fp8 = vb.contains("weight_scale");
        let (weight, weight_scale) = if stored_fp8 {
            let q = vb.get_as((out_dim, in_dim), "weight", DType::F8E4M3)?;
            let scale = vb.get_raw("weight_scale")?.to_dtype(DType::F32)?;
            let scale = if scale.elem_count() == out_dim {
                scale.reshape((out_dim, 1))?
            } else {
                scale.flatten_all()?.max_keepdim(0)?.broadcast_as((out_dim, 1))?.contiguous()?
            };
            (q, Some(scale))
        } else if vb.fp8 {
            let (q, scale) = fp8::quantize_tensor_rows(&vb.get_as((out_dim, in_dim), "weight", DType::F32)?)?;
            (q, Some(scale))
        } else {
            (vb.get((out_dim, in_dim), "weight")?, None)
        };
        let input_quant = match (vb.fp8 || stored_fp8, vb.contains("input_scale")) {
            (false, _) => InputQuant::None,
            (true, false) => InputQuant::PerToken,
            (true, true) => InputQuant::Static(vb.get_raw("input_scale")?.to_dtype(DType::F32)?.flatten_all()?.max(0)?.to_scalar()?),
        };
        Ok(Self { weight, weight_scale, bias, input_quant })
    }

    /// The weight in `dtype` (dequantized when held as FP8 codes).
    pub fn weight(&self, dtype: DType) -> Result<Tensor> {
        Ok(match &self.weight_scale {
            Some(scale) => fp8::dequantize_tensor(&self.weight, scale)?.to_dtype(dtype)?,
            None => self.weight.to_dtype(dtype)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.input_quant {
            InputQuant::None => x.clone(),
            InputQuant::PerToken => fp8::fake_quant_rows(x)?.to_dtype(x.dtype())?,
            InputQuant::Static(s) => {
                let s = Tensor::new(&[s], x.device())?;
                fp8::dequantize_tensor(&fp8::quantize_tensor(x, &s)?, &s)?.to_dtype(x.dtype())?
            }
        };
        let y = match &self.weight_scale {
            None => x.matmul(&self.weight.t()?)?,
            Some(_) => x.matmul(&self.weight(x.dtype())?.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// RMSNorm or Nemotron's LayerNorm1P, computed in f32 whatever the activations' dtype.
#[derive(Debug, Clone)]
pub struct Norm {
    kind: NormKind,
    /// `[dim]`, f32; for LayerNorm1P already `weight + 1`.
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    pub fn load(vb: &Vb, dim: usize, kind: NormKind, eps: f64) -> Result<Self> {
        let weight = vb.get_as(dim, "weight", DType::F32)?;
        let (weight, bias) = match kind {
            NormKind::Rms => (weight, None),
            NormKind::LayerNorm1P => ((weight + 1.0)?, Some(vb.get_as(dim, "bias", DType::F32)?)),
        };
        Ok(Self { kind, weight, bias, eps })
    }

    /// Normalize over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let y = match self.kind {
            NormKind::Rms => {
                let var = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(var + self.eps)?.sqrt()?)?
            }
            NormKind::LayerNorm1P => {
                let mean = x.mean_keepdim(D::Minus1)?;
                let centered = x.broadcast_sub(&mean)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                centered.broadcast_div(&(var + self.eps)?.sqrt()?)?
            }
        };
        // transformers' RMSNorm casts back to the input dtype before the weight multiply.
        let y = match self.kind {
            NormKind::Rms => y.to_dtype(dtype)?.broadcast_mul(&self.weight.to_dtype(dtype)?)?,
            NormKind::LayerNorm1P => y.broadcast_mul(&self.weight)?.to_dtype(dtype)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(dtype)?)?,
            None => y,
        })
    }
}

/// Multi-head attention with grouped K/V heads, causal within each packed sequence.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    core: PackedAttention,
}

/// The attention proper, after the projections and rotary: each packed segment attends
/// causally to its own keys, a suffix segment (tree layout) to its shared prefix's keys first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackedAttention {
    pub(crate) num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub(crate) sliding_window: Option<usize>,
}

impl Attention {
    pub fn load(vb: &Vb, cfg: &ArchConfig, sliding_window: Option<usize>) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let qk_norm = |name: &str| -> Result<Option<Norm>> {
            cfg.qk_norm.then(|| Norm::load(&vb.pp(name), d, NormKind::Rms, cfg.norm_eps)).transpose()
        };
        Ok(Self {
            q_proj: Linear::load(&vb.pp("q_proj"), h, q_dim, cfg.qkv_bias)?,
            k_proj: Linear::load(&vb.pp("k_proj"), h, kv_dim, cfg.qkv_bias)?,
            v_proj: Linear::load(&vb.pp("v_proj"), h, kv_dim, cfg.qkv_bias)?,
            o_proj: Linear::load(&vb.pp("o_proj"), q_dim, h, cfg.o_bias)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            core: PackedAttention { num_heads: cfg.num_heads, num_kv_heads: cfg.num_kv_heads, head_dim: d, sliding_window },
        })
    }

    /// `x: [tokens, hidden]` → `[tokens, hidden]`.
    pub fn forward(&self, x: &Tensor, rotary: &Rotary, tables: &RotaryTables, packed: &Packed) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (d, c) = (self.core.head_dim, &self.core);
        let mut q = self.q_proj.forward(x)?.reshape((t, c.num_heads, d))?;
        let mut k = self.k_proj.forward(x)?.reshape((t, c.num_kv_heads, d))?;
        let v = self.v_proj.forward(x)?.reshape((t, c.num_kv_heads, d))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = rotary.apply(&q, tables)?;
        let k = rotary.apply(&k, tables)?;
        let y = self.core.forward(&q, &k, &v, packed)?;
        self.o_proj.forward(&y)
    }
}

impl PackedAttention {
    /// `q: [tokens, heads, D]`, `k, v: [tokens, kv_heads, D]` (rotary applied) →
    /// `[tokens, heads · D]`; rows of empty segments do not exist, and every other token's row
    /// is its segment's attention output.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, packed: &Packed) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(packed.prefix_of.len());
        for (seg, r) in packed.ranges().enumerate().filter(|(_, r)| !r.is_empty()) {
            let qs = q.narrow(0, r.start, r.len())?;
            let (ks, vs) = (k.narrow(0, r.start, r.len())?, v.narrow(0, r.start, r.len())?);
            outs.push(match packed.prefix_of[seg].map(|p| packed.range(p)) {
                // A suffix: its keys are the shared prefix's, then its own.
                Some(p) => {
                    let kp = Tensor::cat(&[&k.narrow(0, p.start, p.len())?, &ks], 0)?;
                    let vp = Tensor::cat(&[&v.narrow(0, p.start, p.len())?, &vs], 0)?;
                    self.attend(&qs, &kp, &vp, p.len())?
                }
                None => self.attend(&qs, &ks, &vs, 0)?,
            });
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Causal attention of queries at positions `offset..offset + L` over keys at `0..offset + L`:
    /// `q: [L, H, D]`, `k, v: [offset + L, KV, D]` → `[L, H·D]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, offset: usize) -> Result<Tensor> {
        let (len, _, d) = q.dims3()?;
        let kv = self.num_kv_heads;
        let group = self.num_heads / kv;
        let scale = 1.0 / (d as f64).sqrt();
        // Heads h = kv_head * group + g share K/V: view q as [KV, group, L, D].
        let q = q.transpose(0, 1)?.reshape((kv, group, len, d))?;
        let k = k.transpose(0, 1)?.contiguous()?; // [KV, offset + L, D]
        let v = v.transpose(0, 1)?.contiguous()?;
        let mut chunks = Vec::with_capacity(len.div_ceil(QUERY_CHUNK));
        for start in (0..len).step_by(QUERY_CHUNK) {
            let n = QUERY_CHUNK.min(len - start);
            let keys = offset + start + n; // causal: nothing past the chunk's last query
            let qc = q.narrow(2, start, n)?.reshape((kv, group * n, d))?.contiguous()?;
            let kc = k.narrow(1, 0, keys)?;
            let vc = v.narrow(1, 0, keys)?;
            let scores = (qc.matmul(&kc.t()?)? * scale)?.to_dtype(DType::F32)?;
            let mask = causal_mask(offset + start, n, keys, self.sliding_window, group, q.device())?;
            let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?.to_dtype(vc.dtype())?;
            chunks.push(probs.matmul(&vc)?.reshape((kv, group, n, d))?);
        }
        let out = Tensor::cat(&chunks, 2)?; // [KV, group, L, D]
        Ok(out.reshape((self.num_heads, len, d))?.transpose(0, 1)?.reshape((len, self.num_heads * d))?)
    }
}

/// Additive mask `[group·n, keys]` for queries `start..start+n`: 0 where visible, -inf where
/// the key is in the future or outside the sliding window.
fn causal_mask(start: usize, n: usize, keys: usize, window: Option<usize>, group: usize, dev: &Device) -> Result<Tensor> {
    let mut m = Vec::with_capacity(n * keys);
    for i in start..start + n {
        for j in 0..keys {
            let visible = j <= i && window.is_none_or(|w| i - j < w);
            m.push(if visible { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    let m = Tensor::from_vec(m, (1, n, keys), dev)?;
    Ok(m.repeat((group, 1, 1))?.reshape((group * n, keys))?)
}

/// The feed-forward block.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Option<Linear>,
    up_proj: Linear,
    down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    pub fn load(vb: &Vb, cfg: &ArchConfig) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let gated = !matches!(cfg.activation, Activation::Relu2);
        Ok(Self {
            gate_proj: gated.then(|| Linear::load(&vb.pp("gate_proj"), h, i, b)).transpose()?,
            up_proj: Linear::load(&vb.pp("up_proj"), h, i, b)?,
            down_proj: Linear::load(&vb.pp("down_proj"), i, h, b)?,
            activation: cfg.activation,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let up = self.up_proj.forward(x)?;
        let act = match (&self.gate_proj, self.activation) {
            (None, _) => up.relu()?.sqr()?,
            (Some(g), Activation::GeGluTanh) => (g.forward(x)?.gelu()? * up)?,
            (Some(g), _) => (candle_nn::ops::silu(&g.forward(x)?)? * up)?,
        };
        self.down_proj.forward(&act)
    }
}

/// One transformer layer: pre-norm attention and MLP with residual connections.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: Norm,
    pub self_attn: Attention,
    pub post_attention_layernorm: Norm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    pub fn load(vb: &Vb, cfg: &ArchConfig, index: usize) -> Result<Self> {
        let norm = |name: &str| Norm::load(&vb.pp(name), cfg.hidden_size, cfg.norm, cfg.norm_eps);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(&vb.pp("self_attn"), cfg, cfg.sliding_window.get(index).copied().flatten())?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::load(&vb.pp("mlp"), cfg)?,
        })
    }

    pub fn forward(&self, x: &Tensor, rotary: &Rotary, tables: &RotaryTables, packed: &Packed) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, rotary, tables, packed)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + h)?)
    }
}

/// Token embedding lookup.
#[derive(Debug, Clone)]
pub(crate) struct Embedding {
    /// `[vocab, hidden]`
    weight: Tensor,
}

impl Embedding {
    pub fn load(vb: &Vb, cfg: &ArchConfig) -> Result<Self> {
        Ok(Self { weight: vb.get((cfg.vocab_size, cfg.hidden_size), "weight")? })
    }

    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.weight.dim(0)?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(ModelError::weights(format!("token id {bad} is outside the vocabulary of {vocab}"), None));
        }
        let ids = Tensor::new(ids, self.weight.device())?;
        Ok(candle_nn::Embedding::new(self.weight.clone(), self.weight.dim(1)?).forward(&ids)?)
    }
}
