//! What sources, the pipeline and sinks all speak of about one input: where it came from
//! ([`Origin`]). It lives below `source/` and `sink/` so that a sink never imports a source.

use std::fmt;

use serde_json::{json, Value};

/// Where a record was read from. Used for the dead-letter `source` object, the sink's
/// de-duplication id and the ordering lane.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    Kafka {
        topic: String,
        partition: i32,
        offset: i64,
        /// Exactly-once: the epoch of this worker's assignment of the partition when the record
        /// was read ([`crate::kafka::ownership`]); a record read before its partition was revoked
        /// is never committed. 0 outside exactly-once.
        epoch: u64,
    },
    Nats {
        stream: String,
        /// The stream's creation time (Unix nanoseconds): a stream deleted and created again
        /// under the same name restarts its sequences, and this tells the two apart.
        stream_created: i64,
        /// The durable consumer: two deployments reading one stream publish different outputs.
        consumer: String,
        /// The stream sequence; `None` when the message's metadata could not be read (never
        /// invented: such an input's output is not de-duplicated).
        sequence: Option<u64>,
        /// How many times JetStream has delivered this message (1 on the first delivery).
        delivered: u64,
    },
    /// `line` counts from 1.
    File {
        path: String,
        line: u64,
    },
    /// An event posted to `/v1/score`: its request and its place in the request.
    Http {
        request: u64,
        index: u64,
    },
}

impl Origin {
    /// The dead-letter `source` object: `{topic, partition, offset}`,
    /// `{stream, consumer, sequence, delivered}` or `{file, line}`.
    pub(crate) fn to_json(&self) -> Value {
        match self {
            Origin::Kafka { topic, partition, offset, .. } => {
                json!({"topic": topic, "partition": partition, "offset": offset})
            }
            Origin::Nats { stream, consumer, sequence, delivered, .. } => {
                json!({"stream": stream, "consumer": consumer, "sequence": sequence, "delivered": delivered})
            }
            Origin::File { path, line } => json!({"file": path, "line": line}),
            Origin::Http { request, index } => json!({"http": {"request": request, "index": index}}),
        }
    }

    /// A stable id of this input, the same on every redelivery: sinks that de-duplicate
    /// (JetStream `Nats-Msg-Id`) derive the output's id from it. It names the input's stream
    /// instance and the consumer, so that two deployments on one stream, or a re-created
    /// stream, never share ids. `None` when the input has no stable identity.
    pub(crate) fn dedup_id(&self) -> Option<String> {
        match self {
            Origin::Kafka { topic, partition, offset, .. } => Some(format!("kafka:{topic}:{partition}:{offset}")),
            Origin::Nats { stream, stream_created, consumer, sequence, .. } => {
                sequence.map(|seq| format!("nats:{stream}@{stream_created}:{consumer}:{seq}"))
            }
            Origin::File { path, line } => Some(format!("file:{path}:{line}")),
            // Answered to the request, never published: nothing to de-duplicate.
            Origin::Http { .. } => None,
        }
    }

    /// Whether this delivery is a replay of an input seen before: `Some` where the broker says
    /// (JetStream's delivery count; a file is read once), `None` where it does not (Kafka).
    pub fn redelivered(&self) -> Option<bool> {
        match self {
            Origin::Nats { delivered, .. } => Some(*delivered > 1),
            Origin::File { .. } | Origin::Http { .. } => Some(false),
            Origin::Kafka { .. } => None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.dedup_id(), self) {
            (Some(id), _) => f.write_str(&id),
            (None, Origin::Nats { stream, consumer, .. }) => write!(f, "nats:{stream}:{consumer}:<unknown sequence>"),
            (None, _) => f.write_str("<unknown origin>"),
        }
    }
}
