//! Engine faults are not bad input, against a real nats-server: the pipeline over the real
//! JetStream source and sinks, with a model that fails on every batch (injected through the
//! public `Scorer` seam, as the binary has no way to make its engine fail on demand). Nothing is
//! dead-lettered or acknowledged, the run ends with the engine's error, and a healthy worker
//! then scores every input once JetStream redelivers them.

mod common_fixtures;
mod nats_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nats_support::{count, events, publish_all, read_all, setup_streams, write_config, NatsServer};
use scorestream::config::Config;
use scorestream::engine::EngineError;
use scorestream::event::{EventError, InputEvent, Score};
use scorestream::metrics::Metrics;
use scorestream::pipeline::{Parts, PipelineError, Preparer, Scorer, Settings};
use scorestream::sink::SinkContext;
use scorestream::source::SourceContext;
use tokio::sync::watch;

/// One token per byte of the last message.
struct Bytewise;
impl Preparer for Bytewise {
    fn prepare(&self, event: &InputEvent) -> Result<(Vec<u32>, bool), EventError> {
        Ok((event.messages.last().map(|m| m.content.bytes().map(u32::from).collect()).unwrap_or_else(|| vec![0]), false))
    }
}

/// Fails every batch as a GPU fault would (`broken`), or scores by length; counts its calls.
struct Model {
    broken: bool,
    calls: AtomicUsize,
}
impl Scorer for Model {
    fn score(&self, batch: Vec<Vec<u32>>) -> BoxFuture<'static, Result<Vec<Score>, EngineError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let result = if self.broken {
            Err(EngineError::Panicked { stage: 0, device: "cuda:0".into(), message: "CUDA_ERROR_ILLEGAL_ADDRESS".into() })
        } else {
            Ok(batch.iter().map(|s| Score { reward: s.len() as f32, attributes: Vec::new() }).collect())
        };
        Box::pin(async move { result })
    }
    fn model_name(&self) -> String {
        "test".into()
    }
    fn depth(&self) -> usize {
        1
    }
}

async fn parts(config: &Config, scorer: Arc<Model>) -> Parts {
    let metrics = Arc::new(Metrics::new().unwrap());
    let sctx = SourceContext { metrics: metrics.clone(), max_inflight_events: 64, max_inflight_bytes: 1 << 24 };
    let kctx = SinkContext { metrics: metrics.clone() };
    Parts {
        source: scorestream::source::open(&config.source, sctx).await.unwrap(),
        source_kind: "nats",
        preparer: Arc::new(Bytewise),
        scorer,
        sink: scorestream::sink::open(&config.sink, kctx.clone()).await.unwrap(),
        dead_letter: scorestream::sink::open(&config.dead_letter, kctx).await.unwrap(),
        routes: Default::default(),
        commit: None,
        metrics,
        liveness: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_model_leaves_every_input_to_redelivery_and_dead_letters_none() {
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    let lines = events(100);
    publish_all(&js, &lines).await;
    let dir = tempfile::tempdir().unwrap();
    let config = Config::load(&write_config(dir.path(), &server.url(), "", nats_support::free_port())).unwrap();
    assert_eq!(config.batch.max_failed_batches, 3, "the default");

    let broken = Arc::new(Model { broken: true, calls: AtomicUsize::new(0) });
    let (_stop_tx, stop) = watch::channel(false);
    let run = scorestream::pipeline::run(parts(&config, broken.clone()).await, Settings::of(&config.batch), stop);
    let e = tokio::time::timeout(Duration::from_secs(30), run).await.unwrap().unwrap_err();
    assert!(matches!(e, PipelineError::Engine { failures: 3, .. }), "{e:?}");
    assert_eq!(broken.calls.load(Ordering::SeqCst), 3);
    assert_eq!((count(&js, "SCORED").await, count(&js, "DEAD").await), (0, 0), "nothing published");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        js.get_stream("CONV").await.unwrap().get_consumer("scorestream").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.ack_floor.stream_sequence, 0, "nothing acknowledged");
    assert_eq!(info.num_pending + info.num_ack_pending as u64, 100, "every input still to do");

    // A healthy worker on the same durable gets every input again (after ack_wait) and scores it.
    let healthy = Arc::new(Model { broken: false, calls: AtomicUsize::new(0) });
    let (stop_tx, stop) = watch::channel(false);
    let worker = tokio::spawn(scorestream::pipeline::run(parts(&config, healthy).await, Settings::of(&config.batch), stop));
    let start = Instant::now();
    while count(&js, "SCORED").await < 100 {
        assert!(start.elapsed() < Duration::from_secs(60), "not every input was scored after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), worker).await.unwrap().unwrap().unwrap();
    let mut ids: Vec<String> = read_all(&js, "SCORED").await.iter().map(|v| v["id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100, "every input scored");
    assert_eq!(count(&js, "DEAD").await, 0);
}
