//! Probe for the CUDA libraries before cudarc touches them: cudarc panics when a library it
//! loads dynamically is missing, so every entry point of the CUDA engine calls [`require`]
//! first and turns a missing library into an error that says where it was looked for.
//! [`environment`] reports the driver, NVRTC and cuBLASLt versions and the library files this
//! process actually mapped, for the start-up log and the GPU check's first step.

use super::libraries;
use super::CudaError;

/// The libraries the engine loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// `libcuda.so` (the driver).
    Driver,
    /// `libnvrtc.so` (run-time compilation of `kernels/*.cu`).
    Nvrtc,
    /// `libcublasLt.so` (FP8 GEMMs).
    CublasLt,
}

impl Library {
    pub fn name(self) -> &'static str {
        match self {
            Self::Driver => "libcuda",
            Self::Nvrtc => "libnvrtc",
            Self::CublasLt => "libcublasLt",
        }
    }

    /// Whether the library can be loaded. Never panics.
    pub fn present(self) -> bool {
        match self {
            Self::Driver => libraries::driver_present(),
            // The NVRTC the engine would choose (see nvrtc.rs), not cudarc's by-name one.
            Self::Nvrtc => libraries::never_panics(|| super::nvrtc::global().is_ok()),
            Self::CublasLt => libraries::cublaslt_present(),
        }
    }
}

/// Fail with [`CudaError::MissingLibrary`] unless every library in `libs` loads.
pub(crate) fn require(libs: &[Library]) -> Result<(), CudaError> {
    for &lib in libs {
        if !lib.present() {
            let hint = match lib {
                Library::Driver => "no NVIDIA driver on this machine: run without the CUDA engine".to_owned(),
                _ => format!(
                    "install CUDA 13.0 ({}) and put its lib directory on LD_LIBRARY_PATH, e.g. the \
                     nvidia/cu13/lib folder of the nvidia-* Python wheels; LD_LIBRARY_PATH={}",
                    if lib == Library::Nvrtc { "nvidia-cuda-nvrtc" } else { "nvidia-cublas" },
                    std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
                ),
            };
            return Err(CudaError::MissingLibrary { library: lib.name(), hint });
        }
    }
    Ok(())
}

/// Name and compute capability of each GPU in `ordinals`, read from the driver without
/// creating a context (so the precision is chosen before any stage loads).
pub fn gpu_facts(ordinals: &[usize]) -> Result<Vec<super::precision::GpuFacts>, CudaError> {
    use cudarc::driver::result::{self, device};
    use cudarc::driver::sys::CUdevice_attribute as Attr;
    require(&[Library::Driver])?;
    result::init().map_err(CudaError::driver("initialize the CUDA driver"))?;
    let count = device::get_count().map_err(CudaError::driver("count GPUs"))?;
    ordinals
        .iter()
        .map(|&ordinal| {
            let context = format!("GPU {ordinal}");
            let index = i32::try_from(ordinal).ok().filter(|&i| i < count).ok_or_else(|| {
                CudaError::Unsupported(format!("GPU {ordinal} (this machine has {count}: cuda:0 to cuda:{})", count - 1))
            })?;
            let dev = device::get(index).map_err(CudaError::driver(context.clone()))?;
            let name = device::get_name(dev).map_err(CudaError::driver(format!("{context} name")))?;
            // SAFETY: a device handle from `device::get`; both attributes are plain integers.
            let cap = |a| unsafe { device::get_attribute(dev, a) }.map_err(CudaError::driver(format!("{context} compute capability")));
            let (major, minor) = (cap(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, cap(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?);
            Ok(super::precision::GpuFacts { ordinal, name, major, minor })
        })
        .collect()
}

/// What the engine runs on: versions as the libraries report them, and the files mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    /// The driver's CUDA version (13.0 for driver 580).
    pub driver: Option<(i32, i32)>,
    /// NVRTC's version and file, or why there is none (or none needed).
    pub nvrtc: Result<((i32, i32), std::path::PathBuf), String>,
    /// `cublasLtGetVersion()` (e.g. 130001 for 13.0.1), when the library loads.
    pub cublaslt: Option<usize>,
    /// CUDA library files mapped into this process (`/proc/self/maps`).
    pub loaded: Vec<std::path::PathBuf>,
}

impl std::fmt::Display for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = |v: Option<(i32, i32)>| v.map_or("none".to_owned(), |(a, b)| format!("{a}.{b}"));
        write!(f, "CUDA driver {}; ", v(self.driver))?;
        match &self.nvrtc {
            Ok(((a, b), p)) => write!(f, "NVRTC {a}.{b} ({}); ", p.display())?,
            Err(why) => write!(f, "NVRTC: {why}; ")?,
        }
        match self.cublaslt {
            Some(c) => write!(f, "cuBLASLt {}.{}.{}; ", c / 10_000, c / 100 % 100, c % 100)?,
            None => write!(f, "cuBLASLt: not loadable; ")?,
        }
        let files: Vec<String> = self.loaded.iter().map(|p| p.display().to_string()).collect();
        write!(f, "loaded: [{}]", files.join(", "))
    }
}

/// Probe the driver, NVRTC (unless prebuilt kernels make it unnecessary) and cuBLASLt. Never
/// panics; loads each library that is present.
pub fn environment() -> Environment {
    let nvrtc = if super::prebuilt::enabled() {
        Err(format!("not needed ({} is set)", super::prebuilt::ENV))
    } else {
        super::nvrtc::global().map(|n| (n.version, n.path.clone())).map_err(|e| e.to_string())
    };
    // SAFETY: cuBLASLt was probed; the call only returns a number.
    let cublaslt = Library::CublasLt.present().then(|| unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() });
    Environment { driver: libraries::driver_version(), nvrtc, cublaslt, loaded: loaded_cuda_libraries() }
}

/// The CUDA libraries mapped into this process, from `/proc/self/maps` (empty elsewhere).
pub fn loaded_cuda_libraries() -> Vec<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    cuda_libraries_in_maps(&maps)
}

/// The distinct `libcuda`, `libnvrtc*` and `libcublas*` files named in a `/proc/<pid>/maps` text.
pub(crate) fn cuda_libraries_in_maps(maps: &str) -> Vec<std::path::PathBuf> {
    let mut out: Vec<std::path::PathBuf> = Vec::new();
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        let file = path.rsplit('/').next().unwrap_or_default();
        let cuda = ["libcuda.so", "libnvrtc", "libcublas"].iter().any(|p| file.starts_with(p));
        if cuda && !out.iter().any(|p| p.as_os_str() == path) {
            out.push(path.into());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_up_line_names_versions_and_files() {
        let env = Environment {
            driver: Some((13, 0)),
            nvrtc: Ok(((13, 0), "/w/cu13/lib/libnvrtc.so.13".into())),
            cublaslt: Some(130_001),
            loaded: vec!["/usr/lib/libcuda.so.580.65.06".into(), "/w/cu13/lib/libcublasLt.so.13".into()],
        };
        assert_eq!(
            env.to_string(),
            "CUDA driver 13.0; NVRTC 13.0 (/w/cu13/lib/libnvrtc.so.13); cuBLASLt 13.0.1; \
             loaded: [/usr/lib/libcuda.so.580.65.06, /w/cu13/lib/libcublasLt.so.13]"
        );
        let none = Environment { driver: None, nvrtc: Err("not needed".into()), cublaslt: None, loaded: vec![] };
        assert_eq!(none.to_string(), "CUDA driver none; NVRTC: not needed; cuBLASLt: not loadable; loaded: []");
    }

    #[test]
    fn mapped_cuda_libraries_are_listed_once_each() {
        let maps = "7f00-7f01 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06\n\
                    7f01-7f02 r-xp 00001000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06\n\
                    7f02-7f03 r--p 00000000 08:01 2 /w/nvidia/cu13/lib/libnvrtc.so.13\n\
                    7f03-7f04 r--p 00000000 08:01 3 /w/nvidia/cu13/lib/libnvrtc-builtins.so.13.0\n\
                    7f04-7f05 r--p 00000000 08:01 4 /w/nvidia/cu13/lib/libcublasLt.so.13\n\
                    7f05-7f06 r--p 00000000 08:01 5 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                    7f06-7f07 rw-p 00000000 00:00 0\n";
        let got: Vec<String> = cuda_libraries_in_maps(maps).iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            got,
            [
                "/usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06",
                "/w/nvidia/cu13/lib/libnvrtc.so.13",
                "/w/nvidia/cu13/lib/libnvrtc-builtins.so.13.0",
                "/w/nvidia/cu13/lib/libcublasLt.so.13"
            ]
        );
    }
}
