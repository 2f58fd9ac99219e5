//! The Kafka worker through crashes, SIGTERM and consumer-group rebalances, on librdkafka's
//! mock cluster in a process of its own (so that killing a worker kills the worker only; the
//! workers are child processes), with the worker's shipped commit settings:
//! - kill -9 mid-stream, several times: nothing lost, at most `max_inflight_events` replayed
//!   per kill;
//! - SIGTERM under load: exit 0, nothing lost or duplicated across the restart; a second
//!   signal exits at once;
//! - SIGTERM while a second worker joins (a rebalance in progress), and two workers stopped
//!   together: every one exits 0, and the lag series follow the assignment.

mod common_fixtures;
mod kafka_common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kafka_common::*;

/// The worker tests each run a model on both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
#[ignore = "run by the tests as their broker's process"]
fn mock_cluster_process() {
    mock_cluster_main()
}

/// Outputs per input id.
fn counts(outputs: &[Output]) -> HashMap<&str, usize> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (_, v, _) in outputs {
        *seen.entry(v["id"].as_str().unwrap()).or_default() += 1;
    }
    seen
}

fn duplicates(outputs: &[Output]) -> usize {
    counts(outputs).values().map(|c| c - 1).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_replays_at_most_the_inflight_bound_per_kill() {
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

    assert_eq!(counts(&outputs).len(), n, "every input scored");
    let duplicates = duplicates(&outputs);
    println!("{kills} kills ({at_kill:?} scored at each): {} outputs for {n} inputs, {duplicates} duplicates", outputs.len());
    // With the shipped settings, a record counts against max_inflight_events until its offset
    // is committed: a kill replays at most that many.
    assert!(duplicates <= kills * INFLIGHT, "{duplicates} duplicates for {kills} kills");
    assert_eq!(committed_total(&bootstrap) as usize, n);
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

/// The end of a worker's log, for failure messages.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Wait until `cond` holds (checked every 200 ms), failing after `within`.
async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM to every worker at once; their exit codes.
fn stop_all(workers: Vec<Worker>) -> Vec<Option<i32>> {
    for w in &workers {
        assert!(Command::new("kill").args(["-TERM", &w.0.id().to_string()]).status().unwrap().success());
    }
    workers.into_iter().map(|mut w| w.0.wait().unwrap().code()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_stopped_during_rebalances_exit_0_and_lag_follows_the_assignment() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 8_000;
    let Backlog { _cluster, bootstrap, _dir, .. } = backlog(n).await;
    let names = ["a", "b", "c"];
    let ports = names.map(|_| free_port());
    let logs = names.map(|name| _dir.path().join(format!("{name}.log")));
    let configs = names.map(|name| _dir.path().join(format!("{name}.toml")));
    for (config, port) in configs.iter().zip(ports) {
        WorkerConfig { source_extra: r#"lag_interval = "500ms""#, http_port: port, ..WorkerConfig::new(&bootstrap) }.write(config);
    }
    let lag = |i: usize| -> BTreeMap<i32, i64> { lag_series(ports[i]) };

    // A alone owns the four partitions and exports their lag.
    let mut a = spawn(&configs[0], &logs[0]);
    wait_for(&bootstrap, "conv-scored", &mut a, Duration::from_secs(300), |o| unique_ids(o).len() >= 500).await;
    wait_until("A's lag on its four partitions", Duration::from_secs(60), || lag(0).len() == 4).await;

    // B joins; while the group rebalances, A is stopped. It keeps serving the group while it
    // drains (so the rebalance completes), commits, and exits 0.
    let b = spawn(&configs[1], &logs[1]);
    wait_until("B to subscribe (ready)", Duration::from_secs(120), || ready(ports[1])).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stop_all(vec![a]), [Some(0)], "A stopped mid-rebalance:\n{}", log_tail(&logs[0]));

    // C joins B: each exports lag for exactly its own partitions (B drops the revoked ones).
    let c = spawn(&configs[2], &logs[2]);
    wait_until("B and C to export lag for disjoint halves of the topic", Duration::from_secs(120), || {
        let (b, c) = (lag(1), lag(2));
        !b.is_empty() && !c.is_empty() && b.len() + c.len() == 4 && b.keys().all(|p| !c.contains_key(p))
    })
    .await;
    // And it stays so: over several statistics intervals (500 ms) no revoked partition's series
    // comes back on B (a stale lag would page on idle input).
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (b, c) = (lag(1), lag(2));
        assert!(b.keys().all(|p| !c.contains_key(p)), "a partition's lag on both B {b:?} and C {c:?}");
        assert!(b.len() + c.len() <= 4, "B {b:?} and C {c:?}");
    }

    // B and C stopped together (each one's leaving rebalances the other): both exit 0.
    let codes = stop_all(vec![b, c]);
    assert_eq!(codes, [Some(0), Some(0)], "B:\n{}\nC:\n{}", log_tail(&logs[1]), log_tail(&logs[2]));

    // Nothing lost; replays only where a rebalance took partitions from a running worker (B
    // joining A, C joining B), at most what was in flight each time.
    let mut last = spawn(&configs[0], &logs[0]);
    let outputs = wait_for(&bootstrap, "conv-scored", &mut last, Duration::from_secs(300), move |o| unique_ids(o).len() >= n).await;
    terminate(last);
    assert_eq!(committed_total(&bootstrap) as usize, n);
    let duplicates = duplicates(&outputs);
    println!("{} outputs for {n} inputs: {duplicates} duplicates", outputs.len());
    assert!(duplicates <= 2 * INFLIGHT, "{duplicates} duplicates");
}
