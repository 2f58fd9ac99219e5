//! JetStream source: a durable pull consumer with explicit acks on one stream, filtered by a
//! single `filter_subject` (nats-server 2.9 silently ignores plural filters), created when absent.
//!
//! Delivery: a message is acked (`+ACK` on its reply subject) only when the pipeline acks its
//! record, i.e. after its output's PubAck. While a record is handed out and neither acked nor
//! dropped, a timer sends in-progress acks (`+WPI`) every third of `ack_wait`, so a long batch
//! never triggers a redelivery; a dropped record is left to JetStream's redelivery. The
//! consumer's pull stream asks for at most `max_inflight_events` messages at a time.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use super::{Ack, AckHandle, Origin, Record, Source, SourceContext, SourceError};
use crate::config::brokers::NatsSourceConfig;
use crate::nats::{connect, connection_of};

const KIND: &str = "nats";

fn open_err(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> SourceError {
    SourceError::Open { kind: KIND, message: message.into(), source: Some(Box::new(source)) }
}

/// Reply subjects of the records handed out and not yet acked or dropped.
type Outstanding = Arc<Mutex<HashSet<String>>>;

pub struct NatsSource {
    client: async_nats::Client,
    messages: pull::Stream,
    stream: String,
    outstanding: Outstanding,
    connected: watch::Receiver<bool>,
    keepalive: tokio::task::JoinHandle<()>,
}

impl NatsSource {
    pub async fn open(c: &NatsSourceConfig, ctx: SourceContext) -> Result<Self, SourceError> {
        let conn = connection_of!(c);
        let client = connect(&conn, "scorestream-source").await.map_err(|e| open_err(e.to_string(), e))?;
        let js = jetstream::new(client.clone());
        let stream = js
            .get_stream(&c.stream)
            .await
            .map_err(|e| open_err(format!("JetStream stream {:?} is not available", c.stream), e))?;
        let config = pull::Config {
            durable_name: Some(c.durable.clone()),
            filter_subject: c.subject.clone(),
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
        let messages = consumer
            .stream()
            .max_messages_per_batch(ctx.max_inflight_events.clamp(1, 1024))
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| open_err("cannot start pulling messages", e))?;
        let outstanding: Outstanding = Arc::default();
        let keepalive = tokio::spawn(keep_alive(client.clone(), outstanding.clone(), c.ack_wait / 3));
        let (tx, connected) = watch::channel(true);
        tokio::spawn(watch_connection(client.clone(), tx));
        Ok(Self { client, messages, stream: c.stream.clone(), outstanding, connected, keepalive })
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
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        async move {
            if let Ok(mut o) = self.outstanding.lock() {
                o.remove(&self.reply);
            }
            self.client
                .publish(self.reply.clone(), Bytes::from_static(b"+ACK"))
                .await
                .map_err(|e| SourceError::Ack { kind: KIND, message: "cannot send the ack".into(), source: Some(Box::new(e)) })
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

impl Source for NatsSource {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Record, SourceError>>> {
        async move {
            loop {
                let msg = match self.messages.next().await? {
                    Ok(m) => m,
                    Err(e) => {
                        // Heartbeat misses and transient pull errors: the stream recovers.
                        tracing::warn!(error = %e, "JetStream pull error");
                        continue;
                    }
                };
                let Some(reply) = msg.reply.as_ref().map(|r| r.to_string()) else { continue };
                let sequence = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                let headers = msg
                    .headers
                    .iter()
                    .flat_map(|h| h.iter())
                    .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), Some(Bytes::copy_from_slice(v.as_str().as_bytes())))))
                    .filter(|(k, _)| !k.starts_with("Nats-"))
                    .collect();
                if let Ok(mut o) = self.outstanding.lock() {
                    o.insert(reply.clone());
                }
                let ack = NatsAck { client: self.client.clone(), reply, outstanding: self.outstanding.clone() };
                return Some(Ok(Record {
                    payload: msg.payload.clone(),
                    key: None,
                    headers,
                    origin: Origin::Nats { stream: self.stream.clone(), sequence },
                    ack: AckHandle::new(ack),
                }));
            }
        }
        .boxed()
    }

    fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        async move {
            self.keepalive.abort();
            self.client
                .flush()
                .await
                .map_err(|e| SourceError::Ack { kind: KIND, message: "cannot flush acks".into(), source: Some(Box::new(e)) })
        }
        .boxed()
    }
}
