//! `scorestream score`: score a JSONL file (or stdin) once, in input order: a front over the
//! worker's pipeline ([`pipeline::run`]) with the file source, one file sink for the outputs
//! and one for the error records.
//!
//! Every input line ends as exactly one output line or one error record (`{"id"?, "line",
//! "error"}`); a bad line never stops the run, and neither does a batch the model fails on: its
//! lines become `model` error records (a file is read once, so nothing would redeliver them).
//! Failing to start (model, files) is an error of the command, and so is an input of which no
//! line could be scored ([`NothingScored`]: exit status 3, see `cli::Command::Score`).

use std::fs::File;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufRead, AsyncWrite, BufReader};

use crate::batch::policy::BatchLimits;
use crate::cli::ScoreArgs;
use crate::batch::BatchConfig;
use crate::engine::Engine;
use crate::health::Liveness;
use crate::metrics::Metrics;
use crate::pipeline::{self, DeadLetterFormat, EngineFaults, Parts, PromptPreparer, Settings};
use crate::prompt::Prompter;
use crate::sink::file::FileSink;
use crate::source::file::FileSource;

/// How long a partial batch waits for more lines before it is scored anyway.
const MAX_WAIT: Duration = Duration::from_millis(20);

/// Every input line failed: error records only, no score. Not an empty input (nothing failed).
#[derive(Debug, thiserror::Error)]
#[error("nothing scored: all {failed} input lines failed (see the error records)")]
pub struct NothingScored {
    pub failed: u64,
}

pub fn run(args: &ScoreArgs) -> anyhow::Result<()> {
    let opts = args.model.options();
    let prompter = Prompter::load(&opts.path).context("cannot load the tokenizer and chat template")?;
    let limits = BatchLimits { max_tokens: args.batch_tokens, max_events: args.batch_events };
    let engine = Engine::start_with_limits(&opts, limits)?.with_min_shared_prefix(args.min_shared_prefix);
    // The length limit (`--max-tokens` capped by the model's positions) must fit one batch.
    if engine.info().max_tokens > args.batch_tokens {
        anyhow::bail!(
            "the length limit ({} tokens) is above --batch-tokens ({}): a conversation that long could never be batched",
            engine.info().max_tokens,
            args.batch_tokens
        );
    }
    let preparer = PromptPreparer { prompter, max_tokens: engine.info().max_tokens, policy: opts.truncation };
    let files = Files::open(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("scorestream-score")
        .build()
        .context("cannot start the async runtime")?;
    let counts = runtime.block_on(score(files, preparer, engine, settings(args)));
    // A read of stdin that cannot be cancelled is abandoned rather than waited for.
    runtime.shutdown_background();
    let (scored, failed) = counts?;
    if scored == 0 && failed > 0 {
        return Err(NothingScored { failed }.into());
    }
    Ok(())
}

/// The worker's flow settings for the command's flags: error records instead of dead letters,
/// and a batch the model fails on ends as error records rather than being retried.
fn settings(args: &ScoreArgs) -> Settings {
    let batch = BatchConfig {
        max_batch_tokens: args.batch_tokens,
        max_batch_events: args.batch_events,
        max_wait: MAX_WAIT,
        // Room for the batch being scored, the one waiting, and the lines being prepared.
        max_inflight_events: args.batch_events.max(1) * 4,
        max_payload_bytes: args.max_line_bytes,
        ..BatchConfig::default()
    };
    Settings { engine_faults: EngineFaults::DeadLetter, dead_letters: DeadLetterFormat::Record, ..Settings::of(&batch) }
}

/// The input, the output and the error records, opened (or created) before anything runs.
struct Files {
    input: (String, Box<dyn AsyncBufRead + Send + Unpin>),
    output: (String, Box<dyn AsyncWrite + Send + Unpin>),
    errors: (String, Box<dyn AsyncWrite + Send + Unpin>),
}

impl Files {
    fn open(args: &ScoreArgs) -> anyhow::Result<Self> {
        let input: Box<dyn AsyncBufRead + Send + Unpin> = if args.input == "-" {
            Box::new(BufReader::new(tokio::io::stdin()))
        } else {
            let file = File::open(&args.input).with_context(|| format!("cannot open {}", args.input))?;
            Box::new(BufReader::with_capacity(1 << 16, tokio::fs::File::from_std(file)))
        };
        let create = |path: &str| -> anyhow::Result<Box<dyn AsyncWrite + Send + Unpin>> {
            let file = File::create(path).with_context(|| format!("cannot create {path}"))?;
            Ok(Box::new(tokio::fs::File::from_std(file)))
        };
        let output: Box<dyn AsyncWrite + Send + Unpin> =
            if args.output == "-" { Box::new(tokio::io::stdout()) } else { create(&args.output)? };
        let errors = match &args.errors {
            Some(path) => (path.display().to_string(), create(&path.display().to_string())?),
            None => ("stderr".to_owned(), Box::new(tokio::io::stderr()) as Box<dyn AsyncWrite + Send + Unpin>),
        };
        Ok(Self { input: (args.input.clone(), input), output: (args.output.clone(), output), errors })
    }
}

/// Run the pipeline over `files` to the end of the input: (lines scored, lines failed).
async fn score(files: Files, preparer: PromptPreparer, engine: Engine, settings: Settings) -> anyhow::Result<(u64, u64)> {
    let metrics = Arc::new(Metrics::new()?);
    let (output, errors) = (FileSink::from_writer(files.output.1, files.output.0), FileSink::from_writer(files.errors.1, files.errors.0));
    let parts = Parts {
        source: Box::new(FileSource::from_reader(files.input.1, files.input.0)),
        source_kind: "file",
        preparer: Arc::new(preparer),
        scorer: Arc::new(engine),
        sink: Arc::new(output),
        dead_letter: Arc::new(errors),
        routes: Default::default(),
        commit: None,
        metrics: metrics.clone(),
        liveness: Arc::new(Liveness::default()),
    };
    let progress = progress_bar();
    let ticker = tokio::spawn({
        let (metrics, progress) = (metrics.clone(), progress.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                progress.set_position(metrics.events_scored_total() + metrics.events_failed_total());
            }
        }
    });
    // Nothing stops a one-shot run but the end of its input.
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let result = pipeline::run(parts, settings, stop).await;
    ticker.abort();
    progress.finish_and_clear();
    result?;
    Ok((metrics.events_scored_total(), metrics.events_failed_total()))
}

fn progress_bar() -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} conversations scored or rejected ({per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
