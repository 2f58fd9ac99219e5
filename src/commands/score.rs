//! `scorestream score`: score a JSONL file (or stdin) once, in input order.
//!
//! A reader thread parses, templates and tokenizes lines while the engine scores the previous
//! batch. Every input line ends as exactly one output line or one error record; a bad line never
//! stops the run. Failing to start (model, files) is an error of the command, and so is an input
//! of which no line could be scored ([`NothingScored`]: exit status 3, see `cli::Command::Score`).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::batch::policy::BatchLimits;
use crate::candidates::{BestOfNEvent, Event, RankedEvent, DEFAULT_MAX_CANDIDATES};
use crate::cli::ScoreArgs;
use crate::engine::Engine;
use crate::event::{ErrorBody, ErrorKind, EventError, InputEvent, Score, ScoredEvent};
use crate::prompt::{Prepared, Prompter, TruncationPolicy};

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

/// Every input line failed: error records only, no score. Not an empty input (nothing failed).
#[derive(Debug, thiserror::Error)]
#[error("nothing scored: all {failed} input lines failed (see the error records)")]
pub struct NothingScored {
    pub failed: u64,
}

/// A line ready for the model.
struct Ready {
    line: usize,
    job: Job,
}

/// What a line asks: one conversation, or a best-of-N event with each candidate's prepared
/// conversation (or why it cannot be scored).
enum Job {
    One { event: InputEvent, prepared: Prepared },
    BestOfN { event: BestOfNEvent, candidates: Vec<Result<Prepared, EventError>> },
}

impl Ready {
    /// The sequences this line sends to the model, in order.
    fn sequences(&self) -> Vec<&[u32]> {
        match &self.job {
            Job::One { prepared, .. } => vec![prepared.ids.as_slice()],
            Job::BestOfN { candidates, .. } => candidates.iter().flatten().map(|p| p.ids.as_slice()).collect(),
        }
    }

    fn id(&self) -> String {
        match &self.job {
            Job::One { event, .. } => event.id.clone(),
            Job::BestOfN { event, .. } => event.id.clone(),
        }
    }
}

type Item = Result<Ready, ErrorRecord>;

/// Scores a batch: one score per sequence, in order, or why the batch failed.
type ScoreFn<'a> = dyn Fn(Vec<Vec<u32>>) -> Result<Vec<Score>, String> + 'a;

pub fn run(args: &ScoreArgs) -> anyhow::Result<()> {
    let opts = args.model.options();
    let prompter = Arc::new(Prompter::load(&opts.path).context("cannot load the tokenizer and chat template")?);
    let limits = BatchLimits { max_tokens: args.batch_tokens, max_events: args.batch_events };
    let engine = Engine::start_with_limits(&opts, limits)?.with_min_shared_prefix(args.min_shared_prefix);
    // The length limit (`--max-tokens` capped by the model's positions) must fit one batch.
    if engine.info().max_tokens > args.batch_tokens {
        anyhow::bail!(
            "the length limit ({} tokens) is above --batch-tokens ({}): a conversation that long could never be batched",
            engine.info().max_tokens,
            args.batch_tokens
        );
    }
    let input = open_input(&args.input)?;
    let mut output = open_output(&args.output)?;
    let mut errors: Box<dyn Write> = match &args.errors {
        Some(p) => Box::new(BufWriter::new(File::create(p).with_context(|| format!("cannot create {}", p.display()))?)),
        None => Box::new(std::io::stderr()),
    };
    let (tx, rx) = sync_channel::<Item>(args.batch_events.max(1) * 2);
    let max_line = args.max_line_bytes;
    // The engine's limit: `max_tokens` capped by the model's positions.
    let length = (engine.info().max_tokens, opts.truncation);
    let reader = std::thread::spawn(move || read_and_prepare(input, &prompter, length, max_line, &tx));
    let progress = progress_bar();
    let mut sink =
        Sink { output: &mut output, errors: &mut errors, model: engine.info().name.clone(), progress: &progress, counts: (0, 0) };
    let score = |batch: Vec<Vec<u32>>| engine.score_blocking(batch).map_err(|e| e.to_string());
    score_stream(&score, &rx, limits, &mut sink)?;
    let (scored, failed) = sink.counts;
    reader.join().map_err(|_| anyhow::anyhow!("the input reader panicked"))??;
    progress.finish_and_clear();
    output.flush()?;
    errors.flush()?;
    if scored == 0 && failed > 0 {
        return Err(NothingScored { failed }.into());
    }
    Ok(())
}

/// Where results go.
struct Sink<'a> {
    output: &'a mut dyn Write,
    errors: &'a mut dyn Write,
    model: String,
    progress: &'a indicatif::ProgressBar,
    /// Lines scored, lines failed.
    counts: (u64, u64),
}

impl Sink<'_> {
    fn error(&mut self, rec: &ErrorRecord) -> std::io::Result<()> {
        self.progress.inc(1);
        self.counts.1 += 1;
        writeln!(self.errors, "{}", serde_json::to_string(rec).map_err(std::io::Error::other)?)
    }

    fn scored<T: Serialize>(&mut self, ev: &T) -> std::io::Result<()> {
        self.progress.inc(1);
        self.counts.0 += 1;
        writeln!(self.output, "{}", serde_json::to_string(ev).map_err(std::io::Error::other)?)
    }
}

/// Batch ready lines within `limits` and write each result as it comes.
fn score_stream(engine: &ScoreFn<'_>, rx: &Receiver<Item>, limits: BatchLimits, sink: &mut Sink<'_>) -> anyhow::Result<()> {
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
                let len = ready.sequences().iter().map(|s| s.len()).sum();
                let sequences: usize = pending.iter().map(|r| r.sequences().len()).sum();
                if !limits.admits(sequences, tokens, len) {
                    flush(engine, &mut pending, &mut tokens, sink)?;
                }
                tokens += len;
                pending.push(ready);
            }
        }
    }
    flush(engine, &mut pending, &mut tokens, sink)
}

/// Score `pending` and write one line for each of its inputs, scored or an error record:
/// outputs + error records = inputs, whatever the model returns.
fn flush(engine: &ScoreFn<'_>, pending: &mut Vec<Ready>, tokens: &mut usize, sink: &mut Sink<'_>) -> anyhow::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let batch: Vec<Vec<u32>> = pending.iter().flat_map(|r| r.sequences()).map(<[u32]>::to_vec).collect();
    let sequences = batch.len();
    let scores = match engine(batch) {
        Ok(s) if s.len() == sequences => Ok(s),
        Ok(s) => Err(format!("the model returned {} scores for {sequences} sequences", s.len())),
        Err(e) => Err(e),
    };
    match scores {
        Ok(scores) => {
            let mut scores = scores.into_iter();
            for ready in pending.drain(..) {
                let line = ready.line;
                match ready.job {
                    // (The count was checked: a missing score is unreachable, and still an error.)
                    Job::One { event, prepared } => {
                        let score = scores.next().ok_or_else(|| "missing score".to_owned());
                        match score.and_then(|s| s.check_finite().map(|()| s)) {
                            Ok(s) => sink.scored(&ScoredEvent::new(event, s, prepared.ids.len(), prepared.truncated, &sink.model))?,
                            Err(e) => sink.error(&record(line, &model_error(event.id, &e)))?,
                        }
                    }
                    Job::BestOfN { event, candidates } => {
                        let missing = || EventError::new(ErrorKind::Model, "missing score");
                        let outcomes = candidates
                            .into_iter()
                            .map(|c| c.and_then(|p| scores.next().map(|s| (s, p.ids.len(), p.truncated)).ok_or_else(missing)))
                            .collect();
                        sink.scored(&RankedEvent::new(event, outcomes, &sink.model))?;
                    }
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, events = pending.len(), "batch failed");
            for ready in pending.drain(..) {
                sink.error(&record(ready.line, &model_error(ready.id(), &e)))?;
            }
        }
    }
    *tokens = 0;
    sink.output.flush()?;
    Ok(())
}

fn model_error(id: String, message: &str) -> EventError {
    EventError::new(ErrorKind::Model, message).with_id(Some(id))
}

fn record(line: usize, e: &EventError) -> ErrorRecord {
    ErrorRecord { id: e.id.clone(), line, error: e.into() }
}

/// Parse, validate, template and tokenize each non-blank line, in order.
fn read_and_prepare(
    mut input: Box<dyn BufRead + Send>,
    prompter: &Prompter,
    (max_tokens, truncation): (usize, TruncationPolicy),
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
        let prepare = |e: &InputEvent| prompter.prepare(&e.messages, max_tokens, truncation).map_err(|err| err.with_id(Some(e.id.clone())));
        let item = Event::parse(trim_newline(&buf), max_line, DEFAULT_MAX_CANDIDATES)
            .and_then(|event| {
                let job = match event {
                    Event::Single(event) => Job::One { prepared: prepare(&event)?, event },
                    Event::BestOfN(event) => {
                        let candidates = event.conversations().into_iter().map(|c| c.and_then(|c| prepare(&c))).collect();
                        Job::BestOfN { event, candidates }
                    }
                };
                Ok(Ready { line, job })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(line: usize) -> Ready {
        let event = InputEvent::parse(
            format!(r#"{{"id":"e{line}","messages":[{{"role":"assistant","content":"a"}}]}}"#).as_bytes(),
            0,
        )
        .unwrap();
        Ready { line, job: Job::One { event, prepared: Prepared { ids: vec![1, 2], truncated: false } } }
    }

    /// Lines written to (outputs, error records) by one flush of `n` inputs.
    fn flush_with(n: usize, engine: &ScoreFn<'_>) -> (Vec<String>, Vec<String>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let progress = indicatif::ProgressBar::hidden();
        let mut sink = Sink { output: &mut out, errors: &mut err, model: "m".into(), progress: &progress, counts: (0, 0) };
        let mut pending: Vec<Ready> = (1..=n).map(ready).collect();
        flush(engine, &mut pending, &mut 0, &mut sink).unwrap();
        let lines = |b: Vec<u8>| String::from_utf8(b).unwrap().lines().map(str::to_owned).collect();
        (lines(out), lines(err))
    }

    fn score(reward: f32) -> Score {
        Score { reward, attributes: Vec::new() }
    }

    #[test]
    fn every_input_is_an_output_or_an_error_record() {
        let (out, err) = flush_with(3, &|_| Ok(vec![score(1.0)]));
        assert_eq!((out.len(), err.len()), (0, 3), "too few scores fail the batch, none is dropped");
        assert!(err[0].contains("returned 1 scores for 3 sequences"), "{}", err[0]);
        let (out, err) = flush_with(2, &|_| Ok(vec![score(1.0), score(2.0), score(3.0)]));
        assert_eq!((out.len(), err.len()), (0, 2));
        let (out, err) = flush_with(2, &|_| Err("boom".into()));
        assert_eq!((out.len(), err.len()), (0, 2));
    }

    #[test]
    fn non_finite_rewards_are_model_errors() {
        let (out, err) = flush_with(3, &|_| Ok(vec![score(1.0), score(f32::NAN), score(f32::NEG_INFINITY)]));
        assert_eq!(out.len(), 1);
        assert!(out[0].contains(r#""reward":1.0"#), "{}", out[0]);
        let kinds: Vec<serde_json::Value> = err.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(kinds.len(), 2);
        assert!(kinds.iter().all(|k| k["error"]["kind"] == "model"), "{err:?}");
        assert_eq!((kinds[0]["line"].as_u64(), kinds[1]["id"].as_str()), (Some(2), Some("e3")));
    }
}
