//! Sources: where input records come from ([`Source`]), and how they are opened. A source
//! hands out [`Record`]s whose [`crate::record::AckHandle`] the pipeline calls only once the
//! record's output is confirmed (the delivery contract is in [`crate::record`]).

pub mod check;
pub mod config;
pub mod file;
pub mod http;
pub mod kafka;
pub mod nats;

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;

pub use config::{FileSourceConfig, KafkaSourceConfig, NatsSourceConfig, SourceConfig};
use crate::metrics::Metrics;
use crate::record::{AckError, Record};

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
    /// Acknowledging failed, or (at close) committing what was acknowledged.
    #[error(transparent)]
    Ack(#[from] AckError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
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

