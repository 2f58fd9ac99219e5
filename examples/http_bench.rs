//! HTTP scoring benchmark: `POST /v1/score` requests of 1 and of 32 conversations against a
//! running worker (`target/<profile>/scorestream run` with `http.score_api`), next to the same
//! events published to the worker's NATS JetStream input and read back from its output subject.
//!
//! Two models: the trained arithmetic fixture (`tests/fixtures/arith`, hidden 128, 4 layers),
//! and a realistic small shape: Qwen2.5-0.5B's layer sizes (hidden 896, 14 query and 2 K/V heads
//! of 64, MLP 4,864, q/k/v bias) with random f32 weights and `--qwen-layers` layers (the
//! generator of `benches/shared_prefix.rs`), using the fixture's tokenizer and chat template, so
//! both score the fixture's conversations (~18 tokens each).
//!
//! For each model, path (HTTP or NATS), request size (1 or 32 events) and concurrency (1 client,
//! or `--clients` at once), clients send requests back to back for `--seconds`: a request is
//! one POST (its latency: until the answer is read, on a kept-alive connection), or one group
//! of events published to `conv.in` (its latency: until the last of its scored events is seen
//! on `conv.scored`). Prints one markdown table: requests, events, latency p50/p99, events/s.
//!
//! `cargo run --release --example http_bench -- [--seconds 10] [--clients 16] [--models arith,qwen]`

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use tokio::sync::oneshot;

mod common;
use common::{events, free_port, scorestream_binary, start_nats, Guard};

#[derive(Parser)]
#[command(about = "POST /v1/score latency and throughput next to the same events through NATS")]
struct Args {
    /// Seconds each row sends requests for.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Clients of the concurrent rows.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Models: arith (the trained fixture), qwen (Qwen2.5-0.5B layer sizes, random weights).
    #[arg(long, value_delimiter = ',', default_value = "arith,qwen")]
    models: Vec<String>,
    /// Layers of the Qwen-shaped model.
    #[arg(long, default_value_t = 4)]
    qwen_layers: usize,
}

/// One row of the table.
struct Row {
    model: String,
    path: &'static str,
    size: usize,
    clients: usize,
    latencies: Vec<Duration>,
    wall: Duration,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = scorestream_binary(&root)?;
    let pool = events(&root, 20_000)?;
    let mut rows = Vec::new();
    for model in &args.models {
        let dir = tempfile::tempdir()?;
        let (name, path) = match model.as_str() {
            "arith" => ("arith fixture".to_owned(), root.join("tests/fixtures/arith")),
            "qwen" => {
                let path = dir.path().join("qwen");
                write_qwen_shaped(&path, &root.join("tests/fixtures/arith"), args.qwen_layers)?;
                (format!("Qwen2.5-0.5B-shaped, {} layers", args.qwen_layers), path)
            }
            other => bail!("unknown model {other}: arith or qwen"),
        };
        eprintln!("{name}: starting the worker");
        rows.extend(bench_model(&args, &bin, &name, &path, dir.path(), &pool).await?);
    }
    println!("| model | path | events per request | clients | requests | events | p50 ms | p99 ms | events/s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let mut l = r.latencies.clone();
        l.sort();
        let q = |p: f64| l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1].as_secs_f64() * 1e3;
        let events = l.len() * r.size;
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.0} |",
            r.model,
            r.path,
            r.size,
            r.clients,
            l.len(),
            events,
            q(0.5),
            q(0.99),
            events as f64 / r.wall.as_secs_f64()
        );
    }
    Ok(())
}

async fn bench_model(
    args: &Args,
    bin: &Path,
    name: &str,
    model: &Path,
    dir: &Path,
    pool: &[String],
) -> anyhow::Result<Vec<Row>> {
    let (_nats, url, js) = start_nats(dir).await?;
    let (http_port, api_port) = (free_port()?, free_port()?);
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "shutdown_timeout = \"30s\"\n[model]\npath = \"{}\"\n\
             [source]\ntype = \"nats\"\nurl = \"{url}\"\nstream = \"CONV\"\nsubject = \"conv.in\"\ndurable = \"bench\"\n\
             [sink]\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"conv.scored\"\n\
             [dead_letter]\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"conv.dead\"\n\
             [http]\nlisten = \"127.0.0.1:{http_port}\"\napi_listen = \"127.0.0.1:{api_port}\"\n\
             score_api = true\nmax_pending_events = 8192\n",
            model.display()
        ),
    )?;
    let log = std::fs::File::create(dir.join("worker.log"))?;
    let child = Command::new(bin).args(["run", "--config"]).arg(&config).stdout(Stdio::null()).stderr(log).spawn()?;
    let _worker = Guard(child);
    let start = Instant::now();
    while post(api_port, &pool[..1]).await.is_err() {
        if start.elapsed() > Duration::from_secs(300) {
            let log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
            bail!("the worker did not answer within 300 s:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let outputs = Outputs::subscribe(&url).await?;
    let mut rows = Vec::new();
    let mut next = 0usize;
    for path in ["http", "nats"] {
        for (size, clients) in [(1, 1), (32, 1), (1, args.clients), (32, args.clients)] {
            eprintln!("{name}: {path}, {size} events per request, {clients} clients");
            let row = Row {
                model: name.to_owned(),
                path,
                size,
                clients,
                latencies: Vec::new(),
                wall: Duration::ZERO,
            };
            let deadline = Duration::from_secs(args.seconds);
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..clients {
                // Each client gets its own slice of events (unique ids across rows).
                let mut own: Vec<String> = Vec::new();
                for _ in 0..(20_000 / (clients * 8)).max(size) {
                    own.push(pool[next % pool.len()].replacen("\"id\":\"", &format!("\"id\":\"r{next}-"), 1));
                    next += 1;
                }
                let (js, outputs) = (js.clone(), outputs.clone());
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut at = 0;
                    let mut conn = None;
                    while started.elapsed() < deadline {
                        let group: Vec<String> = (0..size).map(|i| own[(at + i) % own.len()].clone()).collect();
                        at += size;
                        let t = Instant::now();
                        match path {
                            "http" => post_on(&mut conn, api_port, &group).await?,
                            _ => publish_and_wait(&js, &outputs, &group, at).await?,
                        }
                        latencies.push(t.elapsed());
                    }
                    anyhow::Ok(latencies)
                }));
            }
            let mut row = row;
            for t in tasks {
                row.latencies.extend(t.await??);
            }
            row.wall = started.elapsed();
            rows.push(row);
        }
    }
    Ok(rows)
}

/// POST `events` as one JSON array on a new connection; Ok when answered 200 with one result
/// per event.
async fn post(port: u16, events: &[String]) -> anyhow::Result<()> {
    let mut conn = None;
    post_on(&mut conn, port, events).await
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// POST `events` on the kept-alive connection `conn` (opened when none).
async fn post_on(conn: &mut Option<Sender>, port: u16, events: &[String]) -> anyhow::Result<()> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        *conn = Some(sender);
    }
    let sender = conn.as_mut().context("a connection")?;
    sender.ready().await?;
    let body = Bytes::from(format!("[{}]", events.join(",")));
    let request = hyper::Request::post("/v1/score")
        .header(hyper::header::HOST, "127.0.0.1")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let answer = response.into_body().collect().await?.to_bytes();
    if status != hyper::StatusCode::OK {
        bail!("answered {status}: {}", String::from_utf8_lossy(&answer));
    }
    let results: Vec<serde_json::Value> = serde_json::from_slice(&answer)?;
    if results.len() != events.len() || results.iter().any(|r| r.get("reward").is_none()) {
        bail!("unexpected answer: {}", String::from_utf8_lossy(&answer));
    }
    Ok(())
}

/// Scored events seen on `conv.scored`, handed to whoever waits for their id.
#[derive(Clone)]
struct Outputs {
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>,
}

impl Outputs {
    async fn subscribe(url: &str) -> anyhow::Result<Self> {
        let client = async_nats::connect(url).await?;
        let mut sub = client.subscribe("conv.scored").await?;
        let waiting: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>> = Arc::default();
        let w = waiting.clone();
        tokio::spawn(async move {
            let _client = client;
            while let Some(msg) = sub.next().await {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else { continue };
                let Some(id) = v["id"].as_str() else { continue };
                if let Some(tx) = w.lock().ok().and_then(|mut w| w.remove(id)) {
                    let _ = tx.send(());
                }
            }
        });
        Ok(Self { waiting })
    }
}

/// Publish `events` (ids made unique with `round`) to `conv.in` and wait until each was scored.
async fn publish_and_wait(
    js: &async_nats::jetstream::Context,
    outputs: &Outputs,
    events: &[String],
    round: usize,
) -> anyhow::Result<()> {
    let mut seen = Vec::with_capacity(events.len());
    let mut acks = Vec::with_capacity(events.len());
    for e in events {
        let line = e.replacen("\"id\":\"", &format!("\"id\":\"n{round}-"), 1);
        let id = serde_json::from_str::<serde_json::Value>(&line)?["id"].as_str().context("an id")?.to_owned();
        let (tx, rx) = oneshot::channel();
        outputs.waiting.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert(id, tx);
        seen.push(rx);
        acks.push(js.publish("conv.in", line.into_bytes().into()).await?);
    }
    for ack in acks {
        ack.await?;
    }
    for rx in seen {
        tokio::time::timeout(Duration::from_secs(120), rx).await?.context("the output subscription ended")?;
    }
    Ok(())
}

/// A checkpoint of Qwen2.5-0.5B's layer sizes with `layers` layers and random f32 weights, with
/// the fixture's tokenizer and chat template (its vocabulary) beside it.
fn write_qwen_shaped(dir: &Path, fixture: &Path, layers: usize) -> anyhow::Result<()> {
    let (hidden, heads, kv_heads, head_dim, inter) = (896, 14, 2, 64, 4864);
    let vocab: usize = {
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json"))?)?;
        config["vocab_size"].as_u64().context("the fixture's vocab_size")? as usize
    };
    std::fs::create_dir_all(dir)?;
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        if fixture.join(f).exists() {
            std::fs::copy(fixture.join(f), dir.join(f))?;
        }
    }
    let dev = Device::Cpu;
    let rand = |shape: &[usize]| Tensor::randn(0f32, 0.05, shape, &dev);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rand(&[vocab, hidden])?);
    t.insert("model.norm.weight".into(), Tensor::ones(hidden, DType::F32, &dev)?);
    t.insert("score.weight".into(), rand(&[1, hidden])?);
    let (q, kv) = (heads * head_dim, kv_heads * head_dim);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, out, inp) in [("q_proj", q, hidden), ("k_proj", kv, hidden), ("v_proj", kv, hidden), ("o_proj", hidden, q)] {
            t.insert(format!("{p}.self_attn.{n}.weight"), rand(&[out, inp])?);
            if n != "o_proj" {
                t.insert(format!("{p}.self_attn.{n}.bias"), rand(&[out])?);
            }
        }
        for (n, out, inp) in [("gate_proj", inter, hidden), ("up_proj", inter, hidden), ("down_proj", hidden, inter)] {
            t.insert(format!("{p}.mlp.{n}.weight"), rand(&[out, inp])?);
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{n}.weight"), Tensor::ones(hidden, DType::F32, &dev)?);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["Qwen2ForSequenceClassification"], "model_type": "qwen2", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "num_labels": 1, "pad_token_id": 0,
        "torch_dtype": "float32", "rope_theta": 10000.0});
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok(())
}
