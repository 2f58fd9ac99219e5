//! FP8 checkpoints and the stage pipeline: `scorestream quantize` output loads back and scores
//! like quantize-at-load, quantizing a sharded checkpoint keeps peak memory near one shard, and a
//! batch refused for one of its sequences (a token outside the vocabulary) fails only that batch.

mod common_fixtures;

use std::path::Path;
use std::process::Command;

use common_fixtures::{fixture_names, Reference};
use scorestream::engine::{Engine, EngineError};
use scorestream::model::{Dtype, ModelOptions};

fn options(dir: &Path, dtype: Dtype, devices: &[&str]) -> ModelOptions {
    let mut o = ModelOptions::new(dir);
    o.dtype = dtype;
    o.devices = devices.iter().map(|d| d.to_string()).collect();
    o
}

fn rewards(engine: &Engine, ids: &[Vec<u32>]) -> Vec<f32> {
    engine.score_blocking(ids.to_vec()).unwrap().into_iter().map(|s| s.reward).collect()
}

#[test]
fn quantized_checkpoints_score_like_quantize_at_load() {
    for name in fixture_names() {
        let src = common_fixtures::dir(&name);
        if src.join("config.json").exists() && std::fs::read_to_string(src.join("config.json")).unwrap().contains("quantization_config") {
            continue; // already FP8
        }
        let ids: Vec<Vec<u32>> = Reference::load(&name).events.into_iter().map(|e| e.input_ids).collect();
        let out = tempfile::tempdir().unwrap();
        scorestream::commands::quantize::quantize_dir(&src, out.path()).unwrap();
        let at_load = rewards(&Engine::start(&options(&src, Dtype::Fp8, &["cpu"])).unwrap(), &ids);
        let written = Engine::start(&options(out.path(), Dtype::F32, &["cpu"])).unwrap();
        assert_eq!(written.info().dtype, Dtype::Fp8, "{name}: an FP8 checkpoint runs in fp8");
        let from_disk = rewards(&written, &ids);
        for (a, b) in at_load.iter().zip(&from_disk) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{name}: {a} quantized at load vs {b} from disk");
        }
        let f32_rewards = rewards(&Engine::start(&options(&src, Dtype::F32, &["cpu"])).unwrap(), &ids);
        assert_ne!(f32_rewards, at_load, "{name}: fp8 must actually quantize");
    }
}

#[test]
fn a_refused_batch_names_its_sequence_and_later_batches_run() {
    let name = fixture_names().into_iter().next().expect("fixtures");
    let ids: Vec<Vec<u32>> = Reference::load(&name).events.into_iter().map(|e| e.input_ids).collect();
    let engine = Engine::start(&options(&common_fixtures::dir(&name), Dtype::F32, &["cpu", "cpu"])).unwrap();
    let good = rewards(&engine, &ids[..1]);
    // A token outside the vocabulary is refused before the stages run, naming its sequence (the
    // worker dead-letters that event alone); the stages check it too.
    let bad = engine.score_blocking(vec![ids[0].clone(), vec![u32::MAX]]).unwrap_err();
    assert!(matches!(bad, EngineError::Token { index: 1, .. }), "{bad}");
    assert!(bad.to_string().contains("outside the model's vocabulary"), "{bad}");
    assert_eq!(rewards(&engine, &ids[..1]), good, "the engine keeps working after a failed batch");
}

fn peak_rss_of_quantize(model: &Path, out: &Path) -> f64 {
    let output = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["quantize", "--model"])
        .arg(model)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    let mib = text.split("peak RSS ").nth(1).and_then(|t| t.split(' ').next()).and_then(|v| v.parse().ok());
    mib.unwrap_or_else(|| panic!("no peak RSS in {text:?}"))
}

#[test]
fn quantizing_a_sharded_checkpoint_holds_about_one_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let (small, big) = (tmp.path().join("small"), tmp.path().join("big"));
    std::fs::create_dir_all(&small).unwrap();
    std::fs::create_dir_all(&big).unwrap();
    common_fixtures::write_sharded_checkpoint(&small, 1, 64, 128);
    let shard = common_fixtures::write_sharded_checkpoint(&big, 8, 768, 2048) as f64 / (1 << 20) as f64;
    let total = shard * 8.0;
    let baseline = peak_rss_of_quantize(&small, &tmp.path().join("small-fp8"));
    let peak = peak_rss_of_quantize(&big, &tmp.path().join("big-fp8"));
    let growth = peak - baseline;
    println!("shard {shard:.1} MiB, checkpoint {total:.1} MiB, baseline {baseline:.1} MiB, peak {peak:.1} MiB");
    assert!(growth < 3.0 * shard, "peak RSS grew {growth:.1} MiB for {shard:.1} MiB shards");
    assert!(growth < total / 2.0, "peak RSS grew {growth:.1} MiB for a {total:.1} MiB checkpoint");
    // And the result loads.
    let engine = Engine::start(&options(&tmp.path().join("big-fp8"), Dtype::F32, &["cpu"])).unwrap();
    assert_eq!(engine.score_blocking(vec![vec![1, 2, 3]]).unwrap().len(), 1);
}

/// Rewards of the trained fixture's held-out conversations and the share of good/bad pairs it
/// ranks correctly.
fn arith_rewards(dtype: Dtype) -> (Vec<f32>, f64) {
    let reference = Reference::load("arith");
    let engine = Engine::start(&options(&common_fixtures::dir("arith"), dtype, &["cpu"])).unwrap();
    let ids: Vec<Vec<u32>> = reference.events.iter().map(|e| e.input_ids.clone()).collect();
    let rewards: Vec<f32> = ids.chunks(256).flat_map(|c| rewards(&engine, c)).collect();
    let ids: Vec<&str> = reference.events.iter().map(|e| e.id.as_str()).collect();
    let (mut right, mut pairs) = (0, 0);
    for (i, id) in ids.iter().enumerate() {
        if let Some(bad) = id.strip_suffix("-good").and_then(|q| ids.iter().position(|x| *x == format!("{q}-bad"))) {
            pairs += 1;
            right += usize::from(rewards[i] > rewards[bad]);
        }
    }
    (rewards, right as f64 / pairs as f64)
}

#[test]
fn fp8_keeps_the_trained_models_rankings() {
    let (f32_rewards, f32_acc) = arith_rewards(Dtype::F32);
    let (fp8_rewards, fp8_acc) = arith_rewards(Dtype::Fp8);
    let agreement = scorestream::commands::compare::agreement(&f32_rewards, &fp8_rewards);
    println!("held-out accuracy f32 {f32_acc:.4} fp8 {fp8_acc:.4}; {agreement:?}");
    assert!(f32_rewards.len() >= 600, "the held-out set is the whole held-out split");
    assert!(agreement.pairwise_agreement >= 0.98, "{agreement:?}");
    assert!((f32_acc - fp8_acc).abs() <= 0.01, "accuracy f32 {f32_acc} vs fp8 {fp8_acc}");
}

#[test]
fn the_compare_command_reports_agreement_between_formats() {
    let model = common_fixtures::dir("arith");
    let out = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["compare", "--model"])
        .arg(&model)
        .args(["--dtype-a", "f32", "--dtype-b", "fp8", "--json", "--input"])
        .arg(model.join("conversations.jsonl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["events"], 720);
    assert!(r["max_abs_diff"].as_f64().unwrap() > 0.0, "fp8 differs from f32");
    assert!(r["mean_abs_diff"].as_f64().unwrap() <= r["max_abs_diff"].as_f64().unwrap());
    assert!(r["spearman"].as_f64().unwrap() > 0.99);
    assert!(r["pairwise_agreement"].as_f64().unwrap() >= 0.98);
}
