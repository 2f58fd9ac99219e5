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
