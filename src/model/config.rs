//! A mirror of the Hugging Face `config.json`, normalized into [`ArchConfig`]: the handful of
//! switches (bias, norm kind, activation, rotary fraction, head) on which the supported
//! families differ. Everything the decoder needs is decided here, once, with errors that name
//! the offending field.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::ModelError;

/// The SteerLM/HelpSteer2 attribute labels of Nemotron-4-340B-Reward, in output order.
pub(crate) const STEERLM_LABELS: [&str; 9] = [
    "quality",
    "toxicity",
    "humor",
    "creativity",
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
];

/// Weights of the scalar reward over [`STEERLM_LABELS`] (Nemotron-4-340B-Reward model card).
pub(crate) const STEERLM_WEIGHTS: [f32; 9] = [0.0, 0.0, 0.0, 0.0, 0.3, 0.74, 0.46, 0.47, -0.33];

/// The raw fields of config.json that any supported family may use.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    norm_eps: Option<f64>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    pad_token_id: Option<Value>,
    id2label: Option<BTreeMap<String, String>>,
    num_labels: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    quantization_config: Option<Value>,
}

/// How the hidden state of the last token becomes the model's outputs.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadKind {
    /// `*ForCausalLM`: one row of `lm_head` (or of the tied embedding) — never the full vocabulary.
    LmHeadRow { tied: bool },
    /// `*ForSequenceClassification`: the `score` linear layer (`num_labels` outputs, no bias).
    Score,
}

/// Per-layer normalization (the candle model, the CPU kernel references and the CUDA layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    /// Nemotron's LayerNorm with a bias whose weight is stored minus one.
    LayerNorm1P,
}

/// The MLP's activation; gated activations use `gate_proj` and `up_proj` (the CUDA kernels and
/// their references take the two as one `[tokens, 2·inter]` input, gate | up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `down(silu(gate(x)) * up(x))`.
    SwiGlu,
    /// `down(relu(up(x))²)`, ungated (Nemotron-4).
    Relu2,
    /// `down(gelu_tanh(gate(x)) * up(x))`.
    GeGluTanh,
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max: f64 },
}

/// Everything the decoder needs, decided once from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchConfig {
    pub architecture: String,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub(crate) num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub norm: NormKind,
    pub(crate) norm_eps: f64,
    pub activation: Activation,
    /// Bias on q/k/v projections.
    pub(crate) qkv_bias: bool,
    /// Bias on the output projection.
    pub(crate) o_bias: bool,
    pub(crate) mlp_bias: bool,
    /// RMSNorm over each head of q and k before rotary (Qwen3).
    pub(crate) qk_norm: bool,
    pub rope_theta: f64,
    pub(crate) rope_scaling: RopeScaling,
    /// Rotary dimensions per head (even, ≤ head_dim).
    pub(crate) rotary_dim: usize,
    /// Per layer: the attention window, when the layer attends to a sliding window.
    pub(crate) sliding_window: Vec<Option<usize>>,
    pub max_position_embeddings: usize,
    pub head: HeadKind,
    /// Output labels in output order (one for a single-output head).
    pub labels: Vec<String>,
    pub pad_token_id: Option<u32>,
    /// The raw `quantization_config`, when the checkpoint is pre-quantized.
    pub quantization_config: Option<Value>,
}

impl ArchConfig {
    /// Read and normalize `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ModelError::Io { path: path.clone(), source })?;
        Self::from_json(&text).map_err(|e| e.in_file(&path))
    }

    /// Normalize the text of a config.json.
    pub(crate) fn from_json(text: &str) -> Result<Self, ModelError> {
        let raw: RawConfig = super::json::from_object_text(text)?;
        from_raw(raw)
    }

    /// Whether the outputs are the nine SteerLM attributes.
    pub(crate) fn is_steerlm(&self) -> bool {
        self.labels.len() == STEERLM_LABELS.len()
            && self.labels.iter().zip(STEERLM_LABELS).all(|(a, b)| a.eq_ignore_ascii_case(b))
    }
}

fn from_raw(raw: RawConfig) -> Result<ArchConfig, ModelError> {
    for (field, value) in [
        ("num_hidden_layers", raw.num_hidden_layers),
        ("hidden_size", raw.hidden_size),
        ("intermediate_size", raw.intermediate_size),
        ("num_attention_heads", raw.num_attention_heads),
        ("vocab_size", raw.vocab_size),
        ("max_position_embeddings", raw.max_position_embeddings.unwrap_or(1)),
    ] {
        if value == 0 {
            return Err(ModelError::config(field, "must be at least 1"));
        }
    }
    let architecture = raw
        .architectures
        .first()
        .cloned()
        .ok_or_else(|| ModelError::config("architectures", "missing or empty"))?;
    let (family, head) = parse_architecture(&architecture)?;
    let model_type = raw.model_type.clone().unwrap_or_else(|| family.to_owned());
    let num_heads = raw.num_attention_heads;
    let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / num_heads.max(1));
    if head_dim == 0 {
        return Err(ModelError::config("head_dim", format!("is 0 (hidden_size {} over {num_heads} heads)", raw.hidden_size)));
    }
    let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(ModelError::config(
            "num_key_value_heads",
            format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
        ));
    }
    let nemotron = family == "nemotron";
    let norm = if nemotron { NormKind::LayerNorm1P } else { NormKind::Rms };
    let norm_eps = raw
        .rms_norm_eps
        .or(raw.norm_eps)
        .or(raw.layer_norm_eps)
        .unwrap_or(if nemotron { 1e-5 } else { 1e-6 });
    let act_name = raw.hidden_act.clone().unwrap_or_else(|| "silu".to_owned());
    let activation = match (act_name.as_str(), nemotron) {
        ("relu2", true) => Activation::Relu2,
        ("silu" | "swish", false) => Activation::SwiGlu,
        ("gelu_pytorch_tanh", false) => Activation::GeGluTanh,
        (other, _) => {
            return Err(ModelError::config(
                "hidden_act",
                format!("{other:?} is not supported for model_type {model_type:?}"),
            ))
        }
    };
    let rope = parse_rope(&raw)?;
    let rotary_dim = {
        let d = (head_dim as f64 * rope.partial_rotary_factor) as usize;
        d - d % 2
    };
    let labels = parse_labels(&raw, &head);
    let sliding_window = parse_sliding_window(&raw, family);
    let pad_token_id = match &raw.pad_token_id {
        Some(Value::Number(n)) => n.as_u64().and_then(|v| u32::try_from(v).ok()),
        Some(Value::Array(a)) => a.first().and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok()),
        _ => None,
    };
    let tied = raw.tie_word_embeddings.unwrap_or(false);
    let head = match head {
        HeadKind::LmHeadRow { .. } => HeadKind::LmHeadRow { tied },
        other => other,
    };
    Ok(ArchConfig {
        architecture,
        model_type,
        hidden_size: raw.hidden_size,
        intermediate_size: raw.intermediate_size,
        num_layers: raw.num_hidden_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size: raw.vocab_size,
        norm,
        norm_eps,
        activation,
        qkv_bias: family == "qwen2" || raw.attention_bias,
        o_bias: raw.attention_bias && family != "qwen2",
        mlp_bias: raw.mlp_bias,
        qk_norm: family == "qwen3",
        rope_theta: rope.theta,
        rope_scaling: rope.scaling,
        rotary_dim,
        sliding_window,
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
        head,
        labels,
        pad_token_id,
        quantization_config: raw.quantization_config,
    })
}

/// Split `FamilyForX` into the family and the head kind.
fn parse_architecture(arch: &str) -> Result<(&'static str, HeadKind), ModelError> {
    let family = match arch.split("For").next().unwrap_or_default() {
        "Llama" => "llama",
        "Mistral" => "mistral",
        "Qwen2" => "qwen2",
        "Qwen3" => "qwen3",
        "Nemotron" => "nemotron",
        _ => return Err(unsupported_arch(arch)),
    };
    let head = if arch.ends_with("ForCausalLM") {
        HeadKind::LmHeadRow { tied: false }
    } else if arch.ends_with("ForSequenceClassification") {
        HeadKind::Score
    } else {
        return Err(unsupported_arch(arch));
    };
    Ok((family, head))
}

fn unsupported_arch(arch: &str) -> ModelError {
    ModelError::config(
        "architectures",
        format!(
            "{arch:?} is not supported; supported: {{Llama,Mistral,Qwen2,Qwen3,Nemotron}}\
             For{{CausalLM,SequenceClassification}}"
        ),
    )
}

struct Rope {
    theta: f64,
    scaling: RopeScaling,
    partial_rotary_factor: f64,
}

/// RoPE settings from `rope_theta` + `rope_scaling` (transformers 4.x) or `rope_parameters`
/// (transformers 5.x). Where both exist, `rope_parameters` wins, as in transformers 5.
fn parse_rope(raw: &RawConfig) -> Result<Rope, ModelError> {
    let (field, params) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p @ Value::Object(_)), _) => ("rope_parameters", Some(p)),
        (_, Some(s @ Value::Object(_))) => ("rope_scaling", Some(s)),
        _ => ("rope_scaling", None),
    };
    let get = |k: &str| params.and_then(|p| p.get(k)).and_then(Value::as_f64);
    let theta = get("rope_theta").or(raw.rope_theta).unwrap_or(10_000.0);
    let partial_rotary_factor = get("partial_rotary_factor").or(raw.partial_rotary_factor).unwrap_or(1.0);
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let need = |k: &str| {
        get(k).ok_or_else(|| ModelError::config(&format!("{field}.{k}"), "missing for this rope_type"))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: need("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max: need("original_max_position_embeddings")?,
        },
        other => {
            return Err(ModelError::config(
                &format!("{field}.rope_type"),
                format!("{other:?} is not supported (supported: default, linear, llama3)"),
            ))
        }
    };
    if !(0.0..=1.0).contains(&partial_rotary_factor) || partial_rotary_factor == 0.0 {
        return Err(ModelError::config("partial_rotary_factor", format!("{partial_rotary_factor} is not in (0, 1]")));
    }
    Ok(Rope { theta, scaling, partial_rotary_factor })
}

/// Output labels ordered by id; transformers' defaults (`LABEL_i`) when absent.
fn parse_labels(raw: &RawConfig, head: &HeadKind) -> Vec<String> {
    if matches!(head, HeadKind::LmHeadRow { .. }) {
        return vec!["reward".to_owned()];
    }
    let mut pairs: Vec<(usize, String)> = raw
        .id2label
        .iter()
        .flatten()
        .filter_map(|(k, v)| k.parse().ok().map(|k: usize| (k, v.clone())))
        .collect();
    pairs.sort();
    // transformers' PretrainedConfig defaults to two labels when config.json names none.
    let n = raw.num_labels.unwrap_or(if pairs.is_empty() { 2 } else { pairs.len() }).max(pairs.len()).max(1);
    (0..n)
        .map(|i| pairs.iter().find(|(k, _)| *k == i).map_or_else(|| format!("LABEL_{i}"), |(_, v)| v.clone()))
        .collect()
}

/// Which layers attend to a sliding window, following each family's transformers code.
fn parse_sliding_window(raw: &RawConfig, family: &str) -> Vec<Option<usize>> {
    let n = raw.num_hidden_layers;
    if let (Some(types), Some(w)) = (&raw.layer_types, raw.sliding_window) {
        return types.iter().map(|t| (t == "sliding_attention").then_some(w)).collect();
    }
    match (family, raw.sliding_window) {
        ("mistral", Some(w)) => vec![Some(w); n],
        ("qwen2" | "qwen3", Some(w)) if raw.use_sliding_window.unwrap_or(false) => {
            let first = raw.max_window_layers.unwrap_or(n);
            (0..n).map(|i| (i >= first).then_some(w)).collect()
        }
        _ => vec![None; n],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(extra: &str) -> String {
        format!(
            r#"{{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100{extra}}}"#
        )
    }

    #[test]
    fn llama3_rope_from_either_layout() {
        let old = base(
            r#","architectures":["LlamaForCausalLM"],"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        );
        let new = base(
            r#","architectures":["LlamaForCausalLM"],"rope_parameters":{"rope_type":"llama3",
            "rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192}"#,
        );
        let (a, b) = (ArchConfig::from_json(&old).unwrap(), ArchConfig::from_json(&new).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(a.head, HeadKind::LmHeadRow { tied: false });
    }

    #[test]
    fn unknown_things_name_their_field() {
        let err = |extra: &str| ArchConfig::from_json(&base(extra)).unwrap_err().to_string();
        assert!(err(r#","architectures":["GPT2ForSequenceClassification"]"#).contains("architectures"));
        assert!(err(r#","architectures":["LlamaForSequenceClassification"],"hidden_act":"tanh""#)
            .contains("hidden_act"));
        assert!(err(r#","architectures":["LlamaForCausalLM"],"rope_scaling":{"rope_type":"yarn","factor":4.0}"#)
            .contains("rope_scaling.rope_type"));
    }

    #[test]
    fn wrong_layer_counts_name_their_field() {
        let with_layers = |n: &str| base("").replace(r#""num_hidden_layers":2"#, &format!(r#""num_hidden_layers":{n}"#))
            .replace('}', r#","architectures":["LlamaForSequenceClassification"]}"#);
        for n in ["0", "-1", "\"two\""] {
            let e = ArchConfig::from_json(&with_layers(n)).unwrap_err().to_string();
            assert!(e.starts_with("config field `num_hidden_layers`"), "{n}: {e}");
        }
        let missing = ArchConfig::from_json(&base("").replace(r#""vocab_size":100"#, r#""x":1"#)).unwrap_err().to_string();
        assert!(missing.contains("`vocab_size`") && missing.contains("missing"), "{missing}");
        let list = ArchConfig::from_json("[1]").unwrap_err().to_string();
        assert!(list.contains("a list"), "{list}");
    }

    #[test]
    fn nemotron_switches() {
        let c = ArchConfig::from_json(&base(
            r#","architectures":["NemotronForSequenceClassification"],"model_type":"nemotron",
            "hidden_act":"relu2","partial_rotary_factor":0.5,"head_dim":32,"norm_eps":1e-5,
            "id2label":{"0":"quality","1":"toxicity","2":"humor","3":"creativity","4":"helpfulness",
            "5":"correctness","6":"coherence","7":"complexity","8":"verbosity"}"#,
        ))
        .unwrap();
        assert_eq!((c.norm, c.activation, c.rotary_dim, c.head_dim), (NormKind::LayerNorm1P, Activation::Relu2, 16, 32));
        assert!(c.is_steerlm());
    }
}
