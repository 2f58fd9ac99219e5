//! CPU throughput of the engine on a fixture model, with 1, 2 and 3 pipelined stages.
//!
//! `cargo bench --bench cpu_throughput -- [MODEL_DIR] [--dtype f32|bf16|fp8] [--repeat N]`
//!
//! The token sequences are the fixture's own (`reference.json`, the ids transformers produced
//! for `tests/fixtures/conversations.jsonl`), repeated to fill batches. Prints tokens/s, and per
//! stage the busy seconds and the idle share (the pipeline bubble). `bench/transformers_cpu.py`
//! times transformers on the same ids for the side-by-side ratio (`bench/cpu_compare.sh`).

use std::path::PathBuf;
use std::time::Instant;

use scorestream::batch::policy::{pack, BatchLimits};
use scorestream::engine::Engine;
use scorestream::model::{Dtype, ModelOptions};

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this once as a smoke test.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut model = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/arith"));
    let (mut dtype, mut repeat) = (Dtype::F32, if benchmarking { 64usize } else { 1 });
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dtype" => dtype = clap::ValueEnum::from_str(it.next().map_or("f32", |s| s), true).map_err(anyhow::Error::msg)?,
            "--repeat" => repeat = it.next().map_or(Ok(64), |s| s.parse())?,
            other => model = PathBuf::from(other),
        }
    }
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("reference.json"))?)?;
    let base: Vec<Vec<u32>> = reference["events"]
        .as_array()
        .map(|evs| evs.iter().filter_map(|e| serde_json::from_value(e["input_ids"].clone()).ok()).collect())
        .unwrap_or_default();
    anyhow::ensure!(!base.is_empty(), "no input_ids in {}/reference.json", model.display());
    let seqs: Vec<Vec<u32>> = base.iter().cycle().take(base.len() * repeat).cloned().collect();
    let tokens: usize = seqs.iter().map(Vec::len).sum();
    let limits = BatchLimits { max_tokens: 4096, max_events: 256 };
    let batches: Vec<Vec<Vec<u32>>> = pack(&seqs.iter().map(Vec::len).collect::<Vec<_>>(), &limits)
        .into_iter()
        .map(|r| seqs[r].to_vec())
        .collect();
    println!("model {} dtype {dtype}: {} sequences, {tokens} tokens, {} batches", model.display(), seqs.len(), batches.len());
    println!("{:>7} {:>12} {:>10}  per-stage busy s (idle %)", "stages", "tokens/s", "wall s");
    for stages in 1..=3 {
        let mut opts = ModelOptions::new(&model);
        opts.dtype = dtype;
        opts.devices = vec!["cpu".to_owned(); stages];
        let engine = Engine::start(&opts)?;
        engine.score_blocking(batches[0].clone())?; // warm-up
        let before = engine.stage_busy_seconds();
        let started = Instant::now();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        // Several batches in flight so that the stages overlap.
        rt.block_on(async {
            let jobs = batches.iter().cloned().map(|b| engine.score(b));
            futures::future::try_join_all(jobs).await
        })?;
        let wall = started.elapsed().as_secs_f64();
        let busy: Vec<String> = engine
            .stage_busy_seconds()
            .iter()
            .zip(&before)
            .map(|(b, a)| format!("{:.3} ({:.0}%)", b - a, 100.0 * (1.0 - (b - a) / wall)))
            .collect();
        println!("{stages:>7} {:>12.0} {wall:>10.3}  {}", tokens as f64 / wall, busy.join("  "));
    }
    Ok(())
}
