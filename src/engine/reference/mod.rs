//! CPU references of every CUDA kernel in `kernels/*.cu`, in plain f32 Rust that rounds to bf16
//! wherever the kernel (and the CPU engine) rounds, and quantizes with the same E4M3 rule. They
//! are the oracle of `gpu_bench check` and need no GPU and no feature flag. Values are passed
//! as f32 slices holding bf16-exact numbers.

pub mod attention;
pub mod attn_quant;
pub mod kernels;

/// The one E4M3 module, under the name the references and the GPU stage use.
pub use crate::model::fp8;

/// Round an f32 to the nearest bf16 (ties to even) and widen it back.
pub(crate) fn bf16r(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}
