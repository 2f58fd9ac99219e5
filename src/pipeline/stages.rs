//! The fetch, prepare and score stages.

use std::sync::Arc;
use std::time::Instant;

use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, watch};

use super::{InFlight, Limits, Outcome, Permit, PipelineError, Preparer, Scorer, Verdict, Work};
use crate::event::{ErrorKind, EventError, InputEvent};
use crate::metrics::Metrics;
use crate::source::Source;

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
        consumed.inc();
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
pub(super) fn prepare(
    preparer: &dyn Preparer,
    max_payload: usize,
    mut rx: mpsc::Receiver<InFlight>,
    tx: mpsc::Sender<Work>,
) {
    while let Some(input) = rx.blocking_recv() {
        let verdict = match InputEvent::parse(&input.payload, max_payload) {
            Err(e) => Verdict::Failed(e),
            Ok(event) => match preparer.prepare(&event) {
                Ok((ids, truncated)) => Verdict::Ready { event, ids, truncated },
                Err(e) => Verdict::Failed(e.with_id(Some(event.id))),
            },
        };
        if tx.blocking_send(Work { input, verdict }).is_err() {
            return;
        }
    }
}

/// A prepared event with its token count and truncation flag, or why it failed.
type Checked = Result<(InputEvent, usize, bool), EventError>;

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
                (w.input, Ok((event, n, truncated)))
            }
            Verdict::Failed(e) => (w.input, Err(e)),
        })
        .collect();
    Split { items, ids }
}

/// Score batches, up to the engine's depth at once, and pass results on in batch order.
pub(super) async fn score(
    scorer: Arc<dyn Scorer>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Vec<Work>>,
    tx: mpsc::Sender<Vec<(InFlight, Outcome)>>,
) {
    let depth = scorer.depth();
    let mut running = FuturesOrdered::new();
    let mut open = true;
    while open || !running.is_empty() {
        tokio::select! {
            biased;
            Some(done) = running.next(), if !running.is_empty() => {
                if tx.send(done).await.is_err() { return; }
            }
            batch = rx.recv(), if open && running.len() < depth => match batch {
                None => open = false,
                Some(batch) => running.push_back(score_one(scorer.clone(), metrics.clone(), split(batch))),
            },
        }
    }
}

async fn score_one(scorer: Arc<dyn Scorer>, metrics: Arc<Metrics>, split: Split) -> Vec<(InFlight, Outcome)> {
    let Split { items, ids } = split;
    let mut scores = if ids.is_empty() {
        Ok(Vec::new().into_iter())
    } else {
        metrics.batch_events.observe(ids.len() as f64);
        metrics.batch_tokens.observe(ids.iter().map(Vec::len).sum::<usize>() as f64);
        let expected = ids.len();
        let started = Instant::now();
        let result = scorer.score(ids).await;
        metrics.forward_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(s) if s.len() == expected => Ok(s.into_iter()),
            Ok(s) => Err(format!("the model returned {} scores for {expected} sequences", s.len())),
            Err(e) => Err(e),
        }
    };
    items
        .into_iter()
        .map(|(input, item)| {
            let outcome = match (item, &mut scores) {
                (Err(e), _) => Outcome::Failed(e),
                (Ok((event, tokens, truncated)), Ok(scores)) => match scores.next() {
                    // JSON has no NaN or infinity: such a score is the model's failure.
                    Some(score) => match score.check_finite() {
                        Ok(()) => Outcome::Scored { event, score, tokens, truncated },
                        Err(e) => Outcome::Failed(EventError::new(ErrorKind::Model, e).with_id(Some(event.id))),
                    },
                    None => Outcome::Failed(model_error(event.id, "missing score")),
                },
                (Ok((event, ..)), Err(msg)) => Outcome::Failed(model_error(event.id, msg)),
            };
            (input, outcome)
        })
        .collect()
}

fn model_error(id: String, message: &str) -> EventError {
    EventError::new(ErrorKind::Model, format!("the model failed on this batch: {message}")).with_id(Some(id))
}
