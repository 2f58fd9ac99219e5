//! `delivery = "exactly_once"` against librdkafka's mock cluster: outputs and offsets go through
//! producer transactions, and a transaction the broker refuses is aborted and retried. The mock
//! cluster does not hide aborted transactions from read-committed readers, so this checks the
//! call sequence and the abort handling, not the isolation itself (`kafka_exactly_once.rs` does,
//! on Apache Kafka).

mod common_fixtures;
mod kafka_common;

use std::time::{Duration, Instant};

use kafka_common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_commits_offsets_in_transactions_and_retries_refused_ones() {
    use rdkafka::types::RDKafkaApiKey;
    use rdkafka::types::RDKafkaRespErr;
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
