//! Run-time compilation of `kernels/*.cu` with NVRTC for the device's own architecture
//! (`sm_90a` on Hopper), cached on disk by a hash of the source, the architecture and the
//! NVRTC version, so a restart loads PTX without compiling. The sources are built into the
//! binary; the CUDA headers (`cuda_fp8.h`, `cuda_bf16.h`, `mma.h`) are found at run time.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{CompileOptions, Ptx};

use super::probe::{require, Library};
use super::CudaError;

/// Every kernel source, in the order they are concatenated after `common.cuh`.
pub const SOURCES: [(&str, &str); 6] = [
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    ("norm.cu", include_str!("../../../kernels/norm.cu")),
    ("rotary.cu", include_str!("../../../kernels/rotary.cu")),
    ("act.cu", include_str!("../../../kernels/act.cu")),
    ("elementwise.cu", include_str!("../../../kernels/elementwise.cu")),
    ("attention.cu", include_str!("../../../kernels/attention.cu")),
];

/// Every `extern "C"` kernel the engine loads.
pub const KERNELS: [&str; 18] = [
    "rmsnorm_bf16",
    "layernorm1p_bf16",
    "rotary_bf16",
    "swiglu_quant_bf16",
    "geglu_quant_bf16",
    "relu2_quant_bf16",
    "add_bf16",
    "quant_rows_bf16",
    "scale_epilogue_bf16",
    "gather_rows_bf16",
    "fill_uniform_bf16",
    "fill_uniform_e4m3",
    "fill_bytes",
    "attention_varlen_d16_bf16",
    "attention_varlen_d32_bf16",
    "attention_varlen_d64_bf16",
    "attention_varlen_d128_bf16",
    "attention_varlen_d192_bf16",
];

/// The whole program: `common.cuh` then every `.cu`, each preceded by a `#line` marker so
/// compiler messages name the original file.
pub fn program_source() -> String {
    let mut s = String::new();
    for (name, src) in SOURCES {
        s.push_str(&format!("#line 1 \"kernels/{name}\"\n"));
        s.push_str(src);
        s.push('\n');
    }
    s
}

/// Where compiled PTX is kept: `SCORESTREAM_KERNEL_CACHE`, else `$XDG_CACHE_HOME/scorestream/
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

/// `nvidia/cu13/<sub>` of the pip wheels, asked of `python3` (None when there is none).
pub fn python_nvidia_dir(sub: &str) -> Option<PathBuf> {
    let code = "import nvidia, os, sys\nfor p in nvidia.__path__:\n    d = os.path.join(p, 'cu13')\n    if os.path.isdir(d):\n        print(d); sys.exit(0)\n";
    let out = std::process::Command::new("python3").args(["-c", code]).output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!dir.is_empty()).then(|| PathBuf::from(dir).join(sub))
}

/// The NVRTC version as `major.minor`.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    require(&[Library::Nvrtc])?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters; the library was probed above.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Compile { arch: String::new(), log: format!("nvrtcVersion: {e:?}") })?;
    Ok((major, minor))
}

/// Compile the kernels for `arch` (e.g. `sm_90a`) to PTX, without the cache.
pub fn compile_ptx(arch: &str, includes: &[PathBuf]) -> Result<String, CudaError> {
    require(&[Library::Nvrtc])?;
    let compute = arch.replacen("sm_", "compute_", 1);
    let opts = CompileOptions {
        include_paths: includes.iter().map(|p| p.display().to_string()).collect(),
        options: vec![format!("--gpu-architecture={compute}"), "--std=c++17".into(), "-default-device".into()],
        name: Some("scorestream_kernels.cu".into()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(program_source(), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(e) => Err(CudaError::Compile { arch: arch.to_owned(), log: compile_log(&e) }),
    }
}

fn compile_log(e: &cudarc::nvrtc::CompileError) -> String {
    match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
        other => format!("{other:?}"),
    }
}

/// PTX for `arch` from the cache in `dir`, compiling and storing it on a miss. The key covers
/// the source, the architecture and the NVRTC version.
pub fn cached_ptx(arch: &str, dir: &Path) -> Result<Ptx, CudaError> {
    let (major, minor) = nvrtc_version()?;
    let key = fnv1a(format!("{arch}\0{major}.{minor}\0{}", program_source()).as_bytes());
    let path = dir.join(format!("kernels-{arch}-{key:016x}.ptx"));
    if let Ok(src) = std::fs::read_to_string(&path) {
        return Ok(Ptx::from_src(src));
    }
    let includes = include_dirs();
    if includes.is_empty() {
        return Err(CudaError::Compile {
            arch: arch.to_owned(),
            log: "no CUDA headers (cuda_fp8.h) found: set SCORESTREAM_CUDA_INCLUDE or CUDA_HOME, or \
                  pip install nvidia-cuda-runtime==13.0.*"
                .into(),
        });
    }
    let ptx = compile_ptx(arch, &includes)?;
    let cache_err = |source| CudaError::Cache { path: path.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(cache_err)?;
    // Write then rename, so a concurrent start never reads half a file.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &ptx).map_err(|source| CudaError::Cache { path: tmp.display().to_string(), source })?;
    std::fs::rename(&tmp, &path).map_err(|source| CudaError::Cache { path: path.display().to_string(), source })?;
    Ok(Ptx::from_src(ptx))
}

/// 64-bit FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The NVRTC architecture for a compute capability: the `a` variant (wgmma, setmaxnreg) on
/// Hopper and later.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major >= 9 { format!("sm_{major}{minor}a") } else { format!("sm_{major}{minor}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_defined_once_in_the_program() {
        let src = program_source();
        for k in KERNELS {
            let def = match k.strip_prefix("attention_varlen_d").and_then(|r| r.strip_suffix("_bf16")) {
                Some(d) => format!("ATTENTION_KERNEL({d})"),
                None => format!("void {k}("),
            };
            assert_eq!(src.matches(&def).count(), 1, "{k} must be defined once");
        }
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 9), "sm_89");
    }
}
