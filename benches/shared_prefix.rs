//! Shared-prefix scoring on the CPU: the same conversations scored with their common prefix
//! computed once per batch (`Engine::with_min_shared_prefix`) and computed whole, side by side.
//!
//! `cargo bench --bench shared_prefix [-- --reps N --shapes arith,qwen --workloads bon,system]`
//! (defaults: 3 repetitions, the best kept; every shape and workload). Two workloads on two model shapes with
//! random f32 weights written to a temporary directory:
//! - best-of-8: one batch of 8 candidates, a 1,000-token prompt and 300-token answers each;
//! - system prompt: one batch of 32 conversations, a 1,500-token system prompt and 200 tokens each;
//! - shapes: the trained `arith` fixture's (hidden 128, 4 layers, 4 heads) with room for the
//!   lengths, and Qwen2.5-0.5B's layer sizes (hidden 896, 14 query / 2 K/V heads, MLP 4,864,
//!   q/k/v bias) with 2 layers.
//!
//! Prints sequences/s both ways, the speed-up, the tokens computed and the share of the forward
//! pass's FLOPs saved, and the largest reward difference between the two (they must agree).
//! Under `cargo test --all-targets` it runs once on tiny lengths as a smoke test.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use scorestream::batch::policy::BatchLimits;
use scorestream::engine::Engine;
use scorestream::model::{Dtype, ModelOptions};

struct Shape {
    name: &'static str,
    key: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    bias: bool,
}

const VOCAB: usize = 1024;

fn write_checkpoint(dir: &Path, s: &Shape) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let rand = |shape: &[usize]| Tensor::randn(0f32, 0.05, shape, &dev);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rand(&[VOCAB, s.hidden])?);
    t.insert("model.norm.weight".into(), Tensor::ones(s.hidden, DType::F32, &dev)?);
    t.insert("score.weight".into(), rand(&[1, s.hidden])?);
    let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        for (n, out, inp) in [("q_proj", q, s.hidden), ("k_proj", kv, s.hidden), ("v_proj", kv, s.hidden), ("o_proj", s.hidden, q)] {
            t.insert(format!("{p}.self_attn.{n}.weight"), rand(&[out, inp])?);
            if s.bias && n != "o_proj" {
                t.insert(format!("{p}.self_attn.{n}.bias"), rand(&[out])?);
            }
        }
        for (n, out, inp) in [("gate_proj", s.inter, s.hidden), ("up_proj", s.inter, s.hidden), ("down_proj", s.hidden, s.inter)] {
            t.insert(format!("{p}.mlp.{n}.weight"), rand(&[out, inp])?);
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{n}.weight"), Tensor::ones(s.hidden, DType::F32, &dev)?);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    let (arch, model_type) = if s.bias { ("Qwen2ForSequenceClassification", "qwen2") } else { ("LlamaForSequenceClassification", "llama") };
    let config = serde_json::json!({
        "architectures": [arch], "model_type": model_type, "hidden_size": s.hidden,
        "intermediate_size": s.inter, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim, "vocab_size": VOCAB,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "num_labels": 1, "pad_token_id": 0,
        "torch_dtype": "float32", "rope_theta": 10000.0});
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok(())
}

/// Deterministic token ids in `1..VOCAB`.
fn tokens(seed: usize, n: usize) -> Vec<u32> {
    (0..n).map(|i| 1 + ((seed * 7919 + i * 104_729 + i * i * 31) % (VOCAB - 1)) as u32).collect()
}

/// `members` sequences: a shared `prefix`-token prefix, then `own` tokens each, the first of
/// which differs between members.
fn workload(members: usize, prefix: usize, own: usize) -> Vec<Vec<u32>> {
    let p = tokens(1, prefix);
    (0..members)
        .map(|m| {
            let mut s = p.clone();
            s.push(1 + m as u32);
            s.extend(tokens(100 + m, own - 1));
            s
        })
        .collect()
}

/// FLOPs of a forward pass over `seqs` (matrix products and attention; what sharing saves).
fn flops(s: &Shape, seqs: &[(usize, usize)]) -> f64 {
    let (q, kv) = ((s.heads * s.head_dim) as f64, (s.kv_heads * s.head_dim) as f64);
    let h = s.hidden as f64;
    let per_token = 2.0 * (2.0 * h * q + 2.0 * h * kv + 3.0 * h * s.inter as f64);
    // (queries, keys before them): each query attends to `keys + its index + 1` keys.
    let attn: f64 = seqs.iter().map(|&(n, before)| (0..n).map(|i| 4.0 * q * (before + i + 1) as f64).sum::<f64>()).sum();
    s.layers as f64 * (per_token * seqs.iter().map(|p| p.0).sum::<usize>() as f64 + attn)
}

/// Seconds per batch (best of `reps`), and the scores.
fn time(engine: &Engine, batch: &[Vec<u32>], reps: usize) -> anyhow::Result<(f64, Vec<f32>)> {
    let mut best = f64::INFINITY;
    let mut rewards = Vec::new();
    for _ in 0..reps {
        let started = Instant::now();
        rewards = engine.score_blocking(batch.to_vec())?.into_iter().map(|s| s.reward).collect();
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok((best, rewards))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let benchmarking = args.iter().any(|a| a == "--bench");
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let (scale, mut reps) = if benchmarking { (1, 3) } else { (20, 1) };
    if let Some(r) = opt("--reps") {
        reps = r.parse()?;
    }
    let shapes_wanted = opt("--shapes").unwrap_or_else(|| "arith,qwen".into());
    let workloads_wanted = opt("--workloads").unwrap_or_else(|| "bon,system".into());
    let shapes = [
        Shape { name: "arith-shaped", key: "arith", hidden: 128, layers: 4, heads: 4, kv_heads: 4, head_dim: 32, inter: 256, bias: false },
        Shape { name: "Qwen2.5-0.5B-shaped", key: "qwen", hidden: 896, layers: 2, heads: 14, kv_heads: 2, head_dim: 64, inter: 4864, bias: true },
    ];
    let workloads = [("bon", "best-of-8, 1,000 + 300", 8, 1000 / scale, 300 / scale), ("system", "32 events, 1,500 + 200", 32, 1500 / scale, 200 / scale)];
    if !benchmarking {
        println!("smoke run (not `--bench`): every length below divided by {scale}");
    }
    println!("| workload | model | sequences/s whole | sequences/s shared | speed-up | tokens whole → shared | FLOPs saved | max |Δ reward| |");
    println!("|---|---|---|---|---|---|---|---|");
    for shape in shapes.iter().filter(|s| shapes_wanted.split(',').any(|w| w == s.key)) {
        let dir = tempfile::tempdir()?;
        write_checkpoint(dir.path(), shape)?;
        let mut opts = ModelOptions::new(dir.path());
        opts.dtype = Dtype::F32;
        let limits = BatchLimits { max_tokens: 65_536, max_events: 256 };
        let whole = Engine::start_with_limits(&opts, limits)?;
        let shared = whole.clone().with_min_shared_prefix(128 / scale);
        for (key, name, members, prefix, own) in workloads {
            if !workloads_wanted.split(',').any(|w| w == key) {
                continue;
            }
            let batch = workload(members, prefix, own);
            whole.score_blocking(batch[..1].to_vec())?; // warm-up
            let (t_whole, r_whole) = time(&whole, &batch, reps)?;
            let (t_shared, r_shared) = time(&shared, &batch, reps)?;
            let diff = r_whole.iter().zip(&r_shared).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let n = batch.len() as f64;
            let tokens_whole = members * (prefix + own);
            let tokens_shared = prefix + members * own;
            let f_whole = flops(shape, &vec![(prefix + own, 0); members]);
            let mut parts = vec![(prefix, 0)];
            parts.extend(std::iter::repeat_n((own, prefix), members));
            let f_shared = flops(shape, &parts);
            println!(
                "| {name} | {} | {:.2} | {:.2} | {:.2}× | {tokens_whole} → {tokens_shared} | {:.0} % | {diff:.1e} |",
                shape.name,
                n / t_whole,
                n / t_shared,
                t_whole / t_shared,
                100.0 * (1.0 - f_shared / f_whole)
            );
        }
    }
    Ok(())
}
