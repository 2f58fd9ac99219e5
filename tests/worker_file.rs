//! `scorestream run` with the file source and sinks on the `arith` fixture model: every input
//! id lands in the output or the dead letters with the right kind, rewards equal
//! `scorestream score` on the same events, outputs keep input order, /metrics counts what was
//! sent, and SIGTERM drains and exits 0.

mod common_fixtures;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_scorestream"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn write_config(dir: &Path, input: &str, port: u16) -> std::path::PathBuf {
    let model = common_fixtures::dir("arith");
    let text = format!(
        r#"
        shutdown_timeout = "20s"
        [model]
        path = "{model}"
        [batch]
        max_batch_events = 8
        max_wait = "5ms"
        max_inflight_events = 32
        max_payload_bytes = 65536
        [source]
        type = "file"
        path = "{input}"
        [sink]
        type = "file"
        path = "{out}"
        [dead_letter]
        type = "file"
        path = "{dl}"
        [http]
        listen = "127.0.0.1:{port}"
        "#,
        model = model.display(),
        out = dir.join("out.jsonl").display(),
        dl = dir.join("dl.jsonl").display(),
    );
    let path = dir.join("worker.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The fixture conversations plus one bad line of each kind the file source can produce.
fn inputs() -> (Vec<u8>, Vec<(String, &'static str)>) {
    let mut data = std::fs::read(common_fixtures::root().join("conversations.jsonl")).unwrap();
    if !data.ends_with(b"\n") {
        data.push(b'\n');
    }
    let long = "word ".repeat(20_000);
    let bad: Vec<(String, &str)> = vec![
        ("{\"id\":\"bad-json\"".to_owned(), "invalid_json"),
        ("{\"id\":\"bad-schema\",\"messages\":[{\"role\":\"bot\",\"content\":\"x\"}]}".to_owned(), "schema"),
        ("{\"id\":\"bad-empty\",\"messages\":[]}".to_owned(), "invalid_conversation"),
        ("{\"id\":\"bad-last\",\"messages\":[{\"role\":\"user\",\"content\":\"q\"}]}".to_owned(), "invalid_conversation"),
        (format!("{{\"id\":\"bad-big\",\"messages\":[{{\"role\":\"user\",\"content\":\"{long}\"}},{{\"role\":\"assistant\",\"content\":\"a\"}}]}}"), "oversized"),
        (format!("{}{}", "[".repeat(5000), "]".repeat(5000)), "invalid_json"),
    ];
    for (line, _) in &bad {
        data.extend_from_slice(line.as_bytes());
        data.push(b'\n');
    }
    data.extend_from_slice(b"\xff\xfe not utf-8\n");
    (data, bad)
}

/// `scorestream score` on the same file: rewards by id, and how many lines it refused.
fn score_reference(input: &Path) -> (HashMap<String, f64>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let errors = dir.path().join("errors.jsonl");
    let out = bin()
        .args(["score", "--model"])
        .arg(common_fixtures::dir("arith"))
        .arg("--input")
        .arg(input)
        .args(["--output", "-", "--max-line-bytes", "65536", "--errors"])
        .arg(&errors)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rewards = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_owned(), v["reward"].as_f64().unwrap()))
        .collect();
    (rewards, lines(&errors).len())
}

#[test]
fn every_input_lands_scored_or_dead_lettered_with_score_rewards() {
    let dir = tempfile::tempdir().unwrap();
    let (data, bad) = inputs();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, &data).unwrap();
    let config = write_config(dir.path(), &input.display().to_string(), free_port());
    let check = bin().args(["check-config", "--config"]).arg(&config).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    let run = bin().args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let scored = lines(&dir.path().join("out.jsonl"));
    let dead = lines(&dir.path().join("dl.jsonl"));
    let (reference, refused) = score_reference(&input);
    assert_eq!(scored.len(), reference.len(), "every good event is scored");
    let want: Vec<String> = String::from_utf8_lossy(&data)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .filter(|id| reference.contains_key(id))
        .collect();
    let got: Vec<String> = scored.iter().map(|v| v["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, want, "outputs keep input order");
    for v in &scored {
        let id = v["id"].as_str().unwrap();
        let r = v["reward"].as_f64().unwrap();
        assert!((r - reference[id]).abs() <= 1e-4 * reference[id].abs().max(1.0), "{id}: {r} vs {}", reference[id]);
    }
    assert_eq!(dead.len(), refused, "the worker dead-letters exactly what `score` refuses");
    for (line, kind) in &bad {
        let v = dead.iter().find(|v| v["payload"].as_str() == Some(line.as_str())).expect("bad line dead-lettered");
        assert_eq!(v["error"]["kind"], *kind, "{v}");
        assert!(v["source"]["line"].as_u64().is_some());
    }
    let last = dead.last().unwrap();
    assert_eq!(last["error"]["kind"], "invalid_utf8");
    assert_eq!(last["payload_encoding"], "base64");
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    buf
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} not in /metrics"))
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool, child: &mut Child) {
    let start = Instant::now();
    while !ok() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the worker exited ({status}) while waiting for {what}");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_drains_counts_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), "-", port);
    let (data, bad) = inputs();
    let sent = data.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
    let mut child = bin()
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Keep stdin open: the source never ends, so only the signal can stop the worker.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&data).unwrap();
    stdin.flush().unwrap();
    let (out, dl) = (dir.path().join("out.jsonl"), dir.path().join("dl.jsonl"));
    wait_for("every output", || lines(&out).len() + lines(&dl).len() == sent, &mut child);

    let failed_of = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("scorestream_events_failed_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // Counters move right after the confirmed write: wait until they account for every input.
    wait_for(
        "the metrics to count every input",
        || {
            let t = scrape(port);
            metric(&t, "scorestream_events_scored_total{delivery=\"first\"}") + failed_of(&t) == sent as f64
        },
        &mut child,
    );
    let text = scrape(port);
    assert_eq!(metric(&text, "scorestream_events_consumed_total{source=\"file\"}"), sent as f64);
    let failed = failed_of(&text);
    assert!(failed >= (bad.len() + 1) as f64, "{failed} dead letters");
    assert_eq!(metric(&text, "scorestream_events_scored_total{delivery=\"first\"}") + failed, sent as f64);
    assert_eq!(metric(&text, "scorestream_inflight_events"), 0.0);
    // The precision that runs (the default dtype "auto" is f32 on the CPU), not the configured one.
    let info: Vec<&str> = text.lines().filter(|l| l.starts_with("scorestream_model_info{")).collect();
    assert!(info.len() == 1 && info[0].contains("dtype=\"f32\"") && info[0].ends_with(" 1"), "{info:?}");

    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "exit {status}: {err}");
    assert_eq!(lines(&out).len() + lines(&dl).len(), sent, "nothing lost or duplicated");
}

/// The example config as shipped, run from the checkout (only the port and the dead letters'
/// file moved): it reads a committed input, scores every line and exits 0 at its end.
#[test]
fn the_file_example_config_runs_as_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = bin()
        .args(["run", "--config", "configs/file.toml"])
        .env("SCORESTREAM__HTTP__LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("SCORESTREAM__DEAD_LETTER__PATH", dir.path().join("dead.jsonl"))
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: toml::Table = std::fs::read_to_string(root.join("configs/file.toml")).unwrap().parse().unwrap();
    let input = root.join(config["source"]["path"].as_str().unwrap());
    let expected = std::fs::read_to_string(&input).unwrap().lines().filter(|l| !l.trim().is_empty()).count();
    let scored = String::from_utf8(out.stdout).unwrap().lines().filter(|l| l.contains("\"reward\"")).count();
    assert!(expected > 0 && scored == expected, "{scored} of {expected} lines of {} scored", input.display());
}

/// Best-of-N events through the worker: one ranked output each, with rewards equal to the same
/// conversations sent as ordinary events (prompts shared inside the batch); an event invalid as
/// a whole is dead-lettered.
#[test]
fn best_of_n_events_are_ranked_like_their_conversations_alone() {
    let dir = tempfile::tempdir().unwrap();
    let user = |q: &str| serde_json::json!([{"role": "user", "content": q}]);
    let mut data = String::new();
    let groups = [("What is 7+9?", ["16", "5", "15"]), ("What is 1+4?", ["7", "5", "4"])];
    for (g, (q, answers)) in groups.iter().enumerate() {
        for (i, a) in answers.iter().enumerate() {
            let line = serde_json::json!({"id": format!("g{g}-{i}"), "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]});
            data.push_str(&format!("{line}\n"));
        }
        let candidates: Vec<Value> = answers.iter().map(|a| serde_json::json!({"content": a})).collect();
        data.push_str(&format!("{}\n", serde_json::json!({"id": format!("bon{g}"), "messages": user(q), "candidates": candidates})));
    }
    let four: Vec<Value> = (0..4).map(|i| serde_json::json!({"content": i.to_string()})).collect();
    data.push_str(&format!("{}\n", serde_json::json!({"id": "too-many", "messages": user("q"), "candidates": four})));
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, &data).unwrap();
    let config = write_config(dir.path(), &input.display().to_string(), free_port());
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "max_batch_events = 8",
        "max_batch_events = 8\n        max_candidates = 3\n        min_shared_prefix = 4",
    );
    std::fs::write(&config, text).unwrap();
    let run = bin().args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let scored = lines(&dir.path().join("out.jsonl"));
    let dead = lines(&dir.path().join("dl.jsonl"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0]["id"].as_str(), dead[0]["error"]["kind"].as_str()), (Some("too-many"), Some("schema")));
    let alone: HashMap<&str, f64> = scored.iter().filter_map(|v| Some((v["id"].as_str()?, v["reward"].as_f64()?))).collect();
    for g in 0..2 {
        let bon = scored.iter().find(|v| v["id"] == format!("bon{g}")).expect("ranked output");
        let c = bon["candidates"].as_array().unwrap();
        assert_eq!(c.len(), 3);
        for (i, cand) in c.iter().enumerate() {
            let (got, want) = (cand["reward"].as_f64().unwrap(), alone[format!("g{g}-{i}").as_str()]);
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "bon{g}/{i}: {got} vs {want} alone");
        }
        let best = bon["best"].as_u64().unwrap() as usize;
        assert!(c.iter().all(|x| x["reward"].as_f64() <= c[best]["reward"].as_f64()), "{bon}");
        assert_eq!(bon["ranking"].as_array().unwrap().len(), 3);
    }
}
