//! JetStream source: a durable pull consumer with explicit acks on one stream, created when
//! absent. One subject is its `filter_subject`; several (`subject` plus `subjects`) are its
//! `filter_subjects`, which needs nats-server 2.10: on an older server (read from its INFO) the
//! source refuses to open, since 2.9 would silently drop the field and deliver the whole stream.
//! An existing durable whose filters differ from the config is refused too (the server keeps an
//! existing consumer's config as it is).
//!
//! Delivery: a message is acked (`+ACK` on its reply subject) only when the pipeline acks its
//! record, i.e. after its output's PubAck. From the moment a message arrives (prefetched, queued
//! for the pipeline, or in flight) until it is acked or dropped, a timer sends in-progress acks
//! (`+WPI`) every third of `ack_wait`, so neither a long batch nor a wait in the prefetch buffer
//! triggers a redelivery; a dropped record is left to JetStream's redelivery.
//!
//! Prefetch: a reader task pulls with explicit pull requests sized to the room left in its
//! buffer, bounded both in messages and in bytes (`max_bytes` of the pull request), so a burst
//! of large events never floods the connection (slow-consumer disconnects) or the memory.
//!
//! Lag: every `lag_interval` the consumer's `num_pending` (stream messages matching its filter
//! not yet delivered to it) is exported as `scorestream_consumer_lag{topic=<stream>,
//! partition="0"}` (a stream is one ordered log). While the server cannot be asked, the series is
//! removed rather than left at a stale value.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch, Notify};

use super::{NatsSourceConfig, Source, SourceContext, SourceError};
use crate::record::{Ack, AckError, AckHandle, Origin, Record};
use crate::metrics::Metrics;
use crate::nats::{at_least, connect, connection_of};

const KIND: &str = "nats";

/// How long one pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

fn open_err(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> SourceError {
    SourceError::Open { kind: KIND, message: message.into(), source: Some(Box::new(source)) }
}

/// Reply subjects of the records received and not yet acked or dropped.
type Outstanding = Arc<Mutex<HashSet<String>>>;

/// The prefetch buffer's room, in messages and bytes.
struct Room {
    free: Mutex<(usize, usize)>,
    capacity: (usize, usize),
    changed: Notify,
}

impl Room {
    fn new(messages: usize, bytes: usize) -> Self {
        Self { free: Mutex::new((messages, bytes)), capacity: (messages, bytes), changed: Notify::new() }
    }

    /// Wait until at least half the buffer is free (or all of it), and return the free room.
    async fn wait(&self) -> (usize, usize) {
        loop {
            let notified = self.changed.notified();
            let free = self.free.lock().map(|f| *f).unwrap_or_default();
            let (cap_m, cap_b) = self.capacity;
            if free.0 * 2 >= cap_m && free.1 * 2 >= cap_b {
                return free;
            }
            notified.await;
        }
    }

    fn take(&self, bytes: usize) {
        if let Ok(mut f) = self.free.lock() {
            f.0 = f.0.saturating_sub(1);
            f.1 = f.1.saturating_sub(bytes);
        }
    }

    fn give(&self, bytes: usize) {
        if let Ok(mut f) = self.free.lock() {
            f.0 = (f.0 + 1).min(self.capacity.0);
            f.1 = (f.1 + bytes).min(self.capacity.1);
        }
        self.changed.notify_one();
    }
}

/// What identifies this source's inputs (see [`Origin::Nats`]).
#[derive(Clone)]
struct Identity {
    stream: String,
    stream_created: i64,
    consumer: String,
}

pub struct NatsSource {
    client: async_nats::Client,
    prefetched: mpsc::Receiver<jetstream::Message>,
    room: Arc<Room>,
    identity: Identity,
    outstanding: Outstanding,
    connected: watch::Receiver<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl NatsSource {
    pub async fn open(c: &NatsSourceConfig, ctx: SourceContext) -> Result<Self, SourceError> {
        let conn = connection_of!(c);
        let client = connect(&conn, "scorestream-source").await.map_err(|e| open_err(e.to_string(), e))?;
        let js = jetstream::new(client.clone());
        let mut stream = js
            .get_stream(&c.stream)
            .await
            .map_err(|e| open_err(format!("JetStream stream {:?} is not available", c.stream), e))?;
        let created = stream
            .info()
            .await
            .map_err(|e| open_err(format!("cannot read the info of stream {:?}", c.stream), e))?
            .created;
        let filters = c.filter_subjects();
        let version = client.server_info().version;
        if filters.len() > 1 && !at_least(&version, (2, 10)) {
            return Err(SourceError::Open {
                kind: KIND,
                message: format!(
                    "source.subjects needs nats-server 2.10 or later (several filter_subjects on one consumer), \
                     but the server at {} is {version}, which would silently ignore them and deliver every subject \
                     of stream {:?}: use a single source.subject or upgrade the server",
                    c.url, c.stream
                ),
                source: None,
            });
        }
        let (filter_subject, filter_subjects) = match filters.as_slice() {
            [one] => (one.clone(), Vec::new()),
            _ => (String::new(), filters.clone()),
        };
        let config = pull::Config {
            durable_name: Some(c.durable.clone()),
            filter_subject,
            filter_subjects,
            ack_policy: AckPolicy::Explicit,
            ack_wait: c.ack_wait,
            max_deliver: c.max_deliver,
            max_ack_pending: i64::try_from(ctx.max_inflight_events.max(1) * 2).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let consumer = stream
            .get_or_create_consumer(&c.durable, config)
            .await
            .map_err(|e| open_err(format!("cannot get or create the durable consumer {:?}", c.durable), e))?;
        check_filters(&c.durable, &consumer.cached_info().config, &filters)?;
        let (messages, bytes) = prefetch_bounds(&ctx, client.max_payload());
        let room = Arc::new(Room::new(messages, bytes));
        let (tx, prefetched) = mpsc::channel(messages);
        let outstanding: Outstanding = Arc::default();
        let (up_tx, connected) = watch::channel(true);
        let lag = LagSeries { metrics: ctx.metrics.clone(), stream: c.stream.clone() };
        let tasks = vec![
            tokio::spawn(export_pending(consumer.clone(), lag, c.lag_interval)),
            tokio::spawn(prefetch(consumer, tx, room.clone(), outstanding.clone())),
            tokio::spawn(keep_alive(client.clone(), outstanding.clone(), c.ack_wait / 3)),
            tokio::spawn(watch_connection(client.clone(), up_tx)),
        ];
        let identity = Identity {
            stream: c.stream.clone(),
            stream_created: i64::try_from(created.unix_timestamp_nanos()).unwrap_or(i64::MAX),
            consumer: c.durable.clone(),
        };
        Ok(Self { client, prefetched, room, identity, outstanding, connected, tasks })
    }
}

/// Refuse a durable consumer whose filter subjects are not the configured ones: an existing
/// consumer keeps its config, and a server that ignored a field would have dropped it.
fn check_filters(durable: &str, config: &jetstream::consumer::Config, wanted: &[String]) -> Result<(), SourceError> {
    let mut has: Vec<&str> = config.filter_subjects.iter().map(String::as_str).collect();
    if !config.filter_subject.is_empty() {
        has.push(&config.filter_subject);
    }
    let mut want: Vec<&str> = wanted.iter().map(String::as_str).collect();
    has.sort_unstable();
    has.dedup();
    want.sort_unstable();
    if has == want {
        return Ok(());
    }
    Err(SourceError::Open {
        kind: KIND,
        message: format!(
            "the durable consumer {durable:?} filters {has:?} but the config asks for {want:?} (source.subject and \
             source.subjects): delete the consumer or choose another source.durable"
        ),
        source: None,
    })
}

/// The prefetch buffer's bounds: at most the in-flight bound of messages (and 512), and a
/// quarter of the in-flight byte bound (at most 32 MiB), but always room for two messages of the
/// server's largest size, so that every message fits a pull request.
fn prefetch_bounds(ctx: &SourceContext, max_payload: usize) -> (usize, usize) {
    let messages = ctx.max_inflight_events.clamp(1, 512);
    let bytes = (ctx.max_inflight_bytes / 4).min(32 << 20).max(2 * max_payload + (64 << 10));
    (messages, bytes)
}

/// Pull messages into the buffer with requests sized to its free room; every message is in
/// `outstanding` (kept alive) from the moment it arrives.
async fn prefetch(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    tx: mpsc::Sender<jetstream::Message>,
    room: Arc<Room>,
    outstanding: Outstanding,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (messages, bytes) = room.wait().await;
        let batch = consumer.batch().max_messages(messages).max_bytes(bytes).expires(PULL_EXPIRES).messages().await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "JetStream pull request failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        while let Some(next) = batch.next().await {
            let msg = match next {
                Ok(m) => m,
                // The request ended early (e.g. the next message exceeds its max_bytes, or the
                // consumer is at max_ack_pending): the next request asks again.
                Err(e) => {
                    tracing::debug!(error = %e, "JetStream pull request ended");
                    break;
                }
            };
            if let Some(reply) = &msg.reply {
                if let Ok(mut o) = outstanding.lock() {
                    o.insert(reply.to_string());
                }
            }
            room.take(msg.payload.len());
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    }
}

/// The source's `scorestream_consumer_lag` series.
struct LagSeries {
    metrics: Arc<Metrics>,
    stream: String,
}

impl LagSeries {
    const PARTITION: &'static str = "0";

    fn set(&self, pending: u64) {
        let value = i64::try_from(pending).unwrap_or(i64::MAX);
        self.metrics.consumer_lag.with_label_values(&[self.stream.as_str(), Self::PARTITION]).set(value);
    }

    fn remove(&self) {
        let _ = self.metrics.consumer_lag.remove_label_values(&[self.stream.as_str(), Self::PARTITION]);
    }
}

impl Drop for LagSeries {
    fn drop(&mut self) {
        // The task ended (the source closed): no value left behind.
        self.remove();
    }
}

/// Export the consumer's pending count every `period`; remove the series while it is unknown.
async fn export_pending(consumer: jetstream::consumer::Consumer<pull::Config>, lag: LagSeries, period: Duration) {
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match consumer.get_info().await {
            Ok(info) => {
                lag.set(info.num_pending);
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read the JetStream consumer's pending count; lag unknown");
                }
                failing = true;
                lag.remove();
            }
        }
    }
}

/// Send `+WPI` for every outstanding record every `period`.
async fn keep_alive(client: async_nats::Client, outstanding: Outstanding, period: Duration) {
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let replies: Vec<String> = outstanding.lock().map(|o| o.iter().cloned().collect()).unwrap_or_default();
        for reply in replies {
            if let Err(e) = client.publish(reply, Bytes::from_static(b"+WPI")).await {
                tracing::warn!(error = %e, "in-progress ack failed");
            }
        }
    }
}

/// Mirror the client's connection state into the `connected` watch (for /readyz).
async fn watch_connection(client: async_nats::Client, tx: watch::Sender<bool>) {
    loop {
        let up = client.connection_state() == async_nats::connection::State::Connected;
        if tx.send(up).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

struct NatsAck {
    client: async_nats::Client,
    reply: String,
    outstanding: Outstanding,
}

impl Ack for NatsAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), AckError>> {
        async move {
            if let Ok(mut o) = self.outstanding.lock() {
                o.remove(&self.reply);
            }
            self.client
                .publish(self.reply.clone(), Bytes::from_static(b"+ACK"))
                .await
                .map_err(|e| AckError::new(KIND, "cannot send the ack", e))
        }
        .boxed()
    }
}

impl Drop for NatsAck {
    fn drop(&mut self) {
        // Acked or abandoned: either way no more in-progress acks for it.
        if let Ok(mut o) = self.outstanding.lock() {
            o.remove(&self.reply);
        }
    }
}

impl NatsSource {
    /// The record of a prefetched message, or `None` for a message with no reply subject
    /// (nothing to ack: not a JetStream delivery).
    fn record(&self, msg: jetstream::Message) -> Option<Record> {
        let reply = msg.reply.as_ref()?.to_string();
        let info = msg.info();
        if let Err(e) = &info {
            tracing::warn!(error = %e, reply = %reply, "cannot read the message's JetStream metadata; its output will not be de-duplicated");
        }
        let (sequence, delivered) = info.map_or((None, 1), |i| (Some(i.stream_sequence), u64::try_from(i.delivered).unwrap_or(1)));
        let headers = msg
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), Some(Bytes::copy_from_slice(v.as_str().as_bytes())))))
            .filter(|(k, _)| !k.starts_with("Nats-"))
            .collect();
        let Identity { stream, stream_created, consumer } = self.identity.clone();
        let ack = NatsAck { client: self.client.clone(), reply, outstanding: self.outstanding.clone() };
        Some(Record {
            payload: msg.payload.clone(),
            key: None,
            headers,
            origin: Origin::Nats { stream, stream_created, consumer, sequence, delivered },
            ack: AckHandle::new(ack),
        })
    }
}

impl Source for NatsSource {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Record, SourceError>>> {
        async move {
            loop {
                let Some(msg) = self.prefetched.recv().await else {
                    return Some(Err(SourceError::Fatal { kind: KIND, message: "the prefetch task stopped".into(), source: None }));
                };
                self.room.give(msg.payload.len());
                if let Some(record) = self.record(msg) {
                    return Some(Ok(record));
                }
            }
        }
        .boxed()
    }

    fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        async move {
            for task in &self.tasks {
                task.abort();
            }
            // Prefetched messages never handed out are left to JetStream's redelivery.
            self.client
                .flush()
                .await
                .map_err(|e| AckError::new(KIND, "cannot flush acks", e).into())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_is_bounded_in_messages_and_bytes_and_fits_the_largest_message() {
        let ctx = |events, bytes| SourceContext {
            metrics: Arc::new(crate::metrics::Metrics::new().unwrap()),
            max_inflight_events: events,
            max_inflight_bytes: bytes,
        };
        assert_eq!(prefetch_bounds(&ctx(1024, 256 << 20), 1 << 20), (512, 32 << 20));
        assert_eq!(prefetch_bounds(&ctx(64, 8 << 20), 1 << 20), (64, (2 << 20) + (64 << 10)));
    }

    #[tokio::test]
    async fn room_waits_for_half_the_buffer() {
        let room = Arc::new(Room::new(4, 1000));
        assert_eq!(room.wait().await, (4, 1000));
        for _ in 0..3 {
            room.take(100);
        }
        let waiting = tokio::spawn({
            let room = room.clone();
            async move { room.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "one free slot of four is not enough");
        room.give(100);
        assert_eq!(tokio::time::timeout(Duration::from_secs(1), waiting).await.unwrap().unwrap(), (2, 800));
    }
}
