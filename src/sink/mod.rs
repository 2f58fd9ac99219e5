//! Sinks: where scored events and dead letters are published, and how publishes are confirmed.
//!
//! Publishing is two steps so that order and throughput do not fight: [`Sink::publish`]
//! enqueues a message (awaiting it only waits for room in the client's queue) and returns a
//! [`Confirmation`] that resolves when the broker has acknowledged the message (Kafka delivery
//! report, JetStream PubAck, file written and flushed). The pipeline calls `publish` for the
//! outputs of one partition/stream in input order and awaits the enqueue before the next call,
//! so a sink that keeps its enqueue order (idempotent Kafka producer, one NATS connection)
//! publishes them in input order. Confirmations are awaited concurrently.
//!
//! [`route`] picks the named sink of each scored event (`[[route]]`); [`config`] holds the
//! sections of every sink type.

pub mod config;
pub mod file;
pub mod kafka;
pub mod nats;
pub mod route;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

pub use config::{Delivery, FileSinkConfig, KafkaSinkConfig, NatsSinkConfig, SinkConfig};
use crate::metrics::Metrics;
use crate::record::Origin;

/// Errors of a sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink could not be opened (bad address, credentials, missing topic or stream).
    #[error("cannot open the {kind} sink: {message}")]
    Open {
        kind: &'static str,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A message could not be enqueued or was not acknowledged by the broker. The pipeline
    /// retries the publish.
    #[error("the {kind} sink could not publish: {message}")]
    Publish {
        kind: &'static str,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The broker refused this message for good (larger than its limit, invalid): publishing it
    /// again cannot succeed, so the pipeline never retries it. A refused scored output goes to
    /// the dead letters with the reason; a dead letter is shrunk to fit.
    #[error("the {kind} sink refused the message: {message}")]
    Rejected {
        kind: &'static str,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A transaction step (exactly-once) failed; the batch is aborted and retried.
    #[error("the {kind} sink transaction failed: {message}")]
    Transaction {
        kind: &'static str,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The sink cannot go on (a fenced transactional producer): the worker stops, and inputs
    /// not yet committed are re-read by whoever owns them next.
    #[error("the {kind} sink failed for good: {message}")]
    Fatal {
        kind: &'static str,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What an outgoing message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Scored,
    DeadLetter,
}

impl OutputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Scored => "scored",
            OutputKind::DeadLetter => "dead_letter",
        }
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Kafka key: the input's key, else the event id (None when neither is known).
    pub key: Option<Bytes>,
    /// The input's headers, in order; `None` for a null value (Kafka).
    pub headers: Vec<(String, Option<Bytes>)>,
    /// The JSON line (without a trailing newline).
    pub payload: Bytes,
    /// Stable id derived from the input ([`Origin::dedup_id`] plus the kind): the same on every
    /// redelivery of the input, so a de-duplicating broker (JetStream `Nats-Msg-Id`, prefixed
    /// with the output subject) drops replays. `None` when the input has no stable identity:
    /// such an output is never de-duplicated.
    pub(crate) dedup_id: Option<String>,
    /// No copy of this output can exist yet: the input's first delivery and the first publish
    /// attempt. A de-duplicating broker that reports such a message as a duplicate has found an
    /// id collision (counted and logged by the sink).
    pub(crate) first_publish: bool,
    pub kind: OutputKind,
    /// For a scored output routed by a `[[route]]` rule: the index of its named sink (in the
    /// pipeline's `Routes`); `None` for the default `[sink]` (and for dead letters).
    pub sink: Option<usize>,
    /// The input this message answers (for logs and exactly-once offset bookkeeping).
    pub origin: Origin,
}

/// Resolves when the broker has acknowledged one message.
pub(crate) type Confirmation = BoxFuture<'static, Result<(), SinkError>>;

/// A publisher of outgoing messages. Shared by the pipeline's publish and retry paths.
pub trait Sink: Send + Sync {
    /// Enqueue `msg`; the returned future resolves once it is enqueued (in call order), with
    /// the [`Confirmation`] of its delivery.
    fn publish(&self, msg: Outgoing) -> BoxFuture<'_, Result<Confirmation, SinkError>>;

    /// Deliver everything enqueued (shutdown). Resolves when all confirmations are in.
    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>>;

    /// The largest message (payload plus the carried-over headers) the destination takes, as
    /// learned from the broker and the client settings; `None` when there is no limit. Dead
    /// letters are shrunk to fit it.
    fn max_message_bytes(&self) -> Option<usize> {
        None
    }
}

impl SinkError {
    /// Whether publishing the same message again cannot succeed.
    pub(crate) fn is_permanent(&self) -> bool {
        matches!(self, SinkError::Rejected { .. })
    }

    /// Whether the sink cannot go on at all: the pipeline stops.
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(self, SinkError::Fatal { .. })
    }
}

/// Exactly-once hook (Kafka `delivery = "exactly_once"`): one producer transaction per unit of
/// work. The pipeline calls, for each unit (a scored batch, or a group of dead letters):
/// `begin`, then `publish` for every output of the unit on the sink(s) that share this
/// transaction, awaits every confirmation, then `commit` with the origins of the unit's inputs
/// (the implementation sends their next offsets with `send_offsets_to_transaction` and commits).
/// On any error it calls `abort` and retries the unit from `begin`, leaving out the inputs that
/// [`BatchCommit::owned`] no longer counts as the worker's. Acks of the unit's records are called
/// after `commit` (they may be no-ops). The implementation counts its own outcomes (each unit
/// committed or aborted, once); the pipeline counts nothing of them.
pub trait BatchCommit: Send + Sync {
    fn begin(&self) -> BoxFuture<'_, Result<(), SinkError>>;
    fn commit<'a>(&'a self, inputs: &'a [Origin]) -> BoxFuture<'a, Result<(), SinkError>>;
    fn abort(&self) -> BoxFuture<'_, Result<(), SinkError>>;

    /// Which of `inputs` the worker may still commit: an input of a partition revoked since it
    /// was read belongs to the partition's new owner, which reads it again. All, by default.
    fn owned(&self, inputs: &[Origin]) -> Vec<bool> {
        vec![true; inputs.len()]
    }

    /// After a fatal error: whether a fresh start of the unit is possible now (a new producer in
    /// place of one the broker fenced for outliving its transaction timeout); then the unit is
    /// replayed from `begin` without an abort. Never, by default.
    fn recover(&self) -> BoxFuture<'_, bool> {
        Box::pin(futures::future::ready(false))
    }
}

/// What sinks get from the worker at start.
#[derive(Clone)]
pub struct SinkContext {
    pub metrics: Arc<Metrics>,
}

/// Open the sink chosen in the config (used for both `[sink]` and `[dead_letter]`).
pub async fn open(config: &SinkConfig, ctx: SinkContext) -> Result<Arc<dyn Sink>, SinkError> {
    match config {
        SinkConfig::File(c) => Ok(Arc::new(file::FileSink::open(c, ctx).await?)),
        SinkConfig::Kafka(c) => Ok(Arc::new(kafka::KafkaSink::open(c, ctx).await?)),
        SinkConfig::Nats(c) => Ok(Arc::new(nats::NatsSink::open(c, ctx).await?)),
    }
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
