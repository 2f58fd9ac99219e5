//! The pipeline over the real file source and sinks, with plain-data prompt and score
//! stages (the model's own tests live with the engine).
use super::*;
use futures::future::BoxFuture;
use crate::sink::FileSinkConfig;
use crate::event::ErrorKind;
use crate::sink::file::FileSink;
use crate::sink::SinkContext;
use crate::source::file::FileSource;
use crate::record::{AckError, AckHandle, Origin, Record};
use crate::source::{Source, SourceError};

mod exactly_once;

/// One token per byte of the last message; `too_long` past 40 tokens.
struct Bytewise;
impl Preparer for Bytewise {
    fn prepare(&self, event: &InputEvent) -> Result<(Vec<u32>, bool), EventError> {
        let ids: Vec<u32> =
            event.messages.last().map(|m| m.content.bytes().map(u32::from).collect()).unwrap_or_default();
        if ids.len() > 40 {
            return Err(EventError::new(ErrorKind::TooLong, "too long"));
        }
        Ok((ids, false))
    }
}

/// Reward = number of tokens.
struct Length;
impl Scorer for Length {
    fn score(&self, batch: Vec<Vec<u32>>) -> BoxFuture<'static, Result<Vec<Score>, EngineError>> {
        Box::pin(
            async move { Ok(batch.iter().map(|s| Score { reward: s.len() as f32, attributes: Vec::new() }).collect()) },
        )
    }
    fn model_name(&self) -> String {
        "length".into()
    }
    fn depth(&self) -> usize {
        2
    }
}

fn line(id: usize, answer: &str) -> String {
    format!(
        r#"{{"id":"e{id}","messages":[{{"role":"user","content":"q"}},{{"role":"assistant","content":"{answer}"}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_ends_scored_or_dead_lettered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut input = String::new();
    for i in 0..500 {
        match i % 50 {
            7 => input.push_str("{not json\n"),
            8 => input.push_str(&format!("{}\n", line(i, &"x".repeat(60)))),
            _ => input.push_str(&format!("{}\n", line(i, &"a".repeat(1 + i % 30)))),
        }
    }
    let metrics = Arc::new(Metrics::new().unwrap());
    let ctx = SinkContext { metrics: metrics.clone() };
    let out = dir.path().join("out.jsonl");
    let dl = dir.path().join("dl.jsonl");
    let reader: Box<dyn tokio::io::AsyncBufRead + Send + Unpin> = Box::new(std::io::Cursor::new(input.into_bytes()));
    let parts = Parts {
        source: Box::new(FileSource::from_reader(reader, "in".into())),
        source_kind: "file",
        preparer: Arc::new(Bytewise),
        scorer: Arc::new(Length),
        sink: Arc::new(FileSink::open(&FileSinkConfig { path: out.clone() }, ctx.clone()).await.unwrap()),
        dead_letter: Arc::new(FileSink::open(&FileSinkConfig { path: dl.clone() }, ctx).await.unwrap()),
        routes: Default::default(),
        commit: None,
        metrics: metrics.clone(),
        liveness: Default::default(),
    };
    let settings = settings(8, 5, 16);
    let (_stop_tx, stop) = watch::channel(false);
    run(parts, settings, stop).await.unwrap();

    let scored: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let dead: Vec<serde_json::Value> =
        std::fs::read_to_string(&dl).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(scored.len() + dead.len(), 500);
    assert_eq!(dead.len(), 20);
    let ids: Vec<usize> = scored.iter().map(|v| v["id"].as_str().unwrap()[1..].parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "scored events out of input order");
    for v in &scored {
        let i: usize = v["id"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(v["reward"].as_f64().unwrap(), (1 + i % 30) as f64);
    }
    let kinds: Vec<&str> = dead.iter().map(|v| v["error"]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "invalid_json").count(), 10);
    assert_eq!(kinds.iter().filter(|k| **k == "too_long").count(), 10);
    assert_eq!(metrics.events_scored_total(), 480);
    assert_eq!(metrics.events_failed.with_label_values(&["too_long"]).get(), 10);
    assert_eq!(metrics.events_consumed.with_label_values(&["file"]).get(), 500);
    assert_eq!(metrics.inflight_events.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_drains_what_was_fetched_from_an_open_stream() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let ctx = SinkContext { metrics: metrics.clone() };
    let out = dir.path().join("out.jsonl");
    let (mut writer, reader) = tokio::io::duplex(1 << 16);
    let parts = Parts {
        source: Box::new(FileSource::from_reader(Box::new(tokio::io::BufReader::new(reader)), "in".into())),
        source_kind: "file",
        preparer: Arc::new(Bytewise),
        scorer: Arc::new(Length),
        sink: Arc::new(FileSink::open(&FileSinkConfig { path: out.clone() }, ctx.clone()).await.unwrap()),
        dead_letter: Arc::new(FileSink::open(&FileSinkConfig { path: dir.path().join("dl") }, ctx).await.unwrap()),
        routes: Default::default(),
        commit: None,
        metrics: metrics.clone(),
        liveness: Default::default(),
    };
    let settings = settings(4, 5, 8);
    let (stop_tx, stop) = watch::channel(false);
    let worker = tokio::spawn(run(parts, settings, stop));
    for i in 0..50 {
        writer.write_all(format!("{}\n", line(i, "abc")).as_bytes()).await.unwrap();
    }
    while metrics.events_scored_total() < 50 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The stream stays open: only the stop signal ends the run.
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker).await.unwrap().unwrap().unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 50);
    assert_eq!(metrics.inflight_events.get(), 0);
    drop(writer);
}

/// A sink that takes every message and confirms none until told to: the broker is stuck.
struct Stuck(watch::Receiver<bool>, std::sync::Mutex<Vec<String>>);
impl Sink for Stuck {
    fn publish(
        &self,
        msg: crate::sink::Outgoing,
    ) -> BoxFuture<'_, Result<crate::sink::Confirmation, crate::sink::SinkError>> {
        self.1.lock().unwrap().push(format!("publish {:?}", msg.dedup_id));
        let mut go = self.0.clone();
        Box::pin(async move {
            let c: crate::sink::Confirmation = Box::pin(async move {
                let _ = go.wait_for(|g| *g).await;
                Ok(())
            });
            Ok(c)
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), crate::sink::SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

fn endless(n: usize) -> Box<dyn Source> {
    let text: String = (0..n).map(|i| format!("{}\n", line(i, "ab"))).collect();
    Box::new(FileSource::from_reader(Box::new(std::io::Cursor::new(text.into_bytes())), "in".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetching_stops_at_the_inflight_bound() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let (go_tx, go) = watch::channel(false);
    let sink: Arc<dyn Sink> = Arc::new(Stuck(go.clone(), Default::default()));
    let parts = Parts {
        source: endless(1000),
        source_kind: "file",
        preparer: Arc::new(Bytewise),
        scorer: Arc::new(Length),
        sink: sink.clone(),
        dead_letter: sink,
        routes: Default::default(),
        commit: None,
        metrics: metrics.clone(),
        liveness: Default::default(),
    };
    let settings = settings(4, 1, 10);
    let (_stop_tx, stop) = watch::channel(false);
    let worker = tokio::spawn(run(parts, settings, stop));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(metrics.events_consumed.with_label_values(&["file"]).get(), 10);
    assert_eq!(metrics.inflight_events.get(), 10);
    go_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker).await.unwrap().unwrap().unwrap();
    assert_eq!(metrics.events_scored_total(), 1000);
}

/// Arbitrary lines: bytes, JSON shapes of every kind, near-miss events.
fn any_line() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let json = proptest::arbitrary::any::<u32>().prop_map(|n| match n % 6 {
        0 => format!(
            r#"{{"id":"j{n}","messages":[{{"role":"user","content":"x"}},{{"role":"assistant","content":"y"}}]}}"#
        ),
        1 => format!(r#"{{"id":{n},"messages":[]}}"#),
        2 => format!(r#"[{n}, {{"a": null}}]"#),
        3 => format!(
            r#"{{"id":"j{n}","messages":[{{"role":"assistant","content":"{}"}}]}}"#,
            "z".repeat(n as usize % 80)
        ),
        4 => format!("{}{}", "{\"a\":".repeat(n as usize % 300), "1"),
        _ => format!(r#"{{"id":"j{n}","messages":"nope","metadata":{{"k":[1,2]}}}}"#),
    });
    prop_oneof![json.prop_map(String::into_bytes), proptest::collection::vec(any::<u8>(), 1..200)].prop_map(|mut l| {
        l.retain(|b| *b != b'\n');
        l.push(b'x');
        l
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    #[test]
    fn arbitrary_input_always_ends_scored_or_dead_lettered(lines in proptest::collection::vec(any_line(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let sent = lines.len();
        let (scored, dead) = rt.block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let metrics = Arc::new(Metrics::new().unwrap());
            let ctx = SinkContext { metrics: metrics.clone() };
            let mut text = lines.join(&b'\n');
            text.push(b'\n');
            let parts = Parts {
                source: Box::new(FileSource::from_reader(Box::new(std::io::Cursor::new(text)), "in".into())),
                source_kind: "file",
                preparer: Arc::new(Bytewise),
                scorer: Arc::new(Length),
                sink: Arc::new(FileSink::open(&FileSinkConfig { path: dir.path().join("o") }, ctx.clone()).await.unwrap()),
                dead_letter: Arc::new(FileSink::open(&FileSinkConfig { path: dir.path().join("d") }, ctx).await.unwrap()),
                routes: Default::default(),
                commit: None,
                metrics: metrics.clone(),
                liveness: Default::default(),
            };
            let settings = Settings { max_payload_bytes: 150, ..settings(4, 1, 8) };
            let (_stop_tx, stop) = watch::channel(false);
            run(parts, settings, stop).await.unwrap();
            let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
            (read("o").lines().count(), read("d").lines().count())
        });
        proptest::prop_assert_eq!(scored + dead, sent);
    }
}

/// A source of `n` events whose acks are counted, and which records its close.
struct Counted {
    lines: std::collections::VecDeque<Bytes>,
    acks: Arc<std::sync::atomic::AtomicUsize>,
    closed: Arc<std::sync::atomic::AtomicBool>,
    connected: (watch::Sender<bool>, watch::Receiver<bool>),
}

struct CountedAck(Arc<std::sync::atomic::AtomicUsize>);
impl crate::record::Ack for CountedAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), AckError>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

impl Source for Counted {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Record, SourceError>>> {
        let next = self.lines.pop_front().map(|payload| {
            Ok(Record {
                payload,
                key: None,
                headers: Vec::new(),
                origin: Origin::File { path: "counted".into(), line: self.lines.len() as u64 },
                ack: AckHandle::new(CountedAck(self.acks.clone())),
            })
        });
        Box::pin(async move { next })
    }
    fn connected(&self) -> watch::Receiver<bool> {
        self.connected.1.clone()
    }
    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

/// Fails its first `failures` calls with a stage panic, then scores like [`Length`].
struct Flaky {
    failures: usize,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}
impl Scorer for Flaky {
    fn score(&self, batch: Vec<Vec<u32>>) -> BoxFuture<'static, Result<Vec<Score>, EngineError>> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if call < self.failures {
            let e = EngineError::Panicked { stage: 0, device: "cuda:0".into(), message: "illegal memory access".into() };
            return Box::pin(async move { Err(e) });
        }
        Length.score(batch)
    }
    fn model_name(&self) -> String {
        "flaky".into()
    }
    fn depth(&self) -> usize {
        2
    }
}

/// `n` events, event `i` answering `answer(i)`.
fn lines(n: usize, answer: impl Fn(usize) -> &'static str) -> Vec<String> {
    (0..n).map(|i| line(i, answer(i))).collect()
}

/// What a run over [`Counted`] left behind.
struct Run {
    result: Result<(), PipelineError>,
    scored: usize,
    dead: Vec<serde_json::Value>,
    acks: usize,
    closed: bool,
    calls: usize,
    health: Result<(), String>,
    inflight: i64,
    /// `scorestream_batch_events`, `_batch_tokens` and `_forward_seconds`: (batches counted,
    /// sum of events, sum of tokens, forward passes counted).
    batches: (u64, f64, f64, u64),
}

/// Run `lines` through the pipeline (failed batches allowed in a row: 3) over [`Counted`].
async fn run_counted(lines: Vec<String>, scorer: impl FnOnce(Arc<std::sync::atomic::AtomicUsize>) -> Arc<dyn Scorer>) -> Run {
    run_counted_with(lines, scorer, settings(4, 1, 8), None).await
}

/// [`run_counted`] with `settings`, and `sink` in place of the scored-output file.
async fn run_counted_with(
    lines: Vec<String>,
    scorer: impl FnOnce(Arc<std::sync::atomic::AtomicUsize>) -> Arc<dyn Scorer>,
    settings: Settings,
    sink: Option<Arc<dyn Sink>>,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let ctx = SinkContext { metrics: metrics.clone() };
    let (acks, closed, calls) = (Arc::default(), Arc::default(), Arc::default());
    let source = Counted {
        lines: lines.into_iter().map(Bytes::from).collect(),
        acks: Arc::clone(&acks),
        closed: Arc::clone(&closed),
        connected: watch::channel(true),
    };
    let liveness: Arc<Liveness> = Default::default();
    let parts = Parts {
        source: Box::new(source),
        source_kind: "file",
        preparer: Arc::new(Bytewise),
        scorer: scorer(Arc::clone(&calls)),
        sink: Arc::new(FileSink::open(&FileSinkConfig { path: dir.path().join("o") }, ctx.clone()).await.unwrap()),
        dead_letter: Arc::new(FileSink::open(&FileSinkConfig { path: dir.path().join("d") }, ctx).await.unwrap()),
        routes: Default::default(),
        commit: None,
        metrics: metrics.clone(),
        liveness: liveness.clone(),
    };
    let parts = Parts { sink: sink.unwrap_or(parts.sink), ..parts };
    let (_stop_tx, stop) = watch::channel(false);
    let result = tokio::time::timeout(Duration::from_secs(20), run(parts, settings, stop)).await.unwrap();
    let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
    let load = std::sync::atomic::Ordering::SeqCst;
    Run {
        result,
        scored: read("o").lines().count(),
        dead: read("d").lines().map(|l| serde_json::from_str(l).unwrap()).collect(),
        acks: acks.load(load),
        closed: closed.load(load),
        calls: calls.load(load),
        health: liveness.check(0, Duration::from_secs(60)),
        inflight: metrics.inflight_events.get(),
        batches: (
            metrics.batch_events.get_sample_count(),
            metrics.batch_events.get_sample_sum(),
            metrics.batch_tokens.get_sample_sum(),
            metrics.forward_seconds.get_sample_count(),
        ),
    }
}

/// Issue 18 item 4: a GPU fault is not bad input. Before, every event of the failed batches was
/// dead-lettered as `model` and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_model_dead_letters_nothing_acks_nothing_and_ends_the_run() {
    let r = run_counted(lines(20, |_| "abc"), |calls| Arc::new(Flaky { failures: usize::MAX, calls })).await;
    let e = r.result.unwrap_err();
    assert!(matches!(e, PipelineError::Engine { failures: 3, .. }), "{e:?}");
    let text = crate::error::Chain(&e).to_string();
    assert!(text.contains("3 batches in a row") && text.contains("illegal memory access"), "{text}");
    assert!(r.dead.is_empty(), "engine faults were dead-lettered: {:?}", r.dead);
    assert_eq!((r.scored, r.acks), (0, 0), "nothing is scored or acknowledged");
    assert!(r.closed, "the source is closed in order");
    assert!((3..=4).contains(&r.calls), "retried up to the limit: {} calls", r.calls);
    assert!(r.health.unwrap_err().contains("illegal memory access"), "/healthz reports the fault");
    assert_eq!(r.inflight, 0, "every in-flight permit was released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_once_then_works_scores_everything() {
    let r = run_counted(lines(20, |_| "abc"), |calls| Arc::new(Flaky { failures: 1, calls })).await;
    r.result.unwrap();
    assert!(r.dead.is_empty(), "{:?}", r.dead);
    assert_eq!((r.scored, r.acks), (20, 20));
    assert!(r.health.is_ok(), "healthy again after a batch succeeded: {:?}", r.health);
}

/// A batch retried after an engine fault is counted once in the batch metrics, for the pass
/// that scored it: the sums are the events and tokens scored, not those of every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_after_an_engine_fault_is_counted_once() {
    let r = run_counted(lines(20, |_| "abc"), |calls| Arc::new(Flaky { failures: 2, calls })).await;
    r.result.unwrap();
    assert_eq!(r.scored, 20);
    let (batches, events, tokens, passes) = r.batches;
    assert_eq!((events, tokens), (20.0, 60.0), "{} calls, {batches} batches counted", r.calls);
    assert_eq!(batches as usize, r.calls - 2, "the failed attempts are not batches");
    assert_eq!(passes, batches);
}

/// Refuses (as [`EngineError::Sequence`], before running anything) the first sequence longer
/// than 5 tokens, as the engine refuses one too long or with a token outside its vocabulary.
struct Picky;
impl Scorer for Picky {
    fn score(&self, batch: Vec<Vec<u32>>) -> BoxFuture<'static, Result<Vec<Score>, EngineError>> {
        match batch.iter().position(|s| s.len() > 5) {
            Some(index) => {
                let e = EngineError::Sequence { index, len: batch[index].len(), limit: 5 };
                Box::pin(async move { Err(e) })
            }
            None => Length.score(batch),
        }
    }
    fn model_name(&self) -> String {
        "picky".into()
    }
    fn depth(&self) -> usize {
        1
    }
}

/// A sequence the engine refuses is that event's fault: it alone is dead-lettered (a poison
/// event must not stop the worker, or it would stop every worker it is redelivered to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_the_engine_refuses_is_dead_lettered_alone() {
    let r = run_counted(lines(12, |i| if i % 3 == 0 { "abcdefgh" } else { "ab" }), |_| Arc::new(Picky)).await;
    r.result.unwrap();
    assert_eq!((r.scored, r.dead.len(), r.acks), (8, 4, 12));
    assert!(r.dead.iter().all(|d| d["error"]["kind"] == "model"), "{:?}", r.dead);
    let (batches, events, tokens, passes) = r.batches;
    assert_eq!((events, tokens), (8.0, 16.0), "only the pass that scored each batch is counted");
    assert_eq!(passes, batches);
}

/// `scorestream score`'s policy: a batch the model fails on becomes `model` error records
/// (`{"id", "line", "error"}`, no payload), never retried, and the run goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dead_lettered_engine_faults_a_failed_batch_becomes_error_records_and_the_run_goes_on() {
    let settings = Settings { engine_faults: EngineFaults::DeadLetter, dead_letters: DeadLetterFormat::Record, ..settings(4, 1, 8) };
    let flaky = |calls| -> Arc<dyn Scorer> { Arc::new(Flaky { failures: 1, calls }) };
    let r = run_counted_with(lines(12, |_| "ab"), flaky, settings, None).await;
    r.result.unwrap();
    assert!(!r.dead.is_empty() && r.dead.len() <= 4, "the first batch failed: {:?}", r.dead);
    assert_eq!((r.scored + r.dead.len(), r.acks), (12, 12), "every input scored or an error record");
    for d in &r.dead {
        assert_eq!(d["error"]["kind"], "model", "{d}");
        assert!(d["error"]["message"].as_str().unwrap().contains("illegal memory access"), "{d}");
        assert!(d["line"].is_u64() && d["id"].is_string() && d.get("payload").is_none(), "{d}");
    }
}

/// A sink that fails for good ([`SinkError::Fatal`]).
struct Fatal;
impl Sink for Fatal {
    fn publish(&self, _: crate::sink::Outgoing) -> BoxFuture<'_, Result<crate::sink::Confirmation, SinkError>> {
        Box::pin(async { Err(SinkError::Fatal { kind: "test", message: "gone for good".into(), source: None }) })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A fatal sink error is not retried: the run stops fetching, closes the source in order and
/// ends with that error, acknowledging nothing it did not publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_sink_error_ends_the_run_in_order_without_acking() {
    let length = |_| -> Arc<dyn Scorer> { Arc::new(Length) };
    let r = run_counted_with(lines(12, |_| "ab"), length, settings(4, 1, 8), Some(Arc::new(Fatal))).await;
    assert!(matches!(r.result, Err(PipelineError::Sink(SinkError::Fatal { .. }))), "{:?}", r.result);
    assert_eq!((r.acks, r.scored, r.closed), (0, 0, true));
}

/// Flow settings for these tests: batches of up to `max_events` (64 tokens), `wait_ms` of
/// batching wait, `inflight` events in flight, 1 MiB of payload and in-flight bytes.
fn settings(max_events: usize, wait_ms: u64, inflight: usize) -> Settings {
    Settings {
        limits: BatchLimits { max_tokens: 64, max_events },
        max_wait: Duration::from_millis(wait_ms),
        max_inflight_events: inflight,
        max_inflight_bytes: 1 << 20,
        max_payload_bytes: 1 << 20,
        max_failed_batches: 3,
        max_candidates: 64,
        engine_faults: EngineFaults::Retry,
        dead_letters: DeadLetterFormat::Full,
    }
}
