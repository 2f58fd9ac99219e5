//! `scorestream quantize`: write an FP8 checkpoint in the compressed-tensors layout that vLLM and
//! llm-compressor use (`F8_E4M3` weights, f32 per-channel `weight_scale`, dynamic per-token
//! activations), shard by shard so that only one shard is in memory at a time.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use crate::cli::QuantizeArgs;
use crate::model::fp8;
use crate::model::weights::safetensors_files;

/// Projections quantized to FP8; everything else (embeddings, norms, heads) is copied.
const LINEAR_SUFFIXES: [&str; 7] =
    ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"];

/// Files copied unchanged beside the weights when present.
const COPIED: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
];

pub(crate) fn is_quantized_linear(name: &str) -> bool {
    name.starts_with("model.layers.") && LINEAR_SUFFIXES.iter().any(|s| name.ends_with(s))
}

pub fn run(args: &QuantizeArgs) -> anyhow::Result<()> {
    let summary = quantize_dir(&args.model, &args.out)?;
    println!(
        "wrote {} ({} tensors quantized, {} shards, peak RSS {:.1} MiB)",
        args.out.display(),
        summary.quantized,
        summary.shards,
        peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
    );
    Ok(())
}

pub struct Summary {
    pub quantized: usize,
    pub shards: usize,
}

/// Quantize the checkpoint in `src` into `dst`.
pub fn quantize_dir(src: &Path, dst: &Path) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    let files = safetensors_files(src)?;
    let mut weight_map = BTreeMap::new();
    let mut quantized = 0;
    for file in &files {
        let name = file.file_name().context("shard path has no file name")?.to_string_lossy().into_owned();
        // SAFETY: read-only mapping of a file we do not modify.
        let st = unsafe { MmapedSafetensors::new(file) }.with_context(|| format!("cannot map {}", file.display()))?;
        let mut out: HashMap<String, Tensor> = HashMap::new();
        for (tensor, _) in st.tensors() {
            let t = st.load(&tensor, &Device::Cpu).with_context(|| format!("cannot read {tensor}"))?;
            if is_quantized_linear(&tensor) && t.rank() == 2 {
                let (q, scale) = quantize_in_chunks(&t)?;
                let scale_name = tensor.replace(".weight", ".weight_scale");
                weight_map.insert(scale_name.clone(), name.clone());
                out.insert(scale_name, scale);
                out.insert(tensor.clone(), q);
                quantized += 1;
            } else {
                out.insert(tensor.clone(), t);
            }
            weight_map.insert(tensor, name.clone());
        }
        candle_core::safetensors::save(&out, dst.join(&name)).with_context(|| format!("cannot write {name}"))?;
    }
    if files.len() > 1 {
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(dst.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    }
    write_config(src, dst)?;
    for f in COPIED {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dst.join(f)).with_context(|| format!("cannot copy {f}"))?;
        }
    }
    Ok(Summary { quantized, shards: files.len() })
}

/// Rows quantized per output channel, a block of rows at a time so that the f32 temporaries
/// stay small next to the shard.
fn quantize_in_chunks(t: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    const ROWS: usize = 256;
    let rows = t.dim(0)?;
    let (mut qs, mut scales) = (Vec::new(), Vec::new());
    for start in (0..rows).step_by(ROWS) {
        let (q, s) = fp8::quantize_tensor_rows(&t.narrow(0, start, ROWS.min(rows - start))?)?;
        qs.push(q);
        scales.push(s);
    }
    Ok((Tensor::cat(&qs, 0)?, Tensor::cat(&scales, 0)?))
}

/// config.json with a compressed-tensors `quantization_config` added.
fn write_config(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let path = src.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)?;
    let fp8 = |strategy: &str, dynamic: bool| {
        serde_json::json!({"num_bits": 8, "type": "float", "strategy": strategy, "dynamic": dynamic,
                           "symmetric": true, "group_size": null, "block_structure": null, "observer": null})
    };
    cfg["quantization_config"] = serde_json::json!({
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": fp8("channel", false),
            "input_activations": fp8("token", true),
            "output_activations": null,
        }},
        "ignore": ["lm_head", "score"],
        "kv_cache_scheme": null,
    });
    std::fs::write(dst.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
