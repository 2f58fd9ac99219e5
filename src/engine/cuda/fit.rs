//! Whether a model's stages fit their GPUs, decided before anything is uploaded: each stage's
//! device bytes (weights in the running precision, the activation arena for the configured
//! batch limits, the hop inputs, the load staging, cuBLASLt's workspace and a reserve) computed
//! from the config alone, then checked against each device's free memory, stages that share a
//! device summed. Plain Rust, no GPU call: `inspect --devices cuda:0,cuda:1 --device-memory
//! 80GiB` prints the same figures on a machine without a GPU.

use std::ops::Range;

use super::plan::{plan_buffers, LayerShape};
use super::precision::Precision;
use crate::batch::policy::BatchLimits;
use crate::model::config::{Activation, ArchConfig, NormKind};

/// Bytes every stage keeps free beyond what it allocates: cuBLASLt's handle and plans, the
/// kernel module, and the allocator's rounding of a few hundred allocations.
pub(crate) const RESERVE_BYTES: usize = 512 << 20;

/// Device bytes of one staging buffer of the on-device load ([`super::upload_plan`]): a
/// chunk of bf16 rows on its way to the quantization kernel. Two are used in turn.
pub(crate) const LOAD_CHUNK_BYTES: usize = 64 << 20;

/// cuBLASLt's workspace per stage (`gemm::WORKSPACE_BYTES`, which is behind the `cuda` feature).
pub(crate) const GEMM_WORKSPACE_BYTES: usize = 32 << 20;

/// One stage's device memory, by use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct StageNeed {
    pub stage: usize,
    pub device: String,
    pub layers: (usize, usize),
    /// Linear weights (E4M3 + scales, or bf16), norms, biases, the bf16 embedding on the first
    /// stage and the final norm on the last.
    pub weights: usize,
    /// The activation arena for `max_tokens` tokens in `max_seqs` sequences, the token ids, the
    /// rotary table and cuBLASLt's workspace.
    pub activations: usize,
    /// The double-buffered input of a CUDA stage fed by a CUDA stage before it (0 otherwise).
    pub(crate) hop_inputs: usize,
    /// Device staging of the on-device quantization while loading (0 in bf16).
    pub(crate) load_staging: usize,
    pub(crate) reserve: usize,
}

impl StageNeed {
    pub fn total(&self) -> usize {
        self.weights + self.activations + self.hop_inputs + self.load_staging + self.reserve
    }
}

/// Why a model does not fit its GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct FitError {
    pub stage: usize,
    pub device: String,
    pub layers: (usize, usize),
    pub need: usize,
    pub free: usize,
    detail: String,
    shared: String,
}

impl std::fmt::Display for FitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (d, (first, end)) = (&self.device, self.layers);
        write!(
            f,
            "stage {} (layers {first}..{end}) does not fit {d}: it needs {} ({}){}, and {d} has {} free; spread the layers \
             over more GPUs (--devices cuda:0,cuda:1,...), run fp8 where the GPUs have it, or lower the batch limits",
            self.stage,
            gib(self.need),
            self.detail,
            self.shared,
            gib(self.free)
        )
    }
}

impl std::error::Error for FitError {}

/// `bytes` as GiB with two decimals.
pub(crate) fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The decoder layer's dimensions from the model config.
pub(crate) fn layer_shape(cfg: &ArchConfig) -> LayerShape {
    LayerShape {
        hidden: cfg.hidden_size,
        heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        inter: cfg.intermediate_size,
        gated: !matches!(cfg.activation, Activation::Relu2),
    }
}

/// Device bytes of one decoder layer in `precision`: the four linears with their scales, the
/// biases the family has (f32), the norms (f32, LayerNorm1P with bias) and Qwen3's head norms.
pub(crate) fn layer_device_bytes(cfg: &ArchConfig, precision: Precision) -> usize {
    let s = layer_shape(cfg);
    let f = 4;
    let mut bytes = s.layer_bytes(precision);
    if cfg.qkv_bias {
        bytes += s.qkv_width() * f;
    }
    if cfg.o_bias {
        bytes += s.hidden * f;
    }
    if cfg.mlp_bias {
        bytes += (s.up_width() + s.hidden) * f;
    }
    if cfg.norm == NormKind::LayerNorm1P {
        bytes += 2 * s.hidden * f;
    }
    if cfg.qk_norm {
        bytes += 2 * s.head_dim * f;
    }
    bytes
}

/// What each stage of `ranges` (on `devices`, by name) needs on its GPU to run batches of
/// `limits` in `precision`. `quantize_on_device`: the load quantizes bf16 weights on the GPU
/// (FP8 from a bf16 checkpoint), which needs the staging buffers while it runs.
pub(crate) fn stage_needs(
    cfg: &ArchConfig,
    precision: Precision,
    ranges: &[Range<usize>],
    devices: &[String],
    limits: BatchLimits,
    quantize_on_device: bool,
) -> Vec<StageNeed> {
    let s = layer_shape(cfg);
    let (t, seqs) = (limits.max_tokens.max(1), limits.max_events.max(1));
    let layer = layer_device_bytes(cfg, precision);
    let norm = cfg.hidden_size * 4 * if cfg.norm == NormKind::LayerNorm1P { 2 } else { 1 };
    let arena = plan_buffers(&s, t, seqs, precision).total;
    let activations = arena + t * 4 + cfg.rotary_dim * 2 + GEMM_WORKSPACE_BYTES;
    ranges
        .iter()
        .zip(devices)
        .enumerate()
        .map(|(i, (r, device))| {
            let embed = if r.start == 0 { cfg.vocab_size * cfg.hidden_size * 2 } else { 0 };
            let tail = if r.end == cfg.num_layers { norm } else { 0 };
            StageNeed {
                stage: i,
                device: device.clone(),
                layers: (r.start, r.end),
                weights: r.len() * layer + embed + tail,
                activations,
                hop_inputs: if i > 0 && devices[i - 1].starts_with("cuda") && device.starts_with("cuda") {
                    super::hop::SLOTS * t * cfg.hidden_size * 2
                } else {
                    0
                },
                load_staging: if quantize_on_device && precision == Precision::Fp8 { 2 * LOAD_CHUNK_BYTES } else { 0 },
                reserve: RESERVE_BYTES,
            }
        })
        .collect()
}

/// Check `needs` against each device's free bytes (`free(device)`; `None`: not a GPU, or not
/// known, and not checked). Stages on one device share its memory: a stage is refused when it
/// and the stages before it on that device need more than it has free.
pub(crate) fn check_fit(needs: &[StageNeed], free: impl Fn(&str) -> Option<usize>) -> Result<(), FitError> {
    let mut used: std::collections::HashMap<&str, (usize, Vec<usize>)> = std::collections::HashMap::new();
    for n in needs {
        let Some(free) = free(&n.device) else { continue };
        let (before, stages) = used.entry(n.device.as_str()).or_default();
        let need = n.total();
        if *before + need > free {
            let shared = if stages.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = stages.iter().map(|s| s.to_string()).collect();
                format!(" on top of the {} that stage(s) {} on the same device take", gib(*before), list.join(", "))
            };
            let detail = format!(
                "weights {}, activations {}, hop inputs {}, load staging {}, reserve {}",
                gib(n.weights),
                gib(n.activations),
                gib(n.hop_inputs),
                gib(n.load_staging),
                gib(n.reserve)
            );
            return Err(FitError { stage: n.stage, device: n.device.clone(), layers: n.layers, need, free: free.saturating_sub(*before), detail, shared });
        }
        *before += need;
        stages.push(n.stage);
    }
    Ok(())
}

/// Parse a memory size: a number with an optional unit, binary (`KiB`, `MiB`, `GiB`, `TiB`) or
/// decimal (`KB`, `MB`, `GB`, `TB`, `B`); `80GiB`, `79.5 GB`, `1000000`.
pub(crate) fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let value: f64 = num.parse().map_err(|_| format!("{text:?} is not a memory size (e.g. 80GiB, 79.5GB)"))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    Ok((value * scale) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::stage::plan_stages;

    /// Llama-3.1-70B's config.json, as published.
    const LLAMA_70B: &str = r#"{
        "architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
        "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_theta": 500000.0, "tie_word_embeddings": false, "num_labels": 1,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    }"#;

    fn llama_70b() -> ArchConfig {
        ArchConfig::from_json(LLAMA_70B).expect("70B config")
    }

    /// The stages as the engine splits them (balanced by bytes).
    fn needs(cfg: &ArchConfig, p: Precision, devices: &[&str]) -> Vec<StageNeed> {
        let layer = layer_device_bytes(cfg, p);
        let ranges = plan_stages(&vec![layer; cfg.num_layers], cfg.vocab_size * cfg.hidden_size * 2, 0, devices.len());
        let names: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
        stage_needs(cfg, p, &ranges, &names, BatchLimits::default(), true)
    }

    const GB80: usize = 80_000_000_000;

    #[test]
    fn llama_70b_in_bf16_fits_two_80gb_gpus_and_is_refused_on_one() {
        let cfg = llama_70b();
        let two = needs(&cfg, Precision::Bf16, &["cuda:0", "cuda:1"]);
        assert_eq!(two.len(), 2);
        assert_eq!((two[0].layers, two[1].layers.1), ((0, two[1].layers.0), 80));
        check_fit(&two, |_| Some(GB80)).expect("2 x 80 GB hold a bf16 70B");
        // Each stage holds about half of the 141 GB of bf16 weights.
        assert!(two.iter().all(|n| n.weights > 60 << 30 && n.total() < GB80), "{two:?}");
        assert_eq!(two[0].hop_inputs, 0);
        assert_eq!(two[1].hop_inputs, 2 * 16_384 * 8192 * 2);

        let one = needs(&cfg, Precision::Bf16, &["cuda:0"]);
        let e = check_fit(&one, |_| Some(GB80)).unwrap_err();
        assert_eq!((e.stage, e.device.as_str(), e.layers, e.free), (0, "cuda:0", (0, 80), GB80));
        let msg = e.to_string();
        for part in ["stage 0 (layers 0..80) does not fit cuda:0", "needs 13", "74.51 GiB free", "--devices cuda:0,cuda:1"] {
            assert!(msg.contains(part), "{part:?} missing: {msg}");
        }
    }

    #[test]
    fn llama_70b_in_fp8_fits_one_80gb_gpu() {
        let cfg = llama_70b();
        let one = needs(&cfg, Precision::Fp8, &["cuda:0"]);
        check_fit(&one, |_| Some(GB80)).expect("fp8 70B on one 80 GB GPU");
        // E4M3 weights (1 byte) + f32 scales + the bf16 embedding: about 70 GB.
        assert!(one[0].weights > 68_000_000_000 && one[0].weights < 72_000_000_000, "{}", one[0].weights);
        assert_eq!(one[0].load_staging, 2 * LOAD_CHUNK_BYTES);
        // Without on-device quantization no staging is planned.
        let ranges = [0..80];
        let host = stage_needs(&cfg, Precision::Fp8, &ranges, &["cuda:0".into()], BatchLimits::default(), false);
        assert_eq!(host[0].load_staging, 0);
    }

    #[test]
    fn stages_sharing_a_device_share_its_memory() {
        let cfg = llama_70b();
        let same = needs(&cfg, Precision::Bf16, &["cuda:0", "cuda:0"]);
        let e = check_fit(&same, |_| Some(GB80)).unwrap_err();
        assert_eq!(e.stage, 1, "{e}");
        assert!(e.to_string().contains("on top of the") && e.to_string().contains("stage(s) 0 on the same device"), "{e}");
        // CPU stages (no free figure) are not checked.
        let mixed = needs(&cfg, Precision::Bf16, &["cpu", "cuda:0"]);
        check_fit(&mixed, |d| (d != "cpu").then_some(GB80)).expect("half of the model on one GPU");
    }

    #[test]
    fn the_activation_arena_grows_with_the_batch_limits() {
        let cfg = llama_70b();
        let small = stage_needs(&cfg, Precision::Fp8, &[0..80], &["cuda:0".into()], BatchLimits { max_tokens: 4096, max_events: 64 }, false);
        let big = stage_needs(&cfg, Precision::Fp8, &[0..80], &["cuda:0".into()], BatchLimits { max_tokens: 65_536, max_events: 64 }, false);
        assert!(big[0].activations > 10 * small[0].activations / 2, "{} vs {}", big[0].activations, small[0].activations);
        assert_eq!(big[0].weights, small[0].weights);
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn the_planned_gemm_workspace_is_the_one_allocated() {
        assert_eq!(GEMM_WORKSPACE_BYTES, crate::engine::cuda::gemm::WORKSPACE_BYTES);
    }

    #[test]
    fn memory_sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_bytes("80GiB"), Ok(80 << 30));
        assert_eq!(parse_bytes("80 GB"), Ok(GB80));
        assert_eq!(parse_bytes("79.5GB"), Ok(79_500_000_000));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("512mib"), Ok(512 << 20));
        assert!(parse_bytes("80 gigs").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("GiB").is_err());
    }
}
