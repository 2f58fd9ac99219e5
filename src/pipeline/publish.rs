//! The publish and ack stages: turn outcomes into messages, publish them in input order, and
//! ack each input once its message is confirmed.
//!
//! Retries know permanent refusals from transient errors. A transient error (broker away, no
//! acknowledgement in time) is retried with backoff, logged with the broker's reason, counted in
//! `scorestream_publish_retries_total` and reported to `/healthz`, which fails when nothing
//! finishes for the stall timeout. A permanent refusal ([`SinkError::Rejected`]: too large,
//! invalid) is never retried as is: a refused scored output goes to the dead letters (kind
//! `publish`, with the reason), and a refused dead letter is sent again without its payload
//! (length and SHA-256 kept). Dead letters are cut to the dead-letter sink's message limit before
//! the first try. Only when even that smallest dead letter is refused is the input left
//! unacknowledged (redelivered later), with an error logged; the worker goes on.
//!
//! A retried message can land after later outputs of its partition: order holds for the
//! failure-free path. A fatal sink error ([`SinkError::Fatal`]: a fenced transactional
//! producer, a file that can no longer be written) is never retried: it ends the publish stage
//! with that error; the pipeline then stops and the worker exits non-zero.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::sync::{mpsc, watch};

use super::dead_letter::{dead_letter_payload, error_record, scored_payload};
use super::{DeadLetterFormat, InFlight, Outcome};
use crate::error::Chain;
use crate::event::{ErrorKind, EventError};
use crate::health::Liveness;
use crate::metrics::{delivery_label, Metrics};
use crate::sink::route::{Route, Router};
use crate::sink::{BatchCommit, Confirmation, Outgoing, OutputKind, Sink, SinkError};
use crate::record::Origin;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Room left in a message for what the sink adds beside the payload and the carried-over
/// headers (the de-duplication id header, protocol framing).
const HEADER_ALLOWANCE: usize = 512;

/// What to count once an input is done.
enum Tally {
    /// `route`: the `scorestream_routed_total` label.
    Scored { tokens: usize, rewards: Vec<(String, f32)>, route: String },
    Failed(&'static str),
}

/// An input waiting for its output's confirmation.
struct Done {
    input: InFlight,
    id: Option<String>,
    tally: Tally,
}

pub(super) struct Publisher {
    pub sink: Arc<dyn Sink>,
    pub dead_letter: Arc<dyn Sink>,
    /// Named sinks, by the index the router gives.
    pub routes: Vec<Arc<dyn Sink>>,
    pub(crate) router: Arc<Router>,
    /// The outputs of posted events (`Origin::Http`), scored or not, go back to their requests.
    pub(crate) reply: Option<Arc<dyn Sink>>,
    pub commit: Option<Arc<dyn BatchCommit>>,
    pub metrics: Arc<Metrics>,
    pub liveness: Arc<Liveness>,
    pub model: String,
    pub(crate) dead_letters: DeadLetterFormat,
    /// Set when the publish stage ends on a fatal error, so that fetching stops.
    pub abort: watch::Sender<bool>,
}

impl Publisher {
    /// Publish batches in order until the channel closes, then wait for every confirmation.
    /// Returns the fatal sink error that ended it early, if any.
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Vec<(InFlight, Outcome)>>) -> Result<(), SinkError> {
        let this = Arc::new(self);
        let mut pending: FuturesUnordered<BoxFuture<'static, Result<(), SinkError>>> = FuturesUnordered::new();
        let fatal = loop {
            // Biased toward completions, so acks (and permits) are released before more work.
            tokio::select! {
                biased;
                Some(done) = pending.next(), if !pending.is_empty() => if let Err(e) = done { break e },
                batch = rx.recv() => match batch {
                    None => break loop {
                        match pending.next().await {
                            None => return Ok(()),
                            Some(Err(e)) => break e,
                            Some(Ok(())) => {}
                        }
                    },
                    Some(batch) if this.commit.is_some() => {
                        if let Err(e) = this.transact(batch).await {
                            break e;
                        }
                    }
                    Some(batch) => {
                        if let Err(e) = this.publish_batch(batch, &mut pending).await {
                            break e;
                        }
                    }
                },
            }
        };
        tracing::error!(error = %Chain(&fatal), "fatal sink error: stopping");
        let _ = this.abort.send(true);
        rx.close();
        while pending.next().await.is_some() {}
        Err(fatal)
    }

    /// Enqueue each output of `batch` in order, its confirmation pushed onto `pending`; `Err`
    /// for a fatal sink error.
    async fn publish_batch(
        self: &Arc<Self>,
        batch: Vec<(InFlight, Outcome)>,
        pending: &mut FuturesUnordered<BoxFuture<'static, Result<(), SinkError>>>,
    ) -> Result<(), SinkError> {
        for (input, outcome) in batch {
            let (msg, done) = self.build(input, outcome);
            let next = match msg {
                // Dropped by a route: nothing to confirm.
                None => self.clone().finish_owned(done).boxed(),
                Some(msg) => match self.publish(&msg).await {
                    Ok(confirm) => self.clone().complete(msg, confirm, done).boxed(),
                    Err(e) if e.is_fatal() => return Err(e),
                    Err(refused) => self.clone().refused(msg, refused, done).boxed(),
                },
            };
            pending.push(next);
        }
        Ok(())
    }

    fn sink_for(&self, msg: &Outgoing) -> &Arc<dyn Sink> {
        if let (Origin::Http { .. }, Some(reply)) = (&msg.origin, &self.reply) {
            return reply;
        }
        match msg.kind {
            OutputKind::Scored => msg.sink.and_then(|i| self.routes.get(i)).unwrap_or(&self.sink),
            OutputKind::DeadLetter => &self.dead_letter,
        }
    }

    /// The message of an outcome, routed (`None`: dropped by a route), and what to do once it
    /// is confirmed. A route expression that fails on the event makes its dead letter instead.
    fn build(&self, input: InFlight, outcome: Outcome) -> (Option<Outgoing>, Done) {
        match outcome {
            Outcome::Scored { event, score, tokens, truncated } => {
                let mut rewards = vec![("reward".to_owned(), score.reward)];
                rewards.extend(score.attributes.iter().cloned());
                let id = Some(event.id.clone());
                let payload = scored_payload(event, score, tokens, truncated, &self.model);
                self.routed(input, id, payload, tokens, rewards)
            }
            Outcome::Ranked { event, outcomes } => {
                self.metrics.candidates.observe(outcomes.len() as f64);
                let (mut tokens, mut rewards) = (0, Vec::new());
                for (score, n, _) in outcomes.iter().flatten() {
                    tokens += n;
                    rewards.push(("reward".to_owned(), score.reward));
                    rewards.extend(score.attributes.iter().cloned());
                }
                let id = Some(event.id.clone());
                let ranked = super::candidates::RankedEvent::new(event, outcomes, &self.model);
                // Serializing a struct of strings, numbers and JSON values cannot fail.
                let payload = Bytes::from(serde_json::to_vec(&ranked).unwrap_or_default());
                self.routed(input, id, payload, tokens, rewards)
            }
            Outcome::Failed(e) => {
                tracing::debug!(origin = %input.origin, kind = %e.kind, message = %e.message, "dead letter");
                let msg = self.dead_letter_for(&input, &e, self.dead_letter_limit(&input));
                (Some(msg), Done { id: e.id.clone(), input, tally: Tally::Failed(e.kind.as_str()) })
            }
        }
    }

    /// The scored (or ranked) output `payload` of `input`, sent where the routes say (`None`:
    /// dropped); a route expression that fails on it makes the event's dead letter instead.
    fn routed(
        &self,
        input: InFlight,
        id: Option<String>,
        payload: Bytes,
        tokens: usize,
        rewards: Vec<(String, f32)>,
    ) -> (Option<Outgoing>, Done) {
        let route = match self.router.route_from(&input.origin, &payload) {
            Ok(route) => route,
            Err(message) => {
                let e = EventError::new(ErrorKind::Route, message).with_id(id);
                return self.build(input, Outcome::Failed(e));
            }
        };
        let mut msg = self.outgoing(&input, OutputKind::Scored, id.as_deref(), payload);
        msg.sink = match route {
            Route::Sink(i) => Some(i),
            Route::Default | Route::Drop => None,
        };
        let tally = Tally::Scored { tokens, rewards, route: self.router.label(route).to_owned() };
        (Some(msg).filter(|_| route != Route::Drop), Done { input, id, tally })
    }

    fn outgoing(&self, input: &InFlight, kind: OutputKind, id: Option<&str>, payload: Bytes) -> Outgoing {
        Outgoing {
            key: input.key.clone().or_else(|| id.map(|i| Bytes::copy_from_slice(i.as_bytes()))),
            headers: input.headers.clone(),
            payload,
            dedup_id: input.origin.dedup_id().map(|d| format!("{d}:{kind}")),
            first_publish: input.origin.redelivered() == Some(false),
            kind,
            sink: None,
            origin: input.origin.clone(),
        }
    }

    /// The dead letter of `input` for error `e`, cut to `limit` bytes of payload.
    fn dead_letter_for(&self, input: &InFlight, e: &EventError, limit: Option<usize>) -> Outgoing {
        let payload = match self.dead_letters {
            DeadLetterFormat::Full => dead_letter_payload(e, &input.payload, &input.origin, limit),
            DeadLetterFormat::Record => error_record(e, &input.origin),
        };
        self.outgoing(input, OutputKind::DeadLetter, e.id.as_deref(), payload)
    }

    /// The dead-letter sink's limit left for the JSON line of `input`'s dead letter.
    fn dead_letter_limit(&self, input: &InFlight) -> Option<usize> {
        let headers: usize = input.headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()) + 4).sum();
        self.dead_letter.max_message_bytes().map(|max| max.saturating_sub(headers + HEADER_ALLOWANCE))
    }

    /// Wait before retrying `msg` after transient error `e`, and say so.
    async fn backoff(&self, (origin, kind): (&Origin, OutputKind), e: &SinkError, delay: &mut Duration, what: &str) {
        let reason = Chain(e).to_string();
        tracing::warn!(error = %reason, %origin, output = %kind, "{what}; retrying in {delay:?}");
        self.metrics.publish_retries.with_label_values(&[kind.as_str()]).inc();
        self.liveness.retrying(reason);
        tokio::time::sleep(*delay).await;
        *delay = (*delay * 2).min(MAX_BACKOFF);
    }

    /// Enqueue `msg`, retrying transient errors with backoff until the sink takes it; `Err`
    /// only for a permanent refusal or a fatal error.
    async fn publish(&self, msg: &Outgoing) -> Result<Confirmation, SinkError> {
        let mut delay = FIRST_BACKOFF;
        loop {
            match self.sink_for(msg).publish(msg.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if e.is_permanent() || e.is_fatal() => return Err(e),
                Err(e) => self.backoff((&msg.origin, msg.kind), &e, &mut delay, "publish failed").await,
            }
        }
    }

    /// Wait for `msg`'s confirmation, republishing on transient failures; `Err` only for a
    /// permanent refusal or a fatal error.
    async fn confirm(&self, msg: &mut Outgoing, mut confirm: Confirmation) -> Result<(), SinkError> {
        let mut delay = FIRST_BACKOFF;
        loop {
            match confirm.await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_permanent() || e.is_fatal() => return Err(e),
                Err(e) => {
                    self.backoff((&msg.origin, msg.kind), &e, &mut delay, "publish not confirmed").await;
                    msg.first_publish = false;
                    confirm = self.publish(msg).await?;
                }
            }
        }
    }

    /// Publish `msg` until it is confirmed; `Err` only for a permanent refusal or a fatal error.
    async fn deliver(&self, mut msg: Outgoing) -> Result<(), SinkError> {
        let confirm = self.publish(&msg).await?;
        self.confirm(&mut msg, confirm).await
    }

    /// Wait for the confirmation, then ack and count; a refused message goes on to
    /// [`Publisher::refused`]. `Err` for a fatal sink error.
    async fn complete(self: Arc<Self>, mut msg: Outgoing, confirm: Confirmation, done: Done) -> Result<(), SinkError> {
        match self.confirm(&mut msg, confirm).await {
            Ok(()) => {
                self.finish(done).await;
                Ok(())
            }
            Err(e) if e.is_fatal() => Err(e),
            Err(e) => self.refused(msg, e, done).await,
        }
    }

    /// `msg` was refused for good: send its input's dead letter instead (see the module doc).
    /// `Err` for a fatal sink error.
    async fn refused(self: Arc<Self>, msg: Outgoing, error: SinkError, mut done: Done) -> Result<(), SinkError> {
        let reason = Chain(&error).to_string();
        self.metrics.publish_rejected.with_label_values(&[msg.kind.as_str()]).inc();
        tracing::warn!(error = %reason, origin = %msg.origin, output = %msg.kind, "the broker refused the message for good");
        let e = refusal_error(msg.kind, &reason, done.id.clone());
        // A refused scored output gets a dead letter cut to the sink's limit; a refused dead
        // letter one without payload.
        let limits = match msg.kind {
            OutputKind::Scored => vec![self.dead_letter_limit(&done.input), Some(0)],
            OutputKind::DeadLetter => vec![Some(0)],
        };
        for limit in limits {
            let dead = self.dead_letter_for(&done.input, &e, limit);
            match self.deliver(dead).await {
                Ok(()) => {
                    if matches!(done.tally, Tally::Scored { .. }) {
                        done.tally = Tally::Failed(ErrorKind::Publish.as_str());
                    }
                    self.finish(done).await;
                    return Ok(());
                }
                Err(again) if again.is_fatal() => return Err(again),
                Err(again) => {
                    self.metrics.publish_rejected.with_label_values(&[OutputKind::DeadLetter.as_str()]).inc();
                    tracing::warn!(error = %Chain(&again), origin = %msg.origin, "the dead letter was refused too");
                }
            }
        }
        tracing::error!(
            origin = %msg.origin,
            "no output of this input could be published: it stays unacknowledged and will be redelivered"
        );
        Ok(())
    }

    async fn finish_owned(self: Arc<Self>, done: Done) -> Result<(), SinkError> {
        self.finish(done).await;
        Ok(())
    }

    async fn finish(&self, done: Done) {
        let Done { input, tally, .. } = done;
        let InFlight { origin, ack, consumed, _permit, .. } = input;
        let delivery = delivery_label(origin.redelivered());
        if let Err(e) = ack.ack().await {
            tracing::warn!(error = %Chain(&e), %origin, "ack failed; the input may be redelivered");
        }
        self.liveness.progress();
        let m = &self.metrics;
        m.event_latency_seconds.observe(consumed.elapsed().as_secs_f64());
        match tally {
            Tally::Scored { tokens, rewards, route } => {
                m.events_scored.with_label_values(&[delivery]).inc();
                if !matches!(origin, Origin::Http { .. }) {
                    m.routed.with_label_values(&[route.as_str()]).inc();
                }
                m.tokens_scored.inc_by(tokens as u64);
                for (attribute, value) in rewards {
                    m.reward.with_label_values(&[attribute.as_str()]).observe(f64::from(value));
                }
            }
            Tally::Failed(reason) => m.events_failed.with_label_values(&[reason]).inc(),
        }
    }

    /// Exactly-once: the batch's outputs and its inputs' positions in one transaction, retried
    /// whole until it commits. A message refused for good inside the transaction is replaced by
    /// its input's dead letter (then by one without payload) and the transaction retried; `Err`
    /// for a fatal error the sink cannot recover from, or when even that is refused (the worker
    /// stops rather than skip an input whose position would be committed). Before each try the
    /// inputs the worker no longer owns ([`BatchCommit::owned`]) are left out: their new owner
    /// reads them again from the last committed position. The commit counts its own outcomes.
    async fn transact(&self, batch: Vec<(InFlight, Outcome)>) -> Result<(), SinkError> {
        let Some(commit) = &self.commit else { return Ok(()) };
        let mut units: Vec<Unit> = batch
            .into_iter()
            .map(|(input, outcome)| {
                // `msg` None: dropped by a route, only its position goes into the transaction.
                let (msg, done) = self.build(input, outcome);
                // 0 as built, 1 its dead letter cut to fit, 2 its dead letter without payload.
                let shrink = msg.as_ref().map_or(0, |m| u8::from(m.kind == OutputKind::DeadLetter));
                Unit { msg, done, shrink }
            })
            .collect();
        let mut delay = FIRST_BACKOFF;
        loop {
            let origins: Vec<Origin> = units.iter().map(|u| u.done.input.origin.clone()).collect();
            let left_out = super::keep_owned(&mut units, &commit.owned(&origins));
            if left_out > 0 {
                tracing::info!(left_out, "inputs no longer this worker's left out of the transaction: their new owner reads them again");
                continue;
            }
            if units.is_empty() {
                return Ok(());
            }
            let msgs: Vec<(usize, &Outgoing)> = units.iter().enumerate().filter_map(|(i, u)| Some((i, u.msg.as_ref()?))).collect();
            let Err((index, e)) = self.try_transaction(commit.as_ref(), &msgs, &origins).await else { break };
            if matches!(e, SinkError::Fatal { .. }) {
                if commit.recover().await {
                    continue;
                }
                return Err(e);
            }
            match commit.abort().await {
                Ok(()) => {}
                Err(fatal @ SinkError::Fatal { .. }) => {
                    if commit.recover().await {
                        continue;
                    }
                    return Err(fatal);
                }
                Err(e) => tracing::warn!(error = %Chain(&e), "abort failed"),
            }
            if commit.owned(&origins).contains(&false) {
                // A revocation: replay at once without its inputs.
                continue;
            }
            match index.filter(|_| e.is_permanent()) {
                Some(i) => {
                    let unit = &mut units[i];
                    unit.shrink += 1;
                    if let Some(msg) = &mut unit.msg {
                        self.replace_refused(msg, &mut unit.done, e, unit.shrink)?;
                    }
                }
                None => {
                    let what = "transaction failed; aborted, replaying the batch";
                    self.backoff((&origins[0], OutputKind::Scored), &e, &mut delay, what).await;
                }
            }
        }
        for unit in units {
            self.finish(unit.done).await;
        }
        Ok(())
    }

    /// Inside a transaction: swap a refused message for its input's dead letter, cut to fit
    /// (`shrink` 1) or without payload (`shrink` 2); past that, a fatal error.
    fn replace_refused(&self, msg: &mut Outgoing, done: &mut Done, error: SinkError, shrink: u8) -> Result<(), SinkError> {
        let reason = Chain(&error).to_string();
        self.metrics.publish_rejected.with_label_values(&[msg.kind.as_str()]).inc();
        tracing::warn!(error = %reason, origin = %msg.origin, output = %msg.kind, "the broker refused the message for good");
        let limit = match shrink {
            1 => self.dead_letter_limit(&done.input),
            2 => Some(0),
            _ => {
                return Err(SinkError::Fatal {
                    kind: "pipeline",
                    message: format!("even the smallest dead letter of {} was refused: {reason}", msg.origin),
                    source: Some(Box::new(error)),
                })
            }
        };
        let e = refusal_error(msg.kind, &reason, done.id.clone());
        *msg = self.dead_letter_for(&done.input, &e, limit);
        done.tally = Tally::Failed(ErrorKind::Publish.as_str());
        Ok(())
    }

    /// One transaction over `msgs` (each with the index of its unit) and the positions of
    /// `origins`; on failure, the index of the unit whose output failed (if one did) and the error.
    async fn try_transaction(
        &self,
        commit: &dyn BatchCommit,
        msgs: &[(usize, &Outgoing)],
        origins: &[Origin],
    ) -> Result<(), (Option<usize>, SinkError)> {
        commit.begin().await.map_err(|e| (None, e))?;
        let mut confirmations = Vec::with_capacity(msgs.len());
        for &(i, m) in msgs {
            let c = self.sink_for(m).publish(m.clone()).await.map_err(|e| (Some(i), e))?;
            confirmations.push(c.map(move |r| r.map_err(|e| (Some(i), e))));
        }
        futures::future::try_join_all(confirmations).await?;
        commit.commit(origins).await.map_err(|e| (None, e))
    }
}

/// One input of an exactly-once batch: its output (`None`: dropped by a route), what to do once
/// committed, and how far a refused output was shrunk.
struct Unit {
    msg: Option<Outgoing>,
    done: Done,
    shrink: u8,
}

/// The dead-letter error of an input whose `kind` output was refused for `reason`.
fn refusal_error(kind: OutputKind, reason: &str, id: Option<String>) -> EventError {
    let message = match kind {
        OutputKind::Scored => format!("the sink refused the scored output: {reason}"),
        OutputKind::DeadLetter => format!("the dead-letter sink refused the dead letter: {reason}"),
    };
    EventError::new(ErrorKind::Publish, message).with_id(id)
}
