//! GEMMs through cuBLASLt's raw API. FP8 (sm_89 and later): `y [tokens, n] (bf16) =
//! x [tokens, k] (E4M3) · w [n, k]ᵀ (E4M3)`, f32 accumulation, scaled per token (`x_scale`) and
//! per output channel (`w_scale`). bf16 (sm_80 and later): the same product with bf16 `x` and
//! `w`, f32 accumulation, the bias added by `add_bias_bf16`. FP8 per-channel scales use
//! cuBLASLt's outer-vector scale mode when the library offers an algorithm for it; otherwise
//! the GEMM runs unscaled and `scale_epilogue_bf16` applies both vectors (bf16 keeps its
//! relative precision, so only one extra rounding). The QKV projection's rotary rides in that
//! epilogue when it runs ([`Gemm::matmul_rotary`]).
//!
//! Layout: cuBLASLt is column-major and FP8 wants "TN" (bf16 uses the same). Row-major
//! `w [n, k]` is a column-major `[k, n]`, used transposed as A (m = n); row-major `x [tokens, k]` is column-major
//! `[k, tokens]`, used as B; column-major D `[n, tokens]` is row-major `y [tokens, n]`.

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;

use super::device::{DeviceBuf, GpuDevice};
use super::launch::Rotary;
use super::CudaError;

type Result<T> = std::result::Result<T, CudaError>;

/// Workspace for cuBLASLt (32 MiB is NVIDIA's advice for Hopper).
pub(crate) const WORKSPACE_BYTES: usize = 32 << 20;

/// Cached GEMM plans before the cache is emptied.
const MAX_PLANS: usize = 512;

/// `cublasOperation_t` values (an `int32` attribute; the enum lives in cuBLAS, not cuBLASLt).
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;

/// How the per-token and per-channel scales were applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleMode {
    /// By cuBLASLt (`CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F` on A and B).
    OuterVector,
    /// By the fused epilogue kernel after an unscaled GEMM.
    Epilogue,
}

/// What a plan computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Fp8(ScaleMode),
    Bf16,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3], // A, B, D (C = D)
    algo: sys::cublasLtMatmulAlgo_t,
}

/// A cuBLASLt handle, its workspace and the plans for the shapes seen so far.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceBuf,
    /// Use Hopper's fast FP8 accumulation (no periodic promotion to full f32).
    pub fast_accum: bool,
    /// Try outer-vector scales first; off forces the epilogue path.
    pub prefer_outer_vector: bool,
    plans: HashMap<(usize, usize, usize, Kind, bool), Plan>,
}

// SAFETY: the handle and descriptors are used from one thread at a time (the stage's thread).
unsafe impl Send for Gemm {}

impl Gemm {
    pub fn new(dev: &GpuDevice) -> Result<Self> {
        dev.ctx.bind_to_thread().map_err(CudaError::driver("bind context"))?;
        let handle = lt::create_handle().map_err(CudaError::blas("create handle"))?;
        let workspace = dev.alloc(WORKSPACE_BYTES)?;
        Ok(Self { handle, workspace, fast_accum: false, prefer_outer_vector: true, plans: HashMap::new() })
    }

    /// `y = x · wᵀ` scaled; returns how the scales were applied. `bias` (f32 `[n]`, or 0) is
    /// added by the epilogue, which then also applies the scales.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(&mut self, dev: &GpuDevice, x: u64, x_scale: u64, w: u64, w_scale: u64, y: u64, bias: u64,
                  tokens: usize, n: usize, k: usize) -> Result<ScaleMode> {
        self.matmul_then(dev, x, x_scale, w, w_scale, y, bias, tokens, n, k, None)
    }

    /// [`Self::matmul`], then rotary on `rot`'s heads of `y`: inside the epilogue kernel when
    /// the epilogue runs (one pass over `y` instead of two), else by `rotary_bf16` after
    /// cuBLASLt applied the scales. Either way `y` ends as the epilogue then `rotary_bf16`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_rotary(&mut self, dev: &GpuDevice, x: u64, x_scale: u64, w: u64, w_scale: u64, y: u64, bias: u64,
                         tokens: usize, n: usize, k: usize, rot: &Rotary) -> Result<ScaleMode> {
        let mode = self.matmul_then(dev, x, x_scale, w, w_scale, y, bias, tokens, n, k, Some(rot))?;
        if mode == ScaleMode::OuterVector {
            dev.rotary(y, tokens, rot.heads, rot.head_dim, n, rot.rot_dim, rot.positions, rot.inv_freq)?;
        }
        Ok(mode)
    }

    /// [`Self::matmul`] with `rot` fused into the epilogue when the epilogue runs.
    #[allow(clippy::too_many_arguments)]
    fn matmul_then(&mut self, dev: &GpuDevice, x: u64, x_scale: u64, w: u64, w_scale: u64, y: u64, bias: u64,
                   tokens: usize, n: usize, k: usize, rot: Option<&Rotary>) -> Result<ScaleMode> {
        if tokens == 0 {
            return Ok(ScaleMode::OuterVector);
        }
        super::plan::check_fp8_gemm_shape(tokens, n, k).map_err(CudaError::Shape)?;
        // A bias needs the epilogue anyway: let it apply the scales too.
        let mode = if self.prefer_outer_vector && bias == 0 && self.plan(tokens, n, k, Kind::Fp8(ScaleMode::OuterVector)).is_ok() {
            ScaleMode::OuterVector
        } else {
            self.plan(tokens, n, k, Kind::Fp8(ScaleMode::Epilogue))?;
            ScaleMode::Epilogue
        };
        if let Err(e) = self.launch(dev, x, x_scale, w, w_scale, y, tokens, n, k, Kind::Fp8(mode)) {
            if mode == ScaleMode::Epilogue {
                return Err(e);
            }
            // The heuristic offered an outer-vector algorithm the library then refused: use the
            // epilogue from now on.
            tracing::warn!(error = %e, "cuBLASLt refused outer-vector FP8 scales; using the epilogue kernel");
            self.prefer_outer_vector = false;
            return self.matmul_then(dev, x, x_scale, w, w_scale, y, bias, tokens, n, k, rot);
        }
        if mode == ScaleMode::Epilogue {
            dev.scale_epilogue(y, tokens, n, x_scale, w_scale, bias, rot)?;
        }
        Ok(mode)
    }

    /// `y [tokens, n] = x [tokens, k] · w [n, k]ᵀ (+ bias)`, all bf16 (bias f32 `[n]`, or 0).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16(&mut self, dev: &GpuDevice, x: u64, w: u64, y: u64, bias: u64, tokens: usize, n: usize, k: usize) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        super::plan::check_bf16_gemm_shape(tokens, n, k).map_err(CudaError::Shape)?;
        self.plan(tokens, n, k, Kind::Bf16)?;
        self.launch(dev, x, 0, w, 0, y, tokens, n, k, Kind::Bf16)?;
        if bias != 0 {
            dev.add_bias(y, tokens, n, bias)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(&self, dev: &GpuDevice, x: u64, x_scale: u64, w: u64, w_scale: u64, y: u64, tokens: usize, n: usize, k: usize,
              kind: Kind) -> Result<()> {
        let fast = self.fast_accum && kind != Kind::Bf16;
        let plan = &self.plans[&(tokens, n, k, kind, fast)];
        if kind == Kind::Fp8(ScaleMode::OuterVector) {
            set_attr(plan.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale)?;
            set_attr(plan.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scale)?;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let stream = dev.stream.cu_stream() as sys::cudaStream_t;
        // SAFETY: descriptors from `plan`, device pointers sized by the caller for these shapes.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w as *const c_void,
                plan.layouts[0],
                x as *const c_void,
                plan.layouts[1],
                y as *const c_void,
                plan.layouts[2],
                y as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                self.workspace.ptr as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
        }
        .map_err(CudaError::blas(format!("matmul {tokens}x{n}x{k} ({kind:?})")))
    }

    /// Build (once) the descriptors and pick an algorithm for this shape and kind.
    fn plan(&mut self, tokens: usize, n: usize, k: usize, kind: Kind) -> Result<()> {
        // Fast accumulation is an FP8 switch; bf16 plans ignore it.
        let fast = self.fast_accum && kind != Kind::Bf16;
        let key = (tokens, n, k, kind, fast);
        if self.plans.contains_key(&key) {
            return Ok(());
        }
        // Token counts vary per batch: bound the cache rather than keep every shape seen.
        if self.plans.len() >= MAX_PLANS {
            for plan in self.plans.values() {
                destroy_plan(plan);
            }
            self.plans.clear();
        }
        use sys::cublasLtMatmulDescAttributes_t as A;
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
            .map_err(CudaError::blas("matmul descriptor"))?;
        let mut plan = Plan { desc, layouts: [std::ptr::null_mut(); 3], algo: unsafe { std::mem::zeroed() } };
        let result = (|| {
            set_attr(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &CUBLAS_OP_T)?;
            set_attr(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &CUBLAS_OP_N)?;
            if kind != Kind::Bf16 {
                set_attr(desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &i8::from(fast))?;
            }
            if kind == Kind::Fp8(ScaleMode::OuterVector) {
                let outer = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
                set_attr(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer)?;
                set_attr(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer)?;
            }
            let input = if kind == Kind::Bf16 { sys::cudaDataType::CUDA_R_16BF } else { sys::cudaDataType::CUDA_R_8F_E4M3 };
            plan.layouts[0] = lt::create_matrix_layout(input, k as u64, n as u64, k as i64).map_err(CudaError::blas("layout A"))?;
            plan.layouts[1] =
                lt::create_matrix_layout(input, k as u64, tokens as u64, k as i64).map_err(CudaError::blas("layout B"))?;
            plan.layouts[2] = lt::create_matrix_layout(sys::cudaDataType::CUDA_R_16BF, n as u64, tokens as u64, n as i64)
                .map_err(CudaError::blas("layout D"))?;
            let pref = lt::create_matmul_pref().map_err(CudaError::blas("preference"))?;
            let ws = WORKSPACE_BYTES;
            // SAFETY: valid preference descriptor; value is a usize as the attribute requires.
            let heuristic = unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&ws as *const usize).cast(),
                    std::mem::size_of::<usize>(),
                )
                .and_then(|_| {
                    lt::get_matmul_algo_heuristic(
                        self.handle,
                        desc,
                        plan.layouts[0],
                        plan.layouts[1],
                        plan.layouts[2],
                        plan.layouts[2],
                        pref,
                    )
                })
            };
            // SAFETY: created above, destroyed once.
            let _ = unsafe { lt::destroy_matmul_pref(pref) };
            plan.algo = heuristic.map_err(CudaError::blas(format!("no algorithm for {tokens}x{n}x{k} ({kind:?})")))?.algo;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.plans.insert(key, plan);
                Ok(())
            }
            Err(e) => {
                destroy_plan(&plan);
                Err(e)
            }
        }
    }
}

fn set_attr<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<()> {
    // SAFETY: `value` is the type the attribute expects (callers pass enum, i8 or pointer).
    unsafe { lt::set_matmul_desc_attribute(desc, attr, (value as *const T).cast(), std::mem::size_of::<T>()) }
        .map_err(CudaError::blas(format!("set {attr:?}")))
}

fn destroy_plan(plan: &Plan) {
    // SAFETY: each descriptor was created once by `plan` and is destroyed once; nulls skipped.
    unsafe {
        for l in plan.layouts.iter().filter(|l| !l.is_null()) {
            let _ = lt::destroy_matrix_layout(*l);
        }
        let _ = lt::destroy_matmul_desc(plan.desc);
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        for plan in self.plans.values() {
            destroy_plan(plan);
        }
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}
