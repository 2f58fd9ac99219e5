//! Start-up that fails fast: a wrong stream, an unreachable broker or a missing secret file
//! stops `scorestream run` before the model loads (the log has no model-load line), and
//! `/healthz` is 503 until the model has loaded.

mod common_fixtures;
mod nats_support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nats_support::{free_port, http_status, setup_streams, write_config_with, NatsServer};

/// Run the worker on `config` to its end (at most 60 s); its output and how long it ran.
fn run_to_end(config: &std::path::Path) -> (Output, Duration) {
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (out, start.elapsed())
}

/// The worker failed, naming `reason`, before any model-load line.
fn assert_failed_before_the_load((out, took): (Output, Duration), reason: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(reason), "the error names {reason:?}: {err}");
    for line in ["planned stage", "loading the model", "model loaded"] {
        assert!(!err.contains(line), "the model was loaded first ({line:?}): {err}");
    }
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_stream_fails_before_the_model_loads() {
    let Some(server) = NatsServer::start("") else { return };
    setup_streams(&server.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), &server.url(), "", free_port(), |t| t.replace(r#"stream = "CONV""#, r#"stream = "NOPE""#));
    assert_failed_before_the_load(run_to_end(&config), r#"JetStream stream "NOPE" is not available"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://127.0.0.1:{}", free_port());
    let config = write_config_with(dir.path(), &url, "", free_port(), |t| t);
    assert_failed_before_the_load(run_to_end(&config), &url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_file_fails_before_the_model_loads() {
    let Some(server) = NatsServer::start("") else { return };
    setup_streams(&server.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.creds");
    let auth = format!("credentials_file = {:?}", missing.display().to_string());
    let config = write_config_with(dir.path(), &server.url(), &auth, free_port(), |t| t);
    assert_failed_before_the_load(run_to_end(&config), "absent.creds");
}

/// A broker that accepts connections and never answers holds the start-up check: meanwhile,
/// before any model load, `/healthz` and `/readyz` are 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_until_the_model_has_loaded() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://{}", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config_with(dir.path(), &url, "", port, |t| t);
    let mut worker = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = http_status(port, "/healthz").await {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no /healthz answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "healthy before the model loaded");
    assert_eq!(http_status(port, "/readyz").await, Some(503));
    let _ = worker.kill();
    let _ = worker.wait();
    drop(silent);
}
