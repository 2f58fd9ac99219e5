//! A stage's weights loaded on the device ([`super::upload_plan`] is the plan and the
//! pipeline): bf16 tensors are read from the mapped shards into pinned host buffers, copied to
//! the GPU as they are read and, in FP8, quantized there per output channel by
//! `quant_rows_bf16` (bit for bit what the host path's [`crate::engine::reference::fp8`]
//! computes; the GPU check compares both); an FP8 checkpoint's E4M3 codes and scales are
//! uploaded as they are; in bf16 the weights are copied (f16 and f32 rounded to bf16 on the
//! way). A stage whose tensors this path does not take (an f16 checkpoint in FP8, an FP8 one
//! in bf16) returns `None` and is loaded by the host path.

use candle_core::DType;

use super::device::{DeviceBuf, GpuDevice};
use super::fit::LOAD_CHUNK_BYTES;
use super::layer::{LayerConfig, LayerWeights};
use super::precision::Precision;
use super::upload_plan::{chunks, run, Chunk, Convert, LoadStats, Op, Piece, Uploader};
use super::CudaError;
use crate::model::weights::{ShardReader, Vb, Weights};
use crate::model::ModelError;

type Result<T> = std::result::Result<T, CudaError>;

/// Pinned host buffers of the pipeline, and the reader threads filling them (the others hold
/// uploads in flight). Several readers keep a fast NVMe busy where one `memcpy` out of the
/// mapping (page faults included) would not.
const HOST_BUFFERS: usize = 6;
const READERS: usize = 3;

/// Page-locked host memory, freed on drop.
pub(crate) struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
}

// SAFETY: plain host memory owned by this value; only one thread touches it at a time (the
// pipeline moves it between the reader and the uploader).
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    pub fn new(dev: &GpuDevice, len: usize) -> Result<Self> {
        dev.ctx.bind_to_thread().map_err(CudaError::driver("bind context"))?;
        // SAFETY: a fresh page-locked allocation of `len` bytes; its contents are written
        // before they are read.
        let ptr = unsafe { cudarc::driver::result::malloc_host(len.max(1), 0) }
            .map_err(CudaError::driver(format!("allocate {len} bytes of pinned host memory")))?;
        Ok(Self { ptr: ptr.cast(), len, ctx: dev.ctx.clone() })
    }
}

impl AsRef<[u8]> for PinnedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` bytes allocated by `new`, alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl AsMut<[u8]> for PinnedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by malloc_host, freed once; no copy reads it any more (the
            // pipeline finishes every upload before dropping its buffer).
            let _ = unsafe { cudarc::driver::result::free_host(self.ptr.cast()) };
        }
    }
}

/// Uploads chunks on the device's stream; quantizes through two staging buffers used in turn
/// (the stream orders a buffer's reuse after the kernel that read it).
struct DeviceUploader<'a> {
    dev: &'a GpuDevice,
    staging: Vec<DeviceBuf>,
}

impl Uploader for DeviceUploader<'_> {
    type Ticket = cudarc::driver::CudaEvent;
    type Error = CudaError;

    fn start(&mut self, p: &Piece, c: &Chunk, index: usize, host: &[u8]) -> Result<Self::Ticket> {
        let stream = self.dev.stream.cu_stream();
        let copy = |dst: u64| {
            // SAFETY: `dst` has room for the chunk (allocated from the piece's shape); `host`
            // is pinned and stays untouched until the ticket is finished.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, host, stream) }.map_err(CudaError::driver(format!("upload {}", p.name)))
        };
        match p.op {
            Op::Copy => copy(p.dest + (c.first_row * p.row_upload_bytes()) as u64)?,
            Op::Quantize => {
                let slot = &self.staging[index % self.staging.len()];
                copy(slot.ptr)?;
                let (codes, scales) = (p.dest + (c.first_row * p.cols) as u64, p.scales + (c.first_row * 4) as u64);
                self.dev.quant_rows(slot.ptr, c.rows, p.cols, codes, scales)?;
            }
        }
        self.dev.stream.record_event(Some(super::device::TIMING_EVENT_FLAGS)).map_err(CudaError::driver("record an upload event"))
    }

    fn finish(&mut self, ticket: Self::Ticket) -> Result<()> {
        ticket.synchronize().map_err(CudaError::driver("wait for an upload"))
    }
}

/// How a stored tensor of `dtype` reaches a weight in `precision`, or `None` when only the
/// host path can load it.
fn route(dtype: &str, stored_fp8: bool, precision: Precision) -> Option<(Op, Convert, usize)> {
    match (precision, dtype, stored_fp8) {
        (Precision::Fp8, "BF16", false) => Some((Op::Quantize, Convert::AsIs, 2)),
        (Precision::Fp8, "F8_E4M3", true) => Some((Op::Copy, Convert::AsIs, 1)),
        (Precision::Bf16, "BF16", false) => Some((Op::Copy, Convert::AsIs, 2)),
        (Precision::Bf16, "F16", false) => Some((Op::Copy, Convert::F16ToBf16, 2)),
        (Precision::Bf16, "F32", false) => Some((Op::Copy, Convert::F32ToBf16, 4)),
        _ => None,
    }
}

fn model_err(e: ModelError) -> CudaError {
    CudaError::Model(e)
}

/// One fused linear's device buffers and the pieces that fill them.
struct Fused {
    w: DeviceBuf,
    scale: Option<DeviceBuf>,
}

/// Allocate a fused linear of `parts` (`[out_i, inp]` each, under `vb`) and describe its
/// pieces; FP8 checkpoint scales are uploaded here (they are small). `None`: a part the device
/// path does not take.
fn fused(dev: &GpuDevice, vb: &Vb, parts: &[(&str, usize)], inp: usize, precision: Precision, pieces: &mut Vec<Piece>) -> Result<Option<Fused>> {
    let out: usize = parts.iter().map(|p| p.1).sum();
    let mut routes = Vec::with_capacity(parts.len());
    for (name, rows) in parts {
        let lin = vb.pp(name);
        let path = lin.path("weight");
        let (shape, dtype) = vb.weights.info(&path).map_err(model_err)?;
        if shape != [*rows, inp] {
            return Err(CudaError::Shape(format!("tensor {path} has shape {shape:?}, expected [{rows}, {inp}]")));
        }
        match route(&dtype, lin.contains("weight_scale"), precision) {
            Some(r) => routes.push((path, *rows, r)),
            None => return Ok(None),
        }
    }
    let w = dev.alloc(out * inp * precision.weight_bytes())?;
    let scale = (precision == Precision::Fp8).then(|| dev.alloc(out * 4)).transpose()?;
    let mut row = 0;
    for ((name, rows), (path, _, (op, convert, stored))) in parts.iter().zip(routes) {
        let scales = scale.as_ref().map_or(0, |s| s.ptr + (row * 4) as u64);
        if op == Op::Copy && precision == Precision::Fp8 {
            // An FP8 checkpoint: its per-channel (or per-tensor, broadcast) scales as stored.
            let s = vb.pp(name).get_raw("weight_scale").and_then(|t| Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)).map_err(model_err)?;
            let s = if s.len() == *rows { s } else { vec![s.iter().copied().fold(f32::MIN, f32::max); *rows] };
            dev.upload(scales, &s)?;
        }
        let dest = w.ptr + (row * inp * precision.weight_bytes()) as u64;
        pieces.push(Piece { name: path, rows: *rows, cols: inp, stored, convert, op, dest, scales });
        row += rows;
    }
    Ok(Some(Fused { w, scale }))
}

/// The stage's weights loaded through the device pipeline: each layer's linears (norms and
/// biases, small, by the host path in `finish_layer`), and the bf16 embedding table when
/// `embed` is `Some((vocab, hidden))`. `None` when a tensor needs the host path.
pub(crate) struct DeviceLoad {
    pub layers: Vec<LayerWeights>,
    pub embed: Option<DeviceBuf>,
    pub(crate) stats: LoadStats,
}

/// Load `layers` (their index and config) of the checkpoint under `model` (`vb.pp("model")`).
pub(crate) fn load_on_device(
    dev: &GpuDevice,
    model: &Vb,
    cfg: &crate::model::config::ArchConfig,
    layers: &[(usize, LayerConfig)],
    embed: bool,
    precision: Precision,
    finish_layer: impl Fn(&Vb, &LayerConfig, [(DeviceBuf, Option<DeviceBuf>); 4]) -> Result<LayerWeights>,
) -> Result<Option<DeviceLoad>> {
    let mut pieces = Vec::new();
    let mut fused_layers = Vec::with_capacity(layers.len());
    for (i, lc) in layers {
        let s = &lc.shape;
        let (h, kv) = (s.hidden, s.kv_heads * s.head_dim);
        let vb = model.pp("layers").pp(i);
        let (attn, mlp) = (vb.pp("self_attn"), vb.pp("mlp"));
        let up: Vec<(&str, usize)> = if s.gated { vec![("gate_proj", s.inter), ("up_proj", s.inter)] } else { vec![("up_proj", s.inter)] };
        let linears = [
            fused(dev, &attn, &[("q_proj", s.attn_width()), ("k_proj", kv), ("v_proj", kv)], h, precision, &mut pieces)?,
            fused(dev, &attn, &[("o_proj", h)], s.attn_width(), precision, &mut pieces)?,
            fused(dev, &mlp, &up, h, precision, &mut pieces)?,
            fused(dev, &mlp, &[("down_proj", h)], s.inter, precision, &mut pieces)?,
        ];
        let Some(linears) = linears.into_iter().collect::<Option<Vec<Fused>>>() else {
            tracing::info!(layer = i, ?precision, "a weight of layer {i} needs the host path: loading the stage on the host");
            return Ok(None);
        };
        let linears: [Fused; 4] = linears.try_into().unwrap_or_else(|_| unreachable!("four linears"));
        fused_layers.push((vb, *lc, linears));
    }
    let table = if embed {
        let path = model.pp("embed_tokens").path("weight");
        let (shape, dtype) = model.weights.info(&path).map_err(model_err)?;
        let Some((Op::Copy, convert, stored)) = route(&dtype, false, Precision::Bf16) else { return Ok(None) };
        if shape != [cfg.vocab_size, cfg.hidden_size] {
            return Err(CudaError::Shape(format!("tensor {path} has shape {shape:?}, expected [{}, {}]", cfg.vocab_size, cfg.hidden_size)));
        }
        let t = dev.alloc(cfg.vocab_size * cfg.hidden_size * 2)?;
        pieces.push(Piece { name: path, rows: cfg.vocab_size, cols: cfg.hidden_size, stored, convert, op: Op::Copy, dest: t.ptr, scales: 0 });
        Some(t)
    } else {
        None
    };
    let stats = upload_pieces(dev, &model.weights, &pieces)?;
    let mut out = Vec::with_capacity(fused_layers.len());
    for (vb, lc, linears) in fused_layers {
        let bufs = linears.map(|f| (f.w, f.scale));
        out.push(finish_layer(&vb, &lc, bufs)?);
    }
    Ok(Some(DeviceLoad { layers: out, embed: table, stats }))
}

/// Run `pieces` through the pipeline: a reader thread over the mapped shards, pinned buffers,
/// uploads (and quantization) on the device's stream.
pub(crate) fn upload_pieces(dev: &GpuDevice, weights: &Weights, pieces: &[Piece]) -> Result<LoadStats> {
    let chunks = chunks(pieces, LOAD_CHUNK_BYTES);
    let largest = chunks.iter().map(|c| c.rows * pieces[c.piece].row_upload_bytes()).max().unwrap_or(0);
    let buffers = (0..HOST_BUFFERS).map(|_| PinnedBuf::new(dev, largest)).collect::<Result<Vec<_>>>()?;
    let quantizes = pieces.iter().any(|p| p.op == Op::Quantize);
    let staging = if quantizes { vec![dev.alloc(largest)?, dev.alloc(largest)?] } else { Vec::new() };
    let mut up = DeviceUploader { dev, staging };
    let make_reader = || {
        let mut reader = ShardReader::new(weights);
        move |p: &Piece, c: &Chunk, _: usize, out: &mut [u8]| -> Result<()> {
            let (start, len) = (c.first_row * p.row_stored_bytes(), c.rows * p.row_stored_bytes());
            let bytes = reader.bytes(&p.name, start, len).map_err(model_err)?;
            p.convert.apply(bytes, out);
            Ok(())
        }
    };
    let stats = run(pieces, &chunks, buffers, READERS, make_reader, &mut up)?;
    dev.sync()?;
    Ok(stats)
}
