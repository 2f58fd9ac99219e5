//! Kafka clients shared by the source and the sinks: the worker's own librdkafka settings with
//! the user's pass-through options on top, the start-up reachability check, and the broker
//! errors librdkafka reports only through its error callback (TLS handshake, SASL
//! authentication), kept so that a failed start says why. The settings the source and the sink
//! share: [`KafkaOptions`] (raw librdkafka options, secrets redacted by `Debug`) and the
//! `brokers` list. [`ownership`]: which input partitions an exactly-once worker owns, ordered
//! against its transactions' commits.

pub mod ownership;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;

use serde::{Deserialize, Serialize};

use crate::settings::{is_secret_option, ScalarText};

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
pub(crate) fn brokers_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
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

/// How long a starting worker waits for the brokers to answer a metadata request.
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a Kafka client could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("{0}")]
    Options(String),
    #[error("invalid librdkafka configuration")]
    Create(#[source] KafkaError),
    #[error("cannot reach the Kafka brokers at {brokers} within {timeout:?}{reason}")]
    Unreachable {
        brokers: String,
        timeout: Duration,
        /// ": <last broker error>" when librdkafka reported one (TLS, SASL, refused).
        reason: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic {topic} is not on the Kafka brokers at {brokers} ({message})")]
    Topic { topic: String, brokers: String, message: String },
}

impl ClientError {
    /// The underlying client error, for an error that already shows this one's message.
    pub(crate) fn into_source(self) -> Option<Box<dyn std::error::Error + Send + Sync>> {
        match self {
            ClientError::Create(e) | ClientError::Unreachable { source: e, .. } => Some(Box::new(e)),
            ClientError::Options(_) | ClientError::Topic { .. } => None,
        }
    }
}

/// Remembers the last broker-level error librdkafka reported (its error callback).
#[derive(Debug, Default)]
pub(crate) struct LastError(Mutex<Option<String>>);

impl LastError {
    /// Keep `reason`; "all brokers down" only when nothing more specific was seen (it follows
    /// the TLS or authentication failure that caused it).
    pub fn record(&self, error: &KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka client error");
        let summary = error.rdkafka_error_code() == Some(rdkafka::error::RDKafkaErrorCode::AllBrokersDown);
        if let Ok(mut last) = self.0.lock() {
            if !(summary && last.is_some()) {
                *last = Some(if reason.is_empty() { error.to_string() } else { reason.to_owned() });
            }
        }
    }

    /// A librdkafka log line: forwarded to tracing; errors (a failed TLS handshake or SASL
    /// authentication is only logged) are kept as the last error.
    pub fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if log_line(level, facility, message) {
            if let Ok(mut last) = self.0.lock() {
                *last = Some(message.to_owned());
            }
        }
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|l| l.clone())
    }
}

/// Forward a librdkafka log line to tracing; true for errors.
pub(crate) fn log_line(level: RDKafkaLogLevel, facility: &str, message: &str) -> bool {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}");
            return true;
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
    false
}

/// A client context that only keeps the last broker error (producers; keep a clone of the
/// `Arc`, the producer does not give its context back).
#[derive(Debug, Default)]
pub(crate) struct ErrorContext {
    pub(crate) last_error: std::sync::Arc<LastError>,
}

impl ClientContext for ErrorContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.last_error.record(&error, reason);
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.last_error.log(level, facility, message);
    }
}

/// The start-up probe produces nothing.
impl ProducerContext for ErrorContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// `bootstrap.servers`, the worker's `defaults`, then the user's options (from the config and
/// from `option_files`), so a pass-through option always wins.
pub(crate) fn client_config(
    brokers: &str,
    defaults: &[(&str, &str)],
    options: &KafkaOptions,
    option_files: &BTreeMap<String, PathBuf>,
) -> Result<ClientConfig, ClientError> {
    let options = options.resolve(option_files).map_err(|e| ClientError::Options(e.to_string()))?;
    let mut config = ClientConfig::new();
    // rust-rdkafka takes the level from the `log` crate, which this binary does not use.
    config.set_log_level(RDKafkaLogLevel::Warning);
    config.set("bootstrap.servers", brokers);
    for (k, v) in defaults {
        config.set(*k, *v);
    }
    for (k, v) in &options {
        config.set(k, v);
    }
    Ok(config)
}

/// Ask the brokers for each of `topics`' metadata (the cluster's when `topics` is empty) with a
/// short-lived client of the same `config`, so that a worker with a wrong address, TLS setting
/// or credentials, or a missing topic, fails at start naming the broker's error. The client
/// serves its own event queue meanwhile: librdkafka reports TLS and SASL failures only as log
/// lines and error events there. Blocking: call it from a blocking thread.
pub(crate) fn check_reachable(config: &ClientConfig, brokers: &str, topics: &[&str]) -> Result<(), ClientError> {
    let mut config = config.clone();
    // Errors only: the consumer's settings would each warn "ignored" on this producer.
    config.set_log_level(RDKafkaLogLevel::Error);
    let context = ErrorContext::default();
    let last_error = context.last_error.clone();
    let probe: BaseProducer<ErrorContext> = config.create_with_context(context).map_err(ClientError::Create)?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let wanted: Vec<Option<&str>> = if topics.is_empty() { vec![None] } else { topics.iter().map(|t| Some(*t)).collect() };
    for topic in wanted {
        let metadata = loop {
            match probe.client().fetch_metadata(topic, Duration::from_secs(1)) {
                Ok(m) => break m,
                Err(source) => {
                    probe.poll(Duration::ZERO);
                    if Instant::now() >= deadline {
                        return Err(ClientError::Unreachable {
                            brokers: brokers.to_owned(),
                            timeout: STARTUP_TIMEOUT,
                            reason: last_error.get().map(|r| format!(": {r}")).unwrap_or_default(),
                            source,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let Some(topic) = topic else { continue };
        let found = metadata.topics().iter().find(|t| t.name() == topic);
        let problem = match found {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => continue,
            Some(t) => t.error().map(|e| format!("{:?}", rdkafka::error::RDKafkaErrorCode::from(e))).unwrap_or("no partitions".into()),
            None => "not found".into(),
        };
        return Err(ClientError::Topic { topic: topic.to_owned(), brokers: brokers.to_owned(), message: problem });
    }
    Ok(())
}

/// The default `transactional.id`: `scorestream-<hostname>` (the pod name on Kubernetes).
pub(crate) fn default_transactional_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("scorestream-{host}")
}

/// librdkafka's reason for `e`, as the error to keep as a source. rust-rdkafka's [`KafkaError`]
/// prints its inner error and also returns it as its source, so a logged chain would show the
/// reason twice; the inner error alone (librdkafka's message for a transactional call, else the
/// error code with its description) shows it once.
pub fn reason(e: KafkaError) -> Box<dyn std::error::Error + Send + Sync> {
    match e {
        KafkaError::Transaction(t) => Box::new(t),
        e => match e.rdkafka_error_code() {
            Some(code) if std::error::Error::source(&e).is_some() => Box::new(code),
            _ => Box::new(e),
        },
    }
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
    fn option_values_may_be_numbers() {
        let options: toml::Table = "[o]\n\"linger.ms\" = 5\n\"sasl.password\" = 987654\n".parse().unwrap();
        let o: KafkaOptions = options["o"].clone().try_into().unwrap();
        assert_eq!((o.0["linger.ms"].as_str(), o.0["sasl.password"].as_str()), ("5", "987654"));
    }
}
