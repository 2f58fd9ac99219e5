//! `scorestream kernels`: compile every CUDA kernel to CUBIN for one architecture with this
//! machine's NVRTC (no GPU needed) and write it with its manifest, so a GPU machine whose NVRTC
//! is missing or mismatched loads them (`SCORESTREAM_PREBUILT_KERNELS`) instead of compiling.

use crate::cli::KernelsArgs;
use crate::engine::cuda::compile::check_resources;
use crate::engine::cuda::prebuilt;

pub fn run(args: &KernelsArgs) -> anyhow::Result<()> {
    let m = prebuilt::write(&args.arch, &args.out)?;
    for k in &m.kernels {
        println!(
            "{:<28} {:>3} registers, {} B stack, {} B spill stores, {} B spill loads",
            k.name, k.registers, k.stack_bytes, k.spill_stores, k.spill_loads
        );
    }
    if let Err(problems) = check_resources(&m.kernels) {
        tracing::warn!("kernels over their resource budget:\n{problems}");
    }
    println!(
        "wrote {} ({} bytes) with NVRTC {} ({}); set {}={} to use them",
        args.out.join(format!("kernels-{}.cubin", args.arch)).display(),
        m.cubin_bytes,
        m.nvrtc,
        m.nvrtc_path,
        prebuilt::ENV,
        args.out.display()
    );
    Ok(())
}
