//! `scorestream run` end to end over Kafka: librdkafka's mock cluster (`rdkafka::mocking`, a
//! real Kafka protocol peer on loopback, in this test process) and an Apache Kafka broker
//! (`kafka_common/broker.rs`; skipped when not installed, required under CI). The worker is
//! always a child process; crashes, SIGTERM and rebalances are in `kafka_churn.rs`, exactly-once
//! over the mock cluster in `kafka_worker_transactions.rs`, TLS and SASL in
//! `kafka_worker_security.rs`.
//!
//! 10k events: every input lands scored or dead-lettered, per-key (so per-partition) order is
//! kept, keys and headers (a null value stays null) carry over, rewards equal `scorestream
//! score`, SIGTERM exits 0 and the group's committed offsets cover every input.

mod common_fixtures;
mod kafka_common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kafka_common::broker::Broker;
use kafka_common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

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
