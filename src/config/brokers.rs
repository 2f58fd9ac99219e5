//! Per-type source and sink sections: `file`, `kafka` (rdkafka) and `nats` (JetStream).
//!
//! Secrets (SASL and TLS key passwords in librdkafka options, NATS tokens and passwords) are
//! redacted by every `Debug` impl here, so a logged config never shows them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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

impl KafkaSourceConfig {
    /// `options` with `option_files` read in: the raw librdkafka settings to apply last.
    pub fn client_options(&self) -> Result<BTreeMap<String, String>, OptionFileError> {
        self.options.resolve(&self.option_files)
    }
}

impl KafkaSinkConfig {
    /// `options` with `option_files` read in: the raw librdkafka settings to apply last.
    pub fn client_options(&self) -> Result<BTreeMap<String, String>, OptionFileError> {
        self.options.resolve(&self.option_files)
    }
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
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Nats(_) => "nats",
            SinkConfig::File(_) => "file",
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

/// `type = "file"` sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// JSONL file to write (created or truncated); "-" writes stdout.
    pub path: PathBuf,
}

/// Raw librdkafka options (`security.protocol`, `sasl.*`, `ssl.*`, ...), passed through as is;
/// a number or boolean (`"linger.ms" = 5`) is taken as its text.
#[derive(Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct KafkaOptions(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for KafkaOptions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Value(String);
        impl<'de> Deserialize<'de> for Value {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(ScalarText("a librdkafka option value: a string, number or boolean")).map(Value)
            }
        }
        let map = BTreeMap::<String, Value>::deserialize(d)?;
        Ok(Self(map.into_iter().map(|(k, v)| (k, v.0)).collect()))
    }
}

/// Option and key names whose values are secrets (librdkafka's, and the NATS `token` and
/// `password`).
pub(crate) fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "sasl.oauthbearer.config", "ssl.key.pem", "ssl_key"].iter().any(|s| k.contains(s))
}

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, if is_secret_option(k) { "<redacted>" } else { v.as_str() })))
            .finish()
    }
}

impl KafkaOptions {
    /// The options with `files` read in (file contents trimmed of a trailing newline); a file
    /// value wins over an inline one.
    pub fn resolve(&self, files: &BTreeMap<String, PathBuf>) -> Result<BTreeMap<String, String>, OptionFileError> {
        let mut out = self.0.clone();
        for (key, path) in files {
            let text = std::fs::read_to_string(path).map_err(|source| OptionFileError {
                key: key.clone(),
                path: path.clone(),
                source,
            })?;
            out.insert(key.clone(), text.trim_end_matches(['\r', '\n']).to_owned());
        }
        Ok(out)
    }
}

/// An `option_files` entry could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the value of librdkafka option {key} from {path}: {source}")]
pub struct OptionFileError {
    pub key: String,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// `brokers`: a comma-separated string, or a list of "host:port" strings joined with commas.
fn brokers_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Brokers;
    impl<'de> serde::de::Visitor<'de> for Brokers {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of \"host:port\" strings or one comma-separated string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            // A list written as text (an environment override: `["a:9092", "b:9092"]`) is not a
            // broker name; refusing it lets the overlay read the text as the list it is.
            if v.trim_start().starts_with("[\"") || v.trim_start().starts_with("['") {
                return Err(E::invalid_value(serde::de::Unexpected::Str(v), &self));
            }
            Ok(v.to_owned())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            let mut all: Vec<String> = Vec::new();
            while let Some(b) = seq.next_element::<String>()? {
                all.push(b);
            }
            Ok(all.join(","))
        }
    }
    d.deserialize_any(Brokers)
}

/// `type = "kafka"` source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers: a list (["host:9092", "host2:9092"]) or one comma-separated string
    /// ("host:9092,host2:9092"); kept comma separated.
    #[serde(deserialize_with = "brokers_list")]
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
    #[serde(deserialize_with = "brokers_list")]
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

/// TLS files for a NATS connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// CA certificate(s) that sign the server certificate (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// A secret string: serialized as is (so the config can be rendered back) but never shown by
/// `Debug`. A number or boolean is taken as its text, so a secret such as `123456` passed
/// through `SCORESTREAM__...` (read as TOML) still works.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarText("a secret (token or password) as a string; a number or boolean is taken as its text"))
            .map(Secret)
    }
}

/// Reads a string, or a number or boolean as its text; the error for anything else says
/// `expected {0}` (and never quotes the value: it may be a secret).
struct ScalarText(&'static str);

impl serde::de::Visitor<'_> for ScalarText {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let mut o = BTreeMap::new();
        o.insert("sasl.password".to_owned(), "hunter2".to_owned());
        o.insert("security.protocol".to_owned(), "SASL_SSL".to_owned());
        let shown = format!("{:?}", KafkaOptions(o));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("SASL_SSL"));
        assert_eq!(format!("{:?}", Secret("s3cret".into())), "\"<redacted>\"");
    }

    #[test]
    fn option_files_are_read_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let mut o = BTreeMap::new();
        o.insert("sasl.password".to_owned(), "inline".to_owned());
        let files = BTreeMap::from([("sasl.password".to_owned(), path)]);
        assert_eq!(KafkaOptions(o).resolve(&files).unwrap()["sasl.password"], "s3cret");
        let missing = BTreeMap::from([("x".to_owned(), dir.path().join("none"))]);
        assert!(KafkaOptions::default().resolve(&missing).unwrap_err().to_string().contains("option x"));
    }

    #[test]
    fn a_secret_of_the_wrong_shape_says_what_is_expected() {
        let text = |v: &str| format!("[s]\npassword = {v}\n").parse::<toml::Table>().unwrap()["s"]["password"].clone();
        assert_eq!(text("123456").try_into::<Secret>().unwrap().expose(), "123456");
        let e = text("[\"a\", \"b\"]").try_into::<Secret>().unwrap_err().to_string();
        assert!(e.contains("expected a secret (token or password) as a string") && !e.contains("untagged"), "{e}");
        let options: toml::Table = "[o]\n\"linger.ms\" = 5\n\"sasl.password\" = 987654\n".parse().unwrap();
        let o: KafkaOptions = options["o"].clone().try_into().unwrap();
        assert_eq!((o.0["linger.ms"].as_str(), o.0["sasl.password"].as_str()), ("5", "987654"));
    }
}
