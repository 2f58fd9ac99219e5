//! Command implementations behind the CLI.

pub mod compare;
pub mod inspect;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod quantize;
pub mod score;
pub mod score_remote;
