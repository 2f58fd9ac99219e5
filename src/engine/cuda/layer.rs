//! The CUDA decoder layer loop: pre-norm (RMSNorm or LayerNorm1P), GQA attention with full or
//! partial rotary and an optional sliding window, gated (SwiGLU/GeGLU) or relu² MLP, optional
//! biases; FP8 weights with per-channel scales and per-token FP8 activations, or bf16 weights
//! and activations ([`Precision`]), over the persistent buffers of
//! [`super::plan::BufferPlan`]. The benchmark runs it on random weights,
//! [`super::stage::CudaStage`] on a checkpoint's.
//!
//! The residual add of each block is fused into the next norm: after `forward` the block's
//! output is pending in `h`, and the next layer's first norm adds it into `x`.

use super::device::{DeviceBuf, GpuDevice};
use super::gemm::Gemm;
use super::launch::{AttentionKernel, AttnArgs, AttnQuant, Rotary};
use super::plan::{attention_tiles, attention_tiles_tree, max_segments, max_tiles, plan_buffers, BufferPlan, LayerShape};
use super::precision::Precision;
use super::CudaError;
use crate::model::packed::Packed;
use crate::model::config::Activation;

type Result<T> = std::result::Result<T, CudaError>;

/// What differs between the layers of the supported families.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerConfig {
    pub shape: LayerShape,
    /// LayerNorm1P (weights given as `weight + 1`, with bias) instead of RMSNorm.
    pub ln1p: bool,
    pub act: Activation,
    /// Rotated dims of each head (partial rotary when below `head_dim`).
    pub rot_dim: usize,
    pub eps: f32,
    /// Sliding window in tokens, 0 for none.
    pub window: usize,
    /// Qwen3's per-head RMSNorm of q and k before rotary.
    pub qk_norm: bool,
}

impl LayerConfig {
    /// A Llama layer of `shape` (RMSNorm, SwiGLU, full rotary, eps 1e-5).
    pub fn llama(shape: LayerShape) -> Self {
        Self { shape, ln1p: false, act: Activation::SwiGlu, rot_dim: shape.head_dim, eps: 1e-5, window: 0, qk_norm: false }
    }
}

/// The fused activation + per-token FP8 kernel of `act` (kernels/act.cu).
pub fn act_kernel(act: Activation) -> &'static str {
    match act {
        Activation::SwiGlu => "swiglu_quant_bf16",
        Activation::GeGluTanh => "geglu_quant_bf16",
        Activation::Relu2 => "relu2_quant_bf16",
    }
}

/// A linear layer's weight as the host prepares it: `[out, in]`.
pub enum HostWeight {
    /// E4M3 codes and f32 per-channel scales `[out]`.
    Fp8 { codes: Vec<u8>, scales: Vec<f32> },
    /// bf16 bits.
    Bf16(Vec<u16>),
}

/// One linear layer as the host prepares it: the weight and an optional f32 bias `[out]`.
pub struct HostLinear {
    pub weight: HostWeight,
    pub bias: Option<Vec<f32>>,
}

/// One layer's weights on the device: qkv, o, gate|up, down (`[out, in]`, E4M3 or bf16), their
/// f32 per-channel scales (FP8 only) and biases, and the two norms (f32 weight, LayerNorm1P
/// bias).
pub struct LayerWeights {
    pub precision: Precision,
    pub w: [DeviceBuf; 4],
    /// Empty for bf16.
    pub scale: Vec<DeviceBuf>,
    pub bias: [Option<DeviceBuf>; 4],
    pub norm1: DeviceBuf,
    pub norm1_bias: Option<DeviceBuf>,
    pub norm2: DeviceBuf,
    pub norm2_bias: Option<DeviceBuf>,
    /// Qwen3's q and k head norms (f32 `[head_dim]` each).
    pub qk_norm: Option<(DeviceBuf, DeviceBuf)>,
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
    /// Random weights, so each product keeps the activations' magnitude: FP8 codes uniform in
    /// ±448 with scales `1 / (448 · √in)`, or bf16 uniform in ±√(3 / in); norms of ones.
    pub fn random(dev: &GpuDevice, shape: &LayerShape, seed: u64, precision: Precision) -> Result<Self> {
        let lin = shape.linears();
        let mut w = Vec::with_capacity(4);
        let mut scale = Vec::with_capacity(4);
        for (i, &(out, inp)) in lin.iter().enumerate() {
            let buf = dev.alloc(out * inp * precision.weight_bytes())?;
            let seed = seed.wrapping_mul(31).wrapping_add(i as u64);
            if precision == Precision::Bf16 {
                dev.fill_uniform(false, buf.ptr, out * inp, seed, (3.0 / inp as f32).sqrt())?;
                w.push(buf);
                continue;
            }
            dev.fill_uniform(true, buf.ptr, out * inp, seed, 448.0)?;
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
        Ok(Self { precision, w: arr(w), scale, bias: [None, None, None, None], norm1, norm1_bias: None, norm2, norm2_bias: None, qk_norm: None })
    }

    /// Upload prepared weights: `linears` in the order qkv, o, gate|up, down, all FP8 or all
    /// bf16; norms as `(weight, bias)` in f32.
    pub fn upload(dev: &GpuDevice, linears: [HostLinear; 4], norms: [(Vec<f32>, Option<Vec<f32>>); 2]) -> Result<Self> {
        let precision = match linears[0].weight {
            HostWeight::Fp8 { .. } => Precision::Fp8,
            HostWeight::Bf16(_) => Precision::Bf16,
        };
        let mut w = Vec::with_capacity(4);
        let mut scale = Vec::with_capacity(4);
        let mut bias = Vec::with_capacity(4);
        for l in &linears {
            match (&l.weight, precision) {
                (HostWeight::Fp8 { codes, scales }, Precision::Fp8) => {
                    let b = dev.alloc(codes.len())?;
                    dev.upload(b.ptr, codes)?;
                    w.push(b);
                    scale.push(upload_f32(dev, scales)?);
                }
                (HostWeight::Bf16(bits), Precision::Bf16) => {
                    let b = dev.alloc(bits.len() * 2)?;
                    dev.upload(b.ptr, bits)?;
                    w.push(b);
                }
                _ => return Err(CudaError::Shape("a layer's linears mix FP8 and bf16 weights".into())),
            }
            bias.push(l.bias.as_deref().map(|v| upload_f32(dev, v)).transpose()?);
        }
        let [(n1, b1), (n2, b2)] = norms;
        let four = |v: Vec<DeviceBuf>| -> [DeviceBuf; 4] { v.try_into().unwrap_or_else(|_| unreachable!("four linears")) };
        let bias: [Option<DeviceBuf>; 4] = bias.try_into().unwrap_or_else(|_| unreachable!("four linears"));
        Ok(Self {
            precision,
            w: four(w),
            scale,
            bias,
            norm1: upload_f32(dev, &n1)?,
            norm1_bias: b1.as_deref().map(|v| upload_f32(dev, v)).transpose()?,
            norm2: upload_f32(dev, &n2)?,
            norm2_bias: b2.as_deref().map(|v| upload_f32(dev, v)).transpose()?,
            qk_norm: None,
        })
    }
}

/// The activation arena of one stage and the current batch's metadata.
pub struct Workspace {
    pub plan: BufferPlan,
    pub arena: DeviceBuf,
    pub inv_freq: DeviceBuf,
    pub tokens: usize,
    /// Segments of the current batch (sequences, and shared prefixes in the tree layout).
    pub seqs: usize,
    pub tiles: usize,
    /// Whether the current batch is in the tree layout (`plan.prefix_of` holds its prefixes).
    pub tree: bool,
    /// The attention kernel the layers launch.
    pub attention: AttentionKernel,
}

impl Workspace {
    pub fn new(dev: &GpuDevice, shape: &LayerShape, max_tokens: usize, max_seqs: usize, inv_freq: &[f32], precision: Precision) -> Result<Self> {
        let plan = plan_buffers(shape, max_tokens, max_seqs, precision);
        let arena = dev.alloc(plan.total)?;
        // Attention v2's fused quantization finds its bookkeeping zero and leaves it so.
        for r in [plan.attn_amax, plan.attn_arrived] {
            dev.fill_bytes(arena.at(r.offset), r.bytes, 0)?;
        }
        let inv = dev.alloc(inv_freq.len() * 4)?;
        dev.upload(inv.ptr, inv_freq)?;
        Ok(Self { plan, arena, inv_freq: inv, tokens: 0, seqs: 0, tiles: 0, tree: false, attention: AttentionKernel::default() })
    }

    pub fn at(&self, r: super::plan::Region) -> u64 {
        self.arena.at(r.offset)
    }

    /// Upload a plain batch's positions, boundaries and attention schedule (`cu_seqlens` from 0).
    pub fn set_batch(&mut self, dev: &GpuDevice, cu_seqlens: &[u32]) -> Result<()> {
        self.upload_batch(dev, &BatchArrays::plain(cu_seqlens))
    }

    /// Upload a packed batch, plain or tree (shared prefixes): positions, segment boundaries,
    /// each segment's prefix and the attention schedule.
    pub fn set_packed(&mut self, dev: &GpuDevice, packed: &Packed) -> Result<()> {
        self.upload_batch(dev, &BatchArrays::packed(packed))
    }

    fn upload_batch(&mut self, dev: &GpuDevice, b: &BatchArrays) -> Result<()> {
        b.fits(&self.plan).map_err(CudaError::Shape)?;
        dev.upload(self.at(self.plan.positions), &b.positions)?;
        dev.upload(self.at(self.plan.cu_seqlens), &b.cu_seqlens)?;
        if let Some(p) = &b.prefix_of {
            dev.upload(self.at(self.plan.prefix_of), p)?;
        }
        dev.upload(self.at(self.plan.tiles), &b.tiles)?;
        (self.tokens, self.seqs, self.tiles, self.tree) = (b.positions.len(), b.segments(), b.tiles.len() / 2, b.prefix_of.is_some());
        Ok(())
    }

    /// The attention call of a layer of `shape` over the current batch; with `fp8`, attention
    /// v2 also writes its output quantized per token into `q8` / `q_scale` (the o projection's
    /// input), where v1 leaves that to `quant_rows_bf16` ([`Self::fuses_attn_quant`]).
    pub fn attn_args(&self, shape: &LayerShape, window: usize, fp8: bool) -> AttnArgs {
        let p = &self.plan;
        let quant = (fp8 && self.fuses_attn_quant()).then(|| AttnQuant {
            q: self.at(p.q8),
            q_scale: self.at(p.q_scale),
            amax: self.at(p.attn_amax),
            arrived: self.at(p.attn_arrived),
        });
        AttnArgs {
            qkv: self.at(p.qkv),
            out: self.at(p.attn),
            tiles: self.at(p.tiles),
            num_tiles: self.tiles,
            cu_seqlens: self.at(p.cu_seqlens),
            prefix_of: if self.tree { self.at(p.prefix_of) } else { 0 },
            qkv_stride: shape.qkv_width(),
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
            window,
            quant,
        }
    }

    /// Whether the attention kernel quantizes its own output (v2) for an FP8 o projection.
    pub fn fuses_attn_quant(&self) -> bool {
        self.attention == AttentionKernel::V2
    }
}

/// What a batch uploads, computed on the host: each token's position, the segment boundaries,
/// each segment's shared-prefix segment (tree layout only; −1 for none) and the attention
/// schedule (`[tile] = (segment, first query)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchArrays {
    pub positions: Vec<u32>,
    pub cu_seqlens: Vec<i32>,
    pub prefix_of: Option<Vec<i32>>,
    pub tiles: Vec<i32>,
}

impl BatchArrays {
    /// Sequences laid end to end (`cu_seqlens` from 0), positions from 0 in each.
    pub fn plain(cu_seqlens: &[u32]) -> Self {
        Self {
            positions: cu_seqlens.windows(2).flat_map(|w| 0..w[1] - w[0]).collect(),
            cu_seqlens: cu_seqlens.iter().map(|&c| c as i32).collect(),
            prefix_of: None,
            tiles: attention_tiles(cu_seqlens).into_iter().flatten().collect(),
        }
    }

    /// A packed batch as it is: in the tree layout, suffix positions continue after their
    /// prefix and their tiles are ordered by the keys they see (prefix included).
    pub fn packed(p: &Packed) -> Self {
        let cu: Vec<u32> = p.cu_seqlens.iter().map(|&c| c as u32).collect();
        if !p.is_tree() {
            return Self { positions: p.positions.clone(), ..Self::plain(&cu) };
        }
        let prefix_of: Vec<i32> = p.prefix_of.iter().map(|s| s.map_or(-1, |s| s as i32)).collect();
        let prefix_len: Vec<u32> = p.prefix_of.iter().map(|s| s.map_or(0, |s| p.range(s).len() as u32)).collect();
        Self {
            positions: p.positions.clone(),
            cu_seqlens: cu.iter().map(|&c| c as i32).collect(),
            prefix_of: Some(prefix_of),
            tiles: attention_tiles_tree(&cu, &prefix_len).into_iter().flatten().collect(),
        }
    }

    pub fn segments(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }

    /// Whether the batch fits the buffers planned for it.
    pub fn fits(&self, plan: &BufferPlan) -> std::result::Result<(), String> {
        let (tokens, segments) = (self.positions.len(), self.segments());
        if tokens > plan.max_tokens || segments > max_segments(plan.max_seqs) || self.tiles.len() / 2 > max_tiles(plan.max_tokens, plan.max_seqs) {
            return Err(format!(
                "batch of {tokens} tokens in {segments} segments exceeds the plan ({} / {})",
                plan.max_tokens,
                max_segments(plan.max_seqs)
            ));
        }
        Ok(())
    }
}

/// `out = input · w.w[i]ᵀ (+ bias)` in the layer's precision; `input_scale` is the FP8 input's
/// per-token scales (unused for bf16).
#[allow(clippy::too_many_arguments)]
fn linear(dev: &GpuDevice, gemm: &mut Gemm, w: &LayerWeights, i: usize, input: u64, input_scale: u64, out: u64, tokens: usize,
          (n, k): (usize, usize)) -> Result<()> {
    match w.precision {
        Precision::Fp8 => gemm.matmul(dev, input, input_scale, w.w[i].ptr, w.scale[i].ptr, out, ptr(&w.bias[i]), tokens, n, k).map(|_| ()),
        Precision::Bf16 => gemm.matmul_bf16(dev, input, w.w[i].ptr, out, ptr(&w.bias[i]), tokens, n, k),
    }
}

/// Run one layer on `ws.x`. `pending`: the previous block's output waits in `h` and is added
/// into `x` by this layer's first norm. Leaves this layer's MLP output pending in `h`. The norms
/// and the activation write the next GEMM's input into `q8`: quantized per token (FP8), or as
/// bf16; the attention output feeds the o projection as it is (bf16) or quantized (FP8).
pub fn forward(dev: &GpuDevice, gemm: &mut Gemm, cfg: &LayerConfig, w: &LayerWeights, ws: &Workspace, pending: bool) -> Result<()> {
    let (t, p, shape) = (ws.tokens, &ws.plan, &cfg.shape);
    let (x, h, qkv, attn, up) = (ws.at(p.x), ws.at(p.h), ws.at(p.qkv), ws.at(p.attn), ws.at(p.up));
    let (xin, qs) = (ws.at(p.q8), ws.at(p.q_scale));
    // Where norms and the activation write: (bf16 y, E4M3 q, scales).
    let (y, q, s) = match w.precision {
        Precision::Fp8 => (0, xin, qs),
        Precision::Bf16 => (xin, 0, 0),
    };
    let [qkv_w, o_w, up_w, down_w] = shape.linears();
    let res = if pending { h } else { 0 };
    dev.norm(cfg.ln1p, x, res, w.norm1.ptr, ptr(&w.norm1_bias), cfg.eps, t, shape.hidden, y, q, s)?;
    let rot = Rotary { heads: shape.heads + shape.kv_heads, head_dim: shape.head_dim, rot_dim: cfg.rot_dim, positions: ws.at(p.positions), inv_freq: ws.inv_freq.ptr };
    match (&w.qk_norm, w.precision) {
        // Qwen3: rotary fused into the head norm (one pass over q and k).
        (Some((qn, kn)), _) => {
            linear(dev, gemm, w, 0, xin, qs, qkv, t, qkv_w)?;
            dev.head_norm_rotary(qkv, t, shape.heads, shape.kv_heads, shape.head_dim, shape.qkv_width(), qn.ptr, kn.ptr, cfg.eps,
                                 cfg.rot_dim, rot.positions, rot.inv_freq)?
        }
        // FP8: rotary fused into the GEMM's scale epilogue when that runs.
        (None, Precision::Fp8) => {
            gemm.matmul_rotary(dev, xin, qs, w.w[0].ptr, w.scale[0].ptr, qkv, ptr(&w.bias[0]), t, qkv_w.0, qkv_w.1, &rot)?;
        }
        (None, Precision::Bf16) => {
            linear(dev, gemm, w, 0, xin, qs, qkv, t, qkv_w)?;
            dev.rotary(qkv, t, rot.heads, shape.head_dim, shape.qkv_width(), cfg.rot_dim, rot.positions, rot.inv_freq)?
        }
    }
    let fp8 = w.precision == Precision::Fp8;
    dev.attention(ws.attention, &ws.attn_args(shape, cfg.window, fp8))?;
    let o_in = match w.precision {
        Precision::Fp8 => {
            if !ws.fuses_attn_quant() {
                dev.quant_rows(attn, t, shape.attn_width(), xin, qs)?;
            }
            xin
        }
        Precision::Bf16 => attn,
    };
    linear(dev, gemm, w, 1, o_in, qs, h, t, o_w)?;
    dev.norm(cfg.ln1p, x, h, w.norm2.ptr, ptr(&w.norm2_bias), cfg.eps, t, shape.hidden, y, q, s)?;
    linear(dev, gemm, w, 2, xin, qs, up, t, up_w)?;
    dev.act_quant(act_kernel(cfg.act), up, t, shape.inter, y, q, s)?;
    linear(dev, gemm, w, 3, xin, qs, h, t, down_w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_batch_uploads_its_positions_prefixes_and_a_schedule_covering_every_query() {
        let prompt: Vec<u32> = (0..100).collect();
        let mut seqs: Vec<Vec<u32>> = [70u32, 0, 130].iter().map(|&n| prompt.iter().copied().chain((0..n).map(|i| 1000 * n + i)).collect()).collect();
        seqs.push((0..50).map(|i| 9000 + i).collect());
        let packed = Packed::shared(&seqs, 16);
        let b = BatchArrays::packed(&packed);
        let prefix_of = b.prefix_of.as_ref().expect("tree layout");
        assert_eq!(prefix_of.iter().filter(|&&p| p >= 0).count(), 3);
        assert_eq!(b.positions, packed.positions);
        // A suffix's positions continue after its prefix: the first own token sits at 100.
        for (seg, &p) in prefix_of.iter().enumerate() {
            let (s0, s1) = (b.cu_seqlens[seg] as usize, b.cu_seqlens[seg + 1] as usize);
            if p >= 0 && s1 > s0 {
                assert_eq!(b.positions[s0], 100, "segment {seg}");
            }
        }
        // Every query of every segment in exactly one tile; heaviest (most keys seen) first.
        let mut covered = vec![0; b.positions.len()];
        let keys_seen = |t: &[i32]| {
            let p = prefix_of[t[0] as usize];
            let plen = if p >= 0 { b.cu_seqlens[p as usize + 1] - b.cu_seqlens[p as usize] } else { 0 };
            plen + t[1]
        };
        for t in b.tiles.chunks(2) {
            let (s0, s1) = (b.cu_seqlens[t[0] as usize] as usize, b.cu_seqlens[t[0] as usize + 1] as usize);
            let first = s0 + t[1] as usize;
            assert!(first < s1, "{t:?} starts past its segment");
            covered[first..(first + 64).min(s1)].iter_mut().for_each(|c| *c += 1);
        }
        assert!(covered.iter().all(|&c| c == 1), "{covered:?}");
        let order: Vec<i32> = b.tiles.chunks(2).map(keys_seen).collect();
        assert!(order.windows(2).all(|w| w[0] >= w[1]), "{order:?}");
        // The plain layout uploads no prefixes and numbers positions from 0 in each sequence.
        let plain = BatchArrays::packed(&Packed::new(&seqs));
        assert_eq!((plain.prefix_of.as_ref(), plain.segments()), (None, 4));
        assert_eq!(plain.positions[170], 0);
    }

    #[test]
    fn a_batch_beyond_the_plan_is_refused_and_a_tree_of_the_planned_sequences_fits() {
        let shape = LayerShape { hidden: 64, heads: 4, kv_heads: 2, head_dim: 16, inter: 128, gated: true };
        let plan = plan_buffers(&shape, 1000, 4, Precision::Bf16);
        // Four sequences sharing a prefix: five segments, within max_segments(4) = 6.
        let seqs: Vec<Vec<u32>> = (0..4u32).map(|i| (0..200).chain([i]).collect()).collect();
        assert_eq!(BatchArrays::packed(&Packed::shared(&seqs, 16)).fits(&plan), Ok(()));
        let long = BatchArrays::plain(&[0, 600, 1001]);
        assert!(long.fits(&plan).unwrap_err().contains("1001 tokens"));
        let many = BatchArrays::plain(&(0..=7u32).collect::<Vec<_>>());
        assert!(many.fits(&plan).unwrap_err().contains("7 segments"));
    }
}
