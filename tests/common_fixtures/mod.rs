//! Shared access to the committed fixtures under `tests/fixtures/` and their transformers
//! reference outputs.
#![allow(dead_code)]

use std::path::PathBuf;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

/// `tests/fixtures`, or `SCORESTREAM_FIXTURES_DIR` when set (to try freshly generated ones).
pub fn root() -> PathBuf {
    std::env::var_os("SCORESTREAM_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

pub fn dir(name: &str) -> PathBuf {
    root().join(name)
}

/// Every fixture directory that has a `reference.json`, sorted.
pub fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root())
        .expect("tests/fixtures exists")
        .filter_map(Result::ok)
        .filter(|e| e.path().join("reference.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[derive(Debug, Deserialize)]
pub struct RefEvent {
    pub id: String,
    pub input_ids: Vec<u32>,
    #[serde(default)]
    pub logits: Vec<f32>,
    pub reward: f32,
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub events: Vec<RefEvent>,
    #[serde(default)]
    pub fp8: Option<serde_json::Value>,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        let path = dir(name).join("reference.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

/// A Llama-shaped bf16 checkpoint of `layers` layers, one shard per layer, with random weights.
pub fn write_sharded_checkpoint(dir: &Path, layers: usize, hidden: usize, inter: usize) -> usize {
    let dev = Device::Cpu;
    let rand = |shape: &[usize]| Tensor::randn(0f32, 0.02, shape, &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let mut weight_map = serde_json::Map::new();
    let mut shard_bytes = 0;
    for i in 0..layers + 1 {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        if i == layers {
            tensors.insert("model.embed_tokens.weight".into(), rand(&[256, hidden]));
            tensors.insert("model.norm.weight".into(), rand(&[hidden]));
            tensors.insert("score.weight".into(), rand(&[1, hidden]));
        } else {
            let p = format!("model.layers.{i}");
            for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                tensors.insert(format!("{p}.self_attn.{n}.weight"), rand(&[hidden, hidden]));
            }
            for n in ["gate_proj", "up_proj"] {
                tensors.insert(format!("{p}.mlp.{n}.weight"), rand(&[inter, hidden]));
            }
            tensors.insert(format!("{p}.mlp.down_proj.weight"), rand(&[hidden, inter]));
            for n in ["input_layernorm", "post_attention_layernorm"] {
                tensors.insert(format!("{p}.{n}.weight"), rand(&[hidden]));
            }
        }
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, layers + 1);
        for k in tensors.keys() {
            weight_map.insert(k.clone(), file.clone().into());
        }
        candle_core::safetensors::save(&tensors, dir.join(&file)).unwrap();
        shard_bytes = shard_bytes.max(std::fs::metadata(dir.join(&file)).unwrap().len() as usize);
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": hidden / 64, "num_key_value_heads": hidden / 64, "vocab_size": 256,
        "rms_norm_eps": 1e-5, "num_labels": 1, "pad_token_id": 0, "torch_dtype": "bfloat16"});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    shard_bytes
}

/// Rewards by event id from `scorestream score` on the trained `arith` fixture for the JSON
/// `scorestream score --model MODEL` with `input` on stdin and `extra` flags: the process
/// output, the JSON lines it wrote to stdout and the error records it wrote to `--errors`.
pub fn run_score(model: &Path, input: &[u8], extra: &[&str]) -> (std::process::Output, Vec<serde_json::Value>, Vec<serde_json::Value>) {
    use std::io::Write;
    use std::process::Stdio;
    let errors = tempfile::NamedTempFile::new().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["score", "--model"])
        .arg(model)
        .args(["--input", "-", "--output", "-", "--errors"])
        .arg(errors.path())
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A run that fails at start (a broken model) may exit before reading its input.
    if let Err(e) = child.stdin.take().unwrap().write_all(input) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "writing the input: {e}");
    }
    let output = child.wait_with_output().unwrap();
    let lines = |s: &str| -> Vec<serde_json::Value> {
        s.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
    };
    let out = lines(&String::from_utf8_lossy(&output.stdout));
    let errs = lines(&std::fs::read_to_string(errors.path()).unwrap_or_default());
    (output, out, errs)
}

/// lines `events` (written to `work/in.jsonl`): what a worker must publish for the same events.
pub fn score_cli_rewards(work: &Path, events: &[&str]) -> HashMap<String, f64> {
    let input = work.join("in.jsonl");
    std::fs::write(&input, events.join("\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["score", "--model"])
        .arg(dir("arith"))
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_owned(), v["reward"].as_f64().unwrap()))
        .collect()
}
