//! `scorestream run`: load the config, start the HTTP endpoints, check the source and open the
//! sinks (so that a wrong address, credentials, secret file, stream or topic fails in seconds,
//! before a long model load), load and warm up the model, open the source, run the pipeline, and
//! shut down on SIGTERM/SIGINT. `/healthz` is 503 until the model has loaded (the chart's
//! startup probe waits on it); the load's duration is `scorestream_model_load_seconds`.
//!
//! Shutdown: the first signal stops fetching; everything in flight is scored, published,
//! confirmed and acked, then the worker exits 0. If that takes longer than `shutdown_timeout`
//! the worker exits with an error, leaving unacked inputs for redelivery. A second signal exits
//! at once (status 130).

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use crate::batch::policy::BatchLimits;
use crate::config::{Config, ConfigError};
use crate::engine::{Engine, EngineError};
use crate::event::{EventError, InputEvent};
use crate::exactly_once::{self, OpenError};
use crate::health::Liveness;
use crate::http::{Endpoints, HttpError, Readiness};
use crate::metrics::{Metrics, MetricsError};
use crate::model::ModelOptions;
use crate::pipeline::{Parts, PipelineError, Preparer, PromptPreparer, ScoreError, Scorer, Settings};
use crate::prompt::{PromptError, Prompter};
use crate::http::score_api::ScoreApi;
use crate::source::http::{LaneReceiver, Merged};
use crate::sink::{SinkContext, SinkError};
use crate::source::{SourceContext, SourceError};

/// Errors that stop the worker.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("cannot load the tokenizer and chat template")]
    Prompt(#[source] PromptError),
    #[error(transparent)]
    Engine(Box<EngineError>),
    #[error("the model loader panicked")]
    LoaderPanicked(#[source] tokio::task::JoinError),
    #[error("the warm-up batch failed")]
    WarmUp(#[source] WarmUpError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("invalid config: {0}")]
    Route(#[from] crate::sink::route::RouteError),
    #[error("shutdown did not finish within {0:?}; unacknowledged inputs will be redelivered")]
    ShutdownTimeout(std::time::Duration),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot read http.token_file {path}: {source}")]
    TokenFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

impl From<OpenError> for AppError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Source(e) => AppError::Source(e),
            OpenError::Sink(e) => AppError::Sink(e),
        }
    }
}

/// Why the warm-up batch failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmUpError {
    #[error(transparent)]
    Prepare(#[from] EventError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    NonFinite(#[from] crate::event::NonFinite),
}

/// `scorestream run --config FILE`: load the config, run the worker on its own runtime, and
/// return when it has drained. Blocking reads that cannot be cancelled (stdin) are abandoned
/// rather than waited for.
pub fn run_command(path: &Path) -> Result<(), AppError> {
    block_on(run(Config::load(path)?))
}

/// `scorestream serve --config FILE`: the worker with `POST /v1/score` and no stream source.
pub fn serve_command(path: &Path) -> Result<(), AppError> {
    block_on(run_as(Config::load_for_serve(path)?, Mode::Serve))
}

fn block_on(worker: impl std::future::Future<Output = Result<(), AppError>>) -> Result<(), AppError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("scorestream-worker")
        .build()
        .map_err(AppError::Runtime)?;
    let result = runtime.block_on(worker);
    runtime.shutdown_background();
    result
}

/// A stream worker (`run`), or an HTTP reward server without a stream (`serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Run,
    Serve,
}

/// `scorestream run --config FILE` (after [`Config::load`]).
pub async fn run(config: Config) -> Result<(), AppError> {
    run_as(config, Mode::Run).await
}

/// The HTTP lane's ends and the `/v1/score` endpoint, when served.
fn score_api(config: &Config) -> Result<Option<(ScoreApi, LaneReceiver, Arc<dyn crate::sink::Sink>)>, AppError> {
    if !config.http.score_api {
        return Ok(None);
    }
    let token = match &config.http.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| AppError::TokenFile { path: path.display().to_string(), source })?;
            Some(Arc::from(text.trim()))
        }
        None => None,
    };
    let (lane, rx, reply) = crate::source::http::lane(config.http.max_pending_events);
    let api = ScoreApi {
        lane,
        max_body_bytes: config.http.max_body_bytes,
        body_timeout: config.http.body_timeout,
        token,
    };
    Ok(Some((api, rx, reply)))
}

/// Run the worker in `mode` until it has drained.
pub(crate) async fn run_as(config: Config, mode: Mode) -> Result<(), AppError> {
    tracing::info!(?config, ?mode, "starting");
    let metrics = Arc::new(Metrics::with_config(&config.metrics)?);
    let readiness = Arc::new(Readiness::default());
    let liveness = Arc::new(Liveness::loading());
    let (stop_tx, stop) = watch::channel(false);
    let (http_stop_tx, http_stop) = watch::channel(false);
    spawn_signal_handler(stop_tx)?;
    let (score, lane) = match score_api(&config)? {
        Some((api, rx, reply)) => (Some(api), Some((rx, reply))),
        None => (None, None),
    };
    let endpoints = Endpoints { metrics: metrics.clone(), readiness: readiness.clone(), liveness: liveness.clone(), score };
    let (addr, http) = crate::http::serve(&config.http, endpoints, http_stop).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");

    // A signal during the checks or a long model load ends the worker right away: nothing is in
    // flight yet.
    let mut early_stop = stop.clone();
    let start = async {
        let sinks = match mode {
            Mode::Run => preflight(&config, &metrics).await?,
            Mode::Serve => None,
        };
        tracing::info!(model = %config.model.path.display(), "source and sinks reachable; loading the model");
        let started = std::time::Instant::now();
        let loaded = load_model(&config.model, config.batch.limits()).await?;
        let loaded = (loaded.0, loaded.1.with_min_shared_prefix(config.batch.min_shared_prefix));
        metrics.model_load_seconds.set(started.elapsed().as_secs_f64());
        Ok::<_, AppError>((sinks, loaded))
    };
    let (sinks, (preparer, engine)) = tokio::select! {
        started = start => started?,
        _ = early_stop.wait_for(|s| *s) => {
            tracing::info!("stopped while starting");
            return Ok(());
        }
    };
    readiness.set_model_loaded();
    liveness.model_loaded();
    liveness.watch_stages(engine.stage_health());
    let info = engine.info();
    metrics.set_model_info(&info.name, info.dtype.as_str(), &config.model.devices);
    spawn_stage_busy_updates(engine.clone(), metrics.clone());
    warm_up(&preparer, &engine).await?;
    readiness.set_warmed_up();
    tracing::info!(model = %info.name, "model loaded and warmed up");

    let parts = match (mode, lane) {
        (Mode::Serve, Some((rx, reply))) => serve_parts(rx, reply, preparer, engine, metrics.clone(), liveness),
        (_, lane) => {
            let mut parts = open_parts(&config, sinks, preparer, engine, metrics.clone(), liveness).await?;
            if let Some((rx, reply)) = lane {
                parts.source = Box::new(Merged::new(Some(parts.source), rx));
                parts.routes.reply = Some(reply);
            }
            parts
        }
    };
    readiness.set_source(parts.source.connected());
    let settings = Settings::of(&config.batch);
    let result = run_until_drained(parts, settings, stop, config.shutdown_timeout).await;
    let _ = http_stop_tx.send(true);
    let _ = http.await;
    result
}

async fn run_until_drained(
    parts: Parts,
    settings: Settings,
    stop: watch::Receiver<bool>,
    timeout: std::time::Duration,
) -> Result<(), AppError> {
    let pipeline = crate::pipeline::run(parts, settings, stop.clone());
    tokio::pin!(pipeline);
    let mut stop = stop;
    let deadline = async move {
        let _ = stop.wait_for(|s| *s).await;
        tracing::info!(?timeout, "stopping: draining what is in flight");
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        r = &mut pipeline => Ok(r?),
        () = deadline => Err(AppError::ShutdownTimeout(timeout)),
    }
}

/// Load the tokenizer, template and model, the engine sized for batches of `limits`.
async fn load_model(opts: &ModelOptions, limits: BatchLimits) -> Result<(Arc<dyn Preparer>, Engine), AppError> {
    let opts = opts.clone();
    let loaded = tokio::task::spawn_blocking(move || -> Result<_, AppError> {
        let prompter = Prompter::load(&opts.path).map_err(AppError::Prompt)?;
        let engine = Engine::start_with_limits(&opts, limits).map_err(|e| AppError::Engine(Box::new(e)))?;
        let preparer: Arc<dyn Preparer> =
            Arc::new(PromptPreparer { prompter, max_tokens: engine.info().max_tokens, policy: opts.truncation });
        Ok((preparer, engine))
    })
    .await
    .map_err(AppError::LoaderPanicked)?;
    loaded
}

/// One small batch through the whole model, so the first real batch does not pay for lazy
/// initialisation, and `/readyz` only turns ready once scoring works: one finite score for the
/// one conversation sent.
async fn warm_up(preparer: &Arc<dyn Preparer>, scorer: &dyn Scorer) -> Result<(), AppError> {
    let event = InputEvent { id: "warm-up".into(), messages: crate::prompt::probe_conversation(), metadata: None };
    let warm = async {
        let (ids, _) = preparer.prepare(&event)?;
        let scores = scorer.score(vec![ids]).await.map_err(ScoreError::Engine)?;
        match scores.as_slice() {
            [score] => Ok(score.check_finite()?),
            other => Err(ScoreError::Count { scores: other.len(), sequences: 1 }.into()),
        }
    };
    warm.await.map_err(AppError::WarmUp)
}

/// The scored, dead-letter and named sinks (in the config's name order), opened before the
/// model loads (at-least-once).
type Sinks = (Arc<dyn crate::sink::Sink>, Arc<dyn crate::sink::Sink>, Vec<Arc<dyn crate::sink::Sink>>);

/// Before the model loads: check the source (broker, credentials, secret files, stream or
/// topics) and open the sinks, which check their own. Exactly-once sinks need the source's
/// consumer, so they are only checked here (their brokers, credentials and topics) and opened
/// with the source; `None` then.
async fn preflight(config: &Config, metrics: &Arc<Metrics>) -> Result<Option<Sinks>, AppError> {
    crate::source::check::check(&config.source).await?;
    if let Some(eos) = exactly_once::Configs::of(config) {
        eos.check().await?;
        return Ok(None);
    }
    Ok(Some(open_sinks(config, metrics).await?))
}

/// Open `[sink]`, `[dead_letter]` and every `[sinks.<name>]`.
async fn open_sinks(config: &Config, metrics: &Arc<Metrics>) -> Result<Sinks, AppError> {
    let kctx = SinkContext { metrics: metrics.clone() };
    let sink = crate::sink::open(&config.sink, kctx.clone()).await?;
    let dead_letter = crate::sink::open(&config.dead_letter, kctx.clone()).await?;
    let mut named = Vec::with_capacity(config.sinks.len());
    for routed in config.sinks.values() {
        named.push(crate::sink::open(routed, kctx.clone()).await?);
    }
    Ok((sink, dead_letter, named))
}

async fn open_parts(
    config: &Config,
    sinks: Option<Sinks>,
    preparer: Arc<dyn Preparer>,
    engine: Engine,
    metrics: Arc<Metrics>,
    liveness: Arc<Liveness>,
) -> Result<Parts, AppError> {
    let sctx = SourceContext {
        metrics: metrics.clone(),
        max_inflight_events: config.batch.max_inflight_events,
        max_inflight_bytes: config.batch.max_inflight_bytes,
    };
    let router = Arc::new(crate::sink::route::Router::compile(&config.route, config.sinks.keys())?);
    let (source, sink, dead_letter, commit, named) = match (sinks, exactly_once::Configs::of(config)) {
        (Some((sink, dead_letter, named)), _) => {
            (crate::source::open(&config.source, sctx).await?, sink, dead_letter, None, named)
        }
        (None, Some(eos)) => {
            let eos = eos.open(sctx, SinkContext { metrics: metrics.clone() }).await?;
            (eos.source, eos.scored, eos.dead_letter, Some(eos.commit), eos.named)
        }
        // Not reached: preflight opens the sinks unless the delivery is exactly-once.
        (None, None) => {
            let (sink, dead_letter, named) = open_sinks(config, &metrics).await?;
            (crate::source::open(&config.source, sctx).await?, sink, dead_letter, None, named)
        }
    };
    Ok(Parts {
        source,
        source_kind: config.source.kind(),
        preparer,
        scorer: Arc::new(engine),
        sink,
        dead_letter,
        routes: crate::pipeline::Routes { router, sinks: named, reply: None },
        commit,
        metrics,
        liveness,
    })
}

/// `serve`: the HTTP lane is the only source, and every output goes back to its request.
fn serve_parts(
    rx: LaneReceiver,
    reply: Arc<dyn crate::sink::Sink>,
    preparer: Arc<dyn Preparer>,
    engine: Engine,
    metrics: Arc<Metrics>,
    liveness: Arc<Liveness>,
) -> Parts {
    Parts {
        source: Box::new(Merged::new(None, rx)),
        source_kind: "http",
        preparer,
        scorer: Arc::new(engine),
        sink: reply.clone(),
        dead_letter: reply.clone(),
        routes: crate::pipeline::Routes { reply: Some(reply), ..Default::default() },
        commit: None,
        metrics,
        liveness,
    }
}

/// Keep `scorestream_stage_busy_seconds_total` and `scorestream_prefix_tokens_shared_total` in
/// step with the engine, once a second.
fn spawn_stage_busy_updates(engine: Engine, metrics: Arc<Metrics>) {
    let devices: Vec<String> = engine.info().stages.iter().map(|s| s.device.clone()).collect();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            metrics.update_stage_busy(&engine.stage_busy_seconds(), &devices);
            metrics.update_prefix_tokens_shared(engine.prefix_tokens_shared());
        }
    });
}

/// First SIGTERM/SIGINT: set `stop`. Second: exit at once.
fn spawn_signal_handler(stop: watch::Sender<bool>) -> Result<(), AppError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    tokio::spawn(async move {
        let mut signals = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            signals += 1;
            if signals > 1 {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
            tracing::info!("signal received: stopping");
            let _ = stop.send(true);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use futures::future::BoxFuture;

    use super::*;
    use crate::event::Score;

    struct Fixed(Vec<Score>);

    impl Preparer for Fixed {
        fn prepare(&self, _: &InputEvent) -> Result<(Vec<u32>, bool), EventError> {
            Ok((vec![1, 2, 3], false))
        }
    }

    impl Scorer for Fixed {
        fn score(&self, _: Vec<Vec<u32>>) -> BoxFuture<'static, Result<Vec<Score>, EngineError>> {
            let scores = self.0.clone();
            Box::pin(async move { Ok(scores) })
        }
        fn model_name(&self) -> String {
            "fixed".into()
        }
        fn depth(&self) -> usize {
            1
        }
    }

    async fn warm(scores: Vec<f32>) -> Result<(), AppError> {
        let fixed = Arc::new(Fixed(scores.into_iter().map(|reward| Score { reward, attributes: Vec::new() }).collect()));
        let preparer: Arc<dyn Preparer> = fixed.clone();
        warm_up(&preparer, fixed.as_ref()).await
    }

    #[tokio::test]
    async fn warm_up_wants_one_finite_score() {
        assert!(warm(vec![0.5]).await.is_ok());
        let none = warm(vec![]).await.unwrap_err();
        let none = crate::error::Chain(&none).to_string();
        assert!(none.contains("returned 0 scores for 1 sequences"), "{none}");
        assert!(warm(vec![0.5, 0.5]).await.is_err());
        let nan = warm(vec![f32::NAN]).await.unwrap_err();
        let nan = crate::error::Chain(&nan).to_string();
        assert!(nan.contains("non-finite"), "{nan}");
    }

    /// The engine is sized for the configured batches, not for the defaults.
    #[tokio::test]
    async fn the_engine_is_planned_for_the_configured_batch_limits() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arith");
        let opts = ModelOptions { max_tokens: 256, ..ModelOptions::new(dir) };
        let limits = BatchLimits { max_tokens: 32_768, max_events: 512 };
        let (_, engine) = load_model(&opts, limits).await.unwrap();
        let planned = |tokens| crate::engine::plan(&opts, tokens).unwrap().info.stages[0].activation_bytes;
        assert_eq!(engine.info().stages[0].activation_bytes, planned(32_768));
        assert_ne!(planned(32_768), planned(BatchLimits::default().max_tokens));
    }
}
