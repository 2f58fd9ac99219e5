//! The pipeline under exactly-once: each batch's outputs and input positions committed through a
//! [`BatchCommit`], replayed after an abort, and the inputs of revoked partitions left out.
use super::*;

/// Records the exactly-once call sequence.
struct Txn(Arc<std::sync::Mutex<Vec<String>>>, std::sync::atomic::AtomicBool);
impl BatchCommit for Txn {
    fn begin(&self) -> BoxFuture<'_, Result<(), crate::sink::SinkError>> {
        self.0.lock().unwrap().push("begin".into());
        Box::pin(async { Ok(()) })
    }
    fn commit<'a>(&'a self, inputs: &'a [Origin]) -> BoxFuture<'a, Result<(), crate::sink::SinkError>> {
        self.0.lock().unwrap().push(format!("commit {}", inputs.len()));
        // The first commit fails: the batch must be aborted and redone.
        let fail = !self.1.swap(true, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if fail {
                return Err(crate::sink::SinkError::Transaction {
                    kind: "test",
                    message: "fenced".into(),
                    source: None,
                });
            }
            Ok(())
        })
    }
    fn abort(&self) -> BoxFuture<'_, Result<(), crate::sink::SinkError>> {
        self.0.lock().unwrap().push("abort".into());
        Box::pin(async { Ok(()) })
    }
}

/// Three inputs from a file through the `Length` scorer into a sink that confirms everything
/// (outputs and dead letters), committed through `commit`; the sink (what it was given) and the
/// metrics once the run has ended.
async fn run_exactly_once(commit: Arc<dyn BatchCommit>) -> (Arc<Stuck>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new().unwrap());
    let (_go_tx, go) = watch::channel(true);
    let sink = Arc::new(Stuck(go, Default::default()));
    let parts = Parts {
        source: endless(3),
        source_kind: "file",
        preparer: Arc::new(Bytewise),
        scorer: Arc::new(Length),
        sink: sink.clone(),
        dead_letter: sink.clone(),
        routes: Default::default(),
        commit: Some(commit),
        metrics: metrics.clone(),
        liveness: Default::default(),
    };
    let (_stop_tx, stop) = watch::channel(false);
    run(parts, settings(8, 50, 8), stop).await.unwrap();
    (sink, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_commits_each_batch_and_retries_after_abort() {
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (sink, metrics) = run_exactly_once(Arc::new(Txn(log.clone(), Default::default()))).await;
    assert_eq!(*log.lock().unwrap(), ["begin", "commit 3", "abort", "begin", "commit 3"]);
    assert_eq!(sink.1.lock().unwrap().len(), 6, "the batch is published again after the abort");
    assert_eq!(metrics.events_scored_total(), 3);
    assert_eq!(metrics.batch_events.get_sample_sum(), 3.0, "the replayed batch is not scored or counted again");
    let transactions = |outcome| metrics.kafka_transactions.with_label_values(&[outcome]).get();
    assert_eq!((transactions("committed"), transactions("aborted")), (0, 0), "the batch commit counts its own outcomes");
}

/// Exactly-once across a rebalance: the first commit finds the second input's partition
/// revoked (it fails, as the Kafka transactions do); the replay leaves that input out.
struct Revoking(Arc<std::sync::Mutex<Vec<String>>>, std::sync::atomic::AtomicBool);
impl BatchCommit for Revoking {
    fn begin(&self) -> BoxFuture<'_, Result<(), crate::sink::SinkError>> {
        self.0.lock().unwrap().push("begin".into());
        Box::pin(async { Ok(()) })
    }
    fn commit<'a>(&'a self, inputs: &'a [Origin]) -> BoxFuture<'a, Result<(), crate::sink::SinkError>> {
        self.0.lock().unwrap().push(format!("commit {}", inputs.len()));
        let revoked = !self.1.swap(true, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if revoked {
                return Err(crate::sink::SinkError::Transaction { kind: "test", message: "revoked".into(), source: None });
            }
            Ok(())
        })
    }
    fn abort(&self) -> BoxFuture<'_, Result<(), crate::sink::SinkError>> {
        self.0.lock().unwrap().push("abort".into());
        Box::pin(async { Ok(()) })
    }
    fn owned(&self, inputs: &[Origin]) -> Vec<bool> {
        let revoked = self.1.load(std::sync::atomic::Ordering::SeqCst);
        inputs.iter().map(|o| !(revoked && matches!(o, Origin::File { line: 2, .. }))).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_replays_a_batch_without_the_inputs_of_a_revoked_partition() {
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (sink, metrics) = run_exactly_once(Arc::new(Revoking(log.clone(), Default::default()))).await;
    assert_eq!(*log.lock().unwrap(), ["begin", "commit 3", "abort", "begin", "commit 2"]);
    let published = sink.1.lock().unwrap().clone();
    assert_eq!(published.len(), 5, "{published:?}");
    assert!(!published[3..].iter().any(|p| p.contains(":2:")), "the revoked input is not published again: {published:?}");
    assert_eq!(metrics.events_scored_total(), 2, "the revoked input is its new owner's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_does_not_score_the_inputs_of_a_partition_revoked_before_scoring() {
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Revoked from the start: the second input's partition is already another worker's.
    let (_, metrics) = run_exactly_once(Arc::new(Revoking(log.clone(), std::sync::atomic::AtomicBool::new(true)))).await;
    assert_eq!(*log.lock().unwrap(), ["begin", "commit 2"]);
    assert_eq!(metrics.batch_events.get_sample_sum(), 2.0, "the revoked input never reaches the model");
    assert_eq!(metrics.inflight_events.get(), 0, "its in-flight slot is given back");
}
