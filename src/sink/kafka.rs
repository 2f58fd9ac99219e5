//! Kafka sink: an idempotent producer (`enable.idempotence = true`, so retries neither reorder
//! nor duplicate within a session); the output key is the input's key (else the event id) and
//! the input's headers are carried over. A publish is confirmed by its delivery report.
//!
//! Exactly-once ([`open_exactly_once`]): one transactional producer serves both the scored and
//! the dead-letter topic, and each batch is one transaction: `begin_transaction`, the outputs,
//! `send_offsets_to_transaction` with the inputs' next offsets and the consumer's group
//! metadata, `commit_transaction`. A refused step aborts the transaction and the pipeline retries
//! the batch; a fatal producer error (fenced by a newer instance with the same
//! `transactional.id`) stops the worker, and its inputs are re-read from the last committed
//! offsets by whoever owns the partitions next. A rebalance that revokes a partition while its
//! batch is in flight can replay that batch: exactly-once holds across crashes and restarts,
//! at-least-once across such rebalances.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::{BatchCommit, Confirmation, Outgoing, Sink, SinkContext, SinkError};
use crate::config::brokers::KafkaSinkConfig;
use crate::kafka::{check_reachable, client_config, ClientError, ErrorContext};
use crate::source::Origin;

const KIND: &str = "kafka";

/// Transaction steps wait at most this long (librdkafka's `transaction.timeout.ms` is 60 s).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

type Producer_ = FutureProducer<ErrorContext>;

pub struct KafkaSink {
    producer: Producer_,
    topic: String,
    /// The producer's `message.max.bytes` (librdkafka's limit on one message).
    max_message_bytes: usize,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

fn err(message: impl Into<String>, source: KafkaError) -> SinkError {
    let message = message.into();
    // Too large or invalid: the broker (or librdkafka) will refuse the same message every time.
    let permanent = matches!(
        source.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
        )
    );
    if permanent {
        SinkError::Rejected { kind: KIND, message, source: Some(Box::new(source)) }
    } else {
        SinkError::Publish { kind: KIND, message, source: Some(Box::new(source)) }
    }
}

/// The producer's `message.max.bytes` from the sink's options.
fn message_max_bytes(c: &KafkaSinkConfig) -> usize {
    c.options.0.get("message.max.bytes").and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
}

fn open_err(e: ClientError) -> SinkError {
    SinkError::Open { kind: KIND, message: e.to_string(), source: e.into_source() }
}

/// Create a producer from `c` (plus `extra` settings) and check at start that the brokers answer
/// and the topics exist.
async fn producer(c: &KafkaSinkConfig, extra: &[(&str, &str)], topics: &[&str]) -> Result<Producer_, SinkError> {
    let mut defaults = vec![("enable.idempotence", "true"), ("linger.ms", "5")];
    defaults.extend_from_slice(extra);
    let config = client_config(&c.brokers, &defaults, &c.options, &c.option_files).map_err(open_err)?;
    let (probe, brokers) = (config.clone(), c.brokers.clone());
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    tokio::task::spawn_blocking(move || check_reachable(&probe, &brokers, &topics.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .map_err(|e| SinkError::Open { kind: KIND, message: "the start-up check failed".into(), source: Some(Box::new(e)) })?
        .map_err(open_err)?;
    let producer: Producer_ =
        config.create_with_context(ErrorContext::default()).map_err(|e| open_err(ClientError::Create(e)))?;
    Ok(producer)
}

impl KafkaSink {
    pub async fn open(c: &KafkaSinkConfig, _ctx: SinkContext) -> Result<Self, SinkError> {
        Ok(Self {
            producer: producer(c, &[], &[&c.topic]).await?,
            topic: c.topic.clone(),
            max_message_bytes: message_max_bytes(c),
        })
    }
}

impl Sink for KafkaSink {
    fn publish(&self, msg: Outgoing) -> BoxFuture<'_, Result<Confirmation, SinkError>> {
        async move {
            let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len());
            for (k, v) in &msg.headers {
                headers = headers.insert(Header { key: k, value: Some(v.as_ref()) });
            }
            let key: &[u8] = msg.key.as_deref().unwrap_or_default();
            loop {
                let mut record = FutureRecord::to(&self.topic).payload(msg.payload.as_ref()).headers(headers.clone());
                if msg.key.is_some() {
                    record = record.key(key);
                }
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        let confirmation: Confirmation = async move {
                            match delivery.await {
                                Ok(Ok(_)) => Ok(()),
                                Ok(Err((e, _))) => Err(err("the broker did not acknowledge the message", e)),
                                Err(_) => Err(SinkError::Publish {
                                    kind: KIND,
                                    message: "the producer was dropped before delivery".into(),
                                    source: None,
                                }),
                            }
                        }
                        .boxed();
                        return Ok(confirmation);
                    }
                    // The producer's queue is full: backpressure, wait for deliveries.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => return Err(err(format!("cannot enqueue to {}", self.topic), e)),
                }
            }
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async move {
            let producer = self.producer.clone();
            tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(30)))
                .await
                .map_err(|e| SinkError::Publish { kind: KIND, message: "flush task failed".into(), source: Some(Box::new(e)) })?
                .map_err(|e| err("cannot flush the producer", e))
        }
        .boxed()
    }

    fn max_message_bytes(&self) -> Option<usize> {
        Some(self.max_message_bytes)
    }
}

/// The consumer's group metadata at commit time (see `KafkaSource::group_metadata`).
pub type GroupMetadata = Arc<dyn Fn() -> Option<ConsumerGroupMetadata> + Send + Sync>;

/// Exactly-once transactions over the producer shared by the scored and dead-letter sinks.
pub struct Transactions {
    producer: Producer_,
    group: GroupMetadata,
}

/// The sink, dead-letter sink and transaction hook of `delivery = "exactly_once"`: one
/// transactional producer (`transactional.id` from the sink's config, else
/// `scorestream-<hostname>`; the sink's options apply, the dead letter's only name its topic).
pub async fn open_exactly_once(
    sink: &KafkaSinkConfig,
    dead_letter: &KafkaSinkConfig,
    group: GroupMetadata,
) -> Result<(Arc<dyn Sink>, Arc<dyn Sink>, Arc<dyn BatchCommit>), SinkError> {
    let id = sink.transactional_id.clone().unwrap_or_else(crate::kafka::default_transactional_id);
    let producer = producer(sink, &[("transactional.id", &id)], &[&sink.topic, &dead_letter.topic]).await?;
    let init = producer.clone();
    tokio::task::spawn_blocking(move || init.init_transactions(TRANSACTION_TIMEOUT))
        .await
        .map_err(|e| SinkError::Open { kind: KIND, message: "init_transactions task failed".into(), source: Some(Box::new(e)) })?
        .map_err(|e| SinkError::Open {
            kind: KIND,
            message: format!("cannot initialise transactions for transactional.id {id:?}"),
            source: Some(Box::new(e)),
        })?;
    tracing::info!(transactional_id = %id, "exactly-once: transactions initialised");
    let max_message_bytes = message_max_bytes(sink);
    let scored = Arc::new(KafkaSink { producer: producer.clone(), topic: sink.topic.clone(), max_message_bytes });
    let dead = Arc::new(KafkaSink { producer: producer.clone(), topic: dead_letter.topic.clone(), max_message_bytes });
    Ok((scored, dead, Arc::new(Transactions { producer, group })))
}

/// The offsets to commit for a batch: per input partition, the highest offset + 1.
fn next_offsets(inputs: &[Origin]) -> Result<TopicPartitionList, KafkaError> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for origin in inputs {
        if let Origin::Kafka { topic, partition, offset } = origin {
            let e = next.entry((topic.as_str(), *partition)).or_insert(0);
            *e = (*e).max(offset + 1);
        }
    }
    let mut tpl = TopicPartitionList::with_capacity(next.len());
    for ((topic, partition), offset) in next {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    Ok(tpl)
}

/// A transaction step's error: fatal ones (fenced, unsupported) stop the worker.
fn txn_err(step: &str, e: KafkaError) -> SinkError {
    let fatal = matches!(&e, KafkaError::Transaction(t) if t.is_fatal());
    let message = format!("{step} failed");
    if fatal {
        SinkError::Fatal { kind: KIND, message, source: Some(Box::new(e)) }
    } else {
        SinkError::Transaction { kind: KIND, message, source: Some(Box::new(e)) }
    }
}

impl Transactions {
    /// Run a blocking transaction call off the async threads.
    async fn blocking(
        &self,
        step: &'static str,
        f: impl FnOnce(&Producer_) -> Result<(), KafkaError> + Send + 'static,
    ) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || f(&producer))
            .await
            .map_err(|e| SinkError::Transaction { kind: KIND, message: format!("{step} task failed"), source: Some(Box::new(e)) })?
            .map_err(|e| txn_err(step, e))
    }
}

impl BatchCommit for Transactions {
    fn begin(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        let begun = self.producer.begin_transaction().map_err(|e| txn_err("begin_transaction", e));
        futures::future::ready(begun).boxed()
    }

    fn commit<'a>(&'a self, inputs: &'a [Origin]) -> BoxFuture<'a, Result<(), SinkError>> {
        async move {
            let offsets = next_offsets(inputs).map_err(|e| txn_err("listing the input offsets", e))?;
            if offsets.count() > 0 {
                let group = (self.group)().ok_or_else(|| SinkError::Transaction {
                    kind: KIND,
                    message: "the consumer has no group metadata yet".into(),
                    source: None,
                })?;
                self.blocking("send_offsets_to_transaction", move |p| {
                    p.send_offsets_to_transaction(&offsets, &group, TRANSACTION_TIMEOUT)
                })
                .await?;
            }
            self.blocking("commit_transaction", |p| p.commit_transaction(TRANSACTION_TIMEOUT)).await
        }
        .boxed()
    }

    fn abort(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        self.blocking("abort_transaction", |p| p.abort_transaction(TRANSACTION_TIMEOUT)).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_commits_the_next_offset_of_each_input_partition() {
        let o = |t: &str, p, offset| Origin::Kafka { topic: t.into(), partition: p, offset };
        let tpl = next_offsets(&[o("a", 0, 5), o("a", 1, 9), o("a", 0, 7), o("a", 0, 6), o("b", 0, 1)]).unwrap();
        let got: Vec<(String, i32, Offset)> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition(), e.offset())).collect();
        assert_eq!(
            got,
            vec![("a".into(), 0, Offset::Offset(8)), ("a".into(), 1, Offset::Offset(10)), ("b".into(), 0, Offset::Offset(2))]
        );
    }
}
