//! GPU check and benchmark (`--features cuda`), run by scripts/gpu_check.sh on a Hopper GPU
//! (it runs on any GPU from sm_80; the FP8 parts only where FP8 exists, sm_89 and later).
//! `gpu_bench --help` lists the commands; arguments are parsed (and usage errors reported)
//! before any CUDA library is touched. Every command prints one JSON object per line
//! (`{"kind": ...}`), flushed as it goes, for benches/gpu/report.py.
//!   probe                 driver, NVRTC and cuBLASLt versions and files, GPU, free memory
//!   check                 every kernel and both GEMMs vs their CPU references
//!                         (src/engine/reference) on fresh random inputs, outputs poisoned
//!                         with 0xFF (NaN) first
//!   parity [DIR]          each fixture under DIR: the CUDA stage (FP8 and bf16) vs the CPU stage
//!   gemm                  cuBLASLt FP8 and bf16 GEMM ceilings (8192³, and the 70B layer shapes)
//!   time                  each kernel alone at the 70B shape (attention in TFLOP/s)
//!   layers                the 70B-shape layer loop in FP8 and bf16, as many layers as fit
//!   load-parity [DIR]     each fixture loaded on the device and on the host: every weight byte
//!   load                  a 70B-shaped bf16 checkpoint of as many layers as the disk holds:
//!                         on-device load (FP8, bf16) and one layer on the host, GB/s
//!   hop [DIR]             two stages on one GPU vs one (scores), and the 70B hop vs one layer
//!   kernels --out DIR     every kernel's CUBIN for --arch (no GPU needed)

#[path = "gpu_bench_perf.rs"]
mod perf;
#[path = "gpu_bench_load.rs"]
mod load;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use half::bf16;
use perf::Rng;
use scorestream::engine::cuda::device::GpuDevice;
use scorestream::engine::cuda::gemm::Gemm;
use scorestream::engine::cuda::launch::AttentionKernel;
use scorestream::engine::cuda::precision::{GpuFacts, Precision};
use scorestream::engine::cuda::libraries::preload_from;
use scorestream::engine::reference::attention::AttnShape;
use scorestream::engine::reference::{fp8, kernels as r};

impl Rng {
    /// bf16-exact values uniform in ±amp.
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| bf16::from_f32((2.0 * self.next() - 1.0) * amp).to_f32()).collect()
    }
}

fn to_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}
fn from_bits(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

struct Check<'a> {
    dev: &'a GpuDevice,
    failed: bool,
}

impl Check<'_> {
    fn upload_bf16(&self, v: &[f32]) -> Result<scorestream::engine::cuda::device::DeviceBuf> {
        let b = self.dev.alloc(v.len() * 2)?;
        self.dev.upload(b.ptr, &to_bits(v))?;
        Ok(b)
    }
    fn upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<scorestream::engine::cuda::device::DeviceBuf> {
        let b = self.dev.alloc(std::mem::size_of_val(v))?;
        self.dev.upload(b.ptr, v)?;
        Ok(b)
    }
    fn poisoned(&self, bytes: usize) -> Result<scorestream::engine::cuda::device::DeviceBuf> {
        let b = self.dev.alloc(bytes)?;
        self.dev.fill_bytes(b.ptr, bytes, 0xFF)?;
        Ok(b)
    }
    fn bf16_out(&self, ptr: u64, n: usize) -> Result<Vec<f32>> {
        Ok(from_bits(&self.dev.download::<u16>(ptr, n)?))
    }
    fn report(&mut self, name: &str, err: f64, tol: f64) {
        let ok = err <= tol;
        self.failed |= !ok;
        println!(r#"{{"kind":"check","kernel":"{name}","rel_err":{err:.3e},"tol":{tol:.0e},"pass":{ok}}}"#);
    }
    /// Dequantized FP8 rows vs the reference's, and the scales.
    fn fp8_err(&self, q: u64, s: u64, rows: usize, cols: usize, want: &[f32]) -> Result<f64> {
        let (wq, ws) = fp8::quantize_rows(want, cols);
        let got = fp8::dequantize_rows(&self.dev.download::<u8>(q, rows * cols)?, &self.dev.download::<f32>(s, rows)?, cols);
        Ok(r::rel_err(&got, &fp8::dequantize_rows(&wq, &ws, cols)))
    }
}

/// Whether `dev` has FP8 tensor cores (and so the FP8 kernels).
fn has_fp8(dev: &GpuDevice) -> bool {
    GpuFacts { ordinal: 0, name: dev.name.clone(), major: dev.capability.0, minor: dev.capability.1 }.has_fp8()
}

fn check(dev: &GpuDevice) -> Result<bool> {
    let mut c = Check { dev, failed: false };
    let fp8 = has_fp8(dev);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64 | 1;
    let mut rng = Rng(seed);
    let t = 67usize;
    // Norms (+ residual, + FP8), both kinds; rows of 1000 take the 16-byte path, 1001 the
    // one-value-at-a-time fallback.
    for (ln, hd) in [(false, 1000usize), (true, 1000), (false, 1001), (true, 1001)] {
        let (x, res, w, b) = (rng.vec(t * hd, 3.0), rng.vec(t * hd, 1.0), rng.vec(hd, 1.5), rng.vec(hd, 0.5));
        let (dx, dr, dw, db) = (c.upload_bf16(&x)?, c.upload_bf16(&res)?, c.upload(&w)?, c.upload(&b)?);
        let (y, q, s) = (c.poisoned(t * hd * 2)?, c.poisoned(t * hd)?, c.poisoned(t * 4)?);
        let (q, s) = if fp8 { (q.ptr, s.ptr) } else { (0, 0) };
        dev.norm(ln, dx.ptr, dr.ptr, dw.ptr, if ln { db.ptr } else { 0 }, 1e-5, t, hd, y.ptr, q, s)?;
        let kind = if ln { r::NormKind::LayerNorm1P } else { r::NormKind::Rms };
        let mut xr = x.clone();
        let want = r::norm(kind, &mut xr, Some(&res), &w, ln.then_some(b.as_slice()), 1e-5, hd);
        let name = match (ln, hd % 8) {
            (true, 0) => "layernorm1p_bf16",
            (false, 0) => "rmsnorm_bf16",
            (true, _) => "layernorm1p_bf16/unaligned",
            (false, _) => "rmsnorm_bf16/unaligned",
        };
        c.report(&format!("{name}/residual"), r::rel_err(&c.bf16_out(dx.ptr, t * hd)?, &xr), 1e-2);
        c.report(&format!("{name}/y"), r::rel_err(&c.bf16_out(y.ptr, t * hd)?, &want), 1e-2);
        if fp8 {
            let e = c.fp8_err(q, s, t, hd, &want)?;
            c.report(&format!("{name}/fp8"), e, 7e-2);
        }
    }
    // Rotary, partial (rot_dim 64 of head_dim 128) and full, over q and k heads of a QKV row;
    // rot_dim 20 (halves of 10) takes the fallback of the 16-byte path.
    for rot in [64usize, 128, 20] {
        let (heads, d, stride) = (6usize, 128usize, 8 * 128usize);
        let x = rng.vec(t * stride, 2.0);
        let pos: Vec<u32> = (0..t as u32).map(|i| (i * 977) % 70000).collect();
        let inv = scorestream::model::rope::inv_freq(500_000.0, rot, &scorestream::model::config::RopeScaling::None);
        let (dx, dp, di) = (c.upload_bf16(&x)?, c.upload(&pos)?, c.upload(&inv)?);
        dev.rotary(dx.ptr, t, heads, d, stride, rot, dp.ptr, di.ptr)?;
        let mut want = x.clone();
        r::rotary(&mut want, t, heads, d, stride, rot, &pos, &inv);
        c.report(&format!("rotary_bf16/rot{rot}"), r::rel_err(&c.bf16_out(dx.ptr, t * stride)?, &want), 1e-2);
    }
    // Qwen3's per-head q/k norm, in place on QKV rows (v heads untouched).
    {
        let (q_heads, kv, d) = (8usize, 2usize, 128usize);
        let stride = (q_heads + 2 * kv) * d;
        let (x, qw, kw) = (rng.vec(t * stride, 3.0), rng.vec(d, 1.5), rng.vec(d, 1.5));
        let (dx, dq, dk) = (c.upload_bf16(&x)?, c.upload(&qw)?, c.upload(&kw)?);
        dev.head_norm(dx.ptr, t, q_heads, kv, d, stride, dq.ptr, dk.ptr, 1e-6)?;
        let mut want = x.clone();
        r::head_rms_norm(&mut want, t, q_heads, kv, d, stride, &qw, &kw, 1e-6);
        c.report("head_rmsnorm_bf16", r::rel_err(&c.bf16_out(dx.ptr, t * stride)?, &want), 1e-2);
        // Fused with rotary (partial: 64 of 128 dims): the head norm, then rotary_bf16.
        let pos: Vec<u32> = (0..t as u32).map(|i| (i * 977) % 70000).collect();
        let inv = scorestream::model::rope::inv_freq(1_000_000.0, 64, &scorestream::model::config::RopeScaling::None);
        let (dx, dp, di) = (c.upload_bf16(&x)?, c.upload(&pos)?, c.upload(&inv)?);
        dev.head_norm_rotary(dx.ptr, t, q_heads, kv, d, stride, dq.ptr, dk.ptr, 1e-6, 64, dp.ptr, di.ptr)?;
        r::rotary(&mut want, t, q_heads + kv, d, stride, 64, &pos, &inv);
        c.report("head_rmsnorm_rotary_bf16", r::rel_err(&c.bf16_out(dx.ptr, t * stride)?, &want), 1e-2);
    }
    // Activations + FP8.
    for act in [r::Activation::SwiGlu, r::Activation::GeGluTanh, r::Activation::Relu2] {
        let kernel = scorestream::engine::cuda::layer::act_kernel(act);
        // relu² over rows of 3001 takes the one-value-at-a-time fallback of the 16-byte path.
        let inter = if act == r::Activation::Relu2 { 3001usize } else { 3000 };
        let width = if act == r::Activation::Relu2 { inter } else { 2 * inter };
        let x = rng.vec(t * width, 4.0);
        let dx = c.upload_bf16(&x)?;
        let (y, q, s) = (c.poisoned(t * inter * 2)?, c.poisoned(t * inter)?, c.poisoned(t * 4)?);
        let (q, s) = if fp8 { (q.ptr, s.ptr) } else { (0, 0) };
        dev.act_quant(kernel, dx.ptr, t, inter, y.ptr, q, s)?;
        let want = r::activation(act, &x, inter);
        c.report(&format!("{kernel}/y"), r::rel_err(&c.bf16_out(y.ptr, t * inter)?, &want), 1e-2);
        if fp8 {
            let e = c.fp8_err(q, s, t, inter, &want)?;
            c.report(&format!("{kernel}/fp8"), e, 7e-2);
        }
    }
    check_small(&mut c, &mut rng, t)?;
    if fp8 {
        check_fp8_small(&mut c, &mut rng, t)?;
    }
    check_attention(&mut c, &mut rng)?;
    if fp8 {
        check_gemm(&mut c, &mut rng)?;
    }
    check_bf16_gemm(&mut c, &mut rng)?;
    Ok(!c.failed)
}

fn check_small(c: &mut Check, rng: &mut Rng, t: usize) -> Result<()> {
    let dev = c.dev;
    let n = 777usize;
    let (a, b) = (rng.vec(t * n, 3.0), rng.vec(t * n, 3.0));
    let (da, db) = (c.upload_bf16(&a)?, c.upload_bf16(&b)?);
    dev.add(da.ptr, db.ptr, t * n)?;
    let mut want = a.clone();
    r::add(&mut want, &b);
    c.report("add_bf16", r::rel_err(&c.bf16_out(da.ptr, t * n)?, &want), 1e-2);
    let bias = rng.vec(n, 1.0);
    let (y, dbias) = (c.upload_bf16(&b)?, c.upload(&bias)?);
    dev.add_bias(y.ptr, t, n, dbias.ptr)?;
    let mut want = b.clone();
    r::add_bias(&mut want, &bias);
    c.report("add_bias_bf16", r::rel_err(&c.bf16_out(y.ptr, t * n)?, &want), 1e-2);
    let idx: Vec<u32> = vec![3, 0, (t - 1) as u32, 5];
    let (di, dst) = (c.upload(&idx)?, c.poisoned(idx.len() * n * 2)?);
    dev.gather_rows(da.ptr, t, n, di.ptr, idx.len(), dst.ptr)?;
    let mut a_now = a.clone();
    r::add(&mut a_now, &b);
    let want = r::gather_rows(&a_now, n, &idx);
    c.report("gather_rows_bf16", r::rel_err(&c.bf16_out(dst.ptr, idx.len() * n)?, &want), 1e-2);
    Ok(())
}

/// The kernels of fp8.cu (sm_89 and later).
fn check_fp8_small(c: &mut Check, rng: &mut Rng, t: usize) -> Result<()> {
    let dev = c.dev;
    let n = 777usize;
    let (a, b) = (rng.vec(t * n, 3.0), rng.vec(t * n, 3.0));
    let db = c.upload_bf16(&b)?;
    let (q, s) = (c.poisoned(t * n)?, c.poisoned(t * 4)?);
    dev.quant_rows(db.ptr, t, n, q.ptr, s.ptr)?;
    let e = c.fp8_err(q.ptr, s.ptr, t, n, &b)?;
    c.report("quant_rows_bf16", e, 7e-2);
    let (rs, cs, bias) = (rng.vec(t, 1.0), rng.vec(n, 1.0), rng.vec(n, 1.0));
    let (drs, dcs, dbias) = (c.upload(&rs)?, c.upload(&cs)?, c.upload(&bias)?);
    let y = c.upload_bf16(&a)?;
    dev.scale_epilogue(y.ptr, t, n, drs.ptr, dcs.ptr, dbias.ptr, None)?;
    let mut want = a.clone();
    r::scale_epilogue(&mut want, n, &rs, &cs, Some(&bias));
    c.report("scale_epilogue_bf16", r::rel_err(&c.bf16_out(y.ptr, t * n)?, &want), 1e-2);
    // With rotary fused (the QKV projection's epilogue): a QKV row of 6 q/k heads and 2 v heads
    // of 128, partial (64) and full rotary, against the epilogue then rotary_bf16's reference;
    // exact equality is expected, the tolerance is the other kernels'.
    for rot in [64usize, 128] {
        let (heads, d) = (6usize, 128usize);
        let n = (heads + 2) * d;
        let (a, rs, cs, bias) = (rng.vec(t * n, 3.0), rng.vec(t, 1.0), rng.vec(n, 1.0), rng.vec(n, 1.0));
        let pos: Vec<u32> = (0..t as u32).map(|i| (i * 977) % 70000).collect();
        let inv = scorestream::model::rope::inv_freq(500_000.0, rot, &scorestream::model::config::RopeScaling::None);
        let (drs, dcs, dbias, dp, di) = (c.upload(&rs)?, c.upload(&cs)?, c.upload(&bias)?, c.upload(&pos)?, c.upload(&inv)?);
        let y = c.upload_bf16(&a)?;
        let fused = scorestream::engine::cuda::launch::Rotary { heads, head_dim: d, rot_dim: rot, positions: dp.ptr, inv_freq: di.ptr };
        dev.scale_epilogue(y.ptr, t, n, drs.ptr, dcs.ptr, dbias.ptr, Some(&fused))?;
        let mut want = a.clone();
        r::scale_epilogue(&mut want, n, &rs, &cs, Some(&bias));
        r::rotary(&mut want, t, heads, d, n, rot, &pos, &inv);
        c.report(&format!("scale_epilogue_bf16/rotary{rot}"), r::rel_err(&c.bf16_out(y.ptr, t * n)?, &want), 1e-2);
    }
    Ok(())
}

/// Both attention kernels against the CPU reference (with each kernel's key tiles), plain and
/// tree layouts (shared prefixes, an empty suffix among them), GQA groups of 4, 7 and 1, and
/// sliding windows. The references run on all cores first (the step has a 60 s limit).
fn check_attention(c: &mut Check, rng: &mut Rng) -> Result<()> {
    use scorestream::engine::cuda::launch::{attention_kernel, attention_v2_key_tile, AttnArgs};
    use scorestream::engine::reference::attention::{attention_tree, KEY_TILE};
    use scorestream::model::packed::Packed;
    let dev = c.dev;
    let plain: Vec<Vec<u32>> = [1usize, 300, 64, 129, 517].iter().map(|&n| (0..n as u32).map(|i| 7 * i + n as u32).collect()).collect();
    // Best-of-4 over a 150-token prompt (answers of 70, 0, 200 and 1 tokens) beside two
    // sequences alone.
    let mut tree: Vec<Vec<u32>> = [70usize, 0, 200, 1].iter().map(|&n| (0..150u32).chain((0..n as u32).map(|j| 9000 + 300 * n as u32 + j)).collect()).collect();
    tree.extend([(0..90u32).map(|i| 50_000 + i).collect::<Vec<u32>>(), (0..33u32).map(|i| 60_000 + i).collect()]);
    let layouts = [("plain", Packed::new(&plain)), ("tree", Packed::shared(&tree, 16))];
    struct Case {
        kernel: AttentionKernel,
        layout: usize,
        shape: AttnShape,
        qkv: Vec<f32>,
        key_tile: usize,
    }
    let mut cases = Vec::new();
    for (kernel, dims) in [(AttentionKernel::V1, vec![16usize, 32, 64, 128, 192]), (AttentionKernel::V2, vec![16, 24, 32, 64, 80, 96, 128, 192, 256])] {
        for d in dims {
            for (heads, kv, window) in [(8usize, 2usize, 0usize), (8, 2, 100), (14, 2, 0), (4, 4, 100)] {
                // v1 runs the other GQA shapes at 128 only, to keep the check short.
                if kernel == AttentionKernel::V1 && d != 128 && (heads, kv, window) != (8, 2, 0) {
                    continue;
                }
                for (layout, (_, packed)) in layouts.iter().enumerate() {
                    // The plain layout with the first two shapes only.
                    if layout == 0 && heads != 8 {
                        continue;
                    }
                    let stride = (heads + 2 * kv) * d;
                    let shape = AttnShape { heads, kv_heads: kv, head_dim: d, qkv_stride: stride, softmax_scale: 1.0 / (d as f32).sqrt(), window };
                    let key_tile = if kernel == AttentionKernel::V1 { KEY_TILE } else { attention_v2_key_tile(d) };
                    cases.push(Case { kernel, layout, shape, qkv: rng.vec(packed.num_tokens() * stride, 2.0), key_tile });
                }
            }
        }
    }
    let segments = |p: &Packed| -> (Vec<u32>, Vec<i32>) {
        (p.cu_seqlens.iter().map(|&v| v as u32).collect(), p.prefix_of.iter().map(|p| p.map_or(-1, |p| p as i32)).collect())
    };
    let wants: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|case| {
                let packed = &layouts[case.layout].1;
                scope.spawn(move || {
                    let (cu, prefix_of) = segments(packed);
                    let tree_prefixes: &[i32] = if packed.is_tree() { &prefix_of } else { &[] };
                    attention_tree(&case.qkv, &cu, tree_prefixes, &case.shape, case.key_tile)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    for (case, want) in cases.iter().zip(&wants) {
        let (layout, packed) = &layouts[case.layout];
        let s = &case.shape;
        let (cu, prefix_of) = segments(packed);
        let prefix_len: Vec<u32> = prefix_of.iter().map(|&p| if p >= 0 { cu[p as usize + 1] - cu[p as usize] } else { 0 }).collect();
        let tiles: Vec<i32> = scorestream::engine::cuda::plan::attention_tiles_tree(&cu, &prefix_len).into_iter().flatten().collect();
        let cu_i: Vec<i32> = cu.iter().map(|&v| v as i32).collect();
        let (dq, dt, dc, dp) = (c.upload_bf16(&case.qkv)?, c.upload(&tiles)?, c.upload(&cu_i)?, c.upload(&prefix_of)?);
        let out = c.poisoned(packed.num_tokens() * s.heads * s.head_dim * 2)?;
        let args = AttnArgs {
            qkv: dq.ptr,
            out: out.ptr,
            tiles: dt.ptr,
            num_tiles: tiles.len() / 2,
            cu_seqlens: dc.ptr,
            prefix_of: if packed.is_tree() { dp.ptr } else { 0 },
            qkv_stride: s.qkv_stride,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            window: s.window,
            quant: None,
        };
        dev.attention(case.kernel, &args)?;
        let name = attention_kernel(case.kernel, s.head_dim).map_err(anyhow::Error::msg)?;
        let got = c.bf16_out(out.ptr, want.len())?;
        let label = format!("{name}/{layout}/heads{}kv{}/window{}", s.heads, s.kv_heads, s.window);
        c.report(&label, r::rel_err(&got, want), 1e-2);
        if case.kernel == AttentionKernel::V2 {
            check_attention_quant(c, &args, &got, want, &label, tiles.len() / 2)?;
        }
    }
    Ok(())
}

/// Attention v2 with its output quantized in the kernel ("last block quantizes"), launched
/// twice on the same bookkeeping (so the second launch relies on the first leaving it zero):
/// the bf16 output must equal the unfused launch's, the E4M3 codes and scales must equal
/// `quant_rows_bf16`'s arithmetic (the CPU's) on that output exactly, and the dequantized rows
/// must be within the FP8 tolerance of the reference.
fn check_attention_quant(c: &mut Check, args: &scorestream::engine::cuda::launch::AttnArgs, got: &[f32], want: &[f32], label: &str,
                         tiles: usize) -> Result<()> {
    let dev = c.dev;
    let (tokens, width) = (got.len() / (args.heads * args.head_dim), args.heads * args.head_dim);
    let (q, qs, out) = (c.poisoned(tokens * width)?, c.poisoned(tokens * 4)?, c.poisoned(tokens * width * 2)?);
    let (amax, arrived) = (c.upload(&vec![0u32; tokens])?, c.upload(&vec![0u32; tiles])?);
    let quant = scorestream::engine::cuda::launch::AttnQuant { q: q.ptr, q_scale: qs.ptr, amax: amax.ptr, arrived: arrived.ptr };
    let fused = scorestream::engine::cuda::launch::AttnArgs { out: out.ptr, quant: Some(quant), ..*args };
    dev.attention(AttentionKernel::V2, &fused)?;
    dev.fill_bytes(q.ptr, tokens * width, 0xFF)?;
    dev.fill_bytes(qs.ptr, tokens * 4, 0xFF)?;
    dev.attention(AttentionKernel::V2, &fused)?;
    let o = c.bf16_out(out.ptr, got.len())?;
    let same_o = o.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits());
    let (codes, scales) = (dev.download::<u8>(q.ptr, tokens * width)?, dev.download::<f32>(qs.ptr, tokens)?);
    let (want_codes, want_scales) = fp8::quantize_rows(&o, width);
    let left: Vec<u32> = dev.download::<u32>(amax.ptr, tokens)?.into_iter().chain(dev.download::<u32>(arrived.ptr, tiles)?).collect();
    let wrong = codes.iter().zip(&want_codes).filter(|(a, b)| a != b).count()
        + scales.iter().zip(&want_scales).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
        + usize::from(!same_o) * o.len()
        + left.iter().filter(|&&v| v != 0).count();
    c.report(&format!("{label}/fp8_exact"), wrong as f64 / (codes.len() + scales.len()) as f64, 0.0);
    let e = c.fp8_err(q.ptr, qs.ptr, tokens, width, want)?;
    c.report(&format!("{label}/fp8"), e, 7e-2);
    Ok(())
}

fn check_gemm(c: &mut Check, rng: &mut Rng) -> Result<()> {
    let dev = c.dev;
    let (t, n, k) = (96usize, 320usize, 1024usize);
    let codes = |rng: &mut Rng, len: usize| -> Vec<u8> { (0..len).map(|_| fp8::e4m3_from_f32((2.0 * rng.next() - 1.0) * 448.0)).collect() };
    let (a, w) = (codes(rng, t * k), codes(rng, n * k));
    let positive = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| x.abs() + 1e-3).collect() };
    let (asc, wsc) = (positive(rng.vec(t, 0.01)), positive(rng.vec(n, 0.01)));
    let want = r::fp8_gemm(&a, &asc, &w, &wsc, k);
    let (da, dw, das, dws) = (c.upload(&a)?, c.upload(&w)?, c.upload(&asc)?, c.upload(&wsc)?);
    let mut gemm = Gemm::new(dev)?;
    for prefer in [true, false] {
        gemm.prefer_outer_vector = prefer;
        let y = c.poisoned(t * n * 2)?;
        let mode = gemm.matmul(dev, da.ptr, das.ptr, dw.ptr, dws.ptr, y.ptr, 0, t, n, k)?;
        c.report(&format!("fp8_gemm/{mode:?}"), r::rel_err(&c.bf16_out(y.ptr, t * n)?, &want), 1e-2);
    }
    Ok(())
}

/// The bf16 GEMM (with and without bias) against its reference, at an unaligned shape too.
fn check_bf16_gemm(c: &mut Check, rng: &mut Rng) -> Result<()> {
    let dev = c.dev;
    let mut gemm = Gemm::new(dev)?;
    for (t, n, k) in [(96usize, 320usize, 1024usize), (7, 100, 1000)] {
        let (x, w, bias) = (rng.vec(t * k, 1.0), rng.vec(n * k, 1.0 / (k as f32).sqrt()), rng.vec(n, 1.0));
        let (dx, dw, db) = (c.upload_bf16(&x)?, c.upload_bf16(&w)?, c.upload(&bias)?);
        let mut want = r::bf16_gemm(&x, &w, k);
        for with_bias in [false, true] {
            let y = c.poisoned(t * n * 2)?;
            if with_bias {
                r::add_bias(&mut want, &bias);
            }
            let name = format!("bf16_gemm/{t}x{n}x{k}{}", if with_bias { "+bias" } else { "" });
            // A refused shape is a failed row, not the end of the check.
            match gemm.matmul_bf16(dev, dx.ptr, dw.ptr, y.ptr, if with_bias { db.ptr } else { 0 }, t, n, k) {
                Ok(()) => c.report(&name, r::rel_err(&c.bf16_out(y.ptr, t * n)?, &want), 1e-2),
                Err(e) => {
                    eprintln!("Error: {name}: {e}");
                    c.report(&name, f64::INFINITY, 1e-2);
                }
            }
        }
    }
    Ok(())
}

/// The CUDA stage against the CPU stage on each committed fixture, same packed batch, in each
/// of `precisions`: FP8 against the CPU's FP8 emulation, bf16 against the CPU's bf16.
fn parity(fixtures: &std::path::Path, precisions: &[Precision]) -> Result<bool> {
    use scorestream::engine::cuda::stage::{CudaStage, LoadPath};
    use scorestream::model::packed::Packed;
    use scorestream::model::stage::{Activations, Stage, StageOutput};
    use scorestream::model::weights::{Vb, Weights};
    let mut ok = true;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.sort();
    for dir in dirs.into_iter().filter(|d| d.join("reference.json").is_file()) {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
        let seqs: Vec<Vec<u32>> = reference["events"]
            .as_array()
            .map(|evs| evs.iter().filter_map(|e| serde_json::from_value(e["input_ids"].clone()).ok()).collect())
            .unwrap_or_default();
        let cfg = scorestream::model::ArchConfig::from_dir(&dir)?;
        let weights = std::sync::Arc::new(Weights::open(&dir)?);
        let packed = Packed::new(&seqs);
        let n = cfg.num_layers;
        let cpu = |dtype, fp8: bool| -> Result<Vec<f32>> {
            let vb = Vb::new(weights.clone(), dtype, candle_core::Device::Cpu).with_fp8(fp8);
            match Stage::load(&vb, &cfg, 0..n, 0, None)?.forward(&packed, Activations::Tokens)? {
                StageOutput::Scores(s) => Ok(s.iter().map(|s| s.reward).collect()),
                StageOutput::Hidden(_) => bail!("the CPU stage returned no scores"),
            }
        };
        let (bf16, f32) = (candle_core::DType::BF16, candle_core::DType::F32);
        for precision in precisions {
            let f32_vb = Vb::new(weights.clone(), f32, candle_core::Device::Cpu);
            let p = format!("{precision:?}").to_lowercase();
            let gpu = match CudaStage::load(LoadPath::Device, 0, &f32_vb, &cfg, 0..n, 0, None, *precision, packed.num_tokens().max(1), seqs.len().max(1), AttentionKernel::V1) {
                Ok(mut stage) => match stage.forward(&packed, Activations::Tokens)? {
                    StageOutput::Scores(s) => s.iter().map(|s| s.reward).collect::<Vec<f32>>(),
                    StageOutput::Hidden(_) => bail!("the CUDA stage returned no scores"),
                },
                Err(e) => {
                    println!(r#"{{"kind":"parity","fixture":"{name}","precision":"{p}","skipped":{}}}"#, json_str(&e.to_string()));
                    continue;
                }
            };
            // The gated row is the CPU doing the GPU's own arithmetic: bf16 activations with FP8
            // linears (the CPU's `fp8` dtype over bf16), or plain bf16; the others (f32
            // activations, the f32 reference model) are informational.
            let wants = match precision {
                Precision::Fp8 => vec![("cpu_fp8_bf16", cpu(bf16, true)?), ("cpu_fp8_f32", cpu(f32, true)?), ("cpu_f32", cpu(f32, false)?)],
                Precision::Bf16 => vec![("cpu_bf16", cpu(bf16, false)?), ("cpu_f32", cpu(f32, false)?)],
            };
            let gated = wants[0].0;
            let gated_want = wants[0].1.clone();
            for (label, want) in wants {
                let diff = gpu.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let nan = gpu.iter().any(|v| !v.is_finite());
                let pass = !nan && (label != gated || diff <= 2e-2 * scale + 1e-3);
                ok &= pass;
                println!(r#"{{"kind":"parity","fixture":"{name}","precision":"{p}","against":"{label}","seqs":{},"max_abs_diff":{diff:.3e},"max_abs_reward":{scale:.3e},"pass":{pass}}}"#, seqs.len());
            }
            // FP8 with attention v2: its output quantized inside the kernel (the fused
            // "last block quantizes" path), against the same gated row.
            if *precision == Precision::Fp8 {
                ok &= fp8_v2_parity(&name, &f32_vb, &cfg, &packed, &gated_want, gated)?;
            }
            // The tree rows in bf16 only (every GPU from sm_80), to keep the step short.
            if *precision == Precision::Bf16 {
                ok &= tree_parity(&name, &weights, &cfg, &seqs, *precision)?;
            }
        }
    }
    Ok(ok)
}

/// The CUDA stage in FP8 with attention v2 (the attention output quantized per token inside
/// the kernel) on the plain batch, against `want`, the gated CPU row of [`parity`].
fn fp8_v2_parity(name: &str, f32_vb: &scorestream::model::weights::Vb, cfg: &scorestream::model::ArchConfig,
                 packed: &scorestream::model::packed::Packed, want: &[f32], against: &str) -> Result<bool> {
    use scorestream::engine::cuda::stage::{CudaStage, LoadPath};
    use scorestream::model::stage::{Activations, StageOutput};
    let seqs = packed.cu_seqlens.len().saturating_sub(1);
    let gpu = match CudaStage::load(LoadPath::Device, 0, f32_vb, cfg, 0..cfg.num_layers, 0, None, Precision::Fp8, packed.num_tokens().max(1), seqs.max(1), AttentionKernel::V2) {
        Ok(mut stage) => match stage.forward(packed, Activations::Tokens)? {
            StageOutput::Scores(s) => s.iter().map(|s| s.reward).collect::<Vec<f32>>(),
            StageOutput::Hidden(_) => bail!("the CUDA stage returned no scores"),
        },
        Err(e) => {
            println!(r#"{{"kind":"parity","fixture":"{name}","precision":"fp8","attention":"v2","skipped":{}}}"#, json_str(&e.to_string()));
            return Ok(true);
        }
    };
    let diff = gpu.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let pass = gpu.iter().all(|v| v.is_finite()) && gpu.len() == want.len() && diff <= 2e-2 * scale + 1e-3;
    println!(
        r#"{{"kind":"parity","fixture":"{name}","precision":"fp8","attention":"v2","against":"{against}","seqs":{seqs},"max_abs_diff":{diff:.3e},"max_abs_reward":{scale:.3e},"pass":{pass}}}"#
    );
    Ok(pass)
}

// ---- tree layout and attention v2 through the engine (attn-v2) ----

/// Each event's sequence and the same sequence less its last token, packed as a tree (shared
/// prefixes, `min_shared_prefix` 1: also across events with one chat template), run by the
/// CUDA stage with each attention kernel, against the CPU stage on the plain layout in the
/// GPU's own arithmetic (the gated row of [`parity`]). Rows `"layout":"tree"`.
fn tree_parity(name: &str, weights: &std::sync::Arc<scorestream::model::weights::Weights>, cfg: &scorestream::model::ArchConfig,
               seqs: &[Vec<u32>], precision: Precision) -> Result<bool> {
    use scorestream::engine::cuda::stage::{CudaStage, LoadPath};
    use scorestream::model::packed::Packed;
    use scorestream::model::stage::{Activations, Stage, StageOutput};
    use scorestream::model::weights::Vb;
    let seqs: Vec<Vec<u32>> = seqs.iter().flat_map(|s| [s.clone(), s[..s.len().saturating_sub(1).max(1).min(s.len())].to_vec()]).collect();
    let (plain, tree) = (Packed::new(&seqs), Packed::shared(&seqs, 1));
    let n = cfg.num_layers;
    let (dtype, fp8) = match precision {
        Precision::Fp8 => (candle_core::DType::BF16, true),
        Precision::Bf16 => (candle_core::DType::BF16, false),
    };
    let vb = Vb::new(weights.clone(), dtype, candle_core::Device::Cpu).with_fp8(fp8);
    let want: Vec<f32> = match Stage::load(&vb, cfg, 0..n, 0, None)?.forward(&plain, Activations::Tokens)? {
        StageOutput::Scores(s) => s.iter().map(|s| s.reward).collect(),
        StageOutput::Hidden(_) => bail!("the CPU stage returned no scores"),
    };
    let p = format!("{precision:?}").to_lowercase();
    let mut ok = true;
    for kernel in [AttentionKernel::V1, AttentionKernel::V2] {
        let a = format!("{kernel:?}").to_lowercase();
        let f32_vb = Vb::new(weights.clone(), candle_core::DType::F32, candle_core::Device::Cpu);
        let gpu = match CudaStage::load(LoadPath::Device, 0, &f32_vb, cfg, 0..n, 0, None, precision, tree.num_tokens().max(1), seqs.len().max(1), kernel) {
            Ok(mut stage) => match stage.forward(&tree, Activations::Tokens)? {
                StageOutput::Scores(s) => s.iter().map(|s| s.reward).collect::<Vec<f32>>(),
                StageOutput::Hidden(_) => bail!("the CUDA stage returned no scores"),
            },
            Err(e) => {
                println!(r#"{{"kind":"parity","fixture":"{name}","precision":"{p}","layout":"tree","attention":"{a}","skipped":{}}}"#, json_str(&e.to_string()));
                continue;
            }
        };
        let diff = gpu.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let pass = gpu.len() == want.len() && gpu.iter().all(|v| v.is_finite()) && diff <= 2e-2 * scale + 1e-3;
        ok &= pass;
        println!(
            r#"{{"kind":"parity","fixture":"{name}","precision":"{p}","layout":"tree","attention":"{a}","against":"cpu_plain","seqs":{},"shared_tokens":{},"max_abs_diff":{diff:.3e},"max_abs_reward":{scale:.3e},"pass":{pass}}}"#,
            seqs.len(),
            tree.shared_tokens()
        );
    }
    Ok(ok)
}

// ---- end of tree layout and attention v2 (attn-v2) ----

#[derive(Debug, Parser)]
#[command(name = "gpu_bench", about = "GPU kernel checks and benchmarks for scorestream (run by scripts/gpu_check.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Driver, NVRTC and cuBLASLt versions and library files, the GPU and its free memory.
    Probe,
    /// Every kernel against its CPU reference (outputs poisoned first).
    Check,
    /// The CUDA stage against the CPU stage on each fixture under DIR.
    Parity {
        #[arg(default_value = "tests/fixtures")]
        dir: PathBuf,
    },
    /// The cuBLASLt FP8 (where the GPU has it) and bf16 GEMM ceilings (8192³ and the 70B
    /// projections at 16k tokens).
    Gemm,
    /// Each kernel timed alone at the 70B shape (attention in TFLOP/s).
    Time,
    /// The 70B-shape layer loop over 4k/16k/64k-token batches, FP8 then bf16, as many layers
    /// as fit (up to the limits below; times are per layer, extrapolated to 80).
    Layers {
        /// At most this many FP8 layers.
        #[arg(long, env = "GPU_BENCH_MAX_LAYERS", default_value_t = 80)]
        max_layers: usize,
        /// At most this many bf16 layers (bf16 is timed second, on fewer layers, to fit the
        /// GPU check's time slot; per-layer time does not depend on the count).
        #[arg(long, env = "GPU_BENCH_MAX_BF16_LAYERS", default_value_t = 16)]
        max_bf16_layers: usize,
        /// Precisions to run, comma separated (FP8 is skipped on GPUs without it).
        #[arg(long, value_delimiter = ',', default_value = "fp8,bf16")]
        dtype: Vec<String>,
        /// Timed repetitions per batch (after one warm-up).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Each fixture under DIR loaded by the device path and by the host path: every weight
    /// byte compared (the GPU's FP8 quantization against the CPU's).
    LoadParity {
        #[arg(default_value = "tests/fixtures")]
        dir: PathBuf,
    },
    /// Write a Llama-3.1-70B-shaped bf16 checkpoint of as many layers as the disk holds (at
    /// most --max-layers) under --dir, drop it from the page cache, time its on-device load
    /// in each precision and one layer by the host path; the directory is removed after.
    Load {
        #[arg(long, env = "GPU_BENCH_LOAD_DIR", default_value = "/tmp/scorestream-load-check")]
        dir: PathBuf,
        #[arg(long, env = "GPU_BENCH_LOAD_MAX_LAYERS", default_value_t = 12)]
        max_layers: usize,
    },
    /// Two stages on one GPU against one stage (scores of the fixtures under DIR), and the hop
    /// of a 70B-shape 16k-token batch timed against one layer and the host round trip.
    Hop {
        #[arg(default_value = "tests/fixtures")]
        dir: PathBuf,
    },
    /// Write every kernel's CUBIN and its manifest for ARCH under OUT (no GPU needed); point
    /// SCORESTREAM_PREBUILT_KERNELS at OUT to load them instead of compiling.
    Kernels {
        #[arg(long, default_value = "sm_90a")]
        arch: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The environment before any GPU is opened, then the GPU and its memory.
fn probe() -> Result<()> {
    use scorestream::engine::cuda::probe::{environment, Library};
    let env = environment();
    let v = |v: Option<(i32, i32)>| v.map_or("null".to_owned(), |(a, b)| json_str(&format!("{a}.{b}")));
    // The NVRTC this machine offers, even when prebuilt kernels make it unnecessary.
    let (nvrtc, nvrtc_path) = match scorestream::engine::cuda::nvrtc::global() {
        Ok(n) => (json_str(&format!("{}.{}", n.version.0, n.version.1)), json_str(&n.path.display().to_string())),
        Err(e) => ("null".to_owned(), json_str(&e.to_string())),
    };
    let loaded: Vec<String> = env.loaded.iter().map(|p| json_str(&p.display().to_string())).collect();
    println!(
        r#"{{"kind":"env","driver_cuda":{},"nvrtc":{nvrtc},"nvrtc_path":{nvrtc_path},"cublaslt":{},"loaded":[{}]}}"#,
        v(env.driver),
        env.cublaslt.map_or("null".to_owned(), |c| c.to_string()),
        loaded.join(",")
    );
    if !Library::Driver.present() {
        bail!("no CUDA driver (libcuda) on this machine");
    }
    let dev = open()?;
    let (free, total) = dev.ctx.mem_get_info()?;
    let loaded: Vec<String> = scorestream::engine::cuda::probe::loaded_cuda_libraries().iter().map(|p| json_str(&p.display().to_string())).collect();
    println!(
        r#"{{"kind":"memory","free_bytes":{free},"total_bytes":{total},"kernels":{},"loaded":[{}]}}"#,
        json_str(&format!("{:?}", dev.origin)),
        loaded.join(",")
    );
    Ok(())
}

/// GPU 0, opened for the best precision it has (FP8 from sm_89, else bf16).
fn open() -> Result<GpuDevice> {
    use scorestream::engine::cuda::precision::choose;
    let cache = scorestream::engine::cuda::compile::default_cache_dir();
    let facts = scorestream::engine::cuda::probe::gpu_facts(&[0])?;
    let precision = choose(scorestream::model::Dtype::Auto, &facts)?;
    let dev = GpuDevice::open(0, &cache, precision)?;
    println!(
        r#"{{"kind":"device","name":{},"capability":"{}.{}","arch":"{}","sms":{},"precision":"{}","kernels":{}}}"#,
        json_str(&dev.name),
        dev.capability.0,
        dev.capability.1,
        dev.arch,
        dev.sm_count,
        precision.dtype(),
        json_str(&format!("{:?}", dev.origin))
    );
    Ok(dev)
}

/// The precisions `names` asks for that `dev` can run.
fn precisions(dev: &GpuDevice, names: &[String]) -> Result<Vec<Precision>> {
    let mut out = Vec::new();
    for n in names {
        match n.as_str() {
            "fp8" if has_fp8(dev) => out.push(Precision::Fp8),
            "fp8" => println!(r#"{{"kind":"note","text":"no FP8 on {} (sm_{}{}): fp8 skipped"}}"#, dev.name, dev.capability.0, dev.capability.1),
            "bf16" => out.push(Precision::Bf16),
            other => bail!("unknown precision {other:?} (fp8, bf16)"),
        }
    }
    Ok(out)
}

fn write_kernels(arch: &str, out: &std::path::Path) -> Result<()> {
    let m = scorestream::engine::cuda::prebuilt::write(arch, out)?;
    for k in &m.kernels {
        println!(
            r#"{{"kind":"cubin","kernel":"{}","arch":"{arch}","registers":{},"spill_stores":{},"spill_loads":{},"nvrtc":"{}"}}"#,
            k.name, k.registers, k.spill_stores, k.spill_loads, m.nvrtc
        );
    }
    eprintln!("wrote {} ({} bytes, NVRTC {} from {})", out.join(format!("kernels-{arch}.cubin")).display(), m.cubin_bytes, m.nvrtc, m.nvrtc_path);
    Ok(())
}

fn main() -> Result<()> {
    // Usage errors and --help end here, before any CUDA library is loaded.
    let cli = Cli::parse();
    // The engine's start-up line (driver, NVRTC, cuBLASLt, library files) goes to stderr.
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
    if let Some(dir) = std::env::var_os("SCORESTREAM_NVRTC_LIB") {
        preload_from(&PathBuf::from(dir));
    }
    match cli.command {
        Cmd::Probe => probe()?,
        Cmd::Kernels { arch, out } => write_kernels(&arch, &out)?,
        Cmd::Check => {
            if !check(&open()?)? {
                bail!("some kernels differ from their CPU reference");
            }
        }
        Cmd::Gemm => {
            let dev = open()?;
            perf::gemm_bench(&dev, &precisions(&dev, &["fp8".into(), "bf16".into()])?)?
        }
        Cmd::Time => {
            let dev = open()?;
            perf::kernel_times(&dev, has_fp8(&dev))?
        }
        Cmd::Layers { max_layers, max_bf16_layers, reps, dtype } => {
            let dev = open()?;
            for p in precisions(&dev, &dtype)? {
                let most = if p == Precision::Bf16 { max_bf16_layers } else { max_layers };
                perf::layers_bench(&dev, p, most, reps)?;
            }
        }
        Cmd::LoadParity { dir } => {
            let dev = open()?;
            let all = precisions(&dev, &["fp8".into(), "bf16".into()])?;
            drop(dev);
            if !load::load_parity(&dir, &all)? {
                bail!("the device load differs from the host load");
            }
        }
        Cmd::Load { dir, max_layers } => {
            let dev = open()?;
            let all = precisions(&dev, &["fp8".into(), "bf16".into()])?;
            drop(dev);
            load::load_bench(&dir, max_layers, &all)?;
        }
        Cmd::Hop { dir } => {
            let dev = open()?;
            let p = precisions(&dev, &["fp8".into(), "bf16".into()])?.first().copied().unwrap_or(Precision::Bf16);
            if !load::hop_bench(&dev, &dir, p)? {
                bail!("hidden states changed on a device hop");
            }
        }
        Cmd::Parity { dir } => {
            let dev = open()?;
            let all = precisions(&dev, &["fp8".into(), "bf16".into()])?;
            drop(dev);
            if !parity(&dir, &all)? {
                bail!("the CUDA stage differs from the CPU stage");
            }
        }
    }
    Ok(())
}
