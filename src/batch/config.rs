//! The `[batch]` section: micro-batch bounds, flow control (what may be in flight), payload and
//! best-of-N limits, and how many failed batches in a row the worker tolerates; every default
//! here, with the section's own checks ([`BatchConfig::validate`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::policy::BatchLimits;
use crate::settings::{positive, Invalid};

/// Most candidates of one best-of-N event, unless `batch.max_candidates` says otherwise.
pub(crate) const DEFAULT_MAX_CANDIDATES: usize = 64;

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

    /// Checks serde cannot express; fields are named `batch.<key>`.
    pub fn validate(&self) -> Result<(), Invalid> {
        positive("batch.max_batch_tokens", self.max_batch_tokens)?;
        positive("batch.max_batch_events", self.max_batch_events)?;
        positive("batch.max_inflight_events", self.max_inflight_events)?;
        positive("batch.max_inflight_bytes", self.max_inflight_bytes)?;
        positive("batch.max_failed_batches", self.max_failed_batches)
    }
}

const fn default_max_candidates() -> usize {
    DEFAULT_MAX_CANDIDATES
}
const fn default_min_shared_prefix() -> usize {
    128
}
const fn default_max_batch_tokens() -> usize {
    BatchLimits::DEFAULT_MAX_TOKENS
}
const fn default_max_batch_events() -> usize {
    BatchLimits::DEFAULT_MAX_EVENTS
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
