//! Probe for the CUDA libraries before cudarc touches them: cudarc panics when a library it
//! loads dynamically is missing, so every entry point of the CUDA engine calls [`require`]
//! first and turns a missing library into an error that says where it was looked for.

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
        let probe = match self {
            // SAFETY: these only try to dlopen the library by name and drop the handle.
            Self::Driver => || unsafe { cudarc::driver::sys::is_culib_present() },
            Self::Nvrtc => || unsafe { cudarc::nvrtc::sys::is_culib_present() },
            Self::CublasLt => || unsafe { cudarc::cublaslt::sys::is_culib_present() },
        };
        std::panic::catch_unwind(probe).unwrap_or(false)
    }
}

/// Fail with [`CudaError::MissingLibrary`] unless every library in `libs` loads.
pub fn require(libs: &[Library]) -> Result<(), CudaError> {
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

extern "C" {
    fn dlopen(filename: *const std::ffi::c_char, flag: std::ffi::c_int) -> *mut std::ffi::c_void;
}

/// Load the CUDA libraries found in `dir` (e.g. the pip wheels' `nvidia/cu13/lib`) by full
/// path, so that the by-name loads cudarc does later find them even though `dir` is not on
/// `LD_LIBRARY_PATH`. Returns the libraries loaded.
pub fn preload_from(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    const RTLD_NOW: std::ffi::c_int = 2;
    const RTLD_GLOBAL: std::ffi::c_int = 0x100;
    let mut loaded = Vec::new();
    for name in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13", "libcublasLt.so.13", "libcublas.so.13"] {
        let path = dir.join(name);
        let Some(c) = path.to_str().and_then(|s| std::ffi::CString::new(s).ok()) else { continue };
        // SAFETY: dlopen with a valid C string; the handle is kept for the process's life.
        if path.is_file() && !unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) }.is_null() {
            loaded.push(path);
        }
    }
    loaded
}
