//! One GPU as the engine uses it: a context and one stream, the kernel module compiled for the
//! device's architecture, raw device buffers, and typed launchers for every kernel. Launch
//! dimensions are clamped here, never taken straight from a tensor dimension.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute_enum as FuncAttr;
use cudarc::driver::{result, CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::compile::{arch_for, cached_ptx, KERNELS};
use super::plan::{grid_stride, row_block};
use super::probe::{require, Library};
use super::CudaError;

type Result<T> = std::result::Result<T, CudaError>;

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
    pub arch: String,
    pub sm_count: u32,
    /// Dynamic shared memory every kernel may use (the opt-in limit less static use).
    pub max_dynamic_smem: u32,
    funcs: HashMap<&'static str, CudaFunction>,
}

impl GpuDevice {
    /// Open GPU `ordinal`: probe the libraries, refuse GPUs older than sm_90 (FP8 tensor cores
    /// and the cuBLASLt FP8 kernels need Hopper), compile or load the cached kernels.
    pub fn open(ordinal: usize, cache_dir: &Path) -> Result<Self> {
        require(&[Library::Driver, Library::Nvrtc, Library::CublasLt])?;
        let ctx = CudaContext::new(ordinal).map_err(CudaError::driver(format!("open GPU {ordinal}")))?;
        let name = ctx.name().map_err(CudaError::driver("device name"))?;
        let (major, minor) = ctx.compute_capability().map_err(CudaError::driver("compute capability"))?;
        if major < 9 {
            return Err(CudaError::UnsupportedGpu { name, major, minor });
        }
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(CudaError::driver("SM count"))? as u32;
        let arch = arch_for(major, minor);
        let ptx = cached_ptx(&arch, cache_dir)?;
        let module = ctx.load_module(ptx).map_err(CudaError::driver("load kernels"))?;
        let optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(CudaError::driver("shared memory opt-in limit"))?;
        let mut funcs = HashMap::new();
        let mut max_dynamic_smem = u32::MAX;
        for k in KERNELS {
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
        Ok(Self { ctx, stream, name, arch, sm_count, max_dynamic_smem, funcs })
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

    fn func(&self, name: &str) -> &CudaFunction {
        // Every name used below is in KERNELS, all loaded by `open`.
        &self.funcs[name]
    }

    fn cfg(grid: (u32, u32), block: u32, smem: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem }
    }

    fn max_blocks(&self) -> u32 {
        self.sm_count * 16
    }

    fn smem_check(&self, bytes: usize, what: &str) -> Result<u32> {
        u32::try_from(bytes)
            .ok()
            .filter(|&b| b <= self.max_dynamic_smem)
            .ok_or_else(|| CudaError::Shape(format!("{what} needs {bytes} bytes of shared memory")))
    }

    /// RMSNorm (`bias == 0`, `ln1p == false`) or LayerNorm1P of `rows` rows; see kernels/norm.cu.
    #[allow(clippy::too_many_arguments)]
    pub fn norm(&self, ln1p: bool, x: u64, res: u64, w: u64, b: u64, eps: f32, rows: usize, hidden: usize,
                y: u64, q: u64, q_scale: u64) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let smem = self.smem_check(hidden * 2, "norm row")?;
        let hidden_i = hidden as i32;
        let f = self.func(if ln1p { "layernorm1p_bf16" } else { "rmsnorm_bf16" });
        let mut l = self.stream.launch_builder(f);
        l.arg(&x).arg(&res).arg(&w);
        if ln1p {
            l.arg(&b);
        }
        l.arg(&eps).arg(&hidden_i).arg(&y).arg(&q).arg(&q_scale);
        // SAFETY: argument list matches the kernel signature; buffers sized by the caller.
        unsafe { l.launch(Self::cfg((rows as u32, 1), row_block(hidden), smem)) }.map(|_| ()).map_err(CudaError::driver("norm"))
    }

    /// In-place rotary on the first `heads` heads of each row.
    #[allow(clippy::too_many_arguments)]
    pub fn rotary(&self, x: u64, tokens: usize, heads: usize, head_dim: usize, row_stride: usize, rot_dim: usize,
                  positions: u64, inv_freq: u64) -> Result<()> {
        let n = tokens * heads * (rot_dim / 2);
        let (grid, block) = grid_stride(n, 256, self.max_blocks());
        let a = [tokens as i32, heads as i32, head_dim as i32, row_stride as i32, rot_dim as i32];
        let mut l = self.stream.launch_builder(self.func("rotary_bf16"));
        l.arg(&x).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&a[3]).arg(&a[4]).arg(&positions).arg(&inv_freq);
        // SAFETY: as above.
        unsafe { l.launch(Self::cfg((grid, 1), block, 0)) }.map(|_| ()).map_err(CudaError::driver("rotary"))
    }

    /// The MLP activation (`swiglu`, `geglu` or `relu2`) fused with per-token quantization.
    #[allow(clippy::too_many_arguments)]
    pub fn act_quant(&self, kernel: &'static str, input: u64, rows: usize, inter: usize, y: u64, q: u64, q_scale: u64) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let smem = self.smem_check(inter * 2, "activation row")?;
        let inter_i = inter as i32;
        let mut l = self.stream.launch_builder(self.func(kernel));
        l.arg(&input).arg(&inter_i).arg(&y).arg(&q).arg(&q_scale);
        // SAFETY: as above.
        unsafe { l.launch(Self::cfg((rows as u32, 1), row_block(inter), smem)) }.map(|_| ()).map_err(CudaError::driver(kernel))
    }

    /// `a = bf16(a + b)` over `n` elements.
    pub fn add(&self, a: u64, b: u64, n: usize) -> Result<()> {
        let (grid, block) = grid_stride(n, 256, self.max_blocks());
        let n = n as i64;
        let mut l = self.stream.launch_builder(self.func("add_bf16"));
        l.arg(&n).arg(&a).arg(&b);
        // SAFETY: as above.
        unsafe { l.launch(Self::cfg((grid, 1), block, 0)) }.map(|_| ()).map_err(CudaError::driver("add"))
    }

    /// Per-token E4M3 quantization of `x: [rows, cols]`.
    pub fn quant_rows(&self, x: u64, rows: usize, cols: usize, q: u64, q_scale: u64) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let cols_i = cols as i32;
        let mut l = self.stream.launch_builder(self.func("quant_rows_bf16"));
        l.arg(&x).arg(&cols_i).arg(&q).arg(&q_scale);
        // SAFETY: as above.
        unsafe { l.launch(Self::cfg((rows as u32, 1), row_block(cols), 0)) }.map(|_| ()).map_err(CudaError::driver("quant_rows"))
    }

    /// `y = bf16(bf16(y · rs · cs) + bias)`: the FP8 GEMM's scales when cuBLASLt cannot apply them.
    pub fn scale_epilogue(&self, y: u64, rows: usize, cols: usize, rs: u64, cs: u64, bias: u64) -> Result<()> {
        let (grid, block) = grid_stride(rows * cols, 256, self.max_blocks());
        let (rows_i, cols_i) = (rows as i64, cols as i32);
        let mut l = self.stream.launch_builder(self.func("scale_epilogue_bf16"));
        l.arg(&y).arg(&rows_i).arg(&cols_i).arg(&rs).arg(&cs).arg(&bias);
        // SAFETY: as above.
        unsafe { l.launch(Self::cfg((grid, 1), block, 0)) }.map(|_| ()).map_err(CudaError::driver("scale_epilogue"))
    }

    /// `dst[m] = src[idx[m]]`.
    pub fn gather_rows(&self, src: u64, src_rows: usize, cols: usize, idx: u64, rows: usize, dst: u64) -> Result<()> {
        let (grid, block) = grid_stride(rows * cols, 256, self.max_blocks());
        let (src_rows, cols_i, rows_i) = (src_rows as i64, cols as i32, rows as i32);
        let mut l = self.stream.launch_builder(self.func("gather_rows_bf16"));
        l.arg(&src).arg(&src_rows).arg(&cols_i).arg(&idx).arg(&rows_i).arg(&dst);
        // SAFETY: as above.
        unsafe { l.launch(Self::cfg((grid, 1), block, 0)) }.map(|_| ()).map_err(CudaError::driver("gather_rows"))
    }

    /// Causal varlen attention; `tiles` from [`super::plan::attention_tiles`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention(&self, qkv: u64, out: u64, tiles: u64, num_tiles: usize, cu_seqlens: u64, qkv_stride: usize,
                     heads: usize, kv_heads: usize, head_dim: usize, window: usize) -> Result<()> {
        if num_tiles == 0 {
            return Ok(());
        }
        let kernel = match head_dim {
            16 => "attention_varlen_d16_bf16",
            32 => "attention_varlen_d32_bf16",
            64 => "attention_varlen_d64_bf16",
            128 => "attention_varlen_d128_bf16",
            192 => "attention_varlen_d192_bf16",
            d => return Err(CudaError::Shape(format!("attention supports head_dim 16, 32, 64, 128 and 192, not {d}"))),
        };
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(CudaError::Shape(format!("{heads} heads are not a multiple of {kv_heads} kv heads")));
        }
        let smem = self.smem_check(attention_smem(head_dim), "attention")?;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let a = [qkv_stride as i32, heads as i32, kv_heads as i32];
        let window = window as i32;
        let mut l = self.stream.launch_builder(self.func(kernel));
        l.arg(&qkv).arg(&out).arg(&tiles).arg(&cu_seqlens).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&scale).arg(&window);
        // SAFETY: as above; grid.y = heads ≤ 65535.
        unsafe { l.launch(Self::cfg((num_tiles as u32, heads as u32), 128, smem)) }
            .map(|_| ())
            .map_err(CudaError::driver("attention"))
    }

    /// Fill `n` elements with uniform values in [-amp, amp): bf16 (`fp8 == false`) or E4M3.
    pub fn fill_uniform(&self, fp8: bool, ptr: u64, n: usize, seed: u64, amp: f32) -> Result<()> {
        let (grid, block) = grid_stride(n, 256, self.max_blocks());
        let n = n as i64;
        let mut l = self.stream.launch_builder(self.func(if fp8 { "fill_uniform_e4m3" } else { "fill_uniform_bf16" }));
        l.arg(&n).arg(&ptr).arg(&seed).arg(&amp);
        // SAFETY: as above.
        unsafe { l.launch(Self::cfg((grid, 1), block, 0)) }.map(|_| ()).map_err(CudaError::driver("fill_uniform"))
    }

    /// Set every byte of `n` to `value` (poisoning outputs before a check: 0xFF is NaN in bf16
    /// and E4M3 alike).
    pub fn fill_bytes(&self, ptr: u64, n: usize, value: u8) -> Result<()> {
        let (grid, block) = grid_stride(n, 256, self.max_blocks());
        let n = n as i64;
        let mut l = self.stream.launch_builder(self.func("fill_bytes"));
        l.arg(&n).arg(&ptr).arg(&value);
        // SAFETY: as above.
        unsafe { l.launch(Self::cfg((grid, 1), block, 0)) }.map(|_| ()).map_err(CudaError::driver("fill_bytes"))
    }
}

/// Dynamic shared memory of the attention kernel for `head_dim` (mirrors kernels/attention.cu:
/// Q, K and V tiles of 64 rows in bf16).
pub fn attention_smem(head_dim: usize) -> usize {
    3 * 64 * head_dim * 2
}
