//! `scorestream run` against librdkafka's mock cluster (`rdkafka::mocking`, a real Kafka
//! protocol peer on loopback): every input lands scored or dead-lettered, per-key (so
//! per-partition) order is kept, keys and headers carry over, rewards equal `scorestream score`,
//! SIGTERM exits 0 and the group's committed offsets cover every input.

mod common_fixtures;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

fn consume_all(bootstrap: &str, topic: &str, n: usize, within: Duration) -> Vec<(Option<String>, Value, Vec<(String, String)>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{topic}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n && start.elapsed() < within {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
            let headers = m
                .headers()
                .map(|h| h.iter().map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect())
                .unwrap_or_default();
            out.push((key, serde_json::from_slice(m.payload().unwrap_or_default()).unwrap(), headers));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_is_scored_in_order_and_committed() {
    let cluster = MockCluster::new(3).unwrap();
    for topic in ["conv-in", "conv-scored", "conv-dead"] {
        cluster.create_topic(topic, 4, 1).unwrap();
    }
    let bootstrap = cluster.bootstrap_servers();
    let convs = std::fs::read_to_string(common_fixtures::dir("arith").join("conversations.jsonl")).unwrap();
    let base: Vec<Value> = convs.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let n = 2_000;
    let events: Vec<(String, String)> = (0..n)
        .map(|i| {
            let mut v = base[i % base.len()].clone();
            v["id"] = Value::String(format!("e{i}"));
            (format!("user-{}", i % 8), v.to_string())
        })
        .collect();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    for (key, payload) in &events {
        let headers = OwnedHeaders::new().insert(Header { key: "trace", value: Some(key.as_bytes()) });
        producer.send(FutureRecord::to("conv-in").key(key).payload(payload).headers(headers), Duration::from_secs(5)).await.unwrap();
    }
    producer.send(FutureRecord::to("conv-in").key("user-0").payload("{broken"), Duration::from_secs(5)).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [model]
            path = "{model}"
            [batch]
            max_batch_events = 64
            max_wait = "5ms"
            max_inflight_events = 256
            [source]
            type = "kafka"
            brokers = "{bootstrap}"
            topics = ["conv-in"]
            group_id = "scorestream"
            options = {{ "auto.commit.interval.ms" = "200" }}
            [sink]
            type = "kafka"
            brokers = "{bootstrap}"
            topic = "conv-scored"
            [dead_letter]
            type = "kafka"
            brokers = "{bootstrap}"
            topic = "conv-dead"
            "#,
            model = common_fixtures::dir("arith").display()
        ),
    )
    .unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["run", "--config"]).arg(&config).stderr(Stdio::null()).spawn().unwrap();
    let (b1, b2) = (bootstrap.clone(), bootstrap.clone());
    let scored = tokio::task::spawn_blocking(move || consume_all(&b1, "conv-scored", n, Duration::from_secs(240))).await.unwrap();
    let dead = tokio::task::spawn_blocking(move || consume_all(&b2, "conv-dead", 1, Duration::from_secs(30))).await.unwrap();
    assert!(worker.try_wait().unwrap().is_none(), "the worker is still running");
    assert_eq!(scored.len(), n, "every good input scored");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1["error"]["kind"], "invalid_json");
    assert_eq!(dead[0].1["source"]["topic"], "conv-in");

    // Keys and headers carry over; per key (one input partition) the outputs keep input order.
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (key, v, headers) in &scored {
        let key = key.clone().expect("output keyed by the input key");
        assert!(headers.contains(&("trace".to_owned(), key.clone())), "{headers:?}");
        per_key.entry(key).or_default().push(v["id"].as_str().unwrap()[1..].parse().unwrap());
    }
    for (key, ids) in &per_key {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{key}: outputs out of input order");
    }
    // Rewards equal `scorestream score` on the same events.
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, events.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>().join("\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["score", "--model"]).arg(common_fixtures::dir("arith")).arg("--input").arg(&input).output().unwrap();
    let reference: HashMap<String, f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_owned(), v["reward"].as_f64().unwrap()))
        .collect();
    for (_, v, _) in &scored {
        let id = v["id"].as_str().unwrap();
        assert!((v["reward"].as_f64().unwrap() - reference[id]).abs() <= 1e-5 * reference[id].abs().max(1.0), "{id}");
    }

    // SIGTERM: exit 0 with every input's offset committed.
    assert!(Command::new("kill").args(["-TERM", &worker.id().to_string()]).status().unwrap().success());
    assert!(worker.wait().unwrap().success());
    let group: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &bootstrap).set("group.id", "scorestream").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition("conv-in", p);
    }
    let committed = group.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    // Every message of the input topic (n good + 1 bad) is below a committed offset.
    let total: i64 = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            other => panic!("partition {} has no committed offset: {other:?}", e.partition()),
        })
        .sum();
    assert_eq!(total as usize, n + 1);
}
