//! The at-least-once worker on an Apache Kafka broker (`kafka_common/broker.rs`), through the
//! faults users meet:
//! - a broker outage: the broker is killed mid-stream, stays away ~10 s and starts again on the
//!   same log directory. The worker stalls, `/readyz` turns 503 while no broker answers and 200
//!   again by itself once one does, the worker goes on without a restart and every input is
//!   scored (at least once, within the in-flight bound);
//! - scale-out: 3 worker processes in one group on a 6-partition topic, one killed (kill -9) and
//!   one added mid-stream: every input scored, per-partition order kept, duplicates within the
//!   in-flight bound per kill and per rebalance.

mod common_fixtures;
mod kafka_common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kafka_common::*;

/// The worker tests each run models on both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Outputs per input id.
fn counts(outputs: &[Output]) -> HashMap<&str, usize> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (_, v, _) in outputs {
        *seen.entry(v["id"].as_str().unwrap()).or_default() += 1;
    }
    seen
}

/// Poll `/readyz` on `port` until it answers `want` (true: 200), failing after `within`.
async fn wait_ready(port: u16, want: bool, within: Duration) -> Duration {
    let start = Instant::now();
    while ready(port) != want {
        assert!(start.elapsed() < within, "/readyz did not turn {} within {within:?}", if want { 200 } else { 503 });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_turns_readyz_503_then_200_and_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topics = [("conv-in", PARTITIONS), ("conv-scored", PARTITIONS), ("conv-dead", PARTITIONS)];
    let n = 3_000;
    let Some((mut broker, bootstrap, dir)) = broker_with_events(&topics, n).await else { return };
    let port = free_port();
    let config = write_config(dir.path(), &bootstrap, "", port);
    let log = dir.path().join("worker.log");
    let mut worker = spawn(&config, &log);
    wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), |o| o.len() >= 1_000).await;
    assert!(ready(port), "ready while the broker is up");

    broker.kill();
    let down = Instant::now();
    let not_ready_after = wait_ready(port, false, Duration::from_secs(10)).await;
    let scored_before = metric(port, r#"scorestream_events_scored_total{delivery="unknown"}"#);
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    // Stalled: nothing confirmed while the broker is away.
    let scored_during = metric(port, r#"scorestream_events_scored_total{delivery="unknown"}"#);
    assert!(!ready(port));
    assert!(worker.0.try_wait().unwrap().is_none(), "the worker rides out the outage");
    broker.restart().await;
    let back = Instant::now();
    let ready_after = wait_ready(port, true, Duration::from_secs(60)).await;
    println!(
        "broker away {:?}: /readyz 503 after {not_ready_after:?}, 200 {ready_after:?} after the broker answered; {scored_before} scored at the kill, {scored_during} 10 s later",
        back.duration_since(down)
    );
    assert!(scored_during - scored_before <= INFLIGHT as f64, "stalled while the broker was away");

    let outputs = wait_for(&bootstrap, "conv-scored", &mut worker, Duration::from_secs(300), move |o| unique_ids(o).len() >= n).await;
    terminate(worker);
    let seen = counts(&outputs);
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    println!("{} outputs for {n} inputs, {duplicates} duplicates", outputs.len());
    assert_eq!(seen.len(), n, "every input scored");
    assert!(duplicates <= INFLIGHT, "{duplicates} duplicates");
    assert_eq!(committed_total(&bootstrap) as usize, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_six_partitions_one_killed_one_added_score_every_input_in_order() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topics = [("conv-in", 6), ("conv-scored", 6), ("conv-dead", 6)];
    let n = 6_000;
    let Some((_broker, bootstrap, dir)) = broker_with_events(&topics, n).await else { return };
    let config = write_config(dir.path(), &bootstrap, "", 0);
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let mut workers: Vec<Worker> = ["a", "b", "c"].iter().map(|name| spawn(&config, &log(name))).collect();
    wait_for(&bootstrap, "conv-scored", &mut workers[0], Duration::from_secs(300), |o| unique_ids(o).len() >= 1_500).await;

    // kill -9 one member: after its session times out (6 s) the others take its partitions
    // from the last committed offsets.
    let mut killed = workers.remove(1);
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    wait_for(&bootstrap, "conv-scored", &mut workers[0], Duration::from_secs(300), |o| unique_ids(o).len() >= 3_000).await;
    // A fourth member joins mid-stream.
    workers.push(spawn(&config, &log("d")));
    let outputs = wait_for(&bootstrap, "conv-scored", &mut workers[0], Duration::from_secs(600), move |o| unique_ids(o).len() >= n).await;
    for w in &workers {
        assert!(Command::new("kill").args(["-TERM", &w.0.id().to_string()]).status().unwrap().success());
    }
    let codes: Vec<_> = workers.into_iter().map(|mut w| w.0.wait().unwrap().code()).collect();
    assert_eq!(codes, [Some(0); 3], "every member exits 0 on SIGTERM");

    let seen = counts(&outputs);
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    println!("3 workers, 1 killed, 1 added: {} outputs for {n} inputs, {duplicates} duplicates", outputs.len());
    assert_eq!(seen.len(), n, "every input scored");
    // A kill replays at most what its worker had in flight; so does each rebalance that moves
    // partitions away from a running member (the kill's and the join's).
    assert!(duplicates <= 3 * INFLIGHT, "{duplicates} duplicates");
    // Per key (so per input partition), first outputs in input order.
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    let mut first = std::collections::HashSet::new();
    for (key, v, _) in &outputs {
        let id = v["id"].as_str().unwrap();
        if first.insert(id) {
            per_key.entry(key.clone().unwrap()).or_default().push(id[1..].parse().unwrap());
        }
    }
    for (key, ids) in &per_key {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{key}: outputs out of input order");
    }
    // 8 keys on 6 partitions: a partition may hold no input, and so no committed offset.
    assert_eq!(committed_sum(&bootstrap) as usize, n);
}
