//! The CUDA engine: FP8 or bf16 GEMMs through cuBLASLt (the precision chosen per GPU by
//! [`precision`]) and fused kernels (`kernels/*.cu`) compiled at
//! start-up by NVRTC to CUBIN for the device's own architecture, or prebuilt. Everything that
//! touches the GPU is behind the `cuda` feature and loads `libcuda`, `libnvrtc` and
//! `libcublasLt` dynamically, after probing for them, so one binary serves CPU and GPU
//! machines. The buffer planner, the attention tile schedule, every kernel launch's
//! arguments and dimensions, the memory fit ([`fit`]), the load pipeline ([`upload_plan`]) and
//! the hand-off of hidden states between stages ([`hop`]) are plain Rust, compiled and tested
//! without the feature.

// Without the `cuda` feature the plain-Rust parts are compiled for their tests; what only the
// GPU modules use is then unused, and the dead-code check is the `cuda` build's.
pub mod fit;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub mod hop;
pub mod launch;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub mod plan;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub mod precision;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod upload_plan;

#[cfg(feature = "cuda")]
pub mod compile;
#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod gemm;
#[cfg(feature = "cuda")]
pub mod layer;
#[cfg(feature = "cuda")]
pub mod libraries;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
pub mod prebuilt;
#[cfg(feature = "cuda")]
pub mod probe;
#[cfg(feature = "cuda")]
pub mod stage;
#[cfg(feature = "cuda")]
pub mod upload;

#[cfg(feature = "cuda")]
pub use error::CudaError;

#[cfg(feature = "cuda")]
mod error {
    /// Errors of the CUDA engine.
    #[derive(Debug, thiserror::Error)]
    pub enum CudaError {
        #[error("CUDA library {library} cannot be loaded ({hint})")]
        MissingLibrary { library: &'static str, hint: String },
        #[error(transparent)]
        Precision(#[from] super::precision::PrecisionError),
        #[error("CUDA driver call failed: {context}")]
        Driver {
            context: String,
            #[source]
            source: cudarc::driver::DriverError,
        },
        #[error("NVRTC could not compile the kernels for {arch}: {log}")]
        Compile { arch: String, log: String },
        #[error("kernel file {path}")]
        Cache {
            path: String,
            #[source]
            source: std::io::Error,
        },
        #[error("prebuilt kernels {path}: {reason}")]
        Prebuilt { path: String, reason: String },
        #[error("cuBLASLt {context}")]
        Blas {
            context: String,
            #[source]
            source: cudarc::cublaslt::result::CublasError,
        },
        #[error("{0}")]
        Shape(String),
        #[error("model: {0}")]
        Model(#[source] crate::model::ModelError),
        #[error("{0} is not supported by the CUDA engine yet")]
        Unsupported(String),
    }

    impl CudaError {
        pub(crate) fn driver(context: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
            let context = context.into();
            move |source| Self::Driver { context, source }
        }

        pub(crate) fn blas(context: impl Into<String>) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> Self {
            let context = context.into();
            move |source| Self::Blas { context, source }
        }
    }
}
