//! `[[route]]` rules against a real nats-server: every input lands on exactly one route (a
//! named sink, the default sink, dropped) or in the dead letters (kind `route` when a rule's
//! expression fails on it), each as the rules and `scorestream score`'s rewards say; an input
//! routed to a sink that cannot take it stays unacknowledged until the sink confirms it.

mod common_fixtures;
mod nats_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use nats_support::{
    consumer_state, count, create_streams, events, free_port, metrics_text, publish_all, read_all, setup_streams,
    spawn_worker, terminate, wait_for_outputs, write_config_with, NatsServer,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_lands_on_exactly_one_route_and_is_acked_after_its_sink_confirms() {
    let server = NatsServer::start("");
    let js = setup_streams(&server.url()).await;
    create_streams(&js, &[("REVIEW", "conv.review")]).await;
    let lines = with_tiers(&events(900));
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let reference = common_fixtures::score_cli_rewards(dir.path(), &refs);
    let rewards: Vec<f64> = reference.values().copied().collect();
    let (low, high) = (threshold(&rewards, 0.25), threshold(&rewards, 0.75));
    // What each input should become: a route name, or "dead" for a failing expression.
    let want: BTreeMap<String, &str> = lines
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

    let port = free_port();
    let url = server.url();
    let config = write_config_with(dir.path(), &url, "", port, |t| {
        format!(
            "{t}\n[sinks.review]\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"conv.review\"\n\
             [[route]]\nwhen = \"reward < {low:?}\"\nto = \"review\"\n\
             [[route]]\nwhen = \"reward > {high:?}\"\nto = \"drop\"\n\
             [[route]]\nwhen = \"metadata.tier == 'free'\"\nto = \"drop\"\n"
        )
    });
    publish_all(&js, &refs).await;
    let mut worker = spawn_worker(&config);
    let landing = |route: &str| want.values().filter(|r| **r == route).count() as u64;
    let published = landing("review") + landing("default") + landing("dead");
    wait_for_outputs(&js, &["REVIEW", "SCORED", "DEAD"], published, &mut worker, Duration::from_secs(180)).await;
    // Dropped inputs are acked too: nothing is pending once the published ones are in.
    let start = std::time::Instant::now();
    while consumer_state(&js, "CONV", "scorestream").await.0 > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "inputs left unacknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids = |v: &[Value]| v.iter().map(|o| o["id"].as_str().unwrap().to_owned()).collect::<BTreeSet<_>>();
    let expected = |route: &str| want.iter().filter(|(_, r)| **r == route).map(|(id, _)| id.clone()).collect::<BTreeSet<_>>();
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
    let start = std::time::Instant::now();
    while consumer_state(&js, "CONV", "scorestream").await.0 > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "late inputs left unacknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = terminate(worker);
    assert!(status.success(), "{status}");
    let mut consumer: jetstream::consumer::PullConsumer =
        js.get_stream("CONV").await.unwrap().get_consumer("scorestream").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0), "every input acked");
}
