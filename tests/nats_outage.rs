//! A JetStream server (file storage) killed mid-stream and restarted on the same store
//! directory: the worker stalls, `/readyz` turns 503 (the source mirrors the client's
//! connection state), it turns ready again by itself, and every input ends scored (none lost;
//! duplicates only as at-least-once allows, and JetStream de-duplicates by message id).

mod common_fixtures;
mod nats_support;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nats_support::{count, events, free_port, http_status, publish_all, read_all, setup_streams, terminate, write_config, NatsServer};

/// Wait until `GET /readyz` answers `want`, for at most `limit`.
async fn wait_ready(port: u16, want: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if http_status(port, "/readyz").await == Some(want) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "/readyz did not turn {want} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_restart_mid_stream_stalls_then_recovers_with_nothing_lost() {
    let Some(mut server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    let n = 4000;
    let lines = events(n);
    publish_all(&js, &lines).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), &server.url(), "", port);
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let show_log = || std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    wait_ready(port, 200, Duration::from_secs(60)).await;

    // Mid-stream: some outputs published, most inputs still waiting.
    let start = Instant::now();
    let mut before = 0;
    while before < 200 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress before the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
        before = count(&js, "SCORED").await;
    }
    assert!(before < n as u64, "the backlog ran out before the outage: make it larger");
    server.kill();
    let down = wait_ready(port, 503, Duration::from_secs(15)).await;
    assert_eq!(http_status(port, "/healthz").await, Some(200), "a broker outage is not the worker's fault");
    assert!(worker.try_wait().unwrap().is_none(), "the worker survives the outage: {}", show_log());
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.restart();
    let up = wait_ready(port, 200, Duration::from_secs(60)).await;
    eprintln!("outage: /readyz 503 after {down:?}, 200 again {up:?} after the restart");

    let js = setup_streams(&server.url()).await;
    let start = Instant::now();
    loop {
        let ids: HashSet<String> =
            read_all(&js, "SCORED").await.iter().map(|v| v["id"].as_str().unwrap().to_owned()).collect();
        if ids.len() == n {
            break;
        }
        assert!(worker.try_wait().unwrap().is_none(), "the worker exited: {}", show_log());
        assert!(start.elapsed() < Duration::from_secs(120), "{} of {n} inputs scored after the restart: {}", ids.len(), show_log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let scored = count(&js, "SCORED").await;
    eprintln!("{n} inputs, {scored} scored outputs ({} duplicates)", scored - n as u64);
    assert_eq!(count(&js, "DEAD").await, 0, "{}", show_log());
    assert!(terminate(worker).success(), "{}", show_log());
}
