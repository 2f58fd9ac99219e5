//! Prebuilt kernels: every kernel's CUBIN for one architecture, written by `scorestream
//! kernels --arch sm_90a --out DIR` on any machine with NVRTC (no GPU needed), and loaded by
//! the engine instead of compiling when `SCORESTREAM_PREBUILT_KERNELS=DIR` is set. A GPU
//! machine whose NVRTC is missing or mismatched then still runs. Beside `kernels-<arch>.cubin`
//! a manifest records the source hash, the NVRTC that compiled it and ptxas's resource report;
//! a CUBIN built from other sources is refused, never loaded silently.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::compile::{cached_cubin, compile_cubin, default_cache_dir, include_dirs, source_hash, KernelResources};
use super::CudaError;

type Result<T> = std::result::Result<T, CudaError>;

/// The environment variable naming the prebuilt kernels' folder.
pub const ENV: &str = "SCORESTREAM_PREBUILT_KERNELS";

/// What `kernels-<arch>.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub arch: String,
    /// [`source_hash`] of the sources compiled.
    pub source_hash: String,
    /// NVRTC `major.minor` and the library file that compiled the CUBIN.
    pub nvrtc: String,
    pub nvrtc_path: String,
    pub cubin_bytes: usize,
    pub kernels: Vec<KernelResources>,
}

fn paths(dir: &Path, arch: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("kernels-{arch}.cubin")), dir.join(format!("kernels-{arch}.json")))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CudaError {
    let path = path.display().to_string();
    move |source| CudaError::Cache { path, source }
}

/// Compile every kernel for `arch` and write the CUBIN and its manifest under `dir`.
pub fn write(arch: &str, dir: &Path) -> Result<Manifest> {
    let image = compile_cubin(arch, &include_dirs())?;
    let ((major, minor), nvrtc_path) = &image.nvrtc;
    let manifest = Manifest {
        arch: arch.to_owned(),
        source_hash: source_hash(),
        nvrtc: format!("{major}.{minor}"),
        nvrtc_path: nvrtc_path.display().to_string(),
        cubin_bytes: image.cubin.len(),
        kernels: image.resources,
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (cubin, json) = paths(dir, arch);
    std::fs::write(&cubin, &image.cubin).map_err(io(&cubin))?;
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| CudaError::Prebuilt { path: json.display().to_string(), reason: e.to_string() })?;
    std::fs::write(&json, text + "\n").map_err(io(&json))?;
    Ok(manifest)
}

/// The prebuilt CUBIN for `arch` under `dir`, after checking its manifest against these sources.
pub fn load(arch: &str, dir: &Path) -> Result<(Vec<u8>, Manifest)> {
    let (cubin, json) = paths(dir, arch);
    let bad = |reason: String| CudaError::Prebuilt { path: json.display().to_string(), reason };
    let text = std::fs::read_to_string(&json).map_err(io(&json))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if manifest.arch != arch {
        return Err(bad(format!("built for {}, the device needs {arch}", manifest.arch)));
    }
    if manifest.source_hash != source_hash() {
        return Err(bad(format!(
            "built from other kernel sources (hash {}, this binary's {}): rebuild with `scorestream kernels --arch {arch} --out {}`",
            manifest.source_hash,
            source_hash(),
            dir.display()
        )));
    }
    let bytes = std::fs::read(&cubin).map_err(io(&cubin))?;
    if bytes.len() != manifest.cubin_bytes {
        return Err(bad(format!("{} holds {} bytes, the manifest says {}", cubin.display(), bytes.len(), manifest.cubin_bytes)));
    }
    Ok((bytes, manifest))
}

/// Where the engine's kernels come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Prebuilt (`SCORESTREAM_PREBUILT_KERNELS`), compiled by the NVRTC named.
    Prebuilt { cubin: PathBuf, nvrtc: String },
    /// Compiled here (or read from the cache) by this process's NVRTC.
    Compiled { cubin: PathBuf },
}

/// The kernels' CUBIN for `arch`: prebuilt when [`ENV`] is set (an error if they are missing or
/// stale: no silent fallback to compiling), else compiled with the cache in `cache_dir`.
pub(crate) fn kernel_image(arch: &str, cache_dir: Option<&Path>) -> Result<(Vec<u8>, Origin)> {
    if let Some(dir) = std::env::var_os(ENV).filter(|v| !v.is_empty()).map(PathBuf::from) {
        let (bytes, m) = load(arch, &dir)?;
        return Ok((bytes, Origin::Prebuilt { cubin: paths(&dir, arch).0, nvrtc: m.nvrtc }));
    }
    let dir = cache_dir.map(Path::to_path_buf).unwrap_or_else(default_cache_dir);
    let (bytes, cubin) = cached_cubin(arch, &dir)?;
    Ok((bytes, Origin::Compiled { cubin }))
}

/// Whether the engine will use prebuilt kernels (and so needs no NVRTC).
pub fn enabled() -> bool {
    std::env::var_os(ENV).is_some_and(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(arch: &str, hash: String, bytes: usize) -> Manifest {
        Manifest { arch: arch.into(), source_hash: hash, nvrtc: "13.0".into(), nvrtc_path: "/x/libnvrtc.so.13".into(), cubin_bytes: bytes, kernels: vec![] }
    }

    fn plant(dir: &Path, m: &Manifest, cubin: &[u8]) {
        let (c, j) = paths(dir, &m.arch);
        std::fs::write(c, cubin).unwrap();
        std::fs::write(j, serde_json::to_string(m).unwrap()).unwrap();
    }

    #[test]
    fn a_prebuilt_cubin_of_these_sources_loads_without_nvrtc() {
        let dir = tempfile::tempdir().unwrap();
        plant(dir.path(), &manifest("sm_90a", source_hash(), 4), b"\x7fELF");
        let (bytes, m) = load("sm_90a", dir.path()).unwrap();
        assert_eq!(bytes, b"\x7fELF");
        assert_eq!(m.nvrtc, "13.0");
    }

    #[test]
    fn stale_or_foreign_prebuilt_kernels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        plant(dir.path(), &manifest("sm_90a", "0123456789abcdef".into(), 4), b"\x7fELF");
        let e = load("sm_90a", dir.path()).unwrap_err().to_string();
        assert!(e.contains("other kernel sources") && e.contains("scorestream kernels --arch sm_90a"), "{e}");
        plant(dir.path(), &manifest("sm_90a", source_hash(), 5), b"\x7fELF");
        assert!(load("sm_90a", dir.path()).unwrap_err().to_string().contains("manifest says 5"));
        let e = load("sm_100a", dir.path()).unwrap_err().to_string();
        assert!(e.contains("kernels-sm_100a.json"), "{e}");
    }
}
