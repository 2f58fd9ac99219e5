//! What the examples share: a nats-server with JetStream on loopback (Debian's `nats-server`
//! package) with the demo streams, and a guard that stops child processes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, stream};

/// Kills the process when dropped, so nothing outlives the example.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A nats-server with JetStream storing under `dir`, and the streams CONV (`conv.in`), SCORED
/// (`conv.scored`) and DEAD (`conv.dead`). Returns the server's guard, URL and JetStream context.
pub async fn start_nats(dir: &Path) -> anyhow::Result<(Guard, String, jetstream::Context)> {
    let port = free_port()?;
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, format!("listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n", dir.join("js").display()))?;
    let server = Command::new("nats-server").arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
    let guard = Guard(server.context("cannot start nats-server: install it with `apt-get install nats-server`")?);
    let url = format!("nats://127.0.0.1:{port}");
    let start = Instant::now();
    let client = loop {
        match async_nats::connect(&url).await {
            Ok(c) => break c,
            Err(_) if start.elapsed() < Duration::from_secs(20) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => bail!("nats-server did not come up: {e}"),
        }
    };
    let js = jetstream::new(client);
    for (name, subject) in [("CONV", "conv.in"), ("SCORED", "conv.scored"), ("DEAD", "conv.dead")] {
        js.get_or_create_stream(stream::Config { name: name.into(), subjects: vec![subject.into()], ..Default::default() })
            .await?;
    }
    Ok((guard, url, js))
}
