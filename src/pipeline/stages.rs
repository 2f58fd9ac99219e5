//! The fetch, prepare and score stages; the score stage retries engine faults (see the
//! pipeline's module doc).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, watch};

use super::{keep_owned, EngineFaults, InFlight, Limits, Outcome, Permit, PipelineError, Preparer, ScoreError, Scorer, Verdict, Work};
use crate::error::Chain;
use super::candidates::{BestOfNEvent, Event};
use crate::event::{ErrorKind, EventError, InputEvent, Score};
use crate::health::Liveness;
use crate::metrics::Metrics;
use crate::record::Origin;
use crate::sink::BatchCommit;
use crate::source::Source;

/// First wait before a failed batch is retried; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Fetch records while holding a permit each (and one per payload byte); stop at end of
/// input, on a fatal source error, or when `stop` or `abort` turns true. Hands the source back
/// for closing.
pub(super) async fn fetch(
    mut source: Box<dyn Source>,
    kind: &'static str,
    limits: Limits,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<InFlight>,
    mut stop: watch::Receiver<bool>,
    mut abort: watch::Receiver<bool>,
) -> (Box<dyn Source>, Result<(), PipelineError>) {
    let consumed = metrics.events_consumed.with_label_values(&[kind]);
    let posted = metrics.events_consumed.with_label_values(&["http"]);
    loop {
        // Biased toward stopping: once a signal arrived, nothing more is fetched.
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = abort.wait_for(|s| *s) => break,
            p = limits.events.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = abort.wait_for(|s| *s) => break,
            r = source.next() => r,
        };
        let record = match next {
            None => break,
            Some(Ok(r)) => r,
            Some(Err(e)) => return (source, Err(e.into())),
        };
        // A record larger than the whole byte bound takes all of it, and goes through alone.
        let size = u32::try_from(record.payload.len().clamp(1, limits.max_bytes)).unwrap_or(u32::MAX);
        // Dropping the record unacked on a stop leaves it to the broker's redelivery.
        let bytes = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = abort.wait_for(|s| *s) => break,
            p = limits.bytes.clone().acquire_many_owned(size) => match p { Ok(p) => p, Err(_) => break },
        };
        match record.origin {
            crate::record::Origin::Http { .. } => posted.inc(),
            _ => consumed.inc(),
        }
        metrics.inflight_events.inc();
        let item = InFlight {
            origin: record.origin,
            key: record.key,
            headers: record.headers,
            payload: record.payload,
            ack: record.ack,
            consumed: Instant::now(),
            _permit: Permit { _permit: permit, _bytes: bytes, metrics: metrics.clone() },
        };
        if tx.send(item).await.is_err() {
            break;
        }
    }
    source.drain();
    (source, Ok(()))
}

/// Decode, template and tokenize, in order, on this (dedicated) thread.
/// `limits`: the largest payload in bytes, the most candidates of a best-of-N event.
pub(super) fn prepare(
    preparer: &dyn Preparer,
    (max_payload, max_candidates): (usize, usize),
    mut rx: mpsc::Receiver<InFlight>,
    tx: mpsc::Sender<Work>,
) {
    while let Some(input) = rx.blocking_recv() {
        let verdict = match Event::parse(&input.payload, max_payload, max_candidates) {
            Err(e) => Verdict::Failed(e),
            Ok(Event::Single(event)) => match preparer.prepare(&event) {
                Ok((ids, truncated)) => Verdict::Ready { event, ids, truncated },
                Err(e) => Verdict::Failed(e.with_id(Some(event.id))),
            },
            Ok(Event::BestOfN(event)) => {
                let candidates = event.conversations().into_iter().map(|c| c.and_then(|c| preparer.prepare(&c))).collect();
                Verdict::Group { event, candidates }
            }
        };
        if tx.blocking_send(Work { input, verdict }).is_err() {
            return;
        }
    }
}

/// A prepared event with its token count and truncation flag, or why it failed.
enum Checked {
    One(InputEvent, usize, bool),
    /// A best-of-N event with each candidate's token count and truncation flag, or its error.
    Group(BestOfNEvent, Vec<Result<(usize, bool), EventError>>),
    Failed(EventError),
}

impl Checked {
    /// Sequences this item sent to the model.
    fn sequences(&self) -> usize {
        match self {
            Checked::One(..) => 1,
            Checked::Group(_, c) => c.iter().flatten().count(),
            Checked::Failed(_) => 0,
        }
    }
}

/// A batch split into its model input and the bookkeeping to reassemble it.
struct Split {
    items: Vec<(InFlight, Checked)>,
    ids: Vec<Vec<u32>>,
}

fn split(batch: Vec<Work>) -> Split {
    let mut ids = Vec::new();
    let items = batch
        .into_iter()
        .map(|w| match w.verdict {
            Verdict::Ready { event, ids: seq, truncated } => {
                let n = seq.len();
                ids.push(seq);
                (w.input, Checked::One(event, n, truncated))
            }
            Verdict::Group { event, candidates } => {
                let checked = candidates
                    .into_iter()
                    .map(|c| {
                        c.map(|(seq, truncated)| {
                            let n = seq.len();
                            ids.push(seq);
                            (n, truncated)
                        })
                    })
                    .collect();
                (w.input, Checked::Group(event, checked))
            }
            Verdict::Failed(e) => (w.input, Checked::Failed(e)),
        })
        .collect();
    Split { items, ids }
}

/// The score stage: the engine, its retry policy and where it reports.
pub(super) struct Scoring {
    pub scorer: Arc<dyn Scorer>,
    pub metrics: Arc<Metrics>,
    pub liveness: Arc<Liveness>,
    /// Failed batches in a row that end the run.
    pub(crate) max_failed: usize,
    /// Whether a failed batch is retried or dead-lettered.
    pub faults: EngineFaults,
    /// Set when scoring gives up, so that fetching stops.
    pub abort: watch::Sender<bool>,
    /// Exactly-once: which inputs the worker still owns. An input of a partition revoked since
    /// it was read is its new owner's, which reads it again: it is not scored here.
    pub commit: Option<Arc<dyn BatchCommit>>,
}

impl Scoring {
    /// Score batches, up to the engine's depth at once, and pass results on in batch order.
    /// Ends with [`PipelineError::Engine`] once `max_failed` batches failed in a row; the
    /// batches it holds then are dropped unacknowledged.
    pub(super) async fn run(
        self,
        mut rx: mpsc::Receiver<Vec<Work>>,
        tx: mpsc::Sender<Vec<(InFlight, Outcome)>>,
    ) -> Result<(), PipelineError> {
        let this = Arc::new(Attempts { scoring: self, failures: AtomicUsize::new(0) });
        let depth = this.scoring.scorer.depth();
        let mut running = FuturesOrdered::new();
        let mut open = true;
        while open || !running.is_empty() {
            tokio::select! {
                biased;
                Some(done) = running.next(), if !running.is_empty() => match done {
                    Ok(done) => if tx.send(done).await.is_err() { return Ok(()); },
                    Err(e) => {
                        tracing::error!(error = %Chain(&e), "the model keeps failing: stopping; unacknowledged inputs will be redelivered");
                        let _ = this.scoring.abort.send(true);
                        return Err(e);
                    }
                },
                batch = rx.recv(), if open && running.len() < depth => match batch {
                    None => open = false,
                    Some(batch) => {
                        let batch = this.scoring.owned(batch);
                        if !batch.is_empty() {
                            running.push_back(this.clone().score_one(split(batch)));
                        }
                    }
                },
            }
        }
        Ok(())
    }

    /// The batch without the inputs the worker no longer owns ([`BatchCommit::owned`]): under
    /// exactly-once their transaction would leave them out anyway, so scoring them would be
    /// wasted work (up to the whole in-flight window at each rebalance).
    fn owned(&self, mut batch: Vec<Work>) -> Vec<Work> {
        let Some(commit) = &self.commit else { return batch };
        let origins: Vec<Origin> = batch.iter().map(|w| w.input.origin.clone()).collect();
        let left_out = keep_owned(&mut batch, &commit.owned(&origins));
        if left_out > 0 {
            tracing::info!(left_out, "inputs of revoked partitions not scored: their new owner reads them again");
        }
        batch
    }
}

/// [`Scoring`] with its count of batches failed in a row (across concurrent batches).
struct Attempts {
    scoring: Scoring,
    failures: AtomicUsize,
}

impl Attempts {
    /// Score one batch, retrying engine faults with backoff; `Err` once `max_failed` batches
    /// failed in a row.
    async fn score_one(self: Arc<Self>, split: Split) -> Result<Vec<(InFlight, Outcome)>, PipelineError> {
        let Split { mut items, mut ids } = split;
        let mut delay = FIRST_BACKOFF;
        let scores = loop {
            if ids.is_empty() {
                break Vec::new();
            }
            match self.attempt(ids.clone()).await {
                Ok(scores) => {
                    self.failures.store(0, Ordering::Relaxed);
                    self.scoring.liveness.engine_ok();
                    break scores;
                }
                Err(e) => {
                    // One sequence the engine refuses is that event's fault: dead-letter it alone.
                    if let Some(index) = e.refused_sequence().filter(|i| *i < ids.len()) {
                        ids.remove(index);
                        refuse(&mut items, index, &e.to_string());
                        continue;
                    }
                    let reason = Chain(&e).to_string();
                    if self.scoring.faults == EngineFaults::DeadLetter {
                        tracing::error!(error = %reason, events = items.len(), "the model failed on a batch; its events are dead-lettered");
                        return Ok(fail_all(items, &reason));
                    }
                    let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                    self.scoring.liveness.engine_failed(reason.clone());
                    if failures >= self.scoring.max_failed {
                        return Err(PipelineError::Engine { failures, source: e });
                    }
                    tracing::warn!(error = %reason, failures, events = ids.len(), "the model failed on a batch; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        };
        Ok(assemble(items, scores))
    }

    /// One forward pass over `ids`; the scores checked for count. Only the pass that scores the
    /// batch is counted in the batch metrics (events, tokens, time): a batch retried after an
    /// engine fault, or again without a sequence the engine refused, is counted once.
    async fn attempt(&self, ids: Vec<Vec<u32>>) -> Result<Vec<Score>, ScoreError> {
        let (sequences, tokens) = (ids.len(), ids.iter().map(Vec::len).sum::<usize>());
        let started = Instant::now();
        let scores = self.scoring.scorer.score(ids).await?;
        if scores.len() != sequences {
            return Err(ScoreError::Count { scores: scores.len(), sequences });
        }
        let m = &self.scoring.metrics;
        m.forward_seconds.observe(started.elapsed().as_secs_f64());
        m.batch_events.observe(sequences as f64);
        m.batch_tokens.observe(tokens as f64);
        Ok(scores)
    }
}

/// Mark the `index`-th sequence of the batch (counting only sequences sent to the model)
/// failed: its event, or its candidate.
fn refuse(items: &mut [(InFlight, Checked)], mut index: usize, message: &str) {
    let e = EventError::new(ErrorKind::Model, format!("the model refused this event: {message}"));
    for (_, item) in items.iter_mut() {
        if index >= item.sequences() {
            index -= item.sequences();
            continue;
        }
        match item {
            Checked::One(event, ..) => *item = Checked::Failed(e.with_id(Some(event.id.clone()))),
            Checked::Group(_, candidates) => {
                if let Some(c) = candidates.iter_mut().filter(|c| c.is_ok()).nth(index) {
                    *c = Err(e);
                }
            }
            Checked::Failed(_) => {}
        }
        return;
    }
}

/// Every event of a batch the model failed on, as a `model` dead letter (events that failed
/// before keep their error).
fn fail_all(items: Vec<(InFlight, Checked)>, reason: &str) -> Vec<(InFlight, Outcome)> {
    let failed = |id: &str| EventError::new(ErrorKind::Model, reason).with_id(Some(id.to_owned()));
    items
        .into_iter()
        .map(|(input, item)| {
            let e = match item {
                Checked::Failed(e) => e,
                Checked::One(event, ..) => failed(&event.id),
                Checked::Group(event, _) => failed(&event.id),
            };
            (input, Outcome::Failed(e))
        })
        .collect()
}

/// Pair each event with its score (each candidate with its own), in order; events that failed
/// before keep their error.
fn assemble(items: Vec<(InFlight, Checked)>, scores: Vec<Score>) -> Vec<(InFlight, Outcome)> {
    let mut scores = scores.into_iter();
    items
        .into_iter()
        .map(|(input, item)| {
            let outcome = match item {
                Checked::Failed(e) => Outcome::Failed(e),
                Checked::One(event, tokens, truncated) => match scores.next() {
                    // JSON has no NaN or infinity; a non-finite score of one event is a fault
                    // of that event's numbers, and scoring it again would give the same.
                    Some(score) => match score.check_finite() {
                        Ok(()) => Outcome::Scored { event, score, tokens, truncated },
                        Err(e) => Outcome::Failed(EventError::from(e).with_id(Some(event.id))),
                    },
                    // Unreachable: the count was checked.
                    None => Outcome::Failed(EventError::new(ErrorKind::Model, "missing score").with_id(Some(event.id))),
                },
                Checked::Group(event, candidates) => {
                    let missing = || EventError::new(ErrorKind::Model, "missing score");
                    let outcomes = candidates
                        .into_iter()
                        .map(|c| c.and_then(|(n, truncated)| scores.next().map(|s| (s, n, truncated)).ok_or_else(missing)))
                        .collect();
                    Outcome::Ranked { event, outcomes }
                }
            };
            (input, outcome)
        })
        .collect()
}
