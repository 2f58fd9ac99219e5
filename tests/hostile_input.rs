//! Hostile input at scale (the seeded generator of `examples/common/hostile.rs`): 10,000 inputs
//! through `scorestream score`, and 10,000 through the worker on a real nats-server. No
//! panic, the process stays up, every input ends scored or as an error record (`score`: its line
//! number) or dead letter (NATS: its original bytes, or their length and SHA-256 when cut to fit
//! the server's limit), and the counts are printed.

mod common_fixtures;
mod nats_support;
#[path = "../examples/common/hostile.rs"]
mod hostile;

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nats_support::{
    count, events, free_port, read_all, setup_streams, spawn_logged_worker, terminate, wait_all_acked, write_config_with,
    KillOnFailure, NatsServer,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Inputs through `score`.
const SCORE_INPUTS: usize = 10_000;
/// Inputs through NATS: as many as through `score` (a few minutes on CI's 2 cores).
const NATS_INPUTS: usize = 10_000;

/// The error kinds of the records or dead letters, with their counts, for the printout.
fn kinds<'a>(records: impl Iterator<Item = &'a Value>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in records {
        *out.entry(r["error"]["kind"].as_str().unwrap_or("?").to_owned()).or_insert(0) += 1;
    }
    out
}

#[test]
fn ten_thousand_hostile_lines_through_score_each_end_scored_or_as_an_error_record() {
    // One input per line: a newline inside a payload would split it.
    let payloads: Vec<Vec<u8>> = hostile::payloads(&events(SCORE_INPUTS), SCORE_INPUTS)
        .into_iter()
        .map(|p| p.into_iter().map(|b| if b == b'\n' { b' ' } else { b }).collect())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (input, output, errors) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"), dir.path().join("errors.jsonl"));
    std::fs::write(&input, payloads.join(&b'\n')).unwrap();
    let start = Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["score", "--model"])
        .arg(common_fixtures::dir("arith"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .arg("--errors")
        .arg(&errors)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{}: {stderr}", run.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let parse = |path: &std::path::Path| -> Vec<Value> {
        std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (scored, failed) = (parse(&output), parse(&errors));

    let failed_lines: HashSet<usize> = failed.iter().map(|r| r["line"].as_u64().unwrap() as usize).collect();
    assert_eq!(failed_lines.len(), failed.len(), "one error record per line");
    let blank: Vec<usize> =
        (1..=SCORE_INPUTS).filter(|l| payloads[l - 1].iter().all(u8::is_ascii_whitespace)).collect();
    let kept: Vec<usize> = (1..=SCORE_INPUTS).filter(|l| !failed_lines.contains(l) && !blank.contains(l)).collect();
    assert_eq!(kept.len(), scored.len(), "every line not blank and not an error record is scored");
    for (line, out) in kept.iter().zip(&scored) {
        assert!(out["reward"].is_number(), "{out}");
        if let Ok(Value::Object(input)) = serde_json::from_slice::<Value>(&payloads[line - 1]) {
            assert_eq!(input.get("id"), out.get("id"), "line {line}: outputs in input order");
        }
    }
    println!(
        "score: {SCORE_INPUTS} hostile lines in {:.1} s: {} scored, {} error records {:?}, {} blank (skipped), lost 0",
        start.elapsed().as_secs_f64(),
        scored.len(),
        failed.len(),
        kinds(failed.iter()),
        blank.len()
    );
}

/// The original bytes of a dead letter's payload, and whether it was cut.
fn dead_letter_bytes(d: &Value) -> (Vec<u8>, bool) {
    let payload = d["payload"].as_str().unwrap();
    let bytes = if d["payload_encoding"] == "base64" {
        base64::engine::general_purpose::STANDARD.decode(payload).unwrap()
    } else {
        payload.as_bytes().to_vec()
    };
    (bytes, d["payload_truncated"] == true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_events_through_nats_each_end_scored_or_dead_lettered_with_their_bytes() {
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    let payloads = hostile::payloads(&events(NATS_INPUTS), NATS_INPUTS);
    for chunk in payloads.chunks(256) {
        let mut acks = Vec::new();
        for p in chunk {
            acks.push(js.publish("conv.in", p.clone().into()).await.unwrap());
        }
        for a in acks {
            a.await.unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    // A payload limit below the server's, so that the 1 MB contents are dead-lettered as oversized.
    let config = write_config_with(dir.path(), &server.url(), "", free_port(), |t| {
        t.replace("max_inflight_events = 64", "max_inflight_events = 64\n        max_payload_bytes = 900000")
    });
    let mut worker = spawn_logged_worker(&config, &dir.path().join("worker.log"));
    let show_log = || std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    let mut guard = KillOnFailure(worker.id(), true);
    let start = Instant::now();
    let n = NATS_INPUTS as u64;
    loop {
        let done = count(&js, "SCORED").await + count(&js, "DEAD").await;
        if done >= n {
            break;
        }
        assert!(worker.try_wait().unwrap().is_none(), "the worker exited: {}", show_log());
        assert!(start.elapsed() < Duration::from_secs(1800), "{done} of {n} outputs after 30 min");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let dead = read_all(&js, "DEAD").await;
    let scored = count(&js, "SCORED").await;
    let mut sequences = HashSet::new();
    let mut cut = 0;
    for d in &dead {
        let seq = d["source"]["sequence"].as_u64().unwrap();
        assert!(sequences.insert(seq), "input {seq} dead-lettered twice");
        let original = &payloads[seq as usize - 1];
        let (bytes, truncated) = dead_letter_bytes(d);
        if truncated {
            cut += 1;
            assert!(original.starts_with(&bytes), "input {seq}: a cut payload is a prefix of the original");
            assert_eq!(d["payload_bytes"].as_u64(), Some(original.len() as u64));
            let digest: String = Sha256::digest(original).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(d["payload_sha256"].as_str(), Some(digest.as_str()));
        } else {
            assert_eq!(&bytes, original, "input {seq}: the dead letter carries its original bytes");
        }
    }
    assert_eq!(scored + dead.len() as u64, n, "each input scored or dead-lettered once");
    assert!(!show_log().contains("panicked"), "{}", show_log());
    // Every input acked (after the last acks land), and how often JetStream delivered.
    let (.., deliveries) = wait_all_acked(&js, "CONV", "scorestream", Duration::from_secs(5), "every input acked").await;
    println!(
        "nats: {n} hostile events in {seconds:.1} s: {scored} scored, {} dead-lettered {:?} ({cut} cut to fit, with length and SHA-256), lost 0, {deliveries} deliveries",
        dead.len(),
        kinds(dead.iter())
    );
    guard.1 = false;
    assert!(terminate(worker).success(), "{}", show_log());
}
