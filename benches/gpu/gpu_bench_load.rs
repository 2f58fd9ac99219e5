//! The GPU check of the on-device load and the device hops:
//! - `load-parity DIR`: each fixture loaded by the device path and by the host path, every
//!   weight byte compared (the FP8 quantization on the GPU against the CPU's, bit for bit);
//! - `load`: a Llama-3.1-70B-shaped bf16 checkpoint of as many layers as the disk holds (up to
//!   `--max-layers`), written to a scratch directory, dropped from the page cache, then loaded
//!   on the device (FP8 and bf16) and one layer by the host path: seconds and GB/s;
//! - `hop`: two stages on one GPU, the engine's scores against one stage's (bit for bit), and
//!   the 70B-shape hop of a 16k-token batch timed against one layer and the old host round trip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use scorestream::engine::cuda::device::GpuDevice;
use scorestream::engine::cuda::gemm::Gemm;
use scorestream::engine::cuda::hop::{HopKind, Inbox, Outbox};
use scorestream::engine::cuda::layer::{forward, LayerConfig, LayerWeights, Workspace};
use scorestream::engine::cuda::plan::LayerShape;
use scorestream::engine::cuda::precision::Precision;
use scorestream::engine::cuda::stage::{CudaStage, LoadPath};
use scorestream::model::options::AttentionKernel;
use scorestream::model::weights::{Vb, Weights};

use crate::perf::{batch, json_str, time_ms, Rng};

/// Every byte of a stage's device weights, in a fixed order.
fn weight_bytes(stage: &CudaStage) -> Result<Vec<u8>> {
    let dev = stage.device();
    let mut out = Vec::new();
    for (_, w) in stage.layer_weights() {
        let bufs = w.w.iter().chain(&w.scale).chain(w.bias.iter().flatten()).chain([&w.norm1, &w.norm2]);
        let heads = w.qk_norm.iter().flat_map(|(q, k)| [q, k]);
        for b in bufs.chain(w.norm1_bias.iter()).chain(w.norm2_bias.iter()).chain(heads) {
            out.extend(dev.download::<u8>(b.ptr, b.bytes)?);
        }
    }
    if let Some(t) = stage.embedding() {
        out.extend(dev.download::<u8>(t.ptr, t.bytes)?);
    }
    Ok(out)
}

/// Each fixture under `dir` loaded both ways in each of `precisions`; `false` when a byte differs.
pub fn load_parity(dir: &Path, precisions: &[Precision]) -> Result<bool> {
    let mut ok = true;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.sort();
    for dir in dirs.into_iter().filter(|d| d.join("config.json").is_file()) {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let cfg = scorestream::model::ArchConfig::from_dir(&dir)?;
        let vb = Vb::new(Arc::new(Weights::open(&dir)?), candle_core::DType::F32, candle_core::Device::Cpu);
        for &p in precisions {
            let label = format!("{p:?}").to_lowercase();
            let load = |path| CudaStage::load(path, 0, &vb, &cfg, 0..cfg.num_layers, 0, None, p, 64, 4, AttentionKernel::default());
            let (device, host) = match (load(LoadPath::Device), load(LoadPath::Host)) {
                (Ok(d), Ok(h)) => (d, h),
                (Err(e), _) | (_, Err(e)) => {
                    println!(r#"{{"kind":"load_parity","fixture":"{name}","precision":"{label}","skipped":{}}}"#, json_str(&e.to_string()));
                    continue;
                }
            };
            let on_device = device.load_stats.is_some();
            let (a, b) = (weight_bytes(&device)?, weight_bytes(&host)?);
            let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len());
            // An FP8 checkpoint's codes go up as stored on the device path, while the host path
            // dequantizes and quantizes them again: compared, not gated.
            let gated = cfg.quantization_config.is_none();
            let pass = differ == 0 || !gated;
            ok &= pass;
            println!(
                r#"{{"kind":"load_parity","fixture":"{name}","precision":"{label}","on_device":{on_device},"bytes":{},"differing_bytes":{differ},"gated":{gated},"pass":{pass}}}"#,
                a.len()
            );
        }
    }
    Ok(ok)
}

/// bf16 values uniform in ±0.03 (a trained layer's range), `n` of them, as bytes.
fn random_bf16(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    (0..n).flat_map(|_| half::bf16::from_f32((2.0 * rng.next() - 1.0) * 0.03).to_le_bytes()).collect()
}

/// Write one safetensors file of `tensors` (name, shape); bf16 data cycled from `block` (ones
/// for 1-D norms).
fn write_shard(path: &Path, tensors: &[(String, Vec<usize>)], block: &[u8]) -> Result<u64> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(name.clone(), serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut f = std::io::BufWriter::with_capacity(16 << 20, std::fs::File::create(path)?);
    f.write_all(&(text.len() as u64).to_le_bytes())?;
    f.write_all(text.as_bytes())?;
    let one = half::bf16::ONE.to_le_bytes();
    for (i, (_, shape)) in tensors.iter().enumerate() {
        let mut left = shape.iter().product::<usize>() * 2;
        if shape.len() == 1 {
            for _ in 0..left / 2 {
                f.write_all(&one)?;
            }
            continue;
        }
        let mut at = (i * 4099 * 2) % block.len();
        while left > 0 {
            let n = left.min(block.len() - at);
            f.write_all(&block[at..at + n])?;
            left -= n;
            at = 0;
        }
    }
    let f = f.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    Ok(8 + text.len() as u64 + offset as u64)
}

/// Ask the kernel to drop `dir`'s files from the page cache (`posix_fadvise(DONTNEED)` after
/// they were synced), so the load reads the disk. Returns whether it worked.
fn drop_cache(dir: &Path) -> bool {
    let script = "import os,sys\nfor n in os.listdir(sys.argv[1]):\n fd=os.open(os.path.join(sys.argv[1],n),os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED); os.close(fd)";
    std::process::Command::new("python3").args(["-c", script]).arg(dir).status().is_ok_and(|s| s.success())
}

/// Free bytes of the file system holding `dir` (`df`).
fn disk_free(dir: &Path) -> Result<u64> {
    let out = std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(dir).output().context("df")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1).and_then(|l| l.trim().parse().ok()).with_context(|| format!("df said {text:?}"))
}

/// A 70B-shaped LlamaForSequenceClassification checkpoint of `layers` layers under `dir`: one
/// shard per layer, one for the embedding, final norm and score head. Returns its bytes.
fn write_checkpoint(dir: &Path, layers: usize, s: LayerShape, vocab: usize) -> Result<u64> {
    let (h, kv) = (s.hidden, s.kv_heads * s.head_dim);
    let config = serde_json::json!({
        "architectures": ["LlamaForSequenceClassification"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": s.inter, "num_hidden_layers": layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "vocab_size": vocab, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 500000.0, "tie_word_embeddings": false,
        "num_labels": 1
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    let block = random_bf16((32 << 20).min(vocab * h), 77);
    let mut map = serde_json::Map::new();
    let mut total = 0;
    let head = vec![
        ("model.embed_tokens.weight".to_owned(), vec![vocab, h]),
        ("model.norm.weight".to_owned(), vec![h]),
        ("score.weight".to_owned(), vec![1, h]),
    ];
    let mut shards = vec![("model-head.safetensors".to_owned(), head)];
    for i in 0..layers {
        let p = |n: &str| format!("model.layers.{i}.{n}.weight");
        shards.push((format!("model-{i:05}.safetensors"), vec![
            (p("input_layernorm"), vec![h]),
            (p("post_attention_layernorm"), vec![h]),
            (p("self_attn.q_proj"), vec![s.attn_width(), h]),
            (p("self_attn.k_proj"), vec![kv, h]),
            (p("self_attn.v_proj"), vec![kv, h]),
            (p("self_attn.o_proj"), vec![h, s.attn_width()]),
            (p("mlp.gate_proj"), vec![s.inter, h]),
            (p("mlp.up_proj"), vec![s.inter, h]),
            (p("mlp.down_proj"), vec![h, s.inter]),
        ]));
    }
    for (file, tensors) in &shards {
        total += write_shard(&dir.join(file), tensors, &block)?;
        for (name, _) in tensors {
            map.insert(name.clone(), serde_json::Value::from(file.as_str()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    Ok(total)
}

/// Write the checkpoint, then time its loads; the directory is removed at the end.
pub fn load_bench(dir: &Path, max_layers: usize, precisions: &[Precision]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let result = load_bench_in(dir, max_layers, precisions);
    let _ = std::fs::remove_dir_all(dir);
    result
}

fn load_bench_in(dir: &Path, max_layers: usize, precisions: &[Precision]) -> Result<()> {
    let s = LayerShape::LLAMA_70B;
    let layer_disk = s.linear_params() * 2;
    let free = disk_free(dir)?;
    // Keep 6 GiB of the disk for everything else; the embedding takes 2.1 GB.
    let fit = (free.saturating_sub((6 << 30) + 128_256 * 8192 * 2) / layer_disk as u64) as usize;
    let layers = fit.min(max_layers);
    if layers < 2 {
        bail!("{free} bytes free on the disk of {}: not enough for two 70B layers", dir.display());
    }
    let t = Instant::now();
    let bytes = write_checkpoint(dir, layers, s, 128_256)?;
    let write_s = t.elapsed().as_secs_f64();
    println!(
        r#"{{"kind":"load_checkpoint","layers":{layers},"fit":{fit},"bytes":{bytes},"disk_free":{free},"write_seconds":{write_s:.1},"write_gb_per_s":{:.2}}}"#,
        bytes as f64 / 1e9 / write_s
    );
    let cfg = scorestream::model::ArchConfig::from_dir(dir)?;
    let vb = Vb::new(Arc::new(Weights::open(dir)?), candle_core::DType::F32, candle_core::Device::Cpu);
    let runs: Vec<(LoadPath, Precision, std::ops::Range<usize>)> = precisions
        .iter()
        .map(|&p| (LoadPath::Device, p, 0..layers))
        .chain(precisions.first().map(|&p| (LoadPath::Host, p, 1..2)))
        .collect();
    for (path, p, range) in runs {
        let cold = drop_cache(dir);
        let t = Instant::now();
        let stage = CudaStage::load(path, 0, &vb, &cfg, range.clone(), 0, None, p, 4096, 16, AttentionKernel::default())?;
        let seconds = t.elapsed().as_secs_f64();
        let read: usize = match &stage.load_stats {
            Some(st) => st.read_bytes,
            None => range.clone().map(|i| vb.weights.names().filter(|n| n.starts_with(&format!("model.layers.{i}."))).map(|n| vb.weights.nbytes(n)).sum::<usize>()).sum(),
        };
        let (read_s, wait_s) = stage.load_stats.as_ref().map_or((0.0, 0.0), |st| (st.read_seconds, st.wait_seconds));
        println!(
            r#"{{"kind":"load","path":"{}","precision":"{}","layers":{},"read_bytes":{read},"seconds":{seconds:.2},"gb_per_s":{:.2},"reader_seconds":{read_s:.2},"upload_wait_seconds":{wait_s:.2},"page_cache_dropped":{cold}}}"#,
            if path == LoadPath::Device { "device" } else { "host" },
            p.dtype(),
            range.len(),
            read as f64 / 1e9 / seconds
        );
    }
    Ok(())
}

/// Two stages on one GPU: the engine's scores against one stage's on each fixture, then the
/// hop of a 70B-shape 16k-token batch against one layer and against the host round trip.
pub fn hop_bench(dev: &GpuDevice, fixtures: &Path, precision: Precision) -> Result<bool> {
    let ok = hop_parity(fixtures)?;
    let s = LayerShape::LLAMA_70B;
    let tokens = 16_384usize;
    let bytes = tokens * s.hidden * 2;
    let mut ws = Workspace::new(dev, &s, tokens, tokens / 512 + 1, &[1.0f32; 64], precision)?;
    let cu = batch(tokens, &mut Rng(99));
    ws.set_batch(dev, &cu)?;
    let x = ws.at(ws.plan.x);
    dev.fill_uniform(false, x, tokens * s.hidden, 5, 1.0)?;
    let layer = LayerWeights::random(dev, &s, 3, precision)?;
    let mut gemm = Gemm::new(dev)?;
    let cfg = LayerConfig::llama(s);
    let layer_ms = time_ms(dev, 1, 5, || Ok(forward(dev, &mut gemm, &cfg, &layer, &ws, false)?))?;
    // The receiving stage: a second context on the same GPU, as the engine opens one per stage.
    let cache = scorestream::engine::cuda::compile::default_cache_dir();
    let other = GpuDevice::open(0, &cache, precision)?;
    let inbox = Inbox::new(&other, bytes, HopKind::SameDevice { ordinal: 0 })?;
    let mut outbox = Outbox::attach(dev, inbox.clone())?;
    let dst = other.alloc(bytes)?;
    let hop_ms = time_ms(dev, 2, 20, || {
        let a = outbox.send(dev, x, tokens, bytes)?;
        inbox.take(&other, &a, dst.ptr)?;
        Ok(())
    })?;
    other.sync()?;
    let same = dev.download::<u16>(x, 1 << 20)? == other.download::<u16>(dst.ptr, 1 << 20)?;
    // The path the hop replaces: download, bf16 → f32 → bf16 on the host, upload.
    let t = Instant::now();
    let bits = dev.download::<u16>(x, tokens * s.hidden)?;
    let v: Vec<f32> = bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
    let back: Vec<u16> = v.iter().map(|&f| half::bf16::from_f32(f).to_bits()).collect();
    other.upload(dst.ptr, &back)?;
    let host_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        r#"{{"kind":"hop","hop":"same_device","tokens":{tokens},"bytes":{bytes},"hop_ms":{hop_ms:.3},"gb_per_s":{:.1},"layer_ms":{layer_ms:.3},"hop_per_layer":{:.4},"host_round_trip_ms":{host_ms:.1},"exact":{same},"precision":"{}"}}"#,
        bytes as f64 / 1e6 / hop_ms,
        hop_ms / layer_ms,
        precision.dtype()
    );
    Ok(ok && same)
}

/// The engine on two stages of one GPU against one stage, fixture by fixture: same scores.
fn hop_parity(fixtures: &Path) -> Result<bool> {
    use scorestream::engine::Engine;
    use scorestream::model::ModelOptions;
    let mut ok = true;
    for name in ["arith", "llama_seqcls"] {
        let dir = fixtures.join(name);
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
        let seqs: Vec<Vec<u32>> = reference["events"]
            .as_array()
            .map(|evs| evs.iter().filter_map(|e| serde_json::from_value(e["input_ids"].clone()).ok()).collect())
            .unwrap_or_default();
        let score = |devices: &[&str]| -> Result<Vec<f32>> {
            let opts = ModelOptions { devices: devices.iter().map(|d| d.to_string()).collect(), ..ModelOptions::new(dir.clone()) };
            let engine = Engine::start(&opts)?;
            // Several batches (within the default limits of 256 sequences), so both input
            // slots are used and reused.
            let mut out = Vec::new();
            for batch in seqs.chunks(16).take(8) {
                out.extend(engine.score_blocking(batch.to_vec())?.iter().map(|s| s.reward));
            }
            Ok(out)
        };
        match (score(&["cuda:0"]), score(&["cuda:0", "cuda:0"])) {
            (Ok(one), Ok(two)) => {
                let diff = one.iter().zip(&two).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let pass = diff == 0.0 && one.len() == two.len() && one.iter().all(|v| v.is_finite());
                ok &= pass;
                println!(r#"{{"kind":"hop_parity","fixture":"{name}","stages":"cuda:0,cuda:0","seqs":{},"max_abs_diff":{diff:.3e},"pass":{pass}}}"#, one.len());
            }
            (Err(e), _) | (_, Err(e)) => {
                ok = false;
                println!(r#"{{"kind":"hop_parity","fixture":"{name}","error":{},"pass":false}}"#, json_str(&format!("{e:#}")));
            }
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checkpoint the load step writes reads back through the engine's own loader: config,
    /// index, shards, shapes and bytes (a small shape here; the step writes the 70B one).
    #[test]
    fn the_written_checkpoint_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = LayerShape { hidden: 64, heads: 4, kv_heads: 2, head_dim: 16, inter: 128, gated: true };
        let bytes = write_checkpoint(dir.path(), 3, s, 100).unwrap();
        let cfg = scorestream::model::ArchConfig::from_dir(dir.path()).unwrap();
        assert_eq!((cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.num_kv_heads), (3, 64, 100, 2));
        let w = Weights::open(dir.path()).unwrap();
        assert_eq!(w.files.len(), 4);
        let on_disk: usize = w.names().map(|n| w.nbytes(n)).sum();
        assert!(bytes as usize > on_disk, "{bytes} vs {on_disk}");
        assert_eq!(w.info("model.layers.2.mlp.down_proj.weight").unwrap(), (vec![64, 128], "BF16".to_owned()));
        let mut r = scorestream::model::weights::ShardReader::new(&w);
        let norm = r.bytes("model.layers.1.input_layernorm.weight", 0, 128).unwrap().to_vec();
        assert!(norm.chunks(2).all(|b| half::bf16::from_le_bytes([b[0], b[1]]) == half::bf16::ONE));
        let q = r.bytes("model.layers.0.self_attn.q_proj.weight", 0, 64 * 64 * 2).unwrap();
        let vals: Vec<f32> = q.chunks(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        let most = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(most <= 0.0302 && most > 0.01, "{most}");
        // The CPU model loads it (so the host path and the parity of the step can too).
        let vb = Vb::new(Arc::new(w), candle_core::DType::F32, candle_core::Device::Cpu);
        scorestream::model::stage::Stage::load(&vb, &cfg, 0..3, 0, None).expect("the CPU stage loads the checkpoint");
    }
}
