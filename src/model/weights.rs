//! Checkpoint access: memory-mapped safetensors (one file or a sharded index), tensors fetched
//! by their checkpoint names through a [`Vb`] (a path prefix, the target dtype and device).
//! Weights are converted to the compute dtype only when a block asks for them, so nothing is
//! read twice and untouched tensors (the full-vocabulary `lm_head`) are never converted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use serde::Deserialize;

use super::ModelError;

/// The safetensors files of a model directory, memory-mapped.
pub struct Weights {
    st: MmapedSafetensors,
    names: BTreeSet<String>,
    pub files: Vec<PathBuf>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The safetensors files of `dir`: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io { path: index.clone(), source })?;
    let parsed: ShardIndex = serde_json::from_str(&text)
        .map_err(|e| ModelError::config("weight_map", e.to_string()).in_file(&index))?;
    let files: BTreeSet<&String> = parsed.weight_map.values().collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

impl Weights {
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let files = safetensors_files(dir)?;
        for f in &files {
            if !f.exists() {
                return Err(ModelError::Io {
                    path: f.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "shard listed in the index is missing"),
                });
            }
        }
        // SAFETY: the files are mapped read-only; like every safetensors reader we rely on them
        // not being modified while the model is loaded.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| ModelError::weights(format!("cannot map {}", files[0].display()), Some(e)))?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self { st, names, files })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Shape and on-disk dtype of a tensor.
    pub fn info(&self, name: &str) -> Result<(Vec<usize>, String), ModelError> {
        let view = self.st.get(name).map_err(|e| ModelError::weights(format!("tensor {name}"), Some(e)))?;
        Ok((view.shape().to_vec(), format!("{:?}", view.dtype())))
    }

    /// Bytes of a tensor on disk.
    pub fn nbytes(&self, name: &str) -> usize {
        self.st.get(name).map(|v| v.data().len()).unwrap_or(0)
    }

    /// Number of scalar parameters in every tensor.
    pub fn num_parameters(&self) -> u64 {
        self.st.tensors().iter().map(|(_, v)| v.shape().iter().product::<usize>() as u64).sum()
    }

    /// Load a tensor as stored.
    pub fn load_raw(&self, name: &str, device: &Device) -> Result<Tensor, ModelError> {
        self.st.load(name, device).map_err(|e| ModelError::weights(format!("cannot load {name}"), Some(e)))
    }

    /// Load rows `start..start+len` of a 2-D tensor without converting the rest of it.
    pub fn load_rows(&self, name: &str, start: usize, len: usize, device: &Device) -> Result<Tensor, ModelError> {
        let view = self.st.get(name).map_err(|e| ModelError::weights(format!("tensor {name}"), Some(e)))?;
        let shape = view.shape();
        if shape.len() != 2 || start + len > shape[0] {
            return Err(ModelError::weights(
                format!("{name}: rows {start}..{} out of shape {shape:?}", start + len),
                None,
            ));
        }
        let row_bytes = view.data().len() / shape[0];
        let bytes = &view.data()[start * row_bytes..(start + len) * row_bytes];
        let dtype = DType::try_from(view.dtype()).map_err(|e| ModelError::weights(format!("{name}: dtype"), Some(e)))?;
        Tensor::from_raw_buffer(bytes, dtype, &[len, shape[1]], device)
            .map_err(|e| ModelError::weights(format!("{name}: rows"), Some(e)))
    }
}

/// A view of the checkpoint under a name prefix, producing tensors in one dtype on one device.
#[derive(Clone)]
pub struct Vb {
    pub weights: Arc<Weights>,
    prefix: String,
    pub dtype: DType,
    pub device: Device,
    /// Linear layers run in FP8 (quantized here when the checkpoint is not).
    pub fp8: bool,
}

impl Vb {
    pub fn new(weights: Arc<Weights>, dtype: DType, device: Device) -> Self {
        Self { weights, prefix: String::new(), dtype, device, fp8: false }
    }

    pub fn with_fp8(mut self, fp8: bool) -> Self {
        self.fp8 = fp8;
        self
    }

    /// The view one level down: `vb.pp("self_attn")`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { prefix, ..self.clone() }
    }

    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.path(name))
    }

    /// The tensor `name`, checked against `shape`, converted to this view's dtype.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor, ModelError> {
        self.get_as(shape, name, self.dtype)
    }

    /// Like [`Vb::get`] but in an explicit dtype (norm weights stay in f32, say).
    pub fn get_as(&self, shape: impl Into<Shape>, name: &str, dtype: DType) -> Result<Tensor, ModelError> {
        let path = self.path(name);
        let shape = shape.into();
        if !self.weights.contains(&path) {
            return Err(ModelError::weights(format!("tensor {path} is missing from the checkpoint"), None));
        }
        let t = self.weights.load_raw(&path, &self.device)?;
        if t.shape() != &shape {
            return Err(ModelError::weights(
                format!("tensor {path} has shape {:?}, expected {:?}", t.dims(), shape.dims()),
                None,
            ));
        }
        Ok(t.to_dtype(dtype)?)
    }

    /// The tensor `name` as stored, any shape.
    pub fn get_raw(&self, name: &str) -> Result<Tensor, ModelError> {
        self.weights.load_raw(&self.path(name), &self.device)
    }

    /// `Some(tensor)` when present, `None` when absent.
    pub fn get_opt(&self, shape: impl Into<Shape>, name: &str) -> Result<Option<Tensor>, ModelError> {
        if self.contains(name) {
            self.get(shape, name).map(Some)
        } else {
            Ok(None)
        }
    }
}
