//! `scorestream run` against librdkafka's mock cluster (`rdkafka::mocking`, a real Kafka
//! protocol peer on loopback, in this test process, or for the crash and SIGTERM tests in a
//! process of its own; the worker is always a child process):
//! - 10k events, on the mock cluster and on tansu (a real Kafka-protocol broker, when installed;
//!   required under CI): every input lands scored or dead-lettered, per-key (so per-partition) order is
//!   kept, keys and headers carry over, rewards equal `scorestream score`, SIGTERM exits 0 and
//!   the group's committed offsets cover every input;
//! - kill -9 mid-stream, several times: nothing lost, duplicates within the in-flight bound;
//! - `delivery = "exactly_once"`: outputs and offsets go through producer transactions, and a
//!   transaction the broker refuses is aborted and retried. The mock cluster does not hide
//!   aborted transactions from read-committed readers, so this checks the call sequence and the
//!   abort handling, not the isolation itself;
//! - a client configured for TLS through the pass-through options fails at start, clearly, and
//!   so does a SCRAM login with wrong credentials on tansu with authentication on.

mod common_fixtures;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

/// The worker tests each run a model on both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const PARTITIONS: i32 = 4;
const INFLIGHT: usize = 256;

/// One output read back: key, JSON payload, headers.
type Output = (Option<String>, Value, Vec<(String, String)>);

/// Reads a topic from the beginning, every partition, without a consumer group. It does not
/// trust high watermarks (tansu's count record batches, not records): a read is complete once
/// nothing new arrived for a while.
struct Reader {
    consumer: BaseConsumer,
    out: Vec<Output>,
}

impl Reader {
    fn new(bootstrap: &str, topic: &str) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        Self { consumer, out: Vec::new() }
    }

    /// Read until no message arrived for `idle`, or for at most `max`.
    fn drain(&mut self, idle: Duration, max: Duration) {
        let start = Instant::now();
        let mut last = start;
        while last.elapsed() < idle && start.elapsed() < max {
            if let Some(m) = self.consumer.poll(Duration::from_millis(50)) {
                let m = m.unwrap();
                let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter().map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect()
                    })
                    .unwrap_or_default();
                self.out.push((key, serde_json::from_slice(m.payload().unwrap_or_default()).unwrap(), headers));
                last = Instant::now();
            }
        }
    }
}

/// Everything in `topic` now.
fn read_topic(bootstrap: &str, topic: &str) -> Vec<Output> {
    let mut reader = Reader::new(bootstrap, topic);
    reader.drain(Duration::from_secs(2), Duration::MAX);
    reader.out
}

/// Read `topic` until `done` holds for its contents; the worker must stay alive meanwhile.
async fn wait_for(
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

fn unique_ids(outputs: &[Output]) -> HashSet<&str> {
    outputs.iter().filter_map(|(_, v, _)| v["id"].as_str()).collect()
}

/// `n` events with unique ids `e0..`, keyed by one of 8 users (so one partition per user).
fn keyed_events(n: usize) -> Vec<(String, String)> {
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

fn cluster() -> (MockCluster<'static, rdkafka::producer::DefaultProducerContext>, String) {
    let cluster = MockCluster::new(3).unwrap();
    for topic in ["conv-in", "conv-scored", "conv-dead"] {
        cluster.create_topic(topic, PARTITIONS, 1).unwrap();
    }
    let bootstrap = cluster.bootstrap_servers();
    (cluster, bootstrap)
}

async fn produce(bootstrap: &str, events: &[(String, String)]) {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).set("linger.ms", "5").create().unwrap();
    for chunk in events.chunks(1000) {
        let sends = chunk.iter().map(|(key, payload)| {
            let headers = OwnedHeaders::new().insert(Header { key: "trace", value: Some(key.as_bytes()) });
            producer.send(FutureRecord::to("conv-in").key(key).payload(payload).headers(headers), Duration::from_secs(5))
        });
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
    }
}

/// The worker's config; `sink_extra` goes into `[sink]`; /metrics on `http_port` (0: any).
fn write_config(dir: &Path, bootstrap: &str, sink_extra: &str, http_port: u16) -> PathBuf {
    let config = dir.join("worker.toml");
    let text = format!(
        r#"
        [model]
        path = "{model}"
        [batch]
        max_batch_events = 64
        max_wait = "5ms"
        max_inflight_events = {INFLIGHT}
        [source]
        type = "kafka"
        brokers = "{bootstrap}"
        topics = ["conv-in"]
        group_id = "scorestream"
        # A killed member leaves the group after 6 s instead of librdkafka's default 45 s.
        options = {{ "auto.commit.interval.ms" = "100", "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000" }}
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
        "#,
        model = common_fixtures::dir("arith").display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// A worker process, killed if the test fails before stopping it.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(config: &Path, log: &Path) -> Worker {
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

fn terminate(mut worker: Worker) {
    assert!(Command::new("kill").args(["-TERM", &worker.0.id().to_string()]).status().unwrap().success());
    assert!(worker.0.wait().unwrap().success(), "exit 0 after SIGTERM");
}

/// The group's committed offsets of the input topic, per partition.
fn committed(bootstrap: &str) -> Vec<Offset> {
    let group: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", "scorestream").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition("conv-in", p);
    }
    let committed = group.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    committed.elements().iter().map(|e| e.offset()).collect()
}

/// The group's committed offsets of the input topic, summed over partitions.
fn committed_total(bootstrap: &str) -> i64 {
    committed(bootstrap)
        .into_iter()
        .enumerate()
        .map(|(p, offset)| match offset {
            Offset::Offset(o) => o,
            other => panic!("partition {p} has no committed offset: {other:?}"),
        })
        .sum()
}

/// One metric's value from the worker's /metrics on `port`.
fn metric(port: u16, series: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not in /metrics:\n{body}"))
}

/// A tansu broker (a real Kafka-protocol broker, memory storage) on loopback with the test
/// topics; `None` when tansu is not installed outside CI (`.ci/run` installs it).
struct Tansu {
    child: Child,
    bootstrap: String,
}

impl Tansu {
    /// With `authenticate`, clients must log in (SASL SCRAM); no user exists, and no topic is
    /// created.
    async fn start(authenticate: bool) -> Option<Self> {
        let cargo_bin = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|c| c.join("bin/tansu"));
        let exe = ["tansu".into()].into_iter().chain(cargo_bin).find(|p: &PathBuf| Command::new(p).arg("--help").output().is_ok());
        let Some(exe) = exe else {
            assert!(std::env::var_os("CI").is_none(), "tansu is missing: .ci/run installs it with cargo install");
            eprintln!("tansu is not installed: skipping (see .ci/run)");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut args = vec!["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", "memory://tansu/"];
        if authenticate {
            args.push("--authentication");
        }
        let child = Command::new(exe)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "tansu did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        let bootstrap = format!("127.0.0.1:{port}");
        if authenticate {
            return Some(Self { child, bootstrap });
        }
        // tansu does not create topics on demand.
        let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
        let topics: Vec<rdkafka::admin::NewTopic> = ["conv-in", "conv-scored", "conv-dead"]
            .iter()
            .map(|t| rdkafka::admin::NewTopic::new(t, PARTITIONS, rdkafka::admin::TopicReplication::Fixed(1)))
            .collect();
        for r in admin.create_topics(&topics, &rdkafka::admin::AdminOptions::new()).await.unwrap() {
            r.unwrap();
        }
        Some(Self { child, bootstrap })
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_is_scored_in_order_and_committed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_cluster, bootstrap) = cluster();
    end_to_end(&bootstrap, 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_is_scored_in_order_and_committed_on_tansu() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(tansu) = Tansu::start(false).await else { return };
    end_to_end(&tansu.bootstrap, 10_000).await;
}

/// `n` good events and one broken one through a worker: every input scored or dead-lettered,
/// keys, headers and per-partition order kept, rewards equal `scorestream score`, SIGTERM exits
/// 0 with every input's offset committed.
async fn end_to_end(bootstrap: &str, n: usize) {
    let bootstrap = bootstrap.to_owned();
    let events = keyed_events(n);
    produce(&bootstrap, &events).await;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    producer.send(FutureRecord::to("conv-in").key("user-0").payload("{broken"), Duration::from_secs(5)).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &bootstrap, "", 0);
    let mut worker = spawn(&config, &dir.path().join("worker.log"));
    let scored = wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(600), move |o| o.len() >= n).await;
    let dead = wait_for(&bootstrap, "conv-dead", &mut worker, Duration::from_secs(30), move |o| !o.is_empty()).await;
    assert_eq!(scored.len(), n, "every good input scored once");
    assert_eq!(unique_ids(&scored).len(), n);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1["error"]["kind"], "invalid_json");
    assert_eq!(dead[0].1["payload"], "{broken");
    assert_eq!(dead[0].1["source"]["topic"], "conv-in");

    // Keys and headers carry over; per key (one input partition) the outputs keep input order.
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (key, v, headers) in &scored {
        let key = key.clone().expect("output keyed by the input key");
        assert!(headers.contains(&("trace".to_owned(), key.clone())), "{headers:?}");
        per_key.entry(key).or_default().push(v["id"].as_str().unwrap()[1..].parse().unwrap());
    }
    assert_eq!(per_key.len(), 8);
    for (key, ids) in &per_key {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{key}: outputs out of input order");
    }
    let reference = common_fixtures::score_cli_rewards(dir.path(), &events.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>());
    for (_, v, _) in &scored {
        let id = v["id"].as_str().unwrap();
        assert!((v["reward"].as_f64().unwrap() - reference[id]).abs() <= 1e-5 * reference[id].abs().max(1.0), "{id}");
    }

    // SIGTERM: exit 0 with every message of the input topic (n good + 1 bad) committed.
    terminate(worker);
    assert_eq!(committed_total(&bootstrap) as usize, n + 1);
}

/// The mock cluster in a process of its own (this test binary again, running
/// [`mock_cluster_process`]), so that a crash test kills the worker only.
struct MockProcess {
    child: Child,
    bootstrap: String,
}

const MOCK_PROCESS: &str = "SCORESTREAM_TEST_MOCK_CLUSTER_PROCESS";

impl MockProcess {
    fn start() -> Self {
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
#[test]
#[ignore = "run by the crash and SIGTERM tests as their broker's process"]
fn mock_cluster_process() {
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
struct Backlog {
    _cluster: MockProcess,
    bootstrap: String,
    _dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
}

async fn backlog(n: usize) -> Backlog {
    let cluster = MockProcess::start();
    let bootstrap = cluster.bootstrap.clone();
    produce(&bootstrap, &keyed_events(n)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &bootstrap, "", 0);
    let log = dir.path().join("worker.log");
    Backlog { _cluster: cluster, bootstrap, _dir: dir, config, log }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_duplicates_stay_within_the_inflight_bound() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 4_000;
    let Backlog { _cluster, bootstrap, _dir, config, log } = backlog(n).await;
    let kills = 3;
    let mut at_kill = Vec::new();
    for round in 0..kills {
        let mut worker = spawn(&config, &log);
        let target = 800 * (round + 1);
        wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), move |o| unique_ids(o).len() >= target).await;
        worker.0.kill().unwrap(); // SIGKILL: no drain, no final commit
        worker.0.wait().unwrap();
        let (b, t) = (bootstrap.clone(), "conv-scored");
        at_kill.push(tokio::task::spawn_blocking(move || unique_ids(&read_topic(&b, t)).len()).await.unwrap());
    }
    assert!(at_kill.iter().all(|&scored| scored < n), "killed mid-stream: {at_kill:?} of {n} scored at each kill");
    let mut worker = spawn(&config, &log);
    let outputs = wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), move |o| unique_ids(o).len() >= n).await;
    terminate(worker);

    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (_, v, _) in &outputs {
        *seen.entry(v["id"].as_str().unwrap()).or_default() += 1;
    }
    assert_eq!(seen.len(), n, "every input scored");
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    println!("{kills} kills ({at_kill:?} scored at each): {} outputs for {n} inputs, {duplicates} duplicates", outputs.len());
    // Replayed per kill: what was in flight (at most max_inflight_events) plus what was acked
    // but not yet committed (auto-commit every 100 ms, less than another in-flight window of
    // output on this machine).
    assert!(duplicates <= kills * 2 * INFLIGHT, "{duplicates} duplicates for {kills} kills");
    assert_eq!(committed_total(&bootstrap) as usize, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_commits_offsets_in_transactions_and_retries_refused_ones() {
    use rdkafka::types::RDKafkaApiKey;
    use rdkafka::types::RDKafkaRespErr;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (cluster, bootstrap) = cluster();
    let n = 2_000;
    produce(&bootstrap, &keyed_events(n)).await;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    producer.send(FutureRecord::to("conv-in").key("user-0").payload("{broken"), Duration::from_secs(5)).await.unwrap();
    // The broker refuses the worker's first transactions (an abortable error): each must be
    // aborted and its batch retried in a new transaction.
    let refused = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3];
    cluster.request_errors(RDKafkaApiKey::AddPartitionsToTxn, &refused);

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = write_config(dir.path(), &bootstrap, r#"delivery = "exactly_once"
        transactional_id = "scorestream-test""#, port);
    let log = dir.path().join("worker.log");
    let mut worker = spawn(&config, &log);
    let scored = wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), move |o| unique_ids(o).len() >= n).await;
    let dead = wait_for(&bootstrap, "conv-dead", &mut worker, Duration::from_secs(30), move |o| !o.is_empty()).await;
    let committed_txns = metric(port, r#"scorestream_kafka_transactions_total{outcome="committed"}"#);
    let aborted_txns = metric(port, r#"scorestream_kafka_transactions_total{outcome="aborted"}"#);
    terminate(worker);
    println!("{committed_txns} transactions committed, {aborted_txns} aborted");

    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("exactly-once: transactions initialised"), "{log}");
    assert!(log.contains("transaction failed; aborting and retrying the batch"), "the refused transactions were aborted: {log}");
    assert_eq!(unique_ids(&scored).len(), n);
    assert!(dead.iter().all(|d| d.1["error"]["kind"] == "invalid_json" && d.1["payload"] == "{broken"), "{dead:?}");
    // Every batch committed in a transaction (at most 64 events each), refused ones aborted.
    assert!(committed_txns >= (n / 64) as f64, "{committed_txns} transactions for {n} events");
    assert!(aborted_txns >= 1.0);
    // The consumer itself committed nothing (auto-commit off, no commit at shutdown): offsets go
    // only through send_offsets_to_transaction, which the mock accepts without storing.
    assert!(committed(&bootstrap).iter().all(|o| *o == Offset::Invalid), "{:?}", committed(&bootstrap));
}

/// `scorestream run` with `extra` in the source's options must exit non-zero within `within`,
/// its error mentioning each of `expected`.
fn assert_fails_to_start(bootstrap: &str, extra: &str, expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), bootstrap, "", 0);
    let text = std::fs::read_to_string(&config).unwrap().replace(r#""heartbeat.interval.ms" = "1000""#, &format!(r#""heartbeat.interval.ms" = "1000", {extra}"#));
    std::fs::write(&config, text).unwrap();
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["run", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(start.elapsed() < Duration::from_secs(90), "took {:?}", start.elapsed());
    let last = stderr.lines().rev().find(|l| l.starts_with("error:")).unwrap_or_default();
    for e in expected {
        assert!(last.contains(e), "{e:?} not in {last:?}");
    }
}

#[test]
fn a_client_with_wrong_tls_or_sasl_options_fails_at_start_naming_the_cause() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_cluster, bootstrap) = cluster();
    // TLS towards a plaintext listener: the handshake fails; the error names the brokers and
    // librdkafka's reason.
    assert_fails_to_start(&bootstrap, r#""security.protocol" = "SSL""#, &["cannot reach the Kafka brokers at", &bootstrap, "SSL"]);
    // A CA file that does not exist.
    assert_fails_to_start(
        &bootstrap,
        r#""security.protocol" = "SSL", "ssl.ca.location" = "/nonexistent/ca.pem""#,
        &["invalid librdkafka configuration", "ssl.ca.location"],
    );
    // A SASL mechanism librdkafka does not know.
    assert_fails_to_start(
        &bootstrap,
        r#""security.protocol" = "SASL_PLAINTEXT", "sasl.mechanisms" = "NOPE""#,
        &["invalid librdkafka configuration", "NOPE"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_with_wrong_credentials_fails_at_start_on_tansu() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(tansu) = Tansu::start(true).await else { return };
    // A real broker that authenticates: SCRAM login with credentials it does not know.
    assert_fails_to_start(
        &tansu.bootstrap,
        r#""security.protocol" = "SASL_PLAINTEXT", "sasl.mechanisms" = "SCRAM-SHA-512", "sasl.username" = "scorer", "sasl.password" = "wrong""#,
        &["cannot reach the Kafka brokers at", "SASL authentication error", "SCRAM authentication failed"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_and_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 4_000;
    let Backlog { _cluster, bootstrap, _dir, config, log } = backlog(n).await;

    // SIGTERM while the backlog is being scored: the worker drains what it holds, commits and
    // exits 0; the next worker goes on from there.
    let mut worker = spawn(&config, &log);
    wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), |o| o.len() >= 1_000).await;
    let stopped = Instant::now();
    terminate(worker);
    println!("drained and exited 0 in {:?}", stopped.elapsed());
    let (b, t) = (bootstrap.clone(), "conv-scored");
    let at_stop = tokio::task::spawn_blocking(move || read_topic(&b, t).len()).await.unwrap();
    assert!(at_stop < n, "stopped mid-stream: {at_stop} of {n} scored");

    let mut worker = spawn(&config, &log);
    let outputs = wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), move |o| unique_ids(o).len() >= n).await;
    terminate(worker);
    assert_eq!(outputs.len(), n, "every input scored exactly once across the restart ({at_stop} before it)");
    assert_eq!(committed_total(&bootstrap) as usize, n);

    // A second signal exits at once (status 130), without draining: sent while the worker is
    // busy with a new backlog.
    produce(&bootstrap, &keyed_events(n)).await;
    let mut worker = spawn(&config, &log);
    wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), move |o| o.len() >= n + 500).await;
    for _ in 0..2 {
        assert!(Command::new("kill").args(["-TERM", &worker.0.id().to_string()]).status().unwrap().success());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(worker.0.wait().unwrap().code(), Some(130));
}
