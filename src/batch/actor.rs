//! The batcher actor: groups prepared items, in arrival order, into micro-batches bounded by
//! [`BatchLimits`] and by `max_wait` since a batch's first item.
//!
//! It hands batches to the model stage over a capacity-1 channel, so one batch waits ready
//! while the model runs the current one ("prefetch one batch"); while that slot is full the
//! batcher stops reading, and the backpressure travels upstream.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::policy::BatchLimits;

/// How many tokens an item brings to a forward pass (0 for items that skip the model, such as
/// events already known to be dead letters: they still take a slot of `max_events`).
pub(crate) trait Weighted {
    fn tokens(&self) -> usize;
    /// Sequences it sends to the model, counted against `max_events` (a best-of-N event sends
    /// one per candidate). At least 1.
    fn sequences(&self) -> usize {
        1
    }
}

/// Run until `rx` closes (then flush what is left) or `tx`'s receiver is gone.
pub async fn run<T: Weighted>(
    mut rx: mpsc::Receiver<T>,
    tx: mpsc::Sender<Vec<T>>,
    limits: BatchLimits,
    max_wait: Duration,
) {
    let mut batch: Vec<T> = Vec::new();
    let (mut tokens, mut sequences) = (0usize, 0usize);
    let mut deadline = Instant::now();
    loop {
        let item = if batch.is_empty() {
            rx.recv().await
        } else {
            tokio::select! {
                item = rx.recv() => item,
                () = tokio::time::sleep_until(deadline) => {
                    if tx.send(std::mem::take(&mut batch)).await.is_err() { return; }
                    continue;
                }
            }
        };
        let Some(item) = item else { break };
        let (len, seqs) = (item.tokens(), item.sequences().max(1));
        let full = !batch.is_empty() && (!limits.admits(sequences, tokens, len) || sequences + seqs > limits.max_events);
        if full && tx.send(std::mem::take(&mut batch)).await.is_err() {
            return;
        }
        if batch.is_empty() {
            (tokens, sequences) = (0, 0);
            deadline = Instant::now() + max_wait;
        }
        tokens += len;
        sequences += seqs;
        batch.push(item);
        if sequences >= limits.max_events && tx.send(std::mem::take(&mut batch)).await.is_err() {
            return;
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(batch).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Weighted for usize {
        fn tokens(&self) -> usize {
            *self
        }
    }

    async fn batches(items: Vec<usize>, limits: BatchLimits, wait: Duration) -> Vec<Vec<usize>> {
        let (in_tx, in_rx) = mpsc::channel(16);
        let (out_tx, mut out_rx) = mpsc::channel(1);
        tokio::spawn(run(in_rx, out_tx, limits, wait));
        tokio::spawn(async move {
            for i in items {
                in_tx.send(i).await.unwrap();
            }
        });
        let mut got = Vec::new();
        while let Some(b) = out_rx.recv().await {
            got.push(b);
        }
        got
    }

    #[tokio::test]
    async fn packs_in_order_within_limits() {
        let limits = BatchLimits { max_tokens: 10, max_events: 3 };
        let got = batches(vec![4, 4, 4, 1, 1, 1, 1, 20, 0], limits, Duration::from_secs(60)).await;
        assert_eq!(got, vec![vec![4, 4], vec![4, 1, 1], vec![1, 1], vec![20], vec![0]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_leaves_after_max_wait() {
        let limits = BatchLimits { max_tokens: 100, max_events: 100 };
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(1);
        tokio::spawn(run(in_rx, out_tx, limits, Duration::from_millis(20)));
        let start = Instant::now();
        in_tx.send(3usize).await.unwrap();
        in_tx.send(4usize).await.unwrap();
        assert_eq!(out_rx.recv().await, Some(vec![3, 4]));
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        drop(in_tx);
        assert_eq!(out_rx.recv().await, None);
    }
}
