//! Whether the Kafka brokers answer, for `/readyz`: a task asks the brokers for the metadata of
//! one subscribed topic every [`PROBE_INTERVAL`], and the `connected` watch follows the last
//! answer (false once a request found no broker within [`PROBE_TIMEOUT`], true again on the next
//! answer).
//!
//! A task of its own rather than librdkafka's error and statistics callbacks: those are served
//! only while the pipeline polls the consumer, and during an outage it stops polling (no output
//! is confirmed, so no room for more inputs), which would freeze the watch at "connected".

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the brokers are asked.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long one request may wait for a broker.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Run `probe` (blocking: true when a broker answered) every [`PROBE_INTERVAL`] and publish its
/// result on `connected`, logging each change.
pub(super) fn spawn_probe(probe: impl Fn() -> bool + Clone + Send + Sync + 'static, connected: watch::Sender<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let probe = probe.clone();
            let up = tokio::task::spawn_blocking(probe).await.unwrap_or(false);
            connected.send_if_modified(|was| {
                if *was == up {
                    return false;
                }
                if up {
                    tracing::info!("Kafka brokers answer again: ready");
                } else {
                    tracing::warn!(timeout = ?PROBE_TIMEOUT, "no Kafka broker answers: not ready");
                }
                *was = up;
                true
            });
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn the_watch_follows_the_probe_both_ways() {
        let up = Arc::new(AtomicBool::new(true));
        let (tx, mut rx) = watch::channel(true);
        let flag = up.clone();
        let task = spawn_probe(move || flag.load(Ordering::SeqCst), tx);
        up.store(false, Ordering::SeqCst);
        tokio::time::timeout(PROBE_INTERVAL * 3, rx.wait_for(|c| !*c)).await.unwrap().unwrap();
        up.store(true, Ordering::SeqCst);
        tokio::time::timeout(PROBE_INTERVAL * 3, rx.wait_for(|c| *c)).await.unwrap().unwrap();
        task.abort();
    }
}
