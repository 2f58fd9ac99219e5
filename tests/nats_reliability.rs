//! What a hostile user found against a real nats-server, each now a test: a dead letter larger
//! than the server's limit, a scored output the stream refuses, a missing output stream, two
//! deployments and a re-created stream sharing de-duplication ids, an id collision, prefetched
//! messages redelivered while they wait, prefetch unbounded in bytes, and credentials in a URL.

mod common_fixtures;
mod nats_support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use nats_support::{
    consumer_state, count, create_streams, events, free_port, metrics_text, publish_all, read_all, setup_streams, setup_streams_as, spawn_worker,
    terminate, wait_for_outputs, write_config, write_config_with, NatsServer,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A valid conversation of about 750 KB: over `max_tokens`, so it is dead-lettered, and its dead
/// letter (the payload escaped once more) is larger than the server's 1 MB `max_payload`.
fn poison_pill() -> String {
    format!(
        r#"{{"id":"pill","messages":[{{"role":"user","content":"2+2"}},{{"role":"assistant","content":{}}}]}}"#,
        Value::String("9\"".repeat(250_000))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_over_the_servers_limit_is_cut_to_fit_and_nothing_stalls() {
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    let events = events(1_100);
    let lines: Vec<&str> = events.iter().map(String::as_str).collect();
    let pill = poison_pill();
    assert!(pill.len() > 700_000 && pill.len() < 1_000_000);
    publish_all(&js, &lines[..100]).await;
    js.publish("conv.in", pill.clone().into_bytes().into()).await.unwrap().await.unwrap();
    publish_all(&js, &lines[100..]).await;

    let dir = tempfile::tempdir().unwrap();
    let mut worker = spawn_worker(&write_config(dir.path(), &server.url(), "", 0));
    wait_for_outputs(&js, &["SCORED", "DEAD"], 1_101, &mut worker, Duration::from_secs(180)).await;
    assert!(terminate(worker).success());

    assert_eq!(count(&js, "SCORED").await, 1_100, "every event after the pill was scored");
    let dead = read_all(&js, "DEAD").await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d["error"]["kind"], "too_long");
    assert_eq!(d["id"], "pill");
    assert_eq!(d["payload_truncated"], true);
    assert_eq!(d["payload_bytes"], pill.len());
    let sha: String = Sha256::digest(pill.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(d["payload_sha256"], sha);
    let kept = d["payload"].as_str().unwrap();
    assert!(kept.len() > 500_000 && pill.starts_with(kept), "the longest prefix that fits is kept");
    assert_eq!(consumer_state(&js, "CONV", "scorestream").await.0, 0, "every input acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scored_outputs_the_stream_refuses_go_to_the_dead_letters_with_the_reason() {
    let Some(server) = NatsServer::start("") else { return };
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    for (name, subject, max_message_size) in [("CONV", "conv.in", -1), ("SCORED", "conv.scored", 64), ("DEAD", "conv.dead", -1)] {
        js.create_stream(stream::Config { name: name.into(), subjects: vec![subject.into()], max_message_size, ..Default::default() })
            .await
            .unwrap();
    }
    let events = events(20);
    publish_all(&js, &events).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut worker = spawn_worker(&write_config(dir.path(), &server.url(), "", port));
    wait_for_outputs(&js, &["DEAD"], 20, &mut worker, Duration::from_secs(120)).await;
    let metrics = metrics_text(port).await;
    assert!(terminate(worker).success());
    let dead = read_all(&js, "DEAD").await;
    assert_eq!(dead.len(), 20);
    for d in &dead {
        assert_eq!(d["error"]["kind"], "publish");
        let message = d["error"]["message"].as_str().unwrap();
        assert!(message.contains("refused the scored output") && message.contains("maximum"), "{message}");
        assert!(events.contains(&d["payload"].as_str().unwrap().to_owned()), "the original input is kept");
    }
    assert_eq!(count(&js, "SCORED").await, 0);
    assert!(metrics.contains("scorestream_publish_rejected_total{output=\"scored\"} 20"), "{metrics}");
    assert!(metrics.contains("scorestream_events_failed_total{reason=\"publish\"} 20"));
    assert_eq!(consumer_state(&js, "CONV", "scorestream").await.0, 0, "every input acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_output_stream_fails_at_start_naming_the_subject() {
    let Some(server) = NatsServer::start("") else { return };
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    create_streams(&js, &[("CONV", "conv.in"), ("SCORED", "conv.scored")]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url(), "", 0);
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert!(start.elapsed() < Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no JetStream stream captures subject \"conv.dead\""), "{err}");
}

/// Two deployments (own durables, own output subjects) read one input stream and publish into
/// one output stream: each publishes all of its outputs; none is taken for the other's duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deployments_on_one_stream_each_publish_every_output() {
    let Some(server) = NatsServer::start("") else { return };
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    for (name, subjects) in [("CONV", vec!["conv.in"]), ("SCORED", vec!["conv.scored", "conv.scored.b"]), ("DEAD", vec!["conv.dead"])] {
        js.create_stream(stream::Config { name: name.into(), subjects: subjects.into_iter().map(Into::into).collect(), ..Default::default() })
            .await
            .unwrap();
    }
    let events = events(300);
    publish_all(&js, &events).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let port = free_port();
    let mut a = spawn_worker(&write_config_with(dir_a.path(), &server.url(), "", port, |t| t));
    let mut b = spawn_worker(&write_config_with(dir_b.path(), &server.url(), "", 0, |t| {
        t.replace("durable = \"scorestream\"", "durable = \"second\"").replace("subject = \"conv.scored\"", "subject = \"conv.scored.b\"")
    }));
    wait_for_outputs(&js, &["SCORED"], 600, &mut a, Duration::from_secs(180)).await;
    wait_for_outputs(&js, &["SCORED"], 600, &mut b, Duration::from_secs(10)).await;
    let metrics = metrics_text(port).await;
    assert!(terminate(a).success());
    assert!(terminate(b).success());
    assert_eq!(count(&js, "SCORED").await, 600);
    assert!(metrics.contains("scorestream_dedup_collisions_total 0"), "{metrics}");
}

/// An input stream deleted and created again restarts its sequences: the new inputs' outputs are
/// not taken for duplicates of the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_input_stream_gets_new_output_ids() {
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    let events = events(100);
    let lines: Vec<&str> = events.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url(), "", 0);
    publish_all(&js, &lines[..50]).await;
    let mut worker = spawn_worker(&config);
    wait_for_outputs(&js, &["SCORED"], 50, &mut worker, Duration::from_secs(120)).await;
    assert!(terminate(worker).success());

    js.delete_stream("CONV").await.unwrap();
    js.create_stream(stream::Config { name: "CONV".into(), subjects: vec!["conv.in".into()], ..Default::default() }).await.unwrap();
    publish_all(&js, &lines[50..]).await;
    let mut worker = spawn_worker(&config);
    wait_for_outputs(&js, &["SCORED"], 100, &mut worker, Duration::from_secs(120)).await;
    assert!(terminate(worker).success());
    let ids: std::collections::HashSet<String> =
        read_all(&js, "SCORED").await.iter().map(|o| o["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 100, "every input of both stream instances has its output");
}

/// An output already in the stream under the id of a first publish: JetStream drops the new one
/// as a duplicate, and the worker counts and reports the collision instead of staying silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_collision_is_counted() {
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    let created = js.get_stream("CONV").await.unwrap().info().await.unwrap().created.unix_timestamp_nanos();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("conv.scored|nats:CONV@{created}:scorestream:1:scored").as_str());
    js.publish_with_headers("conv.scored", headers, "squatter".into()).await.unwrap().await.unwrap();
    let events = events(5);
    publish_all(&js, &events).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut worker = spawn_worker(&write_config(dir.path(), &server.url(), "", port));
    wait_for_outputs(&js, &["SCORED"], 5, &mut worker, Duration::from_secs(120)).await;
    let start = Instant::now();
    let metrics = loop {
        let m = metrics_text(port).await;
        if m.contains("scorestream_events_scored_total{delivery=\"first\"} 5") || start.elapsed() > Duration::from_secs(30) {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(terminate(worker).success());
    assert!(metrics.contains("scorestream_dedup_collisions_total 1"), "{metrics}");
    assert_eq!(count(&js, "SCORED").await, 5, "the squatter and 4 outputs: one was dropped as its duplicate");
}

/// The source itself, against the server: messages it has prefetched are kept alive while they
/// wait (no redelivery past `ack_wait`), and its prefetch is bounded in bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_messages_are_kept_alive_and_bounded_in_bytes() {
    use scorestream::source::NatsSourceConfig;
    use scorestream::source::{nats::NatsSource, Source, SourceContext};
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    let big = "x".repeat(500_000);
    for _ in 0..40 {
        js.publish("conv.in", big.clone().into()).await.unwrap().await.unwrap();
    }
    let config: NatsSourceConfig = toml::from_str(&format!(
        "url = \"{}\"\nstream = \"CONV\"\nsubject = \"conv.in\"\ndurable = \"d\"\nack_wait = \"1s\"",
        server.url()
    ))
    .unwrap();
    let ctx = SourceContext {
        metrics: Arc::new(scorestream::metrics::Metrics::new().unwrap()),
        max_inflight_events: 1024,
        max_inflight_bytes: 8 << 20,
    };
    let mut source = NatsSource::open(&config, ctx).await.unwrap();
    let first = source.next().await.unwrap().unwrap();
    // Hold it and let the prefetch fill while nothing else is taken, for 3 ack_waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ack_pending, _, deliveries) = consumer_state(&js, "CONV", "d").await;
    assert!(ack_pending <= 6, "{ack_pending} messages delivered: prefetch is bounded by bytes (~2 MB)");
    assert_eq!(deliveries, ack_pending as u64, "no message was redelivered while waiting");
    first.ack.ack().await.unwrap();
    for _ in 0..39 {
        let r = tokio::time::timeout(Duration::from_secs(10), source.next()).await.unwrap().unwrap().unwrap();
        r.ack.ack().await.unwrap();
    }
    Box::new(source).close().await.unwrap();
    let (ack_pending, pending, deliveries) = consumer_state(&js, "CONV", "d").await;
    assert_eq!((ack_pending, pending, deliveries), (0, 0, 40), "40 inputs, 40 deliveries");
}

/// `nats://user:password@host`: used to authenticate, and never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url_authenticate_and_are_never_logged() {
    let Some(server) = NatsServer::start("authorization { user: scorer, password: s3cr3tpw }") else { return };
    let client = async_nats::ConnectOptions::new()
        .user_and_password("scorer".into(), "s3cr3tpw".into())
        .connect(server.url())
        .await
        .unwrap();
    let js = setup_streams_as(client).await;
    let events = events(10);
    publish_all(&js, &events).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://scorer:s3cr3tpw@127.0.0.1:{}", server.port);
    let config = write_config(dir.path(), &url, "", 0);
    let log = dir.path().join("worker.log");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["run", "--config"])
        .arg(&config)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_outputs(&js, &["SCORED"], 10, &mut worker, Duration::from_secs(120)).await;
    assert!(terminate(worker).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("127.0.0.1"), "the URL is logged: {text}");
    assert!(!text.contains("s3cr3tpw"), "the password is never logged: {text}");

    // A wrong password in the URL: refused clearly, still not printed.
    let wrong = format!("nats://scorer:n0tright@127.0.0.1:{}", server.port);
    let config = write_config(dir.path(), &wrong, "", 0);
    let out = Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("authorization"), "{err}");
    assert!(!err.contains("n0tright"), "{err}");
}
