//! Helpers shared by the Kafka worker tests: the mock cluster (in this process or in a process
//! of its own), producing keyed events, reading topics back, the worker's config and process,
//! the group's committed offsets and the worker's metrics.
#![allow(dead_code)]

pub mod broker;
#[path = "../missing_tool/mod.rs"]
pub mod missing_tool;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

use crate::common_fixtures;
use broker::Broker;

pub const PARTITIONS: i32 = 4;
pub const INFLIGHT: usize = 256;

/// One output read back: key, JSON payload, headers (`None`: a null value).
pub type Output = (Option<String>, Value, Vec<(String, Option<String>)>);

/// Reads a topic from the beginning, every partition, without a consumer group. It does not
/// trust high watermarks (transaction markers take offsets too): a read is complete once
/// nothing new arrived for a while.
pub struct Reader {
    consumer: BaseConsumer,
    pub out: Vec<Output>,
}

impl Reader {
    /// A `read_committed` reader (librdkafka's default).
    pub fn new(bootstrap: &str, topic: &str) -> Self {
        Self::with_isolation(bootstrap, topic, "read_committed")
    }

    /// A reader of every partition of `topic` with `isolation.level` = `isolation`.
    pub fn with_isolation(bootstrap: &str, topic: &str, isolation: &str) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "reader")
            .set("enable.auto.commit", "false")
            .set("isolation.level", isolation)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions(&consumer, topic) {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        Self { consumer, out: Vec::new() }
    }

    /// Read until no message arrived for `idle`, or for at most `max`.
    pub fn drain(&mut self, idle: Duration, max: Duration) {
        let start = Instant::now();
        let mut last = start;
        while last.elapsed() < idle && start.elapsed() < max {
            if let Some(m) = self.consumer.poll(Duration::from_millis(50)) {
                let m = m.unwrap();
                let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter().map(|h| (h.key.to_owned(), h.value.map(|v| String::from_utf8_lossy(v).into_owned()))).collect()
                    })
                    .unwrap_or_default();
                self.out.push((key, serde_json::from_slice(m.payload().unwrap_or_default()).unwrap(), headers));
                last = Instant::now();
            }
        }
    }
}

/// The number of partitions of `topic`.
fn partitions<C: rdkafka::consumer::ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str) -> i32 {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30)).unwrap();
    let n = metadata.topics().iter().find(|t| t.name() == topic).map(|t| t.partitions().len()).unwrap_or(0);
    assert!(n > 0, "topic {topic} has no partitions");
    n as i32
}

/// Everything in `topic` now (committed transactions only).
pub fn read_topic(bootstrap: &str, topic: &str) -> Vec<Output> {
    let mut reader = Reader::new(bootstrap, topic);
    reader.drain(Duration::from_secs(2), Duration::MAX);
    reader.out
}

/// Everything in `topic` now, records of open and aborted transactions included.
pub fn read_topic_uncommitted(bootstrap: &str, topic: &str) -> Vec<Output> {
    let mut reader = Reader::with_isolation(bootstrap, topic, "read_uncommitted");
    reader.drain(Duration::from_secs(2), Duration::MAX);
    reader.out
}

/// Read `topic` until `done` holds for its contents; the worker must stay alive meanwhile.
pub async fn wait_for(
    bootstrap: &str,
    topic: &str,
    worker: &mut Worker,
    within: Duration,
    done: impl Fn(&[Output]) -> bool + Send + 'static,
) -> Vec<Output> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    let start = Instant::now();
    let reader = tokio::task::spawn_blocking(move || Reader::new(&bootstrap, &topic)).await.unwrap();
    let mut state = (reader, done);
    loop {
        let (next, finished) = tokio::task::spawn_blocking(move || {
            let (mut reader, done) = state;
            reader.drain(Duration::from_millis(500), Duration::from_millis(500));
            let finished = done(&reader.out);
            ((reader, done), finished)
        })
        .await
        .unwrap();
        state = next;
        if finished {
            return state.0.out;
        }
        assert!(worker.0.try_wait().unwrap().is_none(), "the worker exited early");
        assert!(start.elapsed() < within, "timed out waiting: {} messages", state.0.out.len());
    }
}

pub fn unique_ids(outputs: &[Output]) -> HashSet<&str> {
    outputs.iter().filter_map(|(_, v, _)| v["id"].as_str()).collect()
}

/// `n` events with unique ids `e0..`, keyed by one of 8 users (so one partition per user).
pub fn keyed_events(n: usize) -> Vec<(String, String)> {
    let convs = std::fs::read_to_string(common_fixtures::dir("arith").join("conversations.jsonl")).unwrap();
    let base: Vec<Value> = convs.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (0..n)
        .map(|i| {
            let mut v = base[i % base.len()].clone();
            v["id"] = Value::String(format!("e{i}"));
            (format!("user-{}", i % 8), v.to_string())
        })
        .collect()
}

/// An Apache Kafka broker holding `topics` and `n` [`keyed_events`] in `conv-in`, its bootstrap
/// servers and a folder for the workers' files; `None` where [`Broker::start`] skips.
pub async fn broker_with_events(topics: &[(&str, i32)], n: usize) -> Option<(Broker, String, tempfile::TempDir)> {
    let broker = Broker::start(topics).await?;
    let bootstrap = broker.bootstrap.clone();
    produce(&bootstrap, &keyed_events(n)).await;
    Some((broker, bootstrap, tempfile::tempdir().unwrap()))
}

pub fn cluster() -> (MockCluster<'static, rdkafka::producer::DefaultProducerContext>, String) {
    let cluster = MockCluster::new(3).unwrap();
    for topic in ["conv-in", "conv-scored", "conv-dead"] {
        cluster.create_topic(topic, PARTITIONS, 1).unwrap();
    }
    let bootstrap = cluster.bootstrap_servers();
    (cluster, bootstrap)
}

pub async fn produce(bootstrap: &str, events: &[(String, String)]) {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).set("linger.ms", "5").create().unwrap();
    for chunk in events.chunks(1000) {
        let sends = chunk.iter().map(|(key, payload)| {
            // A null header value must stay null through the worker.
            let headers = OwnedHeaders::new()
                .insert(Header { key: "trace", value: Some(key.as_bytes()) })
                .insert(Header::<&[u8]> { key: "null", value: None });
            producer.send(FutureRecord::to("conv-in").key(key).payload(payload).headers(headers), Duration::from_secs(5))
        });
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
    }
}

/// The worker's config; `sink_extra` goes into `[sink]`; /metrics on `http_port` (0: any).
pub fn write_config(dir: &Path, bootstrap: &str, sink_extra: &str, http_port: u16) -> PathBuf {
    WorkerConfig { sink_extra, http_port, ..WorkerConfig::new(bootstrap) }.write(&dir.join("worker.toml"))
}

/// What a Kafka worker test sets in the worker's config (`conv-in` → the arith model →
/// `conv-scored`, dead letters to `conv-dead`, group `scorestream`); the rest is fixed.
pub struct WorkerConfig<'a> {
    pub bootstrap: &'a str,
    /// The body of `[source]`'s librdkafka `options` table.
    pub source_options: &'a str,
    /// More lines of `[source]`.
    pub source_extra: &'a str,
    /// More lines of `[sink]`.
    pub sink_extra: &'a str,
    /// Lines after `[http]`: named sinks, routes.
    pub extra: &'a str,
    /// `max_inflight_events`.
    pub inflight: usize,
    /// /metrics on this port (0: any).
    pub http_port: u16,
}

impl<'a> WorkerConfig<'a> {
    /// The worker's own commit settings (no commit option overridden), [`INFLIGHT`] events in
    /// flight, and a 6 s group session: a killed member leaves the group after 6 s instead of
    /// librdkafka's default 45 s.
    pub fn new(bootstrap: &'a str) -> Self {
        Self {
            bootstrap,
            source_options: r#""session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000""#,
            source_extra: "",
            sink_extra: "",
            extra: "",
            inflight: INFLIGHT,
            http_port: 0,
        }
    }

    /// Write the config to `path`; returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        let Self { bootstrap, source_options, source_extra, sink_extra, extra, inflight, http_port } = self;
        let text = format!(
            r#"
            [model]
            path = "{model}"
            [batch]
            max_batch_events = 64
            max_wait = "5ms"
            max_inflight_events = {inflight}
            [source]
            type = "kafka"
            brokers = "{bootstrap}"
            topics = ["conv-in"]
            group_id = "scorestream"
            options = {{ {source_options} }}
            {source_extra}
            [sink]
            type = "kafka"
            brokers = "{bootstrap}"
            topic = "conv-scored"
            {sink_extra}
            [dead_letter]
            type = "kafka"
            brokers = "{bootstrap}"
            topic = "conv-dead"
            [http]
            listen = "127.0.0.1:{http_port}"
            {extra}
            "#,
            model = common_fixtures::dir("arith").display()
        );
        std::fs::write(path, text).unwrap();
        path.to_owned()
    }
}

/// A worker process, killed if the test fails before stopping it.
pub struct Worker(pub Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(config: &Path, log: &Path) -> Worker {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["run", "--config"])
        .arg(config)
        .env("SCORESTREAM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Worker(child)
}

pub fn terminate(mut worker: Worker) {
    assert!(Command::new("kill").args(["-TERM", &worker.0.id().to_string()]).status().unwrap().success());
    assert!(worker.0.wait().unwrap().success(), "exit 0 after SIGTERM");
}

/// The group's committed offsets of the input topic, per partition.
pub fn committed(bootstrap: &str) -> Vec<Offset> {
    // read_uncommitted: the offsets committed so far, without waiting for an open transaction.
    let group: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "scorestream")
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions(&group, "conv-in") {
        tpl.add_partition("conv-in", p);
    }
    let committed = group.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    committed.elements().iter().map(|e| e.offset()).collect()
}

/// The group's committed offsets of the input topic, summed over partitions.
pub fn committed_total(bootstrap: &str) -> i64 {
    committed(bootstrap)
        .into_iter()
        .enumerate()
        .map(|(p, offset)| match offset {
            Offset::Offset(o) => o,
            other => panic!("partition {p} has no committed offset: {other:?}"),
        })
        .sum()
}

/// The group's committed offsets of the input topic summed over partitions, a partition with
/// none (nothing committed yet, or an empty partition) counting 0.
pub fn committed_sum(bootstrap: &str) -> i64 {
    committed(bootstrap).into_iter().map(|o| if let Offset::Offset(o) = o { o } else { 0 }).sum()
}

/// One metric's value from the worker's /metrics on `port`.
pub fn metric(port: u16, series: &str) -> f64 {
    let body = metrics_text(port);
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not in /metrics:\n{body}"))
}

/// The worker's /metrics on `port` (empty while nothing listens there).
pub fn metrics_text(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// Whether the worker at `port` answers /readyz with 200 (model warm, source open).
pub fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.starts_with("HTTP/1.1 200")
}

/// The input partitions with a `scorestream_consumer_lag` series on the worker at `port`, and
/// their lag.
pub fn lag_series(port: u16) -> std::collections::BTreeMap<i32, i64> {
    metrics_text(port)
        .lines()
        .filter_map(|l| l.strip_prefix(r#"scorestream_consumer_lag{partition=""#))
        .filter_map(|l| {
            let (partition, rest) = l.split_once('"')?;
            let value = rest.strip_prefix(r#",topic="conv-in"} "#)?;
            Some((partition.parse().ok()?, value.trim().parse().ok()?))
        })
        .collect()
}

/// A free loopback port for a worker's /metrics.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The mock cluster in a process of its own (this test binary again, running its
/// `mock_cluster_process` test, which calls [`mock_cluster_main`]), so that a crash test kills
/// the worker only. Each test binary that uses it declares:
///
/// ```ignore
/// #[test]
/// #[ignore = "run by the tests as their broker's process"]
/// fn mock_cluster_process() { kafka_common::mock_cluster_main() }
/// ```
pub struct MockProcess {
    child: Child,
    pub bootstrap: String,
}

pub const MOCK_PROCESS: &str = "SCORESTREAM_TEST_MOCK_CLUSTER_PROCESS";

impl MockProcess {
    pub fn start() -> Self {
        use std::io::BufRead;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "mock_cluster_process", "--nocapture", "--test-threads=1"])
            .env(MOCK_PROCESS, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let bootstrap = lines
            .map_while(Result::ok)
            .find_map(|l| l.split_once("bootstrap: ").map(|(_, servers)| servers.to_owned()))
            .expect("the mock cluster process printed its bootstrap servers");
        Self { child, bootstrap }
    }
}

/// The body of [`MockProcess`]: a mock cluster with the test topics that serves until killed.
pub fn mock_cluster_main() {
    if std::env::var_os(MOCK_PROCESS).is_none() {
        return;
    }
    let (_cluster, bootstrap) = cluster();
    println!("bootstrap: {bootstrap}");
    loop {
        std::thread::park();
    }
}

impl Drop for MockProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mock cluster (in its own process) holding `n` keyed events, and a worker config for it.
pub struct Backlog {
    pub _cluster: MockProcess,
    pub bootstrap: String,
    pub _dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
}

pub async fn backlog(n: usize) -> Backlog {
    let cluster = MockProcess::start();
    let bootstrap = cluster.bootstrap.clone();
    produce(&bootstrap, &keyed_events(n)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &bootstrap, "", 0);
    let log = dir.path().join("worker.log");
    Backlog { _cluster: cluster, bootstrap, _dir: dir, config, log }
}

