//! Several filter subjects (`source.subject` + `source.subjects`) against both NATS servers the
//! tests use: on a current nats-server (2.15.1, ≥ 2.10) one durable consumer with
//! `filter_subjects` delivers exactly those subjects; on Debian's 2.9.10, which would silently
//! ignore the field and deliver the whole stream, the same config is refused at start with an
//! error naming the setting and the server version. An existing durable whose filters differ
//! from the config is refused on either server.

mod common_fixtures;
mod missing_tool;
mod nats_support;

use std::ffi::OsString;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use nats_support::{count, create_streams, events, free_port, terminate, wait_for_outputs, write_config_with, NatsServer};

/// The current nats-server: `SCORESTREAM_CURRENT_NATS_SERVER` (set by .ci/run), else the one
/// .ci/run installs under `target/tools`. `None` (test skipped) only outside CI.
fn current_server() -> Option<OsString> {
    let installed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/nats-current/bin/nats-server");
    let binary = std::env::var_os("SCORESTREAM_CURRENT_NATS_SERVER").unwrap_or_else(|| installed.into_os_string());
    if std::path::Path::new(&binary).exists() {
        return Some(binary);
    }
    missing_tool::skip_or_fail(&format!("no current nats-server at {binary:?}"), ".ci/run installs it");
    None
}

/// Start `binary` with an input stream CONV on three subjects and the output streams; returns
/// the server, its version and a JetStream context; `None` where `binary` is missing outside CI.
async fn start(binary: impl Into<OsString>) -> Option<(NatsServer, String, jetstream::Context)> {
    let server = NatsServer::start_binary(binary, "")?;
    let client = async_nats::connect(server.url()).await.unwrap();
    let version = client.server_info().version;
    let js = jetstream::new(client);
    let subjects = ["conv.in", "conv.extra", "conv.other"].map(String::from).to_vec();
    js.create_stream(stream::Config { name: "CONV".into(), subjects, ..Default::default() }).await.unwrap();
    create_streams(&js, &[("SCORED", "conv.scored"), ("DEAD", "conv.dead")]).await;
    Some((server, version, js))
}

/// The worker on `server` with the source's subjects `conv.in` + `conv.extra`, logging to a file
/// in `dir`.
fn spawn(dir: &std::path::Path, server: &NatsServer) -> Child {
    let config = write_config_with(dir, &server.url(), "", free_port(), |t| {
        t.replacen("subject = \"conv.in\"", "subject = \"conv.in\"\n        subjects = [\"conv.extra\"]", 1)
    });
    let log = std::fs::File::create(dir.join("worker.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["run", "--config"]).arg(config).stderr(Stdio::from(log)).spawn().unwrap()
}

/// Wait for the worker to exit by itself (at most 60 s); its status and log.
fn wait_exit(mut worker: Child, dir: &std::path::Path) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = worker.try_wait().unwrap() {
            return (status, std::fs::read_to_string(dir.join("worker.log")).unwrap());
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = worker.kill();
            panic!("the worker did not stop: {}", std::fs::read_to_string(dir.join("worker.log")).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn publish(js: &jetstream::Context, subject: &str, lines: &[String]) {
    for line in lines {
        js.publish(subject.to_owned(), line.clone().into()).await.unwrap().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_server_serves_several_subjects_with_one_consumer() {
    let Some(binary) = current_server() else { return };
    let Some((server, version, js)) = start(binary).await else { return };
    assert!(scorestream::nats::at_least(&version, (2, 10)), "{version} is not a current server");
    let lines = events(300);
    publish(&js, "conv.in", &lines[..100]).await;
    publish(&js, "conv.extra", &lines[100..200]).await;
    publish(&js, "conv.other", &lines[200..]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut worker = spawn(dir.path(), &server);
    wait_for_outputs(&js, &["SCORED", "DEAD"], 200, &mut worker, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = || std::fs::read_to_string(dir.path().join("worker.log")).unwrap();
    assert_eq!((count(&js, "SCORED").await, count(&js, "DEAD").await), (200, 0), "{}", log());

    let mut stream = js.get_stream("CONV").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 1, "one consumer for both subjects");
    let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer("scorestream").await.unwrap();
    let info = consumer.info().await.unwrap().clone();
    assert_eq!(info.config.filter_subjects, ["conv.in", "conv.extra"]);
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "conv.other is not delivered, the rest acked");
    eprintln!("nats-server {version}: 200 of 200 inputs on conv.in + conv.extra scored by one consumer, conv.other untouched");
    assert!(terminate(worker).success(), "{}", log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_2_9_refuses_several_subjects_at_start() {
    let Some((server, version, js)) = start("nats-server").await else { return };
    assert!(!scorestream::nats::at_least(&version, (2, 10)), "Debian's nats-server is {version}, expected 2.9");
    publish(&js, "conv.other", &events(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let (status, log) = wait_exit(spawn(dir.path(), &server), dir.path());
    assert!(!status.success(), "{log}");
    let error = log.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line: {log}"));
    assert!(error.contains("source.subjects") && error.contains(&version) && error.contains("2.10"), "{error}");
    eprintln!("{error}");
    let mut stream = js.get_stream("CONV").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 0, "no consumer created");
    assert_eq!(count(&js, "SCORED").await + count(&js, "DEAD").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_with_other_filters_is_refused_at_start() {
    let Some((server, _version, js)) = start("nats-server").await else { return };
    let stream = js.get_stream("CONV").await.unwrap();
    let other = pull::Config { durable_name: Some("scorestream".into()), filter_subject: "conv.other".into(), ..Default::default() };
    stream.create_consumer(other).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), &server.url(), "", free_port(), |t| t);
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let worker =
        Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["run", "--config"]).arg(config).stderr(Stdio::from(log)).spawn().unwrap();
    let (status, log) = wait_exit(worker, dir.path());
    assert!(!status.success(), "{log}");
    let error = log.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line: {log}"));
    assert!(error.contains("\"scorestream\"") && error.contains("conv.other") && error.contains("source.durable"), "{error}");
}
