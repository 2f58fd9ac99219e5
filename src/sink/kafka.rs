//! Kafka sink: an idempotent producer (`enable.idempotence = true`, so retries neither reorder
//! nor duplicate within a session); the output key is the input's key (else the event id) and
//! the input's headers are carried over. A publish is confirmed by its delivery report.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{Confirmation, Outgoing, Sink, SinkContext, SinkError};
use crate::config::brokers::KafkaSinkConfig;

const KIND: &str = "kafka";

pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
}

fn err(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> SinkError {
    SinkError::Publish { kind: KIND, message: message.into(), source: Some(Box::new(source)) }
}

impl KafkaSink {
    pub fn open(c: &KafkaSinkConfig, _ctx: SinkContext) -> Result<Self, SinkError> {
        let open = |message: String, e: Box<dyn std::error::Error + Send + Sync>| SinkError::Open { kind: KIND, message, source: Some(e) };
        let options = c.options.resolve(&c.option_files).map_err(|e| open(e.to_string(), Box::new(e)))?;
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &c.brokers).set("enable.idempotence", "true").set("linger.ms", "5");
        for (k, v) in &options {
            config.set(k, v);
        }
        let producer: FutureProducer =
            config.create().map_err(|e| open("cannot create the Kafka producer".into(), Box::new(e)))?;
        Ok(Self { producer, topic: c.topic.clone() })
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
                                Err(e) => Err(err("the producer was dropped before delivery", e)),
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
                .map_err(|e| err("flush task failed", e))?
                .map_err(|e| err("cannot flush the producer", e))
        }
        .boxed()
    }
}
