//! `scorestream run` against librdkafka's mock cluster (`rdkafka::mocking`, a real Kafka
//! protocol peer on loopback, in this test process; the worker is always a child process;
//! crashes, SIGTERM and rebalances are in `kafka_churn.rs`):
//! - 10k events, on the mock cluster and on tansu (a real Kafka-protocol broker, when installed;
//!   required under CI): every input lands scored or dead-lettered, per-key (so per-partition) order is
//!   kept, keys and headers (a null value stays null) carry over, rewards equal `scorestream score`, SIGTERM exits 0 and
//!   the group's committed offsets cover every input;
//! - `delivery = "exactly_once"`: outputs and offsets go through producer transactions, and a
//!   transaction the broker refuses is aborted and retried. The mock cluster does not hide
//!   aborted transactions from read-committed readers, so this checks the call sequence and the
//!   abort handling, not the isolation itself;
//! - a client configured for TLS through the pass-through options fails at start, clearly, and
//!   so does a SCRAM login with wrong credentials on tansu with authentication on.

mod common_fixtures;
mod kafka_common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kafka_common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset};

/// The worker tests each run a model on both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

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
        assert_eq!(headers, &[("trace".to_owned(), Some(key.clone())), ("null".to_owned(), None)], "headers carried over in order, null kept null");
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
    // Lag is exported in exactly-once mode too (the consumer commits nothing itself).
    let start = Instant::now();
    while lag_series(port).len() < PARTITIONS as usize && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lag = lag_series(port);
    assert_eq!(lag.keys().copied().collect::<Vec<_>>(), (0..PARTITIONS).collect::<Vec<_>>(), "{lag:?}");
    let committed_txns = metric(port, r#"scorestream_kafka_transactions_total{outcome="committed"}"#);
    let aborted_txns = metric(port, r#"scorestream_kafka_transactions_total{outcome="aborted"}"#);
    terminate(worker);
    println!("{committed_txns} transactions committed, {aborted_txns} aborted");

    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("exactly-once: transactions initialised"), "{log}");
    assert!(log.contains("transaction failed; aborted, replaying the batch"), "the refused transactions were aborted: {log}");
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
