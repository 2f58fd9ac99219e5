//! `scorestream inspect`: describe a model without loading its weights, and for GPU devices
//! what each stage needs on its GPU (checked against `--device-memory` when given).

use crate::cli::InspectArgs;
use crate::engine::cuda::fit::{check_fit, gib, parse_bytes, StageNeed};
use crate::model::Dtype;

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let plan = crate::engine::plan(&args.model.options(), args.batch_tokens)?;
    let info = &plan.info;
    let on_gpu = plan.devices.iter().any(|d| matches!(d, crate::model::DeviceSpec::Cuda(_)));
    let (needs, planned_as) = if on_gpu { gpu_plan(args, &plan)? } else { (Vec::new(), None) };
    let free = device_memory(args, &info.stages.iter().map(|s| s.device.clone()).collect::<Vec<_>>())?;
    if args.json {
        let json = serde_json::json!({ "model": info, "gpu_needs": needs, "gpu_precision": planned_as });
        println!("{}", serde_json::to_string_pretty(if on_gpu { &json } else { &json["model"] })?);
    } else {
        print_text(args, info, &needs, planned_as);
    }
    if on_gpu && !free.is_empty() {
        check_fit(&needs, |d| free.iter().find(|(n, _)| n == d).map(|(_, f)| *f))?;
        println!("fits:           every stage fits its GPU's free memory");
    }
    Ok(())
}

/// The GPU stages' needs in the precision they would run: `--dtype`, with `auto` planned as
/// fp8 (what GPUs from sm_89 run; Ampere runs bf16: pass --dtype bf16 to plan for it).
fn gpu_plan(args: &InspectArgs, plan: &crate::engine::Plan) -> anyhow::Result<(Vec<StageNeed>, Option<&'static str>)> {
    let dtype = match args.model.dtype {
        Dtype::Auto | Dtype::Fp8 => Dtype::Fp8,
        Dtype::Bf16 => Dtype::Bf16,
        Dtype::F32 => anyhow::bail!("{}", crate::engine::cuda::precision::PrecisionError::F32OnGpu),
    };
    let limits = crate::batch::policy::BatchLimits { max_tokens: args.batch_tokens, max_events: args.batch_events };
    let name = if dtype == Dtype::Fp8 { "fp8" } else { "bf16" };
    Ok((crate::engine::gpu_needs(plan, dtype, limits), Some(name)))
}

/// `(device, free bytes)` for each distinct GPU of `devices`, from `--device-memory`.
fn device_memory(args: &InspectArgs, devices: &[String]) -> anyhow::Result<Vec<(String, usize)>> {
    if args.device_memory.is_empty() {
        return Ok(Vec::new());
    }
    let sizes = args.device_memory.iter().map(|s| parse_bytes(s).map_err(anyhow::Error::msg)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut gpus: Vec<&String> = devices.iter().filter(|d| d.starts_with("cuda")).collect();
    gpus.sort();
    gpus.dedup();
    if sizes.len() != 1 && sizes.len() != gpus.len() {
        anyhow::bail!("--device-memory has {} sizes for {} GPUs ({}): give one for all or one per GPU", sizes.len(), gpus.len(),
            gpus.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "));
    }
    Ok(gpus.into_iter().enumerate().map(|(i, d)| (d.clone(), sizes[if sizes.len() == 1 { 0 } else { i }])).collect())
}

fn print_text(args: &InspectArgs, info: &crate::engine::ModelInfo, needs: &[StageNeed], planned_as: Option<&str>) {
    println!("model:          {}", info.name);
    println!("architecture:   {} ({})", info.architecture, info.model_type);
    println!("parameters:     {} ({:.2} B)", info.num_parameters, info.num_parameters as f64 / 1e9);
    println!("layers:         {} (hidden {})", info.num_layers, info.hidden_size);
    println!("head:           {}", info.head);
    println!("labels:         {}", info.labels.join(", "));
    println!("stored dtypes:  {}", info.stored_dtypes.join(", "));
    println!("compute dtype:  {}", info.dtype);
    println!("token limit:    {} (max_position_embeddings {})", info.max_tokens, info.max_position_embeddings);
    for (i, s) in info.stages.iter().enumerate() {
        println!(
            "stage {i}:        {} layers {}..{}: {:.1} MiB of weights, ~{:.1} MiB of activations for {} batch tokens",
            s.device,
            s.layers.0,
            s.layers.1,
            s.weight_bytes as f64 / (1 << 20) as f64,
            s.activation_bytes as f64 / (1 << 20) as f64,
            args.batch_tokens
        );
    }
    if let Some(p) = planned_as {
        println!("gpu plan:       {p}, batches of {} tokens in {} conversations", args.batch_tokens, args.batch_events);
    }
    for n in needs.iter().filter(|n| n.device.starts_with("cuda")) {
        println!(
            "gpu stage {}:    {} needs {} (weights {}, activations {}, hop inputs {}, load staging {}, reserve {})",
            n.stage,
            n.device,
            gib(n.total()),
            gib(n.weights),
            gib(n.activations),
            gib(n.hop_inputs),
            gib(n.load_staging),
            gib(n.reserve)
        );
    }
}
