//! `gpu_bench parity`: each fixture's scores from the CUDA stage (FP8 and bf16, both attention
//! kernels, plain and tree layouts) against the CPU stage.

use std::path::PathBuf;

use anyhow::{bail, Result};
use scorestream::engine::cuda::launch::AttentionKernel;
use scorestream::engine::cuda::precision::Precision;

use crate::perf::json_str;

/// The CUDA stage against the CPU stage on each committed fixture, same packed batch, in each
/// of `precisions`: FP8 against the CPU's FP8 emulation, bf16 against the CPU's bf16.
pub(crate) fn parity(fixtures: &std::path::Path, precisions: &[Precision]) -> Result<bool> {
    use scorestream::engine::cuda::stage::{CudaStage, LoadPath};
    use scorestream::model::packed::Packed;
    use scorestream::model::stage::{Activations, Stage, StageOutput};
    use scorestream::model::weights::{Vb, Weights};
    let mut ok = true;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.sort();
    for dir in dirs.into_iter().filter(|d| d.join("reference.json").is_file()) {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
        let seqs: Vec<Vec<u32>> = reference["events"]
            .as_array()
            .map(|evs| evs.iter().filter_map(|e| serde_json::from_value(e["input_ids"].clone()).ok()).collect())
            .unwrap_or_default();
        let cfg = scorestream::model::ArchConfig::from_dir(&dir)?;
        let weights = std::sync::Arc::new(Weights::open(&dir)?);
        let packed = Packed::new(&seqs);
        let n = cfg.num_layers;
        let cpu = |dtype, fp8: bool| -> Result<Vec<f32>> {
            let vb = Vb::new(weights.clone(), dtype, candle_core::Device::Cpu).with_fp8(fp8);
            match Stage::load(&vb, &cfg, 0..n, 0, None)?.forward(&packed, Activations::Tokens)? {
                StageOutput::Scores(s) => Ok(s.iter().map(|s| s.reward).collect()),
                StageOutput::Hidden(_) => bail!("the CPU stage returned no scores"),
            }
        };
        let (bf16, f32) = (candle_core::DType::BF16, candle_core::DType::F32);
        for precision in precisions {
            let f32_vb = Vb::new(weights.clone(), f32, candle_core::Device::Cpu);
            let p = format!("{precision:?}").to_lowercase();
            let gpu = match CudaStage::load(LoadPath::Device, 0, &f32_vb, &cfg, 0..n, 0, None, *precision, packed.num_tokens().max(1), seqs.len().max(1), AttentionKernel::V1) {
                Ok(mut stage) => match stage.forward(&packed, Activations::Tokens)? {
                    StageOutput::Scores(s) => s.iter().map(|s| s.reward).collect::<Vec<f32>>(),
                    StageOutput::Hidden(_) => bail!("the CUDA stage returned no scores"),
                },
                Err(e) => {
                    println!(r#"{{"kind":"parity","fixture":"{name}","precision":"{p}","skipped":{}}}"#, json_str(&e.to_string()));
                    continue;
                }
            };
            // The gated row is the CPU doing the GPU's own arithmetic: bf16 activations with FP8
            // linears (the CPU's `fp8` dtype over bf16), or plain bf16; the others (f32
            // activations, the f32 reference model) are informational.
            let wants = match precision {
                Precision::Fp8 => vec![("cpu_fp8_bf16", cpu(bf16, true)?), ("cpu_fp8_f32", cpu(f32, true)?), ("cpu_f32", cpu(f32, false)?)],
                Precision::Bf16 => vec![("cpu_bf16", cpu(bf16, false)?), ("cpu_f32", cpu(f32, false)?)],
            };
            let gated = wants[0].0;
            let gated_want = wants[0].1.clone();
            for (label, want) in wants {
                let diff = gpu.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let nan = gpu.iter().any(|v| !v.is_finite());
                let pass = !nan && (label != gated || diff <= 2e-2 * scale + 1e-3);
                ok &= pass;
                println!(r#"{{"kind":"parity","fixture":"{name}","precision":"{p}","against":"{label}","seqs":{},"max_abs_diff":{diff:.3e},"max_abs_reward":{scale:.3e},"pass":{pass}}}"#, seqs.len());
            }
            // FP8 with attention v2: its output quantized inside the kernel (the fused
            // "last block quantizes" path), against the same gated row.
            if *precision == Precision::Fp8 {
                ok &= fp8_v2_parity(&name, &f32_vb, &cfg, &packed, &gated_want, gated)?;
            }
            // The tree rows in bf16 only (every GPU from sm_80), to keep the step short.
            if *precision == Precision::Bf16 {
                ok &= tree_parity(&name, &weights, &cfg, &seqs, *precision)?;
            }
        }
    }
    Ok(ok)
}

/// The CUDA stage in FP8 with attention v2 (the attention output quantized per token inside
/// the kernel) on the plain batch, against `want`, the gated CPU row of [`parity`].
fn fp8_v2_parity(name: &str, f32_vb: &scorestream::model::weights::Vb, cfg: &scorestream::model::ArchConfig,
                 packed: &scorestream::model::packed::Packed, want: &[f32], against: &str) -> Result<bool> {
    use scorestream::engine::cuda::stage::{CudaStage, LoadPath};
    use scorestream::model::stage::{Activations, StageOutput};
    let seqs = packed.cu_seqlens.len().saturating_sub(1);
    let gpu = match CudaStage::load(LoadPath::Device, 0, f32_vb, cfg, 0..cfg.num_layers, 0, None, Precision::Fp8, packed.num_tokens().max(1), seqs.max(1), AttentionKernel::V2) {
        Ok(mut stage) => match stage.forward(packed, Activations::Tokens)? {
            StageOutput::Scores(s) => s.iter().map(|s| s.reward).collect::<Vec<f32>>(),
            StageOutput::Hidden(_) => bail!("the CUDA stage returned no scores"),
        },
        Err(e) => {
            println!(r#"{{"kind":"parity","fixture":"{name}","precision":"fp8","attention":"v2","skipped":{}}}"#, json_str(&e.to_string()));
            return Ok(true);
        }
    };
    let diff = gpu.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let pass = gpu.iter().all(|v| v.is_finite()) && gpu.len() == want.len() && diff <= 2e-2 * scale + 1e-3;
    println!(
        r#"{{"kind":"parity","fixture":"{name}","precision":"fp8","attention":"v2","against":"{against}","seqs":{seqs},"max_abs_diff":{diff:.3e},"max_abs_reward":{scale:.3e},"pass":{pass}}}"#
    );
    Ok(pass)
}

// ---- tree layout and attention v2 through the engine (attn-v2) ----

/// Each event's sequence and the same sequence less its last token, packed as a tree (shared
/// prefixes, `min_shared_prefix` 1: also across events with one chat template), run by the
/// CUDA stage with each attention kernel, against the CPU stage on the plain layout in the
/// GPU's own arithmetic (the gated row of [`parity`]). Rows `"layout":"tree"`.
fn tree_parity(name: &str, weights: &std::sync::Arc<scorestream::model::weights::Weights>, cfg: &scorestream::model::ArchConfig,
               seqs: &[Vec<u32>], precision: Precision) -> Result<bool> {
    use scorestream::engine::cuda::stage::{CudaStage, LoadPath};
    use scorestream::model::packed::Packed;
    use scorestream::model::stage::{Activations, Stage, StageOutput};
    use scorestream::model::weights::Vb;
    let seqs: Vec<Vec<u32>> = seqs.iter().flat_map(|s| [s.clone(), s[..s.len().saturating_sub(1).max(1).min(s.len())].to_vec()]).collect();
    let (plain, tree) = (Packed::new(&seqs), Packed::shared(&seqs, 1));
    let n = cfg.num_layers;
    let (dtype, fp8) = match precision {
        Precision::Fp8 => (candle_core::DType::BF16, true),
        Precision::Bf16 => (candle_core::DType::BF16, false),
    };
    let vb = Vb::new(weights.clone(), dtype, candle_core::Device::Cpu).with_fp8(fp8);
    let want: Vec<f32> = match Stage::load(&vb, cfg, 0..n, 0, None)?.forward(&plain, Activations::Tokens)? {
        StageOutput::Scores(s) => s.iter().map(|s| s.reward).collect(),
        StageOutput::Hidden(_) => bail!("the CPU stage returned no scores"),
    };
    let p = format!("{precision:?}").to_lowercase();
    let mut ok = true;
    for kernel in [AttentionKernel::V1, AttentionKernel::V2] {
        let a = format!("{kernel:?}").to_lowercase();
        let f32_vb = Vb::new(weights.clone(), candle_core::DType::F32, candle_core::Device::Cpu);
        let gpu = match CudaStage::load(LoadPath::Device, 0, &f32_vb, cfg, 0..n, 0, None, precision, tree.num_tokens().max(1), seqs.len().max(1), kernel) {
            Ok(mut stage) => match stage.forward(&tree, Activations::Tokens)? {
                StageOutput::Scores(s) => s.iter().map(|s| s.reward).collect::<Vec<f32>>(),
                StageOutput::Hidden(_) => bail!("the CUDA stage returned no scores"),
            },
            Err(e) => {
                println!(r#"{{"kind":"parity","fixture":"{name}","precision":"{p}","layout":"tree","attention":"{a}","skipped":{}}}"#, json_str(&e.to_string()));
                continue;
            }
        };
        let diff = gpu.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let pass = gpu.len() == want.len() && gpu.iter().all(|v| v.is_finite()) && diff <= 2e-2 * scale + 1e-3;
        ok &= pass;
        println!(
            r#"{{"kind":"parity","fixture":"{name}","precision":"{p}","layout":"tree","attention":"{a}","against":"cpu_plain","seqs":{},"shared_tokens":{},"max_abs_diff":{diff:.3e},"max_abs_reward":{scale:.3e},"pass":{pass}}}"#,
            seqs.len(),
            tree.shared_tokens()
        );
    }
    Ok(ok)
}

// ---- end of tree layout and attention v2 (attn-v2) ----
