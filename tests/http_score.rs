//! `POST /v1/score`: concurrent clients while a NATS stream runs get what `scorestream score`
//! gives on the same events, in order, with error records in place; `scorestream serve` answers
//! without a stream; oversized bodies (413), missing or wrong tokens (401) and bursts over
//! `http.max_pending_events` (429 with Retry-After) are refused.

mod common_fixtures;
mod nats_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nats_support::{count, events, free_port, metrics_text, publish_all, setup_streams, spawn_worker, terminate, write_config_with, NatsServer};
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
    let server = NatsServer::start("");
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
