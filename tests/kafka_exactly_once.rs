//! `delivery = "exactly_once"` on an Apache Kafka broker (single-node KRaft, see
//! `kafka_common/broker.rs`): the isolation itself, which neither librdkafka's mock cluster nor
//! tansu can show (both hand aborted records to `read_committed` readers).
//! - 3 kill -9s, each placed inside an open transaction (the worker is stopped, the topic checked
//!   for records of an open transaction, then killed), and a broker kill -9 + restart on the same
//!   log directory mid-stream: a `read_committed` reader sees every input's output exactly once;
//!   a `read_uncommitted` reader sees the aborted ones too; at each kill the group's committed
//!   input offsets equal the committed outputs (offsets move only with outputs);
//! - zombie fencing: a second worker with the same `transactional_id` fences the first, which
//!   exits non-zero naming the cause; nothing is committed twice;
//! - scale-out: 3 workers in one group on 6 partitions, one killed (kill -9) and one added
//!   mid-stream, so rebalances revoke partitions whose batches are in flight: every input's
//!   output exactly once, per key in input order;
//! - a commit the broker refuses: the worker is paused inside a transaction until the broker
//!   aborts it for outliving `transaction.timeout.ms`; resumed, the worker replays on a new
//!   producer and every input is committed once, offsets only with outputs;
//! - `[[route]]` rules over two named Kafka topics and `drop`, with kill -9s inside transactions:
//!   each input exactly once on the one topic its rule names (or nowhere, dropped).

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

/// The exactly-once sink settings, `sink_options` the body of `[sink]`'s librdkafka `options`.
fn exactly_once(transactional_id: &str, sink_options: &str) -> String {
    format!(
        r#"delivery = "exactly_once"
        transactional_id = "{transactional_id}"
        options = {{ {sink_options} }}"#
    )
}

/// `linger.ms` keeps each transaction open ~100 ms, so that a stopped worker is often caught
/// inside one.
const LINGER: &str = r#""linger.ms" = "100""#;

/// Outputs per input id.
fn counts(outputs: &[Output]) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (_, v, _) in outputs {
        let id = v["id"].as_str().map(str::to_owned).unwrap_or_else(|| v["payload"].to_string());
        *seen.entry(id).or_default() += 1;
    }
    seen
}

/// Whether one of `topics` holds records of a transaction still open: on some partition the
/// high watermark is past the last stable offset (what a `read_committed` client is told is the
/// end).
fn open_transaction(bootstrap: &str, topics: &[&str]) -> bool {
    let client = |isolation: &str| -> BaseConsumer {
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("isolation.level", isolation).create().unwrap()
    };
    let (uncommitted, committed) = (client("read_uncommitted"), client("read_committed"));
    topics.iter().any(|topic| {
        let partitions = uncommitted.fetch_metadata(Some(topic), Duration::from_secs(5)).unwrap().topics()[0].partitions().len() as i32;
        (0..partitions).any(|p| {
            let high = uncommitted.fetch_watermarks(topic, p, Duration::from_secs(5)).unwrap().1;
            let stable = committed.fetch_watermarks(topic, p, Duration::from_secs(5)).unwrap().1;
            high > stable
        })
    })
}

fn signal(worker: &Worker, sig: &str) {
    assert!(Command::new("kill").args([sig, &worker.0.id().to_string()]).status().unwrap().success());
}

/// Stop `worker` (SIGSTOP) while it has a transaction open with outputs in one of `topics`.
async fn stop_inside_a_transaction(bootstrap: &str, worker: &mut Worker, topics: &'static [&'static str]) {
    for attempt in 0.. {
        let alive = worker.0.try_wait().unwrap().is_none();
        assert!(attempt < 300 && alive, "never caught the worker inside a transaction (alive: {alive})");
        signal(worker, "-STOP");
        let b = bootstrap.to_owned();
        if tokio::task::spawn_blocking(move || open_transaction(&b, topics)).await.unwrap() {
            return;
        }
        signal(worker, "-CONT");
        tokio::time::sleep(Duration::from_millis(10 + 7 * (attempt % 5))).await;
    }
}

/// kill -9 `worker` while it has a transaction open with outputs in one of `topics`.
async fn kill_inside_a_transaction(bootstrap: &str, mut worker: Worker, topics: &'static [&'static str]) {
    stop_inside_a_transaction(bootstrap, &mut worker, topics).await;
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
    let n = 3_000;
    let Some((mut broker, bootstrap, dir)) = broker_with_events(&TOPICS, n).await else { return };
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    producer.send(FutureRecord::to("conv-in").key("user-0").payload("{broken"), Duration::from_secs(5)).await.unwrap();
    let config = write_config(dir.path(), &bootstrap, &exactly_once("scorestream-eos", LINGER), 0);
    let log = dir.path().join("worker.log");

    let mut at_kill = Vec::new();
    for round in 0..3 {
        let mut worker = spawn(&config, &log);
        let target = 500 * (round + 1);
        wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), move |o| o.len() >= target).await;
        kill_inside_a_transaction(&bootstrap, worker, &["conv-scored"]).await;
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
    let n = 2_000;
    let Some((_broker, bootstrap, dir)) = broker_with_events(&TOPICS, n).await else { return };
    let config = write_config(dir.path(), &bootstrap, &exactly_once("scorestream-zombie", LINGER), 0);
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

/// The sum of `key=N` over the lines of `log`.
fn log_sum(log: &std::path::Path, key: &str) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once(&format!("{key}=")))
        .filter_map(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse::<usize>().ok())
        .sum()
}

/// Duplicates (outputs beyond the first per id) and, per key, whether the outputs are in input
/// order.
fn duplicates_and_order(outputs: &[Output]) -> (usize, Vec<String>) {
    let duplicates = counts(outputs).values().map(|c| c - 1).sum();
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (key, v, _) in outputs {
        per_key.entry(key.clone().unwrap()).or_default().push(v["id"].as_str().unwrap()[1..].parse().unwrap());
    }
    let out_of_order = per_key.into_iter().filter(|(_, ids)| !ids.windows(2).all(|w| w[0] < w[1])).map(|(k, _)| k).collect();
    (duplicates, out_of_order)
}

/// How many times the three-worker scenario is played, each time on a fresh broker, until its
/// join revokes a partition with inputs in flight. Whether it does depends on timing: when the
/// members join at different moments (a coordinator still loading), the first takes every
/// partition and gives most back at once, and a slow start can leave the later triggers after
/// the revoked partitions' backlog is gone (seen in about 1 run of 5 here). Every play checks
/// every correctness assertion.
const SCALE_OUT_PLAYS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_six_partitions_one_killed_one_added_commit_every_input_once_in_order() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut left_out = 0;
    for play in 1..=SCALE_OUT_PLAYS {
        let Some(l) = scale_out_play(play).await else { return };
        left_out = l;
        if left_out > 0 {
            break;
        }
    }
    assert!(left_out > 0, "the join revoked partitions with inputs in flight (in none of {SCALE_OUT_PLAYS} plays)");
}

/// One play: every correctness assertion, then the inputs of revoked partitions left out (None
/// when the broker cannot start outside CI).
async fn scale_out_play(play: usize) -> Option<usize> {
    let topics = [("conv-in", 6), ("conv-scored", 6), ("conv-dead", 6)];
    let n = 6_000;
    let (_broker, bootstrap, dir) = broker_with_events(&topics, n).await?;
    // Each member its own stable transactional.id. The killed member's open transaction (and
    // the offsets in it) holds its partitions back until the broker aborts it: 10 s here.
    let sink = r#""linger.ms" = "100", "transaction.timeout.ms" = "10000""#;
    // 1,024 in flight per member (~20 s of scoring here): a revoked partition still has hundreds
    // of inputs in the pipeline when its new owner fetches the committed offset.
    let member = |name: &str| {
        let sink_extra = exactly_once(&format!("scorestream-{name}"), sink);
        let config = WorkerConfig { sink_extra: &sink_extra, inflight: 1_024, ..WorkerConfig::new(&bootstrap) }.write(&dir.path().join(format!("{name}.toml")));
        spawn(&config, &dir.path().join(format!("{name}.log")))
    };
    let mut workers: Vec<Worker> = ["a", "b", "c"].iter().map(|name| member(name)).collect();
    wait_for(&bootstrap, "conv-scored", &mut workers[0], Duration::from_secs(300), |o| o.len() >= 1_500).await;
    // A fourth member joins mid-stream, while every partition has inputs in flight: the
    // rebalance revokes partitions from running members whose batches are in the pipeline.
    workers.push(member("d"));
    wait_for(&bootstrap, "conv-scored", &mut workers[0], Duration::from_secs(300), |o| o.len() >= 3_000).await;
    // kill -9 one member: after its session times out (6 s) the others take its partitions,
    // from the offsets its last committed transaction left.
    let mut killed = workers.remove(1);
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    let outputs = wait_for(&bootstrap, "conv-scored", &mut workers[0], Duration::from_secs(600), move |o| o.len() >= n).await;
    for w in &workers {
        signal(w, "-TERM");
    }
    let codes: Vec<_> = workers.into_iter().map(|mut w| w.0.wait().unwrap().code()).collect();
    assert_eq!(codes, [Some(0); 3], "every member exits 0 on SIGTERM");

    let b = bootstrap.clone();
    let (outputs, all) = tokio::task::spawn_blocking(move || (read_topic(&b, "conv-scored"), read_topic_uncommitted(&b, "conv-scored")))
        .await
        .map(|(o, a)| (if o.len() >= outputs.len() { o } else { outputs }, a))
        .unwrap();
    let (duplicates, out_of_order) = duplicates_and_order(&outputs);
    let left_out: usize = ["a", "b", "c", "d"].iter().map(|m| log_sum(&dir.path().join(format!("{m}.log")), "left_out")).sum();
    println!(
        "play {play}: 3 exactly-once workers, 1 killed, 1 added: {} committed outputs for {n} inputs, {duplicates} duplicates; \
         {} aborted outputs seen only read_uncommitted; {left_out} in-flight inputs of revoked partitions left out of transactions",
        outputs.len(),
        all.len() - outputs.len()
    );
    assert_eq!(counts(&outputs).len(), n, "every input scored");
    assert_eq!(duplicates, 0, "read_committed: each output exactly once");
    assert!(out_of_order.is_empty(), "per key in input order: {out_of_order:?}");
    assert_eq!(committed_sum(&bootstrap) as usize, n, "every input's offset committed, once");
    Some(left_out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_broker_aborts_for_its_timeout_is_replayed_on_a_new_producer() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The broker looks for transactions past their timeout every 500 ms (default 10 s).
    let extra = "transaction.abort.timed.out.transaction.cleanup.interval.ms=500\n";
    let Some(broker) = Broker::start_with(&TOPICS, extra).await else { return };
    let bootstrap = broker.bootstrap.clone();
    let n = 2_000;
    produce(&bootstrap, &keyed_events(n)).await;
    let dir = tempfile::tempdir().unwrap();
    // A session that outlasts the pause: only the transaction times out.
    let source = r#""session.timeout.ms" = "30000", "heartbeat.interval.ms" = "3000""#;
    let sink = r#""linger.ms" = "100", "transaction.timeout.ms" = "4000""#;
    let sink_extra = exactly_once("scorestream-stall", sink);
    let config = WorkerConfig { source_options: source, sink_extra: &sink_extra, ..WorkerConfig::new(&bootstrap) }.write(&dir.path().join("worker.toml"));
    let log = dir.path().join("worker.log");
    let mut worker = spawn(&config, &log);
    wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), |o| o.len() >= 300).await;

    // The worker stalls (paused) inside a transaction until the broker has aborted it.
    stop_inside_a_transaction(&bootstrap, &mut worker, &["conv-scored"]).await;
    let paused = Instant::now();
    loop {
        let b = bootstrap.clone();
        if !tokio::task::spawn_blocking(move || open_transaction(&b, &["conv-scored"])).await.unwrap() {
            break;
        }
        assert!(paused.elapsed() < Duration::from_secs(60), "the broker never aborted the transaction");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let aborted_after = paused.elapsed();
    let at_abort = check_offsets_follow_outputs(&bootstrap).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(&worker, "-CONT");
    let outputs = wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), move |o| o.len() >= n).await;
    terminate(worker);

    let text = std::fs::read_to_string(&log).unwrap();
    let recovered: Vec<&str> = text.lines().filter(|l| l.contains("outlived transaction.timeout.ms")).collect();
    println!(
        "paused inside a transaction; the broker aborted it {aborted_after:?} later with {at_abort} outputs committed; \
         resumed: {} producer replacement(s): {:?}",
        recovered.len(),
        recovered.first()
    );
    assert!(!recovered.is_empty(), "the worker replaced its fenced producer:\n{text}");
    let b = bootstrap.clone();
    let outputs = tokio::task::spawn_blocking(move || read_topic(&b, "conv-scored")).await.map(|o| if o.len() >= outputs.len() { o } else { outputs }).unwrap();
    let (duplicates, out_of_order) = duplicates_and_order(&outputs);
    println!("{} committed outputs for {n} inputs, {duplicates} duplicates", outputs.len());
    assert_eq!(counts(&outputs).len(), n, "every input scored");
    assert_eq!(duplicates, 0);
    assert!(out_of_order.is_empty(), "{out_of_order:?}");
    assert_eq!(committed_sum(&bootstrap) as usize, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_two_kafka_topics_and_drop_commit_each_input_once_where_its_rule_says() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topics = [("conv-in", PARTITIONS), ("conv-scored", PARTITIONS), ("conv-dead", PARTITIONS), ("conv-low", 2), ("conv-high", 2)];
    let Some(broker) = Broker::start(&topics).await else { return };
    let bootstrap = broker.bootstrap.clone();
    let n = 4_000;
    // Each input names its route in its metadata: low, high, drop, or none (the default sink).
    let lanes = ["low", "high", "drop", "none"];
    let events: Vec<(String, String)> = keyed_events(n)
        .into_iter()
        .enumerate()
        .map(|(i, (key, payload))| {
            let mut v: serde_json::Value = serde_json::from_str(&payload).unwrap();
            v["metadata"] = serde_json::json!({ "lane": lanes[i % lanes.len()] });
            (key, v.to_string())
        })
        .collect();
    produce(&bootstrap, &events).await;
    let dir = tempfile::tempdir().unwrap();
    let routes = format!(
        r#"
        [sinks.low]
        type = "kafka"
        brokers = "{bootstrap}"
        topic = "conv-low"
        [sinks.high]
        type = "kafka"
        brokers = "{bootstrap}"
        topic = "conv-high"
        [[route]]
        when = "metadata.lane == 'low'"
        to = "low"
        [[route]]
        when = "metadata.lane == 'high'"
        to = "high"
        [[route]]
        when = "metadata.lane == 'drop'"
        to = "drop"
        "#
    );
    let sink_extra = exactly_once("scorestream-routes", LINGER);
    let config = WorkerConfig { sink_extra: &sink_extra, extra: &routes, ..WorkerConfig::new(&bootstrap) }.write(&dir.path().join("worker.toml"));
    let log = dir.path().join("worker.log");
    const OUT: &[&str] = &["conv-scored", "conv-low", "conv-high"];
    let committed = |b: String| -> HashMap<&'static str, Vec<Output>> { OUT.iter().map(|t| (*t, read_topic(&b, t))).collect() };
    let total = |by: &HashMap<&'static str, Vec<Output>>| by.values().map(Vec::len).sum::<usize>();
    for round in 0..2 {
        let mut worker = spawn(&config, &log);
        // A quarter of the inputs goes to the default sink: ~600 and ~1,200 inputs in.
        let target = 150 * (round + 1);
        wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), move |o| o.len() >= target).await;
        // Each batch of 64 has outputs on every route: an open transaction shows on conv-scored.
        kill_inside_a_transaction(&bootstrap, worker, &["conv-scored"]).await;
    }
    let mut worker = spawn(&config, &log);
    let want = n - n / lanes.len();
    let start = Instant::now();
    let by_topic = loop {
        let b = bootstrap.clone();
        let by = tokio::task::spawn_blocking(move || committed(b)).await.unwrap();
        if total(&by) >= want {
            break by;
        }
        assert!(worker.0.try_wait().unwrap().is_none(), "the worker exited early");
        assert!(start.elapsed() < Duration::from_secs(300), "timed out");
    };
    // Nothing is left to commit once the dropped inputs' offsets are in too.
    let start = Instant::now();
    while committed_sum(&bootstrap) < n as i64 {
        assert!(start.elapsed() < Duration::from_secs(120), "offsets stop at {}", committed_sum(&bootstrap));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    terminate(worker);

    let b = bootstrap.clone();
    let by_topic = tokio::task::spawn_blocking(move || committed(b)).await.map(|by| if total(&by) >= total(&by_topic) { by } else { by_topic }).unwrap();
    let b = bootstrap.clone();
    let aborted: usize =
        tokio::task::spawn_blocking(move || OUT.iter().map(|t| read_topic_uncommitted(&b, t).len()).sum::<usize>()).await.unwrap() - total(&by_topic);
    let mut seen: HashMap<String, Vec<&str>> = HashMap::new();
    for (topic, outputs) in &by_topic {
        for (_, v, _) in outputs {
            seen.entry(v["id"].as_str().unwrap().to_owned()).or_default().push(topic);
        }
    }
    let expected = |i: usize| match lanes[i % lanes.len()] {
        "low" => Some("conv-low"),
        "high" => Some("conv-high"),
        "none" => Some("conv-scored"),
        _ => None,
    };
    let wrong: Vec<String> = (0..n)
        .filter(|&i| seen.get(&format!("e{i}")).map(Vec::as_slice).unwrap_or_default() != expected(i).as_slice())
        .map(|i| format!("e{i}: {:?}", seen.get(&format!("e{i}"))))
        .collect();
    let per_topic: Vec<(&str, usize)> = OUT.iter().map(|t| (*t, by_topic[t].len())).collect();
    println!(
        "routes, 2 kill -9s inside transactions: {per_topic:?} committed, {} dropped, {aborted} aborted outputs seen only read_uncommitted",
        n - seen.len()
    );
    assert!(wrong.is_empty(), "{} inputs not exactly once where their rule says: {:?}", wrong.len(), &wrong[..wrong.len().min(10)]);
    assert!(read_topic(&bootstrap, "conv-dead").is_empty());
    assert!(aborted > 0, "the kills aborted open transactions");
    assert_eq!(committed_sum(&bootstrap) as usize, n);
}
