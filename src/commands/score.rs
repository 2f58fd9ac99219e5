//! `scorestream score`: score a JSONL file (or stdin) once, in input order.
//!
//! A reader thread parses, templates and tokenizes lines while the engine scores the previous
//! batch. Every input line ends as exactly one output line or one error record; a bad line never
//! stops the run. Only failing to start (model, files) is an error of the command.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::batch::policy::BatchLimits;
use crate::cli::ScoreArgs;
use crate::engine::Engine;
use crate::event::{ErrorBody, ErrorKind, EventError, InputEvent, ScoredEvent};
use crate::model::ModelOptions;
use crate::prompt::{Prepared, Prompter};

/// How long a partial batch waits for more lines before it is scored anyway.
const MAX_WAIT: Duration = Duration::from_millis(20);

/// An error record on `--errors`.
#[derive(Debug, Serialize)]
pub struct ErrorRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub line: usize,
    pub error: ErrorBody,
}

/// A line ready for the model.
struct Ready {
    line: usize,
    event: InputEvent,
    prepared: Prepared,
}

type Item = Result<Ready, ErrorRecord>;

pub fn run(args: &ScoreArgs) -> anyhow::Result<()> {
    let opts = args.model.options();
    let prompter = Arc::new(Prompter::load(&opts.path).context("cannot load the tokenizer and chat template")?);
    let engine = Engine::start(&opts)?;
    let input = open_input(&args.input)?;
    let mut output = open_output(&args.output)?;
    let mut errors: Box<dyn Write> = match &args.errors {
        Some(p) => Box::new(BufWriter::new(File::create(p).with_context(|| format!("cannot create {}", p.display()))?)),
        None => Box::new(std::io::stderr()),
    };
    let limits = BatchLimits { max_tokens: args.batch_tokens, max_events: args.batch_events };
    let (tx, rx) = sync_channel::<Item>(args.batch_events.max(1) * 2);
    let max_line = args.max_line_bytes;
    let reader = std::thread::spawn(move || read_and_prepare(input, &prompter, &opts, max_line, &tx));
    let progress = progress_bar();
    let mut sink = Sink { output: &mut output, errors: &mut errors, model: engine.info().name.clone(), progress: &progress };
    score_stream(&engine, &rx, limits, &mut sink)?;
    reader.join().map_err(|_| anyhow::anyhow!("the input reader panicked"))??;
    progress.finish_and_clear();
    output.flush()?;
    errors.flush()?;
    Ok(())
}

/// Where results go.
struct Sink<'a> {
    output: &'a mut dyn Write,
    errors: &'a mut dyn Write,
    model: String,
    progress: &'a indicatif::ProgressBar,
}

impl Sink<'_> {
    fn error(&mut self, rec: &ErrorRecord) -> std::io::Result<()> {
        self.progress.inc(1);
        writeln!(self.errors, "{}", serde_json::to_string(rec).map_err(std::io::Error::other)?)
    }

    fn scored(&mut self, ev: &ScoredEvent) -> std::io::Result<()> {
        self.progress.inc(1);
        writeln!(self.output, "{}", serde_json::to_string(ev).map_err(std::io::Error::other)?)
    }
}

/// Batch ready lines within `limits` and write each result as it comes.
fn score_stream(engine: &Engine, rx: &Receiver<Item>, limits: BatchLimits, sink: &mut Sink<'_>) -> anyhow::Result<()> {
    let mut pending: Vec<Ready> = Vec::new();
    let mut tokens = 0;
    loop {
        let item = match rx.recv_timeout(MAX_WAIT) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => {
                flush(engine, &mut pending, &mut tokens, sink)?;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match item {
            Err(rec) => sink.error(&rec)?,
            Ok(ready) => {
                let len = ready.prepared.ids.len();
                if !limits.admits(pending.len(), tokens, len) {
                    flush(engine, &mut pending, &mut tokens, sink)?;
                }
                tokens += len;
                pending.push(ready);
            }
        }
    }
    flush(engine, &mut pending, &mut tokens, sink)
}

fn flush(engine: &Engine, pending: &mut Vec<Ready>, tokens: &mut usize, sink: &mut Sink<'_>) -> anyhow::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let batch: Vec<Vec<u32>> = pending.iter().map(|r| r.prepared.ids.clone()).collect();
    match engine.score_blocking(batch) {
        Ok(scores) => {
            for (ready, score) in pending.drain(..).zip(scores) {
                let (n, truncated) = (ready.prepared.ids.len(), ready.prepared.truncated);
                sink.scored(&ScoredEvent::new(ready.event, score, n, truncated, &sink.model))?;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, events = pending.len(), "batch failed");
            for ready in pending.drain(..) {
                let err = EventError::new(ErrorKind::Model, e.to_string()).with_id(Some(ready.event.id));
                sink.error(&record(ready.line, &err))?;
            }
        }
    }
    *tokens = 0;
    sink.output.flush()?;
    Ok(())
}

fn record(line: usize, e: &EventError) -> ErrorRecord {
    ErrorRecord { id: e.id.clone(), line, error: e.into() }
}

/// Parse, validate, template and tokenize each non-blank line, in order.
fn read_and_prepare(
    mut input: Box<dyn BufRead + Send>,
    prompter: &Prompter,
    opts: &ModelOptions,
    max_line: usize,
    tx: &SyncSender<Item>,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        if input.read_until(b'\n', &mut buf).context("cannot read the input")? == 0 {
            return Ok(());
        }
        line += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let item = InputEvent::parse(trim_newline(&buf), max_line)
            .and_then(|event| {
                let prepared = prompter
                    .prepare(&event.messages, opts.max_tokens, opts.truncation)
                    .map_err(|e| e.with_id(Some(event.id.clone())))?;
                Ok(Ready { line, event, prepared })
            })
            .map_err(|e| record(line, &e));
        if tx.send(item).is_err() {
            return Ok(());
        }
    }
}

fn trim_newline(b: &[u8]) -> &[u8] {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    b.strip_suffix(b"\r").unwrap_or(b)
}

fn open_input(path: &str) -> anyhow::Result<Box<dyn BufRead + Send>> {
    Ok(if path == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(File::open(path).with_context(|| format!("cannot open {path}"))?))
    })
}

fn open_output(path: &str) -> anyhow::Result<Box<dyn Write>> {
    Ok(if path == "-" {
        Box::new(BufWriter::new(std::io::stdout()))
    } else {
        Box::new(BufWriter::new(File::create(path).with_context(|| format!("cannot create {path}"))?))
    })
}

fn progress_bar() -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} conversations scored or rejected ({per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
