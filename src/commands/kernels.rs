//! `scorestream kernels`: compile every CUDA kernel to CUBIN for each architecture asked for
//! (`all`: sm_80, sm_86, sm_89, sm_90a) with this machine's NVRTC (no GPU needed) and write each
//! with its manifest, so a GPU machine whose NVRTC is missing or mismatched loads them
//! (`SCORESTREAM_PREBUILT_KERNELS`) instead of compiling.

use crate::cli::KernelsArgs;
use crate::engine::cuda::compile::check_resources;
use crate::engine::cuda::precision::ARCHES;
use crate::engine::cuda::prebuilt;

/// The architectures named by `--arch` (`all` expands to [`ARCHES`]), each once.
pub(crate) fn arches(requested: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in requested.iter().map(|a| a.trim()).filter(|a| !a.is_empty()) {
        let names: Vec<String> = if a == "all" { ARCHES.iter().map(|s| s.to_string()).collect() } else { vec![a.to_owned()] };
        for n in names {
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    out
}

pub fn run(args: &KernelsArgs) -> anyhow::Result<()> {
    let arches = arches(&args.arch);
    if arches.is_empty() {
        anyhow::bail!("--arch names no architecture (e.g. all, sm_80, sm_90a)");
    }
    for arch in &arches {
        let m = prebuilt::write(arch, &args.out)?;
        for k in &m.kernels {
            println!(
                "{arch:<7} {:<28} {:>3} registers, {} B stack, {} B spill stores, {} B spill loads",
                k.name, k.registers, k.stack_bytes, k.spill_stores, k.spill_loads
            );
        }
        if let Err(problems) = check_resources(arch, &m.kernels) {
            tracing::warn!("{arch}: kernels over their resource budget:\n{problems}");
        }
        println!(
            "wrote {} ({} bytes) with NVRTC {} ({})",
            args.out.join(format!("kernels-{arch}.cubin")).display(),
            m.cubin_bytes,
            m.nvrtc,
            m.nvrtc_path
        );
    }
    println!("set {}={} to use them", prebuilt::ENV, args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn all_names_every_architecture_once() {
        let v = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(super::arches(&v(&["all"])), v(&["sm_80", "sm_86", "sm_89", "sm_90a"]));
        assert_eq!(super::arches(&v(&["sm_90a", "all", " "])), v(&["sm_90a", "sm_80", "sm_86", "sm_89"]));
        assert!(super::arches(&v(&[""])).is_empty());
    }
}
