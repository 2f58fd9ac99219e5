//! Kafka source: a consumer group member whose offsets move only over delivered inputs.
//!
//! Delivery (after rust-rdkafka's `at_least_once.rs`): `enable.auto.offset.store = false`, and
//! an input's offset is stored only when the pipeline acks its record (its output was
//! acknowledged by the broker), in order per partition: acks complete out of order, so the
//! stored offset advances only over the contiguous prefix of acked records. A committer task
//! commits what is stored as soon as it moves (one commit at a time), and [`Source::next`]
//! hands out a record only while fewer than `max_inflight_events` records are consumed and not
//! yet committed, so a crash replays at most `max_inflight_events` inputs (while commits
//! succeed: a failing commit, e.g. during a rebalance, lifts the wait so that the consumer keeps
//! being served).
//!
//! Rebalances: a partition about to be revoked has its stored offsets committed in the
//! revocation callback; its trackers are then dropped, so a late ack for it stores nothing and
//! the new owner re-reads from the last committed offset (duplicates possible, losses not).
//!
//! Shutdown: once the pipeline stops fetching ([`Source::drain`]), the assigned partitions are
//! paused and a task keeps polling the consumer, so rebalances (another worker joining or
//! leaving) still complete while the in-flight records drain. [`Source::close`] commits the
//! final offsets (retrying while a rebalance is in progress), then leaves the group.
//!
//! Exactly-once (`KafkaSource::open_transactional`): nothing is committed by the consumer and
//! acks do nothing; the sink commits each batch's input offsets inside its producer
//! transaction, with this consumer's group metadata ([`KafkaSource::group_metadata`]). Each
//! record carries the epoch of its partition's assignment ([`Ownership`]): the
//! revocation callback ends a partition's epoch, after any commit in progress, so that inputs
//! read before a revocation are never committed (see [`crate::kafka::ownership`]).
//!
//! Connection (`/readyz`): [`connection`] asks the brokers for a subscribed topic's metadata
//! every second; `connected` turns false when none answers and true again when one does.
//!
//! `scorestream_consumer_lag{topic,partition}`: for exactly the assigned partitions, from
//! librdkafka's statistics: the end offset (last stable offset under `read_committed`) minus
//! the consumer's position, else the committed offset, else the partition's start offset.

mod connection;
mod offsets;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Statistics};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use self::offsets::{commit_loop, Shared};
use super::{KafkaSourceConfig, Source, SourceContext, SourceError};
use crate::kafka::ownership::Ownership;
use crate::kafka::{check_reachable, client_config, reason};
use crate::metrics::Metrics;
use crate::record::{Ack, AckError, AckHandle, Origin, Record};

const KIND: &str = "kafka";

/// How long closing waits for the final commit (retried while a rebalance is in progress) and
/// for the group to take the partitions back.
const CLOSE_ATTEMPTS: u32 = 50;
const CLOSE_PAUSE: Duration = Duration::from_millis(200);

/// Rebalance, statistics and error callbacks.
pub struct Context {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    /// Exactly-once: the consumer commits nothing itself; the assignment epochs.
    ownership: Option<Arc<Ownership>>,
    /// `isolation.level = read_committed`: lag is measured to the last stable offset.
    read_committed: bool,
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka consumer error");
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka::log_line(level, facility, message);
    }

    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                let offsets = offsets::PartitionOffsets {
                    position: part.app_offset,
                    committed: part.committed_offset,
                    start: part.lo_offset,
                    high: part.hi_offset,
                    stable: part.ls_offset,
                };
                if let Some(lag) = offsets.lag(self.read_committed) {
                    // Only for assigned partitions, checked under the lock revocation takes.
                    self.shared.if_assigned(topic, *p, || {
                        self.metrics.consumer_lag.with_label_values(&[topic.as_str(), &p.to_string()]).set(lag);
                    });
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let partitions: Vec<String> = tpl.elements().iter().map(|e| format!("{}/{}", e.topic(), e.partition())).collect();
        tracing::info!(?partitions, "Kafka partitions revoked");
        if let Some(ownership) = &self.ownership {
            // Before the member rejoins (so before another can own them): wait for a commit in
            // progress, then end the partitions' epochs. Their inputs still in flight are left
            // out of every later transaction.
            let revoked: Vec<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
            ownership.revoke(&revoked);
            return;
        }
        if consumer.assignment_lost() {
            return;
        }
        // What is confirmed so far is committed before the partitions go to another member.
        let snapshot = self.shared.to_commit();
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => self.shared.committed(&snapshot),
            Err(e) => tracing::warn!(error = %reason(e), "cannot commit the offsets of the revoked partitions"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions: Vec<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
                tracing::info!(?partitions, "Kafka partitions assigned");
                if let Some(ownership) = &self.ownership {
                    ownership.assign(&partitions);
                }
                if self.shared.assign(&partitions) {
                    // Draining: the new partitions are only held until the group takes them back.
                    if let Err(e) = consumer.pause(tpl) {
                        tracing::warn!(error = %e, "cannot pause the partitions assigned while draining");
                    }
                }
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements() {
                    self.shared.revoke(e.topic(), e.partition(), || {
                        let _ = self.metrics.consumer_lag.remove_label_values(&[e.topic(), &e.partition().to_string()]);
                    });
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

type Consumer_ = StreamConsumer<Context>;

pub struct KafkaSource {
    consumer: Arc<Consumer_>,
    shared: Arc<Shared>,
    connected: watch::Receiver<bool>,
    /// Exactly-once: offsets are committed by the sink's transactions, not here; the
    /// assignment epochs they check.
    ownership: Option<Arc<Ownership>>,
    /// Records consumed and not yet committed, at most (at-least-once).
    max_uncommitted: usize,
    committer: Option<JoinHandle<()>>,
    /// The task that keeps `connected` up to date.
    probe: Option<JoinHandle<()>>,
    /// The task that serves the consumer once the pipeline stopped fetching.
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl KafkaSource {
    /// At-least-once: offsets stored as inputs are acked, committed as they move.
    pub async fn open(c: &KafkaSourceConfig, ctx: SourceContext) -> Result<Self, SourceError> {
        Self::open_with(c, ctx, None).await
    }

    /// Exactly-once: nothing is committed by the consumer; the producer's transactions commit
    /// the offsets with [`KafkaSource::group_metadata`], for inputs whose partitions the
    /// returned assignment epochs still count as this member's.
    pub async fn open_transactional(c: &KafkaSourceConfig, ctx: SourceContext) -> Result<(Self, Arc<Ownership>), SourceError> {
        let ownership = Arc::new(Ownership::default());
        let source = Self::open_with(c, ctx, Some(ownership.clone())).await?;
        Ok((source, ownership))
    }

    /// `ownership`: exactly-once, the assignment epochs the rebalance callbacks keep.
    async fn open_with(c: &KafkaSourceConfig, ctx: SourceContext, ownership: Option<Arc<Ownership>>) -> Result<Self, SourceError> {
        let transactional = ownership.is_some();
        let lag_interval = c.lag_interval.as_millis().max(100).to_string();
        let defaults = [
            ("group.id", c.group_id.as_str()),
            // Stored offsets are committed by this source as soon as they move (see the
            // committer), in the revocation callback and at close.
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            // Outputs of aborted transactions (of an upstream exactly-once producer) are skipped.
            ("isolation.level", "read_committed"),
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("statistics.interval.ms", lag_interval.as_str()),
        ];
        let config = client_config(&c.brokers, &defaults, &c.options, &c.option_files).map_err(open_err)?;
        let read_committed = config.get("isolation.level") != Some("read_uncommitted");
        let (probe, brokers) = (config.clone(), c.brokers.clone());
        tokio::task::spawn_blocking(move || check_reachable(&probe, &brokers, &[]))
            .await
            .map_err(|e| SourceError::Open { kind: KIND, message: "the start-up check failed".into(), source: Some(Box::new(e)) })?
            .map_err(open_err)?;
        let shared = Arc::new(Shared::default());
        let context = Context { shared: shared.clone(), metrics: ctx.metrics.clone(), ownership: ownership.clone(), read_committed };
        let consumer: Consumer_ =
            config.create_with_context(context).map_err(|e| open_err(crate::kafka::ClientError::Create(e)))?;
        let consumer = Arc::new(consumer);
        let topics: Vec<&str> = c.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| SourceError::Open {
            kind: KIND,
            message: format!("cannot subscribe to {topics:?}"),
            source: Some(Box::new(e)),
        })?;
        tracing::info!(?topics, group = %c.group_id, "Kafka consumer subscribed");
        let committer = (!transactional).then(|| tokio::spawn(commit_loop(consumer.clone(), shared.clone())));
        let (connected_tx, connected) = watch::channel(true);
        let (weak, topic) = (Arc::downgrade(&consumer), c.topics.first().cloned().unwrap_or_default());
        let probe = connection::spawn_probe(
            move || {
                let Some(consumer) = weak.upgrade() else { return false };
                let topic = Some(topic.as_str()).filter(|t| !t.is_empty());
                consumer.client().fetch_metadata(topic, connection::PROBE_TIMEOUT).is_ok()
            },
            connected_tx,
        );
        Ok(Self {
            consumer,
            shared,
            connected,
            ownership,
            max_uncommitted: ctx.max_inflight_events.max(1),
            committer,
            probe: Some(probe),
            server: None,
        })
    }

    /// The consumer's current group metadata (member id and generation), for
    /// `send_offsets_to_transaction`; `None` before the consumer has joined its group.
    pub fn group_metadata(&self) -> Arc<dyn Fn() -> Option<ConsumerGroupMetadata> + Send + Sync> {
        let consumer = self.consumer.clone();
        Arc::new(move || consumer.group_metadata())
    }

    /// Pause the assigned partitions and poll the consumer in a task of its own until close,
    /// so that rebalance callbacks are still served. Messages fetched before the pause are
    /// dropped unprocessed: their offsets are not stored, so they are read again later.
    fn serve(&mut self) {
        if self.server.is_some() {
            return;
        }
        self.shared.set_draining();
        if let Ok(tpl) = self.consumer.assignment() {
            if let Err(e) = self.consumer.pause(&tpl) {
                tracing::warn!(error = %e, "cannot pause the assigned partitions while draining");
            }
        }
        let (stop_tx, mut stop) = oneshot::channel();
        let consumer = self.consumer.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    received = consumer.recv() => if let Err(e) = received {
                        tracing::warn!(error = %e, "Kafka consumer error while draining");
                    },
                }
            }
        });
        self.server = Some((stop_tx, task));
    }

    /// The final synchronous commit, retried while the group is rebalancing (the consumer is
    /// served meanwhile, so the rebalance completes).
    async fn final_commit(&self) -> Result<(), SourceError> {
        let mut attempt = 1;
        loop {
            let consumer = self.consumer.clone();
            let snapshot = self.shared.to_commit();
            let result = tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
                .await
                .map_err(|e| AckError::new(KIND, "commit task failed", e))?;
            let e = match result {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
                    self.shared.committed(&snapshot);
                    return Ok(());
                }
                Err(e) => e,
            };
            if attempt == CLOSE_ATTEMPTS {
                let message = format!("the final commit still failed after {CLOSE_ATTEMPTS} attempts");
                return Err(AckError::new(KIND, message, reason(e)).into());
            }
            tracing::info!(error = %reason(e), attempt, "final commit refused (rebalancing?); retrying");
            tokio::time::sleep(CLOSE_PAUSE).await;
            attempt += 1;
        }
    }

    /// Leave the group: unsubscribe, and serve the consumer until its partitions are revoked
    /// (the revocation callback commits what is stored), then close it.
    async fn leave(mut self) {
        self.consumer.unsubscribe();
        for _ in 0..CLOSE_ATTEMPTS {
            if self.consumer.assignment().map(|a| a.count() == 0).unwrap_or(true) {
                break;
            }
            tokio::time::sleep(CLOSE_PAUSE / 4).await;
        }
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
        for task in [self.committer.take(), self.probe.take()].into_iter().flatten() {
            task.abort();
            let _ = task.await;
        }
        // A probe still asking the brokers holds the consumer for at most its timeout.
        for _ in 0..CLOSE_ATTEMPTS {
            if Arc::strong_count(&self.consumer) == 1 {
                break;
            }
            tokio::time::sleep(CLOSE_PAUSE / 4).await;
        }
        // Dropping the last handle closes the consumer, blocking until it has left the group.
        let consumer = self.consumer;
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    }
}

fn open_err(e: crate::kafka::ClientError) -> SourceError {
    SourceError::Open { kind: KIND, message: e.to_string(), source: e.into_source() }
}

struct KafkaAck {
    consumer: Arc<Consumer_>,
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    offset: i64,
    generation: u64,
}

impl Ack for KafkaAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), AckError>> {
        async move {
            // `None`: not the end of the acked prefix, or revoked since (the new owner re-reads it).
            let Some(next) = self.shared.ack(&self.topic, self.partition, self.generation, self.offset) else { return Ok(()) };
            // `rd_kafka_offset_store` stores `offset + 1`: hand it the last done offset.
            self.consumer.store_offset(&self.topic, self.partition, next - 1).map_err(|e| {
                AckError::new(KIND, format!("cannot store offset {next} of {}/{}", self.topic, self.partition), reason(e))
            })?;
            self.shared.stored_moved();
            Ok(())
        }
        .boxed()
    }
}

/// A header value stays `None` when the broker's is null.
fn headers(msg: &impl Message) -> Vec<(String, Option<Bytes>)> {
    msg.headers()
        .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice))).collect())
        .unwrap_or_default()
}

impl Source for KafkaSource {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Record, SourceError>>> {
        async move {
            loop {
                if self.ownership.is_none() {
                    self.shared.wait_for_room(self.max_uncommitted).await;
                }
                let msg = match self.consumer.recv().await {
                    Ok(m) => m,
                    Err(e) => {
                        // Broker trouble is retried by librdkafka; report and keep reading.
                        tracing::warn!(error = %e, "Kafka consumer error");
                        continue;
                    }
                };
                let (topic, partition, offset) = (msg.topic().to_owned(), msg.partition(), msg.offset());
                let (ack, epoch) = if let Some(ownership) = &self.ownership {
                    (AckHandle::noop(), ownership.epoch(&topic, partition))
                } else {
                    let still_assigned = || {
                        self.consumer.assignment().is_ok_and(|a| a.elements().iter().any(|e| e.topic() == topic && e.partition() == partition))
                    };
                    let Some(generation) = self.shared.hand_out(&topic, partition, offset, still_assigned) else {
                        tracing::debug!(topic, partition, offset, "record of a revoked partition left to its new owner");
                        continue;
                    };
                    let ack = AckHandle::new(KafkaAck {
                        consumer: self.consumer.clone(),
                        shared: self.shared.clone(),
                        topic: topic.clone(),
                        partition,
                        offset,
                        generation,
                    });
                    (ack, 0)
                };
                let record = Record {
                    payload: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
                    key: msg.key().map(Bytes::copy_from_slice),
                    headers: headers(&msg),
                    origin: Origin::Kafka { topic, partition, offset, epoch },
                    ack,
                };
                return Some(Ok(record));
            }
        }
        .boxed()
    }

    fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    fn drain(&mut self) {
        self.serve();
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        let mut this = *self;
        async move {
            this.serve();
            let committed = if this.ownership.is_some() { Ok(()) } else { this.final_commit().await };
            this.leave().await;
            committed
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An offset the client refuses to store (its partition is not assigned to the consumer):
    /// the ack fails naming the offset, with librdkafka's reason kept as its source (printed
    /// once), and the same error reaches the worker's error type unchanged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_ack_names_its_offset_and_keeps_the_client_reason() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("in", 1, 1).unwrap();
        let shared = Arc::new(Shared::default());
        let metrics = Arc::new(Metrics::new().unwrap());
        let context = Context { shared: shared.clone(), metrics, ownership: None, read_committed: true };
        let consumer: Consumer_ = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "g")
            .set("enable.auto.offset.store", "false")
            .create_with_context(context)
            .unwrap();
        shared.assign(&[("in".into(), 0)]);
        let generation = shared.hand_out("in", 0, 4, || true).unwrap();
        let ack = KafkaAck { consumer: Arc::new(consumer), shared, topic: "in".into(), partition: 0, offset: 4, generation };
        let e = AckHandle::new(ack).ack().await.unwrap_err();
        assert_eq!(e.to_string(), "the kafka source could not acknowledge: cannot store offset 5 of in/0");
        let reason = std::error::Error::source(&e).expect("librdkafka's reason is kept").to_string();
        let text = crate::error::Chain(&e).to_string();
        assert_eq!(text, format!("{e}: {reason}"));
        assert_eq!(text.matches(&reason).count(), 1, "{text}");
        let e = crate::pipeline::PipelineError::from(SourceError::from(e));
        assert!(matches!(&e, crate::pipeline::PipelineError::Source(SourceError::Ack(a)) if a.kind == KIND), "{e:?}");
        assert_eq!(crate::error::Chain(&e).to_string(), text);
    }
}
