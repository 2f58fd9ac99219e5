//! Broken model directories (copies of the `arith` fixture, edited in a tempdir) and hostile
//! conversations: each is refused at load with a message that names what is wrong, or becomes an
//! error record, in `scorestream score` and in the worker alike. Never an invented result.

mod common_fixtures;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// A copy of fixture `name` in a tempdir.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(common_fixtures::dir(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    (tmp, dir)
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn score_cmd(model: &Path, input: &str, extra: &[&str]) -> (Output, Vec<Value>, Vec<Value>) {
    common_fixtures::run_score(model, input.as_bytes(), extra)
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `scorestream run` over `input` with the file source and sinks: (exit, outputs, dead letters).
fn run_worker(model: &Path, input: &str) -> (Output, Vec<Value>, Vec<Value>) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("in.jsonl"), input).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "shutdown_timeout = \"20s\"\n[model]\npath = \"{}\"\n[batch]\nmax_batch_events = 8\nmax_wait = \"5ms\"\n\
         [source]\ntype = \"file\"\npath = \"{}\"\n[sink]\ntype = \"file\"\npath = \"{}\"\n\
         [dead_letter]\ntype = \"file\"\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n",
        model.display(),
        d.join("in.jsonl").display(),
        d.join("out.jsonl").display(),
        d.join("dl.jsonl").display(),
    );
    std::fs::write(d.join("w.toml"), config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["run", "--config"])
        .arg(d.join("w.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let read = |f: &str| json_lines(&std::fs::read_to_string(d.join(f)).unwrap_or_default());
    (output, read("out.jsonl"), read("dl.jsonl"))
}

fn conversation(id: &str, user: &str, assistant: &str) -> String {
    serde_json::json!({"id": id, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})
        .to_string()
}

/// The `arith` copy whose template writes only the message contents (so a conversation of
/// characters outside its 37-token vocabulary tokenizes to nothing) and whose embedding of
/// the token `9` is NaN (so a conversation with a 9 gets a NaN reward).
fn hostile_model() -> (tempfile::TempDir, PathBuf) {
    let (tmp, dir) = copy_fixture("arith");
    std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}{{ m['content'] }}{% endfor %}").unwrap();
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let embed = &tensors["model.embed_tokens.weight"];
    let (dtype, (rows, cols)) = (embed.dtype(), embed.dims2().unwrap());
    let mut values = embed.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[19 * cols..20 * cols].fill(f32::NAN); // token 19 is "9"
    let nan = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
    tensors.insert("model.embed_tokens.weight".into(), nan);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    (tmp, dir)
}

/// Good lines around a conversation with no known character, one with a NaN reward, and one
/// that is not JSON, plus a blank line (not an input).
fn hostile_input() -> (String, usize) {
    let lines = [
        conversation("good-1", "What is 2+3?", "5"),
        conversation("empty", "QQ", "ZZZ"),
        conversation("good-2", "What is 1+1?", "2"),
        conversation("nan", "What is 4+5?", "9"),
        "{not json".to_owned(),
        String::new(),
        conversation("good-3", "What is 3+3?", "6"),
    ];
    (lines.join("\n") + "\n", lines.iter().filter(|l| !l.is_empty()).count())
}

fn kind_of<'a>(records: &'a [Value], id: &str) -> &'a str {
    records.iter().find(|r| r["id"] == id).and_then(|r| r["error"]["kind"].as_str()).unwrap_or("none")
}

#[test]
fn score_writes_one_line_per_input_and_never_an_invented_reward() {
    let (_tmp, model) = hostile_model();
    let (input, inputs) = hostile_input();
    let (output, out, errors) = score_cmd(&model, &input, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(out.len() + errors.len(), inputs, "outputs + error records = inputs\n{out:?}\n{errors:?}");
    let ids: Vec<&str> = out.iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["good-1", "good-2", "good-3"]);
    assert!(out.iter().all(|o| o["reward"].as_f64().is_some_and(f64::is_finite) && o["tokens"].as_u64() > Some(0)), "{out:?}");
    assert_eq!(kind_of(&errors, "empty"), "template");
    assert_eq!(kind_of(&errors, "nan"), "model");
    for (id, line) in [("empty", 2), ("nan", 4)] {
        let r = errors.iter().find(|r| r["id"] == id).unwrap();
        assert_eq!(r["line"], line, "{r}");
    }
    // Alone, each is still its error record (no batch to hide in).
    for (id, line) in [("empty", 1), ("nan", 3)] {
        let one = input.lines().nth(line).unwrap();
        let (output, out, errors) = score_cmd(&model, one, &[]);
        // Nothing scored: exit status 3, with the error record written.
        assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
        assert_eq!((out.len(), errors.len()), (0, 1), "{id}: {out:?} {errors:?}");
    }
}

#[test]
fn the_worker_dead_letters_them_too() {
    let (_tmp, model) = hostile_model();
    let (input, inputs) = hostile_input();
    let (output, out, dead) = run_worker(&model, &input);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(out.len() + dead.len(), inputs, "{out:?}\n{dead:?}");
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|o| o["reward"].as_f64().is_some_and(f64::is_finite)), "{out:?}");
    assert_eq!(kind_of(&dead, "empty"), "template");
    assert_eq!(kind_of(&dead, "nan"), "model");
}

#[test]
fn a_template_that_renders_nothing_fails_at_load() {
    let (_tmp, model) = copy_fixture("arith");
    std::fs::write(model.join("chat_template.jinja"), "").unwrap();
    let (output, out, errors) = score_cmd(&model, &conversation("a", "What is 1+1?", "2"), &[]);
    assert!(!output.status.success());
    assert!(out.is_empty() && errors.is_empty());
    let e = stderr(&output);
    assert!(e.contains("chat_template.jinja") && e.contains("0 tokens"), "{e}");
    let (output, ..) = run_worker(&model, &conversation("a", "What is 1+1?", "2"));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("0 tokens"), "{}", stderr(&output));
}

#[test]
fn model_positions_cap_the_length_limit() {
    let (_tmp, model) = copy_fixture("arith");
    edit_json(&model.join("config.json"), |c| c["max_position_embeddings"] = 16.into());
    let long = conversation("long", "What is 2+3? What is 4+4? What is 1+0?", "5");
    let (output, out, errors) = score_cmd(&model, &long, &["--max-tokens", "4096"]);
    assert_eq!(output.status.code(), Some(3), "nothing scored: {}", stderr(&output));
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(errors[0]["error"]["kind"], "too_long");
    assert!(errors[0]["error"]["message"].as_str().unwrap().contains("limit is 16"), "{errors:?}");
    assert!(stderr(&output).contains("length limit: 16 tokens"), "{}", stderr(&output));
    // The configured limit wins when it is the smaller.
    let (output, ..) = score_cmd(&model, &long, &["--max-tokens", "8"]);
    assert!(stderr(&output).contains("length limit: 8 tokens"), "{}", stderr(&output));
}

/// `score` on `model` fails to start; its message (stderr).
fn load_error(model: &Path) -> String {
    let (output, ..) = score_cmd(model, &conversation("a", "What is 1+1?", "2"), &[]);
    assert!(!output.status.success(), "{} loaded", model.display());
    stderr(&output)
}

#[test]
fn broken_configs_are_refused_naming_the_field_and_the_file() {
    for layers in [Value::from(0), Value::from(-1)] {
        let (_tmp, model) = copy_fixture("arith");
        edit_json(&model.join("config.json"), |c| c["num_hidden_layers"] = layers.clone());
        let e = load_error(&model);
        assert!(e.contains("config field `num_hidden_layers`") && e.contains("config.json"), "{layers}: {e}");
    }
    let (_tmp, model) = copy_fixture("arith");
    std::fs::write(model.join("tokenizer_config.json"), "[1, 2]").unwrap();
    let e = load_error(&model);
    assert!(e.contains("tokenizer_config.json") && e.contains("a list"), "{e}");
}

#[test]
fn missing_weights_say_what_is_expected() {
    let (_tmp, model) = copy_fixture("arith");
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let e = load_error(&model);
    assert!(e.contains("expected model.safetensors, or model.safetensors.index.json"), "{e}");
    let (_tmp, model) = copy_fixture("qwen2_seqcls");
    std::fs::remove_file(model.join("model-00003-of-00006.safetensors")).unwrap();
    std::fs::remove_file(model.join("model-00005-of-00006.safetensors")).unwrap();
    let e = load_error(&model);
    assert!(e.contains("names 6 shard files"), "{e}");
    assert!(e.contains("missing: model-00003-of-00006.safetensors, model-00005-of-00006.safetensors"), "{e}");
}
