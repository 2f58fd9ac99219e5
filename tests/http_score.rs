//! `POST /v1/score`: concurrent clients while a NATS stream runs get what `scorestream score`
//! gives on the same events, in order, with error records in place; `scorestream serve` answers
//! without a stream; oversized bodies (413), missing or wrong tokens (401) and bursts over
//! `http.max_pending_events` (429 with Retry-After) are refused.

mod common_fixtures;
mod nats_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nats_support::{
    count, events, free_port, metrics_text, publish_all, setup_streams, spawn_worker, terminate, wait_for_outputs, write_config_with,
    NatsServer,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "s3cret-token";

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// One request on its own connection.
async fn post(port: u16, body: &[u8], token: Option<&str>) -> Reply {
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!("POST /v1/score HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n", body.len());
    let (mut read, mut write) = s.into_split();
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    // Written while the answer is read: the server may answer (413) before reading it all.
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&request).await;
        write
    });
    let mut buf = Vec::new();
    let _ = read.read_to_end(&mut buf).await;
    drop(writer.await);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Reply { status, head: head.to_owned(), body: body.to_owned() }
}

async fn wait_ready(port: u16, worker: &mut Child) {
    let start = Instant::now();
    while nats_support::http_status(port, "/readyz").await != Some(200) {
        assert!(worker.try_wait().unwrap().is_none(), "the worker exited early");
        assert!(start.elapsed() < Duration::from_secs(120), "not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn reward(v: &Value) -> f64 {
    v["reward"].as_f64().unwrap_or_else(|| panic!("no reward: {v}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-5 * b.abs().max(1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_while_a_stream_runs_get_what_score_gives() {
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    let stream_events = events(3_000);
    publish_all(&js, &stream_events).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let port = free_port();
    let config = write_config_with(dir.path(), &server.url(), "", port, |t| {
        format!("{t}\nscore_api = true\ntoken_file = \"{}\"\nmax_pending_events = 4096\n", token_file.display())
    });
    let mut worker = spawn_worker(&config);
    wait_ready(port, &mut worker).await;
    let posted: Vec<String> = events(720).into_iter().map(|l| l.replacen("\"id\":\"", "\"id\":\"http-", 1)).collect();
    let refs: Vec<&str> = posted.iter().map(String::as_str).collect();
    let reference = common_fixtures::score_cli_rewards(dir.path(), &refs);
    // 8 clients at once, each 90 events: arrays of 30, single objects, JSONL; an invalid event
    // in each array gets its error record in place.
    let mut clients = Vec::new();
    for chunk in posted.chunks(90) {
        let chunk = chunk.to_vec();
        clients.push(tokio::spawn(async move {
            let mut got: Vec<Value> = Vec::new();
            for (i, part) in chunk.chunks(30).enumerate() {
                match i {
                    0 => {
                        let body = format!("[{},{{\"oops\":1}}]", part.join(","));
                        let r = post(port, body.as_bytes(), Some(TOKEN)).await;
                        assert_eq!(r.status, 200, "{}", r.body);
                        let mut all: Vec<Value> = serde_json::from_str(&r.body).unwrap();
                        let bad = all.pop().unwrap();
                        assert!(bad["error"]["kind"].is_string(), "{bad}");
                        assert!(bad["source"]["http"].is_object(), "{bad}");
                        got.extend(all);
                    }
                    1 => {
                        for line in part {
                            let r = post(port, line.as_bytes(), Some(TOKEN)).await;
                            assert_eq!(r.status, 200, "{}", r.body);
                            got.push(serde_json::from_str(&r.body).unwrap());
                        }
                    }
                    _ => {
                        let r = post(port, part.join("\n").as_bytes(), Some(TOKEN)).await;
                        assert_eq!(r.status, 200, "{}", r.body);
                        assert!(r.head.to_lowercase().contains("application/x-ndjson"), "{}", r.head);
                        got.extend(r.body.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()));
                    }
                }
            }
            (chunk, got)
        }));
    }
    for client in clients {
        let (sent, got) = client.await.unwrap();
        assert_eq!(got.len(), sent.len());
        for (line, out) in sent.iter().zip(&got) {
            let id = serde_json::from_str::<Value>(line).unwrap()["id"].as_str().unwrap().to_owned();
            assert_eq!(out["id"], id.as_str(), "results in request order");
            assert!(close(reward(out), reference[&id]), "{id}: {} vs {}", reward(out), reference[&id]);
        }
    }
    // The stream went on beside the requests, and none of the posted events was published.
    let start = Instant::now();
    while count(&js, "SCORED").await < 3_000 {
        assert!(start.elapsed() < Duration::from_secs(120), "the stream did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&js, "SCORED").await, 3_000);
    let metrics = metrics_text(port).await;
    let line = "scorestream_events_consumed_total{source=\"http\"} 728";
    assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    assert!(terminate(worker).success());
}

/// `scorestream serve` on a config with only `[model]`, `[batch]` and `[http]`.
fn serve(dir: &Path, port: u16, http: &str, batch: &str) -> Child {
    let text = format!(
        "[model]\npath = \"{}\"\n[batch]\n{batch}\n[http]\nlisten = \"127.0.0.1:{port}\"\n{http}\n",
        common_fixtures::dir("arith").display()
    );
    let config = dir.join("serve.toml");
    std::fs::write(&config, text).unwrap();
    Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["serve", "--config"]).arg(&config).stderr(Stdio::null()).spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_refuses_big_bodies_bad_tokens_and_bursts() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let port = free_port();
    // A partial batch waits 300 ms: a request holds its places that long.
    let http = format!("max_pending_events = 8\nmax_body_bytes = 65536\ntoken_file = \"{}\"", token_file.display());
    let mut worker = serve(dir.path(), port, &http, "max_wait = \"300ms\"\nmax_batch_events = 64");
    wait_ready(port, &mut worker).await;
    let one = events(1).remove(0);

    assert_eq!(post(port, one.as_bytes(), None).await.status, 401);
    let wrong = post(port, one.as_bytes(), Some("s3cret-tokeX")).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.head.to_lowercase().contains("www-authenticate: bearer"), "{}", wrong.head);
    let ok = post(port, one.as_bytes(), Some(TOKEN)).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(serde_json::from_str::<Value>(&ok.body).unwrap()["reward"].is_number());

    let big = format!("[{}]", vec![one.as_str(); 2000].join(","));
    assert_eq!(post(port, big.as_bytes(), Some(TOKEN)).await.status, 413);
    let nine = format!("[{}]", vec![one.as_str(); 9].join(","));
    assert_eq!(post(port, nine.as_bytes(), Some(TOKEN)).await.status, 413, "more events than can ever wait");

    // Malformed JSON: the request succeeds, the event's result is its error record.
    let bad = post(port, b"{\"id\": \"x\", \"messages\": [", Some(TOKEN)).await;
    assert_eq!(bad.status, 200, "{}", bad.body);
    assert_eq!(serde_json::from_str::<Value>(&bad.body).unwrap()["error"]["kind"], "invalid_json");

    // A burst of 8-event requests: one holds every place while its batch waits.
    let eight = format!("[{}]", vec![one.as_str(); 8].join(","));
    let burst: Vec<_> = (0..12)
        .map(|_| {
            let body = eight.clone();
            tokio::spawn(async move { post(port, body.as_bytes(), Some(TOKEN)).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for r in burst {
        let r = r.await.unwrap();
        if r.status == 429 {
            assert!(r.head.to_lowercase().contains("retry-after: 1"), "{}", r.head);
        }
        statuses.push(r.status);
    }
    assert!(statuses.contains(&429) && statuses.contains(&200), "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert!(terminate(worker).success());
}

/// `n` posted events (ids `slow-<tag>-…`), each with `pad` bytes of metadata, which the
/// answer echoes: a large `pad` makes a large answer.
fn padded(tag: &str, n: usize, pad: usize) -> Vec<String> {
    events(n)
        .into_iter()
        .map(|l| {
            let mut v: Value = serde_json::from_str(&l).unwrap();
            v["id"] = Value::String(format!("slow-{tag}-{}", v["id"].as_str().unwrap()));
            if pad > 0 {
                v["metadata"] = serde_json::json!({ "pad": "x".repeat(pad) });
            }
            v.to_string()
        })
        .collect()
}

/// A request whose header is sent now and whose body is sent by `send_body`.
async fn open_request(port: u16, len: usize, recv_buffer: Option<u32>) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut s = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let head = format!("POST /v1/score HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Everything the server sends until it closes (a reset ends it too), parsed.
async fn read_reply(mut s: tokio::net::TcpStream) -> (Reply, usize) {
    let mut buf = Vec::new();
    let mut chunk = vec![0; 64 * 1024];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (Reply { status, head: head.to_owned(), body: body.to_owned() }, buf.len())
}

/// Every result of an array answer has the reward `reference` gives its event, in order.
fn assert_scored(body: &str, sent: &[String], reference: &std::collections::HashMap<String, f64>) {
    let got: Vec<Value> = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {}", &body[..body.len().min(300)]));
    assert_eq!(got.len(), sent.len());
    for (line, out) in sent.iter().zip(&got) {
        let id = serde_json::from_str::<Value>(line).unwrap()["id"].as_str().unwrap().to_owned();
        assert_eq!(out["id"], id.as_str());
        assert!(close(reward(out), reference[&id]), "{id}: {} vs {}", reward(out), reference[&id]);
    }
}

fn consumed_http(metrics: &str) -> u64 {
    let line = metrics.lines().find(|l| l.starts_with("scorestream_events_consumed_total{source=\"http\"}")).unwrap();
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// While clients trickle their bodies and others never read their answers, other clients and
/// the stream are served; once the slow ones go on, their events are scored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_stall_neither_other_clients_nor_the_stream() {
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Timeouts far above the test's length: only the slow clients themselves end their wait.
    let config = write_config_with(dir.path(), &server.url(), "", port, |t| {
        format!("{t}\nscore_api = true\nmax_pending_events = 4096\nmax_body_bytes = 33554432\nbody_timeout = \"300s\"\nwrite_timeout = \"300s\"\n")
    });
    let mut worker = spawn_worker(&config);
    let mut guard = nats_support::KillOnFailure(worker.id(), true);
    wait_ready(port, &mut worker).await;
    let fast = padded("fast", 120, 0);
    let tricklers: Vec<Vec<String>> = (0..8).map(|i| padded(&format!("t{i}"), 10, 0)).collect();
    let big = padded("big", 400, 20_000);
    let mut all: Vec<&str> = fast.iter().chain(tricklers.iter().flatten()).map(String::as_str).collect();
    all.extend(big.iter().take(1).map(String::as_str));
    let reference = common_fixtures::score_cli_rewards(dir.path(), &all);

    // Eight clients send half their body, then wait; two send a large request and do not read
    // its (8 MB) answer.
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let mut slow = Vec::new();
    for events in &tricklers {
        let body = format!("[{}]", events.join(","));
        let mut s = open_request(port, body.len(), None).await;
        let (first, rest) = body.as_bytes().split_at(body.len() / 2);
        s.write_all(first).await.unwrap();
        let (rest, mut go) = (rest.to_vec(), go.clone());
        slow.push(tokio::spawn(async move {
            go.wait_for(|g| *g).await.unwrap();
            s.write_all(&rest).await.unwrap();
            read_reply(s).await
        }));
    }
    let big_body = format!("[{}]", big.join(","));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let mut s = open_request(port, big_body.len(), Some(4096)).await;
        let (body, mut go) = (big_body.clone(), go.clone());
        readers.push(tokio::spawn(async move {
            s.write_all(body.as_bytes()).await.unwrap();
            go.wait_for(|g| *g).await.unwrap();
            read_reply(s).await
        }));
    }
    // Meanwhile: the stream scores, and other clients get their answers.
    let stream_events = events(600);
    publish_all(&js, &stream_events).await;
    for part in fast.chunks(30) {
        let r = post(port, format!("[{}]", part.join(",")).as_bytes(), None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_scored(&r.body, part, &reference);
    }
    wait_for_outputs(&js, &["SCORED"], 600, &mut worker, Duration::from_secs(120)).await;
    assert!(slow.iter().chain(&readers).all(|t| !t.is_finished()), "the slow clients are still waiting");
    // The big requests were scored while their clients did not read: their answers are stuck
    // in the connection, not in the pipeline.
    let start = Instant::now();
    while consumed_http(&metrics_text(port).await) < 120 + 800 {
        assert!(start.elapsed() < Duration::from_secs(120), "the big requests were not scored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The slow clients go on: each gets all its events scored.
    go_tx.send(true).unwrap();
    for (task, sent) in slow.into_iter().zip(&tricklers) {
        let (r, _) = task.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_scored(&r.body, sent, &reference);
    }
    for task in readers {
        let (r, _) = task.await.unwrap();
        assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(300)]);
        let got: Vec<Value> = serde_json::from_str(&r.body).unwrap();
        assert_eq!(got.len(), big.len());
        let id = got[0]["id"].as_str().unwrap();
        assert!(close(reward(&got[0]), reference[id]));
    }
    assert_eq!(count(&js, "SCORED").await, 600, "no posted event was published");
    guard.1 = false;
    assert!(terminate(worker).success());
}

/// A body slower than `http.body_timeout` gets 408 and none of its events is scored; one within
/// it is scored; a client that does not read its answer for `http.write_timeout` is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_over_the_body_timeout_get_408_and_unread_answers_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let http = "max_pending_events = 4096\nmax_body_bytes = 33554432\nbody_timeout = \"3s\"\nwrite_timeout = \"2s\"\nheader_timeout = \"60s\"";
    let mut worker = serve(dir.path(), port, http, "max_wait = \"5ms\"");
    let mut guard = nats_support::KillOnFailure(worker.id(), true);
    wait_ready(port, &mut worker).await;
    let within = padded("within", 10, 0);
    let late = padded("late", 10, 0);
    let big = padded("big", 400, 20_000);
    let refs: Vec<&str> = within.iter().chain(&big[..1]).map(String::as_str).collect();
    let reference = common_fixtures::score_cli_rewards(dir.path(), &refs);

    // Within the timeout: the body arrives in ten pieces over about 1.5 s.
    let body = format!("[{}]", within.join(","));
    let mut s = open_request(port, body.len(), None).await;
    for piece in body.as_bytes().chunks(body.len().div_ceil(10)) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (r, _) = read_reply(s).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_scored(&r.body, &within, &reference);

    // Over it: half the body, then nothing; the answer is 408 and comes without the rest.
    let body = format!("[{}]", late.join(","));
    let mut s = open_request(port, body.len(), None).await;
    s.write_all(&body.as_bytes()[..body.len() / 2]).await.unwrap();
    let started = Instant::now();
    let (r, _) = read_reply(s).await;
    assert_eq!(r.status, 408, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(30), "answered after {:?}", started.elapsed());
    assert_eq!(consumed_http(&metrics_text(port).await), 10, "no event of the late body was taken");

    // A client that never reads its 8 MB answer: the connection is closed before it is all sent.
    let big_body = format!("[{}]", big.join(","));
    let mut s = open_request(port, big_body.len(), Some(4096)).await;
    s.write_all(big_body.as_bytes()).await.unwrap();
    let start = Instant::now();
    while consumed_http(&metrics_text(port).await) < 410 {
        assert!(start.elapsed() < Duration::from_secs(120), "the big request was not scored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (r, received) = read_reply(s).await;
    assert_eq!(r.status, 200);
    assert!(received < 400 * 20_000, "{received} bytes: the answer was not cut off");
    // Meanwhile others are answered as before.
    let r = post(port, within[0].as_bytes(), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    guard.1 = false;
    assert!(terminate(worker).success());
}

/// `scorestream score` with `args`: exit code, output lines, error record lines.
fn score_cli(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, Vec<String>, String) {
    let errors = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .env("SCORESTREAM_LOG", "scorestream=debug")
        .arg("score")
        .args(args)
        .arg("--errors")
        .arg(errors.path())
        .output()
        .unwrap();
    let records = std::fs::read_to_string(errors.path()).unwrap().lines().map(str::to_owned).collect();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), records, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Output lines equal but for float noise in the rewards (batches differ).
fn assert_same_outputs(remote: &str, local: &str) {
    let (remote, local): (Vec<&str>, Vec<&str>) = (remote.lines().collect(), local.lines().collect());
    assert_eq!(remote.len(), local.len());
    for (r, l) in remote.iter().zip(&local) {
        let (mut r, mut l): (Value, Value) = (serde_json::from_str(r).unwrap(), serde_json::from_str(l).unwrap());
        assert!(close(reward(&r), reward(&l)), "{r} vs {l}");
        r["reward"] = Value::Null;
        l["reward"] = Value::Null;
        assert_eq!(r, l);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_url_writes_what_a_local_score_writes() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (port, api_port) = (free_port(), free_port());
    // Fewer places than one default request holds (256): requests are split (413) and, four at
    // a time, often find the places taken (429, retried after Retry-After). The API has its own
    // listener (`http.api_listen`); the probes and metrics stay on `listen`.
    let http = format!(
        "max_pending_events = 100\ntoken_file = \"{}\"\napi_listen = \"127.0.0.1:{api_port}\"",
        token_file.display()
    );
    let mut worker = serve(dir.path(), port, &http, "max_wait = \"20ms\"");
    let mut guard = nats_support::KillOnFailure(worker.id(), true);
    wait_ready(port, &mut worker).await;
    assert_eq!(post(port, events(1)[0].as_bytes(), Some(TOKEN)).await.status, 404, "no API on listen");
    assert_eq!(nats_support::http_status(api_port, "/metrics").await, Some(404), "only the API on api_listen");
    // Events, blank lines, malformed JSON, an array line, two lines that together form one JSON
    // value, a schema error, an event with metadata.
    let mut lines = events(1_000);
    lines.insert(3, String::new());
    lines.insert(10, "{\"id\": \"broken\", \"messages\": [".into());
    lines.insert(20, "[{\"id\":\"a\"}]".into());
    lines.insert(30, "{\"id\":".into());
    lines.insert(31, "\"split\"}".into());
    lines.insert(40, "{\"id\":\"no-messages\"}".into());
    lines.insert(50, "   ".into());
    lines[60] = lines[60].replacen('{', "{\"metadata\":{\"team\":\"a\"},", 1);
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let model = common_fixtures::dir("arith");
    let url = format!("http://127.0.0.1:{api_port}");
    let (code, local_out, local_err, stderr) = score_cli(&["--model".as_ref(), model.as_os_str(), "--input".as_ref(), input.as_os_str()]);
    assert_eq!(code, Some(0), "{stderr}");
    let remote = |token: &Path, input: &Path| {
        score_cli(&["--url".as_ref(), url.as_ref(), "--token-file".as_ref(), token.as_os_str(), "--input".as_ref(), input.as_os_str()])
    };
    let (code, remote_out, remote_err, stderr) = remote(&token_file, &input);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(local_err.len(), 5, "{local_err:#?}");
    assert_eq!(remote_err, local_err, "the same error records, with their line numbers");
    assert_same_outputs(&remote_out, &local_out);
    assert_eq!(remote_out.lines().count(), 1_000);
    let busy = stderr.matches("the worker is busy").count();
    println!("1,000 events, 1,007 lines through --url: {} error records, {busy} answers 429 retried", remote_err.len());

    // No line scored: exit status 3 from both.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{oops\n{\"id\":\"x\"}\n").unwrap();
    let (local_code, _, local_err, _) = score_cli(&["--model".as_ref(), model.as_os_str(), "--input".as_ref(), bad.as_os_str()]);
    let (remote_code, _, remote_err, _) = remote(&token_file, &bad);
    assert_eq!((remote_code, remote_err), (local_code, local_err));
    assert_eq!(remote_code, Some(3));

    // A wrong token fails the run (1), naming the refusal.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    let (code, out, _, stderr) = remote(&wrong, &input);
    assert_eq!(code, Some(1));
    assert!(out.is_empty() && stderr.contains("401"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "{stderr}");
    guard.1 = false;
    assert!(terminate(worker).success());
}
