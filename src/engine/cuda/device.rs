//! One GPU as the engine uses it: a context and one stream, the kernel module compiled for the
//! device's architecture, raw device buffers, and typed launchers for every kernel. Launch
//! dimensions are clamped here, never taken straight from a tensor dimension.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::sys::{CUevent_flags, CUfunction_attribute_enum as FuncAttr};
use cudarc::driver::{result, CudaContext, CudaEvent, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::compile::kernels_for;
use super::launch::{self, Arg, Limits, Planned};
use super::precision::{arch_for, GpuFacts, Precision, PrecisionError};
use super::prebuilt::{kernel_image, Origin};
use super::probe::{require, Library};
use super::CudaError;

type Result<T> = std::result::Result<T, CudaError>;

/// Flags of events used for timing: `CU_EVENT_DEFAULT` records timestamps
/// (`CU_EVENT_DISABLE_TIMING`, cudarc's default, does not).
pub const TIMING_EVENT_FLAGS: CUevent_flags = CUevent_flags::CU_EVENT_DEFAULT;

/// A raw device allocation, freed on drop.
pub struct DeviceBuf {
    pub ptr: u64,
    pub bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceBuf {
    /// The address `offset` bytes in.
    pub fn at(&self, offset: usize) -> u64 {
        self.ptr + offset as u64
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        if self.ptr != 0 && self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by malloc_sync in this context, freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// The GPU, its stream and its kernels.
pub struct GpuDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub capability: (i32, i32),
    pub arch: String,
    pub sm_count: u32,
    /// Dynamic shared memory every kernel may use (the opt-in limit less static use).
    pub(crate) max_dynamic_smem: u32,
    /// Where the kernels came from.
    pub origin: Origin,
    funcs: HashMap<&'static str, CudaFunction>,
}

impl GpuDevice {
    /// Open GPU `ordinal` to run `precision`: probe the libraries, refuse a GPU that cannot run
    /// it (bf16 needs sm_80, FP8 sm_89; see [`super::precision`]), load the kernels as CUBIN for
    /// the device's architecture (prebuilt, cached, or compiled now; the FP8 ones only where
    /// FP8 exists), and log the GPU, its capability, the driver, the precision and the kernels.
    pub fn open(ordinal: usize, cache_dir: &Path, precision: Precision) -> Result<Self> {
        require(&[Library::Driver, Library::CublasLt])?;
        let ctx = CudaContext::new(ordinal).map_err(CudaError::driver(format!("open GPU {ordinal}")))?;
        let name = ctx.name().map_err(CudaError::driver("device name"))?;
        let (major, minor) = ctx.compute_capability().map_err(CudaError::driver("compute capability"))?;
        let facts = GpuFacts { ordinal, name: name.clone(), major, minor };
        match precision {
            _ if !facts.has_bf16() => return Err(PrecisionError::TooOld { gpu: facts }.into()),
            Precision::Fp8 if !facts.has_fp8() => return Err(PrecisionError::NoFp8 { gpu: facts }.into()),
            _ => {}
        }
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(CudaError::driver("SM count"))? as u32;
        let arch = arch_for(major, minor);
        let (cubin, origin) = kernel_image(&arch, Some(cache_dir))?;
        let module = ctx.load_module(Ptx::from_binary(cubin)).map_err(CudaError::driver(format!("load kernels ({origin:?})")))?;
        let env = super::probe::environment();
        let capability = format!("{major}.{minor}");
        tracing::info!(gpu = %name, ordinal, %capability, %arch, ?precision, kernels = ?origin, "{env}");
        let optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(CudaError::driver("shared memory opt-in limit"))?;
        let mut funcs = HashMap::new();
        let mut max_dynamic_smem = u32::MAX;
        for k in kernels_for(&arch) {
            let f = module.load_function(k).map_err(CudaError::driver(format!("kernel {k}")))?;
            // Static + dynamic shared memory may not exceed the device's opt-in limit.
            // SAFETY: a function of a loaded module; the value is within the device limit.
            let dynamic = unsafe {
                result::function::get_function_attribute(f.cu_function(), FuncAttr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                    .map(|fixed| (optin - fixed).max(0))
                    .and_then(|dynamic| {
                        result::function::set_function_attribute(
                            f.cu_function(),
                            FuncAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            dynamic,
                        )
                        .map(|_| dynamic)
                    })
            }
            .map_err(CudaError::driver(format!("shared memory limit of {k}")))?;
            max_dynamic_smem = max_dynamic_smem.min(dynamic as u32);
            funcs.insert(k, f);
        }
        let stream = ctx.default_stream();
        Ok(Self { ctx, stream, name, capability: (major, minor), arch, sm_count, max_dynamic_smem, origin, funcs })
    }

    /// Allocate `bytes` of device memory (uninitialized).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuf> {
        self.ctx.bind_to_thread().map_err(CudaError::driver("bind context"))?;
        // SAFETY: plain device allocation in the bound context.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }
            .map_err(CudaError::driver(format!("allocate {bytes} bytes")))?;
        Ok(DeviceBuf { ptr, bytes, ctx: self.ctx.clone() })
    }

    /// Copy `src` to device address `dst` (synchronous with respect to the stream).
    pub fn upload<T: DeviceRepr>(&self, dst: u64, src: &[T]) -> Result<()> {
        self.sync()?;
        // SAFETY: the caller passes an address with room for `src`.
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(CudaError::driver("copy to device"))
    }

    /// Copy `len` values from device address `src`.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, src: u64, len: usize) -> Result<Vec<T>> {
        self.sync()?;
        let mut out = vec![T::default(); len];
        // SAFETY: the caller passes an address holding `len` values.
        unsafe { result::memcpy_dtoh_sync(&mut out, src) }.map_err(CudaError::driver("copy from device"))?;
        Ok(out)
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(CudaError::driver("synchronize"))
    }

    /// A start and a stop event that can be timed. cudarc's default flags
    /// (`new_event(None)`) disable timing, and `elapsed_ms` then fails.
    pub fn timing_events(&self) -> Result<(CudaEvent, CudaEvent)> {
        let new = || self.ctx.new_event(Some(TIMING_EVENT_FLAGS)).map_err(CudaError::driver("create timing event"));
        Ok((new()?, new()?))
    }

    /// What launches may use on this device.
    pub fn limits(&self) -> Limits {
        Limits { max_blocks: self.sm_count * 16, max_dynamic_smem: self.max_dynamic_smem }
    }

    /// Push a planned launch's arguments in order and launch it on the stream.
    pub fn run(&self, planned: Planned) -> Result<()> {
        let Some(l) = planned.map_err(CudaError::Shape)? else { return Ok(()) };
        let f = self.funcs.get(l.kernel).ok_or_else(|| CudaError::Unsupported(format!("kernel {}", l.kernel)))?;
        let mut b = self.stream.launch_builder(f);
        for a in &l.args {
            match a {
                Arg::Ptr(v) | Arg::U64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::U8(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: (l.grid.0, l.grid.1, 1), block_dim: (l.block, 1, 1), shared_mem_bytes: l.smem };
        // SAFETY: the arguments match the kernel's parameter list (tested against kernels/*.cu
        // in launch.rs); the buffers behind the pointers are sized by the caller.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(CudaError::driver(l.kernel))
    }

    /// RMSNorm (`bias == 0`, `ln1p == false`) or LayerNorm1P of `rows` rows; see kernels/norm.cu.
    #[allow(clippy::too_many_arguments)]
    pub fn norm(&self, ln1p: bool, x: u64, res: u64, w: u64, b: u64, eps: f32, rows: usize, hidden: usize,
                y: u64, q: u64, q_scale: u64) -> Result<()> {
        self.run(launch::norm(&self.limits(), ln1p, x, res, w, b, eps, rows, hidden, y, q, q_scale))
    }

    /// Qwen3's per-head q/k RMSNorm, in place on the fused QKV rows; see kernels/norm.cu.
    #[allow(clippy::too_many_arguments)]
    pub fn head_norm(&self, x: u64, tokens: usize, q_heads: usize, kv_heads: usize, head_dim: usize, row_stride: usize,
                     q_w: u64, k_w: u64, eps: f32) -> Result<()> {
        self.run(launch::head_norm(&self.limits(), x, tokens, q_heads, kv_heads, head_dim, row_stride, q_w, k_w, eps))
    }

    /// Qwen3's per-head q/k RMSNorm then rotary, fused; see kernels/norm.cu.
    #[allow(clippy::too_many_arguments)]
    pub fn head_norm_rotary(&self, x: u64, tokens: usize, q_heads: usize, kv_heads: usize, head_dim: usize, row_stride: usize,
                            q_w: u64, k_w: u64, eps: f32, rot_dim: usize, positions: u64, inv_freq: u64) -> Result<()> {
        let l = &self.limits();
        self.run(launch::head_norm_rotary(l, x, tokens, q_heads, kv_heads, head_dim, row_stride, q_w, k_w, eps, rot_dim, positions, inv_freq))
    }

    /// In-place rotary on the first `heads` heads of each row.
    #[allow(clippy::too_many_arguments)]
    pub fn rotary(&self, x: u64, tokens: usize, heads: usize, head_dim: usize, row_stride: usize, rot_dim: usize,
                  positions: u64, inv_freq: u64) -> Result<()> {
        self.run(launch::rotary(&self.limits(), x, tokens, heads, head_dim, row_stride, rot_dim, positions, inv_freq))
    }

    /// The MLP activation (`swiglu`, `geglu` or `relu2`) fused with per-token quantization.
    #[allow(clippy::too_many_arguments)]
    pub fn act_quant(&self, kernel: &'static str, input: u64, rows: usize, inter: usize, y: u64, q: u64, q_scale: u64) -> Result<()> {
        self.run(launch::act_quant(&self.limits(), kernel, input, rows, inter, y, q, q_scale))
    }

    /// `a = bf16(a + b)` over `n` elements.
    pub fn add(&self, a: u64, b: u64, n: usize) -> Result<()> {
        self.run(launch::add(&self.limits(), a, b, n))
    }

    /// Per-token E4M3 quantization of `x: [rows, cols]`.
    pub fn quant_rows(&self, x: u64, rows: usize, cols: usize, q: u64, q_scale: u64) -> Result<()> {
        self.run(launch::quant_rows(x, rows, cols, q, q_scale))
    }

    /// `y = bf16(bf16(y · rs · cs) + bias)`: the FP8 GEMM's scales when cuBLASLt cannot apply
    /// them; with `rot`, followed by rotary on its heads in the same pass.
    #[allow(clippy::too_many_arguments)]
    pub fn scale_epilogue(&self, y: u64, rows: usize, cols: usize, rs: u64, cs: u64, bias: u64, rot: Option<&launch::Rotary>) -> Result<()> {
        self.run(launch::scale_epilogue(&self.limits(), y, rows, cols, rs, cs, bias, rot))
    }

    /// `y = bf16(y + bf16(bias))` over `[rows, cols]` (f32 bias): a bf16 GEMM's bias.
    pub fn add_bias(&self, y: u64, rows: usize, cols: usize, bias: u64) -> Result<()> {
        self.run(launch::add_bias(&self.limits(), y, rows, cols, bias))
    }

    /// `dst[m] = src[idx[m]]`.
    pub fn gather_rows(&self, src: u64, src_rows: usize, cols: usize, idx: u64, rows: usize, dst: u64) -> Result<()> {
        self.run(launch::gather_rows(&self.limits(), src, src_rows, cols, idx, rows, dst))
    }

    /// Causal varlen attention (tree layout when `a.prefix_of` is set) with `kernel`.
    pub fn attention(&self, kernel: launch::AttentionKernel, a: &launch::AttnArgs) -> Result<()> {
        self.run(launch::attention(&self.limits(), kernel, a))
    }

    /// Fill `n` elements with uniform values in [-amp, amp): bf16 (`fp8 == false`) or E4M3.
    pub fn fill_uniform(&self, fp8: bool, ptr: u64, n: usize, seed: u64, amp: f32) -> Result<()> {
        self.run(launch::fill_uniform(&self.limits(), fp8, ptr, n, seed, amp))
    }

    /// Set every byte of `n` to `value` (poisoning outputs before a check: 0xFF is NaN in bf16
    /// and E4M3 alike).
    pub fn fill_bytes(&self, ptr: u64, n: usize, value: u8) -> Result<()> {
        self.run(launch::fill_bytes(&self.limits(), ptr, n, value))
    }
}
