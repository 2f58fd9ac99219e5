//! Compilation of `kernels/*.cu` with NVRTC straight to CUBIN for the device's own
//! architecture (`sm_80` on A100 … `sm_90a` on Hopper; the FP8-only kernels of `fp8.cu` only
//! where FP8 exists, see [`super::precision`]): the driver loads machine code and never JIT-compiles
//! PTX, so a PTX version newer than the driver cannot stop the engine. CUBINs are cached on
//! disk by a hash of the source, the architecture and the NVRTC version; prebuilt ones
//! ([`super::prebuilt`]) need no NVRTC at all. The sources are built into the binary; the CUDA
//! headers (`cuda_fp8.h`, `cuda_bf16.h`) are found at run time.

use std::path::{Path, PathBuf};

use super::libraries::python_nvidia_dir;
use super::nvrtc;
use super::precision::arch_has_fp8;
use super::CudaError;

/// Every kernel source every architecture compiles, in the order they are concatenated.
pub(crate) const SOURCES: [(&str, &str); 7] = [
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    ("norm.cu", include_str!("../../../kernels/norm.cu")),
    ("rotary.cu", include_str!("../../../kernels/rotary.cu")),
    ("act.cu", include_str!("../../../kernels/act.cu")),
    ("elementwise.cu", include_str!("../../../kernels/elementwise.cu")),
    ("attention.cu", include_str!("../../../kernels/attention.cu")),
    // After attention.cu, whose helpers (mma, key ranges) it uses.
    ("attention_v2.cu", include_str!("../../../kernels/attention_v2.cu")),
];

/// The FP8-only source, appended for architectures with FP8 tensor cores.
pub(crate) const FP8_SOURCE: (&str, &str) = ("fp8.cu", include_str!("../../../kernels/fp8.cu"));

/// The `extern "C"` kernels of `fp8.cu`.
pub const FP8_KERNELS: [&str; 3] = ["quant_rows_bf16", "scale_epilogue_bf16", "fill_uniform_e4m3"];

/// Every `extern "C"` kernel every architecture loads.
pub(crate) const KERNELS: [&str; 27] = [
    "rmsnorm_bf16",
    "layernorm1p_bf16",
    "head_rmsnorm_bf16",
    "head_rmsnorm_rotary_bf16",
    "rotary_bf16",
    "swiglu_quant_bf16",
    "geglu_quant_bf16",
    "relu2_quant_bf16",
    "add_bf16",
    "add_bias_bf16",
    "gather_rows_bf16",
    "fill_uniform_bf16",
    "fill_bytes",
    "attention_varlen_d16_bf16",
    "attention_varlen_d32_bf16",
    "attention_varlen_d64_bf16",
    "attention_varlen_d128_bf16",
    "attention_varlen_d192_bf16",
    "attention_v2_d16_bf16",
    "attention_v2_d24_bf16",
    "attention_v2_d32_bf16",
    "attention_v2_d64_bf16",
    "attention_v2_d80_bf16",
    "attention_v2_d96_bf16",
    "attention_v2_d128_bf16",
    "attention_v2_d192_bf16",
    "attention_v2_d256_bf16",
];

/// The kernels compiled for `arch`: [`KERNELS`], plus [`FP8_KERNELS`] where FP8 exists.
pub fn kernels_for(arch: &str) -> Vec<&'static str> {
    let fp8: &[&'static str] = if arch_has_fp8(arch) { &FP8_KERNELS } else { &[] };
    KERNELS.iter().chain(fp8).copied().collect()
}

/// The whole program for `arch`: `common.cuh` then every `.cu` (`fp8.cu` last, where FP8
/// exists), each preceded by a `#line` marker so compiler messages name the original file.
pub(crate) fn program_source(arch: &str) -> String {
    let mut s = String::new();
    let fp8 = arch_has_fp8(arch).then_some(FP8_SOURCE);
    for (name, src) in SOURCES.into_iter().chain(fp8) {
        s.push_str(&format!("#line 1 \"kernels/{name}\"\n"));
        s.push_str(src);
        s.push('\n');
    }
    s
}

/// Where compiled CUBINs are kept: `SCORESTREAM_KERNEL_CACHE`, else `$XDG_CACHE_HOME/scorestream/
/// kernels`, else `$HOME/.cache/scorestream/kernels`, else `/tmp/scorestream-kernels`.
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("SCORESTREAM_KERNEL_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("scorestream/kernels")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/scorestream/kernels")))
        .unwrap_or_else(|| PathBuf::from("/tmp/scorestream-kernels"))
}

/// Directories searched for the CUDA headers: `SCORESTREAM_CUDA_INCLUDE` (colon-separated),
/// `$CUDA_HOME/include`, `/usr/local/cuda/include`, then the `nvidia/cu13/include` folder of
/// the nvidia-cuda-runtime wheel as Python sees it.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("SCORESTREAM_CUDA_INCLUDE") {
        dirs.extend(std::env::split_paths(&v));
    }
    if let Some(h) = std::env::var_os("CUDA_HOME").or_else(|| std::env::var_os("CUDA_PATH")) {
        dirs.push(PathBuf::from(h).join("include"));
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    if let Some(p) = python_nvidia_dir("include") {
        dirs.push(p);
    }
    dirs.into_iter().filter(|d| d.join("cuda_fp8.h").is_file()).collect()
}

/// NVRTC's options for `arch` (a real architecture such as `sm_90a`, so NVRTC emits CUBIN;
/// ptxas's `-v` puts each kernel's registers and spills in the log).
pub(crate) fn compile_options(arch: &str, includes: &[PathBuf]) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-default-device".into(),
        "--ptxas-options=-v".into(),
    ];
    opts.extend(includes.iter().map(|p| format!("--include-path={}", p.display())));
    opts
}

/// Kernels compiled to CUBIN, with NVRTC's log and the resources ptxas reported.
pub struct KernelImage {
    pub arch: String,
    pub cubin: Vec<u8>,
    pub log: String,
    pub resources: Vec<KernelResources>,
    /// The NVRTC that compiled it: `(major, minor)` and its path.
    pub nvrtc: ((i32, i32), PathBuf),
}

/// Compile every kernel for `arch` to CUBIN with the chosen NVRTC ([`nvrtc::global`]).
pub fn compile_cubin(arch: &str, includes: &[PathBuf]) -> Result<KernelImage, CudaError> {
    let nv = nvrtc::global()?;
    if includes.is_empty() {
        return Err(CudaError::Compile {
            arch: arch.to_owned(),
            log: "no CUDA headers (cuda_fp8.h) found: set SCORESTREAM_CUDA_INCLUDE or CUDA_HOME, or \
                  pip install nvidia-cuda-runtime==13.0.*"
                .into(),
        });
    }
    let compiled = nv
        .compile_cubin(&program_source(arch), "scorestream_kernels.cu", &compile_options(arch, includes))
        .map_err(|log| CudaError::Compile { arch: arch.to_owned(), log })?;
    let resources = parse_ptxas_log(&compiled.log);
    Ok(KernelImage { arch: arch.to_owned(), cubin: compiled.cubin, log: compiled.log, resources, nvrtc: (nv.version, nv.path.clone()) })
}

/// What ptxas reported for one kernel (`--ptxas-options=-v`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Parse ptxas's verbose report: "Compiling entry function 'k'", then "N bytes stack frame,
/// N bytes spill stores, N bytes spill loads" and "Used N registers".
pub(crate) fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    let number_before = |line: &str, word: &str| -> Option<u32> {
        let at = line.find(word)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_owned();
            out.push(KernelResources { name, registers: 0, stack_bytes: 0, spill_stores: 0, spill_loads: 0 });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("registers") {
            k.registers = number_before(line, "registers").unwrap_or(0);
        }
    }
    out
}

/// Every kernel of [`kernels_for`] `arch` reported, with at most 255 registers and no spills;
/// the problems found otherwise, one per line.
pub fn check_resources(arch: &str, resources: &[KernelResources]) -> Result<(), String> {
    let mut problems = Vec::new();
    for k in kernels_for(arch) {
        match resources.iter().find(|r| r.name == k) {
            None => problems.push(format!("{k}: not in the ptxas report")),
            Some(r) if r.registers == 0 || r.registers > 255 => problems.push(format!("{k}: {} registers", r.registers)),
            Some(r) if r.spill_stores > 0 || r.spill_loads > 0 => {
                problems.push(format!("{k}: spills ({} bytes stored, {} loaded)", r.spill_stores, r.spill_loads))
            }
            Some(_) => {}
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
}

/// Identifies the kernel sources, all of them (not the architecture or compiler).
pub fn source_hash() -> String {
    format!("{:016x}", fnv1a(program_source("sm_90a").as_bytes()))
}

/// CUBIN for `arch` from the cache in `dir`, compiling and storing it on a miss. The key
/// covers the source, the architecture and the NVRTC version.
pub fn cached_cubin(arch: &str, dir: &Path) -> Result<(Vec<u8>, PathBuf), CudaError> {
    let nv = nvrtc::global()?;
    let (major, minor) = nv.version;
    let key = fnv1a(format!("{arch}\0{major}.{minor}\0{}", program_source(arch)).as_bytes());
    let path = dir.join(format!("kernels-{arch}-{key:016x}.cubin"));
    if let Ok(bytes) = std::fs::read(&path) {
        return Ok((bytes, path));
    }
    let image = compile_cubin(arch, &include_dirs())?;
    write_atomic(&path, &image.cubin)?;
    Ok((image.cubin, path))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CudaError> {
    let cache_err = |p: &Path| {
        let path = p.display().to_string();
        move |source| CudaError::Cache { path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(cache_err(dir))?;
    }
    // Write then rename, so a concurrent start never reads half a file.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(cache_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(cache_err(path))
}

/// 64-bit FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_defined_once_in_the_program() {
        let src = program_source("sm_90a");
        for k in kernels_for("sm_90a") {
            let v1 = k.strip_prefix("attention_varlen_d").and_then(|r| r.strip_suffix("_bf16"));
            let v2 = k.strip_prefix("attention_v2_d").and_then(|r| r.strip_suffix("_bf16"));
            let def = match (v1, v2) {
                (Some(d), _) => format!("ATTENTION_KERNEL({d})"),
                (_, Some(d)) => format!("ATTENTION_V2_KERNEL({d})"),
                _ => format!("void {k}("),
            };
            assert_eq!(src.matches(&def).count(), 1, "{k} must be defined once");
        }
        // Ampere gets no FP8 kernels, and its program does not hold them.
        let ampere = program_source("sm_80");
        assert_eq!(kernels_for("sm_80").len(), KERNELS.len());
        assert_eq!(kernels_for("sm_89").len(), KERNELS.len() + FP8_KERNELS.len());
        for k in FP8_KERNELS {
            assert!(!ampere.contains(&format!("void {k}(")), "{k} in the sm_80 program");
            assert!(src.contains(&format!("void {k}(")), "{k} missing from the sm_90a program");
        }
    }

    /// NVRTC 13.0's log for `--ptxas-options=-v` (abridged from a real compile).
    const LOG: &str = "ptxas info    : 24 bytes gmem
ptxas info    : Compiling entry function 'attention_varlen_d192_bf16' for 'sm_90a'
ptxas info    : Function properties for attention_varlen_d192_bf16
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
ptxas info    : Compile time = 582.078 ms
ptxas info    : Compiling entry function 'fill_bytes' for 'sm_90a'
ptxas info    : Function properties for fill_bytes
ptxas         .     8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 22 registers, used 0 barriers
";

    #[test]
    fn ptxas_report_gives_registers_and_spills_per_kernel() {
        let r = parse_ptxas_log(LOG);
        assert_eq!(
            r,
            [
                KernelResources { name: "attention_varlen_d192_bf16".into(), registers: 255, stack_bytes: 0, spill_stores: 0, spill_loads: 0 },
                KernelResources { name: "fill_bytes".into(), registers: 22, stack_bytes: 8, spill_stores: 12, spill_loads: 4 },
            ]
        );
        let problems = check_resources("sm_90a", &r).unwrap_err();
        assert!(problems.contains("fill_bytes: spills (12 bytes stored, 4 loaded)"), "{problems}");
        assert!(problems.contains("rmsnorm_bf16: not in the ptxas report"), "{problems}");
        assert!(!problems.contains("attention_varlen_d192_bf16"), "{problems}");
        let mut all: Vec<KernelResources> = kernels_for("sm_90a").iter().map(|k| KernelResources { name: (*k).into(), registers: 40, stack_bytes: 0, spill_stores: 0, spill_loads: 0 }).collect();
        assert_eq!(check_resources("sm_90a", &all), Ok(()));
        // sm_80 does not ask for the FP8 kernels.
        let ampere: Vec<KernelResources> = all.iter().filter(|k| !FP8_KERNELS.contains(&k.name.as_str())).cloned().collect();
        assert_eq!(check_resources("sm_80", &ampere), Ok(()));
        assert!(check_resources("sm_89", &ampere).unwrap_err().contains("quant_rows_bf16: not in the ptxas report"));
        all[0].registers = 256;
        assert!(check_resources("sm_90a", &all).unwrap_err().contains("256 registers"));
        assert!(compile_options("sm_90a", &[]).contains(&"--gpu-architecture=sm_90a".to_owned()));
    }
}
