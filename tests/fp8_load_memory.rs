//! Quantizing at load (`dtype = "fp8"` on a bf16 checkpoint) reads the checkpoint shard by shard:
//! the process grows by the FP8 model it keeps plus about one tensor's temporaries, never by the
//! bf16 checkpoint. Its own test binary, so that no other test shares the process's peak RSS.

mod common_fixtures;

use scorestream::engine::Engine;
use scorestream::model::{Dtype, ModelOptions};

fn vm_hwm_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024.0
}

#[test]
fn quantize_at_load_keeps_fp8_weights_and_about_one_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let shard = common_fixtures::write_sharded_checkpoint(tmp.path(), 8, 768, 2048) as f64 / (1 << 20) as f64;
    let bf16_total = shard * 8.0;
    let fp8_weights = bf16_total / 2.0;
    let before = vm_hwm_mib();
    let mut opts = ModelOptions::new(tmp.path());
    opts.dtype = Dtype::Fp8;
    let engine = Engine::start(&opts).unwrap();
    let growth = vm_hwm_mib() - before;
    println!("bf16 checkpoint {bf16_total:.1} MiB in shards of {shard:.1} MiB; fp8 weights {fp8_weights:.1} MiB; peak grew {growth:.1} MiB");
    assert!(growth < fp8_weights + 2.0 * shard, "peak grew {growth:.1} MiB");
    assert!(growth < bf16_total, "peak grew {growth:.1} MiB: as much as the bf16 checkpoint");
    assert_eq!(engine.score_blocking(vec![vec![1, 2, 3]]).unwrap().len(), 1);
}
