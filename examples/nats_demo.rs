//! One-command streaming demo: starts a nats-server with JetStream on loopback (Debian's
//! `nats-server` package), publishes the example conversations, runs `scorestream run` on the
//! trained arithmetic fixture, prints the scored events and a few metric lines, then stops
//! everything it started.
//!
//! `cargo run --release --example nats_demo`

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;

mod common;
use common::{free_port, scorestream_binary, start_nats, Guard};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir()?;
    let http_port = free_port()?;
    let (_server, url, js) = start_nats(dir.path()).await?;
    let examples = std::fs::read_to_string(root.join("tests/fixtures/arith/examples.jsonl"))?;
    let n = examples.lines().filter(|l| !l.trim().is_empty()).count();
    for line in examples.lines().filter(|l| !l.trim().is_empty()) {
        js.publish("conv.in", line.as_bytes().to_vec().into()).await?.await?;
    }
    println!("published {n} conversations to conv.in on {url}");

    let config = dir.path().join("worker.toml");
    let model = root.join("tests/fixtures/arith");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = \"{}\"\n[source]\ntype = \"nats\"\nurl = \"{url}\"\nstream = \"CONV\"\nsubject = \"conv.in\"\ndurable = \"scorestream\"\n\
             [sink]\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"conv.scored\"\n[dead_letter]\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"conv.dead\"\n\
             [http]\nlisten = \"127.0.0.1:{http_port}\"\n",
            model.display()
        ),
    )?;
    // Under `cargo run`, common::scorestream_binary builds the worker first, so it is current.
    let mut cmd = Command::new(scorestream_binary(&root)?);
    let worker = cmd.args(["run", "--config"]).arg(&config).stderr(Stdio::null()).spawn();
    let mut worker = Guard(worker.context("cannot start scorestream (build it with `cargo build --release`)")?);

    let mut scored = js.get_stream("SCORED").await?;
    let start = Instant::now();
    while scored.info().await?.state.messages < n as u64 {
        if let Some(status) = worker.0.try_wait()? {
            bail!("the worker exited early: {status}");
        }
        if start.elapsed() > Duration::from_secs(900) {
            bail!("timed out waiting for scores");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let consumer = scored
        .create_consumer(jetstream::consumer::pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await?;
    let mut msgs = consumer.messages().await?.take(n);
    println!("\nscored events on conv.scored:");
    while let Some(m) = msgs.next().await {
        println!("  {}", String::from_utf8_lossy(&m?.payload));
    }
    let metrics = reqwest_metrics(http_port)?;
    println!("\nfrom http://127.0.0.1:{http_port}/metrics:");
    for line in metrics.lines().filter(|l| {
        l.starts_with("scorestream_events_consumed_total")
            || l.starts_with("scorestream_events_scored_total")
            || l.starts_with("scorestream_tokens_scored_total")
            || l.starts_with("scorestream_model_info")
    }) {
        println!("  {line}");
    }
    // Graceful stop: SIGTERM drains, acks and exits 0.
    Command::new("kill").args(["-TERM", &worker.0.id().to_string()]).status()?;
    let status = worker.0.wait()?;
    println!("\nworker stopped ({status}); nats-server stopped");
    Ok(())
}

/// GET /metrics with a plain TCP request (no HTTP client dependency for one call).
fn reqwest_metrics(port: u16) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(buf)
}
