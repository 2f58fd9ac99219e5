//! The reward model: HF config mirror, weight loading, one decoder for every family, reward heads.
pub mod options;
