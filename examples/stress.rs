//! Reliability figures for RELIABILITY.md: the worker (`target/<profile>/scorestream run`) against
//! a real nats-server (Debian's, default `max_payload` of 1 MB, monitoring on), on the trained
//! fixture, under hostile input and a burst of large events.
//!
//! - fuzz: N events from `common/hostile.rs`, each a good conversation or one of many kinds of
//!   broken input (random bytes, cut JSON, wrong types, lone surrogates, NUL bytes, deep nesting,
//!   oversized, 10,000 messages, the poison pill whose dead letter exceeds the server's limit). Checks that every input ends
//!   scored or dead-lettered, that every input is acked, and that the worker is still running.
//! - burst: M events of about 500 KB each published at once, worker at the default in-flight
//!   bounds. Reports the worker's peak resident memory, JetStream redeliveries (deliveries minus
//!   inputs) and the server's slow-consumer count.
//!
//! Prints one markdown table. `cargo run --release --example stress -- [--fuzz N] [--burst M]`

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream;
use clap::Parser;
use serde_json::Value;

mod common;
use common::{events, free_port, hostile, scorestream_binary, start_nats_with, write_worker_config, Guard};

#[derive(Parser)]
#[command(about = "Fuzz and burst figures of `scorestream run` against a real nats-server")]
struct Args {
    /// Fuzzed events (good and broken, mixed).
    #[arg(long, default_value_t = 10_000)]
    fuzz: usize,
    /// Events of ~500 KB published at once.
    #[arg(long, default_value_t = 2_000)]
    burst: usize,
}

async fn publish(js: &jetstream::Context, payloads: &[Vec<u8>]) -> anyhow::Result<()> {
    for chunk in payloads.chunks(256) {
        let mut acks = Vec::with_capacity(chunk.len());
        for p in chunk {
            acks.push(js.publish("conv.in", p.clone().into()).await?);
        }
        for a in acks {
            a.await?;
        }
    }
    Ok(())
}

async fn count(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    Ok(js.get_stream(stream).await?.info().await?.state.messages)
}

/// The worker's peak resident memory (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/<pid>/status")?;
    Ok(kb / 1024.0)
}

/// The server's `slow_consumers` from its monitoring endpoint.
fn slow_consumers(monitor: u16) -> anyhow::Result<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", monitor))?;
    s.write_all(b"GET /varz HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).context("no body from /varz")?;
    let v: Value = serde_json::from_str(body)?;
    v["slow_consumers"].as_u64().context("no slow_consumers in /varz")
}

struct Figures {
    sent: usize,
    scored: u64,
    dead: u64,
    deliveries: u64,
    ack_pending: usize,
    peak_rss_mib: f64,
    slow_consumers: u64,
    seconds: f64,
}

/// Publish `payloads`, run the worker until every input has an output, stop it, collect figures.
async fn run(root: &Path, name: &str, payloads: Vec<Vec<u8>>, batch_toml: &str) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let monitor = free_port()?;
    let (_server, url, js) = start_nats_with(dir.path(), &format!("http_port: {monitor}")).await?;
    publish(&js, &payloads).await?;
    let brokers = format!(
        "{batch_toml}\n[source]\ntype = \"nats\"\nurl = \"{url}\"\nstream = \"CONV\"\nsubject = \"conv.in\"\ndurable = \"w\"\n\
         [sink]\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"conv.scored\"\n\
         [dead_letter]\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"conv.dead\"\n"
    );
    let config = write_worker_config(dir.path(), root, &brokers, free_port()?)?;
    let log = std::fs::File::create(dir.path().join("worker.log"))?;
    let child = std::process::Command::new(scorestream_binary(root)?)
        .args(["run", "--config"])
        .arg(&config)
        .stderr(log)
        .spawn()
        .context("cannot start the worker")?;
    let pid = child.id();
    let mut worker = Guard(child);
    let start = Instant::now();
    let sent = payloads.len() as u64;
    let (mut scored, mut dead, mut peak) = (0, 0, 0.0f64);
    while scored + dead < sent {
        if let Some(status) = worker.0.try_wait()? {
            bail!("{name}: the worker exited ({status}); see its log");
        }
        if start.elapsed() > Duration::from_secs(1800) {
            bail!("{name}: only {} of {sent} outputs after 30 min", scored + dead);
        }
        peak = peak.max(peak_rss_mib(pid).unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(200)).await;
        (scored, dead) = (count(&js, "SCORED").await?, count(&js, "DEAD").await?);
    }
    let seconds = start.elapsed().as_secs_f64();
    peak = peak.max(peak_rss_mib(pid).unwrap_or(0.0));
    let mut consumer: jetstream::consumer::PullConsumer = js.get_stream("CONV").await?.get_consumer("w").await.map_err(|e| anyhow::anyhow!("cannot read the consumer: {e}"))?;
    // Let the last acks land before reading the consumer's state.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let info = consumer.info().await?;
    let figures = Figures {
        sent: payloads.len(),
        scored,
        dead,
        deliveries: info.delivered.consumer_sequence,
        ack_pending: info.num_ack_pending,
        peak_rss_mib: peak,
        slow_consumers: slow_consumers(monitor)?,
        seconds,
    };
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let status = worker.0.wait()?;
    if !status.success() {
        bail!("{name}: SIGTERM ended the worker with {status}");
    }
    Ok(figures)
}

fn print_row(name: &str, f: &Figures) {
    let lost = f.sent as i64 - (f.scored + f.dead) as i64;
    println!(
        "| {name} | {} | {} | {} | {lost} | {} | {} | {:.0} | {} | {:.1} |",
        f.sent, f.scored, f.dead, f.deliveries, f.ack_pending, f.peak_rss_mib, f.slow_consumers, f.seconds
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let good = events(root, args.fuzz.max(1))?;
    let fuzz = hostile::payloads(&good, args.fuzz);
    let big: Vec<Vec<u8>> = events(root, args.burst)?
        .into_iter()
        .map(|line| {
            let mut v: Value = serde_json::from_str(&line).unwrap_or_default();
            v["metadata"] = serde_json::json!({"padding": "p".repeat(500_000)});
            v.to_string().into_bytes()
        })
        .collect();
    // Each row is printed as soon as its run ends, so a cut-off run keeps what finished.
    println!("| run | inputs | scored | dead-lettered | lost | deliveries | unacked after | peak RSS (MiB) | slow consumers | seconds |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    if args.fuzz > 0 {
        // A payload limit below the server's, so that oversized inputs are among the fuzz.
        let batch = "[batch]\nmax_payload_bytes = 900000";
        print_row(&format!("fuzz: {} mixed events", args.fuzz), &run(root, "fuzz", fuzz, batch).await?);
    }
    if args.burst > 0 {
        print_row(&format!("burst: {} × 500 KB events", args.burst), &run(root, "burst", big, "").await?);
    }
    Ok(())
}
