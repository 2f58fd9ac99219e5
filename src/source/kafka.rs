//! Kafka source: a consumer group member whose offsets move only over delivered inputs.
//!
//! Delivery (after rust-rdkafka's `at_least_once.rs`): `enable.auto.offset.store = false`, and
//! an input's offset is stored only when the pipeline acks its record (its output was
//! acknowledged by the broker), in order per partition: acks complete out of order, so the
//! stored offset advances only over the contiguous prefix of acked records. librdkafka's
//! auto-commit then commits what is stored, and the final stored offsets are committed
//! synchronously at close. On a rebalance the revoked partitions' trackers are dropped, so a
//! late ack for a revoked partition stores nothing: the new owner re-reads from the last stored
//! offset (duplicates possible, losses not). Caveat: a crash replays everything consumed since
//! the last commit, bounded by the in-flight limit plus `auto.commit.interval.ms` of traffic.
//!
//! Exactly-once (`KafkaSource::open_transactional`): auto-commit is off and acks do nothing;
//! the sink commits each batch's input offsets inside its producer transaction, with this
//! consumer's group metadata ([`KafkaSource::group_metadata`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Statistics};
use tokio::sync::watch;

use super::{Ack, AckHandle, Origin, Record, Source, SourceContext, SourceError};
use crate::config::brokers::KafkaSourceConfig;
use crate::kafka::{check_reachable, client_config};
use crate::metrics::Metrics;

const KIND: &str = "kafka";

/// Offsets handed out per partition, and which are done. `generation` changes on every
/// assignment so acks from before a revocation are ignored.
#[derive(Default)]
struct PartitionTracker {
    generation: u64,
    /// offset → acked
    pending: BTreeMap<i64, bool>,
}

impl PartitionTracker {
    /// Mark `offset` done; returns the offset to store (next to read) when the contiguous
    /// done prefix grew.
    fn ack(&mut self, offset: i64) -> Option<i64> {
        *self.pending.get_mut(&offset)? = true;
        let mut next = None;
        while let Some((&o, &done)) = self.pending.first_key_value() {
            if !done {
                break;
            }
            self.pending.remove(&o);
            next = Some(o + 1);
        }
        next
    }
}

type Trackers = Arc<Mutex<HashMap<(String, i32), PartitionTracker>>>;

/// Rebalance, statistics and error callbacks.
pub struct Context {
    trackers: Trackers,
    metrics: Arc<Metrics>,
    generation: std::sync::atomic::AtomicU64,
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
                if *p >= 0 && part.consumer_lag >= 0 {
                    self.metrics.consumer_lag.with_label_values(&[topic.as_str(), &p.to_string()]).set(part.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Ok(mut trackers) = self.trackers.lock() else { return };
        match rebalance {
            Rebalance::Assign(tpl) => {
                let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                for e in tpl.elements() {
                    trackers.insert((e.topic().to_owned(), e.partition()), PartitionTracker { generation, pending: BTreeMap::new() });
                }
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements() {
                    trackers.remove(&(e.topic().to_owned(), e.partition()));
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

pub struct KafkaSource {
    consumer: Arc<StreamConsumer<Context>>,
    trackers: Trackers,
    connected: watch::Receiver<bool>,
    /// Exactly-once: offsets are committed by the sink's transactions, not here.
    transactional: bool,
}

impl KafkaSource {
    /// At-least-once: offsets stored as inputs are acked, committed by librdkafka.
    pub async fn open(c: &KafkaSourceConfig, ctx: SourceContext) -> Result<Self, SourceError> {
        Self::open_with(c, ctx, false).await
    }

    /// Exactly-once: nothing is committed by the consumer; see [`KafkaSource::group_metadata`].
    pub async fn open_transactional(c: &KafkaSourceConfig, ctx: SourceContext) -> Result<Self, SourceError> {
        Self::open_with(c, ctx, true).await
    }

    async fn open_with(c: &KafkaSourceConfig, ctx: SourceContext, transactional: bool) -> Result<Self, SourceError> {
        let lag_interval = c.lag_interval.as_millis().max(100).to_string();
        let defaults = [
            ("group.id", c.group_id.as_str()),
            ("enable.auto.commit", if transactional { "false" } else { "true" }),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            // Outputs of aborted transactions (of an upstream exactly-once producer) are skipped.
            ("isolation.level", "read_committed"),
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("statistics.interval.ms", lag_interval.as_str()),
        ];
        let config = client_config(&c.brokers, &defaults, &c.options, &c.option_files).map_err(open_err)?;
        let (probe, brokers) = (config.clone(), c.brokers.clone());
        tokio::task::spawn_blocking(move || check_reachable(&probe, &brokers, &[]))
            .await
            .map_err(|e| SourceError::Open { kind: KIND, message: "the start-up check failed".into(), source: Some(Box::new(e)) })?
            .map_err(open_err)?;
        let trackers: Trackers = Arc::default();
        let context = Context { trackers: trackers.clone(), metrics: ctx.metrics.clone(), generation: 0.into() };
        let consumer: StreamConsumer<Context> =
            config.create_with_context(context).map_err(|e| open_err(crate::kafka::ClientError::Create(e)))?;
        let consumer = Arc::new(consumer);
        let topics: Vec<&str> = c.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| SourceError::Open {
            kind: KIND,
            message: format!("cannot subscribe to {topics:?}"),
            source: Some(Box::new(e)),
        })?;
        let (_tx, connected) = watch::channel(true);
        Ok(Self { consumer, trackers, connected, transactional })
    }

    /// The consumer's current group metadata (member id and generation), for
    /// `send_offsets_to_transaction`; `None` before the consumer has joined its group.
    pub fn group_metadata(&self) -> Arc<dyn Fn() -> Option<ConsumerGroupMetadata> + Send + Sync> {
        let consumer = self.consumer.clone();
        Arc::new(move || consumer.group_metadata())
    }
}

fn open_err(e: crate::kafka::ClientError) -> SourceError {
    SourceError::Open { kind: KIND, message: e.to_string(), source: e.into_source() }
}

struct KafkaAck {
    consumer: Arc<StreamConsumer<Context>>,
    trackers: Trackers,
    topic: String,
    partition: i32,
    offset: i64,
    generation: u64,
}

impl Ack for KafkaAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        async move {
            let store = {
                let Ok(mut trackers) = self.trackers.lock() else { return Ok(()) };
                match trackers.get_mut(&(self.topic.clone(), self.partition)) {
                    Some(t) if t.generation == self.generation => t.ack(self.offset),
                    _ => None, // revoked since: the new owner re-reads it
                }
            };
            match store {
                // `rd_kafka_offset_store` stores `offset + 1`: hand it the last done offset.
                Some(next) => self.consumer.store_offset(&self.topic, self.partition, next - 1).map_err(|e| SourceError::Ack {
                    kind: KIND,
                    message: format!("cannot store offset {next} of {}/{}", self.topic, self.partition),
                    source: Some(Box::new(e)),
                }),
                None => Ok(()),
            }
        }
        .boxed()
    }
}

impl Source for KafkaSource {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Record, SourceError>>> {
        async move {
            loop {
                let msg = match self.consumer.recv().await {
                    Ok(m) => m,
                    Err(e) => {
                        // Broker trouble is retried by librdkafka; report and keep reading.
                        tracing::warn!(error = %e, "Kafka consumer error");
                        continue;
                    }
                };
                let (topic, partition, offset) = (msg.topic().to_owned(), msg.partition(), msg.offset());
                let ack = if self.transactional {
                    AckHandle::noop()
                } else {
                    let generation = {
                        let Ok(mut trackers) = self.trackers.lock() else { continue };
                        let t = trackers.entry((topic.clone(), partition)).or_default();
                        t.pending.insert(offset, false);
                        t.generation
                    };
                    AckHandle::new(KafkaAck {
                        consumer: self.consumer.clone(),
                        trackers: self.trackers.clone(),
                        topic: topic.clone(),
                        partition,
                        offset,
                        generation,
                    })
                };
                let headers = msg
                    .headers()
                    .map(|h| h.iter().map(|h| (h.key.to_owned(), Bytes::copy_from_slice(h.value.unwrap_or_default()))).collect())
                    .unwrap_or_default();
                let record = Record {
                    payload: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
                    key: msg.key().map(Bytes::copy_from_slice),
                    headers,
                    origin: Origin::Kafka { topic, partition, offset },
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

    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        async move {
            if self.transactional {
                return Ok(());
            }
            let consumer = self.consumer.clone();
            tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
                .await
                .map_err(|e| SourceError::Ack { kind: KIND, message: "commit task failed".into(), source: Some(Box::new(e)) })?
                .or_else(|e| match e {
                    // Nothing stored since the last commit.
                    rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset) => Ok(()),
                    e => Err(SourceError::Ack { kind: KIND, message: "final commit failed".into(), source: Some(Box::new(e)) }),
                })
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_advance_only_over_the_acked_prefix() {
        let mut t = PartitionTracker::default();
        for o in 10..15 {
            t.pending.insert(o, false);
        }
        assert_eq!(t.ack(12), None, "11 and 10 are still in flight");
        assert_eq!(t.ack(10), Some(11));
        assert_eq!(t.ack(11), Some(13), "10..=12 done: next to read is 13");
        assert_eq!(t.ack(14), None);
        assert_eq!(t.ack(13), Some(15));
        assert_eq!(t.ack(99), None, "unknown offsets store nothing");
    }
}
