//! Memory stays bounded under a backlog: the worker (real nats-server, trained fixture) is
//! started on an empty stream, its resident memory once ready is the baseline (model, runtime,
//! connections), then a backlog is published at once, faster than it is scored. Its peak RSS
//! (`VmHWM`) over the whole backlog must stay under
//!
//!   baseline + COPIES × min(max_inflight_events × max_payload_bytes, max_inflight_bytes) + SLACK
//!
//! (in flight, each payload is held as received and once more decoded; SLACK covers the client's
//! buffers, the allocator and a tokenized batch). Two backlogs: small events (100,000 with
//! `SCORESTREAM_MEMORY_BACKLOG=100000`; 20,000 by default, for CI's time) and 2,000 events of
//! 500 KB (1 GB, 15× `max_inflight_bytes`). A worker that fetched the whole backlog
//! would hold it all; the figures are printed.

mod common_fixtures;
mod nats_support;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use nats_support::{count, events, free_port, http_status, spawn_logged_worker, terminate, write_config_with, KillOnFailure, NatsServer};
use serde_json::Value;

const MIB: f64 = 1024.0 * 1024.0;
const COPIES: f64 = 2.0;
const SLACK_MIB: f64 = 32.0;

/// `(VmRSS, VmHWM)` of a process, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> f64 {
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
        kb / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Bounds {
    max_inflight_events: usize,
    max_payload_bytes: usize,
    max_inflight_bytes: usize,
}

impl Bounds {
    fn payload_mib(&self) -> f64 {
        ((self.max_inflight_events * self.max_payload_bytes).min(self.max_inflight_bytes)) as f64 / MIB
    }
}

/// Run the worker over `payloads` (published once it is ready) with `bounds`; print the figures
/// and assert the peak RSS bound.
async fn backlog(name: &str, payloads: Vec<Vec<u8>>, bounds: Bounds) {
    let Some(server) = NatsServer::start("") else { return };
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    // In memory: the 1 GB backlog (and its outputs, which carry the metadata) stays off the disk.
    for (name, subject) in [("CONV", "conv.in"), ("SCORED", "conv.scored"), ("DEAD", "conv.dead")] {
        let config = stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            storage: stream::StorageType::Memory,
            ..Default::default()
        };
        js.create_stream(config).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let batch = format!(
        "max_inflight_events = {}\n        max_payload_bytes = {}\n        max_inflight_bytes = {}",
        bounds.max_inflight_events, bounds.max_payload_bytes, bounds.max_inflight_bytes
    );
    let config = write_config_with(dir.path(), &server.url(), "", port, |t| t.replace("max_inflight_events = 64", &batch));
    let mut worker = spawn_logged_worker(&config, &dir.path().join("worker.log"));
    let show_log = || std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    let mut guard = KillOnFailure(worker.id(), true);
    let start = Instant::now();
    while http_status(port, "/readyz").await != Some(200) {
        assert!(start.elapsed() < Duration::from_secs(60), "not ready: {}", show_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (baseline, _) = rss_mib(worker.id());

    let start = Instant::now();
    let total_bytes: usize = payloads.iter().map(Vec::len).sum();
    for chunk in payloads.chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for p in chunk {
            acks.push(js.publish("conv.in", p.clone().into()).await.unwrap());
        }
        for a in acks {
            a.await.unwrap();
        }
    }
    let published = start.elapsed();
    let n = payloads.len() as u64;
    drop(payloads);
    let (mut scored, mut dead, mut backlog_max) = (0, 0, 0u64);
    while scored + dead < n {
        assert!(worker.try_wait().unwrap().is_none(), "the worker exited: {}", show_log());
        // Debug builds on 2 shared cores score ~80 small events a second.
        let limit = Duration::from_secs(600) + Duration::from_millis(15) * n as u32;
        assert!(start.elapsed() < limit, "{} of {n} outputs after {limit:?}", scored + dead);
        tokio::time::sleep(Duration::from_millis(500)).await;
        (scored, dead) = (count(&js, "SCORED").await, count(&js, "DEAD").await);
        backlog_max = backlog_max.max(n - scored - dead);
    }
    let seconds = start.elapsed().as_secs_f64();
    let (_, peak) = rss_mib(worker.id());
    let bound = baseline + COPIES * bounds.payload_mib() + SLACK_MIB;
    println!(
        "{name}: {n} inputs ({:.0} MiB), published in {:.1} s, {scored} scored, {dead} dead-lettered in {seconds:.1} s; \
         baseline {baseline:.0} MiB, peak RSS {peak:.0} MiB, bound {bound:.0} MiB = baseline + {COPIES} × min({} × {} B, {} B) + {SLACK_MIB} MiB",
        total_bytes as f64 / MIB,
        published.as_secs_f64(),
        bounds.max_inflight_events,
        bounds.max_payload_bytes,
        bounds.max_inflight_bytes,
    );
    assert_eq!((scored, dead), (n, 0), "{}", show_log());
    assert!(peak < bound, "{name}: peak RSS {peak:.0} MiB over the bound {bound:.0} MiB");
    guard.1 = false;
    assert!(terminate(worker).success(), "{}", show_log());
}

/// The small-event backlog: `SCORESTREAM_MEMORY_BACKLOG` events (RELIABILITY.md's figure is
/// 100,000), else 20,000 (20 × `max_inflight_events`), which keeps CI's debug build within a few
/// minutes on 2 cores.
fn small_backlog() -> usize {
    std::env::var("SCORESTREAM_MEMORY_BACKLOG").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_small_events_stays_within_the_inflight_bound() {
    let n = small_backlog();
    let payloads = events(n).into_iter().map(String::into_bytes).collect();
    let bounds = Bounds { max_inflight_events: 1024, max_payload_bytes: 4 << 10, max_inflight_bytes: 256 << 20 };
    backlog(&format!("{n} small events"), payloads, bounds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_2_000_events_of_500_kb_stays_within_the_inflight_bytes() {
    let payloads = events(2_000)
        .into_iter()
        .map(|line| {
            let mut v: Value = serde_json::from_str(&line).unwrap();
            v["metadata"] = serde_json::json!({ "padding": "p".repeat(500_000) });
            v.to_string().into_bytes()
        })
        .collect();
    let bounds = Bounds { max_inflight_events: 1024, max_payload_bytes: 1 << 20, max_inflight_bytes: 64 << 20 };
    backlog("2,000 events of 500 KB", payloads, bounds).await;
}
