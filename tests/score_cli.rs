//! `scorestream score` end to end: the committed conversations through chat template,
//! tokenizer and model give transformers' rewards, in input order; bad lines become error
//! records of the right kind and the run goes on; truncation and the length limit.

mod common_fixtures;

use std::collections::HashMap;
use std::process::{Command, Stdio};

use common_fixtures::{fixture_names, Reference};
use serde_json::Value;

struct Run {
    code: i32,
    out: Vec<Value>,
    errors: Vec<Value>,
}

fn score(model: &str, input: &[u8], extra: &[&str]) -> Run {
    let (output, out, errors) = common_fixtures::run_score(&common_fixtures::dir(model), input, extra);
    Run { code: output.status.code().unwrap_or(-1), out, errors }
}

fn conversations() -> Vec<u8> {
    std::fs::read(common_fixtures::root().join("conversations.jsonl")).unwrap()
}

#[test]
fn every_fixture_scores_its_conversations_like_transformers() {
    // The FP8 checkpoint is held to the FP8 emulation in model_parity.rs, not to 1e-4.
    let fp8 = |n: &str| std::fs::read_to_string(common_fixtures::dir(n).join("config.json")).is_ok_and(|c| c.contains("quantization_config"));
    for name in fixture_names().into_iter().filter(|n| n != "arith" && !fp8(n)) {
        let reference = Reference::load(&name);
        let expected: HashMap<&str, &common_fixtures::RefEvent> = reference.events.iter().map(|e| (e.id.as_str(), e)).collect();
        let run = score(&name, &conversations(), &[]);
        assert_eq!(run.code, 0);
        assert!(run.errors.is_empty(), "{name}: {:?}", run.errors);
        let ids: Vec<&str> = run.out.iter().map(|o| o["id"].as_str().unwrap()).collect();
        let want: Vec<&str> = reference.events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, want, "{name}: outputs in input order");
        for o in &run.out {
            let r = expected[o["id"].as_str().unwrap()];
            let reward = o["reward"].as_f64().unwrap() as f32;
            assert!((reward - r.reward).abs() <= 1e-4 * r.reward.abs().max(1.0), "{name}/{}: {reward} vs {}", r.id, r.reward);
            assert_eq!(o["tokens"].as_u64().unwrap() as usize, r.input_ids.len(), "{name}/{}", r.id);
            assert_eq!(o["truncated"], Value::Bool(false));
            assert_eq!(o["attributes"].is_object(), r.logits.len() > 1, "{name}/{}: attributes only for several outputs", r.id);
            assert_eq!(o["model"], Value::String(name.clone()));
        }
    }
}

#[test]
fn bad_lines_become_error_records_and_the_run_goes_on() {
    let good = r#"{"id":"ok-1","messages":[{"role":"user","content":"What is 2+2?"},{"role":"assistant","content":"4"}],"metadata":{"k":[1,2]}}"#;
    let mut input = Vec::new();
    let bad: [(&[u8], &str); 6] = [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe\n", "invalid_utf8"),
        (br#"{"id":"s","messages":"nope"}"#, "schema"),
        (br#"{"id":"u","messages":[{"role":"assistant","content":"hi"},{"role":"user","content":"q"}]}"#, "invalid_conversation"),
        (br#"{"id":"e","messages":[{"role":"user","content":"q"},{"role":"assistant","content":"  "}]}"#, "invalid_conversation"),
        (br#"{"id":"x","messages":[],"extra":1}"#, "schema"),
    ];
    for (line, _) in &bad {
        input.extend_from_slice(good.as_bytes());
        input.push(b'\n');
        input.extend_from_slice(line.strip_suffix(b"\n").unwrap_or(line));
        input.push(b'\n');
    }
    input.extend_from_slice(good.replace("ok-1", "ok-last").as_bytes());
    let run = score("arith", &input, &[]);
    assert_eq!(run.code, 0, "bad input never fails the run");
    assert_eq!(run.out.len(), bad.len() + 1);
    assert_eq!(run.out.last().unwrap()["id"], "ok-last");
    assert_eq!(run.out[0]["metadata"], serde_json::json!({"k": [1, 2]}), "metadata passes through");
    let kinds: Vec<&str> = run.errors.iter().map(|e| e["error"]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, bad.iter().map(|(_, k)| *k).collect::<Vec<_>>());
    let lines: Vec<u64> = run.errors.iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![2, 4, 6, 8, 10, 12], "error records carry their input line");
    assert_eq!(run.errors[2]["id"], "s", "the id is kept when the payload has one");
    assert!(run.errors.iter().all(|e| !e["error"]["message"].as_str().unwrap().is_empty()));
}

fn long_conversation(turns: usize) -> String {
    let mut messages = vec![serde_json::json!({"role": "system", "content": "Answer with a number."})];
    for i in 0..turns {
        messages.push(serde_json::json!({"role": "user", "content": format!("What is {}+{}?", i % 10, (i + 3) % 10)}));
        messages.push(serde_json::json!({"role": "assistant", "content": format!("{}", i % 10 + (i + 3) % 10)}));
    }
    serde_json::json!({"id": "long", "messages": messages}).to_string()
}

#[test]
fn long_conversations_drop_their_oldest_turns_or_are_rejected() {
    // 12 exchanges stay within the fixture's 256 positions (its own cap on the length limit).
    let input = format!("{}\n", long_conversation(12));
    let full = score("arith", input.as_bytes(), &["--max-tokens", "100000"]);
    let full_tokens = full.out[0]["tokens"].as_u64().unwrap();
    assert_eq!(full.out[0]["truncated"], false);
    let limit = (full_tokens / 3).to_string();
    let cut = score("arith", input.as_bytes(), &["--max-tokens", &limit]);
    assert_eq!(cut.out.len(), 1, "{:?}", cut.errors);
    assert_eq!(cut.out[0]["truncated"], true);
    let tokens = cut.out[0]["tokens"].as_u64().unwrap();
    assert!(tokens <= full_tokens / 3 && tokens > full_tokens / 6, "kept {tokens} of {full_tokens} within {limit}");
    let rejected = score("arith", input.as_bytes(), &["--max-tokens", &limit, "--truncation", "reject"]);
    assert!(rejected.out.is_empty());
    assert_eq!(rejected.errors[0]["error"]["kind"], "too_long");
    let tiny = score("arith", input.as_bytes(), &["--max-tokens", "5"]);
    assert_eq!(tiny.errors[0]["error"]["kind"], "too_long", "the final exchange alone does not fit");
}

#[test]
fn the_trained_fixture_prefers_correct_answers() {
    let input = std::fs::read(common_fixtures::dir("arith").join("conversations.jsonl")).unwrap();
    let run = score("arith", &input, &[]);
    let reward: HashMap<String, f64> =
        run.out.iter().map(|o| (o["id"].as_str().unwrap().to_owned(), o["reward"].as_f64().unwrap())).collect();
    let (mut right, mut pairs) = (0, 0);
    for (id, good) in reward.iter().filter(|(id, _)| id.ends_with("-good")) {
        if let Some(bad) = reward.get(&id.replace("-good", "-bad")) {
            pairs += 1;
            right += usize::from(good > bad);
        }
    }
    assert!(pairs >= 20, "expected good/bad pairs, found {pairs}");
    assert!(right as f64 / pairs as f64 >= 0.9, "{right}/{pairs} pairs ranked correctly");
}

#[test]
fn a_missing_model_is_an_error_of_the_run() {
    let output = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["score", "--model", "/nonexistent/model", "--input", "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/model"));
}

#[test]
fn a_length_limit_above_the_batch_size_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["score", "--model"])
        .arg(common_fixtures::dir("arith"))
        .args(["--batch-tokens", "100", "--input", "/dev/null"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("length limit (256 tokens) is above --batch-tokens (100)"), "{err}");
}

#[test]
fn exit_status_is_3_when_no_line_could_be_scored() {
    let good = r#"{"id":"ok","messages":[{"role":"user","content":"1+1"},{"role":"assistant","content":"2"}]}"#;
    let all_bad = score("arith", b"{not json\n{\"id\":\"s\",\"messages\":\"nope\"}\n", &[]);
    assert_eq!(all_bad.code, 3, "every line failed");
    assert!(all_bad.out.is_empty() && all_bad.errors.len() == 2, "{:?}", all_bad.errors);
    let too_long = score("arith", format!("{good}\n").as_bytes(), &["--max-tokens", "3", "--truncation", "reject"]);
    assert_eq!((too_long.code, too_long.errors.len()), (3, 1), "rejected by the length limit");
    let some = score("arith", format!("{good}\n{{not json\n").as_bytes(), &[]);
    assert_eq!((some.code, some.out.len(), some.errors.len()), (0, 1, 1), "one scored is a success");
    let empty = score("arith", b"\n\n", &[]);
    assert_eq!((empty.code, empty.out.len(), empty.errors.len()), (0, 0, 0), "nothing to score is no failure");
}

/// Conversations with one long system prompt score the same with the prompt computed once per
/// batch (`--min-shared-prefix`) as with every conversation computed whole.
#[test]
fn a_shared_system_prompt_changes_no_score() {
    let system = "You are a careful assistant. Answer briefly and check each step twice. ".repeat(6);
    let mut input = String::new();
    for (i, q) in ["What is 2+2?", "Name a prime.", "Capital of France?", "Spell cat.", "2*3?"].iter().enumerate() {
        let line = serde_json::json!({"id": format!("c{i}"), "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": q},
            {"role": "assistant", "content": format!("Answer number {i}.")}]});
        input.push_str(&format!("{line}\n"));
    }
    for name in ["qwen3_seqcls", "mistral_seqcls", "nemotron_seqcls"] {
        let whole = score(name, input.as_bytes(), &["--min-shared-prefix", "0"]);
        let shared = score(name, input.as_bytes(), &["--min-shared-prefix", "16"]);
        assert_eq!((whole.code, shared.code), (0, 0), "{name}: {:?} {:?}", whole.errors, shared.errors);
        assert_eq!(whole.out.len(), 5, "{name}: {:?}", whole.errors);
        for (a, b) in whole.out.iter().zip(&shared.out) {
            assert_eq!(a["id"], b["id"]);
            let (a, b) = (a["reward"].as_f64().unwrap(), b["reward"].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{name}: {b} shared vs {a} whole");
        }
    }
}

/// A best-of-N event gives one ranked output whose rewards are those of each candidate's
/// conversation scored alone; a candidate that cannot be scored holds an error in its place;
/// an event invalid as a whole is an error record.
#[test]
fn best_of_n_events_rank_candidates_scored_as_if_alone() {
    let system = serde_json::json!({"role": "system", "content": "Answer in one short sentence. ".repeat(8)});
    let user = serde_json::json!({"role": "user", "content": "What is the capital of France?"});
    let answers = ["Paris.", "It is Paris, on the Seine.", "Lyon.", "", "I do not know."];
    let mut input = String::new();
    for (i, a) in answers.iter().enumerate() {
        let line = serde_json::json!({"id": format!("alone{i}"), "messages": [system, user, {"role": "assistant", "content": a}]});
        input.push_str(&format!("{line}\n"));
    }
    let mut candidates: Vec<Value> = answers.iter().map(|a| serde_json::json!({"content": a})).collect();
    candidates[1] = serde_json::json!({"id": "turns", "messages": [{"role": "assistant", "content": answers[1]}]});
    let group = serde_json::json!({"id": "bon", "messages": [system, user], "candidates": candidates, "metadata": {"k": 1}});
    let empty = serde_json::json!({"id": "none", "messages": [user], "candidates": []});
    input.push_str(&format!("{group}\n{empty}\n"));
    for name in ["qwen3_seqcls", "llama_seqcls"] {
        for min_shared in ["0", "16"] {
            let run = score(name, input.as_bytes(), &["--min-shared-prefix", min_shared]);
            assert_eq!(run.code, 0, "{name}: {:?}", run.errors);
            // `alone3` (empty answer) and `none` (no candidates) are error records.
            let kinds: Vec<(&str, &str)> =
                run.errors.iter().map(|e| (e["id"].as_str().unwrap(), e["error"]["kind"].as_str().unwrap())).collect();
            assert_eq!(kinds, vec![("alone3", "invalid_conversation"), ("none", "schema")], "{name}");
            let alone: Vec<f64> = run.out[..4].iter().map(|o| o["reward"].as_f64().unwrap()).collect();
            let bon = &run.out[4];
            assert_eq!((bon["id"].as_str(), bon["metadata"]["k"].as_i64(), bon["model"].as_str()), (Some("bon"), Some(1), Some(name)));
            let c = bon["candidates"].as_array().unwrap();
            assert_eq!((c[1]["id"].as_str(), c[3]["error"]["kind"].as_str()), (Some("turns"), Some("invalid_conversation")));
            let got: Vec<f64> = [0, 1, 2, 4].iter().map(|&i| c[i]["reward"].as_f64().unwrap()).collect();
            for (g, w) in got.iter().zip(&alone) {
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{name}: {g} in the group vs {w} alone");
            }
            let ranking: Vec<usize> = bon["ranking"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let mut want = vec![0, 1, 2, 4];
            want.sort_by(|&a, &b| c[b]["reward"].as_f64().partial_cmp(&c[a]["reward"].as_f64()).unwrap());
            assert_eq!(ranking, want, "{name}");
            assert_eq!(bon["best"].as_u64(), Some(want[0] as u64));
            let margin = c[want[0]]["reward"].as_f64().unwrap() - c[want[1]]["reward"].as_f64().unwrap();
            assert!((bon["margin"].as_f64().unwrap() - margin).abs() < 1e-6);
            assert_eq!(c[0]["tokens"], run.out[0]["tokens"]);
        }
    }
}
