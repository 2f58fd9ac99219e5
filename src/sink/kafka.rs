//! Kafka sink: an idempotent producer (`enable.idempotence = true`, so retries neither reorder
//! nor duplicate within a session); the output key is the input's key (else the event id) and
//! the input's headers are carried over (a null value stays null). A publish is confirmed by its
//! delivery report. A producer that librdkafka declares failed for good (the broker lost its
//! state: `UnknownProducerId` with messages in flight) is replaced by a new one, with an error
//! line naming the cause; the messages it failed are published again by the pipeline.
//!
//! Exactly-once: [`txn`] (one transactional producer for every sink of the worker, one
//! transaction per batch).

mod txn;

pub use txn::{open_transactional, ConsumerLink, GroupMetadata, Transactions, TransactionalSinks};

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use super::{Confirmation, Outgoing, Sink, SinkContext, SinkError};
use super::KafkaSinkConfig;
use crate::kafka::{check_reachable, client_config, ClientError, ErrorContext};

const KIND: &str = "kafka";

type Producer_ = FutureProducer<ErrorContext>;

pub struct KafkaSink {
    slot: Arc<Slot>,
    topic: String,
    /// The producer's `message.max.bytes` (librdkafka's limit on one message).
    max_message_bytes: usize,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The producer's `message.max.bytes` from the sink's options.
fn message_max_bytes(c: &KafkaSinkConfig) -> usize {
    c.options.0.get("message.max.bytes").and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
}

/// A sink's producer. An idempotent producer that librdkafka declares failed for good (the
/// broker lost its state, `UnknownProducerId`, with messages in flight, so it cannot go on
/// without risking duplicates or reordering) is replaced by a new one: the messages it failed
/// come back as publish errors, and the pipeline publishes them again on the new producer. A
/// transactional producer is never replaced: its fatal error stops the worker.
struct Slot {
    current: std::sync::RwLock<Producer_>,
    /// How to make a new producer; `None` for the transactional one.
    config: Option<ClientConfig>,
}

impl Slot {
    fn get(&self) -> Producer_ {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Put `new` in place of the current producer (exactly-once: after the broker aborted a
    /// transaction that outlived its timeout).
    fn replace(&self, new: Producer_) {
        let old = std::mem::replace(&mut *self.current.write().unwrap_or_else(|e| e.into_inner()), new);
        // Dropping a producer waits for its purge: not on an async thread.
        tokio::task::spawn_blocking(move || drop(old));
    }

    /// The error to report for a failed call on `producer`: `failure` itself, unless the
    /// producer failed for good; then it is replaced (unless transactional) and the error says
    /// why.
    fn failed(&self, producer: &Producer_, failure: SinkError) -> SinkError {
        let Some((code, reason)) = producer.client().fatal_error() else { return failure };
        let cause = format!("{reason} ({code:?})");
        let Some(config) = &self.config else {
            return SinkError::Fatal { kind: KIND, message: format!("the producer failed for good: {cause}"), source: None };
        };
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.client().native_ptr() == producer.client().native_ptr() {
            match config.create_with_context::<_, Producer_>(ErrorContext::default()) {
                Ok(new) => {
                    tracing::error!(cause = %cause, "the Kafka producer failed for good: publishing on a new one");
                    let old = std::mem::replace(&mut *current, new);
                    // Dropping a producer waits for its purge: not on an async thread.
                    tokio::task::spawn_blocking(move || drop(old));
                }
                Err(e) => {
                    return SinkError::Fatal {
                        kind: KIND,
                        message: format!("the producer failed for good ({cause}) and cannot be replaced"),
                        source: Some(crate::kafka::reason(e)),
                    }
                }
            }
        }
        SinkError::Publish { kind: KIND, message: format!("the producer failed for good and was replaced: {cause}"), source: None }
    }
}

/// A publish error with librdkafka's reason as its source: permanent ([`SinkError::Rejected`])
/// when the broker or librdkafka will refuse the same message every time (too large, invalid).
fn err(message: impl Into<String>, e: KafkaError) -> SinkError {
    let permanent = matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
        )
    );
    let (message, source) = (message.into(), Some(crate::kafka::reason(e)));
    if permanent {
        SinkError::Rejected { kind: KIND, message, source }
    } else {
        SinkError::Publish { kind: KIND, message, source }
    }
}

fn open_err(e: ClientError) -> SinkError {
    SinkError::Open { kind: KIND, message: e.to_string(), source: e.into_source() }
}

/// Create a producer from `c` (plus `extra` settings) and check at start that the brokers answer
/// and the topics exist.
async fn producer(c: &KafkaSinkConfig, extra: &[(&str, &str)], topics: &[&str]) -> Result<(Producer_, ClientConfig), SinkError> {
    let mut defaults = vec![("enable.idempotence", "true"), ("linger.ms", "5")];
    defaults.extend_from_slice(extra);
    let config = client_config(&c.brokers, &defaults, &c.options, &c.option_files).map_err(open_err)?;
    check_with(&config, &c.brokers, topics).await?;
    let producer: Producer_ =
        config.create_with_context(ErrorContext::default()).map_err(|e| open_err(ClientError::Create(e)))?;
    Ok((producer, config))
}

/// Check at start, without opening the sink, that `c`'s brokers answer with its credentials
/// (secret files read) and that `topics` exist.
pub async fn check(c: &KafkaSinkConfig, topics: &[&str]) -> Result<(), SinkError> {
    let config = client_config(&c.brokers, &[], &c.options, &c.option_files).map_err(open_err)?;
    check_with(&config, &c.brokers, topics).await
}

async fn check_with(config: &ClientConfig, brokers: &str, topics: &[&str]) -> Result<(), SinkError> {
    let (probe, brokers) = (config.clone(), brokers.to_owned());
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    tokio::task::spawn_blocking(move || check_reachable(&probe, &brokers, &topics.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .map_err(|e| SinkError::Open { kind: KIND, message: "the start-up check failed".into(), source: Some(Box::new(e)) })?
        .map_err(open_err)
}

impl KafkaSink {
    pub async fn open(c: &KafkaSinkConfig, _ctx: SinkContext) -> Result<Self, SinkError> {
        let (producer, config) = producer(c, &[], &[&c.topic]).await?;
        Ok(Self::new(producer, Some(config), &c.topic, message_max_bytes(c)))
    }

    /// `config`: how to replace `producer` should it fail for good (`None`: never).
    fn new(producer: Producer_, config: Option<ClientConfig>, topic: &str, max_message_bytes: usize) -> Self {
        Self::on_slot(Arc::new(Slot { current: std::sync::RwLock::new(producer), config }), topic, max_message_bytes)
    }

    /// A sink to `topic` on a producer shared with other sinks (exactly-once).
    fn on_slot(slot: Arc<Slot>, topic: &str, max_message_bytes: usize) -> Self {
        Self { slot, topic: topic.to_owned(), max_message_bytes }
    }
}

impl Sink for KafkaSink {
    fn publish(&self, msg: Outgoing) -> BoxFuture<'_, Result<Confirmation, SinkError>> {
        async move {
            let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len());
            for (k, v) in &msg.headers {
                // A null value stays null.
                headers = headers.insert(Header { key: k, value: v.as_deref() });
            }
            let key: &[u8] = msg.key.as_deref().unwrap_or_default();
            loop {
                let mut record = FutureRecord::to(&self.topic).payload(msg.payload.as_ref()).headers(headers.clone());
                if msg.key.is_some() {
                    record = record.key(key);
                }
                let producer = self.slot.get();
                let slot = self.slot.clone();
                match producer.send_result(record) {
                    Ok(delivery) => {
                        let confirmation: Confirmation = async move {
                            match delivery.await {
                                Ok(Ok(_)) => Ok(()),
                                Ok(Err((e, _))) => Err(slot.failed(&producer, err("the broker did not acknowledge the message", e))),
                                Err(e) => Err(SinkError::Publish {
                                    kind: KIND,
                                    message: "the producer was dropped before delivery".into(),
                                    source: Some(Box::new(e)),
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
                    Err((e, _)) => return Err(self.slot.failed(&producer, err(format!("cannot enqueue to {}", self.topic), e))),
                }
            }
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async move {
            let producer = self.slot.get();
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

#[cfg(test)]
mod tests {
    use super::*;

    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaRespErr;

    use crate::record::Origin;

    pub(super) fn outgoing() -> Outgoing {
        Outgoing {
            key: None,
            headers: Vec::new(),
            payload: bytes::Bytes::from_static(b"{}"),
            dedup_id: Some("x".into()),
            first_publish: true,
            sink: None,
            kind: super::super::OutputKind::Scored,
            origin: Origin::File { path: "f".into(), line: 1 },
        }
    }

    /// The error and its sources, as the worker logs them.
    pub(super) fn chain(e: &SinkError) -> String {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        text
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_over_message_max_bytes_is_refused_for_good_with_librdkafkas_reason_once() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("conv-dead", 1, 1).unwrap();
        let producer: Producer_ = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("message.max.bytes", "1000")
            .create_with_context(ErrorContext::default())
            .unwrap();
        let sink = KafkaSink::new(producer, None, "conv-dead", DEFAULT_MESSAGE_MAX_BYTES);
        let msg = Outgoing { payload: bytes::Bytes::from(vec![b'x'; 5000]), ..outgoing() };
        let Err(e) = sink.publish(msg).await else { panic!("a message over message.max.bytes was taken") };
        let text = chain(&e);
        // Too large: a permanent refusal, never retried as is.
        assert!(e.is_permanent(), "{text}");
        assert!(text.starts_with("the kafka sink refused the message: cannot enqueue to conv-dead: "), "{text}");
        assert_eq!(text.matches("Message size too large").count(), 1, "the reason, once: {text}");
    }

    /// Publish until confirmed, publishing again after a failure, as the pipeline does; the
    /// failures seen.
    async fn publish_until_confirmed(sink: &KafkaSink, confirmation: Result<Confirmation, SinkError>) -> Vec<String> {
        let mut failures = Vec::new();
        let mut next = confirmation;
        loop {
            let failure = match next {
                Ok(c) => match c.await {
                    Ok(()) => return failures,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            failures.push(chain(&failure));
            assert!(failures.len() < 20, "{failures:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            next = sink.publish(outgoing()).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_producer_whose_state_the_broker_lost_is_replaced_and_publishing_goes_on() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("out", 1, 1).unwrap();
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", cluster.bootstrap_servers()).set("enable.idempotence", "true").set("linger.ms", "5");
        let producer: Producer_ = config.create_with_context(ErrorContext::default()).unwrap();
        let sink = KafkaSink::new(producer, Some(config), "out", DEFAULT_MESSAGE_MAX_BYTES);
        sink.publish(outgoing()).await.unwrap().await.unwrap();
        // The broker lost the producer's state with messages in flight: librdkafka fails the
        // producer for good. (Simulated with librdkafka's test hook: the mock cluster's injected
        // UNKNOWN_PRODUCER_ID errors are absorbed by librdkafka's own epoch bump.)
        let reason = std::ffi::CString::new("ProduceRequest failed due to unknown producer id").unwrap();
        let failed = sink.slot.get();
        let code = RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID;
        // SAFETY: a live client handle and a NUL-terminated string that outlives the call.
        unsafe { rdkafka::bindings::rd_kafka_test_fatal_error(failed.client().native_ptr(), code, reason.as_ptr()) };
        let mut failures = Vec::new();
        for _ in 0..20 {
            let confirmation = sink.publish(outgoing()).await;
            failures.extend(publish_until_confirmed(&sink, confirmation).await);
        }
        assert!(failures.iter().any(|f| f.contains("replaced") && f.contains("unknown producer id")), "{failures:?}");
        assert!(failed.client().native_ptr() != sink.slot.get().client().native_ptr());
    }
}
