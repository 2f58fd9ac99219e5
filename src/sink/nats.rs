//! JetStream sink: each output is published with `Nats-Msg-Id` set to its input-derived id, so
//! JetStream's duplicate window drops the copy a replayed input would publish again; the input
//! headers are carried over. A publish is confirmed by its PubAck.

use async_nats::jetstream;
use async_nats::HeaderMap;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::{Confirmation, Outgoing, Sink, SinkContext, SinkError};
use crate::config::brokers::NatsSinkConfig;
use crate::nats::{connect, connection_of};

const KIND: &str = "nats";

pub struct NatsSink {
    js: jetstream::Context,
    subject: String,
}

fn err(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> SinkError {
    SinkError::Publish { kind: KIND, message: message.into(), source: Some(Box::new(source)) }
}

impl NatsSink {
    pub async fn open(c: &NatsSinkConfig, _ctx: SinkContext) -> Result<Self, SinkError> {
        let conn = connection_of!(c);
        let client = connect(&conn, "scorestream-sink").await.map_err(|e| SinkError::Open {
            kind: KIND,
            message: e.to_string(),
            source: Some(Box::new(e)),
        })?;
        Ok(Self { js: jetstream::new(client), subject: c.subject.clone() })
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
            headers.insert("Nats-Msg-Id", msg.dedup_id.as_str());
            let ack = self
                .js
                .publish_with_headers(self.subject.clone(), headers, msg.payload)
                .await
                .map_err(|e| err(format!("cannot publish to {}", self.subject), e))?;
            let confirmation: Confirmation = async move {
                ack.await.map(|_| ()).map_err(|e| err("JetStream did not acknowledge the publish", e))
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
}
