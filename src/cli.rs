//! The command line: `score`, `inspect`, `run`, `check-config` (and `kernels` with the `cuda` feature).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::batch::policy::BatchLimits;
use crate::model::{Dtype, ModelOptions};
use crate::prompt::TruncationPolicy;

#[derive(Debug, Parser)]
#[command(name = "scorestream", version = env!("SCORESTREAM_LONG_VERSION"), about = "Score LLM conversations with a resident reward model")]
pub struct Cli {
    /// Log line format on stderr: `text` (coloured only when stderr is a terminal and NO_COLOR
    /// is unset) or `json` (one object per line, for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SCORESTREAM_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Score JSONL conversations from a file or stdin; one JSON line out per scored input.
    ///
    /// Exit status: 0 when at least one line was scored (or the input was empty), the failed
    /// lines written as error records; 3 when lines were read but none could be scored; 1 when
    /// the run itself failed (model, tokenizer, files); 2 for a usage error.
    Score(ScoreArgs),
    /// Describe a model directory: architecture, parameters, head, labels, stages.
    Inspect(InspectArgs),
    /// Write an FP8 (compressed-tensors) copy of a checkpoint, shard by shard.
    Quantize(QuantizeArgs),
    /// Score the same conversations in two numeric formats and report their agreement.
    Compare(CompareArgs),
    /// Run the streaming worker described by a config file.
    Run(ConfigArgs),
    /// Serve `POST /v1/score` with the resident model, without a stream source (`[source]`,
    /// `[sink]` and `[dead_letter]` may be left out of the config).
    Serve(ConfigArgs),
    /// Validate a worker config file without starting anything.
    CheckConfig(ConfigArgs),
    /// Compile every CUDA kernel to CUBIN for each GPU architecture (no GPU needed; needs the
    /// `cuda` feature); point SCORESTREAM_PREBUILT_KERNELS at the output folder to load them.
    Kernels(KernelsArgs),
}

#[derive(Debug, Args)]
pub struct KernelsArgs {
    /// GPU architectures, comma separated, or `all` (sm_80 A100, sm_86 A10/A40, sm_89
    /// L4/L40S, sm_90a H100/H200; the FP8 kernels only for sm_89 and later).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub arch: Vec<String>,
    /// Output folder (gets kernels-<arch>.cubin and kernels-<arch>.json per architecture).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Worker config (TOML); any key can be overridden by SCORESTREAM__<SECTION>__<KEY>.
    #[arg(long)]
    pub config: PathBuf,
}

/// Which model and how to run it (shared by the commands that load one).
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Numeric format: auto (f32 on the CPU; fp8 on GPUs from sm_89, else bf16), f32 (CPU
    /// only), bf16, fp8 (GPUs from sm_89, or emulated on the CPU).
    #[arg(long, value_enum, default_value_t = Dtype::Auto)]
    pub dtype: Dtype,
    /// Devices to split the layers over, comma separated ("cpu,cpu" pipelines two CPU stages).
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    pub devices: Vec<String>,
    /// Longest templated conversation, in tokens.
    #[arg(long, default_value_t = crate::model::options::default_max_tokens())]
    pub max_tokens: usize,
    /// What to do with longer conversations.
    #[arg(long, value_enum, default_value_t = TruncationPolicy::DropOldestTurns)]
    pub truncation: TruncationPolicy,
    /// For *ForCausalLM reward checkpoints: the lm_head row holding the reward head.
    #[arg(long, default_value_t = 0)]
    pub(crate) reward_row: usize,
    /// Weights of the scalar reward over the outputs, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub attribute_weights: Option<Vec<f32>>,
    /// The attention kernel of CUDA stages (v2: the ldmatrix/cp.async kernel).
    #[arg(long, value_enum, default_value_t = crate::model::options::AttentionKernel::V1)]
    pub attention: crate::model::options::AttentionKernel,
}

impl ModelArgs {
    pub fn options(&self) -> ModelOptions {
        ModelOptions {
            path: self.model.clone(),
            dtype: self.dtype,
            devices: self.devices.clone(),
            max_tokens: self.max_tokens,
            truncation: self.truncation,
            reward_row: self.reward_row,
            attribute_weights: self.attribute_weights.clone(),
            attention: self.attention,
        }
    }
}

#[derive(Debug, Args)]
// With `--url` the worker's model scores: `--model` is not needed then.
#[command(mut_arg("model", |a| a.required(false).required_unless_present("url").default_value("-").hide_default_value(true)))]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Score with a running worker's `POST /v1/score` (http://HOST:PORT) instead of a model
    /// loaded here: the same output lines, error records and exit status.
    #[arg(long, conflicts_with = "model")]
    pub url: Option<String>,
    /// A file holding the bearer token for `--url` (the worker's `http.token_file`).
    #[arg(long, requires = "url")]
    pub token_file: Option<PathBuf>,
    /// Input JSONL file, or "-" for stdin.
    #[arg(long, default_value = "-")]
    pub input: String,
    /// Output JSONL file, or "-" for stdout.
    #[arg(long, default_value = "-")]
    pub output: String,
    /// Where error records go (default: stderr).
    #[arg(long)]
    pub errors: Option<PathBuf>,
    /// Most tokens in one forward pass.
    #[arg(long, default_value_t = BatchLimits::DEFAULT_MAX_TOKENS)]
    pub(crate) batch_tokens: usize,
    /// Most conversations in one forward pass (with `--url`: in one request).
    #[arg(long, default_value_t = BatchLimits::DEFAULT_MAX_EVENTS)]
    pub(crate) batch_events: usize,
    /// Conversations of a batch beginning with this many or more identical tokens compute
    /// that prefix once (same scores; 0 = off).
    #[arg(long, default_value_t = 128)]
    pub min_shared_prefix: usize,
    /// Largest accepted input line, in bytes (0 = unlimited).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub(crate) max_line_bytes: usize,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Plan activation memory for batches of this many tokens.
    #[arg(long, default_value_t = BatchLimits::DEFAULT_MAX_TOKENS)]
    pub batch_tokens: usize,
    /// Plan GPU buffers for batches of at most this many conversations.
    #[arg(long, default_value_t = BatchLimits::DEFAULT_MAX_EVENTS)]
    pub batch_events: usize,
    /// Free memory of the GPUs in --devices, to check the plan against without a GPU: one size
    /// for all, or one per device, comma separated (e.g. 80GiB or 79GB,79GB).
    #[arg(long, value_delimiter = ',')]
    pub device_memory: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Source Hugging Face model directory (bf16, f16 or f32 weights).
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// First numeric format.
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    pub(crate) dtype_a: Dtype,
    /// Second numeric format.
    #[arg(long, value_enum, default_value_t = Dtype::Fp8)]
    pub(crate) dtype_b: Dtype,
    /// Input JSONL conversations.
    #[arg(long)]
    pub input: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
