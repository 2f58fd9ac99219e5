//! The worker's configuration: one serde tree read from a TOML file, overlaid with
//! `SCORESTREAM__<SECTION>__<KEY>` environment variables, then validated.
//!
//! Unknown keys are rejected everywhere; every default lives in this module (or beside its
//! section type); secrets are redacted by `Debug`, so `tracing::info!(?config)` is safe.

pub mod brokers;
mod env;
mod redact;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use brokers::{
    Delivery, FileSinkConfig, FileSourceConfig, KafkaOptions, KafkaSinkConfig, KafkaSourceConfig, NatsSinkConfig,
    NatsSourceConfig, NatsTls, OptionFileError, Secret, SinkConfig, SourceConfig,
};
pub use env::{overlay, ENV_PREFIX};

use crate::batch::policy::BatchLimits;
use crate::model::ModelOptions;

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
    pub metrics: crate::metrics::MetricsConfig,
    /// After SIGTERM/SIGINT, how long the worker may take to finish, publish and acknowledge
    /// what it has in flight before it exits anyway. Keep the pod's termination grace period
    /// above it.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

/// One `[[route]]` rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// A CEL expression over the scored event as published (`reward`, `attributes.<name>`,
    /// `tokens`, `truncated`, `model`, `metadata.<key>`); it must give a boolean. One that fails
    /// on an event dead-letters that event (kind `route`).
    pub when: String,
    /// The name of a `[sinks.<name>]` table, or `"drop"` to discard the event.
    pub to: String,
}

/// The `[batch]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most tokens in one forward pass (sum over its conversations).
    #[serde(default = "default_max_batch_tokens")]
    pub max_batch_tokens: usize,
    /// Most conversations in one forward pass.
    #[serde(default = "default_max_batch_events")]
    pub max_batch_events: usize,
    /// How long a partial batch waits for more events before it is scored anyway.
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// Most events consumed but not yet acknowledged; at the bound the worker stops fetching.
    /// Also bounds the duplicates a crash can cause.
    #[serde(default = "default_max_inflight_events")]
    pub max_inflight_events: usize,
    /// Largest accepted payload in bytes; larger ones are dead-lettered as `oversized`.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Most payload bytes consumed but not yet acknowledged (beside `max_inflight_events`, so a
    /// burst of large events cannot exhaust memory); at the bound the worker stops fetching. One
    /// event larger than the bound is still let through on its own.
    #[serde(default = "default_max_inflight_bytes")]
    pub max_inflight_bytes: usize,
    /// Batches in a row the model may fail on (an engine error, a stage panic) before the
    /// worker stops with an error, leaving the unacknowledged inputs to the broker's
    /// redelivery. Each failed batch is retried after a short backoff, and its events are
    /// neither dead-lettered nor acknowledged; `/healthz` fails meanwhile.
    #[serde(default = "default_max_failed_batches")]
    pub max_failed_batches: usize,
    /// Conversations of one batch whose token ids begin with the same `min_shared_prefix` or
    /// more tokens (a common system prompt) share that prefix: it is computed once for all of
    /// them, with the same scores. 0 turns sharing off. CPU engines only for now.
    #[serde(default = "default_min_shared_prefix")]
    pub min_shared_prefix: usize,
    /// Most candidates of one best-of-N event; an event with more is dead-lettered (`schema`).
    #[serde(default = "default_max_candidates")]
    pub max_candidates: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: default_max_batch_tokens(),
            max_batch_events: default_max_batch_events(),
            max_wait: default_max_wait(),
            max_inflight_events: default_max_inflight_events(),
            max_payload_bytes: default_max_payload_bytes(),
            max_inflight_bytes: default_max_inflight_bytes(),
            max_failed_batches: default_max_failed_batches(),
            min_shared_prefix: default_min_shared_prefix(),
            max_candidates: default_max_candidates(),
        }
    }
}

impl BatchConfig {
    pub fn limits(&self) -> BatchLimits {
        BatchLimits { max_tokens: self.max_batch_tokens, max_events: self.max_batch_events }
    }
}

/// The `[http]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `/healthz` fails (503) when events are in flight and none has finished for this long: a
    /// publish retried without end, a stuck engine. Keep it above the slowest batch.
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// A connection that has not sent a complete request header within this time (also while it
    /// idles between keep-alive requests) is closed.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Most open HTTP connections; a connection beyond it is closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Serve `POST /v1/score` on this listener (`scorestream serve` always does).
    #[serde(default)]
    pub score_api: bool,
    /// Most posted events waiting to be scored at a time; a request that would go over gets 429
    /// with `Retry-After`.
    #[serde(default = "default_max_pending_events")]
    pub max_pending_events: usize,
    /// Largest `/v1/score` request body in bytes; a larger one gets 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// A file holding the bearer token `/v1/score` requires (`Authorization: Bearer <token>`);
    /// without it, no token is asked for.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Serve `POST /v1/score` on this address instead of `listen` (which keeps `/metrics`,
    /// `/healthz` and `/readyz`), e.g. to expose the API on its own port.
    #[serde(default)]
    pub api_listen: Option<SocketAddr>,
    /// A `/v1/score` request body must arrive whole within this time after its header; a slower
    /// client gets 408 and none of its events is scored.
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// A response write that makes no progress for this long (a client that does not read its
    /// answer) closes the connection.
    #[serde(default = "default_write_timeout", with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            stall_timeout: default_stall_timeout(),
            header_timeout: default_header_timeout(),
            max_connections: default_max_connections(),
            score_api: false,
            max_pending_events: default_max_pending_events(),
            max_body_bytes: default_max_body_bytes(),
            token_file: None,
            api_listen: None,
            body_timeout: default_body_timeout(),
            write_timeout: default_write_timeout(),
        }
    }
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
const fn default_max_candidates() -> usize {
    crate::candidates::DEFAULT_MAX_CANDIDATES
}
const fn default_min_shared_prefix() -> usize {
    128
}
const fn default_max_batch_tokens() -> usize {
    16_384
}
const fn default_max_batch_events() -> usize {
    256
}
fn default_max_wait() -> Duration {
    Duration::from_millis(20)
}
const fn default_max_inflight_events() -> usize {
    1024
}
const fn default_max_payload_bytes() -> usize {
    1024 * 1024
}
const fn default_max_inflight_bytes() -> usize {
    256 * 1024 * 1024
}
const fn default_max_failed_batches() -> usize {
    3
}
fn default_stall_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_write_timeout() -> Duration {
    Duration::from_secs(30)
}
const fn default_max_connections() -> usize {
    128
}
const fn default_max_pending_events() -> usize {
    1024
}
const fn default_max_body_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
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

    /// Checks serde cannot express. Does not touch the network or the model directory.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let b = &self.batch;
        positive("batch.max_batch_tokens", b.max_batch_tokens)?;
        positive("batch.max_batch_events", b.max_batch_events)?;
        positive("batch.max_inflight_events", b.max_inflight_events)?;
        positive("batch.max_inflight_bytes", b.max_inflight_bytes)?;
        positive("batch.max_failed_batches", b.max_failed_batches)?;
        if self.model.max_tokens > b.max_batch_tokens {
            return invalid(
                "model.max_tokens",
                &format!(
                    "{} is above batch.max_batch_tokens ({}): a conversation that long could never be batched",
                    self.model.max_tokens, b.max_batch_tokens
                ),
            );
        }
        positive("http.max_connections", self.http.max_connections)?;
        positive("http.max_pending_events", self.http.max_pending_events)?;
        positive("http.max_body_bytes", self.http.max_body_bytes)?;
        positive("http.body_timeout", self.http.body_timeout.as_millis() as usize)?;
        positive("http.write_timeout", self.http.write_timeout.as_millis() as usize)?;
        if let Err(message) = self.metrics.check() {
            return invalid("metrics.reward_buckets", &message);
        }
        positive("model.max_tokens", self.model.max_tokens)?;
        if self.model.devices.is_empty() {
            return invalid("model.devices", "at least one device is needed");
        }
        for d in &self.model.devices {
            // The loader's parser, syntax only: whether this build and machine can run CUDA is
            // checked at `run`, so check-config works as a pre-deploy check from any build.
            if let Err(message) = d.parse::<crate::model::DeviceSpec>() {
                return invalid("model.devices", &format!("{d:?}: {message}"));
            }
        }
        // f32 never runs on a GPU; what a GPU can run is checked against it at `run`.
        if self.model.dtype == crate::model::Dtype::F32 && self.model.devices.iter().any(|d| d.starts_with("cuda")) {
            return invalid("model.dtype", &crate::engine::cuda::precision::PrecisionError::F32OnGpu.to_string());
        }
        if self.shutdown_timeout.is_zero() {
            return invalid("shutdown_timeout", "must be above zero");
        }
        validate_source(&self.source)?;
        validate_sink("sink", &self.sink)?;
        validate_sink("dead_letter", &self.dead_letter)?;
        self.validate_routes()?;
        self.validate_exactly_once()
    }

    /// Named sinks are valid sinks under names that are not reserved, and every rule compiles
    /// and names one of them (or `drop`).
    fn validate_routes(&self) -> Result<(), ConfigError> {
        for (name, sink) in &self.sinks {
            if name == crate::route::DROP || name == crate::route::DEFAULT || name.is_empty() {
                return invalid(&format!("sinks.{name}"), "this name is reserved for routing; choose another");
            }
            validate_sink(&format!("sinks.{name}"), sink)?;
            if matches!(sink, SinkConfig::Kafka(k) if k.delivery == Delivery::ExactlyOnce) {
                return invalid(&format!("sinks.{name}.delivery"), "exactly_once is set on [sink] only");
            }
        }
        crate::route::Router::compile(&self.route, self.sinks.keys())
            .map(|_| ())
            .map_err(|e| ConfigError::Invalid { field: "route".into(), message: e.to_string() })
    }

    /// Move credentials written into a NATS URL into the section's user/password or token, so
    /// that the URL can be logged and the credentials are used.
    fn take_url_credentials(&mut self) -> Result<(), ConfigError> {
        if let SourceConfig::Nats(n) = &mut self.source {
            take_url_credentials("source", &mut n.url, &mut n.user, &mut n.password, &mut n.token)?;
        }
        let named = self.sinks.iter_mut().map(|(name, sink)| (format!("sinks.{name}"), sink));
        let fixed = [("sink".to_owned(), &mut self.sink), ("dead_letter".to_owned(), &mut self.dead_letter)];
        for (section, sink) in fixed.into_iter().chain(named) {
            if let SinkConfig::Nats(n) = sink {
                take_url_credentials(&section, &mut n.url, &mut n.user, &mut n.password, &mut n.token)?;
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

fn validate_source(s: &SourceConfig) -> Result<(), ConfigError> {
    match s {
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
            nats_auth("source", n.token.is_some(), n.user.is_some(), n.password.is_some(), n.credentials_file.is_some())
        }
        SourceConfig::File(f) => non_empty("source.path", &f.path.to_string_lossy()),
    }
}

fn validate_sink(section: &str, s: &SinkConfig) -> Result<(), ConfigError> {
    let f = |name: &str| format!("{section}.{name}");
    match s {
        SinkConfig::Kafka(k) => {
            non_empty(&f("brokers"), &k.brokers)?;
            non_empty(&f("topic"), &k.topic)?;
            if section == "dead_letter" && k.delivery == Delivery::ExactlyOnce {
                return invalid(&f("delivery"), "set delivery on [sink]; the dead letters follow it");
            }
            Ok(())
        }
        SinkConfig::Nats(n) => {
            non_empty(&f("url"), &n.url)?;
            non_empty(&f("subject"), &n.subject)?;
            nats_auth(section, n.token.is_some(), n.user.is_some(), n.password.is_some(), n.credentials_file.is_some())
        }
        SinkConfig::File(file) => non_empty(&f("path"), &file.path.to_string_lossy()),
    }
}

fn take_url_credentials(
    section: &str,
    url: &mut String,
    user: &mut Option<String>,
    password: &mut Option<Secret>,
    token: &mut Option<Secret>,
) -> Result<(), ConfigError> {
    let field = format!("{section}.url");
    let (clean, creds) = crate::nats::split_url_credentials(url).map_err(|m| ConfigError::Invalid { field: field.clone(), message: m })?;
    let Some(creds) = creds else { return Ok(()) };
    *url = clean;
    if user.is_some() || password.is_some() || token.is_some() {
        return invalid(&field, "carries credentials while the section sets user/password or token too: give them once");
    }
    match creds {
        crate::nats::UrlCredentials::UserPassword { user: u, password: p } => {
            *user = Some(u);
            *password = Some(Secret(p));
        }
        crate::nats::UrlCredentials::Token(t) => *token = Some(Secret(t)),
    }
    Ok(())
}

fn nats_auth(section: &str, token: bool, user: bool, password: bool, creds: bool) -> Result<(), ConfigError> {
    let field = &format!("{section}.user");
    if user != password {
        return invalid(field, "user and password go together");
    }
    if [token, user, creds].iter().filter(|x| **x).count() > 1 {
        return invalid(field, "choose one of token, user/password, credentials_file");
    }
    Ok(())
}

fn positive(field: &str, v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        return invalid(field, "must be above zero");
    }
    Ok(())
}

fn non_empty(field: &str, v: &str) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        return invalid(field, "must not be empty");
    }
    Ok(())
}

fn invalid<T>(field: &str, message: &str) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid { field: field.to_owned(), message: message.to_owned() })
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
