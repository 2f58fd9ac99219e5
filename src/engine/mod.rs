//! The resident engine: the model's stages live on their own OS threads, one per device, and
//! score packed micro-batches handed over bounded channels.
//!
//! Guarantees: a batch's scores come back in the order of its sequences; stage `i + 1` works on
//! batch `n` while stage `i` works on batch `n + 1` (capacity-1 channels, so at most one batch
//! waits before each stage); a stage that fails or panics fails only its batch, with an error
//! naming the stage, and later batches still run. The stage threads report on a watch channel
//! ([`Engine::stage_health`]) when one of them has died, for `/healthz`.

pub mod cuda;
mod loader;
pub mod reference;
mod scorer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use crate::event::Score;
use crate::model::packed::Packed;
use crate::model::stage::{Activations, Stage, StageOutput};
use crate::model::{ModelError, ModelOptions};

pub use loader::{parse_device, plan, ModelInfo, Plan, StageInfo};
pub(crate) use loader::{gpu_needs, length_limit};
pub use scorer::Scorer;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load the model from {path}: {source}")]
    Load {
        path: String,
        #[source]
        source: ModelError,
    },
    #[error("stage {stage} (layers {layers}, {device}) failed: {source}")]
    Stage {
        stage: usize,
        layers: String,
        device: String,
        #[source]
        source: ModelError,
    },
    #[error("stage {stage} ({device}) panicked: {message}")]
    Panicked { stage: usize, device: String, message: String },
    #[error("sequence {index} of the batch has {len} tokens; the model scores 1 to {limit}")]
    Sequence { index: usize, len: usize, limit: usize },
    #[error("sequence {index} of the batch has token id {token}, outside the model's vocabulary of {vocab}")]
    Token { index: usize, token: u32, vocab: usize },
    #[error("the engine has stopped")]
    Stopped,
}

impl EngineError {
    /// The sequence of the batch that the engine refused, before running anything, for what
    /// it holds (its length, a token id): that one event's fault, not the engine's.
    pub(crate) fn refused_sequence(&self) -> Option<usize> {
        match self {
            EngineError::Sequence { index, .. } | EngineError::Token { index, .. } => Some(*index),
            _ => None,
        }
    }
}

/// A stage on its device: the candle CPU stage or the CUDA stage.
pub(crate) enum AnyStage {
    Cpu(Stage),
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::stage::CudaStage>),
}

/// What a job brings to a stage, and what a stage passes on: token ids, scores or hidden
/// states on the host, or (between two CUDA stages, [`cuda::hop`]) hidden states already
/// copied into the next stage's input slot.
enum Hop<T> {
    Host(T),
    #[cfg(feature = "cuda")]
    Device(cuda::hop::Arrived),
}

impl AnyStage {
    fn forward(&mut self, packed: &Packed, input: Hop<Activations>, device: &str) -> Result<Hop<StageOutput>, ModelError> {
        #[cfg(not(feature = "cuda"))]
        let _ = device; // names the GPU in the CUDA arms only
        match (self, input) {
            (AnyStage::Cpu(s), Hop::Host(input)) => s.forward(packed, input).map(Hop::Host),
            #[cfg(feature = "cuda")]
            (AnyStage::Cpu(_), Hop::Device(_)) => {
                Err(ModelError::Device { device: device.to_owned(), message: "a CPU stage got hidden states left on a GPU".into() })
            }
            #[cfg(feature = "cuda")]
            (AnyStage::Cuda(s), input) => {
                use cuda::stage::{Sent, StageInput};
                let input = match input {
                    Hop::Host(a) => StageInput::Host(a),
                    Hop::Device(a) => StageInput::Device(a),
                };
                match s.forward_hop(packed, input) {
                    Ok(Sent::Host(out)) => Ok(Hop::Host(out)),
                    Ok(Sent::Device(a)) => Ok(Hop::Device(a)),
                    Err(e) => Err(ModelError::Backend { device: device.to_owned(), source: Box::new(e) }),
                }
            }
        }
    }
}

/// What a stage does with a job once it ran it.
enum Step {
    Pass(Hop<Activations>),
    Reply(Result<Vec<Score>, EngineError>),
}

struct Job {
    packed: Arc<Packed>,
    input: Hop<Activations>,
    reply: oneshot::Sender<Result<Vec<Score>, EngineError>>,
}

/// A handle to the running engine; cheap to clone, usable from async and sync code.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    info: Arc<ModelInfo>,
    busy_nanos: Arc<Vec<AtomicU64>>,
    health: watch::Receiver<Option<String>>,
    /// Sequences sharing at least this many leading tokens are packed as one tree (0: never).
    min_shared_prefix: usize,
    shared_tokens: Arc<AtomicU64>,
}

impl Engine {
    /// Load the model (one stage per device) and start its threads. Blocks until every stage
    /// has loaded or one has failed.
    /// With the default batch limits: for tests and benchmarks; the worker and the commands
    /// pass the limits they batch with to [`Engine::start_with_limits`].
    pub fn start(opts: &ModelOptions) -> Result<Self, EngineError> {
        Self::start_with_limits(opts, crate::batch::policy::BatchLimits::default())
    }

    /// [`Engine::start`] for batches of at most `limits` (tokens and sequences): activation
    /// memory is planned and GPU buffers are sized for them. Each stage is loaded on its own
    /// thread, which then runs it (a GPU context stays on the thread that made it).
    pub fn start_with_limits(opts: &ModelOptions, limits: crate::batch::policy::BatchLimits) -> Result<Self, EngineError> {
        let load_err = |source| EngineError::Load { path: opts.path.display().to_string(), source };
        let (loaders, info) = loader::loaders(opts, limits).map_err(load_err)?;
        let busy_nanos: Arc<Vec<AtomicU64>> = Arc::new(loaders.iter().map(|_| AtomicU64::new(0)).collect());
        let (first_tx, mut rx) = mpsc::channel::<Job>(1);
        let (health_tx, health) = watch::channel(None);
        let health_tx = Arc::new(health_tx);
        let last = loaders.len() - 1;
        let mut loaded = Vec::with_capacity(loaders.len());
        for (i, load) in loaders.into_iter().enumerate() {
            let (next_tx, next_rx) = mpsc::channel::<Job>(1);
            let (next_tx, stage_rx) = ((i < last).then_some(next_tx), std::mem::replace(&mut rx, next_rx));
            let busy = busy_nanos.clone();
            let device = info.stages[i].device.clone();
            let layers = format!("{:?}", info.stages[i].layers.0..info.stages[i].layers.1);
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let guard = StageGuard { index: i, device: device.clone(), health: health_tx.clone() };
            std::thread::Builder::new()
                .name(format!("scorestream-stage-{i}"))
                .spawn(move || match load() {
                    Ok(mut stage) => {
                        let _ = ready_tx.send(Ok(()));
                        if !stage_loop(i, &device, &layers, &mut stage, stage_rx, next_tx, &busy[i]) {
                            guard.died(&format!("the next stage ({}) is gone", i + 1));
                        }
                        drop(guard);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                })
                .expect("spawning a thread only fails when the OS is out of resources");
            loaded.push(ready_rx);
        }
        wait_for_stages(&info, loaded).map_err(load_err)?;
        let shared_tokens = Arc::new(AtomicU64::new(0));
        Ok(Self { tx: first_tx, info: Arc::new(info), busy_nanos, health, min_shared_prefix: 0, shared_tokens })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Compute a prefix of `min` or more tokens that several sequences of a batch begin with
    /// once for all of them (0: never). Scores are unchanged. CPU and CUDA stages both take
    /// the tree layout.
    pub fn with_min_shared_prefix(mut self, min: usize) -> Self {
        self.min_shared_prefix = min;
        self
    }

    /// Whether batches are packed with shared prefixes.
    pub fn shares_prefixes(&self) -> bool {
        self.min_shared_prefix > 0
    }

    /// Tokens not recomputed since start, thanks to shared prefixes.
    pub fn prefix_tokens_shared(&self) -> u64 {
        self.shared_tokens.load(Ordering::Relaxed)
    }

    /// `None` while every stage thread runs; the reason once one has died (a panic outside a
    /// batch, or its next stage gone). A stage that fails a batch stays alive.
    pub(crate) fn stage_health(&self) -> watch::Receiver<Option<String>> {
        self.health.clone()
    }

    /// Seconds each stage has spent computing since start, for utilisation and bubble figures.
    pub fn stage_busy_seconds(&self) -> Vec<f64> {
        self.busy_nanos.iter().map(|n| n.load(Ordering::Relaxed) as f64 * 1e-9).collect()
    }

    /// Score a batch of token sequences; one score per sequence, in order. Every sequence has
    /// at least one token (the one it is scored at) and at most `max_position_embeddings`.
    pub async fn score(&self, batch: Vec<Vec<u32>>) -> Result<Vec<Score>, EngineError> {
        self.check(&batch)?;
        let (job, rx) = self.job(batch);
        self.tx.send(job).await.map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// [`Engine::score`] for synchronous callers (not from inside an async runtime).
    pub fn score_blocking(&self, batch: Vec<Vec<u32>>) -> Result<Vec<Score>, EngineError> {
        self.check(&batch)?;
        let (job, rx) = self.job(batch);
        self.tx.blocking_send(job).map_err(|_| EngineError::Stopped)?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)?
    }

    /// An empty sequence has no token to read a score at (packed, it would read its
    /// neighbour's); a longer one than the model's positions is outside what it was built for;
    /// a token id outside the embedding would fail the whole batch in the first stage.
    fn check(&self, batch: &[Vec<u32>]) -> Result<(), EngineError> {
        let (limit, vocab) = (self.info.max_position_embeddings, self.info.vocab_size);
        for (index, s) in batch.iter().enumerate() {
            if s.is_empty() || s.len() > limit {
                return Err(EngineError::Sequence { index, len: s.len(), limit });
            }
            if let Some(&token) = s.iter().find(|&&t| t as usize >= vocab) {
                return Err(EngineError::Token { index, token, vocab });
            }
        }
        Ok(())
    }

    fn job(&self, batch: Vec<Vec<u32>>) -> (Job, oneshot::Receiver<Result<Vec<Score>, EngineError>>) {
        let (reply, rx) = oneshot::channel();
        let packed = if self.shares_prefixes() {
            let packed = Packed::shared(&batch, self.min_shared_prefix);
            self.shared_tokens.fetch_add(packed.shared_tokens() as u64, Ordering::Relaxed);
            packed
        } else {
            Packed::new(&batch)
        };
        (Job { packed: Arc::new(packed), input: Hop::Host(Activations::Tokens), reply }, rx)
    }
}

/// How often a long load says how far it got.
const LOAD_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Wait for every stage to load (they load at once, each on its thread), logging the layers and
/// gigabytes loaded so far and the seconds taken.
fn wait_for_stages(info: &ModelInfo, loaded: Vec<std::sync::mpsc::Receiver<Result<(), ModelError>>>) -> Result<(), ModelError> {
    let gb = |bytes: usize| bytes as f64 / 1e9;
    let total: usize = info.stages.iter().map(|s| s.weight_bytes).sum();
    let started = Instant::now();
    tracing::info!(layers = info.num_layers, gb = format!("{:.2}", gb(total)), stages = info.stages.len(), "loading the model");
    let (mut layers, mut bytes) = (0, 0);
    for (i, ready) in loaded.into_iter().enumerate() {
        let result = loop {
            match ready.recv_timeout(LOAD_PROGRESS_EVERY) {
                Ok(result) => break result,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => tracing::info!(
                    "loading the model: {layers} of {} layers ({:.2} of {:.2} GB) loaded in {:.0} s",
                    info.num_layers,
                    gb(bytes),
                    gb(total),
                    started.elapsed().as_secs_f64()
                ),
                // A stage thread that died before reporting is a load failure too.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    break Err(ModelError::weights("a stage thread stopped while loading", None))
                }
            }
        };
        result?;
        let stage = &info.stages[i];
        layers += stage.layers.1 - stage.layers.0;
        bytes += stage.weight_bytes;
        tracing::info!(
            stage = i,
            device = %stage.device,
            "loaded stage {i}: layers {}..{}, {:.2} GB, {:.1} s since the start",
            stage.layers.0,
            stage.layers.1,
            gb(stage.weight_bytes),
            started.elapsed().as_secs_f64()
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        gb_per_s = gb(bytes) / seconds.max(1e-9),
        "model loaded: {layers} layers, {:.2} GB in {seconds:.1} s ({:.2} GB/s)",
        gb(bytes),
        gb(bytes) / seconds.max(1e-9)
    );
    Ok(())
}

/// Held by a stage thread while it runs: reports the thread's death on the health channel,
/// also when it unwinds.
struct StageGuard {
    index: usize,
    device: String,
    health: Arc<watch::Sender<Option<String>>>,
}

impl StageGuard {
    fn died(&self, why: &str) {
        let reason = format!("stage {} ({}) thread ended: {why}", self.index, self.device);
        tracing::error!("{reason}");
        self.health.send_replace(Some(reason));
    }
}

impl Drop for StageGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.died("it panicked");
        }
    }
}

/// The body of one stage's thread: run each job, pass hidden states on or reply with scores.
/// Returns `true` when the previous stage (or every engine handle) is gone (a normal end),
/// `false` when the next stage is.
fn stage_loop(
    index: usize,
    device: &str,
    layers: &str,
    stage: &mut AnyStage,
    mut rx: mpsc::Receiver<Job>,
    next: Option<mpsc::Sender<Job>>,
    busy: &AtomicU64,
) -> bool {
    while let Some(job) = rx.blocking_recv() {
        let Job { packed, input, reply } = job;
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stage.forward(&packed, input, device)));
        busy.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let outcome = match result {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(source)) => Err(EngineError::Stage {
                stage: index,
                layers: layers.to_owned(),
                device: device.to_owned(),
                source,
            }),
            Err(panic) => Err(EngineError::Panicked {
                stage: index,
                device: device.to_owned(),
                message: panic_message(&panic),
            }),
        };
        let step = match outcome {
            Ok(Hop::Host(StageOutput::Hidden(h))) => Step::Pass(Hop::Host(Activations::Hidden(h))),
            #[cfg(feature = "cuda")]
            Ok(Hop::Device(a)) => Step::Pass(Hop::Device(a)),
            Ok(Hop::Host(StageOutput::Scores(s))) => Step::Reply(Ok(s)),
            Err(e) => Step::Reply(Err(e)),
        };
        match (step, &next) {
            (Step::Pass(input), Some(next)) => {
                let job = Job { packed, input, reply };
                if next.blocking_send(job).is_err() {
                    return false;
                }
            }
            (Step::Pass(_), None) => {
                let _ = reply.send(Err(EngineError::Stage {
                    stage: index,
                    layers: layers.to_owned(),
                    device: device.to_owned(),
                    source: ModelError::weights("the last stage produced no scores", None),
                }));
            }
            // The caller may have gone away (shutdown): nothing to tell.
            (Step::Reply(r), _) => {
                let _ = reply.send(r);
            }
        }
    }
    true
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guarded(panics: bool) -> Option<String> {
        let (tx, rx) = watch::channel(None);
        let guard = StageGuard { index: 1, device: "cpu".into(), health: Arc::new(tx) };
        let _ = std::thread::spawn(move || {
            let _guard = guard;
            assert!(!panics, "a stage thread dies");
        })
        .join();
        let reason = rx.borrow().clone();
        reason
    }

    #[test]
    fn a_stage_thread_that_dies_reports_it_and_a_normal_end_does_not() {
        let reason = guarded(true).expect("a dead stage is reported");
        assert!(reason.contains("stage 1 (cpu)") && reason.contains("panicked"), "{reason}");
        assert_eq!(guarded(false), None);
    }

    /// A token id outside the vocabulary is refused up front, naming its sequence.
    #[test]
    fn a_token_outside_the_vocabulary_names_its_sequence() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arith");
        let engine = Engine::start(&ModelOptions::new(dir)).unwrap();
        let e = engine.score_blocking(vec![vec![1, 2], vec![3, 10_000_000]]).unwrap_err();
        assert!(matches!(e, EngineError::Token { index: 1, token: 10_000_000, .. }), "{e:?}");
        assert_eq!(e.refused_sequence(), Some(1));
    }

    /// Every engine handle dropped: the stage threads end normally and report nothing.
    #[test]
    fn a_stopped_engine_reports_no_dead_stage() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arith");
        let opts = ModelOptions { devices: vec!["cpu".into(), "cpu".into()], ..ModelOptions::new(dir) };
        let engine = Engine::start(&opts).unwrap();
        let mut health = engine.stage_health();
        assert!(engine.score_blocking(vec![vec![1, 2, 3]]).is_ok());
        drop(engine);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(health.borrow_and_update().is_none());
    }
}
