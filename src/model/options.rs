//! What the user chooses about the model: where it is, the numeric format, the devices,
//! the length limit and how rewards are read. This is the `[model]` section of the worker
//! config and the flags of `scorestream score`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::prompt::TruncationPolicy;
use crate::settings::{invalid, positive, Invalid};

/// Numeric format the model runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// The best the devices run: f32 on the CPU; on CUDA fp8 where every GPU has FP8 tensor
    /// cores (compute capability 8.9 and later), else bf16 (see `engine::cuda::precision`).
    #[default]
    Auto,
    /// 32-bit floats everywhere: the reference format (CPU only).
    F32,
    /// bfloat16 weights and activations; norms and softmax in f32.
    Bf16,
    /// FP8 E4M3 linear layers with per-channel weight scales and per-token activation scales.
    Fp8,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Auto => "auto",
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::Fp8 => "fp8",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which CUDA attention kernel the GPU stages run (the CPU engine has one attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKernel {
    /// `kernels/attention.cu`: flash-style on `mma.sync`, one block per (64 queries, head).
    /// The default until the GPU check has passed v2 on a GPU.
    #[default]
    V1,
    /// `kernels/attention_v2.cu`: ldmatrix from swizzled shared memory, cp.async
    /// double-buffered K/V tiles, one block for all query heads of a KV group, and every head
    /// size of the supported families (16, 24, 32, 64, 80, 96, 128, 192, 256).
    V2,
}

/// Where a stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// GPU ordinal (the CUDA engine, feature `cuda`).
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    /// The one parser of device names, for the config check and the loader alike: "cpu",
    /// "cuda:N", or "cuda" (= "cuda:0"). Syntax only: whether this build and machine can run
    /// CUDA is decided when the model is loaded.
    fn from_str(name: &str) -> Result<Self, String> {
        let expected = || "expected \"cpu\", \"cuda\" or \"cuda:N\"".to_owned();
        match name {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            n => match n.strip_prefix("cuda:") {
                Some(i) if !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) => {
                    i.parse().map(DeviceSpec::Cuda).map_err(|_| expected())
                }
                _ => Err(expected()),
            },
        }
    }
}

/// The `[model]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelOptions {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json, chat template).
    pub path: PathBuf,
    /// Numeric format: "auto" (default: f32 on the CPU; fp8 on GPUs with FP8 tensor cores,
    /// sm_89 and later, else bf16), "f32" (CPU only), "bf16" (CPU, or GPUs from sm_80) or "fp8"
    /// (CPU emulation, or GPUs from sm_89). A dtype the GPU cannot run is refused at start.
    #[serde(default)]
    pub dtype: Dtype,
    /// Devices the decoder layers are split over, in order: "cpu", "cuda:0", ...
    #[serde(default = "default_devices")]
    pub devices: Vec<String>,
    /// Longest templated conversation, in tokens.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// What to do with a conversation longer than `max_tokens`.
    #[serde(default)]
    pub truncation: TruncationPolicy,
    /// For `*ForCausalLM` reward checkpoints: the row of `lm_head` that holds the reward head.
    #[serde(default)]
    pub reward_row: usize,
    /// Weights of the scalar reward over the model's outputs (one per label). Defaults to the
    /// Nemotron-4-340B-Reward weights for its 9 SteerLM labels, else the single output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute_weights: Option<Vec<f32>>,
    /// The attention kernel of CUDA stages: "v1" (default) or "v2" (see README, GPU engine).
    /// CPU stages ignore it.
    #[serde(default)]
    pub attention: AttentionKernel,
}

#[cfg(test)]
mod tests {
    use super::DeviceSpec;

    #[test]
    fn device_names() {
        let parse = |s: &str| s.parse::<DeviceSpec>();
        assert_eq!(parse("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(parse("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(parse("cuda:3"), Ok(DeviceSpec::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:+1", "cuda:x", "CPU", "cuda:99999999999999999999999"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}

pub(crate) fn default_devices() -> Vec<String> {
    vec!["cpu".to_owned()]
}

pub(crate) const fn default_max_tokens() -> usize {
    4096
}

impl ModelOptions {
    /// Options with every default, for the model at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            dtype: Dtype::default(),
            devices: default_devices(),
            max_tokens: default_max_tokens(),
            truncation: TruncationPolicy::default(),
            reward_row: 0,
            attribute_weights: None,
            attention: AttentionKernel::default(),
        }
    }

    /// Checks serde cannot express, syntax only: whether this build and machine can run the
    /// devices is checked at `run`, so `check-config` works as a pre-deploy check from any build.
    pub fn validate(&self) -> Result<(), Invalid> {
        positive("model.max_tokens", self.max_tokens)?;
        if self.devices.is_empty() {
            return invalid("model.devices", "at least one device is needed");
        }
        for d in &self.devices {
            if let Err(message) = d.parse::<DeviceSpec>() {
                return invalid("model.devices", &format!("{d:?}: {message}"));
            }
        }
        Ok(())
    }
}
