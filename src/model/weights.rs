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

/// Where one tensor lives.
struct Entry {
    file: usize,
    shape: Vec<usize>,
    dtype: String,
    nbytes: usize,
}

/// The safetensors files of a model directory. Headers are read once; a shard is mapped only
/// while a tensor is read from it and unmapped right after, so loading (and quantizing at load)
/// never keeps the whole checkpoint resident — only the tensors the model keeps.
pub struct Weights {
    index: std::collections::BTreeMap<String, Entry>,
    pub files: Vec<PathBuf>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The safetensors files of `dir`: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(ModelError::weights(
            format!(
                "no weights in {}: expected model.safetensors, or model.safetensors.index.json and the shards it names",
                dir.display()
            ),
            None,
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io { path: index.clone(), source })?;
    let parsed: ShardIndex = super::json::from_object_text(&text).map_err(|e| e.in_file(&index))?;
    let names: BTreeSet<&String> = parsed.weight_map.values().collect();
    if names.is_empty() {
        return Err(ModelError::config("weight_map", "names no shard files").in_file(&index));
    }
    let missing: Vec<&str> = names.iter().filter(|f| !dir.join(f.as_str()).is_file()).map(|f| f.as_str()).collect();
    if !missing.is_empty() {
        return Err(ModelError::weights(
            format!(
                "{} names {} shard files in {}; missing: {}",
                index.display(),
                names.len(),
                dir.display(),
                missing.join(", ")
            ),
            None,
        ));
    }
    Ok(names.into_iter().map(|f| dir.join(f)).collect())
}

impl Weights {
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let files = safetensors_files(dir)?;
        let mut index = std::collections::BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let st = map(f)?;
            for (name, view) in st.tensors() {
                let entry = Entry { file: i, shape: view.shape().to_vec(), dtype: format!("{:?}", view.dtype()), nbytes: view.data().len() };
                index.insert(name, entry);
            }
        }
        Ok(Self { index, files })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    fn entry(&self, name: &str) -> Result<&Entry, ModelError> {
        self.index.get(name).ok_or_else(|| ModelError::weights(format!("tensor {name} is missing from the checkpoint"), None))
    }

    /// Shape and on-disk dtype of a tensor.
    pub fn info(&self, name: &str) -> Result<(Vec<usize>, String), ModelError> {
        let e = self.entry(name)?;
        Ok((e.shape.clone(), e.dtype.clone()))
    }

    /// Bytes of a tensor on disk.
    pub fn nbytes(&self, name: &str) -> usize {
        self.index.get(name).map_or(0, |e| e.nbytes)
    }

    /// Number of scalar parameters in every tensor.
    pub(crate) fn num_parameters(&self) -> u64 {
        self.index.values().map(|e| e.shape.iter().product::<usize>() as u64).sum()
    }

    /// Load a tensor as stored.
    pub(crate) fn load_raw(&self, name: &str, device: &Device) -> Result<Tensor, ModelError> {
        let st = map(&self.files[self.entry(name)?.file])?;
        st.load(name, device).map_err(|e| ModelError::weights(format!("cannot load {name}"), Some(e)))
    }

    /// Load rows `start..start+len` of a 2-D tensor without converting the rest of it.
    pub(crate) fn load_rows(&self, name: &str, start: usize, len: usize, device: &Device) -> Result<Tensor, ModelError> {
        let st = map(&self.files[self.entry(name)?.file])?;
        let view = st.get(name).map_err(|e| ModelError::weights(format!("tensor {name}"), Some(e)))?;
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

/// Reads tensors' stored bytes, keeping the last shard mapped: the on-device load reads the
/// tensors of a stage in order, most of them from the shard of the one before.
pub struct ShardReader<'a> {
    weights: &'a Weights,
    current: Option<(usize, MmapedSafetensors)>,
}

impl<'a> ShardReader<'a> {
    pub fn new(weights: &'a Weights) -> Self {
        Self { weights, current: None }
    }

    /// Bytes `start..start + len` of tensor `name` as stored.
    pub fn bytes(&mut self, name: &str, start: usize, len: usize) -> Result<&[u8], ModelError> {
        let file = self.weights.entry(name)?.file;
        if self.current.as_ref().map(|(f, _)| *f) != Some(file) {
            self.current = Some((file, map(&self.weights.files[file])?));
        }
        let (_, st) = self.current.as_ref().expect("mapped just above");
        let view = st.get(name).map_err(|e| ModelError::weights(format!("tensor {name}"), Some(e)))?;
        let data = view.data();
        if start + len > data.len() {
            return Err(ModelError::weights(format!("{name}: bytes {start}..{} out of {}", start + len, data.len()), None));
        }
        Ok(&data[start..start + len])
    }
}

/// Map one shard read-only.
fn map(file: &Path) -> Result<MmapedSafetensors, ModelError> {
    if !file.exists() {
        return Err(ModelError::Io {
            path: file.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "shard listed in the index is missing"),
        });
    }
    // SAFETY: the file is mapped read-only; like every safetensors reader we rely on it not
    // being modified while it is mapped.
    unsafe { MmapedSafetensors::new(file) }.map_err(|e| ModelError::weights(format!("cannot map {}", file.display()), Some(e)))
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
    pub(crate) fn pp(&self, name: impl std::fmt::Display) -> Self {
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
    pub(crate) fn get_as(&self, shape: impl Into<Shape>, name: &str, dtype: DType) -> Result<Tensor, ModelError> {
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
    pub(crate) fn get_raw(&self, name: &str) -> Result<Tensor, ModelError> {
        self.weights.load_raw(&self.path(name), &self.device)
    }
}
