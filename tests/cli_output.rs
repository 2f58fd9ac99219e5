//! What the binary tells its operator: `--version` names the version, the git revision and the
//! `cuda` feature; log lines carry no colour codes when stderr is not a terminal, and
//! `--log-format json` writes one JSON object per line.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const EVENT: &str = r#"{"id":"a","messages":[{"role":"user","content":"1+1"},{"role":"assistant","content":"2"}]}"#;

fn scorestream(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("SCORESTREAM_LOG_FORMAT")
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start scorestream");
    writeln!(child.stdin.take().unwrap(), "{EVENT}").unwrap();
    child.wait_with_output().unwrap()
}

fn score(extra: &[&str]) -> (String, String) {
    let mut args = extra.to_vec();
    args.extend(["score", "--model", "tests/fixtures/arith"]);
    let out = scorestream(&args, &[]);
    let (stdout, stderr) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap());
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr)
}

#[test]
fn version_names_the_revision_and_the_cuda_feature() {
    let out = scorestream(&["--version"], &[]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    let cuda = if cfg!(feature = "cuda") { "yes" } else { "no" };
    let want = format!("scorestream {} (revision ", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&want) && text.trim_end().ends_with(&format!(", cuda: {cuda})")), "{text}");
    let revision = text.split("(revision ").nth(1).unwrap().split(',').next().unwrap();
    // In a git checkout: the abbreviated commit hash; elsewhere "unknown".
    let in_git = Command::new("git").args(["rev-parse", "HEAD"]).output().is_ok_and(|o| o.status.success());
    if in_git {
        assert!(revision.len() == 12 && revision.chars().all(|c| c.is_ascii_hexdigit()), "{revision}");
    } else {
        assert_eq!(revision, "unknown");
    }
}

#[test]
fn text_logs_carry_no_colour_codes_off_a_terminal() {
    let (stdout, stderr) = score(&[]);
    assert!(stdout.contains(r#""id":"a""#), "{stdout}");
    assert!(stderr.contains("INFO"), "the model load logs at info: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "escape codes in a pipe: {stderr:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    for args in [&["--log-format", "json"][..], &["--log-format=json"]] {
        let (stdout, stderr) = score(args);
        assert_eq!(stdout.lines().count(), 1, "scores stay on stdout: {stdout}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(!lines.is_empty());
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(v["level"].is_string() && v["message"].is_string() && v["timestamp"].is_string(), "{line}");
        }
    }
    // The subcommand may come first too (the flag is global), and the environment selects it.
    let out = scorestream(&["score", "--model", "tests/fixtures/arith"], &[("SCORESTREAM_LOG_FORMAT", "json")]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.lines().all(|l| l.starts_with('{')), "{stderr}");
}

/// A Llama-3.1-70B-shaped bf16 checkpoint whose one shard is a sparse file: its header is real,
/// its 141 GB of data take no disk (`inspect` reads headers only).
#[cfg(feature = "cuda")]
fn sparse_70b(dir: &std::path::Path) {
    let (h, inter, kv, vocab) = (8192usize, 28672usize, 1024usize, 128_256usize);
    let mut tensors: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, h]), ("model.norm.weight".into(), vec![h]), ("score.weight".into(), vec![1, h])];
    for i in 0..80 {
        let p = |n: &str| format!("model.layers.{i}.{n}.weight");
        for (name, shape) in [
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
            ("self_attn.q_proj", vec![h, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, h]),
            ("mlp.gate_proj", vec![inter, h]),
            ("mlp.up_proj", vec![inter, h]),
            ("mlp.down_proj", vec![h, inter]),
        ] {
            tensors.push((p(name), shape));
        }
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(name.clone(), serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let text = serde_json::Value::Object(header).to_string();
    let mut f = std::fs::File::create(dir.join("model.safetensors")).unwrap();
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.set_len((8 + text.len() + offset) as u64).unwrap();
    let config = r#"{"architectures": ["LlamaForSequenceClassification"], "model_type": "llama", "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_theta": 500000.0, "tie_word_embeddings": false, "num_labels": 1}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
}

/// `inspect --devices` plans the GPU stages without a GPU: each stage's need, and with
/// `--device-memory` the verdict: a bf16 70B fits two 80 GB GPUs and is refused on one, with
/// the stage, the device, the need and the free memory named.
#[cfg(feature = "cuda")]
#[test]
fn inspect_plans_gpu_stages_and_refuses_a_model_too_large_for_the_device() {
    let dir = tempfile::tempdir().unwrap();
    sparse_70b(dir.path());
    let model = dir.path().to_str().unwrap();
    let run = |devices: &str| {
        let out = scorestream(&["inspect", "--model", model, "--dtype", "bf16", "--devices", devices, "--device-memory", "80GB"], &[]);
        (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (ok, stdout, stderr) = run("cuda:0,cuda:1");
    assert!(ok, "{stdout}\n{stderr}");
    for part in ["gpu plan:       bf16, batches of 16384 tokens", "gpu stage 0:    cuda:0 needs", "gpu stage 1:    cuda:1 needs", "fits:"] {
        assert!(stdout.contains(part), "{part:?} missing:\n{stdout}");
    }
    let (ok, stdout, stderr) = run("cuda:0");
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("gpu stage 0:    cuda:0 needs 13"), "the plan is printed before the refusal:\n{stdout}");
    for part in ["stage 0 (layers 0..80) does not fit cuda:0", "74.51 GiB free", "--devices cuda:0,cuda:1"] {
        assert!(stderr.contains(part), "{part:?} missing:\n{stderr}");
    }
    // fp8 (what `auto` plans for) holds the 70B on one 80 GB GPU.
    let out = scorestream(&["inspect", "--model", model, "--devices", "cuda:0", "--device-memory", "80GB"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("gpu plan:       fp8"));
}
