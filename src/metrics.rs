//! Every metric the worker exports, declared once, registered in one [`Registry`].
//!
//! Label values come from bounded sets: `source` is a source type, `reason` an
//! [`ErrorKind`](crate::event::ErrorKind) wire name, `attribute` a model label (or "reward"),
//! `topic`/`partition` the assigned Kafka partitions.

use prometheus::{
    exponential_buckets, CounterVec, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use serde::{Deserialize, Serialize};

use crate::event::ErrorKind;

/// Bucket bounds (seconds) of the latency histograms: from 5 ms to 4 h, so that a backlog
/// drained over hours still has a quantile below the top bucket (a quantile in the +Inf bucket
/// reads as the top bound, so alerts on a threshold at or above it can never fire).
/// helm/scorestream's `scorestream.latencyTopBucket` repeats the last bound (tests/helm.rs checks).
pub const LATENCY_BUCKETS: [f64; 22] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
    1800.0, 3600.0, 7200.0, 14400.0,
];

/// The `[metrics]` section of the worker config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Upper bounds of the `scorestream_reward` histogram buckets, increasing (+Inf is added).
    /// Default: -10 to 10 in steps of 0.5; set them to the range of the model's rewards.
    #[serde(default = "default_reward_buckets")]
    pub reward_buckets: Vec<f64>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { reward_buckets: default_reward_buckets() }
    }
}

impl MetricsConfig {
    /// Why the buckets cannot be used, if they cannot: empty, not finite, or not increasing.
    pub fn check(&self) -> Result<(), String> {
        let b = &self.reward_buckets;
        if b.is_empty() {
            return Err("at least one bucket bound is needed".into());
        }
        if let Some(x) = b.iter().find(|x| !x.is_finite()) {
            return Err(format!("{x} is not a finite bound (+Inf is always added)"));
        }
        match b.windows(2).find(|w| w[0] >= w[1]) {
            Some(w) => Err(format!("bounds must increase: {} then {}", w[0], w[1])),
            None => Ok(()),
        }
    }
}

fn default_reward_buckets() -> Vec<f64> {
    (-20..=20).map(|i| f64::from(i) * 0.5).collect()
}

/// Errors of the metrics registry.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot register metric: {0}")]
    Register(#[source] prometheus::Error),
    #[error("cannot encode metrics: {0}")]
    Encode(#[source] prometheus::Error),
}

/// The worker's metrics. Create one per worker and share it (`Arc<Metrics>`).
pub struct Metrics {
    registry: Registry,
    /// Records read from the source, by source type.
    pub events_consumed: IntCounterVec,
    /// Events whose score was published and acknowledged, by delivery: "first", "replay" (the
    /// broker redelivered the input: JetStream's delivery count), "unknown" (Kafka cannot tell).
    pub(crate) events_scored: IntCounterVec,
    /// Events dead-lettered, by reason (an `ErrorKind` wire name).
    pub events_failed: IntCounterVec,
    /// Tokens of scored events (after templating and truncation).
    pub(crate) tokens_scored: IntCounter,
    /// Conversations per forward pass.
    pub(crate) batch_events: Histogram,
    /// Tokens per forward pass.
    pub(crate) batch_tokens: Histogram,
    /// Time of one forward pass, as seen by the worker.
    pub(crate) forward_seconds: Histogram,
    /// From consuming an event to its output's broker acknowledgement.
    pub(crate) event_latency_seconds: Histogram,
    /// Events consumed and not yet acknowledged.
    pub inflight_events: IntGauge,
    /// Kafka consumer lag per assigned partition (high watermark minus position).
    pub consumer_lag: IntGaugeVec,
    /// Published rewards, by attribute ("reward" is the scalar reward).
    pub reward: HistogramVec,
    /// Always 1; labels describe the loaded model.
    pub(crate) model_info: IntGaugeVec,
    /// Seconds each engine stage spent computing; its rate is the stage's utilisation.
    pub stage_busy_seconds: CounterVec,
    /// Kafka exactly-once: producer transactions, by outcome ("committed", "aborted").
    pub(crate) kafka_transactions: IntCounterVec,
    /// Publishes retried after a transient error, by output ("scored", "dead_letter").
    pub(crate) publish_retries: IntCounterVec,
    /// Messages the broker refused for good (too large, invalid), by output.
    pub(crate) publish_rejected: IntCounterVec,
    /// First publishes of an output that a de-duplicating broker reported as duplicates: an id
    /// collision, the output may be lost.
    pub(crate) dedup_collisions: IntCounter,
    /// Always 1; labels describe this binary (`version`, git `revision`, cargo `features`).
    pub(crate) build_info: IntGaugeVec,
    /// Seconds the model (tokenizer, weights onto every device) took to load at start.
    pub(crate) model_load_seconds: Gauge,
    /// Scored events delivered, by route: a `[sinks.<name>]` name, "drop" or "default".
    pub routed: IntCounterVec,
    /// Tokens not recomputed because a batch's sequences shared a prefix.
    pub prefix_tokens_shared: IntCounter,
    /// Candidates per best-of-N event.
    pub candidates: Histogram,
}

/// Every metric name, declared once.
pub(crate) const EVENTS_CONSUMED_TOTAL: &str = "scorestream_events_consumed_total";
pub(crate) const EVENTS_SCORED_TOTAL: &str = "scorestream_events_scored_total";
pub(crate) const EVENTS_FAILED_TOTAL: &str = "scorestream_events_failed_total";
pub(crate) const TOKENS_SCORED_TOTAL: &str = "scorestream_tokens_scored_total";
pub(crate) const BATCH_EVENTS: &str = "scorestream_batch_events";
pub(crate) const BATCH_TOKENS: &str = "scorestream_batch_tokens";
pub(crate) const FORWARD_SECONDS: &str = "scorestream_forward_seconds";
pub(crate) const EVENT_LATENCY_SECONDS: &str = "scorestream_event_latency_seconds";
pub(crate) const INFLIGHT_EVENTS: &str = "scorestream_inflight_events";
pub(crate) const CONSUMER_LAG: &str = "scorestream_consumer_lag";
pub(crate) const REWARD: &str = "scorestream_reward";
pub(crate) const MODEL_INFO: &str = "scorestream_model_info";
pub(crate) const STAGE_BUSY_SECONDS_TOTAL: &str = "scorestream_stage_busy_seconds_total";
pub(crate) const KAFKA_TRANSACTIONS_TOTAL: &str = "scorestream_kafka_transactions_total";
pub(crate) const PUBLISH_RETRIES_TOTAL: &str = "scorestream_publish_retries_total";
pub(crate) const PUBLISH_REJECTED_TOTAL: &str = "scorestream_publish_rejected_total";
pub(crate) const DEDUP_COLLISIONS_TOTAL: &str = "scorestream_dedup_collisions_total";
pub(crate) const BUILD_INFO: &str = "scorestream_build_info";
pub(crate) const MODEL_LOAD_SECONDS: &str = "scorestream_model_load_seconds";
pub(crate) const ROUTED_TOTAL: &str = "scorestream_routed_total";
pub(crate) const PREFIX_TOKENS_SHARED_TOTAL: &str = "scorestream_prefix_tokens_shared_total";
pub(crate) const CANDIDATES: &str = "scorestream_candidates";

/// Every metric name, for tests and dashboards.
pub const NAMES: [&str; 22] = [
    EVENTS_CONSUMED_TOTAL,
    EVENTS_SCORED_TOTAL,
    EVENTS_FAILED_TOTAL,
    TOKENS_SCORED_TOTAL,
    BATCH_EVENTS,
    BATCH_TOKENS,
    FORWARD_SECONDS,
    EVENT_LATENCY_SECONDS,
    INFLIGHT_EVENTS,
    CONSUMER_LAG,
    REWARD,
    MODEL_INFO,
    STAGE_BUSY_SECONDS_TOTAL,
    KAFKA_TRANSACTIONS_TOTAL,
    PUBLISH_RETRIES_TOTAL,
    PUBLISH_REJECTED_TOTAL,
    DEDUP_COLLISIONS_TOTAL,
    BUILD_INFO,
    MODEL_LOAD_SECONDS,
    ROUTED_TOTAL,
    PREFIX_TOKENS_SHARED_TOTAL,
    CANDIDATES,
];

/// This binary's version, git revision ("unknown" outside a git checkout) and enabled cargo
/// features (comma separated), as recorded by build.rs.
pub(crate) const BUILD: [&str; 3] = [env!("CARGO_PKG_VERSION"), env!("SCORESTREAM_GIT_REVISION"), env!("SCORESTREAM_FEATURES")];

/// `route` label values of `scorestream_routed_total` whatever the config: events no `[[route]]`
/// rule matched, and events a rule dropped (`to = "drop"`, the destination's name too). Each
/// named sink adds its own name.
pub const ROUTE_DEFAULT: &str = "default";
pub const ROUTE_DROP: &str = "drop";

/// The `delivery` label values of `scorestream_events_scored_total`.
pub(crate) const DELIVERIES: [&str; 3] = ["first", "replay", "unknown"];

/// The `delivery` label of an input that was (`Some(true)`), was not, or may have been
/// (`None`) delivered before.
pub(crate) fn delivery_label(redelivered: Option<bool>) -> &'static str {
    match redelivered {
        Some(false) => DELIVERIES[0],
        Some(true) => DELIVERIES[1],
        None => DELIVERIES[2],
    }
}

fn hist(name: &str, help: &str, buckets: Vec<f64>) -> Result<Histogram, MetricsError> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).map_err(MetricsError::Register)
}

impl Metrics {
    /// The metrics with the default `[metrics]` settings.
    pub fn new() -> Result<Self, MetricsError> {
        Self::with_config(&MetricsConfig::default())
    }

    pub(crate) fn with_config(config: &MetricsConfig) -> Result<Self, MetricsError> {
        let r = |e| MetricsError::Register(e);
        let seconds = LATENCY_BUCKETS.to_vec();
        let sizes = exponential_buckets(1.0, 2.0, 12).map_err(r)?;
        let tokens = exponential_buckets(16.0, 2.0, 14).map_err(r)?;
        let rewards = config.reward_buckets.clone();
        let m = Self {
            registry: Registry::new(),
            events_consumed: IntCounterVec::new(Opts::new(EVENTS_CONSUMED_TOTAL, "Records read from the source."), &["source"])
                .map_err(r)?,
            events_scored: IntCounterVec::new(
                Opts::new(EVENTS_SCORED_TOTAL, "Events whose score was published and acknowledged, by delivery."),
                &["delivery"],
            )
            .map_err(r)?,
            events_failed: IntCounterVec::new(Opts::new(EVENTS_FAILED_TOTAL, "Events dead-lettered, by reason."), &["reason"])
                .map_err(r)?,
            tokens_scored: IntCounter::new(TOKENS_SCORED_TOTAL, "Tokens of scored events.").map_err(r)?,
            batch_events: hist(BATCH_EVENTS, "Conversations per forward pass.", sizes.clone())?,
            batch_tokens: hist(BATCH_TOKENS, "Tokens per forward pass.", tokens)?,
            forward_seconds: hist(FORWARD_SECONDS, "Time of one forward pass.", seconds.clone())?,
            event_latency_seconds: hist(EVENT_LATENCY_SECONDS, "Consume to publish acknowledgement.", seconds)?,
            inflight_events: IntGauge::new(INFLIGHT_EVENTS, "Events consumed and not yet acknowledged.").map_err(r)?,
            consumer_lag: IntGaugeVec::new(
                Opts::new(CONSUMER_LAG, "Kafka consumer lag per assigned partition."),
                &["topic", "partition"],
            )
            .map_err(r)?,
            reward: HistogramVec::new(
                HistogramOpts::new(REWARD, "Published rewards, by attribute.").buckets(rewards),
                &["attribute"],
            )
            .map_err(r)?,
            model_info: IntGaugeVec::new(
                Opts::new(MODEL_INFO, "The loaded model (always 1)."),
                &["model", "dtype", "device"],
            )
            .map_err(r)?,
            stage_busy_seconds: CounterVec::new(
                Opts::new(STAGE_BUSY_SECONDS_TOTAL, "Seconds each engine stage spent computing."),
                &["stage", "device"],
            )
            .map_err(r)?,
            kafka_transactions: IntCounterVec::new(
                Opts::new(KAFKA_TRANSACTIONS_TOTAL, "Kafka exactly-once producer transactions, by outcome."),
                &["outcome"],
            )
            .map_err(r)?,
            publish_retries: IntCounterVec::new(
                Opts::new(PUBLISH_RETRIES_TOTAL, "Publishes retried after a transient error, by output."),
                &["output"],
            )
            .map_err(r)?,
            publish_rejected: IntCounterVec::new(
                Opts::new(PUBLISH_REJECTED_TOTAL, "Messages the broker refused for good (too large, invalid), by output."),
                &["output"],
            )
            .map_err(r)?,
            dedup_collisions: IntCounter::new(
                DEDUP_COLLISIONS_TOTAL,
                "First publishes reported as duplicates by a de-duplicating broker (id collisions).",
            )
            .map_err(r)?,
            build_info: IntGaugeVec::new(
                Opts::new(BUILD_INFO, "This binary (always 1)."),
                &["version", "revision", "features"],
            )
            .map_err(r)?,
            model_load_seconds: Gauge::new(MODEL_LOAD_SECONDS, "Seconds the model took to load at start.").map_err(r)?,
            routed: IntCounterVec::new(Opts::new(ROUTED_TOTAL, "Scored events delivered, by route."), &["route"])
                .map_err(r)?,
            prefix_tokens_shared: IntCounter::new(PREFIX_TOKENS_SHARED_TOTAL, "Tokens not recomputed because sequences of a batch shared a prefix.")
                .map_err(r)?,
            candidates: hist(CANDIDATES, "Candidates per best-of-N event.", sizes)?,
        };
        m.register_all()?;
        m.build_info.with_label_values(&BUILD).set(1);
        for kind in ErrorKind::ALL {
            m.events_failed.with_label_values(&[kind.as_str()]);
        }
        for outcome in ["committed", "aborted"] {
            m.kafka_transactions.with_label_values(&[outcome]);
        }
        for delivery in DELIVERIES {
            m.events_scored.with_label_values(&[delivery]);
        }
        for route in [ROUTE_DEFAULT, ROUTE_DROP] {
            m.routed.with_label_values(&[route]);
        }
        for output in ["scored", "dead_letter"] {
            m.publish_retries.with_label_values(&[output]);
            m.publish_rejected.with_label_values(&[output]);
        }
        Ok(m)
    }

    fn register_all(&self) -> Result<(), MetricsError> {
        let collectors: [Box<dyn prometheus::core::Collector>; 22] = [
            Box::new(self.events_consumed.clone()),
            Box::new(self.events_scored.clone()),
            Box::new(self.events_failed.clone()),
            Box::new(self.tokens_scored.clone()),
            Box::new(self.batch_events.clone()),
            Box::new(self.batch_tokens.clone()),
            Box::new(self.forward_seconds.clone()),
            Box::new(self.event_latency_seconds.clone()),
            Box::new(self.inflight_events.clone()),
            Box::new(self.consumer_lag.clone()),
            Box::new(self.reward.clone()),
            Box::new(self.model_info.clone()),
            Box::new(self.stage_busy_seconds.clone()),
            Box::new(self.kafka_transactions.clone()),
            Box::new(self.publish_retries.clone()),
            Box::new(self.publish_rejected.clone()),
            Box::new(self.dedup_collisions.clone()),
            Box::new(self.build_info.clone()),
            Box::new(self.model_load_seconds.clone()),
            Box::new(self.routed.clone()),
            Box::new(self.prefix_tokens_shared.clone()),
            Box::new(self.candidates.clone()),
        ];
        for c in collectors {
            self.registry.register(c).map_err(MetricsError::Register)?;
        }
        Ok(())
    }

    /// Record the loaded model: one `scorestream_model_info` series per device.
    pub fn set_model_info(&self, model: &str, dtype: &str, devices: &[String]) {
        for device in devices {
            self.model_info.with_label_values(&[model, dtype, device]).set(1);
        }
    }

    /// Bring `scorestream_stage_busy_seconds_total` up to the engine's totals (`busy[i]` for
    /// stage `i` on `devices[i]`). Totals only grow, so the counter advances by the difference.
    pub fn update_stage_busy(&self, busy: &[f64], devices: &[String]) {
        for (i, (total, device)) in busy.iter().zip(devices).enumerate() {
            let c = self.stage_busy_seconds.with_label_values(&[i.to_string().as_str(), device.as_str()]);
            let delta = total - c.get();
            if delta > 0.0 {
                c.inc_by(delta);
            }
        }
    }

    /// Bring `scorestream_prefix_tokens_shared_total` up to the engine's total.
    pub(crate) fn update_prefix_tokens_shared(&self, total: u64) {
        let delta = total.saturating_sub(self.prefix_tokens_shared.get());
        self.prefix_tokens_shared.inc_by(delta);
    }

    /// Events scored, whatever their delivery.
    pub(crate) fn events_scored_total(&self) -> u64 {
        DELIVERIES.iter().map(|d| self.events_scored.with_label_values(&[d]).get()).sum()
    }

    /// Events dead-lettered, whatever their reason.
    pub(crate) fn events_failed_total(&self) -> u64 {
        ErrorKind::ALL.iter().map(|k| self.events_failed.with_label_values(&[k.as_str()]).get()).sum()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).map_err(MetricsError::Encode)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_every_name() {
        let m = Metrics::new().unwrap();
        m.events_consumed.with_label_values(&["file"]).inc();
        m.consumer_lag.with_label_values(&["t", "0"]).set(3);
        m.reward.with_label_values(&["reward"]).observe(0.5);
        m.set_model_info("arith", "f32", &["cpu".to_owned()]);
        m.update_stage_busy(&[1.5], &["cpu".to_owned()]);
        m.update_stage_busy(&[2.0], &["cpu".to_owned()]);
        assert_eq!(m.stage_busy_seconds.with_label_values(&["0", "cpu"]).get(), 2.0);
        let text = m.render().unwrap();
        for name in NAMES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains("scorestream_events_failed_total{reason=\"too_long\"} 0"));
        let build = format!(
            "scorestream_build_info{{features=\"{}\",revision=\"{}\",version=\"{}\"}} 1",
            BUILD[2], BUILD[1], BUILD[0]
        );
        assert!(text.contains(&build), "{build} missing");
        assert!(!BUILD[1].is_empty() && cfg!(feature = "cuda") == BUILD[2].contains("cuda"));
    }

    #[test]
    fn latency_buckets_reach_hours_and_reward_buckets_follow_the_config() {
        let m = Metrics::with_config(&MetricsConfig { reward_buckets: vec![0.0, 0.25, 1.0] }).unwrap();
        m.event_latency_seconds.observe(5400.0);
        m.reward.with_label_values(&["reward"]).observe(0.3);
        let text = m.render().unwrap();
        assert!(text.contains("scorestream_event_latency_seconds_bucket{le=\"7200\"} 1"), "{text}");
        assert!(text.contains("scorestream_event_latency_seconds_bucket{le=\"3600\"} 0"), "{text}");
        assert!(text.contains("scorestream_forward_seconds_bucket{le=\"14400\"} 0"), "{text}");
        let rewards: Vec<&str> = text.lines().filter(|l| l.starts_with("scorestream_reward_bucket")).collect();
        assert_eq!(rewards.len(), 4, "{rewards:?}");
        assert!(rewards[1].contains("le=\"0.25\"") && rewards[1].ends_with(" 0") && rewards[2].ends_with(" 1"), "{rewards:?}");
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]) && LATENCY_BUCKETS[21] >= 3600.0);
        let bad = |b: Vec<f64>| MetricsConfig { reward_buckets: b }.check().unwrap_err();
        assert!(bad(vec![]).contains("at least one"));
        assert!(bad(vec![1.0, 1.0]).contains("increase"));
        assert!(bad(vec![f64::NAN]).contains("finite"));
        assert!(MetricsConfig::default().check().is_ok());
    }
}
