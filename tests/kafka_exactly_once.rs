//! `delivery = "exactly_once"` on an Apache Kafka broker (single-node KRaft, see
//! `kafka_common/broker.rs`): the isolation itself, which neither librdkafka's mock cluster nor
//! tansu can show (both hand aborted records to `read_committed` readers).
//! - 3 kill -9s, each placed inside an open transaction (the worker is stopped, the topic checked
//!   for records of an open transaction, then killed), and a broker kill -9 + restart on the same
//!   log directory mid-stream: a `read_committed` reader sees every input's output exactly once;
//!   a `read_uncommitted` reader sees the aborted ones too; at each kill the group's committed
//!   input offsets equal the committed outputs (offsets move only with outputs);
//! - zombie fencing: a second worker with the same `transactional_id` fences the first, which
//!   exits non-zero naming the cause; nothing is committed twice.

mod common_fixtures;
mod kafka_common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kafka_common::broker::Broker;
use kafka_common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// The worker tests each run a model on both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const TOPICS: [(&str, i32); 3] = [("conv-in", PARTITIONS), ("conv-scored", PARTITIONS), ("conv-dead", PARTITIONS)];

/// The exactly-once sink settings; `linger.ms` keeps each transaction open ~100 ms, so that a
/// stopped worker is often caught inside one.
fn exactly_once(transactional_id: &str) -> String {
    format!(
        r#"delivery = "exactly_once"
        transactional_id = "{transactional_id}"
        options = {{ "linger.ms" = "100" }}"#
    )
}

/// Outputs per input id.
fn counts(outputs: &[Output]) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (_, v, _) in outputs {
        let id = v["id"].as_str().map(str::to_owned).unwrap_or_else(|| v["payload"].to_string());
        *seen.entry(id).or_default() += 1;
    }
    seen
}

/// Whether `topic` holds records of a transaction still open: on some partition the high
/// watermark is past the last stable offset (what a `read_committed` client is told is the end).
fn open_transaction(bootstrap: &str, topic: &str) -> bool {
    let client = |isolation: &str| -> BaseConsumer {
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("isolation.level", isolation).create().unwrap()
    };
    let (uncommitted, committed) = (client("read_uncommitted"), client("read_committed"));
    (0..PARTITIONS).any(|p| {
        let high = uncommitted.fetch_watermarks(topic, p, Duration::from_secs(5)).unwrap().1;
        let stable = committed.fetch_watermarks(topic, p, Duration::from_secs(5)).unwrap().1;
        high > stable
    })
}

fn signal(worker: &Worker, sig: &str) {
    assert!(Command::new("kill").args([sig, &worker.0.id().to_string()]).status().unwrap().success());
}

/// kill -9 `worker` while it has a transaction open with outputs in it.
async fn kill_inside_a_transaction(bootstrap: &str, mut worker: Worker) {
    for attempt in 0.. {
        assert!(attempt < 300, "never caught the worker inside a transaction");
        signal(&worker, "-STOP");
        let b = bootstrap.to_owned();
        if tokio::task::spawn_blocking(move || open_transaction(&b, "conv-scored")).await.unwrap() {
            break;
        }
        signal(&worker, "-CONT");
        tokio::time::sleep(Duration::from_millis(10 + 7 * (attempt % 5))).await;
    }
    worker.0.kill().unwrap();
    worker.0.wait().unwrap();
}

/// Committed outputs (scored and dead-lettered) now, and the committed input offsets: equal,
/// one output per input; no input twice.
async fn check_offsets_follow_outputs(bootstrap: &str) -> usize {
    let b = bootstrap.to_owned();
    let (outputs, offsets) = tokio::task::spawn_blocking(move || {
        let mut outputs = read_topic(&b, "conv-scored");
        outputs.extend(read_topic(&b, "conv-dead"));
        (outputs, committed_sum(&b))
    })
    .await
    .unwrap();
    let dup: Vec<_> = counts(&outputs).into_iter().filter(|(_, c)| *c > 1).collect();
    assert!(dup.is_empty(), "committed twice: {dup:?}");
    assert_eq!(offsets as usize, outputs.len(), "committed input offsets move with the committed outputs");
    outputs.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_once_across_kills_inside_transactions_and_a_broker_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut broker) = Broker::start(&TOPICS).await else { return };
    let bootstrap = broker.bootstrap.clone();
    let n = 3_000;
    produce(&bootstrap, &keyed_events(n)).await;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    producer.send(FutureRecord::to("conv-in").key("user-0").payload("{broken"), Duration::from_secs(5)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &bootstrap, &exactly_once("scorestream-eos"), 0);
    let log = dir.path().join("worker.log");

    let mut at_kill = Vec::new();
    for round in 0..3 {
        let mut worker = spawn(&config, &log);
        let target = 500 * (round + 1);
        wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), move |o| o.len() >= target).await;
        kill_inside_a_transaction(&bootstrap, worker).await;
        at_kill.push(check_offsets_follow_outputs(&bootstrap).await);
    }
    assert!(at_kill.iter().all(|&c| c < n), "killed mid-stream: {at_kill:?}");

    // The broker killed and started again on its log directory, mid-stream. If the worker's
    // group session expired meanwhile, its next offset commit is refused: it stops, naming the
    // cause, and is started again (as its supervisor would).
    let mut worker = spawn(&config, &log);
    wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), move |o| o.len() >= 2_000).await;
    broker.kill();
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.restart().await;
    println!("broker away for {:?}", outage.elapsed());
    let mut restarts = 0;
    let start = Instant::now();
    loop {
        let b = bootstrap.clone();
        if tokio::task::spawn_blocking(move || read_topic(&b, "conv-scored").len()).await.unwrap() >= n {
            break;
        }
        if let Some(status) = worker.0.try_wait().unwrap() {
            let text = std::fs::read_to_string(&log).unwrap();
            let last = text.lines().rev().find(|l| l.starts_with("error:")).unwrap_or_default().to_owned();
            assert!(!status.success() && last.contains("lost its group membership"), "{status}: {last:?}");
            println!("after the broker restart the worker stopped: {last}");
            restarts += 1;
            assert!(restarts <= 2, "restarted twice already");
            worker = spawn(&config, &log);
        }
        assert!(start.elapsed() < Duration::from_secs(300), "timed out after the broker restart");
    }
    let scored = Vec::new();
    let dead = wait_for(&bootstrap, "conv-dead", &mut worker, Duration::from_secs(60), |o| !o.is_empty()).await;
    terminate(worker);

    let b = bootstrap.clone();
    let (scored, dead, all_scored) = tokio::task::spawn_blocking(move || {
        (read_topic(&b, "conv-scored"), read_topic(&b, "conv-dead"), read_topic_uncommitted(&b, "conv-scored"))
    })
    .await
    .map(|(s, d, a)| (if s.len() >= scored.len() { s } else { scored }, if d.len() >= dead.len() { d } else { dead }, a))
    .unwrap();
    let once = counts(&scored);
    assert_eq!(once.len(), n, "every good input scored");
    assert!(once.values().all(|&c| c == 1), "read_committed: each output exactly once");
    assert_eq!(scored.len(), n);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].1["payload"], "{broken");
    // The kills left aborted outputs behind: there for a read_uncommitted reader, hidden from
    // read_committed ones.
    let aborted = all_scored.len() - n;
    println!("kills at {at_kill:?} committed outputs; {aborted} aborted outputs hidden from read_committed readers");
    assert!(aborted >= 3, "each kill aborted an open transaction with outputs: {aborted}");
    assert!(counts(&all_scored).values().any(|&c| c > 1));
    assert_eq!(committed_sum(&bootstrap) as usize, n + 1, "every input's offset committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_with_the_same_transactional_id_fences_the_first() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(broker) = Broker::start(&TOPICS).await else { return };
    let bootstrap = broker.bootstrap.clone();
    let n = 2_000;
    produce(&bootstrap, &keyed_events(n)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &bootstrap, &exactly_once("scorestream-zombie"), 0);
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));

    let mut a = spawn(&config, &log_a);
    wait_for(&bootstrap, "conv-scored", &mut a, Duration::from_secs(300), |o| o.len() >= 300).await;
    // B starts with the same transactional.id: its init fences A's producer.
    let mut b = spawn(&config, &log_b);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = a.0.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(180), "the fenced worker still runs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let text = std::fs::read_to_string(&log_a).unwrap();
    let last = text.lines().rev().find(|l| l.starts_with("error:")).unwrap_or_default().to_owned();
    println!("the fenced worker exited with {status}: {last}");
    assert!(!status.success(), "a fenced worker exits non-zero");
    assert!(last.to_lowercase().contains("fenced"), "the error names the fencing: {last:?}\n{text}");

    let scored = wait_for(&bootstrap, "conv-scored", &mut b, Duration::from_secs(300), move |o| o.len() >= n).await;
    terminate(b);
    let b_ = bootstrap.clone();
    let scored = tokio::task::spawn_blocking(move || read_topic(&b_, "conv-scored")).await.map(|s| if s.len() >= scored.len() { s } else { scored }).unwrap();
    let once = counts(&scored);
    assert_eq!(once.len(), n);
    assert!(once.values().all(|&c| c == 1), "nothing committed twice");
    assert_eq!(committed_sum(&bootstrap) as usize, n);
}
