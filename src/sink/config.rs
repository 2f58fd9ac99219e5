//! The `[sink]`, `[dead_letter]` and `[sinks.<name>]` sections, chosen by `type`: `kafka` (with
//! its [`Delivery`] guarantee), `nats` (JetStream) or `file` (JSONL), each with its own checks
//! ([`SinkConfig::validate`]). Secrets (librdkafka options, NATS tokens and passwords) are
//! redacted by `Debug`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::kafka::{KafkaOptions, OptionFileError};
use crate::nats::NatsTls;
use crate::settings::{non_empty, Invalid, Secret};

/// The `[sink]` and `[dead_letter]` sections, chosen by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    /// Produce to a Kafka topic.
    Kafka(KafkaSinkConfig),
    /// Publish to a JetStream subject.
    Nats(NatsSinkConfig),
    /// Write JSONL to a file or stdout.
    File(FileSinkConfig),
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Nats(_) => "nats",
            SinkConfig::File(_) => "file",
        }
    }

    /// Checks serde cannot express; fields are named `<section>.<key>` (`sink`, `dead_letter`,
    /// `sinks.<name>`).
    pub fn validate(&self, section: &str) -> Result<(), Invalid> {
        let f = |name: &str| format!("{section}.{name}");
        match self {
            SinkConfig::Kafka(k) => {
                non_empty(&f("brokers"), &k.brokers)?;
                non_empty(&f("topic"), &k.topic)
            }
            SinkConfig::Nats(n) => {
                non_empty(&f("url"), &n.url)?;
                non_empty(&f("subject"), &n.subject)?;
                crate::nats::connection_of!(n).check_auth(section)
            }
            SinkConfig::File(file) => non_empty(&f("path"), &file.path.to_string_lossy()),
        }
    }
}

/// `type = "file"` sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// JSONL file to write (created or truncated); "-" writes stdout.
    pub path: PathBuf,
}

/// Kafka delivery guarantee of the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Idempotent producer; input offsets stored after the outputs are acknowledged.
    /// A crash can publish an output twice, never lose one.
    #[default]
    AtLeastOnce,
    /// Outputs and input offsets in one producer transaction per batch. Needs a Kafka source,
    /// a Kafka dead-letter sink and only Kafka named sinks, all on the same cluster.
    ExactlyOnce,
}

/// `type = "kafka"` sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers: a list or one comma-separated string (as the source's).
    #[serde(deserialize_with = "crate::kafka::brokers_list")]
    pub brokers: String,
    /// Topic to produce to.
    pub topic: String,
    /// Raw librdkafka producer options, applied last.
    #[serde(default)]
    pub options: KafkaOptions,
    /// librdkafka options whose value is read from a file at start (see the source's).
    #[serde(default)]
    pub option_files: BTreeMap<String, PathBuf>,
    /// "at_least_once" (default) or "exactly_once".
    #[serde(default)]
    pub delivery: Delivery,
    /// `transactional.id` for exactly-once; default `scorestream-<hostname>`. Must be unique
    /// per replica and stable across its restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactional_id: Option<String>,
}

impl KafkaSinkConfig {
    /// `options` with `option_files` read in: the raw librdkafka settings to apply last.
    pub fn client_options(&self) -> Result<BTreeMap<String, String>, OptionFileError> {
        self.options.resolve(&self.option_files)
    }
}

/// `type = "nats"` sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSinkConfig {
    /// Server URL(s), comma separated.
    pub url: String,
    /// Subject to publish to; a JetStream stream must capture it (PubAck confirms each message).
    pub subject: String,
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
    /// TLS files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<NatsTls>,
}
