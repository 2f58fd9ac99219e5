//! A real nats-server with JetStream for the worker tests, and the helpers they share: config,
//! streams, events, publishing, reading back.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::DeliverPolicy, stream};
use futures::StreamExt;
use serde_json::Value;

use crate::common_fixtures;

#[path = "../missing_tool/mod.rs"]
pub mod missing_tool;

/// The nats-server to test against: `SCORESTREAM_NATS_SERVER` when set (scripts/test.sh runs the
/// NATS tests again with a current release, installed by .ci/run), else `nats-server` (Debian's).
pub fn server_binary() -> std::ffi::OsString {
    std::env::var_os("SCORESTREAM_NATS_SERVER").unwrap_or_else(|| "nats-server".into())
}

/// A nats-server with JetStream (file storage) in a temporary directory; killed on drop.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    conf: std::path::PathBuf,
    binary: std::ffi::OsString,
}

impl NatsServer {
    /// The server of [`server_binary`] with `extra_config`; `None` when it is not installed
    /// outside CI (a missing tool fails under `CI`: `tests/missing_tool`).
    pub fn start(extra_config: &str) -> Option<Self> {
        Self::start_binary(server_binary(), extra_config)
    }

    /// [`NatsServer::start`] with a given nats-server binary.
    pub fn start_binary(binary: impl Into<std::ffi::OsString>, extra_config: &str) -> Option<Self> {
        let binary = binary.into();
        if Command::new(&binary).arg("--version").output().is_err() {
            missing_tool::skip_or_fail(&format!("no nats-server at {binary:?}"), "install Debian's nats-server package (.ci/run does)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = dir.path().join("nats.conf");
        let store = dir.path().join("js");
        std::fs::write(
            &conf,
            format!("listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n{extra_config}\n", store.display()),
        )
        .unwrap();
        let child = spawn_server(&binary, &conf, port);
        Some(Self { child, port, _dir: dir, conf, binary })
    }

    /// SIGKILL the server (what JetStream wrote stays in its store directory).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start the server again on the same port and store directory.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn_server(&self.binary, &self.conf, self.port);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

fn spawn_server(binary: &std::ffi::OsStr, conf: &Path, port: u16) -> Child {
    let child = match Command::new(binary).arg("-c").arg(conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
        Ok(c) => c,
        Err(e) => panic!("{binary:?} could not start ({e}); install Debian's nats-server package"),
    };
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "nats-server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The status code of `GET path` on the worker's HTTP port, `None` when it does not answer.
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_config(dir: &Path, url: &str, auth: &str, port: u16) -> std::path::PathBuf {
    write_config_with(dir, url, auth, port, |t| t)
}

/// [`write_config`] with the config text passed through `edit` (e.g. to rename the durable).
pub fn write_config_with(dir: &Path, url: &str, auth: &str, port: u16, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let text = format!(
        r#"
        shutdown_timeout = "20s"
        [model]
        path = "{model}"
        [batch]
        max_batch_events = 32
        max_wait = "5ms"
        max_inflight_events = 64
        [source]
        type = "nats"
        url = "{url}"
        stream = "CONV"
        subject = "conv.in"
        durable = "scorestream"
        ack_wait = "3s"
        {auth}
        [sink]
        type = "nats"
        url = "{url}"
        subject = "conv.scored"
        {auth}
        [dead_letter]
        type = "nats"
        url = "{url}"
        subject = "conv.dead"
        {auth}
        [http]
        listen = "127.0.0.1:{port}"
        "#,
        model = common_fixtures::dir("arith").display(),
    );
    let path = dir.join("worker.toml");
    std::fs::write(&path, edit(text)).unwrap();
    path
}

/// Connect to `url` and create the streams CONV (`conv.in`), SCORED (`conv.scored`) and DEAD
/// (`conv.dead`).
pub async fn setup_streams(url: &str) -> jetstream::Context {
    setup_streams_as(async_nats::connect(url).await.unwrap()).await
}

/// [`setup_streams`] through `client` (connected with credentials or TLS).
pub async fn setup_streams_as(client: async_nats::Client) -> jetstream::Context {
    let js = jetstream::new(client);
    create_streams(&js, &[("CONV", "conv.in"), ("SCORED", "conv.scored"), ("DEAD", "conv.dead")]).await;
    js
}

/// Create each `(name, subject)` stream, or keep it when it exists.
pub async fn create_streams(js: &jetstream::Context, streams: &[(&str, &str)]) {
    for (name, subject) in streams {
        js.get_or_create_stream(stream::Config { name: (*name).into(), subjects: vec![(*subject).into()], ..Default::default() })
            .await
            .unwrap();
    }
}

/// Every message of a stream, in order.
pub async fn read_all(js: &jetstream::Context, name: &str) -> Vec<Value> {
    let mut s = js.get_stream(name).await.unwrap();
    let n = s.info().await.unwrap().state.messages as usize;
    if n == 0 {
        return Vec::new();
    }
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap().take(n);
    let mut out = Vec::new();
    while let Some(m) = msgs.next().await {
        out.push(serde_json::from_slice(&m.unwrap().payload).unwrap());
    }
    out
}

/// `n` events with unique ids, cycling through the trained fixture's conversations.
pub fn events(n: usize) -> Vec<String> {
    let convs = std::fs::read_to_string(common_fixtures::dir("arith").join("conversations.jsonl")).unwrap();
    let base: Vec<Value> = convs.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (0..n)
        .map(|i| {
            let mut v = base[i % base.len()].clone();
            v["id"] = Value::String(format!("{}#{i}", v["id"].as_str().unwrap()));
            v.to_string()
        })
        .collect()
}

/// Publish and wait for every PubAck, a window at a time.
pub async fn publish_all<S: AsRef<str>>(js: &jetstream::Context, lines: &[S]) {
    for chunk in lines.chunks(500) {
        let mut acks = Vec::with_capacity(chunk.len());
        for line in chunk {
            acks.push(js.publish("conv.in", line.as_ref().as_bytes().to_vec().into()).await.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
}

pub fn spawn_worker(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["run", "--config"]).arg(config).stderr(Stdio::null()).spawn().unwrap()
}

/// `spawn_worker` with its log written to `log`.
pub fn spawn_logged_worker(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["run", "--config"]).arg(config).stderr(Stdio::from(log)).spawn().unwrap()
}

/// SIGKILLs the worker (pid) when the test fails before it is stopped (while `.1` holds).
pub struct KillOnFailure(pub u32, pub bool);

impl Drop for KillOnFailure {
    fn drop(&mut self) {
        if self.1 {
            let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
        }
    }
}

pub async fn count(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name).await.unwrap().info().await.unwrap().state.messages
}


/// Wait until the streams `names` hold `n` messages together, while `worker` keeps running.
pub async fn wait_for_outputs(js: &jetstream::Context, names: &[&str], n: u64, worker: &mut Child, limit: Duration) {
    let start = Instant::now();
    loop {
        let mut total = 0;
        for name in names {
            total += count(js, name).await;
        }
        if total >= n {
            return;
        }
        assert!(worker.try_wait().unwrap().is_none(), "the worker exited early");
        assert!(start.elapsed() < limit, "timed out: {total} of {n} outputs published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, then the exit status.
pub fn terminate(mut worker: Child) -> std::process::ExitStatus {
    assert!(Command::new("kill").args(["-TERM", &worker.id().to_string()]).status().unwrap().success());
    worker.wait().unwrap()
}

/// The durable consumer's (ack pending, pending, deliveries so far).
pub async fn consumer_state(js: &jetstream::Context, stream: &str, durable: &str) -> (usize, u64, u64) {
    let mut consumer: jetstream::consumer::PullConsumer =
        js.get_stream(stream).await.unwrap().get_consumer(durable).await.unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_ack_pending, info.num_pending, info.delivered.consumer_sequence)
}

/// Wait until the durable consumer has no delivered message left unacknowledged, failing with
/// `what` after `limit`; then its [`consumer_state`].
pub async fn wait_all_acked(js: &jetstream::Context, stream: &str, durable: &str, limit: Duration, what: &str) -> (usize, u64, u64) {
    let start = Instant::now();
    loop {
        let state = consumer_state(js, stream, durable).await;
        if state.0 == 0 {
            return state;
        }
        assert!(start.elapsed() < limit, "{what}: {} unacknowledged", state.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The worker's `/metrics` text.
pub async fn metrics_text(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
