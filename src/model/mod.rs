//! The reward model: HF config mirror, weight loading, one decoder for every family, reward heads.
//!
//! A model is split into [`stage::Stage`]s (contiguous layer ranges, one per device); a single
//! device holds one stage with everything. Each block is `load(vb, cfg)` + `forward`, with weight
//! paths that mirror the checkpoint's tensor names.

pub mod config;
pub mod fp8;
pub mod head;
pub mod json;
pub mod layers;
pub mod options;
pub mod packed;
pub mod rope;
pub mod stage;
pub mod weights;

use std::path::PathBuf;

pub use config::ArchConfig;
pub(crate) use options::DeviceSpec;
pub use options::{Dtype, ModelOptions};

/// Errors while reading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("not a valid JSON config: {message}")]
    Json { message: String },
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<ModelError>,
    },
    #[error("weights: {message}")]
    Weights {
        message: String,
        #[source]
        source: Option<candle_core::Error>,
    },
    #[error("device {device:?}: {message}")]
    Device { device: String, message: String },
    #[error("device {device:?}: {source}")]
    Backend {
        device: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn config(field: &str, message: impl Into<String>) -> Self {
        Self::Config { field: field.to_owned(), message: message.into() }
    }

    pub fn weights(message: impl Into<String>, source: Option<candle_core::Error>) -> Self {
        Self::Weights { message: message.into(), source }
    }

    /// Say which file an error came from.
    pub(crate) fn in_file(self, path: &std::path::Path) -> Self {
        Self::InFile { path: path.to_owned(), source: Box::new(self) }
    }
}
