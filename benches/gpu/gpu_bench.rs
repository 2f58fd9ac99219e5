//! GPU check and benchmark (`--features cuda`), run by scripts/gpu_check.sh on a Hopper GPU
//! (it runs on any GPU from sm_80; the FP8 parts only where FP8 exists, sm_89 and later).
//! `gpu_bench --help` lists the commands; arguments are parsed (and usage errors reported)
//! before any CUDA library is touched. Every command prints one JSON object per line
//! (`{"kind": ...}`), flushed as it goes, for benches/gpu/report.py.
//!   probe                 driver, NVRTC and cuBLASLt versions and files, GPU, free memory
//!   check                 every kernel and both GEMMs vs their CPU references
//!                         (src/engine/reference) on fresh random inputs, outputs poisoned
//!                         with 0xFF (NaN) first
//!   parity [DIR]          each fixture under DIR: the CUDA stage (FP8 and bf16) vs the CPU stage
//!   gemm                  cuBLASLt FP8 and bf16 GEMM ceilings (8192³, and the 70B layer shapes)
//!   time                  each kernel alone at the 70B shape (attention in TFLOP/s)
//!   layers                the 70B-shape layer loop in FP8 and bf16, as many layers as fit
//!   load-parity [DIR]     each fixture loaded on the device and on the host: every weight byte
//!   load                  a 70B-shaped bf16 checkpoint of as many layers as the disk holds:
//!                         on-device load (FP8, bf16) and one layer on the host, GB/s
//!   hop [DIR]             two stages on one GPU vs one (scores), and the 70B hop vs one layer
//!   kernels --out DIR     every kernel's CUBIN for --arch (no GPU needed)

#[path = "gpu_bench_perf.rs"]
mod perf;
#[path = "gpu_bench_load.rs"]
mod load;
#[path = "gpu_bench_check.rs"]
mod check;
#[path = "gpu_bench_parity.rs"]
mod parity;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use check::{check, has_fp8};
use perf::json_str;
use parity::parity;
use scorestream::engine::cuda::device::GpuDevice;
use scorestream::engine::cuda::libraries::preload_from;
use scorestream::engine::cuda::precision::Precision;

#[derive(Debug, Parser)]
#[command(name = "gpu_bench", about = "GPU kernel checks and benchmarks for scorestream (run by scripts/gpu_check.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Driver, NVRTC and cuBLASLt versions and library files, the GPU and its free memory.
    Probe,
    /// Every kernel against its CPU reference (outputs poisoned first).
    Check,
    /// The CUDA stage against the CPU stage on each fixture under DIR.
    Parity {
        #[arg(default_value = "tests/fixtures")]
        dir: PathBuf,
    },
    /// The cuBLASLt FP8 (where the GPU has it) and bf16 GEMM ceilings (8192³ and the 70B
    /// projections at 16k tokens).
    Gemm,
    /// Each kernel timed alone at the 70B shape (attention in TFLOP/s).
    Time,
    /// The 70B-shape layer loop over 4k/16k/64k-token batches, FP8 then bf16, as many layers
    /// as fit (up to the limits below; times are per layer, extrapolated to 80).
    Layers {
        /// At most this many FP8 layers.
        #[arg(long, env = "GPU_BENCH_MAX_LAYERS", default_value_t = 80)]
        max_layers: usize,
        /// At most this many bf16 layers (bf16 is timed second, on fewer layers, to fit the
        /// GPU check's time slot; per-layer time does not depend on the count).
        #[arg(long, env = "GPU_BENCH_MAX_BF16_LAYERS", default_value_t = 16)]
        max_bf16_layers: usize,
        /// Precisions to run, comma separated (FP8 is skipped on GPUs without it).
        #[arg(long, value_delimiter = ',', default_value = "fp8,bf16")]
        dtype: Vec<String>,
        /// Timed repetitions per batch (after one warm-up).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Each fixture under DIR loaded by the device path and by the host path: every weight
    /// byte compared (the GPU's FP8 quantization against the CPU's).
    LoadParity {
        #[arg(default_value = "tests/fixtures")]
        dir: PathBuf,
    },
    /// Write a Llama-3.1-70B-shaped bf16 checkpoint of as many layers as the disk holds (at
    /// most --max-layers) under --dir, drop it from the page cache, time its on-device load
    /// in each precision and one layer by the host path; the directory is removed after.
    Load {
        #[arg(long, env = "GPU_BENCH_LOAD_DIR", default_value = "/tmp/scorestream-load-check")]
        dir: PathBuf,
        #[arg(long, env = "GPU_BENCH_LOAD_MAX_LAYERS", default_value_t = 12)]
        max_layers: usize,
    },
    /// Two stages on one GPU against one stage (scores of the fixtures under DIR), and the hop
    /// of a 70B-shape 16k-token batch timed against one layer and the host round trip.
    Hop {
        #[arg(default_value = "tests/fixtures")]
        dir: PathBuf,
    },
    /// Write every kernel's CUBIN and its manifest for ARCH under OUT (no GPU needed); point
    /// SCORESTREAM_PREBUILT_KERNELS at OUT to load them instead of compiling.
    Kernels {
        #[arg(long, default_value = "sm_90a")]
        arch: String,
        #[arg(long)]
        out: PathBuf,
    },
}

/// The environment before any GPU is opened, then the GPU and its memory.
fn probe() -> Result<()> {
    use scorestream::engine::cuda::probe::{environment, Library};
    let env = environment();
    let v = |v: Option<(i32, i32)>| v.map_or("null".to_owned(), |(a, b)| json_str(&format!("{a}.{b}")));
    // The NVRTC this machine offers, even when prebuilt kernels make it unnecessary.
    let (nvrtc, nvrtc_path) = match scorestream::engine::cuda::nvrtc::global() {
        Ok(n) => (json_str(&format!("{}.{}", n.version.0, n.version.1)), json_str(&n.path.display().to_string())),
        Err(e) => ("null".to_owned(), json_str(&e.to_string())),
    };
    let loaded: Vec<String> = env.loaded.iter().map(|p| json_str(&p.display().to_string())).collect();
    println!(
        r#"{{"kind":"env","driver_cuda":{},"nvrtc":{nvrtc},"nvrtc_path":{nvrtc_path},"cublaslt":{},"loaded":[{}]}}"#,
        v(env.driver),
        env.cublaslt.map_or("null".to_owned(), |c| c.to_string()),
        loaded.join(",")
    );
    if !Library::Driver.present() {
        bail!("no CUDA driver (libcuda) on this machine");
    }
    let dev = open()?;
    let (free, total) = dev.ctx.mem_get_info()?;
    let loaded: Vec<String> = scorestream::engine::cuda::probe::loaded_cuda_libraries().iter().map(|p| json_str(&p.display().to_string())).collect();
    println!(
        r#"{{"kind":"memory","free_bytes":{free},"total_bytes":{total},"kernels":{},"loaded":[{}]}}"#,
        json_str(&format!("{:?}", dev.origin)),
        loaded.join(",")
    );
    Ok(())
}

/// GPU 0, opened for the best precision it has (FP8 from sm_89, else bf16).
fn open() -> Result<GpuDevice> {
    use scorestream::engine::cuda::precision::choose;
    let cache = scorestream::engine::cuda::compile::default_cache_dir();
    let facts = scorestream::engine::cuda::probe::gpu_facts(&[0])?;
    let precision = choose(scorestream::model::Dtype::Auto, &facts)?;
    let dev = GpuDevice::open(0, &cache, precision)?;
    println!(
        r#"{{"kind":"device","name":{},"capability":"{}.{}","arch":"{}","sms":{},"precision":"{}","kernels":{}}}"#,
        json_str(&dev.name),
        dev.capability.0,
        dev.capability.1,
        dev.arch,
        dev.sm_count,
        precision.dtype(),
        json_str(&format!("{:?}", dev.origin))
    );
    Ok(dev)
}

/// The precisions `names` asks for that `dev` can run.
fn precisions(dev: &GpuDevice, names: &[String]) -> Result<Vec<Precision>> {
    let mut out = Vec::new();
    for n in names {
        match n.as_str() {
            "fp8" if has_fp8(dev) => out.push(Precision::Fp8),
            "fp8" => println!(r#"{{"kind":"note","text":"no FP8 on {} (sm_{}{}): fp8 skipped"}}"#, dev.name, dev.capability.0, dev.capability.1),
            "bf16" => out.push(Precision::Bf16),
            other => bail!("unknown precision {other:?} (fp8, bf16)"),
        }
    }
    Ok(out)
}

fn write_kernels(arch: &str, out: &std::path::Path) -> Result<()> {
    let m = scorestream::engine::cuda::prebuilt::write(arch, out)?;
    for k in &m.kernels {
        println!(
            r#"{{"kind":"cubin","kernel":"{}","arch":"{arch}","registers":{},"spill_stores":{},"spill_loads":{},"nvrtc":"{}"}}"#,
            k.name, k.registers, k.spill_stores, k.spill_loads, m.nvrtc
        );
    }
    eprintln!("wrote {} ({} bytes, NVRTC {} from {})", out.join(format!("kernels-{arch}.cubin")).display(), m.cubin_bytes, m.nvrtc, m.nvrtc_path);
    Ok(())
}

fn main() -> Result<()> {
    // Usage errors and --help end here, before any CUDA library is loaded.
    let cli = Cli::parse();
    // The engine's start-up line (driver, NVRTC, cuBLASLt, library files) goes to stderr.
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
    if let Some(dir) = std::env::var_os("SCORESTREAM_NVRTC_LIB") {
        preload_from(&PathBuf::from(dir));
    }
    match cli.command {
        Cmd::Probe => probe()?,
        Cmd::Kernels { arch, out } => write_kernels(&arch, &out)?,
        Cmd::Check => {
            if !check(&open()?)? {
                bail!("some kernels differ from their CPU reference");
            }
        }
        Cmd::Gemm => {
            let dev = open()?;
            perf::gemm_bench(&dev, &precisions(&dev, &["fp8".into(), "bf16".into()])?)?
        }
        Cmd::Time => {
            let dev = open()?;
            perf::kernel_times(&dev, has_fp8(&dev))?
        }
        Cmd::Layers { max_layers, max_bf16_layers, reps, dtype } => {
            let dev = open()?;
            for p in precisions(&dev, &dtype)? {
                let most = if p == Precision::Bf16 { max_bf16_layers } else { max_layers };
                perf::layers_bench(&dev, p, most, reps)?;
            }
        }
        Cmd::LoadParity { dir } => {
            let dev = open()?;
            let all = precisions(&dev, &["fp8".into(), "bf16".into()])?;
            drop(dev);
            if !load::load_parity(&dir, &all)? {
                bail!("the device load differs from the host load");
            }
        }
        Cmd::Load { dir, max_layers } => {
            let dev = open()?;
            let all = precisions(&dev, &["fp8".into(), "bf16".into()])?;
            drop(dev);
            load::load_bench(&dir, max_layers, &all)?;
        }
        Cmd::Hop { dir } => {
            let dev = open()?;
            let p = precisions(&dev, &["fp8".into(), "bf16".into()])?.first().copied().unwrap_or(Precision::Bf16);
            if !load::hop_bench(&dev, &dir, p)? {
                bail!("hidden states changed on a device hop");
            }
        }
        Cmd::Parity { dir } => {
            let dev = open()?;
            let all = precisions(&dev, &["fp8".into(), "bf16".into()])?;
            drop(dev);
            if !parity(&dir, &all)? {
                bail!("the CUDA stage differs from the CPU stage");
            }
        }
    }
    Ok(())
}
