//! The CUDA decoder layer loop: pre-norm (RMSNorm or LayerNorm1P), GQA attention with full or
//! partial rotary and an optional sliding window, gated (SwiGLU/GeGLU) or relu² MLP, optional
//! biases; FP8 weights with per-channel scales and per-token FP8 activations, over the
//! persistent buffers of [`super::plan::BufferPlan`]. The benchmark runs it on random weights,
//! [`super::stage::CudaStage`] on a checkpoint's.
//!
//! The residual add of each block is fused into the next norm: after `forward` the block's
//! output is pending in `h`, and the next layer's first norm adds it into `x`.

use super::device::{DeviceBuf, GpuDevice};
use super::gemm::Fp8Gemm;
use super::plan::{attention_tiles, plan_buffers, BufferPlan, LayerShape};
use super::CudaError;

type Result<T> = std::result::Result<T, CudaError>;

/// What differs between the layers of the supported families.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerConfig {
    pub shape: LayerShape,
    /// LayerNorm1P (weights given as `weight + 1`, with bias) instead of RMSNorm.
    pub ln1p: bool,
    /// The activation kernel: `swiglu_quant_bf16`, `geglu_quant_bf16` or `relu2_quant_bf16`.
    pub act: &'static str,
    /// Rotated dims of each head (partial rotary when below `head_dim`).
    pub rot_dim: usize,
    pub eps: f32,
    /// Sliding window in tokens, 0 for none.
    pub window: usize,
}

impl LayerConfig {
    /// A Llama layer of `shape` (RMSNorm, SwiGLU, full rotary, eps 1e-5).
    pub fn llama(shape: LayerShape) -> Self {
        Self { shape, ln1p: false, act: "swiglu_quant_bf16", rot_dim: shape.head_dim, eps: 1e-5, window: 0 }
    }
}

/// One linear layer as the host prepares it: E4M3 codes `[out, in]`, f32 per-channel scales
/// `[out]`, optional f32 bias `[out]`.
pub struct HostLinear {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

/// One layer's weights on the device: qkv, o, gate|up, down (E4M3 `[out, in]`), their f32
/// per-channel scales and biases, and the two norms (f32 weight, LayerNorm1P bias).
pub struct LayerWeights {
    pub w: [DeviceBuf; 4],
    pub scale: [DeviceBuf; 4],
    pub bias: [Option<DeviceBuf>; 4],
    pub norm1: DeviceBuf,
    pub norm1_bias: Option<DeviceBuf>,
    pub norm2: DeviceBuf,
    pub norm2_bias: Option<DeviceBuf>,
}

fn upload_f32(dev: &GpuDevice, v: &[f32]) -> Result<DeviceBuf> {
    let b = dev.alloc(v.len() * 4)?;
    dev.upload(b.ptr, v)?;
    Ok(b)
}

fn ptr(b: &Option<DeviceBuf>) -> u64 {
    b.as_ref().map_or(0, |b| b.ptr)
}

impl LayerWeights {
    /// Random weights: E4M3 codes uniform in ±448 with scales `1 / (448 · √in)`, so each
    /// product keeps the activations' magnitude; norms of ones.
    pub fn random(dev: &GpuDevice, shape: &LayerShape, seed: u64) -> Result<Self> {
        let lin = shape.linears();
        let mut w = Vec::with_capacity(4);
        let mut scale = Vec::with_capacity(4);
        for (i, &(out, inp)) in lin.iter().enumerate() {
            let buf = dev.alloc(out * inp)?;
            dev.fill_uniform(true, buf.ptr, out * inp, seed.wrapping_mul(31).wrapping_add(i as u64), 448.0)?;
            let s = dev.alloc(out * 4)?;
            dev.upload(s.ptr, &vec![1.0f32 / (448.0 * (inp as f32).sqrt()); out])?;
            w.push(buf);
            scale.push(s);
        }
        let ones = vec![1.0f32; shape.hidden];
        let (norm1, norm2) = (dev.alloc(shape.hidden * 4)?, dev.alloc(shape.hidden * 4)?);
        dev.upload(norm1.ptr, &ones)?;
        dev.upload(norm2.ptr, &ones)?;
        let arr = |v: Vec<DeviceBuf>| -> [DeviceBuf; 4] { v.try_into().unwrap_or_else(|_| unreachable!("four linears")) };
        Ok(Self { w: arr(w), scale: arr(scale), bias: [None, None, None, None], norm1, norm1_bias: None, norm2, norm2_bias: None })
    }

    /// Upload prepared weights: `linears` in the order qkv, o, gate|up, down; norms as
    /// `(weight, bias)` in f32.
    pub fn upload(dev: &GpuDevice, linears: [HostLinear; 4], norms: [(Vec<f32>, Option<Vec<f32>>); 2]) -> Result<Self> {
        let mut w = Vec::with_capacity(4);
        let mut scale = Vec::with_capacity(4);
        let mut bias = Vec::with_capacity(4);
        for l in &linears {
            let b = dev.alloc(l.codes.len())?;
            dev.upload(b.ptr, &l.codes)?;
            w.push(b);
            scale.push(upload_f32(dev, &l.scales)?);
            bias.push(l.bias.as_deref().map(|v| upload_f32(dev, v)).transpose()?);
        }
        let [(n1, b1), (n2, b2)] = norms;
        let four = |v: Vec<DeviceBuf>| -> [DeviceBuf; 4] { v.try_into().unwrap_or_else(|_| unreachable!("four linears")) };
        let bias: [Option<DeviceBuf>; 4] = bias.try_into().unwrap_or_else(|_| unreachable!("four linears"));
        Ok(Self {
            w: four(w),
            scale: four(scale),
            bias,
            norm1: upload_f32(dev, &n1)?,
            norm1_bias: b1.as_deref().map(|v| upload_f32(dev, v)).transpose()?,
            norm2: upload_f32(dev, &n2)?,
            norm2_bias: b2.as_deref().map(|v| upload_f32(dev, v)).transpose()?,
        })
    }
}

/// The activation arena of one stage and the current batch's metadata.
pub struct Workspace {
    pub plan: BufferPlan,
    pub arena: DeviceBuf,
    pub inv_freq: DeviceBuf,
    pub tokens: usize,
    pub seqs: usize,
    pub tiles: usize,
}

impl Workspace {
    pub fn new(dev: &GpuDevice, shape: &LayerShape, max_tokens: usize, max_seqs: usize, inv_freq: &[f32]) -> Result<Self> {
        let plan = plan_buffers(shape, max_tokens, max_seqs);
        let arena = dev.alloc(plan.total)?;
        let inv = dev.alloc(inv_freq.len() * 4)?;
        dev.upload(inv.ptr, inv_freq)?;
        Ok(Self { plan, arena, inv_freq: inv, tokens: 0, seqs: 0, tiles: 0 })
    }

    pub fn at(&self, r: super::plan::Region) -> u64 {
        self.arena.at(r.offset)
    }

    /// Upload a batch's positions, boundaries and attention schedule (`cu_seqlens` from 0).
    pub fn set_batch(&mut self, dev: &GpuDevice, cu_seqlens: &[u32]) -> Result<()> {
        let tokens = cu_seqlens.last().copied().unwrap_or(0) as usize;
        let seqs = cu_seqlens.len().saturating_sub(1);
        if tokens > self.plan.max_tokens || seqs > self.plan.max_seqs {
            return Err(CudaError::Shape(format!(
                "batch of {tokens} tokens in {seqs} sequences exceeds the plan ({} / {})",
                self.plan.max_tokens, self.plan.max_seqs
            )));
        }
        let positions: Vec<u32> = cu_seqlens.windows(2).flat_map(|w| 0..w[1] - w[0]).collect();
        let tiles: Vec<i32> = attention_tiles(cu_seqlens).into_iter().flatten().collect();
        let cu: Vec<i32> = cu_seqlens.iter().map(|&c| c as i32).collect();
        dev.upload(self.at(self.plan.positions), &positions)?;
        dev.upload(self.at(self.plan.cu_seqlens), &cu)?;
        dev.upload(self.at(self.plan.tiles), &tiles)?;
        (self.tokens, self.seqs, self.tiles) = (tokens, seqs, tiles.len() / 2);
        Ok(())
    }
}

/// Run one layer on `ws.x`. `pending`: the previous block's output waits in `h` and is added
/// into `x` by this layer's first norm. Leaves this layer's MLP output pending in `h`.
pub fn forward(dev: &GpuDevice, gemm: &mut Fp8Gemm, cfg: &LayerConfig, w: &LayerWeights, ws: &Workspace, pending: bool) -> Result<()> {
    let (t, p, shape) = (ws.tokens, &ws.plan, &cfg.shape);
    let (x, h, qkv, attn, up) = (ws.at(p.x), ws.at(p.h), ws.at(p.qkv), ws.at(p.attn), ws.at(p.up));
    let (q8, qs) = (ws.at(p.q8), ws.at(p.q_scale));
    let [qkv_w, o_w, up_w, down_w] = shape.linears();
    let res = if pending { h } else { 0 };
    dev.norm(cfg.ln1p, x, res, w.norm1.ptr, ptr(&w.norm1_bias), cfg.eps, t, shape.hidden, 0, q8, qs)?;
    gemm.matmul(dev, q8, qs, w.w[0].ptr, w.scale[0].ptr, qkv, ptr(&w.bias[0]), t, qkv_w.0, qkv_w.1)?;
    let rot_heads = shape.heads + shape.kv_heads;
    dev.rotary(qkv, t, rot_heads, shape.head_dim, shape.qkv_width(), cfg.rot_dim, ws.at(p.positions), ws.inv_freq.ptr)?;
    let (tiles, cu) = (ws.at(p.tiles), ws.at(p.cu_seqlens));
    dev.attention(qkv, attn, tiles, ws.tiles, cu, shape.qkv_width(), shape.heads, shape.kv_heads, shape.head_dim, cfg.window)?;
    dev.quant_rows(attn, t, shape.attn_width(), q8, qs)?;
    gemm.matmul(dev, q8, qs, w.w[1].ptr, w.scale[1].ptr, h, ptr(&w.bias[1]), t, o_w.0, o_w.1)?;
    dev.norm(cfg.ln1p, x, h, w.norm2.ptr, ptr(&w.norm2_bias), cfg.eps, t, shape.hidden, 0, q8, qs)?;
    gemm.matmul(dev, q8, qs, w.w[2].ptr, w.scale[2].ptr, up, ptr(&w.bias[2]), t, up_w.0, up_w.1)?;
    dev.act_quant(cfg.act, up, t, shape.inter, 0, q8, qs)?;
    gemm.matmul(dev, q8, qs, w.w[3].ptr, w.scale[3].ptr, h, ptr(&w.bias[3]), t, down_w.0, down_w.1)?;
    Ok(())
}
