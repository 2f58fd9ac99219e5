//! What sources, the pipeline and sinks all speak of about one input: the [`Record`] a source
//! hands out, where it came from ([`Origin`]) and how it is acknowledged ([`AckHandle`], failing
//! with an [`AckError`]). It lives below `source/` and `sink/` so that a sink never imports a
//! source.
//!
//! Delivery contract (at-least-once, after rust-rdkafka's `at_least_once.rs` and Vector's
//! ordered finalizer): the pipeline acknowledges a [`Record`] through its [`AckHandle`] only
//! after the record's scored or dead-lettered copy has been confirmed by the sink. A record whose
//! handle is dropped without [`AckHandle::ack`] was not processed: the source must not mark it
//! done (it is redelivered after a restart, a rebalance or the broker's ack timeout).
//!
//! Acks complete out of order (different partitions, retried publishes). A source whose broker
//! tracks a single position per partition (Kafka) must advance the stored position only over the
//! contiguous prefix of acknowledged records of that partition.

use std::fmt;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde_json::{json, Value};

/// One input record.
#[derive(Debug)]
pub struct Record {
    /// The raw payload (parsed by `InputEvent::parse`).
    pub payload: Bytes,
    /// Kafka message key; `None` elsewhere.
    pub key: Option<Bytes>,
    /// Broker headers, carried over to the output in order; `None` for a null value (Kafka).
    pub headers: Vec<(String, Option<Bytes>)>,
    pub origin: Origin,
    pub ack: AckHandle,
}

/// Why a source could not mark an input (or, at close, its inputs) done: the broker refused the
/// ack or offset, or could not be reached. The input may be redelivered.
#[derive(Debug, thiserror::Error)]
#[error("the {kind} source could not acknowledge: {message}")]
pub struct AckError {
    /// The source: `kafka`, `nats`.
    pub kind: &'static str,
    /// What was being acknowledged (which offset, which message).
    pub message: String,
    /// The broker client's reason.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl AckError {
    pub fn new(kind: &'static str, message: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self { kind, message: message.into(), source: Some(source.into()) }
    }
}

/// How a source learns that a record is done. Implemented by each source; the pipeline only
/// sees [`AckHandle`].
pub trait Ack: Send + 'static {
    /// The record's output is confirmed: mark it done (Kafka: offset done, stored once the
    /// partition's prefix is contiguous; JetStream: `+ACK`). Resolves when the source has taken
    /// the ack (for JetStream, when the ack was sent); it must not wait for other records.
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), AckError>>;
}

/// The acknowledgement of one record. Drop it without calling [`AckHandle::ack`] to leave the
/// record unprocessed (it will be redelivered).
pub struct AckHandle(Box<dyn Ack>);

impl AckHandle {
    pub fn new(ack: impl Ack) -> Self {
        Self(Box::new(ack))
    }

    /// A handle whose ack does nothing (file source, exactly-once Kafka where positions are
    /// committed inside the producer transaction).
    pub(crate) fn noop() -> Self {
        struct Noop;
        impl Ack for Noop {
            fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), AckError>> {
                Box::pin(async { Ok(()) })
            }
        }
        Self::new(Noop)
    }

    pub async fn ack(self) -> Result<(), AckError> {
        self.0.ack().await
    }
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AckHandle")
    }
}

/// Where a record was read from. Used for the dead-letter `source` object, the sink's
/// de-duplication id and the ordering lane.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    Kafka {
        topic: String,
        partition: i32,
        offset: i64,
        /// Exactly-once: the epoch of this worker's assignment of the partition when the record
        /// was read ([`crate::kafka::ownership`]); a record read before its partition was revoked
        /// is never committed. 0 outside exactly-once.
        epoch: u64,
    },
    Nats {
        stream: String,
        /// The stream's creation time (Unix nanoseconds): a stream deleted and created again
        /// under the same name restarts its sequences, and this tells the two apart.
        stream_created: i64,
        /// The durable consumer: two deployments reading one stream publish different outputs.
        consumer: String,
        /// The stream sequence; `None` when the message's metadata could not be read (never
        /// invented: such an input's output is not de-duplicated).
        sequence: Option<u64>,
        /// How many times JetStream has delivered this message (1 on the first delivery).
        delivered: u64,
    },
    /// `line` counts from 1.
    File {
        path: String,
        line: u64,
    },
    /// An event posted to `/v1/score`: its request and its place in the request.
    Http {
        request: u64,
        index: u64,
    },
}

impl Origin {
    /// The dead-letter `source` object: `{topic, partition, offset}`,
    /// `{stream, consumer, sequence, delivered}` or `{file, line}`.
    pub(crate) fn to_json(&self) -> Value {
        match self {
            Origin::Kafka { topic, partition, offset, .. } => {
                json!({"topic": topic, "partition": partition, "offset": offset})
            }
            Origin::Nats { stream, consumer, sequence, delivered, .. } => {
                json!({"stream": stream, "consumer": consumer, "sequence": sequence, "delivered": delivered})
            }
            Origin::File { path, line } => json!({"file": path, "line": line}),
            Origin::Http { request, index } => json!({"http": {"request": request, "index": index}}),
        }
    }

    /// A stable id of this input, the same on every redelivery: sinks that de-duplicate
    /// (JetStream `Nats-Msg-Id`) derive the output's id from it. It names the input's stream
    /// instance and the consumer, so that two deployments on one stream, or a re-created
    /// stream, never share ids. `None` when the input has no stable identity.
    pub(crate) fn dedup_id(&self) -> Option<String> {
        match self {
            Origin::Kafka { topic, partition, offset, .. } => Some(format!("kafka:{topic}:{partition}:{offset}")),
            Origin::Nats { stream, stream_created, consumer, sequence, .. } => {
                sequence.map(|seq| format!("nats:{stream}@{stream_created}:{consumer}:{seq}"))
            }
            Origin::File { path, line } => Some(format!("file:{path}:{line}")),
            // Answered to the request, never published: nothing to de-duplicate.
            Origin::Http { .. } => None,
        }
    }

    /// Whether this delivery is a replay of an input seen before: `Some` where the broker says
    /// (JetStream's delivery count; a file is read once), `None` where it does not (Kafka).
    pub fn redelivered(&self) -> Option<bool> {
        match self {
            Origin::Nats { delivered, .. } => Some(*delivered > 1),
            Origin::File { .. } | Origin::Http { .. } => Some(false),
            Origin::Kafka { .. } => None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.dedup_id(), self) {
            (Some(id), _) => f.write_str(&id),
            (None, Origin::Nats { stream, consumer, .. }) => write!(f, "nats:{stream}:{consumer}:<unknown sequence>"),
            (None, _) => f.write_str("<unknown origin>"),
        }
    }
}
