//! JetStream sink: each output is published with `Nats-Msg-Id` set to the output subject plus its
//! input-derived id (input stream instance, consumer, sequence, kind), so JetStream's duplicate
//! window drops the copy a replayed input would publish again, and nothing else; the input
//! headers are carried over. A publish is confirmed by its PubAck.
//!
//! At start the sink checks that a stream captures its subject (else every publish would fail
//! for ever). A message larger than the server's `max_payload`, or one the stream refuses for its
//! size, is a permanent refusal ([`SinkError::Rejected`]); everything else is transient.

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::HeaderMap;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::{Confirmation, Outgoing, Sink, SinkContext, SinkError};
use super::NatsSinkConfig;
use crate::metrics::Metrics;
use crate::nats::{connect, connection_of};

const KIND: &str = "nats";

pub(crate) struct NatsSink {
    client: async_nats::Client,
    js: jetstream::Context,
    subject: String,
    metrics: std::sync::Arc<Metrics>,
}

/// A publish error, permanent or transient by its kind, with the server's reason kept.
fn publish_err(message: String, e: jetstream::context::PublishError) -> SinkError {
    let permanent = match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => true,
        PublishErrorKind::Other => std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|j| j.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM),
        _ => false,
    };
    let message = format!("{message}: {e}");
    if permanent {
        SinkError::Rejected { kind: KIND, message, source: Some(Box::new(e)) }
    } else {
        SinkError::Publish { kind: KIND, message, source: Some(Box::new(e)) }
    }
}

impl NatsSink {
    pub async fn open(c: &NatsSinkConfig, ctx: SinkContext) -> Result<Self, SinkError> {
        let conn = connection_of!(c);
        let open_err = |message: String, source: Option<Box<dyn std::error::Error + Send + Sync>>| SinkError::Open {
            kind: KIND,
            message,
            source,
        };
        let client = connect(&conn, "scorestream-sink").await.map_err(|e| open_err(e.to_string(), Some(Box::new(e))))?;
        let js = jetstream::new(client.clone());
        match js.stream_by_subject(c.subject.as_str()).await {
            Ok(stream) => tracing::info!(subject = %c.subject, %stream, "JetStream stream captures the output subject"),
            Err(e) => {
                return Err(open_err(
                    format!("no JetStream stream captures subject {:?} (create one whose subjects include it)", c.subject),
                    Some(Box::new(e)),
                ))
            }
        }
        Ok(Self { client, js, subject: c.subject.clone(), metrics: ctx.metrics })
    }
}

impl Sink for NatsSink {
    fn publish(&self, msg: Outgoing) -> BoxFuture<'_, Result<Confirmation, SinkError>> {
        async move {
            let mut headers = HeaderMap::new();
            for (k, v) in &msg.headers {
                if let Ok(v) = std::str::from_utf8(v.as_deref().unwrap_or_default()) {
                    headers.append(k.as_str(), v);
                }
            }
            if let Some(id) = &msg.dedup_id {
                headers.insert("Nats-Msg-Id", format!("{}|{id}", self.subject).as_str());
            }
            let ack = self
                .js
                .publish_with_headers(self.subject.clone(), headers, msg.payload)
                .await
                .map_err(|e| publish_err(format!("cannot publish to {}", self.subject), e))?;
            let (metrics, first, id) = (self.metrics.clone(), msg.first_publish, msg.dedup_id);
            let confirmation: Confirmation = async move {
                let ack = ack.await.map_err(|e| publish_err("JetStream did not acknowledge the publish".into(), e))?;
                if ack.duplicate && first {
                    metrics.dedup_collisions.inc();
                    tracing::warn!(
                        msg_id = ?id,
                        stream = %ack.stream,
                        "JetStream dropped a first publish as a duplicate: another output used the same Nats-Msg-Id"
                    );
                }
                Ok(())
            }
            .boxed();
            Ok(confirmation)
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        // Every publish's confirmation is awaited by the pipeline; nothing is buffered here.
        async { Ok(()) }.boxed()
    }

    fn max_message_bytes(&self) -> Option<usize> {
        Some(self.client.max_payload())
    }
}
