//! Loading a model onto its devices: read the config, map the weights, split the layers into
//! stages balanced by parameter bytes, and describe the result ([`ModelInfo`]).

use crate::batch::policy::BatchLimits;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use serde::Serialize;

use super::AnyStage;
use crate::model::config::{ArchConfig, HeadKind};
use crate::model::stage::{plan_stages, Stage};
use crate::model::weights::{Vb, Weights};
use crate::model::{DeviceSpec, Dtype, ModelError, ModelOptions};

/// One stage of the loaded model.
#[derive(Debug, Clone, Serialize)]
pub struct StageInfo {
    pub device: String,
    /// First layer and one past the last.
    pub layers: (usize, usize),
    /// Bytes of weights on disk for this stage.
    pub weight_bytes: usize,
    /// Peak bytes of activations for one batch of `max_batch_tokens` tokens (estimate).
    pub(crate) activation_bytes: usize,
}

/// What `inspect` prints and what the worker labels its metrics with.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The model directory's name.
    pub name: String,
    pub architecture: String,
    pub model_type: String,
    pub(crate) num_parameters: u64,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub head: String,
    pub labels: Vec<String>,
    /// Weight dtypes found on disk (e.g. ["BF16"]).
    pub(crate) stored_dtypes: Vec<String>,
    pub dtype: Dtype,
    /// The length limit in force: the smaller of the configured `max_tokens` and
    /// `max_position_embeddings` ([`length_limit`]).
    pub max_tokens: usize,
    pub max_position_embeddings: usize,
    /// Rows of the embedding: every token id is below it.
    pub vocab_size: usize,
    pub stages: Vec<StageInfo>,
}

/// Parse a device name with [`DeviceSpec`]'s parser (the one the config check uses) and check
/// that this build can run it.
pub fn parse_device(name: &str) -> Result<DeviceSpec, ModelError> {
    let spec: DeviceSpec = name.parse().map_err(|message| ModelError::Device { device: name.to_owned(), message })?;
    if matches!(spec, DeviceSpec::Cuda(_)) && !cfg!(feature = "cuda") {
        return Err(ModelError::Device {
            device: name.to_owned(),
            message: "the CUDA engine is not available in this build (build with --features cuda)".into(),
        });
    }
    Ok(spec)
}

/// The longest conversation the model runs on: `max_tokens`, capped by the positions the model
/// was built for (`max_position_embeddings`).
pub(crate) fn length_limit(max_tokens: usize, cfg: &ArchConfig) -> usize {
    max_tokens.min(cfg.max_position_embeddings)
}

fn compute_dtype(d: Dtype) -> DType {
    match d {
        Dtype::Auto | Dtype::F32 | Dtype::Fp8 => DType::F32,
        Dtype::Bf16 => DType::BF16,
    }
}

/// What a CPU-only model reports as its dtype: `auto` is f32, and an FP8 checkpoint's linear
/// layers run in fp8 whatever was asked (its stored FP8 weights quantize their inputs).
fn cpu_dtype(requested: Dtype, fp8_checkpoint: bool) -> Dtype {
    match requested {
        _ if fp8_checkpoint => Dtype::Fp8,
        Dtype::Auto => Dtype::F32,
        d => d,
    }
}

/// The dtype the stages are loaded with. With GPUs it is chosen by
/// [`crate::engine::cuda::precision::choose`] from their compute capabilities (a dtype they
/// cannot run is an error naming the GPU); CPU stages beside them run the same one. Without,
/// `auto` is f32.
fn resolve_dtype(requested: Dtype, devices: &[DeviceSpec]) -> Result<Dtype, ModelError> {
    let gpus: Vec<usize> = devices.iter().filter_map(|d| if let DeviceSpec::Cuda(i) = d { Some(*i) } else { None }).collect();
    if gpus.is_empty() {
        return Ok(cpu_dtype(requested, false));
    }
    gpu_dtype(requested, &gpus)
}

#[cfg(feature = "cuda")]
fn gpu_dtype(requested: Dtype, ordinals: &[usize]) -> Result<Dtype, ModelError> {
    use crate::engine::cuda::{precision, probe};
    let device = format!("cuda:{}", ordinals[0]);
    let backend = |e: crate::engine::cuda::CudaError| ModelError::Backend { device: device.clone(), source: Box::new(e) };
    let gpus = probe::gpu_facts(ordinals).map_err(backend)?;
    let chosen = precision::choose(requested, &gpus).map_err(|e| backend(e.into()))?;
    let driver = crate::engine::cuda::libraries::driver_version().map_or("unknown".to_owned(), |(a, b)| format!("CUDA {a}.{b}"));
    for g in &gpus {
        tracing::info!(
            gpu = %g.name, ordinal = g.ordinal, capability = %format!("{}.{}", g.major, g.minor), driver = %driver,
            requested = %requested, precision = %chosen.dtype(), supports = g.supports(),
            "GPU {}: {} (sm_{}{}), driver {driver}: running {}", g.ordinal, g.name, g.major, g.minor, chosen.dtype()
        );
    }
    Ok(chosen.dtype())
}

#[cfg(not(feature = "cuda"))]
fn gpu_dtype(_: Dtype, ordinals: &[usize]) -> Result<Dtype, ModelError> {
    Err(ModelError::Device { device: format!("cuda:{}", ordinals[0]), message: "not built with --features cuda".into() })
}

/// Bytes on disk of every tensor under `prefix.`.
fn bytes_under(w: &Weights, prefix: &str) -> usize {
    w.names().filter(|n| n.starts_with(prefix)).map(|n| w.nbytes(n)).sum()
}

/// A model mapped and split into stages, not yet loaded: enough to describe it.
pub struct Plan {
    pub cfg: ArchConfig,
    pub weights: Arc<Weights>,
    pub devices: Vec<DeviceSpec>,
    pub ranges: Vec<std::ops::Range<usize>>,
    pub info: ModelInfo,
}

/// Peak activation bytes of one layer for a batch of `tokens` tokens whose longest sequence has
/// `max_len` tokens: the residual stream and its normalized copy, q/k/v, the attention output,
/// the MLP's intermediate tensors, and one chunk of f32 attention scores.
pub(crate) fn activation_bytes(cfg: &ArchConfig, dtype: Dtype, tokens: usize, max_len: usize) -> usize {
    let b = compute_dtype(dtype).size_in_bytes();
    let per_token = 3 * cfg.hidden_size + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + 3 * cfg.intermediate_size;
    let scores = cfg.num_heads * 512 * max_len.min(tokens) * 4;
    tokens * per_token * b + scores
}

/// Read the config and the safetensors headers and split the layers over `opts.devices`;
/// activation memory is planned for batches of `max_batch_tokens`.
pub fn plan(opts: &ModelOptions, max_batch_tokens: usize) -> Result<Plan, ModelError> {
    let cfg = ArchConfig::from_dir(&opts.path)?;
    let weights = Arc::new(Weights::open(&opts.path)?);
    let names = if opts.devices.is_empty() { vec!["cpu".to_owned()] } else { opts.devices.clone() };
    let devices = names.iter().map(|d| parse_device(d)).collect::<Result<Vec<_>, _>>()?;
    let layer_bytes: Vec<usize> =
        (0..cfg.num_layers).map(|i| bytes_under(&weights, &format!("model.layers.{i}."))).collect();
    let embed = bytes_under(&weights, "model.embed_tokens.");
    let tail = bytes_under(&weights, "model.norm.") + bytes_under(&weights, "score.");
    let ranges = plan_stages(&layer_bytes, embed, tail, devices.len());
    let stages = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let extra = if r.start == 0 { embed } else { 0 } + if r.end == cfg.num_layers { tail } else { 0 };
            StageInfo {
                device: names[i].clone(),
                layers: (r.start, r.end),
                weight_bytes: layer_bytes[r.clone()].iter().sum::<usize>() + extra,
                activation_bytes: activation_bytes(&cfg, opts.dtype, max_batch_tokens, length_limit(opts.max_tokens, &cfg)),
            }
        })
        .collect();
    let mut info = describe(&opts.path, &cfg, &weights, opts, stages);
    // Without a GPU the dtype is known now; with one it is chosen when the model loads
    // ([`loaders`]), so `inspect` shows what was asked ("auto") for GPU plans.
    if devices.iter().all(|d| *d == DeviceSpec::Cpu) {
        info.dtype = cpu_dtype(opts.dtype, cfg.quantization_config.is_some());
        if cfg.quantization_config.is_some() && opts.dtype != Dtype::Fp8 {
            tracing::info!(requested = %opts.dtype, "the checkpoint is FP8-quantized: linear layers run in fp8");
        }
    }
    Ok(Plan { cfg, weights, devices, ranges, info })
}

/// The precision a CUDA stage runs for a resolved dtype.
pub(crate) fn gpu_precision(dtype: Dtype) -> crate::engine::cuda::precision::Precision {
    use crate::engine::cuda::precision::Precision;
    if dtype == Dtype::Fp8 { Precision::Fp8 } else { Precision::Bf16 }
}

/// Each GPU stage's device bytes ([`crate::engine::cuda::fit`]) for `plan`'s stages in
/// `dtype`, with batches of `limits`.
pub(crate) fn gpu_needs(plan: &Plan, dtype: Dtype, limits: BatchLimits) -> Vec<crate::engine::cuda::fit::StageNeed> {
    let names: Vec<String> = plan.info.stages.iter().map(|s| s.device.clone()).collect();
    let on_device = plan.cfg.quantization_config.is_none();
    crate::engine::cuda::fit::stage_needs(&plan.cfg, gpu_precision(dtype), &plan.ranges, &names, limits, on_device)
}

/// Refuse, before anything is uploaded, a model whose GPU stages do not fit their devices'
/// free memory (stages sharing a device summed); the error names the stage, the device, the
/// need and the free memory.
fn check_gpu_fit(plan: &Plan, dtype: Dtype, limits: BatchLimits) -> Result<(), ModelError> {
    let needs = gpu_needs(plan, dtype, limits);
    let mut free = std::collections::HashMap::new();
    for (name, spec) in plan.info.stages.iter().map(|s| &s.device).zip(&plan.devices) {
        if let DeviceSpec::Cuda(ordinal) = spec {
            if !free.contains_key(name) {
                free.insert(name.clone(), device_free_bytes(*ordinal)?);
            }
        }
    }
    for n in &needs {
        if let Some(f) = free.get(&n.device) {
            tracing::info!(stage = n.stage, device = %n.device, need_gib = n.total() as f64 / (1u64 << 30) as f64,
                free_gib = *f as f64 / (1u64 << 30) as f64, "stage {} needs {} on {}", n.stage,
                crate::engine::cuda::fit::gib(n.total()), n.device);
        }
    }
    crate::engine::cuda::fit::check_fit(&needs, |d| free.get(d).copied())
        .map_err(|e| ModelError::Device { device: e.device.clone(), message: e.to_string() })
}

#[cfg(feature = "cuda")]
fn device_free_bytes(ordinal: usize) -> Result<usize, ModelError> {
    let device = format!("cuda:{ordinal}");
    let backend = |e: cudarc::driver::DriverError| ModelError::Backend { device: device.clone(), source: Box::new(e) };
    crate::engine::cuda::probe::require(&[crate::engine::cuda::probe::Library::Driver])
        .map_err(|e| ModelError::Backend { device: device.clone(), source: Box::new(e) })?;
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(backend)?;
    Ok(ctx.mem_get_info().map_err(backend)?.0)
}

#[cfg(not(feature = "cuda"))]
fn device_free_bytes(ordinal: usize) -> Result<usize, ModelError> {
    Err(ModelError::Device { device: format!("cuda:{ordinal}"), message: "not built with --features cuda".into() })
}

/// Loads one stage; run on the stage's own thread (a GPU context belongs to its thread).
pub(crate) type StageLoader = Box<dyn FnOnce() -> Result<AnyStage, ModelError> + Send>;

/// Plan the model described by `opts` and return one loader per stage.
pub(crate) fn loaders(opts: &ModelOptions, limits: BatchLimits) -> Result<(Vec<StageLoader>, ModelInfo), ModelError> {
    let mut plan = plan(opts, limits.max_tokens)?;
    let dtype = resolve_dtype(opts.dtype, &plan.devices)?;
    if plan.devices.iter().any(|d| *d != DeviceSpec::Cpu) {
        plan.info.dtype = dtype;
        check_gpu_fit(&plan, dtype, limits)?;
    }
    tracing::info!(
        max_tokens = plan.info.max_tokens,
        configured_max_tokens = opts.max_tokens,
        max_position_embeddings = plan.info.max_position_embeddings,
        "length limit: {} tokens (the smaller of max_tokens and the model's max_position_embeddings)",
        plan.info.max_tokens
    );
    for (i, s) in plan.info.stages.iter().enumerate() {
        tracing::info!(
            stage = i,
            device = %s.device,
            layers = ?(s.layers.0..s.layers.1),
            weight_mib = s.weight_bytes >> 20,
            activation_mib = s.activation_bytes >> 20,
            "planned stage"
        );
    }
    let cfg = std::sync::Arc::new(plan.cfg);
    let mut hops = hops::Wiring::new(&plan.devices);
    let loaders = plan
        .ranges
        .iter()
        .zip(&plan.devices)
        .enumerate()
        .map(|(i, (range, &device))| {
            let (cfg, weights, range, opts) = (cfg.clone(), plan.weights.clone(), range.clone(), opts.clone());
            let ends = hops.take(i);
            Box::new(move || ends.connect(load_stage(device, weights, &cfg, range, &opts, dtype, limits)?)) as StageLoader
        })
        .collect();
    Ok((loaders, plan.info))
}

/// The wiring of device hops ([`crate::engine::cuda::hop`]) between the stage threads while
/// they load: a receiving CUDA stage makes its input slots and hands them, over a channel, to
/// the CUDA stage before it, which sends its hidden states there from then on.
mod hops {
    use super::{AnyStage, DeviceSpec, ModelError};
    use crate::engine::cuda::hop::{hop_kinds, HopKind};

    #[cfg(feature = "cuda")]
    type Slots = std::sync::Arc<crate::engine::cuda::hop::Inbox>;
    #[cfg(not(feature = "cuda"))]
    type Slots = std::convert::Infallible;

    /// One stage's ends of the hops before and after it.
    #[derive(Default)]
    pub(crate) struct Ends {
        /// The hop into this stage and where to hand its slots.
        pub input: Option<(HopKind, std::sync::mpsc::SyncSender<Slots>)>,
        /// Where the next stage's slots arrive.
        pub output: Option<std::sync::mpsc::Receiver<Slots>>,
    }

    pub(crate) struct Wiring {
        ends: Vec<Ends>,
    }

    impl Wiring {
        pub fn new(devices: &[DeviceSpec]) -> Self {
            let mut ends: Vec<Ends> = devices.iter().map(|_| Ends::default()).collect();
            for (i, kind) in hop_kinds(devices).into_iter().enumerate() {
                if kind.on_device() {
                    let (tx, rx) = std::sync::mpsc::sync_channel(1);
                    ends[i].output = Some(rx);
                    ends[i + 1].input = Some((kind, tx));
                }
            }
            Self { ends }
        }

        pub fn take(&mut self, stage: usize) -> Ends {
            std::mem::take(&mut self.ends[stage])
        }
    }

    impl Ends {
        /// Make this stage's input slots and hand them over, then wait for the next stage's
        /// (it loads meanwhile on its thread; if it fails, this stage keeps the host path and
        /// the engine reports that stage's error).
        pub fn connect(self, stage: AnyStage) -> Result<AnyStage, ModelError> {
            match stage {
                #[cfg(feature = "cuda")]
                AnyStage::Cuda(mut s) => {
                    let device = format!("cuda:{}", s.device().ctx.ordinal());
                    let backend = |e: crate::engine::cuda::CudaError| ModelError::Backend { device: device.clone(), source: Box::new(e) };
                    if let Some((kind, tx)) = self.input {
                        let _ = tx.send(s.make_inbox(kind).map_err(backend)?);
                    }
                    if let Some(rx) = self.output {
                        if let Ok(inbox) = rx.recv() {
                            s.attach_outbox(inbox).map_err(backend)?;
                        }
                    }
                    Ok(AnyStage::Cuda(s))
                }
                // A CPU stage has no device hop (hop_kinds gives it none).
                other => Ok(other),
            }
        }
    }
}

fn load_stage(
    device: DeviceSpec,
    weights: Arc<Weights>,
    cfg: &ArchConfig,
    range: std::ops::Range<usize>,
    opts: &ModelOptions,
    dtype: Dtype,
    limits: BatchLimits,
) -> Result<AnyStage, ModelError> {
    let attr = opts.attribute_weights.as_deref();
    match device {
        DeviceSpec::Cpu => {
            let vb = Vb::new(weights, compute_dtype(dtype), Device::Cpu).with_fp8(dtype == Dtype::Fp8);
            Ok(AnyStage::Cpu(Stage::load(&vb, cfg, range, opts.reward_row, attr)?))
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(ordinal) => {
            use crate::engine::cuda::precision::Precision;
            use crate::engine::cuda::stage::{CudaStage, LoadPath};
            let vb = Vb::new(weights, DType::F32, Device::Cpu);
            let precision = if dtype == Dtype::Fp8 { Precision::Fp8 } else { Precision::Bf16 };
            let (max_tokens, max_seqs) = (limits.max_tokens, limits.max_events);
            CudaStage::load(LoadPath::Device, ordinal, &vb, cfg, range, opts.reward_row, attr, precision, max_tokens, max_seqs, opts.attention)
                .map(|s| AnyStage::Cuda(Box::new(s)))
                .map_err(|e| ModelError::Backend { device: format!("cuda:{ordinal}"), source: Box::new(e) })
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(ordinal) => {
            let _ = (limits, dtype);
            Err(ModelError::Device { device: format!("cuda:{ordinal}"), message: "not built with --features cuda".into() })
        }
    }
}

fn describe(path: &Path, cfg: &ArchConfig, w: &Weights, opts: &ModelOptions, stages: Vec<StageInfo>) -> ModelInfo {
    let mut stored: Vec<String> = w.names().filter_map(|n| w.info(n).ok()).map(|(_, d)| d).collect();
    stored.sort();
    stored.dedup();
    let head = match cfg.head {
        HeadKind::LmHeadRow { tied } => {
            format!("lm_head row {}{}", opts.reward_row, if tied { " (tied to embed_tokens)" } else { "" })
        }
        HeadKind::Score => format!("score ({} outputs)", cfg.labels.len()),
    };
    ModelInfo {
        name: path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| path.display().to_string()),
        architecture: cfg.architecture.clone(),
        model_type: cfg.model_type.clone(),
        num_parameters: w.num_parameters(),
        num_layers: cfg.num_layers,
        hidden_size: cfg.hidden_size,
        head,
        labels: cfg.labels.clone(),
        stored_dtypes: stored,
        dtype: opts.dtype,
        max_tokens: length_limit(opts.max_tokens, cfg),
        max_position_embeddings: cfg.max_position_embeddings,
        vocab_size: cfg.vocab_size,
        stages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each stage gets the ends of the device hops around it: a CUDA stage after a CUDA stage
    /// receives, one before a CUDA stage sends; CPU stages and their neighbours get none.
    #[test]
    fn device_hops_are_wired_between_cuda_neighbours_only() {
        use crate::engine::cuda::hop::HopKind;
        let devices = [DeviceSpec::Cuda(0), DeviceSpec::Cuda(0), DeviceSpec::Cuda(1), DeviceSpec::Cpu, DeviceSpec::Cuda(1)];
        let mut wiring = hops::Wiring::new(&devices);
        let ends: Vec<(Option<HopKind>, bool)> =
            (0..devices.len()).map(|i| wiring.take(i)).map(|e| (e.input.map(|(k, _)| k), e.output.is_some())).collect();
        assert_eq!(
            ends,
            [
                (None, true),
                (Some(HopKind::SameDevice { ordinal: 0 }), true),
                (Some(HopKind::Peer { from: 0, to: 1 }), false),
                (None, false),
                (None, false),
            ]
        );
    }

    #[test]
    fn a_cpu_model_runs_what_was_asked_and_auto_is_f32() {
        let cpu = [DeviceSpec::Cpu, DeviceSpec::Cpu];
        assert_eq!(resolve_dtype(Dtype::Auto, &cpu).unwrap(), Dtype::F32);
        assert_eq!(cpu_dtype(Dtype::Auto, false), Dtype::F32);
        for d in [Dtype::F32, Dtype::Bf16, Dtype::Fp8] {
            assert_eq!(resolve_dtype(d, &cpu).unwrap(), d);
            // An FP8 checkpoint's linear layers are FP8 on the CPU whatever was asked.
            assert_eq!(cpu_dtype(d, true), Dtype::Fp8);
        }
    }
}
