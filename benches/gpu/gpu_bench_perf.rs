//! The timed parts of gpu_bench: the cuBLASLt FP8 and bf16 GEMM ceilings, each kernel alone
//! at the Llama-3.1-70B shape, and the 70B-shape layer loop in FP8 and in bf16. Times are medians of CUDA-event
//! intervals (events created with timing enabled) after warm-up; each result is printed as one
//! JSON line as soon as it is measured, so a step cut short by its timeout keeps what finished.

use anyhow::Result;
use scorestream::engine::cuda::device::GpuDevice;
use scorestream::engine::cuda::gemm::{Gemm, ScaleMode};
use scorestream::engine::cuda::layer::{forward, LayerConfig, LayerWeights, Workspace};
use scorestream::engine::cuda::plan::{attention_tiles, LayerShape};
use scorestream::engine::cuda::precision::Precision;

/// Deterministic xorshift, for batch layouts.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// `s` as a JSON string literal (quoted and escaped), for the printed lines.
pub fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Median milliseconds of `reps` runs of `f` after `warm` untimed ones.
pub fn time_ms(dev: &GpuDevice, warm: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let (start, stop) = dev.timing_events()?;
    for _ in 0..warm {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        start.record(&dev.stream)?;
        f()?;
        stop.record(&dev.stream)?;
        stop.synchronize()?;
        times.push(f64::from(start.elapsed_ms(&stop)?));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The GEMMs at 8192³ and the 70B projections for 16k tokens, in each of `precisions`.
pub fn gemm_bench(dev: &GpuDevice, precisions: &[Precision]) -> Result<()> {
    let shape = LayerShape::LLAMA_70B;
    let mut shapes = vec![("square", 8192usize, 8192usize, 8192usize)];
    for (name, (o, i)) in ["qkv", "o", "gate_up", "down"].iter().zip(shape.linears()) {
        shapes.push((name, 16384, o, i));
    }
    let mut gemm = Gemm::new(dev)?;
    if precisions.contains(&Precision::Fp8) {
        fp8_gemms(dev, &mut gemm, &shapes)?;
    }
    if precisions.contains(&Precision::Bf16) {
        for &(name, m, n, k) in &shapes {
            let (a, w, y) = (dev.alloc(m * k * 2)?, dev.alloc(n * k * 2)?, dev.alloc(m * n * 2)?);
            dev.fill_uniform(false, a.ptr, m * k, 1, 1.0)?;
            dev.fill_uniform(false, w.ptr, n * k, 2, 1.0 / (k as f32).sqrt())?;
            let ms = time_ms(dev, 2, 20, || Ok(gemm.matmul_bf16(dev, a.ptr, w.ptr, y.ptr, 0, m, n, k)?))?;
            let tflops = 2.0 * (m * n * k) as f64 / ms / 1e9;
            println!(r#"{{"kind":"gemm","dtype":"bf16","shape":"{name}","m":{m},"n":{n},"k":{k},"fast_accum":false,"mode":"-","ms":{ms:.4},"tflops":{tflops:.1}}}"#);
        }
    }
    Ok(())
}

fn fp8_gemms(dev: &GpuDevice, gemm: &mut Gemm, shapes: &[(&str, usize, usize, usize)]) -> Result<()> {
    for &(name, m, n, k) in shapes {
        let (a, w, y) = (dev.alloc(m * k)?, dev.alloc(n * k)?, dev.alloc(m * n * 2)?);
        let (asc, wsc) = (dev.alloc(m * 4)?, dev.alloc(n * 4)?);
        dev.fill_uniform(true, a.ptr, m * k, 1, 448.0)?;
        dev.fill_uniform(true, w.ptr, n * k, 2, 448.0)?;
        dev.upload(asc.ptr, &vec![1e-3f32; m])?;
        dev.upload(wsc.ptr, &vec![1e-3f32; n])?;
        for fast in [false, true] {
            for prefer in [true, false] {
                gemm.fast_accum = fast;
                gemm.prefer_outer_vector = prefer;
                let mut mode = ScaleMode::Epilogue;
                let ms = time_ms(dev, 2, 20, || {
                    mode = gemm.matmul(dev, a.ptr, asc.ptr, w.ptr, wsc.ptr, y.ptr, 0, m, n, k)?;
                    Ok(())
                })?;
                let tflops = 2.0 * (m * n * k) as f64 / ms / 1e9;
                println!(r#"{{"kind":"gemm","dtype":"fp8","shape":"{name}","m":{m},"n":{n},"k":{k},"fast_accum":{fast},"mode":"{mode:?}","ms":{ms:.4},"tflops":{tflops:.1}}}"#);
            }
        }
    }
    Ok(())
}

/// Sequence boundaries for `tokens` tokens in sequences of 512–4096 tokens.
pub fn batch(tokens: usize, rng: &mut Rng) -> Vec<u32> {
    let mut cu = vec![0u32];
    let mut left = tokens;
    while left > 0 {
        let len = (512 + (rng.next() * 3585.0) as usize).min(left);
        left -= len;
        cu.push((tokens - left) as u32);
    }
    cu
}

fn llama3_inv_freq(shape: &LayerShape) -> Vec<f32> {
    scorestream::model::rope::inv_freq(
        500_000.0,
        shape.head_dim,
        &scorestream::model::config::RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max: 8192.0 },
    )
}

fn kernel_line(kernel: &str, tokens: usize, ms: f64, bytes: f64) {
    let gbps = bytes / ms / 1e6;
    println!(r#"{{"kind":"kernel_time","kernel":"{kernel}","tokens":{tokens},"ms":{ms:.4},"gb_per_s":{gbps:.0}}}"#);
}

/// Each kernel alone on one 70B-shape layer's buffers, 16,384 tokens: memory-bound kernels
/// with their bytes moved per second, attention with its TFLOP/s (batch of 512–4096-token
/// sequences, and 4 sequences of 4096). The FP8 kernels only when `fp8`.
pub fn kernel_times(dev: &GpuDevice, fp8: bool) -> Result<()> {
    let (s, t) = (LayerShape::LLAMA_70B, 16384usize);
    let mut ws = Workspace::new(dev, &s, t, t / 512 + 1, &llama3_inv_freq(&s), Precision::Bf16)?;
    let mut rng = Rng(777);
    let cu = batch(t, &mut rng);
    ws.set_batch(dev, &cu)?;
    let p = ws.plan.clone();
    let (x, h, qkv, attn, up, q8, qs) = (ws.at(p.x), ws.at(p.h), ws.at(p.qkv), ws.at(p.attn), ws.at(p.up), ws.at(p.q8), ws.at(p.q_scale));
    for (ptr, n) in [(x, t * s.hidden), (h, t * s.hidden), (qkv, t * s.qkv_width()), (attn, t * s.attn_width()), (up, t * s.up_width())] {
        dev.fill_uniform(false, ptr, n, 3, 1.0)?;
    }
    let w = LayerWeights::random(dev, &s, 5, Precision::Bf16)?;
    let (th, hid) = ((t * s.hidden) as f64, s.hidden);
    if fp8 {
        let ms = time_ms(dev, 2, 20, || Ok(dev.norm(false, x, h, w.norm1.ptr, 0, 1e-5, t, hid, 0, q8, qs)?))?;
        kernel_line("rmsnorm_bf16+residual+fp8", t, ms, 7.0 * th);
    }
    // The bf16 path writes the normalized row as bf16 (q8 holds two bytes per value there).
    let ms = time_ms(dev, 2, 20, || Ok(dev.norm(false, x, h, w.norm1.ptr, 0, 1e-5, t, hid, q8, 0, 0)?))?;
    kernel_line("rmsnorm_bf16+residual", t, ms, 8.0 * th);
    let rot_heads = s.heads + s.kv_heads;
    let ms = time_ms(dev, 2, 20, || Ok(dev.rotary(qkv, t, rot_heads, s.head_dim, s.qkv_width(), s.head_dim, ws.at(p.positions), ws.inv_freq.ptr)?))?;
    kernel_line("rotary_bf16", t, ms, 4.0 * (t * rot_heads * s.head_dim) as f64);
    if fp8 {
        let ms = time_ms(dev, 2, 20, || Ok(dev.act_quant("swiglu_quant_bf16", up, t, s.inter, 0, q8, qs)?))?;
        kernel_line("swiglu_quant_bf16", t, ms, 5.0 * (t * s.inter) as f64);
        let ms = time_ms(dev, 2, 20, || Ok(dev.quant_rows(attn, t, s.attn_width(), q8, qs)?))?;
        kernel_line("quant_rows_bf16", t, ms, 3.0 * (t * s.attn_width()) as f64);
        let ones = dev.alloc(hid * 4)?;
        dev.upload(ones.ptr, &vec![1.0f32; hid])?;
        let ms = time_ms(dev, 2, 20, || Ok(dev.scale_epilogue(h, t, hid, qs, ones.ptr, 0, None)?))?;
        kernel_line("scale_epilogue_bf16", t, ms, 4.0 * th);
        // The QKV projection's epilogue alone, and with rotary fused (same bytes: read and
        // write each value once); against it, the epilogue then rotary_bf16.
        let qkv_n = s.qkv_width();
        let ones = dev.alloc(qkv_n * 4)?;
        dev.upload(ones.ptr, &vec![1.0f32; qkv_n])?;
        let qkv_bytes = 4.0 * (t * qkv_n) as f64;
        let ms = time_ms(dev, 2, 20, || Ok(dev.scale_epilogue(qkv, t, qkv_n, qs, ones.ptr, 0, None)?))?;
        kernel_line("scale_epilogue_bf16 (qkv)", t, ms, qkv_bytes);
        let rot = scorestream::engine::cuda::launch::Rotary { heads: rot_heads, head_dim: s.head_dim, rot_dim: s.head_dim, positions: ws.at(p.positions), inv_freq: ws.inv_freq.ptr };
        let ms = time_ms(dev, 2, 20, || Ok(dev.scale_epilogue(qkv, t, qkv_n, qs, ones.ptr, 0, Some(&rot))?))?;
        kernel_line("scale_epilogue_bf16+rotary (qkv)", t, ms, qkv_bytes);
    }
    let ms = time_ms(dev, 2, 20, || Ok(dev.act_quant("swiglu_quant_bf16", up, t, s.inter, q8, 0, 0)?))?;
    kernel_line("swiglu_quant_bf16 (bf16 out)", t, ms, 6.0 * (t * s.inter) as f64);
    let ms = time_ms(dev, 2, 20, || Ok(dev.add(x, h, t * hid)?))?;
    kernel_line("add_bf16", t, ms, 6.0 * th);
    attention_times(dev, &mut ws, &cu, fp8)
}

// ---- attention kernels (attn-v2): each kernel alone, head size 128, causal ----

/// Each attention kernel (v1, v2) alone at the 70B shape (64 query heads, 8 KV heads, head
/// size 128, causal) over 16,384 tokens: 512–4096-token sequences, and 4 sequences of 4096
/// (the goal: ≥ 300 TFLOP/s on H100/H200), plus v2's tree layout (best-of-4 over a
/// 3,072-token prompt, 1,024-token answers). With `fp8`, also v2 with its output quantized per
/// token in the kernel (against it: v2, then `quant_rows_bf16` timed above).
fn attention_times(dev: &GpuDevice, ws: &mut Workspace, mixed: &[u32], fp8: bool) -> Result<()> {
    use scorestream::engine::cuda::launch::{attention_kernel, AttentionKernel};
    let (s, t) = (LayerShape::LLAMA_70B, ws.tokens);
    let uniform: Vec<u32> = (0..=4u32).map(|i| i * 4096).collect();
    for (label, cu) in [("512-4096", mixed.to_vec()), ("4x4096", uniform)] {
        ws.set_batch(dev, &cu)?;
        let flops: f64 = cu.windows(2).map(|w| s.attention_flops((w[1] - w[0]) as usize)).sum();
        let tiles = attention_tiles(&cu).len();
        for (kernel, quant) in [(AttentionKernel::V1, false), (AttentionKernel::V2, false), (AttentionKernel::V2, true)] {
            if quant && !fp8 {
                continue;
            }
            ws.attention = kernel;
            let args = ws.attn_args(&s, 0, quant);
            let ms = time_ms(dev, 2, 10, || Ok(dev.attention(kernel, &args)?))?;
            let name = attention_kernel(kernel, s.head_dim).map_err(anyhow::Error::msg)?;
            let name = if quant { format!("{name}+fp8") } else { name.to_owned() };
            println!(
                r#"{{"kind":"kernel_time","kernel":"{name}","seqs":"{label}","tokens":{t},"tiles":{tiles},"ms":{ms:.4},"tflops":{:.1}}}"#,
                flops / ms / 1e9
            );
        }
        ws.attention = AttentionKernel::default();
    }
    // Tree layout: a 3,072-token prefix once, four 1,024-token suffixes after it (16,384 tokens
    // laid out as 7,168). FLOPs counted as the work done (each suffix over prefix + itself).
    let seqs: Vec<Vec<u32>> = (0..4u32).map(|i| (0..3072).chain((0..1024).map(|j| 100_000 * (i + 1) + j)).collect()).collect();
    let packed = scorestream::model::packed::Packed::shared(&seqs, 128);
    ws.set_packed(dev, &packed)?;
    let flops = s.attention_flops(3072) + 4.0 * (s.attention_flops(4096) - s.attention_flops(3072));
    for kernel in [AttentionKernel::V1, AttentionKernel::V2] {
        let args = ws.attn_args(&s, 0, false);
        let ms = time_ms(dev, 2, 10, || Ok(dev.attention(kernel, &args)?))?;
        let name = attention_kernel(kernel, s.head_dim).map_err(anyhow::Error::msg)?;
        println!(
            r#"{{"kind":"kernel_time","kernel":"{name}","seqs":"tree 3072+4x1024","tokens":{},"ms":{ms:.4},"tflops":{:.1}}}"#,
            packed.num_tokens(),
            flops / ms / 1e9
        );
    }
    Ok(())
}

// ---- end of attention kernels (attn-v2) ----

/// The layer loop at the 70B shape in `precision` over as many layers as fit (at most
/// `max_layers`); the weights are freed before returning, so the next precision has the GPU.
pub fn layers_bench(dev: &GpuDevice, precision: Precision, max_layers: usize, reps: usize) -> Result<()> {
    let shape = LayerShape::LLAMA_70B;
    let batches = [4096usize, 16384, 65536];
    let max_tokens = 65536;
    let dtype = precision.dtype();
    let mut ws = Workspace::new(dev, &shape, max_tokens, max_tokens / 512 + 1, &llama3_inv_freq(&shape), precision)?;
    let (free, total) = dev.ctx.mem_get_info()?;
    let layer_bytes = shape.layer_bytes(precision);
    let fit = free.saturating_sub(3 << 30) / layer_bytes;
    let n_layers = fit.min(max_layers).max(1);
    let layers = (0..n_layers).map(|i| LayerWeights::random(dev, &shape, 1000 + i as u64, precision)).collect::<Result<Vec<_>, _>>()?;
    let (free_after, _) = dev.ctx.mem_get_info()?;
    println!(
        r#"{{"kind":"layers_memory","dtype":"{dtype}","layers":{n_layers},"fit":{fit},"layer_bytes":{layer_bytes},"workspace_bytes":{},"free_before":{free},"free_after":{free_after},"total":{total}}}"#,
        ws.plan.total
    );
    let mut gemm = Gemm::new(dev)?;
    let cfg = LayerConfig::llama(shape);
    let mut rng = Rng(12345);
    for tokens in batches {
        let cu = batch(tokens, &mut rng);
        ws.set_batch(dev, &cu)?;
        dev.fill_uniform(false, ws.at(ws.plan.x), tokens * shape.hidden, 7, 1.0)?;
        let ms = time_ms(dev, 1, reps, || {
            for (i, w) in layers.iter().enumerate() {
                forward(dev, &mut gemm, &cfg, w, &ws, i > 0)?;
            }
            Ok(())
        })?;
        let out = dev.download::<u16>(ws.at(ws.plan.h), 4096)?;
        let nan = out.iter().any(|&b| !half::bf16::from_bits(b).is_finite());
        let per_layer = ms / n_layers as f64;
        let flops: f64 = shape.linear_flops_per_token() * tokens as f64
            + cu.windows(2).map(|w| shape.attention_flops((w[1] - w[0]) as usize)).sum::<f64>();
        let tflops = flops / per_layer / 1e9;
        let tok_s_80 = tokens as f64 / (per_layer * 80.0 / 1e3);
        println!(r#"{{"kind":"layers","dtype":"{dtype}","tokens":{tokens},"seqs":{},"layers":{n_layers},"ms_per_layer":{per_layer:.3},"tflops":{tflops:.1},"tokens_per_s_80_layers":{tok_s_80:.0},"nan":{nan}}}"#, cu.len() - 1);
    }
    Ok(())
}
