//! `scorestream inspect`: describe a model without loading its weights.

use crate::cli::InspectArgs;

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let plan = crate::engine::plan(&args.model.options(), args.batch_tokens)?;
    let info = &plan.info;
    if args.json {
        println!("{}", serde_json::to_string_pretty(info)?);
        return Ok(());
    }
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
    Ok(())
}
