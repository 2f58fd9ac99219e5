//! Exactly-once transactions ([`open_transactional`]): one transactional producer serves the
//! scored sink, every named Kafka sink of the `[[route]]` rules and the dead-letter sink, and
//! each batch is one transaction: `begin_transaction`, the outputs, `send_offsets_to_transaction`
//! with the inputs' next offsets and the consumer's group metadata, `commit_transaction`.
//!
//! Errors follow librdkafka's classes ([`Transactions`]): a retriable one calls the same step
//! again (a few times), an abortable one has the pipeline abort the transaction and replay the
//! batch, and a fatal one (fenced by a newer instance with the same `transactional.id`, a refused
//! abort, a retriable error past the bound) stops the worker; its inputs are re-read from the
//! last committed offsets by whoever owns the partitions next. So does an offset commit refused
//! because the consumer is no longer a member of its group (its session expired, e.g. through a
//! broker outage): replaying the batch could never commit, and its partitions may be someone
//! else's; the transaction is aborted and the worker stops, for a restart to resume from the
//! committed offsets. A commit refused for a stale generation (a rebalance completed while it
//! was on its way) is aborted and replayed.
//!
//! Rebalances: a transaction commits only inputs of partitions still assigned under the
//! assignment they were read in, and a revocation waits for a commit in progress
//! ([`crate::kafka::ownership`]); the pipeline leaves the inputs of revoked partitions out of the
//! replay ([`BatchCommit::owned`]). Exactly-once holds across rebalances as across crashes.
//!
//! A transaction the broker aborted because it outlived `transaction.timeout.ms` (the worker
//! stalled: paused, starved of CPU) fences the producer for good, exactly as a newer instance
//! would. When the failed transaction had been open longer than that timeout, the producer is
//! replaced by a new one with the same `transactional.id` and the batch replayed
//! ([`BatchCommit::recover`]); otherwise a newer instance is taken to own the id and the worker
//! stops. Every error keeps librdkafka's reason as its source.
//!
//! Each transaction that ends is counted here, once, by its outcome:
//! `scorestream_kafka_transactions_total{outcome="committed"|"aborted"}`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{message_max_bytes, producer, KafkaSink, Producer_, Slot, KIND};
use crate::sink::KafkaSinkConfig;
use crate::kafka::ownership::Ownership;
use crate::kafka::ErrorContext;
use crate::metrics::Metrics;
use crate::sink::{BatchCommit, Sink, SinkContext, SinkError};
use crate::record::Origin;

/// Transaction steps wait at most this long per call.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// librdkafka's default `transaction.timeout.ms`.
const DEFAULT_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// The consumer's group metadata at commit time (see `KafkaSource::group_metadata`).
pub type GroupMetadata = Arc<dyn Fn() -> Option<ConsumerGroupMetadata> + Send + Sync>;

/// What the transactions need of the consumer whose offsets they commit.
#[derive(Clone)]
pub struct ConsumerLink {
    /// Its group metadata (member id, generation), read at each commit.
    pub metadata: GroupMetadata,
    /// The assignment epochs of its partitions (`KafkaSource::open_transactional`).
    pub ownership: Arc<Ownership>,
}

/// The sinks and the transaction hook of `delivery = "exactly_once"`.
pub struct TransactionalSinks {
    pub scored: Arc<dyn Sink>,
    pub dead_letter: Arc<dyn Sink>,
    /// One per named Kafka sink, in the order given.
    pub named: Vec<Arc<dyn Sink>>,
    pub commit: Arc<dyn BatchCommit>,
}

/// Open the sinks of `delivery = "exactly_once"` on one transactional producer
/// (`transactional.id` from the sink's config, else `scorestream-<hostname>`; the sink's options
/// apply, the dead letter and the named sinks only name their topics). The transactions count
/// their outcomes in `ctx`'s metrics.
pub async fn open_transactional(
    sink: &KafkaSinkConfig,
    dead_letter: &KafkaSinkConfig,
    named: &[&KafkaSinkConfig],
    consumer: ConsumerLink,
    ctx: SinkContext,
) -> Result<TransactionalSinks, SinkError> {
    let id = sink.transactional_id.clone().unwrap_or_else(crate::kafka::default_transactional_id);
    let mut topics = vec![sink.topic.as_str(), dead_letter.topic.as_str()];
    topics.extend(named.iter().map(|n| n.topic.as_str()));
    let (producer, config) = producer(sink, &[("transactional.id", &id)], &topics).await?;
    let init = producer.clone();
    tokio::task::spawn_blocking(move || init.init_transactions(STEP_TIMEOUT))
        .await
        .map_err(|e| SinkError::Open { kind: KIND, message: "init_transactions task failed".into(), source: Some(Box::new(e)) })?
        .map_err(|e| SinkError::Open {
            kind: KIND,
            message: format!("cannot initialise transactions for transactional.id {id:?}"),
            source: Some(Box::new(e)),
        })?;
    tracing::info!(transactional_id = %id, "exactly-once: transactions initialised");
    let max_message_bytes = message_max_bytes(sink);
    let transaction_timeout = config
        .get("transaction.timeout.ms")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TRANSACTION_TIMEOUT);
    // One slot: a replaced producer serves every sink at once.
    let slot = Arc::new(Slot { current: std::sync::RwLock::new(producer), config: None });
    let on_slot = |topic: &str| -> Arc<dyn Sink> { Arc::new(KafkaSink::on_slot(slot.clone(), topic, max_message_bytes)) };
    Ok(TransactionalSinks {
        scored: on_slot(&sink.topic),
        dead_letter: on_slot(&dead_letter.topic),
        named: named.iter().map(|n| on_slot(&n.topic)).collect(),
        commit: Arc::new(Transactions {
            slot: slot.clone(),
            config,
            consumer,
            timeout: STEP_TIMEOUT,
            transaction_timeout,
            begun: Mutex::new(None),
            metrics: ctx.metrics,
        }),
    })
}

/// Exactly-once transactions over the producer shared by every sink of the worker.
///
/// Errors follow librdkafka's classes: a retriable one calls the same step again (bounded), an
/// abortable one is returned as [`SinkError::Transaction`] (the pipeline aborts and replays the
/// batch), a fatal one, or one still failing after the bound, as [`SinkError::Fatal`]. An abort
/// that fails with anything but a retriable error is fatal too: the producer's state is then
/// unknown, and only a new producer is sure to be in a clean one.
pub struct Transactions {
    slot: Arc<Slot>,
    /// How to make a new transactional producer (same `transactional.id`).
    config: ClientConfig,
    consumer: ConsumerLink,
    /// How long one call of a step may block.
    timeout: Duration,
    /// The producer's `transaction.timeout.ms`: the broker aborts a transaction open longer.
    transaction_timeout: Duration,
    /// When the current (or last) transaction began.
    begun: Mutex<Option<Instant>>,
    /// Where committed and aborted transactions are counted.
    metrics: Arc<Metrics>,
}

/// The offsets to commit for a batch: per input partition, the highest offset + 1.
fn next_offsets(inputs: &[Origin]) -> Result<TopicPartitionList, KafkaError> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for origin in inputs {
        if let Origin::Kafka { topic, partition, offset, .. } = origin {
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
    /// Abort the transaction and replay the batch in a new one (this includes an offset commit
    /// refused for a stale generation: the consumer learns the new one by itself).
    Abortable,
    /// The producer cannot go on (fenced, or a state librdkafka gives no way out of).
    Fatal,
    /// The consumer is no longer a member of its group (its session expired, e.g. through a
    /// broker outage): replaying the batch can never commit, and the partitions may be someone
    /// else's by now. Fatal: the next process resumes from the last committed offsets.
    GroupLost,
}

fn classify(e: &KafkaError) -> Class {
    match e {
        KafkaError::Transaction(t) if t.is_fatal() => Class::Fatal,
        KafkaError::Transaction(t) if matches!(t.code(), RDKafkaErrorCode::UnknownMemberId | RDKafkaErrorCode::FencedInstanceId) => {
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
                "{step} failed: the consumer lost its group membership (session expired); \
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

/// Call a transaction step (blocking); a retriable error calls it again, at most
/// [`STEP_ATTEMPTS`] times in all. `abort` marks the abort step: any error of it but a retriable
/// one is fatal (the producer's state is unknown then).
fn call(
    step: &'static str,
    abort: bool,
    producer: &Producer_,
    timeout: Duration,
    f: impl Fn(&Producer_, Duration) -> Result<(), KafkaError>,
) -> Result<(), SinkError> {
    let mut pause = FIRST_RETRY_PAUSE;
    let mut attempt = 1;
    loop {
        let Err(e) = f(producer, timeout) else { return Ok(()) };
        let class = match classify(&e) {
            Class::Abortable if abort => Class::Fatal,
            class => class,
        };
        if class == Class::GroupLost {
            // The producer itself is sound: abort, so that readers are not held back by an open
            // transaction until it times out.
            if let Err(abort) = producer.abort_transaction(timeout) {
                tracing::warn!(error = %crate::kafka::reason(abort), "cannot abort the transaction of a lost group member");
            }
        }
        if class != Class::Retriable || attempt == STEP_ATTEMPTS {
            return Err(txn_err(step, class, e));
        }
        tracing::warn!(step, attempt, error = %crate::kafka::reason(e), "transaction step failed (retriable); calling it again");
        std::thread::sleep(pause);
        pause *= 2;
        attempt += 1;
    }
}

/// The Kafka inputs of `inputs` that are not (or no longer) this worker's, as `topic/partition`.
fn revoked(ownership: &crate::kafka::ownership::Owned, inputs: &[Origin]) -> Vec<String> {
    let mut lost: Vec<String> = inputs
        .iter()
        .filter_map(|o| match o {
            Origin::Kafka { topic, partition, epoch, .. } if !ownership.owns(topic, *partition, *epoch) => {
                Some(format!("{topic}/{partition}"))
            }
            _ => None,
        })
        .collect();
    lost.sort();
    lost.dedup();
    lost
}

impl Transactions {
    /// Run `f` on the current producer off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(Producer_, Duration) -> Result<T, SinkError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let (producer, timeout) = (self.slot.get(), self.timeout);
        tokio::task::spawn_blocking(move || f(producer, timeout)).await.map_err(|e| SinkError::Fatal {
            kind: KIND,
            message: format!("{what} task failed"),
            source: Some(Box::new(e)),
        })?
    }

    /// A new producer with the same `transactional.id`, transactions initialised (which ends
    /// what the broker still holds of the old one).
    async fn new_producer(&self) -> Result<Producer_, SinkError> {
        let (config, timeout) = (self.config.clone(), self.timeout);
        tokio::task::spawn_blocking(move || {
            let producer: Producer_ = config
                .create_with_context(ErrorContext::default())
                .map_err(|e| SinkError::Fatal { kind: KIND, message: "cannot create a new producer".into(), source: Some(Box::new(e)) })?;
            producer.init_transactions(timeout).map_err(|e| SinkError::Fatal {
                kind: KIND,
                message: "cannot initialise transactions on a new producer".into(),
                source: Some(crate::kafka::reason(e)),
            })?;
            Ok(producer)
        })
        .await
        .map_err(|e| SinkError::Fatal { kind: KIND, message: "producer task failed".into(), source: Some(Box::new(e)) })?
    }
}

impl BatchCommit for Transactions {
    fn begin(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        *self.begun.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        // Not blocking: a retriable error here is retried by calling it again at once.
        let producer = self.slot.get();
        let mut begun = producer.begin_transaction();
        for _ in 1..STEP_ATTEMPTS {
            match &begun {
                Err(e) if classify(e) == Class::Retriable => begun = producer.begin_transaction(),
                _ => break,
            }
        }
        futures::future::ready(begun.map_err(|e| txn_err("begin_transaction", classify(&e), e))).boxed()
    }

    fn commit<'a>(&'a self, inputs: &'a [Origin]) -> BoxFuture<'a, Result<(), SinkError>> {
        async move {
            let offsets = next_offsets(inputs).map_err(|e| txn_err("listing the input offsets", Class::Fatal, e))?;
            let (consumer, inputs) = (self.consumer.clone(), inputs.to_vec());
            self.blocking("commit", move |producer, timeout| {
                // Held until the commit ends: a revocation waits for it (see `ownership`).
                let owned = consumer.ownership.lock();
                let lost = revoked(&owned, &inputs);
                if !lost.is_empty() {
                    return Err(SinkError::Transaction {
                        kind: KIND,
                        message: format!("partitions {} were revoked while inputs of theirs were in flight", lost.join(", ")),
                        source: None,
                    });
                }
                if offsets.count() > 0 {
                    let group = (consumer.metadata)().ok_or_else(|| SinkError::Transaction {
                        kind: KIND,
                        message: "the consumer has no group metadata yet".into(),
                        source: None,
                    })?;
                    call("send_offsets_to_transaction", false, &producer, timeout, |p, timeout| {
                        p.send_offsets_to_transaction(&offsets, &group, timeout)
                    })?;
                }
                call("commit_transaction", false, &producer, timeout, |p, timeout| p.commit_transaction(timeout))?;
                drop(owned);
                Ok(())
            })
            .await?;
            self.metrics.kafka_transactions.with_label_values(&["committed"]).inc();
            Ok(())
        }
        .boxed()
    }

    fn abort(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async move {
            self.blocking("abort", |producer, timeout| call("abort_transaction", true, &producer, timeout, |p, t| p.abort_transaction(t)))
                .await?;
            self.metrics.kafka_transactions.with_label_values(&["aborted"]).inc();
            Ok(())
        }
        .boxed()
    }

    fn owned(&self, inputs: &[Origin]) -> Vec<bool> {
        let owned = self.consumer.ownership.lock();
        inputs
            .iter()
            .map(|o| match o {
                Origin::Kafka { topic, partition, epoch, .. } => owned.owns(topic, *partition, *epoch),
                _ => true,
            })
            .collect()
    }

    fn recover(&self) -> BoxFuture<'_, bool> {
        async move {
            let failed = self.slot.get();
            let Some((code, reason)) = failed.client().fatal_error() else { return false };
            let open_for = self.begun.lock().unwrap_or_else(|e| e.into_inner()).map(|t| t.elapsed()).unwrap_or_default();
            if open_for < self.transaction_timeout {
                // Fenced within the timeout: a newer instance owns the transactional.id.
                return false;
            }
            tracing::error!(
                cause = %format!("{reason} ({code:?})"),
                ?open_for,
                transaction_timeout = ?self.transaction_timeout,
                "the transaction outlived transaction.timeout.ms and the broker aborted it: \
                 replaying the batch on a new producer"
            );
            match self.new_producer().await {
                Ok(producer) => {
                    self.slot.replace(producer);
                    *self.begun.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    true
                }
                Err(e) => {
                    tracing::error!(error = %crate::error::Chain(&e), "cannot replace the fenced producer");
                    false
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Outgoing;

    #[test]
    fn a_batch_commits_the_next_offset_of_each_input_partition() {
        let o = |t: &str, p, offset| Origin::Kafka { topic: t.into(), partition: p, offset, epoch: 1 };
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
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", cluster.bootstrap_servers()).set("transactional.id", "scorestream-unit");
        let producer: Producer_ = config.create_with_context(ErrorContext::default()).unwrap();
        producer.init_transactions(Duration::from_secs(10)).unwrap();
        let slot = Arc::new(Slot { current: std::sync::RwLock::new(producer), config: None });
        let sink = KafkaSink::on_slot(slot.clone(), "out", super::super::DEFAULT_MESSAGE_MAX_BYTES);
        let consumer = ConsumerLink { metadata: Arc::new(|| None), ownership: Arc::default() };
        let txns = Transactions {
            slot,
            config,
            consumer,
            timeout,
            transaction_timeout: DEFAULT_TRANSACTION_TIMEOUT,
            begun: Mutex::new(None),
            metrics: Arc::new(Metrics::new().unwrap()),
        };
        (cluster, txns, sink)
    }

    /// `scorestream_kafka_transactions_total` by outcome: (committed, aborted).
    fn counted(txns: &Transactions) -> (u64, u64) {
        let count = |outcome| txns.metrics.kafka_transactions.with_label_values(&[outcome]).get();
        (count("committed"), count("aborted"))
    }

    fn outgoing() -> Outgoing {
        super::super::tests::outgoing()
    }

    fn chain(e: &SinkError) -> String {
        super::super::tests::chain(e)
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
        assert_eq!(counted(&txns), (1, 0), "a commit called again is one committed transaction");
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
        assert_eq!(counted(&txns), (0, 0), "a commit that failed is not counted as committed");
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
        assert_eq!(counted(&txns), (0, 1), "the failed transaction is counted once, as aborted");
        txns.begin().await.unwrap();
        sink.publish(outgoing()).await.unwrap().await.unwrap();
        txns.commit(&[]).await.unwrap();
        assert_eq!(counted(&txns), (1, 1), "its replay is counted once, as committed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_abort_or_begin_is_fatal_instead_of_spinning() {
        let (_cluster, txns, _sink) = transactions(Duration::from_secs(5));
        // No transaction is open: librdkafka refuses the abort with a state error, neither
        // retriable nor abortable. Aborting and beginning again would never get anywhere.
        let e = txns.abort().await.unwrap_err();
        assert!(matches!(e, SinkError::Fatal { .. }), "{}", chain(&e));
        assert!(chain(&e).contains("abort_transaction failed"), "{}", chain(&e));
        assert_eq!(counted(&txns), (0, 0), "a refused abort is not counted as aborted");
        txns.begin().await.unwrap();
        let e = txns.begin().await.unwrap_err();
        assert!(matches!(e, SinkError::Fatal { .. }), "{}", chain(&e));
        assert!(chain(&e).contains("begin_transaction failed: "), "{}", chain(&e));
    }

    /// Transactions whose consumer belongs to group `g` on `cluster`, owning partition 0 of `in`.
    fn with_group(txns: Transactions, cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>) -> Transactions {
        let consumer: rdkafka::consumer::BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", cluster.bootstrap_servers()).set("group.id", "g").create().unwrap();
        let metadata = rdkafka::consumer::Consumer::group_metadata(&consumer);
        assert!(metadata.is_some());
        let consumer = std::sync::Mutex::new(consumer);
        let metadata: GroupMetadata = Arc::new(move || rdkafka::consumer::Consumer::group_metadata(&*consumer.lock().unwrap()));
        txns.consumer.ownership.assign(&[("in".into(), 0)]);
        Transactions { consumer: ConsumerLink { metadata, ownership: txns.consumer.ownership.clone() }, ..txns }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_offset_commit_refused_for_a_stale_generation_is_replayed_and_one_for_a_lost_member_stops() {
        let (cluster, txns, sink) = transactions(Duration::from_secs(10));
        cluster.create_topic("in", 1, 1).unwrap();
        let txns = with_group(txns, &cluster);
        let input = [Origin::Kafka { topic: "in".into(), partition: 0, offset: 3, epoch: txns.consumer.ownership.epoch("in", 0) }];
        // A rebalance completed while the commit was on its way: abort and replay.
        cluster.request_errors(RDKafkaApiKey::TxnOffsetCommit, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION]);
        txns.begin().await.unwrap();
        sink.publish(outgoing()).await.unwrap().await.unwrap();
        let e = txns.commit(&input).await.unwrap_err();
        assert!(matches!(e, SinkError::Transaction { .. }), "{}", chain(&e));
        assert!(chain(&e).contains("send_offsets_to_transaction failed"), "{}", chain(&e));
        txns.abort().await.unwrap();
        // The member is gone (its session expired): stop, naming it.
        cluster.request_errors(RDKafkaApiKey::TxnOffsetCommit, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID]);
        txns.begin().await.unwrap();
        sink.publish(outgoing()).await.unwrap().await.unwrap();
        let e = txns.commit(&input).await.unwrap_err();
        assert!(matches!(e, SinkError::Fatal { .. }), "{}", chain(&e));
        assert!(chain(&e).contains("lost its group membership"), "{}", chain(&e));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inputs_of_a_revoked_partition_are_not_committed_and_the_transaction_is_abortable() {
        let (_cluster, txns, sink) = transactions(Duration::from_secs(10));
        let ownership = txns.consumer.ownership.clone();
        ownership.assign(&[("in".into(), 0), ("in".into(), 1)]);
        let input = |p, offset| Origin::Kafka { topic: "in".into(), partition: p, offset, epoch: ownership.epoch("in", p) };
        let batch = [input(0, 1), input(1, 1)];
        assert_eq!(txns.owned(&batch), [true, true]);
        ownership.revoke(&[("in".into(), 1)]);
        assert_eq!(txns.owned(&batch), [true, false], "read before the revocation");
        txns.begin().await.unwrap();
        sink.publish(outgoing()).await.unwrap().await.unwrap();
        let e = txns.commit(&batch).await.unwrap_err();
        assert!(matches!(e, SinkError::Transaction { .. }), "{}", chain(&e));
        assert!(chain(&e).contains("partitions in/1 were revoked"), "{}", chain(&e));
        txns.abort().await.unwrap();
        assert!(!txns.recover().await, "nothing failed for good: nothing to replace");
    }
}
