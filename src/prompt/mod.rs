//! Prompt building: chat template rendering, tokenization and the truncation policy.

use serde::{Deserialize, Serialize};

/// What to do with a conversation longer than `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TruncationPolicy {
    /// Drop the oldest user/assistant exchanges (keeping the system message and the final
    /// exchange) until the conversation fits; fail with `too_long` if it never does.
    #[default]
    DropOldestTurns,
    /// Fail with `too_long`.
    Reject,
}
