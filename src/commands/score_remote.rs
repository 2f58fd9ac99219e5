//! `scorestream score --url http://HOST:PORT`: score a JSONL file with a running worker's
//! `POST /v1/score` instead of a model loaded here, with the same output lines, error records and
//! exit status as a local `score` of the same file (when the worker runs the same model with the
//! same limits).
//!
//! Non-blank lines go in JSONL requests of at most `--batch-events` lines and [`MAX_BODY`]
//! bytes, [`IN_FLIGHT`] requests at a time; results are written in input order. A request the
//! worker finds too large (413) is split in two and sent again; a single line it refuses is an
//! error record of kind `oversized`. Busy (429) and stopping (503) answers, and failed
//! connections, are retried after `Retry-After` (else one second), at most [`MAX_ATTEMPTS`] times
//! per request ([`MAX_CONNECTION_ATTEMPTS`] for connections); any other refusal (401: token)
//! fails the run. Scoring has no side effects on the
//! worker, so a retried request does no harm.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Request, StatusCode, Uri};

use crate::batch::config::DEFAULT_MAX_CANDIDATES;
use crate::pipeline::candidates::Event;
use crate::cli::ScoreArgs;
use crate::commands::score::NothingScored;
use crate::event::{ErrorBody, ErrorKind};

/// An error record as a local `score` writes it (`pipeline::dead_letter::error_record`):
/// `{"id"?, "line", "error"}`, in that order.
#[derive(Debug, serde::Serialize)]
struct ErrorRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    line: usize,
    error: ErrorBody,
}

/// Requests sent at a time: enough to keep the worker's batches full while one answer travels.
const IN_FLIGHT: usize = 4;
/// Largest request body, below the worker's default `http.max_body_bytes` (8 MiB).
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Tries of one request answered 429 or 503.
const MAX_ATTEMPTS: u32 = 30;
/// Tries of one request whose connection failed (a wrong URL fails in seconds).
const MAX_CONNECTION_ATTEMPTS: u32 = 3;
/// Longest wait between tries, whatever `Retry-After` says.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One non-blank input line and its number (1-based, blank lines counted, as `score` counts).
struct Line {
    number: usize,
    bytes: Vec<u8>,
    /// Over `--max-line-bytes`: its error record, made here as `score` makes it, and not sent.
    refused: Option<ErrorRecord>,
}

/// What one input line became.
enum Outcome {
    /// The scored event's JSON line, as the worker wrote it.
    Scored(Bytes),
    Failed(ErrorRecord),
}

/// Where and how to post.
struct Target {
    uri: Uri,
    path: String,
    host: HeaderValue,
    addr: String,
    token: Option<HeaderValue>,
}

pub fn run(args: &ScoreArgs, url: &str) -> anyhow::Result<()> {
    let target = Target::new(url, args.token_file.as_deref())?;
    let input = open_input(&args.input)?;
    let mut output = open_output(&args.output)?;
    let mut errors: Box<dyn Write> = match &args.errors {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::stderr()),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Line>>(IN_FLIGHT);
    let (batch_events, max_line) = (args.batch_events.max(1), args.max_line_bytes);
    let reader = std::thread::spawn(move || read_batches(input, batch_events, max_line, &tx));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (scored, failed) = runtime.block_on(async {
        let batches = futures::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|b| (b, rx)) });
        let mut results = std::pin::pin!(batches.map(|batch| score_lines(&target, batch)).buffered(IN_FLIGHT));
        let (mut scored, mut failed) = (0u64, 0u64);
        while let Some(outcomes) = results.next().await {
            for outcome in outcomes? {
                match outcome {
                    Outcome::Scored(line) => {
                        scored += 1;
                        output.write_all(&line)?;
                        output.write_all(b"\n")?;
                    }
                    Outcome::Failed(rec) => {
                        failed += 1;
                        writeln!(errors, "{}", serde_json::to_string(&rec)?)?;
                    }
                }
            }
        }
        anyhow::Ok((scored, failed))
    })?;
    reader.join().map_err(|_| anyhow::anyhow!("the input reader panicked"))??;
    output.flush()?;
    errors.flush()?;
    if scored == 0 && failed > 0 {
        return Err(NothingScored { failed }.into());
    }
    Ok(())
}

impl Target {
    /// `url` is `http://HOST:PORT`, with `/v1/score` as the path when it names none.
    fn new(url: &str, token_file: Option<&Path>) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("--url {url} is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            anyhow::bail!("--url {url}: only http:// is supported (put a TLS-terminating proxy in front for https)");
        }
        let authority = uri.authority().with_context(|| format!("--url {url} has no host"))?.clone();
        let path = match uri.path() {
            "" | "/" => "/v1/score",
            p => p,
        };
        let path = path.to_owned();
        let addr = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        let token = match token_file {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("cannot read the token file {}", p.display()))?;
                let mut token = HeaderValue::from_str(&format!("Bearer {}", text.trim()))
                    .map_err(|_| anyhow::anyhow!("the token in {} is not a valid header value", p.display()))?;
                token.set_sensitive(true);
                Some(token)
            }
            None => None,
        };
        // Host without any user:password@ part of the URL.
        let host = match authority.port() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_owned(),
        };
        let uri = Uri::builder().scheme("http").authority(host.as_str()).path_and_query(path.as_str()).build()?;
        Ok(Self { host: HeaderValue::from_str(&host)?, uri, path, addr, token })
    }
}

/// Read non-blank lines into batches of at most `events` lines and [`MAX_BODY`] bytes.
fn read_batches(
    mut input: Box<dyn BufRead + Send>,
    events: usize,
    max_line: usize,
    tx: &tokio::sync::mpsc::Sender<Vec<Line>>,
) -> anyhow::Result<()> {
    let (mut batch, mut bytes, mut number) = (Vec::new(), 0, 0);
    loop {
        let mut buf = Vec::new();
        if input.read_until(b'\n', &mut buf).context("cannot read the input")? == 0 {
            break;
        }
        number += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let buf = trim_newline(buf);
        if !batch.is_empty() && (batch.len() == events || bytes + buf.len() + 1 > MAX_BODY) {
            if tx.blocking_send(std::mem::take(&mut batch)).is_err() {
                return Ok(());
            }
            bytes = 0;
        }
        let refused = (max_line > 0 && buf.len() > max_line)
            .then(|| Event::parse(&buf, max_line, DEFAULT_MAX_CANDIDATES).err())
            .flatten()
            .map(|e| ErrorRecord { id: e.id.clone(), line: number, error: (&e).into() });
        if refused.is_none() {
            bytes += buf.len() + 1;
        }
        batch.push(Line { number, bytes: buf, refused });
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(batch);
    }
    Ok(())
}

fn trim_newline(mut b: Vec<u8>) -> Vec<u8> {
    if b.last() == Some(&b'\n') {
        b.pop();
    }
    if b.last() == Some(&b'\r') {
        b.pop();
    }
    b
}

/// The outcome of each line of `batch`, in order.
async fn score_lines(target: &Target, batch: Vec<Line>) -> anyhow::Result<Vec<Outcome>> {
    let (refused, send): (Vec<Line>, Vec<Line>) = batch.into_iter().partition(|l| l.refused.is_some());
    let mut out: Vec<(usize, Outcome)> =
        refused.into_iter().filter_map(|l| l.refused.map(|r| (l.number, Outcome::Failed(r)))).collect();
    // Parts still to send, in order; a part the worker finds too large is split in two.
    let mut parts: Vec<&[Line]> = if send.is_empty() { Vec::new() } else { vec![&send] };
    while let Some(part) = parts.pop() {
        match post(target, part).await? {
            Some(results) => out.extend(part.iter().map(|l| l.number).zip(results)),
            None if part.len() == 1 => out.push((part[0].number, Outcome::Failed(refused_by_worker(&part[0])))),
            None => {
                let (a, b) = part.split_at(part.len() / 2);
                parts.push(b);
                parts.push(a);
            }
        }
    }
    out.sort_by_key(|(number, _)| *number);
    Ok(out.into_iter().map(|(_, o)| o).collect())
}

/// The error record of a line the worker refused to take (413).
fn refused_by_worker(line: &Line) -> ErrorRecord {
    let id = serde_json::from_slice::<serde_json::Value>(&line.bytes).ok().and_then(|v| v["id"].as_str().map(str::to_owned));
    let error = ErrorBody { kind: ErrorKind::Oversized, message: "the worker refused the request as too large (413)".into() };
    ErrorRecord { id, line: line.number, error }
}

/// Post `lines` as one JSONL request: their outcomes, or `None` when the worker answers 413.
async fn post(target: &Target, lines: &[Line]) -> anyhow::Result<Option<Vec<Outcome>>> {
    let mut body = Vec::with_capacity(lines.iter().map(|l| l.bytes.len() + 1).sum());
    for line in lines {
        body.extend_from_slice(&line.bytes);
        body.push(b'\n');
    }
    let body = Bytes::from(body);
    // Tries so far: answered busy, failed to connect or to read the answer.
    let (mut busy, mut failed) = (0, 0);
    loop {
        let wait = match send(target, body.clone()).await {
            Ok((StatusCode::OK, _, answer)) => return parse_answer(lines, &answer).map(Some),
            Ok((StatusCode::PAYLOAD_TOO_LARGE, ..)) => return Ok(None),
            Ok((status @ (StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE), retry_after, _)) => {
                busy += 1;
                if busy >= MAX_ATTEMPTS {
                    anyhow::bail!("{} was still busy ({status}) after {MAX_ATTEMPTS} tries", target.uri);
                }
                tracing::debug!(%status, busy, "the worker is busy; retrying");
                retry_after.unwrap_or(Duration::from_secs(1))
            }
            Ok((status, _, answer)) => {
                anyhow::bail!("{} answered {status}: {}", target.uri, String::from_utf8_lossy(&answer).trim())
            }
            Err(e) => {
                failed += 1;
                if failed >= MAX_CONNECTION_ATTEMPTS {
                    return Err(e);
                }
                tracing::debug!(error = %e, failed, "request failed; retrying");
                Duration::from_secs(1)
            }
        };
        tokio::time::sleep(wait.min(MAX_BACKOFF)).await;
    }
}

/// One request on its own connection: the status, `Retry-After` and the body.
async fn send(target: &Target, body: Bytes) -> anyhow::Result<(StatusCode, Option<Duration>, Bytes)> {
    let stream =
        tokio::net::TcpStream::connect(&target.addr).await.with_context(|| format!("cannot connect to {}", target.addr))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let mut request = Request::post(target.path.as_str())
        .header(HOST, target.host.clone())
        .header(CONTENT_TYPE, "application/x-ndjson")
        .body(Full::new(body))?;
    if let Some(token) = &target.token {
        request.headers_mut().insert(AUTHORIZATION, token.clone());
    }
    let response = sender.send_request(request).await.with_context(|| format!("POST {} failed", target.uri))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let answer = response.into_body().collect().await.with_context(|| format!("reading the answer of {}", target.uri))?;
    conn.abort();
    Ok((status, retry_after, answer.to_bytes()))
}

/// One JSONL result per line, in order: a scored event, or an error record (`error` object).
fn parse_answer(lines: &[Line], answer: &[u8]) -> anyhow::Result<Vec<Outcome>> {
    let results: Vec<&[u8]> = answer.split(|b| *b == b'\n').filter(|l| !l.trim_ascii().is_empty()).collect();
    if results.len() != lines.len() {
        anyhow::bail!("the worker answered {} results for {} events", results.len(), lines.len());
    }
    let mut out = Vec::with_capacity(lines.len());
    for (line, result) in lines.iter().zip(results) {
        let value: serde_json::Value = serde_json::from_slice(result).context("the worker answered a line that is not JSON")?;
        match value.get("error") {
            Some(error) => {
                let error: ErrorBody = serde_json::from_value(error.clone()).context("the worker answered an unknown error record")?;
                let id = value.get("id").and_then(|v| v.as_str()).map(str::to_owned);
                out.push(Outcome::Failed(ErrorRecord { id, line: line.number, error }));
            }
            None => out.push(Outcome::Scored(Bytes::copy_from_slice(result))),
        }
    }
    Ok(out)
}

fn open_input(path: &str) -> anyhow::Result<Box<dyn BufRead + Send>> {
    Ok(if path == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(path).with_context(|| format!("cannot open {path}"))?))
    })
}

fn open_output(path: &str) -> anyhow::Result<Box<dyn Write>> {
    Ok(if path == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout()))
    } else {
        Box::new(std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("cannot create {path}"))?))
    })
}
