//! Kafka exactly-once (`delivery = "exactly_once"`), wired in one place: the consumer that
//! commits nothing itself and keeps its partitions' assignment epochs
//! ([`crate::source::kafka`]), and one transactional producer serving the scored, dead-letter and
//! named sinks, whose transactions commit each batch's outputs together with its inputs'
//! offsets ([`crate::sink::kafka::Transactions`], the pipeline's [`BatchCommit`]).
//!
//! It sits above `source/` and `sink/` (a sink never imports a source): the sink's transactions
//! learn of the consumer only through a [`ConsumerLink`].

use std::sync::Arc;

use crate::config::Config;
use crate::sink::{Delivery, KafkaSinkConfig, SinkConfig};
use crate::source::{KafkaSourceConfig, SourceConfig};
use crate::sink::kafka::ConsumerLink;
use crate::sink::{BatchCommit, Sink, SinkContext, SinkError};
use crate::source::kafka::KafkaSource;
use crate::source::{Source, SourceContext, SourceError};

/// Why the exactly-once parts could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// The configs of an exactly-once worker's components.
pub(crate) struct Configs<'a> {
    source: &'a KafkaSourceConfig,
    sink: &'a KafkaSinkConfig,
    dead_letter: &'a KafkaSinkConfig,
    /// Every `[sinks.<name>]`, in the config's name order.
    named: Vec<&'a KafkaSinkConfig>,
}

/// What an exactly-once worker runs with.
pub(crate) struct ExactlyOnce {
    pub source: Box<dyn Source>,
    pub scored: Arc<dyn Sink>,
    pub dead_letter: Arc<dyn Sink>,
    /// One per `[sinks.<name>]`, in the config's name order.
    pub named: Vec<Arc<dyn Sink>>,
    pub commit: Arc<dyn BatchCommit>,
}

impl<'a> Configs<'a> {
    /// `Some` when `config` asks for exactly-once. Validation has made sure that the source, the
    /// dead letter and every named sink are then Kafka ones on the sink's brokers.
    pub(crate) fn of(config: &'a Config) -> Option<Self> {
        let (SourceConfig::Kafka(source), SinkConfig::Kafka(sink), SinkConfig::Kafka(dead_letter)) =
            (&config.source, &config.sink, &config.dead_letter)
        else {
            return None;
        };
        let named = config.sinks.values().filter_map(|s| if let SinkConfig::Kafka(k) = s { Some(k) } else { None }).collect();
        (sink.delivery == Delivery::ExactlyOnce).then_some(Self { source, sink, dead_letter, named })
    }

    /// Before the model loads: the sink's brokers answer, with credentials, and every output
    /// topic exists (the source is checked on its own).
    pub(crate) async fn check(&self) -> Result<(), SinkError> {
        crate::sink::kafka::check(self.sink, &self.topics()).await
    }

    fn topics(&self) -> Vec<&str> {
        let mut topics = vec![self.sink.topic.as_str(), self.dead_letter.topic.as_str()];
        topics.extend(self.named.iter().map(|n| n.topic.as_str()));
        topics
    }

    /// Open the transactional consumer, then the transactional producer's sinks and the
    /// transactions over that consumer's group and assignment epochs.
    pub(crate) async fn open(&self, sctx: SourceContext, kctx: SinkContext) -> Result<ExactlyOnce, OpenError> {
        let (source, ownership) = KafkaSource::open_transactional(self.source, sctx).await?;
        let consumer = ConsumerLink { metadata: source.group_metadata(), ownership };
        let sinks = crate::sink::kafka::open_transactional(self.sink, self.dead_letter, &self.named, consumer, kctx).await?;
        Ok(ExactlyOnce {
            source: Box::new(source),
            scored: sinks.scored,
            dead_letter: sinks.dead_letter,
            named: sinks.named,
            commit: sinks.commit,
        })
    }
}
