//! `gpu_bench check`: every kernel and both GEMMs against their CPU references
//! (src/engine/reference) on fresh random inputs, outputs poisoned with 0xFF (NaN) first.

use anyhow::Result;
use half::bf16;
use scorestream::engine::cuda::device::GpuDevice;
use scorestream::engine::cuda::gemm::Gemm;
use scorestream::engine::cuda::launch::AttentionKernel;
use scorestream::engine::cuda::precision::GpuFacts;
use scorestream::engine::reference::attention::AttnShape;
use scorestream::engine::reference::{fp8, kernels as r};

use crate::perf::Rng;

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
pub(crate) fn has_fp8(dev: &GpuDevice) -> bool {
    GpuFacts { ordinal: 0, name: dev.name.clone(), major: dev.capability.0, minor: dev.capability.1 }.has_fp8()
}

pub(crate) fn check(dev: &GpuDevice) -> Result<bool> {
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
