//! The `[source]` section, chosen by `type`: `kafka` (a consumer group), `nats` (a JetStream
//! durable pull consumer) or `file` (JSONL), each with its own checks ([`SourceConfig::validate`]).
//! Secrets (librdkafka options, NATS tokens and passwords) are redacted by `Debug`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::kafka::{KafkaOptions, OptionFileError};
use crate::nats::NatsTls;
use crate::settings::{invalid, non_empty, Invalid, Secret};

/// The `[source]` section, chosen by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    /// Consume a Kafka topic in a consumer group.
    Kafka(KafkaSourceConfig),
    /// Pull from a JetStream durable consumer.
    Nats(NatsSourceConfig),
    /// Read JSONL from a file or stdin.
    File(FileSourceConfig),
}

impl SourceConfig {
    /// The `source` label of `scorestream_events_consumed_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Kafka(_) => "kafka",
            SourceConfig::Nats(_) => "nats",
            SourceConfig::File(_) => "file",
        }
    }

    /// Checks serde cannot express; fields are named `source.<key>`.
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            SourceConfig::Kafka(k) => {
                non_empty("source.brokers", &k.brokers)?;
                non_empty("source.group_id", &k.group_id)?;
                if k.topics.is_empty() || k.topics.iter().any(|t| t.is_empty()) {
                    return invalid("source.topics", "list at least one non-empty topic");
                }
                Ok(())
            }
            SourceConfig::Nats(n) => {
                non_empty("source.url", &n.url)?;
                non_empty("source.stream", &n.stream)?;
                non_empty("source.subject", &n.subject)?;
                if n.subjects.iter().any(|s| s.is_empty()) {
                    return invalid("source.subjects", "list non-empty subjects");
                }
                non_empty("source.durable", &n.durable)?;
                if n.ack_wait < Duration::from_secs(1) {
                    return invalid("source.ack_wait", "must be at least 1s");
                }
                crate::nats::connection_of!(n).check_auth("source")
            }
            SourceConfig::File(f) => non_empty("source.path", &f.path.to_string_lossy()),
        }
    }
}

/// `type = "file"` source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// JSONL file to read, one event per line; "-" reads stdin. The worker exits when it ends.
    pub path: PathBuf,
}

/// `type = "kafka"` source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers: a list (["host:9092", "host2:9092"]) or one comma-separated string
    /// ("host:9092,host2:9092"); kept comma separated.
    #[serde(deserialize_with = "crate::kafka::brokers_list")]
    pub brokers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group; every replica of the worker uses the same one.
    pub group_id: String,
    /// Raw librdkafka consumer options, applied last (after the worker's own settings).
    #[serde(default)]
    pub options: KafkaOptions,
    /// librdkafka options whose value is read from a file at start (secrets mounted from a
    /// Kubernetes Secret), e.g. `{ "sasl.password" = "/etc/scorestream/kafka/password" }`.
    #[serde(default)]
    pub option_files: BTreeMap<String, PathBuf>,
    /// How often the per-partition consumer lag is refreshed (librdkafka statistics).
    #[serde(default = "default_lag_interval", with = "humantime_serde")]
    pub lag_interval: Duration,
}

impl KafkaSourceConfig {
    /// `options` with `option_files` read in: the raw librdkafka settings to apply last.
    pub fn client_options(&self) -> Result<BTreeMap<String, String>, OptionFileError> {
        self.options.resolve(&self.option_files)
    }
}

/// `type = "nats"` source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceConfig {
    /// Server URL(s), comma separated ("nats://127.0.0.1:4222"; "tls://" forces TLS).
    pub url: String,
    /// JetStream stream holding the input subject (must exist).
    pub stream: String,
    /// The consumer's filter subject (`filter_subject`; wildcards allowed).
    pub subject: String,
    /// More filter subjects of the same stream for the same durable consumer (sent with
    /// `subject` as `filter_subjects`). Needs nats-server 2.10 or later: an older server would
    /// silently ignore them and deliver every subject of the stream, so the worker refuses to
    /// start on one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// Durable pull consumer name, created with explicit ack if absent; shared by replicas.
    pub durable: String,
    /// How long JetStream waits for an ack before redelivering; the worker sends in-progress
    /// acks well within it while a record is in flight.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries before JetStream gives up on a record (-1 = unlimited).
    #[serde(default = "default_max_deliver")]
    pub max_deliver: i64,
    /// How often the durable consumer's pending count (messages not yet delivered to it) is read
    /// from the server and exported as `scorestream_consumer_lag{topic=<stream>,partition="0"}`.
    #[serde(default = "default_lag_interval", with = "humantime_serde")]
    pub lag_interval: Duration,
    /// NATS credentials file (JWT + NKey seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// Token authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// User for user/password authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password for user/password authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// TLS files; absent = TLS only if the URL or server asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<NatsTls>,
}

impl NatsSourceConfig {
    /// Every filter subject of the consumer: `subject`, then `subjects` (repeats left out).
    pub fn filter_subjects(&self) -> Vec<String> {
        let mut all = vec![self.subject.clone()];
        for s in &self.subjects {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        all
    }
}

fn default_lag_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}

const fn default_max_deliver() -> i64 {
    -1
}
