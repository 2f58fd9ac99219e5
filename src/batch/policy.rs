//! The packing policy, pure and synchronous: which consecutive items go in one batch.

use std::ops::Range;

/// Bounds of one micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most tokens in one batch (sum of sequence lengths). A single item longer than this
    /// still forms a batch of its own.
    pub max_tokens: usize,
    /// Most items in one batch.
    pub max_events: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self { max_tokens: Self::DEFAULT_MAX_TOKENS, max_events: Self::DEFAULT_MAX_EVENTS }
    }
}

impl BatchLimits {
    /// The defaults of `[batch]`, `score` and `inspect` (one place for all three).
    pub const DEFAULT_MAX_TOKENS: usize = 16_384;
    pub const DEFAULT_MAX_EVENTS: usize = 256;

    /// Whether an item of `len` tokens can join a batch already holding `events` items and
    /// `tokens` tokens. An empty batch accepts anything.
    pub(crate) fn admits(&self, events: usize, tokens: usize, len: usize) -> bool {
        events == 0 || (events < self.max_events && tokens + len <= self.max_tokens)
    }
}

/// Split items with the given lengths, in order, into consecutive batches within `limits`.
pub fn pack(lengths: &[usize], limits: &BatchLimits) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, &len) in lengths.iter().enumerate() {
        if !limits.admits(i - start, tokens, len) {
            out.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += len;
    }
    if start < lengths.len() {
        out.push(start..lengths.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_by_tokens_and_events() {
        let limits = BatchLimits { max_tokens: 10, max_events: 2 };
        assert_eq!(pack(&[4, 4, 4, 9, 20, 1], &limits), vec![0..2, 2..3, 3..4, 4..5, 5..6]);
        assert_eq!(pack(&[1, 1, 1], &limits), vec![0..2, 2..3]);
        assert!(pack(&[], &limits).is_empty());
    }
}
