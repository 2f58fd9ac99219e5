//! Kafka sink: an idempotent producer (`enable.idempotence = true`, so retries neither reorder
//! nor duplicate within a session); the output key is the input's key (else the event id) and
//! the input's headers are carried over (a null value stays null). A publish is confirmed by its
//! delivery report. A producer that librdkafka declares failed for good (the broker lost its
//! state: `UnknownProducerId` with messages in flight) is replaced by a new one, with an error
//! line naming the cause; the messages it failed are published again by the pipeline.
//!
//! Exactly-once ([`open_exactly_once`]): one transactional producer serves both the scored and
//! the dead-letter topic, and each batch is one transaction: `begin_transaction`, the outputs,
//! `send_offsets_to_transaction` with the inputs' next offsets and the consumer's group
//! metadata, `commit_transaction`. Errors follow librdkafka's classes ([`Transactions`]): a
//! retriable one calls the same step again (a few times), an abortable one has the pipeline
//! abort the transaction and replay the batch, and a fatal one (fenced by a newer instance with
//! the same `transactional.id`, a refused abort, a retriable error past the bound) stops the
//! worker; its inputs are re-read from the last committed offsets by whoever owns the
//! partitions next. So does an offset commit refused because the consumer is no longer the
//! group member it was (its session expired, e.g. through a broker outage): replaying the batch
//! could never commit, and its partitions may be someone else's; the transaction is aborted and
//! the worker stops, for a restart to resume from the committed offsets. A rebalance that
//! revokes a partition while its batch is in flight can replay that batch: exactly-once holds
//! across crashes and restarts, at-least-once across such rebalances. Every error keeps librdkafka's reason as its source.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{BatchCommit, Confirmation, Outgoing, Sink, SinkContext, SinkError};
use crate::config::brokers::KafkaSinkConfig;
use crate::kafka::{check_reachable, client_config, ClientError, ErrorContext};
use crate::source::Origin;

const KIND: &str = "kafka";

/// Transaction steps wait at most this long (librdkafka's `transaction.timeout.ms` is 60 s).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

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
        Self {
            slot: Arc::new(Slot { current: std::sync::RwLock::new(producer), config }),
            topic: topic.to_owned(),
            max_message_bytes,
        }
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

/// The consumer's group metadata at commit time (see `KafkaSource::group_metadata`).
pub type GroupMetadata = Arc<dyn Fn() -> Option<ConsumerGroupMetadata> + Send + Sync>;

/// Exactly-once transactions over the producer shared by the scored and dead-letter sinks.
///
/// Errors follow librdkafka's classes: a retriable one calls the same step again (bounded), an
/// abortable one is returned as [`SinkError::Transaction`] (the pipeline aborts and replays the
/// batch), a fatal one, or one still failing after the bound, as [`SinkError::Fatal`]. An abort
/// that fails with anything but a retriable error is fatal too: the producer's state is then
/// unknown, and only a new producer (a restart) is sure to be in a clean one.
pub struct Transactions {
    producer: Producer_,
    group: GroupMetadata,
    /// How long one call of a step may block.
    timeout: Duration,
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
    let (producer, _) = producer(sink, &[("transactional.id", &id)], &[&sink.topic, &dead_letter.topic]).await?;
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
    let scored = Arc::new(KafkaSink::new(producer.clone(), None, &sink.topic, max_message_bytes));
    let dead = Arc::new(KafkaSink::new(producer.clone(), None, &dead_letter.topic, max_message_bytes));
    Ok((scored, dead, Arc::new(Transactions { producer, group, timeout: TRANSACTION_TIMEOUT })))
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

/// What to do after a transaction step failed, after librdkafka's transactional error classes
/// (`rd_kafka_error_is_retriable`, `_txn_requires_abort`, `_is_fatal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Call the same step again (e.g. `commit_transaction` timed out: it goes on in the
    /// background, and calling it again resumes it).
    Retriable,
    /// Abort the transaction and replay the batch in a new one.
    Abortable,
    /// The producer cannot go on (fenced, or a state librdkafka gives no way out of).
    Fatal,
    /// The consumer is no longer the group member whose offsets the transaction would commit
    /// (its session expired, e.g. through a broker outage, or the group moved on): replaying
    /// the batch can never commit, and the partitions may be someone else's by now. Fatal: the
    /// next process resumes from the last committed offsets.
    GroupLost,
}

fn classify(e: &KafkaError) -> Class {
    match e {
        KafkaError::Transaction(t) if t.is_fatal() => Class::Fatal,
        KafkaError::Transaction(t)
            if matches!(t.code(), RDKafkaErrorCode::UnknownMemberId | RDKafkaErrorCode::IllegalGeneration | RDKafkaErrorCode::FencedInstanceId) =>
        {
            Class::GroupLost
        }
        KafkaError::Transaction(t) if t.is_retriable() => Class::Retriable,
        KafkaError::Transaction(t) if t.txn_requires_abort() => Class::Abortable,
        // Neither retriable nor abortable (`_STATE`, `_CONFLICT`, ...): librdkafka's examples
        // treat these as unrecoverable, and repeating begin/abort would only spin.
        _ => Class::Fatal,
    }
}

/// A transaction step's error as the pipeline handles it: abortable → `Transaction` (abort and
/// replay the batch); anything else that reaches the pipeline → `Fatal`.
fn txn_err(step: &str, class: Class, e: KafkaError) -> SinkError {
    let source = Some(crate::kafka::reason(e));
    match class {
        Class::Abortable => SinkError::Transaction { kind: KIND, message: format!("{step} failed"), source },
        Class::Retriable => SinkError::Fatal {
            kind: KIND,
            message: format!("{step} still failed after {STEP_ATTEMPTS} attempts"),
            source,
        },
        Class::Fatal => SinkError::Fatal { kind: KIND, message: format!("{step} failed"), source },
        Class::GroupLost => SinkError::Fatal {
            kind: KIND,
            message: format!(
                "{step} failed: the consumer lost its group membership (session expired or group rebalanced); \
                 stopping so that a restart resumes exactly-once from the last committed offsets"
            ),
            source,
        },
    }
}

/// How often a step that failed with a retriable error is called (in all), and the pause
/// before the first retry (doubled each time).
const STEP_ATTEMPTS: u32 = 4;
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(100);

impl Transactions {
    /// Run a blocking transaction step off the async threads; a retriable error calls the same
    /// step again, at most [`STEP_ATTEMPTS`] times in all. `abort` marks the abort step: any
    /// error of it but a retriable one is fatal (the producer's state is unknown then).
    async fn step(
        &self,
        step: &'static str,
        abort: bool,
        f: impl Fn(&Producer_, Duration) -> Result<(), KafkaError> + Clone + Send + 'static,
    ) -> Result<(), SinkError> {
        let mut pause = FIRST_RETRY_PAUSE;
        let mut attempt = 1;
        loop {
            let (producer, timeout, f) = (self.producer.clone(), self.timeout, f.clone());
            let result = tokio::task::spawn_blocking(move || f(&producer, timeout)).await.map_err(|e| SinkError::Fatal {
                kind: KIND,
                message: format!("{step} task failed"),
                source: Some(Box::new(e)),
            })?;
            let Err(e) = result else { return Ok(()) };
            let class = match classify(&e) {
                Class::Abortable if abort => Class::Fatal,
                class => class,
            };
            if class == Class::GroupLost {
                // The producer itself is sound: abort, so that readers are not held back by an
                // open transaction until it times out.
                let (producer, timeout) = (self.producer.clone(), self.timeout);
                if let Ok(Err(abort)) = tokio::task::spawn_blocking(move || producer.abort_transaction(timeout)).await {
                    tracing::warn!(error = %crate::kafka::reason(abort), "cannot abort the transaction of a lost group member");
                }
            }
            if class != Class::Retriable || attempt == STEP_ATTEMPTS {
                return Err(txn_err(step, class, e));
            }
            tracing::warn!(step, attempt, error = %crate::kafka::reason(e), "transaction step failed (retriable); calling it again");
            tokio::time::sleep(pause).await;
            pause *= 2;
            attempt += 1;
        }
    }
}

impl BatchCommit for Transactions {
    fn begin(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        // Not blocking: a retriable error here is retried by calling it again at once.
        let mut begun = self.producer.begin_transaction();
        for _ in 1..STEP_ATTEMPTS {
            match &begun {
                Err(e) if classify(e) == Class::Retriable => begun = self.producer.begin_transaction(),
                _ => break,
            }
        }
        futures::future::ready(begun.map_err(|e| txn_err("begin_transaction", classify(&e), e))).boxed()
    }

    fn commit<'a>(&'a self, inputs: &'a [Origin]) -> BoxFuture<'a, Result<(), SinkError>> {
        async move {
            let offsets = next_offsets(inputs).map_err(|e| txn_err("listing the input offsets", Class::Fatal, e))?;
            if offsets.count() > 0 {
                let group = (self.group)().ok_or_else(|| SinkError::Transaction {
                    kind: KIND,
                    message: "the consumer has no group metadata yet".into(),
                    source: None,
                })?;
                let group = Arc::new(group);
                self.step("send_offsets_to_transaction", false, move |p, timeout| {
                    p.send_offsets_to_transaction(&offsets, &group, timeout)
                })
                .await?;
            }
            self.step("commit_transaction", false, |p, timeout| p.commit_transaction(timeout)).await
        }
        .boxed()
    }

    fn abort(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        self.step("abort_transaction", true, |p, timeout| p.abort_transaction(timeout)).boxed()
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

    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    /// A mock cluster with topic `out`, and transactions over a fresh transactional producer whose
    /// steps wait at most `timeout` per call.
    fn transactions(timeout: Duration) -> (MockCluster<'static, rdkafka::producer::DefaultProducerContext>, Transactions, KafkaSink) {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("out", 1, 1).unwrap();
        let producer: Producer_ = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("transactional.id", "scorestream-unit")
            .create_with_context(ErrorContext::default())
            .unwrap();
        producer.init_transactions(Duration::from_secs(10)).unwrap();
        let sink = KafkaSink::new(producer.clone(), None, "out", DEFAULT_MESSAGE_MAX_BYTES);
        (cluster, Transactions { producer, group: Arc::new(|| None), timeout }, sink)
    }

    fn outgoing() -> Outgoing {
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
    fn chain(e: &SinkError) -> String {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        text
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_that_times_out_is_called_again_and_commits() {
        let (cluster, txns, sink) = transactions(Duration::from_millis(150));
        // The coordinator is busy for longer than one call may wait: commit_transaction returns a
        // retriable error, and calling it again resumes the commit.
        cluster.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 2]);
        txns.begin().await.unwrap();
        sink.publish(outgoing()).await.unwrap().await.unwrap();
        txns.commit(&[]).await.unwrap();
        txns.begin().await.expect("the next transaction starts");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_still_failing_after_the_bound_is_fatal_with_its_reason() {
        let (cluster, txns, sink) = transactions(Duration::from_millis(100));
        cluster.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 200]);
        txns.begin().await.unwrap();
        sink.publish(outgoing()).await.unwrap().await.unwrap();
        let e = txns.commit(&[]).await.unwrap_err();
        assert!(matches!(e, SinkError::Fatal { .. }), "{e:?}");
        let text = chain(&e);
        assert!(text.contains(&format!("commit_transaction still failed after {STEP_ATTEMPTS} attempts")), "{text}");
        assert!(text.contains("timed out") || text.contains("Timed out"), "librdkafka's reason: {text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abortable_error_asks_for_abort_and_replay_and_the_next_transaction_commits() {
        let (cluster, txns, sink) = transactions(Duration::from_secs(10));
        cluster.request_errors(RDKafkaApiKey::AddPartitionsToTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED]);
        txns.begin().await.unwrap();
        let delivered = match sink.publish(outgoing()).await {
            Ok(confirmation) => confirmation.await,
            Err(e) => Err(e),
        };
        let e = match delivered {
            Err(e) => e,
            Ok(()) => txns.commit(&[]).await.unwrap_err(),
        };
        let aborted = match e {
            SinkError::Transaction { .. } | SinkError::Publish { .. } => txns.abort().await,
            e => panic!("not abortable: {}", chain(&e)),
        };
        aborted.unwrap();
        txns.begin().await.unwrap();
        sink.publish(outgoing()).await.unwrap().await.unwrap();
        txns.commit(&[]).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_abort_or_begin_is_fatal_instead_of_spinning() {
        let (_cluster, txns, _sink) = transactions(Duration::from_secs(5));
        // No transaction is open: librdkafka refuses the abort with a state error, neither
        // retriable nor abortable. Aborting and beginning again would never get anywhere.
        let e = txns.abort().await.unwrap_err();
        assert!(matches!(e, SinkError::Fatal { .. }), "{}", chain(&e));
        assert!(chain(&e).contains("abort_transaction failed"), "{}", chain(&e));
        txns.begin().await.unwrap();
        let e = txns.begin().await.unwrap_err();
        assert!(matches!(e, SinkError::Fatal { .. }), "{}", chain(&e));
        assert!(chain(&e).contains("begin_transaction failed: "), "{}", chain(&e));
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
