//! Sources: where input records come from, and how they are acknowledged.
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

pub mod check;
pub mod config;
pub mod file;
pub mod http;
pub mod kafka;
pub mod nats;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::watch;

pub use config::{FileSourceConfig, KafkaSourceConfig, NatsSourceConfig, SourceConfig};
use crate::metrics::Metrics;
/// Where a record came from: shared with the sinks and the pipeline (`crate::record`).
pub use crate::record::Origin;

/// Errors of a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source could not be opened (bad address, credentials, missing stream or file).
    #[error("cannot open the {kind} source: {message}")]
    Open {
        kind: &'static str,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Reading failed in a way the source cannot recover from by itself.
    #[error("the {kind} source failed: {message}")]
    Fatal {
        kind: &'static str,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Acknowledging or committing failed.
    #[error("the {kind} source could not acknowledge: {message}")]
    Ack {
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

/// How a source learns that a record is done. Implemented by each source; the pipeline only
/// sees [`AckHandle`].
pub trait Ack: Send + 'static {
    /// The record's output is confirmed: mark it done (Kafka: offset done, stored once the
    /// partition's prefix is contiguous; JetStream: `+ACK`). Resolves when the source has taken
    /// the ack (for JetStream, when the ack was sent); it must not wait for other records.
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>>;
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
            fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
                Box::pin(async { Ok(()) })
            }
        }
        Self::new(Noop)
    }

    pub async fn ack(self) -> Result<(), SourceError> {
        self.0.ack().await
    }
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AckHandle")
    }
}

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

/// A source of records. The pipeline owns it in one task that calls [`Source::next`] while it
/// holds an in-flight permit; to stop fetching (backpressure or shutdown) it simply stops
/// calling `next`. Records already handed out stay valid and may be acked until [`Source::close`].
///
/// A source whose broker redelivers records that stay unacknowledged for a while (JetStream
/// `ack_wait`) keeps them alive itself, e.g. a timer sending in-progress acks for every record
/// handed out and neither acked nor dropped: a batch may take longer than the ack timeout.
pub trait Source: Send {
    /// The next record. `None` means the input has ended (end of a file); broker sources
    /// never end. Transient broker trouble is retried inside (and shown by
    /// [`Source::connected`]); an `Err` is fatal and stops the worker.
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Record, SourceError>>>;

    /// Whether the source is connected to its broker (`/readyz`). A file source is always
    /// connected.
    fn connected(&self) -> watch::Receiver<bool>;

    /// Called once when the pipeline stops calling [`Source::next`] for good (shutdown), while
    /// the records handed out are still being processed. A source whose broker session needs
    /// serving meanwhile (Kafka: rebalance callbacks, so that the group does not stall) does it
    /// in the background from here until [`Source::close`].
    fn drain(&mut self) {}

    /// Called once at shutdown, after every in-flight record was acked or dropped: flush acks
    /// and commit stored positions (Kafka: synchronous commit), then leave the group.
    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// What sources get from the worker at start.
#[derive(Clone)]
pub struct SourceContext {
    pub metrics: Arc<Metrics>,
    /// The worker's in-flight bound: a source may size its prefetch by it.
    pub max_inflight_events: usize,
    /// The worker's in-flight bound in payload bytes: a source bounds its prefetch by it too.
    pub max_inflight_bytes: usize,
}

/// Open the source chosen in the config.
pub async fn open(config: &SourceConfig, ctx: SourceContext) -> Result<Box<dyn Source>, SourceError> {
    match config {
        SourceConfig::File(c) => Ok(Box::new(file::FileSource::open(c, ctx).await?)),
        SourceConfig::Kafka(c) => Ok(Box::new(kafka::KafkaSource::open(c, ctx).await?)),
        SourceConfig::Nats(c) => Ok(Box::new(nats::NatsSource::open(c, ctx).await?)),
    }
}

