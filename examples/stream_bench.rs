//! Streaming benchmark, end to end: the worker (`target/<profile>/scorestream run`) scoring a
//! backlog of N conversation events through a real broker, on the trained arithmetic fixture
//! (`tests/fixtures/arith`, the smallest model), with the default batch settings.
//!
//! For each broker it publishes N events first (the fixture's `conversations.jsonl`, cycled, each
//! with a unique id), starts the worker, and measures from the moment the worker's `/readyz`
//! returns 200 (model loaded, warm-up batch done, source connected) to the moment a separate
//! reader has seen all N scored events on the output. Then it scrapes `/metrics` for the time
//! spent in forward passes, the tokens scored and the consume → publish-ack latency, stops the
//! worker with SIGTERM (it must exit 0) and stops the broker.
//!
//! - NATS: Debian's `nats-server` with JetStream on loopback, in a temporary directory.
//! - Kafka: librdkafka's mock cluster (`rdkafka::mocking`) in this process, 3 brokers, 4
//!   partitions per topic.
//!
//! Per event it reports the wall time (wall / N), the model time (forward-pass seconds / N) and
//! the difference, the time outside the model (decode, template, tokenize, broker round trips,
//! acks, not overlapped with forward passes). Prints one markdown table.
//!
//! `cargo run --release --example stream_bench -- [--events N] [--broker nats|kafka|both]`

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

mod common;
use common::{events, free_port, scorestream_binary, start_nats, write_worker_config, Guard};

#[derive(Parser)]
#[command(about = "End-to-end streaming benchmark of `scorestream run` (NATS JetStream, Kafka mock cluster)")]
struct Args {
    /// Events published before the worker starts.
    #[arg(long, default_value_t = 5000)]
    events: usize,
    /// Which broker(s) to benchmark.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    broker: Which,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Nats,
    Kafka,
    Both,
}

/// Partitions of each Kafka topic (outputs keep per-partition order; 8 keys spread over them).
const KAFKA_PARTITIONS: i32 = 4;

/// Sets its flag when dropped, so that a blocking reader thread stops.
struct Cancel(Arc<AtomicBool>);

impl Drop for Cancel {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A running `scorestream run`, its HTTP port and its log (stderr) file.
struct Worker {
    child: Guard,
    http_port: u16,
    log: PathBuf,
}

impl Worker {
    fn spawn(bin: &Path, config: &Path, http_port: u16, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join("worker.log");
        let stderr = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Self { child: Guard(child), http_port, log })
    }

    /// Fails (with the end of the worker's log) if the worker has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.0.try_wait()? {
            bail!("the worker exited early ({status}); end of its log:\n{}", self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Polls `/readyz` every 2 ms; returns the first moment it answered 200.
    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<Instant> {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(self.http_port, "/readyz") {
                return Ok(Instant::now());
            }
            self.check_alive()?;
            if start.elapsed() > within {
                bail!("the worker was not ready within {within:?}; end of its log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Scrapes `/metrics` once the worker counts `n` scored events (it counts an event when its
    /// output is acknowledged, which can trail the reader by a moment).
    async fn metrics_after(&mut self, n: usize) -> anyhow::Result<WorkerMetrics> {
        let start = Instant::now();
        loop {
            let (status, text) = http_get(self.http_port, "/metrics").context("cannot scrape /metrics")?;
            if status != 200 {
                bail!("/metrics answered {status}");
            }
            let m = WorkerMetrics::parse(&text)?;
            if m.scored >= n as f64 {
                return Ok(m);
            }
            self.check_alive()?;
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the worker counts {} scored events, the reader saw {n}", m.scored);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM: the worker drains, acks and must exit 0 (within its 30 s shutdown timeout).
    async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.0.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().context("cannot run kill")?;
        if !sent.success() {
            bail!("kill -TERM {pid} failed");
        }
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.0.try_wait()? {
                break status;
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the worker did not exit within 60 s of SIGTERM; end of its log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if !status.success() {
            bail!("the worker exited with {status} after SIGTERM; end of its log:\n{}", self.log_tail());
        }
        Ok(())
    }
}

/// A plain HTTP/1.1 GET on loopback (no HTTP client dependency): status code and body.
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// What the benchmark reads from `/metrics` (unlabelled series only).
struct WorkerMetrics {
    scored: f64,
    tokens: f64,
    forward_sum: f64,
    forward_count: f64,
    latency_sum: f64,
    latency_count: f64,
}

impl WorkerMetrics {
    fn parse(text: &str) -> anyhow::Result<Self> {
        // The sum over every series of `name` (e.g. each `delivery` of the scored events).
        let get = |name: &str| -> anyhow::Result<f64> {
            let values: Vec<f64> = text
                .lines()
                .filter_map(|l| {
                    let rest = l.strip_prefix(name)?;
                    let value = match rest.strip_prefix('{') {
                        Some(labelled) => labelled.split_once("} ")?.1,
                        None => rest.strip_prefix(' ')?,
                    };
                    value.trim().parse().ok()
                })
                .collect();
            if values.is_empty() {
                anyhow::bail!("/metrics has no {name}");
            }
            Ok(values.iter().sum())
        };
        Ok(Self {
            scored: get("scorestream_events_scored_total")?,
            tokens: get("scorestream_tokens_scored_total")?,
            forward_sum: get("scorestream_forward_seconds_sum")?,
            forward_count: get("scorestream_forward_seconds_count")?,
            latency_sum: get("scorestream_event_latency_seconds_sum")?,
            latency_count: get("scorestream_event_latency_seconds_count")?,
        })
    }
}

/// One broker's result.
struct Run {
    broker: &'static str,
    events: usize,
    wall: Duration,
    /// From ready to the first output seen (start-up: consumer group join, first batch).
    first_output: Duration,
    metrics: WorkerMetrics,
    dead_lettered: u64,
}

/// When the reader saw the first output and the last of the N distinct outputs.
struct Seen {
    first: Instant,
    last: Instant,
}

/// Waits for the reader while checking that the worker is still running.
async fn wait_reader(
    worker: &mut Worker,
    reader: &mut tokio::task::JoinHandle<anyhow::Result<Seen>>,
) -> anyhow::Result<Seen> {
    loop {
        match tokio::time::timeout(Duration::from_millis(100), &mut *reader).await {
            Ok(done) => return done.context("the reader task failed")?,
            Err(_) => worker.check_alive()?,
        }
    }
}

/// Reader timeout: generous, the worker does a few thousand events per second here.
fn read_within(n: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(100) * n as u32
}

/// Run the worker on `brokers_toml` from its readiness until `reader` has seen all `n` scored
/// events, read its metrics and stop it. The dead-letter count is left for the caller.
#[allow(clippy::too_many_arguments)]
async fn run_worker(
    broker: &'static str,
    root: &Path,
    bin: &Path,
    dir: &Path,
    brokers_toml: &str,
    http_port: u16,
    n: usize,
    mut reader: tokio::task::JoinHandle<anyhow::Result<Seen>>,
) -> anyhow::Result<Run> {
    let config = write_worker_config(dir, root, brokers_toml, http_port)?;
    let mut worker = Worker::spawn(bin, &config, http_port, dir)?;
    let ready = worker.wait_ready(Duration::from_secs(600)).await?;
    let seen = tokio::time::timeout(read_within(n), wait_reader(&mut worker, &mut reader))
        .await
        .map_err(|_| anyhow::anyhow!("{broker}: not all {n} scored events arrived within {:?}", read_within(n)))??;
    let metrics = worker.metrics_after(n).await?;
    worker.stop().await?;
    Ok(Run {
        broker,
        events: n,
        wall: seen.last.saturating_duration_since(ready),
        first_output: seen.first.saturating_duration_since(ready),
        metrics,
        dead_lettered: 0,
    })
}

async fn bench_nats(root: &Path, bin: &Path, lines: &[String]) -> anyhow::Result<Run> {
    let n = lines.len();
    let dir = tempfile::tempdir()?;
    let http_port = free_port()?;
    let (_server, url, js) = start_nats(dir.path()).await?;
    // Publish the backlog, waiting for every PubAck a window at a time.
    for chunk in lines.chunks(500) {
        let mut acks = Vec::with_capacity(chunk.len());
        for line in chunk {
            acks.push(js.publish("conv.in", line.as_bytes().to_vec().into()).await?);
        }
        for ack in acks {
            ack.await?;
        }
    }
    println!("nats: published {n} events to conv.in on {url}");

    // The reader: an ordered consumer on the output stream, counting distinct ids.
    let consumer = js
        .get_stream("SCORED")
        .await?
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let reader = tokio::spawn(async move {
        let mut msgs = consumer.messages().await?;
        let (mut seen, mut first) = (HashSet::with_capacity(n), None);
        while seen.len() < n {
            let Some(m) = msgs.next().await else { bail!("the output stream ended") };
            seen.insert(output_id(&m?.payload)?);
            first.get_or_insert_with(Instant::now);
        }
        Ok(Seen { first: first.unwrap_or_else(Instant::now), last: Instant::now() })
    });

    let brokers_toml = format!(
        "[source]\ntype = \"nats\"\nurl = \"{url}\"\nstream = \"CONV\"\nsubject = \"conv.in\"\ndurable = \"scorestream\"\n\
         [sink]\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"conv.scored\"\n\
         [dead_letter]\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"conv.dead\"\n"
    );
    let mut run = run_worker("nats", root, bin, dir.path(), &brokers_toml, http_port, n, reader).await?;
    let dead_lettered = js.get_stream("DEAD").await?.info().await?.state.messages;
    run.dead_lettered = dead_lettered;
    Ok(run)
}

async fn bench_kafka(root: &Path, bin: &Path, lines: &[String]) -> anyhow::Result<Run> {
    let n = lines.len();
    let dir = tempfile::tempdir()?;
    let http_port = free_port()?;
    let cluster = MockCluster::new(3).context("cannot start librdkafka's mock cluster")?;
    for topic in ["conv-in", "conv-scored", "conv-dead"] {
        cluster.create_topic(topic, KAFKA_PARTITIONS, 1).with_context(|| format!("cannot create topic {topic}"))?;
    }
    let bootstrap = cluster.bootstrap_servers();
    // Publish the backlog, keyed by 8 "users" so that it spreads over the partitions, waiting
    // for every delivery report a window at a time.
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create()?;
    for (c, chunk) in lines.chunks(500).enumerate() {
        let sends = chunk.iter().enumerate().map(|(i, line)| {
            let key = format!("user-{}", (c * 500 + i) % 8);
            let producer = &producer;
            async move {
                producer
                    .send(FutureRecord::to("conv-in").key(&key).payload(line.as_str()), Duration::from_secs(10))
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("cannot produce to conv-in: {e}"))
            }
        });
        for r in futures::future::join_all(sends).await {
            r?;
        }
    }
    println!("kafka: produced {n} events to conv-in on the mock cluster {bootstrap}");

    // The reader: a consumer assigned every output partition from the beginning (no group
    // join to wait for), on a blocking thread, counting distinct ids.
    let reader_consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "stream-bench-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..KAFKA_PARTITIONS {
        tpl.add_partition_offset("conv-scored", p, Offset::Beginning)?;
    }
    reader_consumer.assign(&tpl)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let cancelled = cancel.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let (mut seen, mut first) = (HashSet::with_capacity(n), None);
        while seen.len() < n {
            if cancelled.load(Ordering::Relaxed) {
                bail!("cancelled");
            }
            if let Some(m) = reader_consumer.poll(Duration::from_millis(100)) {
                let m = m.context("the output reader failed")?;
                seen.insert(output_id(m.payload().unwrap_or_default())?);
                first.get_or_insert_with(Instant::now);
            }
        }
        Ok(Seen { first: first.unwrap_or_else(Instant::now), last: Instant::now() })
    });
    // Stop the reader thread however this function returns.
    let _cancel = Cancel(cancel);

    let brokers_toml = format!(
        "[source]\ntype = \"kafka\"\nbrokers = \"{bootstrap}\"\ntopics = [\"conv-in\"]\ngroup_id = \"scorestream\"\n\
         [sink]\ntype = \"kafka\"\nbrokers = \"{bootstrap}\"\ntopic = \"conv-scored\"\n\
         [dead_letter]\ntype = \"kafka\"\nbrokers = \"{bootstrap}\"\ntopic = \"conv-dead\"\n"
    );
    let mut run = run_worker("kafka", root, bin, dir.path(), &brokers_toml, http_port, n, reader).await?;
    // Dead letters: the sum of the dead-letter partitions' watermark spans.
    let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create()?;
    let mut dead_lettered = 0;
    for p in 0..KAFKA_PARTITIONS {
        let (low, high) = probe.fetch_watermarks("conv-dead", p, Duration::from_secs(10))?;
        dead_lettered += (high - low).max(0) as u64;
    }
    run.dead_lettered = dead_lettered;
    Ok(run)
}

/// The `id` of a scored event.
fn output_id(payload: &[u8]) -> anyhow::Result<String> {
    let v: Value = serde_json::from_slice(payload).context("a scored event is not JSON")?;
    v["id"].as_str().map(str::to_owned).context("a scored event has no id")
}

/// 12345.6 → "12,346".
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.events == 0 {
        bail!("--events must be at least 1");
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = scorestream_binary(&root)?;
    let lines = events(&root, args.events)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    let mut runs = Vec::new();
    if args.broker != Which::Kafka {
        runs.push(bench_nats(&root, &bin, &lines).await?);
    }
    if args.broker != Which::Nats {
        runs.push(bench_kafka(&root, &bin, &lines).await?);
    }

    println!("\ncores: {cores} (std::thread::available_parallelism)");
    println!("model: tests/fixtures/arith (f32, cpu); default batching (≤ 256 events, ≤ 16,384 tokens, 20 ms wait, 1,024 in flight)\n");
    println!("| broker | events | wall s | events/s | tokens/s | model ms/event | outside-model ms/event | mean latency ms |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &runs {
        let n = r.events as f64;
        let wall = r.wall.as_secs_f64();
        let per_event = wall / n * 1e3;
        let model = r.metrics.forward_sum / n * 1e3;
        let latency = r.metrics.latency_sum / r.metrics.latency_count.max(1.0) * 1e3;
        println!(
            "| {} | {} | {:.2} | {} | {} | {:.3} | {:.3} | {:.1} |",
            r.broker,
            thousands(n),
            wall,
            thousands(n / wall),
            thousands(r.metrics.tokens / wall),
            model,
            per_event - model,
            latency,
        );
    }
    println!();
    for r in &runs {
        println!(
            "{}: first output {:.2} s after ready; {} scored (worker's count), {} dead-lettered, {} forward passes \
             ({:.1} events each); the worker exited 0 on SIGTERM",
            r.broker,
            r.first_output.as_secs_f64(),
            r.metrics.scored,
            r.dead_lettered,
            r.metrics.forward_count,
            r.metrics.scored / r.metrics.forward_count.max(1.0),
        );
    }
    Ok(())
}
