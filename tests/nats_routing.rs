//! `[[route]]` rules against a real nats-server: every input lands on exactly one route (a
//! named sink, the default sink, dropped) or in the dead letters (kind `route` when a rule's
//! expression fails on it), each as the rules and `scorestream score`'s rewards say; an input
//! routed to a sink that cannot take it stays unacknowledged until the sink confirms it; a
//! worker killed with SIGKILL mid-stream and restarted loses nothing and routes no input twice.

mod common_fixtures;
mod nats_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use nats_support::{
    consumer_state, count, create_streams, events, free_port, metrics_text, publish_all, read_all, setup_streams,
    spawn_worker, terminate, wait_all_acked, wait_for_outputs, write_config_with, NatsServer,
};
use serde_json::Value;

/// A threshold between two neighbouring rewards near the `at` quantile, with a clear gap (so
/// batch-to-batch float noise cannot move an event across it).
fn threshold(rewards: &[f64], at: f64) -> f64 {
    let mut sorted = rewards.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut k = (sorted.len() as f64 * at) as usize;
    while sorted[k + 1] - sorted[k] < 1e-3 {
        k += 1;
    }
    (sorted[k] + sorted[k + 1]) / 2.0
}

fn id_of(line: &str) -> String {
    serde_json::from_str::<Value>(line).unwrap()["id"].as_str().unwrap().to_owned()
}

/// Events with metadata: `tier` "free" for every third, "paid" for the next, none for the rest.
fn with_tiers(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            match i % 3 {
                0 => v["metadata"] = serde_json::json!({"tier": "free"}),
                1 => v["metadata"] = serde_json::json!({"tier": "paid"}),
                _ => {}
            }
            v.to_string()
        })
        .collect()
}

/// The rules both tests use: low rewards to the `review` subject, high ones dropped, then
/// `metadata.tier == 'free'` dropped (an event without metadata fails that expression: a dead
/// letter of kind `route`), the rest (`paid`) to the default sink.
struct Routing {
    lines: Vec<String>,
    /// What each input should become, by id: "review", "default", "drop", or "dead".
    want: BTreeMap<String, &'static str>,
    low: f64,
    high: f64,
}

impl Routing {
    fn new(n: usize, work: &Path) -> Self {
        let lines = with_tiers(&events(n));
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let reference = common_fixtures::score_cli_rewards(work, &refs);
        let rewards: Vec<f64> = reference.values().copied().collect();
        let (low, high) = (threshold(&rewards, 0.25), threshold(&rewards, 0.75));
        let want = lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let id = id_of(l);
                let r = reference[&id];
                let route = match (r < low, r > high, i % 3) {
                    (true, ..) => "review",
                    (_, true, _) => "drop",
                    (.., 0) => "drop",
                    (.., 1) => "default",
                    _ => "dead",
                };
                (id, route)
            })
            .collect();
        Self { lines, want, low, high }
    }

    fn config(&self, work: &Path, url: &str, port: u16) -> PathBuf {
        let (low, high) = (self.low, self.high);
        write_config_with(work, url, "", port, |t| {
            format!(
                "{t}\n[sinks.review]\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"conv.review\"\n\
                 [[route]]\nwhen = \"reward < {low:?}\"\nto = \"review\"\n\
                 [[route]]\nwhen = \"reward > {high:?}\"\nto = \"drop\"\n\
                 [[route]]\nwhen = \"metadata.tier == 'free'\"\nto = \"drop\"\n"
            )
        })
    }

    fn landing(&self, route: &str) -> u64 {
        self.want.values().filter(|r| **r == route).count() as u64
    }

    fn expected(&self, route: &str) -> BTreeSet<String> {
        self.want.iter().filter(|(_, r)| **r == route).map(|(id, _)| id.clone()).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_lands_on_exactly_one_route_and_is_acked_after_its_sink_confirms() {
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    create_streams(&js, &[("REVIEW", "conv.review")]).await;
    let dir = tempfile::tempdir().unwrap();
    let routing = Routing::new(900, dir.path());
    let Routing { lines, want, .. } = &routing;
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let port = free_port();
    let config = routing.config(dir.path(), &server.url(), port);
    publish_all(&js, &refs).await;
    let mut worker = spawn_worker(&config);
    let landing = |route: &str| routing.landing(route);
    let published = landing("review") + landing("default") + landing("dead");
    wait_for_outputs(&js, &["REVIEW", "SCORED", "DEAD"], published, &mut worker, Duration::from_secs(180)).await;
    // Dropped inputs are acked too: nothing is pending once the published ones are in.
    wait_all_acked(&js, "CONV", "scorestream", Duration::from_secs(30), "inputs left unacknowledged").await;
    let ids = |v: &[Value]| v.iter().map(|o| o["id"].as_str().unwrap().to_owned()).collect::<BTreeSet<_>>();
    let expected = |route: &str| routing.expected(route);
    let review = read_all(&js, "REVIEW").await;
    assert_eq!(review.len() as u64, landing("review"), "each input once");
    assert_eq!(ids(&review), expected("review"));
    assert_eq!(ids(&read_all(&js, "SCORED").await), expected("default"));
    let dead = read_all(&js, "DEAD").await;
    assert!(dead.iter().all(|d| d["error"]["kind"] == "route"), "{:?}", dead.first());
    let message = dead[0]["error"]["message"].as_str().unwrap();
    assert!(message.contains("route[2].when"), "{message}");
    let dead_ids: BTreeSet<String> = dead.iter().map(|d| id_of(d["payload"].as_str().unwrap())).collect();
    assert_eq!(dead_ids, expected("dead"));
    let metrics = metrics_text(port).await;
    for route in ["review", "default", "drop"] {
        let line = format!("scorestream_routed_total{{route=\"{route}\"}} {}", landing(route));
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }

    // The review subject loses its stream: low-scoring inputs wait, unacknowledged, until a
    // stream takes them again; nothing goes to the default sink instead.
    js.delete_stream("REVIEW").await.unwrap();
    let low_ids: Vec<&String> = want.iter().filter(|(_, r)| **r == "review").map(|(id, _)| id).take(20).collect();
    let late: Vec<String> = lines
        .iter()
        .filter(|l| low_ids.contains(&&id_of(l)))
        .map(|l| l.replacen("\"id\":\"", "\"id\":\"late-", 1))
        .collect();
    assert_eq!(late.len(), 20);
    publish_all(&js, &late).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (pending, ..) = consumer_state(&js, "CONV", "scorestream").await;
    assert_eq!(pending, 20, "inputs routed to an unconfirmed sink stay unacknowledged");
    assert_eq!(count(&js, "SCORED").await, landing("default"));
    create_streams(&js, &[("REVIEW", "conv.review")]).await;
    wait_for_outputs(&js, &["REVIEW"], 20, &mut worker, Duration::from_secs(60)).await;
    wait_all_acked(&js, "CONV", "scorestream", Duration::from_secs(30), "late inputs left unacknowledged").await;
    let status = terminate(worker);
    assert!(status.success(), "{status}");
    let mut consumer: jetstream::consumer::PullConsumer =
        js.get_stream("CONV").await.unwrap().get_consumer("scorestream").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0), "every input acked");
}

/// Ids of a stream's messages (scored events, or the payload's id for dead letters), with how
/// many times each was published.
async fn published_ids(js: &jetstream::Context, stream: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for v in read_all(js, stream).await {
        let id = match v["payload"].as_str() {
            Some(payload) => id_of(payload),
            None => v["id"].as_str().unwrap().to_owned(),
        };
        *seen.entry(id).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_routes_every_input_once() {
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    create_streams(&js, &[("REVIEW", "conv.review")]).await;
    let dir = tempfile::tempdir().unwrap();
    let routing = Routing::new(3_000, dir.path());
    let refs: Vec<&str> = routing.lines.iter().map(String::as_str).collect();
    publish_all(&js, &refs).await;
    let config = routing.config(dir.path(), &server.url(), 0);
    let outputs = ["REVIEW", "SCORED", "DEAD"];
    let js_ref = &js;
    let total = move || async move {
        let mut n = 0;
        for s in outputs {
            n += count(js_ref, s).await;
        }
        n
    };
    let published = routing.landing("review") + routing.landing("default") + routing.landing("dead");
    // SIGKILL the worker three times while it publishes (no drain, nothing in flight acked),
    // then let a fourth one finish.
    let mut at_kill = Vec::new();
    for round in 1..=3 {
        let mut worker = spawn_worker(&config);
        let mut guard = nats_support::KillOnFailure(worker.id(), true);
        let target = published * round / 4;
        let start = Instant::now();
        while total().await < target {
            assert!(worker.try_wait().unwrap().is_none(), "the worker exited early");
            assert!(start.elapsed() < Duration::from_secs(180), "timed out before kill {round}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        guard.1 = false;
        worker.kill().unwrap();
        worker.wait().unwrap();
        at_kill.push(total().await);
    }
    let mut worker = spawn_worker(&config);
    let mut guard = nats_support::KillOnFailure(worker.id(), true);
    wait_for_outputs(&js, &outputs, published, &mut worker, Duration::from_secs(300)).await;
    // Redeliveries of what the killed workers left unacked (ack_wait 3 s) play out; then every
    // input, dropped ones included, is acknowledged.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let start = Instant::now();
    while let (1.., _, _) | (_, 1.., _) = consumer_state(&js, "CONV", "scorestream").await {
        assert!(start.elapsed() < Duration::from_secs(60), "inputs left unacknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deliveries = consumer_state(&js, "CONV", "scorestream").await.2;
    guard.1 = false;
    let status = terminate(worker);
    assert!(status.success(), "{status}");

    let mut by_route = BTreeMap::new();
    let mut duplicates = 0;
    for (stream, route) in [("REVIEW", "review"), ("SCORED", "default"), ("DEAD", "dead")] {
        let seen = published_ids(&js, stream).await;
        duplicates += seen.values().map(|c| c - 1).sum::<usize>();
        let ids: BTreeSet<String> = seen.into_keys().collect();
        let want = routing.expected(route);
        let lost = want.difference(&ids).count();
        let stray = ids.difference(&want).count();
        assert_eq!((lost, stray), (0, 0), "{route}: {lost} inputs lost, {stray} that belong elsewhere");
        by_route.insert(route, ids.len());
    }
    by_route.insert("drop", routing.landing("drop") as usize);
    let dead = read_all(&js, "DEAD").await;
    assert!(dead.iter().all(|d| d["error"]["kind"] == "route"), "{:?}", dead.first());
    println!(
        "3000 inputs, {deliveries} deliveries, 3 kills ({at_kill:?} outputs published at each): {by_route:?}, \
         {duplicates} duplicates published"
    );
    // A replay carries the same Nats-Msg-Id as the first publish, so JetStream drops it within
    // its duplicate window: none gets through.
    assert_eq!(duplicates, 0, "replays are de-duplicated");
}
