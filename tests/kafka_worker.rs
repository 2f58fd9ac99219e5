//! `scorestream run` against librdkafka's mock cluster (`rdkafka::mocking`, a real Kafka
//! protocol peer on loopback, in this test process; the worker is always a child process;
//! crashes, SIGTERM and rebalances are in `kafka_churn.rs`):
//! - 10k events, on the mock cluster and on an Apache Kafka broker (`kafka_common/broker.rs`;
//!   skipped when not installed, required under CI): every input lands scored or dead-lettered, per-key (so per-partition) order is
//!   kept, keys and headers (a null value stays null) carry over, rewards equal `scorestream score`, SIGTERM exits 0 and
//!   the group's committed offsets cover every input;
//! - `delivery = "exactly_once"`: outputs and offsets go through producer transactions, and a
//!   transaction the broker refuses is aborted and retried. The mock cluster does not hide
//!   aborted transactions from read-committed readers, so this checks the call sequence and the
//!   abort handling, not the isolation itself;
//! - a client configured for TLS through the pass-through options fails at start, clearly, and
//!   so does a SCRAM login with wrong credentials or TLS towards an untrusted certificate on
//!   Apache Kafka, where SCRAM-SHA-512 with the right credentials and TLS with the broker's CA
//!   score every input.

mod common_fixtures;
mod kafka_common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kafka_common::broker::{Broker, SCRAM_USER};
use kafka_common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset};

/// The worker tests each run a model on both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const TOPICS: [(&str, i32); 3] = [("conv-in", PARTITIONS), ("conv-scored", PARTITIONS), ("conv-dead", PARTITIONS)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_is_scored_in_order_and_committed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_cluster, bootstrap) = cluster();
    end_to_end(&bootstrap, 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_is_scored_in_order_and_committed_on_apache_kafka() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(broker) = Broker::start(&TOPICS).await else { return };
    end_to_end(&broker.bootstrap, 10_000).await;
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

/// A worker config at `dir` for `bootstrap` whose three clients (source, sink, dead letter) all
/// use the librdkafka `options` (`"key" = "value", ...`).
fn write_secured_config(dir: &Path, bootstrap: &str, options: &str) -> std::path::PathBuf {
    let config = write_config(dir, bootstrap, "", 0);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(r#""heartbeat.interval.ms" = "1000""#, &format!(r#""heartbeat.interval.ms" = "1000", {options}"#))
        .replace(r#"topic = "conv-scored""#, &format!("topic = \"conv-scored\"\n        options = {{ {options} }}"))
        .replace(r#"topic = "conv-dead""#, &format!("topic = \"conv-dead\"\n        options = {{ {options} }}"));
    std::fs::write(&config, text).unwrap();
    config
}

/// A worker whose clients use `options` against `bootstrap` scores `n` new inputs (read back
/// over `plain`, the broker's plaintext listener) and exits 0 on SIGTERM.
async fn scores_through(plain: &str, bootstrap: &str, options: &str, first: usize, n: usize) {
    let events: Vec<(String, String)> = keyed_events(first + n).split_off(first);
    produce(plain, &events).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_secured_config(dir.path(), bootstrap, options);
    let log = dir.path().join("worker.log");
    let mut worker = spawn(&config, &log);
    let total = first + n;
    let scored = wait_for(plain, "conv-scored", &mut worker, Duration::from_secs(300), move |o| unique_ids(o).len() >= total).await;
    assert_eq!(unique_ids(&scored).len(), total);
    terminate(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_and_tls_logins_succeed_and_wrong_ones_fail_at_start_on_apache_kafka() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(broker) = Broker::start(&TOPICS).await else { return };
    let (user, password) = SCRAM_USER;
    let scram = |password: &str| {
        format!(r#""security.protocol" = "SASL_PLAINTEXT", "sasl.mechanisms" = "SCRAM-SHA-512", "sasl.username" = "{user}", "sasl.password" = "{password}""#)
    };
    // SCRAM-SHA-512 with the user created when the broker's storage was formatted.
    scores_through(&broker.bootstrap, &broker.sasl_bootstrap, &scram(password), 0, 200).await;
    // TLS, the broker's certificate checked against the CA made for it (host name included).
    let tls = format!(r#""security.protocol" = "SSL", "ssl.ca.location" = "{}""#, broker.ca().display());
    scores_through(&broker.bootstrap, &broker.tls_bootstrap, &tls, 200, 200).await;

    // A wrong password: the broker refuses the login, and the error says so.
    assert_fails_to_start(
        &broker.sasl_bootstrap,
        &scram("wrong"),
        &["cannot reach the Kafka brokers at", &broker.sasl_bootstrap, "SASL authentication error", "Authentication failed"],
    );
    // A CA that did not sign the broker's certificate.
    let other = tempfile::tempdir().unwrap();
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=another-ca"])
        .current_dir(other.path())
        .output()
        .unwrap();
    assert!(made.status.success());
    let untrusted = format!(r#""security.protocol" = "SSL", "ssl.ca.location" = "{}""#, other.path().join("ca.pem").display());
    assert_fails_to_start(&broker.tls_bootstrap, &untrusted, &["cannot reach the Kafka brokers at", "certificate verify failed"]);
}
