//! The worker's configuration: one serde tree read from a TOML file, overlaid with
//! `SCORESTREAM__<SECTION>__<KEY>` environment variables, then validated.
//!
//! Each section's type, defaults and own checks live beside its component (Vector's layout):
//! `[model]` in `model::options`, `[batch]` in `batch::config`, `[source]` in `source::config`,
//! `[sink]`/`[dead_letter]`/`[sinks.<name>]` in `sink::config`, `[[route]]` in `sink::route`,
//! `[http]` in `http::config`, `[metrics]` in `metrics`. This module assembles the tree: loading,
//! the environment overlay, redaction of secrets in parse errors, and the checks that span
//! sections (a model length the batches can hold, routes that name existing sinks,
//! exactly-once on one Kafka cluster). Unknown keys are rejected everywhere; secrets are
//! redacted by `Debug`, so `tracing::info!(?config)` is safe.

mod env;
mod redact;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use env::{overlay, ENV_PREFIX};

/// The section types, under the tree they make up.
pub use crate::batch::BatchConfig;
pub use crate::http::HttpConfig;
pub use crate::metrics::MetricsConfig;
pub use crate::sink::route::RouteRule;
pub use crate::sink::{Delivery, SinkConfig};
pub use crate::source::SourceConfig;

use crate::model::ModelOptions;
use crate::settings::{invalid, Invalid};

/// Errors of loading or validating a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The parser's message, with the values of secret keys redacted (it quotes the line).
    #[error("{origin} is not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("invalid config: {source}")]
    Schema {
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A schema error located in the file: where (line, column, the line quoted with secrets
    /// redacted) and what.
    #[error("invalid config {origin}, {message}")]
    InFile { origin: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid config: {field}: {message}")]
    Invalid { field: String, message: String },
}

impl From<Invalid> for ConfigError {
    fn from(e: Invalid) -> Self {
        ConfigError::Invalid { field: e.field, message: e.message }
    }
}

/// The whole worker config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The reward model and how to run it.
    pub model: ModelOptions,
    /// Micro-batching and flow control.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Where input events come from.
    pub source: SourceConfig,
    /// Where scored events go.
    pub sink: SinkConfig,
    /// Where events that cannot be scored go, with the reason and the original payload.
    pub dead_letter: SinkConfig,
    /// Named outputs (`[sinks.<name>]`, any sink type) that `[[route]]` rules send scored
    /// events to; `[sink]` stays the default for events no rule matches.
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    /// Ordered routing rules over each scored event: the first whose `when` is true sends the
    /// event to its `to`; no match sends it to `[sink]`.
    #[serde(default)]
    pub route: Vec<RouteRule>,
    /// The metrics and health endpoint.
    #[serde(default)]
    pub http: HttpConfig,
    /// Histogram settings of the exported metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// After SIGTERM/SIGINT, how long the worker may take to finish, publish and acknowledge
    /// what it has in flight before it exits anyway. Keep the pod's termination grace period
    /// above it.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Config {
    /// Read `path`, overlay the process environment, validate.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml_with_env(&text, &path.display().to_string(), std::env::vars())
    }

    /// The config of `scorestream serve`: the same file, where `[source]`, `[sink]` and
    /// `[dead_letter]` may be left out (they are not used: posted events are answered to their
    /// requests).
    pub fn load_for_serve(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let origin = path.display().to_string();
        let mut tree: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            origin: origin.clone(),
            message: redact::redact_toml_error(&text, &e.to_string()),
        })?;
        for section in ["source", "sink", "dead_letter"] {
            if !tree.contains_key(section) {
                let mut unused = toml::Table::new();
                unused.insert("type".into(), "file".into());
                unused.insert("path".into(), "-".into());
                tree.insert(section.into(), toml::Value::Table(unused));
            }
        }
        let mut config: Config = overlay(tree, std::env::vars())?;
        config.take_url_credentials()?;
        config.http.score_api = true;
        config.validate()?;
        Ok(config)
    }

    /// Parse TOML text, overlay the given `(name, value)` variables, validate.
    pub fn from_toml_with_env(
        text: &str,
        origin: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let tree: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            origin: origin.to_owned(),
            message: redact::redact_toml_error(text, &e.to_string()),
        })?;
        let vars: Vec<(String, String)> = vars.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
        let mut config: Config = overlay(tree, vars.clone()).map_err(|e| locate(e, text, origin, &vars))?;
        config.take_url_credentials()?;
        config.validate().map_err(|e| name_override(e, &vars))?;
        Ok(config)
    }

    /// Checks serde cannot express: each section's own, then those that span sections. Does not
    /// touch the network or the model directory.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.batch.validate()?;
        if self.model.max_tokens > self.batch.max_batch_tokens {
            return invalid(
                "model.max_tokens",
                &format!(
                    "{} is above batch.max_batch_tokens ({}): a conversation that long could never be batched",
                    self.model.max_tokens, self.batch.max_batch_tokens
                ),
            );
        }
        self.http.validate()?;
        if let Err(message) = self.metrics.check() {
            return invalid("metrics.reward_buckets", &message);
        }
        self.model.validate()?;
        // f32 never runs on a GPU; what a GPU can run is checked against it at `run`.
        if self.model.dtype == crate::model::Dtype::F32 && self.model.devices.iter().any(|d| d.starts_with("cuda")) {
            return invalid("model.dtype", &crate::engine::cuda::precision::PrecisionError::F32OnGpu.to_string());
        }
        if self.shutdown_timeout.is_zero() {
            return invalid("shutdown_timeout", "must be above zero");
        }
        self.source.validate()?;
        self.sink.validate("sink")?;
        self.dead_letter.validate("dead_letter")?;
        if matches!(&self.dead_letter, SinkConfig::Kafka(k) if k.delivery == Delivery::ExactlyOnce) {
            return invalid("dead_letter.delivery", "set delivery on [sink]; the dead letters follow it");
        }
        self.validate_routes()?;
        self.validate_exactly_once()
    }

    /// Named sinks are valid sinks under names that are not reserved, and every rule compiles
    /// and names one of them (or `drop`).
    fn validate_routes(&self) -> Result<(), ConfigError> {
        for (name, sink) in &self.sinks {
            if name == crate::sink::route::DROP || name == crate::sink::route::DEFAULT || name.is_empty() {
                return invalid(&format!("sinks.{name}"), "this name is reserved for routing; choose another");
            }
            sink.validate(&format!("sinks.{name}"))?;
            if matches!(sink, SinkConfig::Kafka(k) if k.delivery == Delivery::ExactlyOnce) {
                return invalid(&format!("sinks.{name}.delivery"), "exactly_once is set on [sink] only");
            }
        }
        crate::sink::route::Router::compile(&self.route, self.sinks.keys())
            .map(|_| ())
            .map_err(|e| ConfigError::Invalid { field: "route".into(), message: e.to_string() })
    }

    /// Move credentials written into a NATS URL into the section's user/password or token, so
    /// that the URL can be logged and the credentials are used.
    fn take_url_credentials(&mut self) -> Result<(), ConfigError> {
        if let SourceConfig::Nats(n) = &mut self.source {
            crate::nats::take_url_credentials("source", &mut n.url, &mut n.user, &mut n.password, &mut n.token)?;
        }
        let named = self.sinks.iter_mut().map(|(name, sink)| (format!("sinks.{name}"), sink));
        let fixed = [("sink".to_owned(), &mut self.sink), ("dead_letter".to_owned(), &mut self.dead_letter)];
        for (section, sink) in fixed.into_iter().chain(named) {
            if let SinkConfig::Nats(n) = sink {
                crate::nats::take_url_credentials(&section, &mut n.url, &mut n.user, &mut n.password, &mut n.token)?;
            }
        }
        Ok(())
    }

    fn validate_exactly_once(&self) -> Result<(), ConfigError> {
        let SinkConfig::Kafka(sink) = &self.sink else { return Ok(()) };
        if sink.delivery != Delivery::ExactlyOnce {
            return Ok(());
        }
        // One transaction spans one producer: every named sink must be a Kafka topic on the
        // sink's brokers, written by the sink's transactional producer.
        for (name, named) in &self.sinks {
            match named {
                SinkConfig::Kafka(k) if k.brokers == sink.brokers => {}
                SinkConfig::Kafka(_) => {
                    return invalid(
                        &format!("sinks.{name}.brokers"),
                        "with exactly_once every named kafka sink must be on the [sink]'s brokers: its writes share the sink's transaction",
                    )
                }
                other => {
                    return invalid(
                        &format!("sinks.{name}.type"),
                        &format!(
                            "exactly_once cannot write to a {} sink: only kafka topics on the [sink]'s brokers can share its transaction",
                            other.kind()
                        ),
                    )
                }
            }
        }
        match (&self.source, &self.dead_letter) {
            (SourceConfig::Kafka(src), SinkConfig::Kafka(dl))
                if src.brokers == sink.brokers && dl.brokers == sink.brokers =>
            {
                Ok(())
            }
            _ => invalid(
                "sink.delivery",
                "exactly_once needs a kafka source and a kafka dead_letter on the sink's brokers",
            ),
        }
    }
}

/// `scorestream check-config --config FILE`: load, overlay the environment and validate, without
/// opening any connection or the model. Returns the config for printing.
pub fn check_config(path: &Path) -> Result<Config, ConfigError> {
    Config::load(path)
}

/// A value refused by [`Config::validate`] that an override set: name the variable too.
fn name_override(err: ConfigError, vars: &[(String, String)]) -> ConfigError {
    let ConfigError::Invalid { field, message } = &err else { return err };
    let var = vars.iter().map(|(k, _)| k).find(|k| k[ENV_PREFIX.len()..].to_ascii_lowercase().replace("__", ".") == *field);
    match var {
        Some(var) => ConfigError::Env { var: var.clone(), message: format!("{field}: {message}") },
        None => err,
    }
}

/// Say where a schema error comes from: the `SCORESTREAM__` variables that set the failing key
/// (or a key above or below it), else the file's line and column, when the file alone fails the
/// same way. Otherwise the error as it is.
fn locate(err: ConfigError, text: &str, origin: &str, vars: &[(String, String)]) -> ConfigError {
    let ConfigError::Schema { source } = &err else { return err };
    let message = source.message().trim_end().to_owned();
    // toml names the failing key on the error's last line: "in `batch.max_wait`".
    let rendered = source.to_string();
    let key = rendered.trim_end().rsplit_once("\nin `").and_then(|(_, k)| k.strip_suffix('`')).map(str::to_owned);
    if let Some(key) = key {
        let related = |var: &str| {
            let path = var[ENV_PREFIX.len()..].to_ascii_lowercase().replace("__", ".");
            path == key || path.starts_with(&format!("{key}.")) || key.starts_with(&format!("{path}."))
        };
        let set: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).filter(|k| related(k)).collect();
        if !set.is_empty() {
            return ConfigError::Env { var: set.join(", "), message: format!("{message} (in `{key}`)") };
        }
    }
    match toml::from_str::<Config>(text) {
        Err(e) if e.span().is_some() && e.message().trim_end() == message => {
            let located = e.to_string().replacen("TOML parse error at ", "", 1);
            ConfigError::InFile { origin: origin.to_owned(), message: redact::redact_toml_error(text, located.trim_end()) }
        }
        _ => err,
    }
}
