//! The publish and ack stages: turn outcomes into messages, publish them in input order, and
//! ack each input once its message is confirmed.
//!
//! A failed publish is retried with backoff until it is confirmed (or the process exits at the
//! shutdown deadline, leaving the input unacked for redelivery). A retried message can land
//! after later outputs of its partition: order holds for the failure-free path.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{InFlight, Outcome};
use crate::event::{ErrorBody, EventError, InputEvent, Score, ScoredEvent};
use crate::metrics::Metrics;
use crate::sink::{BatchCommit, Confirmation, Outgoing, OutputKind, Sink, SinkError};
use crate::source::Origin;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The scored event's JSON line.
pub fn scored_payload(event: InputEvent, score: Score, tokens: usize, truncated: bool, model: &str) -> Bytes {
    let scored = ScoredEvent::new(event, score, tokens, truncated, model);
    // Serializing a struct of strings, numbers and JSON values cannot fail.
    Bytes::from(serde_json::to_vec(&scored).unwrap_or_default())
}

/// The dead letter's JSON line: the error, the id if known, the original payload (a string, or
/// base64 with `"payload_encoding": "base64"` when it is not UTF-8) and where it came from.
pub fn dead_letter_payload(error: &EventError, payload: &[u8], origin: &Origin) -> Bytes {
    let mut obj = serde_json::Map::new();
    obj.insert("error".into(), serde_json::to_value(ErrorBody::from(error)).unwrap_or(Value::Null));
    if let Some(id) = &error.id {
        obj.insert("id".into(), Value::String(id.clone()));
    }
    match std::str::from_utf8(payload) {
        Ok(text) => {
            obj.insert("payload".into(), Value::String(text.to_owned()));
        }
        Err(_) => {
            obj.insert("payload".into(), json!(base64::engine::general_purpose::STANDARD.encode(payload)));
            obj.insert("payload_encoding".into(), json!("base64"));
        }
    }
    obj.insert("source".into(), origin.to_json());
    Bytes::from(serde_json::to_vec(&Value::Object(obj)).unwrap_or_default())
}

/// What to count once an input is done.
enum Tally {
    Scored { tokens: usize, rewards: Vec<(String, f32)> },
    Failed(&'static str),
}

/// An input waiting for its output's confirmation.
struct Done {
    input: InFlight,
    tally: Tally,
}

pub(super) struct Publisher {
    pub sink: Arc<dyn Sink>,
    pub dead_letter: Arc<dyn Sink>,
    pub commit: Option<Arc<dyn BatchCommit>>,
    pub metrics: Arc<Metrics>,
    pub model: String,
}

impl Publisher {
    /// Publish batches in order until the channel closes, then wait for every confirmation.
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Vec<(InFlight, Outcome)>>) {
        let this = Arc::new(self);
        let mut pending = FuturesUnordered::new();
        loop {
            // Biased toward completions, so acks (and permits) are released before more work.
            tokio::select! {
                biased;
                Some(()) = pending.next(), if !pending.is_empty() => {}
                batch = rx.recv() => match batch {
                    None => break,
                    Some(batch) if this.commit.is_some() => this.transact(batch).await,
                    Some(batch) => {
                        for (input, outcome) in batch {
                            let (msg, done) = this.build(input, outcome);
                            let confirm = this.publish(&msg).await;
                            pending.push(this.clone().complete(msg, confirm, done));
                        }
                    }
                },
            }
        }
        while pending.next().await.is_some() {}
    }

    fn sink_for(&self, kind: OutputKind) -> &Arc<dyn Sink> {
        match kind {
            OutputKind::Scored => &self.sink,
            OutputKind::DeadLetter => &self.dead_letter,
        }
    }

    fn build(&self, input: InFlight, outcome: Outcome) -> (Outgoing, Done) {
        let (kind, id, payload, tally) = match outcome {
            Outcome::Scored { event, score, tokens, truncated } => {
                let mut rewards = vec![("reward".to_owned(), score.reward)];
                rewards.extend(score.attributes.iter().cloned());
                let id = event.id.clone();
                let payload = scored_payload(event, score, tokens, truncated, &self.model);
                (OutputKind::Scored, Some(id), payload, Tally::Scored { tokens, rewards })
            }
            Outcome::Failed(e) => {
                let payload = dead_letter_payload(&e, &input.payload, &input.origin);
                tracing::debug!(origin = %input.origin, kind = %e.kind, message = %e.message, "dead letter");
                (OutputKind::DeadLetter, e.id.clone(), payload, Tally::Failed(e.kind.as_str()))
            }
        };
        let msg = Outgoing {
            key: input.key.clone().or_else(|| id.map(Bytes::from)),
            headers: input.headers.clone(),
            payload,
            dedup_id: format!("{}:{kind}", input.origin.dedup_id()),
            kind,
            origin: input.origin.clone(),
        };
        (msg, Done { input, tally })
    }

    /// Enqueue `msg`, retrying with backoff until the sink takes it.
    async fn publish(&self, msg: &Outgoing) -> Confirmation {
        let mut delay = FIRST_BACKOFF;
        loop {
            match self.sink_for(msg.kind).publish(msg.clone()).await {
                Ok(c) => return c,
                Err(e) => {
                    tracing::warn!(error = %e, origin = %msg.origin, "publish failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Wait for the confirmation (republishing on failure), then ack and count.
    async fn complete(self: Arc<Self>, msg: Outgoing, mut confirm: Confirmation, done: Done) {
        let mut delay = FIRST_BACKOFF;
        while let Err(e) = confirm.await {
            tracing::warn!(error = %e, origin = %msg.origin, "publish not confirmed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_BACKOFF);
            confirm = self.publish(&msg).await;
        }
        self.finish(done).await;
    }

    async fn finish(&self, done: Done) {
        let Done { input, tally } = done;
        let InFlight { origin, ack, consumed, _permit, .. } = input;
        if let Err(e) = ack.ack().await {
            tracing::warn!(error = %e, %origin, "ack failed; the input may be redelivered");
        }
        let m = &self.metrics;
        m.event_latency_seconds.observe(consumed.elapsed().as_secs_f64());
        match tally {
            Tally::Scored { tokens, rewards } => {
                m.events_scored.inc();
                m.tokens_scored.inc_by(tokens as u64);
                for (attribute, value) in rewards {
                    m.reward.with_label_values(&[attribute.as_str()]).observe(f64::from(value));
                }
            }
            Tally::Failed(reason) => m.events_failed.with_label_values(&[reason]).inc(),
        }
    }

    /// Exactly-once: the batch's outputs and its inputs' positions in one transaction,
    /// retried whole until it commits.
    async fn transact(&self, batch: Vec<(InFlight, Outcome)>) {
        let Some(commit) = &self.commit else { return };
        let (msgs, dones): (Vec<Outgoing>, Vec<Done>) = batch.into_iter().map(|(i, o)| self.build(i, o)).unzip();
        let origins: Vec<Origin> = msgs.iter().map(|m| m.origin.clone()).collect();
        let mut delay = FIRST_BACKOFF;
        while let Err(e) = self.try_transaction(commit.as_ref(), &msgs, &origins).await {
            exit_if_fatal(&e);
            tracing::warn!(error = %e, "transaction failed; aborting and retrying the batch");
            match commit.abort().await {
                Ok(()) => self.metrics.kafka_transactions.with_label_values(&["aborted"]).inc(),
                Err(e) => {
                    exit_if_fatal(&e);
                    tracing::warn!(error = %e, "abort failed");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_BACKOFF);
        }
        self.metrics.kafka_transactions.with_label_values(&["committed"]).inc();
        for done in dones {
            self.finish(done).await;
        }
    }

    async fn try_transaction(
        &self,
        commit: &dyn BatchCommit,
        msgs: &[Outgoing],
        origins: &[Origin],
    ) -> Result<(), SinkError> {
        commit.begin().await?;
        let mut confirmations = Vec::with_capacity(msgs.len());
        for m in msgs {
            confirmations.push(self.sink_for(m.kind).publish(m.clone()).await?);
        }
        futures::future::try_join_all(confirmations).await?;
        commit.commit(origins).await
    }
}

/// A fatal sink error (a fenced transactional producer) leaves nothing to retry: stop the
/// process at once. Nothing of the current batch was committed, so its inputs are re-read from
/// the last committed offsets after the restart.
fn exit_if_fatal(e: &SinkError) {
    if matches!(e, SinkError::Fatal { .. }) {
        let mut chain = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            chain = format!("{chain}: {s}");
            source = s.source();
        }
        tracing::error!(error = %chain, "fatal sink error: exiting");
        eprintln!("error: {chain}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ErrorKind;

    #[test]
    fn dead_letters_keep_the_payload_and_origin() {
        let origin = Origin::Nats { stream: "S".into(), sequence: 7 };
        let e = EventError::new(ErrorKind::Schema, "bad").with_id(Some("x".into()));
        let v: Value = serde_json::from_slice(&dead_letter_payload(&e, b"{\"id\":\"x\"}", &origin)).unwrap();
        assert_eq!(
            v,
            json!({"error": {"kind": "schema", "message": "bad"}, "id": "x", "payload": "{\"id\":\"x\"}",
                   "source": {"stream": "S", "sequence": 7}})
        );
        let e = EventError::new(ErrorKind::InvalidUtf8, "no");
        let origin = Origin::Kafka { topic: "t".into(), partition: 2, offset: 9 };
        let v: Value = serde_json::from_slice(&dead_letter_payload(&e, b"\xff\x00", &origin)).unwrap();
        assert_eq!(v["payload"], "/wA=");
        assert_eq!(v["payload_encoding"], "base64");
        assert_eq!(v["source"], json!({"topic": "t", "partition": 2, "offset": 9}));
        assert!(v.get("id").is_none());
    }
}
