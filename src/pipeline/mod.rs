//! The streaming pipeline between a source and the sinks, one bounded stage per task:
//!
//! fetch (holds an in-flight permit per record) → prepare (decode, template, tokenize; its own
//! OS thread) → batcher (`crate::batch::actor`) → score (the engine, in batch order) → publish
//! (sinks, in input order) → ack (after the broker's confirmation).
//!
//! Guarantees: every fetched record ends scored or dead-lettered, and is acked only after that
//! output is confirmed (at-least-once); outputs are published in input order; at most
//! `max_inflight_events` records and `max_inflight_bytes` payload bytes are between fetch and
//! ack, so memory stays bounded. A fatal sink error stops fetching, drains what it can and ends
//! the run with that error.
//!
//! Engine faults are not bad input: when the model fails on a batch (an engine error, a stage
//! panic, a stopped engine), its events are neither dead-lettered nor acknowledged; the batch is
//! retried after a short backoff while `/healthz` reports the failure, and after
//! `max_failed_batches` failures in a row the run ends with [`PipelineError::Engine`] through the
//! same orderly close, leaving the unacknowledged inputs to the broker's redelivery. Dead letters
//! (kind `model`) stay for what points at one event: a sequence the engine refuses (its length,
//! a token id outside the vocabulary), a non-finite score.

pub(crate) mod candidates;
mod dead_letter;
mod prompt;
mod publish;
mod stages;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::batch::actor::Weighted;
use crate::batch::policy::BatchLimits;
use crate::engine::EngineError;
use crate::event::{EventError, InputEvent, Score};
use crate::health::Liveness;
use crate::metrics::Metrics;
use crate::record::{AckHandle, Origin};
use crate::sink::route::Router;
use crate::sink::{BatchCommit, Sink, SinkError};
use crate::source::{Source, SourceError};

use candidates::BestOfNEvent;
pub(crate) use prompt::PromptPreparer;
/// The score stage's engine (defined beside it).
pub use crate::engine::Scorer;

/// Errors that stop the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A sink failed for good (a fenced transactional producer).
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The model failed on `failures` batches in a row: the worker stops, its unacknowledged
    /// inputs left for redelivery.
    #[error("the model failed on {failures} batches in a row; stopping")]
    Engine {
        failures: usize,
        #[source]
        source: ScoreError,
    },
    #[error("pipeline task failed: {0}")]
    Task(String),
}

/// Why scoring a batch failed: a fault of the engine, not of the batch's events.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the model returned {scores} scores for {sequences} sequences")]
    Count { scores: usize, sequences: usize },
}

impl ScoreError {
    /// The sequence refused for what it holds ([`EngineError::refused_sequence`]).
    pub(crate) fn refused_sequence(&self) -> Option<usize> {
        match self {
            ScoreError::Engine(e) => e.refused_sequence(),
            ScoreError::Count { .. } => None,
        }
    }
}

/// Turns a parsed event into model input (the prompt stage).
pub trait Preparer: Send + Sync + 'static {
    /// Token ids and whether the conversation was truncated; `too_long`/`template` errors.
    fn prepare(&self, event: &InputEvent) -> Result<(Vec<u32>, bool), EventError>;
}

/// A record between fetch and ack. Its permit (and the in-flight gauge) is released when it is
/// dropped, i.e. after its ack, or when the worker gives up on it at shutdown.
pub(crate) struct InFlight {
    pub origin: Origin,
    pub key: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
    pub payload: Bytes,
    pub ack: AckHandle,
    pub(crate) consumed: Instant,
    _permit: Permit,
}

struct Permit {
    _permit: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.metrics.inflight_events.dec();
    }
}

/// What the prepare stage made of a record.
pub(crate) enum Verdict {
    Ready { event: InputEvent, ids: Vec<u32>, truncated: bool },
    /// A best-of-N event: each candidate's token ids and truncation flag, or why it cannot be
    /// scored.
    Group { event: BestOfNEvent, candidates: Vec<Result<(Vec<u32>, bool), EventError>> },
    Failed(EventError),
}

/// Exactly-once: drop from `items` those whose input the worker no longer owns (`owned[i]`
/// false, from [`BatchCommit::owned`] over the items' origins, in order); how many were dropped.
fn keep_owned<T>(items: &mut Vec<T>, owned: &[bool]) -> usize {
    let mut keep = owned.iter();
    items.retain(|_| keep.next().copied().unwrap_or(true));
    owned.iter().filter(|o| !**o).count()
}

/// A prepared record on its way to the batcher.
pub(crate) struct Work {
    pub input: InFlight,
    pub(crate) verdict: Verdict,
}

impl Weighted for Work {
    fn tokens(&self) -> usize {
        match &self.verdict {
            Verdict::Ready { ids, .. } => ids.len(),
            Verdict::Group { candidates, .. } => candidates.iter().flatten().map(|c| c.0.len()).sum(),
            Verdict::Failed(_) => 0,
        }
    }

    fn sequences(&self) -> usize {
        match &self.verdict {
            Verdict::Group { candidates, .. } => candidates.iter().flatten().count(),
            _ => 1,
        }
    }
}

/// The final result for one record.
pub(crate) enum Outcome {
    Scored { event: InputEvent, score: Score, tokens: usize, truncated: bool },
    /// A best-of-N event: one outcome per candidate, in order.
    Ranked { event: BestOfNEvent, outcomes: Vec<candidates::Outcome> },
    Failed(EventError),
}

/// Everything the pipeline runs with.
pub struct Parts {
    pub source: Box<dyn Source>,
    pub source_kind: &'static str,
    pub preparer: Arc<dyn Preparer>,
    pub scorer: Arc<dyn Scorer>,
    pub sink: Arc<dyn Sink>,
    pub dead_letter: Arc<dyn Sink>,
    /// Named sinks and the `[[route]]` rules that pick them (none: everything to `sink`).
    pub routes: Routes,
    /// Exactly-once hook; `None` for at-least-once.
    pub commit: Option<Arc<dyn BatchCommit>>,
    pub metrics: Arc<Metrics>,
    /// Where the publish stage reports progress (`/healthz`).
    pub liveness: Arc<Liveness>,
}

/// The named sinks, in the order of [`Router::names`], and the rules over them.
#[derive(Clone, Default)]
pub struct Routes {
    pub(crate) router: Arc<Router>,
    pub sinks: Vec<Arc<dyn Sink>>,
    /// Where the outputs of events posted to `/v1/score` go (their requests); they are never
    /// routed.
    pub(crate) reply: Option<Arc<dyn Sink>>,
}

/// Flow-control settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: BatchLimits,
    pub max_wait: Duration,
    pub max_inflight_events: usize,
    pub max_inflight_bytes: usize,
    pub max_payload_bytes: usize,
    /// Failed batches in a row after which the run ends with [`PipelineError::Engine`].
    pub max_failed_batches: usize,
    /// Most candidates of one best-of-N event.
    pub max_candidates: usize,
    /// What a batch the model fails on becomes.
    pub(crate) engine_faults: EngineFaults,
    /// What a dead letter looks like.
    pub(crate) dead_letters: DeadLetterFormat,
}

/// What a batch the model fails on (not a sequence it refuses) becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EngineFaults {
    /// The worker: retried with backoff, never dead-lettered, until `max_failed_batches`
    /// failures in a row end the run (the broker redelivers the unacknowledged inputs).
    Retry,
    /// `scorestream score`: each event of the batch becomes a `model` dead letter and the run
    /// goes on (a file is read once: nothing would redeliver it).
    DeadLetter,
}

/// The shape of a dead letter's JSON line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterFormat {
    /// The worker's: the error, the id, the payload (cut to fit the sink) and its origin
    /// ([`dead_letter_payload`]).
    Full,
    /// `scorestream score`'s error record: `{"id"?, "line", "error"}` ([`error_record`]).
    Record,
}

impl Settings {
    /// The settings of the `[batch]` section.
    pub fn of(batch: &crate::batch::BatchConfig) -> Self {
        Self {
            limits: batch.limits(),
            max_wait: batch.max_wait,
            max_inflight_events: batch.max_inflight_events,
            max_inflight_bytes: batch.max_inflight_bytes,
            max_payload_bytes: batch.max_payload_bytes,
            max_failed_batches: batch.max_failed_batches,
            max_candidates: batch.max_candidates,
            engine_faults: EngineFaults::Retry,
            dead_letters: DeadLetterFormat::Full,
        }
    }
}

/// Run until the source ends or `stop` turns true; then drain: everything fetched is scored,
/// published, confirmed and acked, the sinks flushed and the source closed. A fatal sink error
/// stops fetching too, and so does a model that failed `max_failed_batches` batches in a row;
/// the run then ends with that error after the same orderly close.
pub async fn run(parts: Parts, settings: Settings, stop: watch::Receiver<bool>) -> Result<(), PipelineError> {
    let Parts { source, source_kind, preparer, scorer, sink, dead_letter, routes, commit, metrics, liveness } = parts;
    let limits = Limits::new(&settings);
    let lane = settings.limits.max_events.max(1);
    let (fetch_tx, fetch_rx) = mpsc::channel::<InFlight>(lane);
    let (work_tx, work_rx) = mpsc::channel::<Work>(lane);
    let (batch_tx, batch_rx) = mpsc::channel::<Vec<Work>>(1);
    let (done_tx, done_rx) = mpsc::channel::<Vec<(InFlight, Outcome)>>(1);
    let (abort_tx, abort) = watch::channel(false);

    let fetch = tokio::spawn(stages::fetch(source, source_kind, limits, metrics.clone(), fetch_tx, stop, abort));
    let max_payload = (settings.max_payload_bytes, settings.max_candidates);
    let prepare = std::thread::Builder::new()
        .name("scorestream-prepare".into())
        .spawn(move || stages::prepare(&*preparer, max_payload, fetch_rx, work_tx))
        .map_err(|e| PipelineError::Task(format!("cannot start the prepare thread: {e}")))?;
    let batcher = tokio::spawn(crate::batch::actor::run(work_rx, batch_tx, settings.limits, settings.max_wait));
    let scoring = stages::Scoring {
        scorer: scorer.clone(),
        metrics: metrics.clone(),
        liveness: liveness.clone(),
        max_failed: settings.max_failed_batches.max(1),
        faults: settings.engine_faults,
        abort: abort_tx.clone(),
        commit: commit.clone(),
    };
    let score = tokio::spawn(scoring.run(batch_rx, done_tx));
    let publisher = publish::Publisher {
        sink: sink.clone(),
        dead_letter: dead_letter.clone(),
        routes: routes.sinks.clone(),
        router: routes.router.clone(),
        reply: routes.reply.clone(),
        commit,
        metrics,
        liveness,
        model: scorer.model_name(),
        dead_letters: settings.dead_letters,
        abort: abort_tx,
    };
    let publish = tokio::spawn(publisher.run(done_rx));

    let source = fetch.await.map_err(|e| PipelineError::Task(e.to_string()))?;
    let joined = tokio::task::spawn_blocking(move || prepare.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        return Err(PipelineError::Task("the prepare thread panicked".into()));
    }
    batcher.await.map_err(|e| PipelineError::Task(format!("batcher: {e}")))?;
    let scored = score.await.map_err(|e| PipelineError::Task(format!("score: {e}")))?;
    let published = publish.await.map_err(|e| PipelineError::Task(format!("publish: {e}")))?;
    if let Err(e) = sink.flush().await {
        tracing::warn!(error = %crate::error::Chain(&e), "flushing the sink failed");
    }
    for (name, routed) in routes.router.names().iter().zip(&routes.sinks) {
        if let Err(e) = routed.flush().await {
            tracing::warn!(error = %crate::error::Chain(&e), sink = %name, "flushing a named sink failed");
        }
    }
    if let Err(e) = dead_letter.flush().await {
        tracing::warn!(error = %crate::error::Chain(&e), "flushing the dead-letter sink failed");
    }
    let (source, fetch_result) = source;
    source.close().await?;
    scored?;
    published?;
    fetch_result
}

/// The in-flight bounds: one permit per record and one per payload byte.
#[derive(Clone)]
struct Limits {
    events: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

impl Limits {
    fn new(settings: &Settings) -> Self {
        let max_bytes = settings.max_inflight_bytes.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            events: Arc::new(Semaphore::new(settings.max_inflight_events)),
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
        }
    }
}

#[cfg(test)]
mod tests;
