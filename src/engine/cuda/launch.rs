//! Every kernel launch as plain data, built without a GPU: which kernel, its arguments in the
//! order and types of the `extern "C"` signature in `kernels/*.cu`, and launch dimensions
//! clamped to what the hardware accepts. [`super::device::GpuDevice`] only pushes these
//! arguments and launches; the tests below parse the kernel sources and hold every launcher's
//! argument list to its kernel's parameter list, so the two cannot drift apart unnoticed.

use super::plan::{grid_stride, row_block};

/// One kernel argument, by value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A device pointer (0 for null).
    Ptr(u64),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
    U8(u8),
}

/// The C type class of a parameter, as the kernel sources spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ptr,
    I32,
    I64,
    U64,
    F32,
    U8,
}

impl Arg {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Ptr(_) => Kind::Ptr,
            Self::I32(_) => Kind::I32,
            Self::I64(_) => Kind::I64,
            Self::U64(_) => Kind::U64,
            Self::F32(_) => Kind::F32,
            Self::U8(_) => Kind::U8,
        }
    }
}

/// A launch: kernel, arguments, `(grid.x, grid.y)`, threads per block, dynamic shared memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub kernel: &'static str,
    pub args: Vec<Arg>,
    pub grid: (u32, u32),
    pub block: u32,
    pub smem: u32,
}

/// What the device allows: blocks of a grid-stride loop, dynamic shared memory per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_blocks: u32,
    pub max_dynamic_smem: u32,
}

/// A launch, nothing to do (`None`), or why the shape cannot run.
pub type Planned = Result<Option<Launch>, String>;

fn smem(limits: &Limits, bytes: usize, what: &str) -> Result<u32, String> {
    u32::try_from(bytes)
        .ok()
        .filter(|&b| b <= limits.max_dynamic_smem)
        .ok_or_else(|| format!("{what} needs {bytes} bytes of shared memory; the device allows {}", limits.max_dynamic_smem))
}

fn i32_of(v: usize, what: &str) -> Result<Arg, String> {
    i32::try_from(v).map(Arg::I32).map_err(|_| format!("{what} = {v} does not fit the kernel's int"))
}

fn one_per_row(kernel: &'static str, rows: usize, cols: usize, args: Vec<Arg>, smem: u32) -> Planned {
    let rows = u32::try_from(rows).map_err(|_| format!("{kernel}: {rows} rows exceed one grid"))?;
    Ok(Some(Launch { kernel, args, grid: (rows, 1), block: row_block(cols), smem }))
}

fn strided(kernel: &'static str, limits: &Limits, n: usize, args: Vec<Arg>) -> Planned {
    let (grid, block) = grid_stride(n, 256, limits.max_blocks);
    Ok(Some(Launch { kernel, args, grid: (grid, 1), block, smem: 0 }))
}

/// RMSNorm (`ln1p == false`; `b` unused) or LayerNorm1P of `rows` rows; see kernels/norm.cu.
#[allow(clippy::too_many_arguments)]
pub fn norm(limits: &Limits, ln1p: bool, x: u64, res: u64, w: u64, b: u64, eps: f32, rows: usize, hidden: usize, y: u64, q: u64, q_scale: u64) -> Planned {
    if rows == 0 {
        return Ok(None);
    }
    let smem = smem(limits, hidden * 2, "norm row")?;
    let mut args = vec![Arg::Ptr(x), Arg::Ptr(res), Arg::Ptr(w)];
    if ln1p {
        args.push(Arg::Ptr(b));
    }
    args.extend([Arg::F32(eps), i32_of(hidden, "hidden")?, Arg::Ptr(y), Arg::Ptr(q), Arg::Ptr(q_scale)]);
    one_per_row(if ln1p { "layernorm1p_bf16" } else { "rmsnorm_bf16" }, rows, hidden, args, smem)
}

/// Qwen3's per-head RMSNorm, in place on the first `q_heads + kv_heads` heads of each row:
/// one warp per head, eight per block.
#[allow(clippy::too_many_arguments)]
pub fn head_norm(limits: &Limits, x: u64, tokens: usize, q_heads: usize, kv_heads: usize, head_dim: usize, row_stride: usize, q_w: u64, k_w: u64, eps: f32) -> Planned {
    let rows = tokens * (q_heads + kv_heads);
    let args = vec![
        Arg::Ptr(x),
        i32_of(tokens, "tokens")?,
        i32_of(q_heads, "q_heads")?,
        i32_of(kv_heads, "kv_heads")?,
        i32_of(head_dim, "head_dim")?,
        i32_of(row_stride, "row_stride")?,
        Arg::Ptr(q_w),
        Arg::Ptr(k_w),
        Arg::F32(eps),
    ];
    strided("head_rmsnorm_bf16", limits, rows * 32, args)
}

/// In-place rotary on the first `heads` heads of each row.
#[allow(clippy::too_many_arguments)]
pub fn rotary(limits: &Limits, x: u64, tokens: usize, heads: usize, head_dim: usize, row_stride: usize, rot_dim: usize, positions: u64, inv_freq: u64) -> Planned {
    let n = tokens * heads * (rot_dim / 2);
    let args = vec![
        Arg::Ptr(x),
        i32_of(tokens, "tokens")?,
        i32_of(heads, "heads")?,
        i32_of(head_dim, "head_dim")?,
        i32_of(row_stride, "row_stride")?,
        i32_of(rot_dim, "rot_dim")?,
        Arg::Ptr(positions),
        Arg::Ptr(inv_freq),
    ];
    strided("rotary_bf16", limits, n, args)
}

/// The MLP activation `kernel` (`swiglu_quant_bf16`, `geglu_quant_bf16`, `relu2_quant_bf16`)
/// fused with per-token quantization.
#[allow(clippy::too_many_arguments)]
pub fn act_quant(limits: &Limits, kernel: &'static str, input: u64, rows: usize, inter: usize, y: u64, q: u64, q_scale: u64) -> Planned {
    if rows == 0 {
        return Ok(None);
    }
    let smem = smem(limits, inter * 2, "activation row")?;
    let args = vec![Arg::Ptr(input), i32_of(inter, "inter")?, Arg::Ptr(y), Arg::Ptr(q), Arg::Ptr(q_scale)];
    one_per_row(kernel, rows, inter, args, smem)
}

/// `a = bf16(a + b)` over `n` elements.
pub fn add(limits: &Limits, a: u64, b: u64, n: usize) -> Planned {
    strided("add_bf16", limits, n, vec![Arg::I64(n as i64), Arg::Ptr(a), Arg::Ptr(b)])
}

/// Per-token E4M3 quantization of `x: [rows, cols]`.
pub fn quant_rows(x: u64, rows: usize, cols: usize, q: u64, q_scale: u64) -> Planned {
    if rows == 0 {
        return Ok(None);
    }
    let args = vec![Arg::Ptr(x), i32_of(cols, "cols")?, Arg::Ptr(q), Arg::Ptr(q_scale)];
    one_per_row("quant_rows_bf16", rows, cols, args, 0)
}

/// `y = bf16(bf16(y · rs · cs) + bias)`: the FP8 GEMM's scales when cuBLASLt cannot apply them.
pub fn scale_epilogue(limits: &Limits, y: u64, rows: usize, cols: usize, rs: u64, cs: u64, bias: u64) -> Planned {
    let args = vec![Arg::Ptr(y), Arg::I64(rows as i64), i32_of(cols, "cols")?, Arg::Ptr(rs), Arg::Ptr(cs), Arg::Ptr(bias)];
    strided("scale_epilogue_bf16", limits, rows * cols, args)
}

/// `y = bf16(y + bf16(bias))` over `[rows, cols]`: the bias of a bf16 GEMM.
pub fn add_bias(limits: &Limits, y: u64, rows: usize, cols: usize, bias: u64) -> Planned {
    let args = vec![Arg::Ptr(y), Arg::I64(rows as i64), i32_of(cols, "cols")?, Arg::Ptr(bias)];
    strided("add_bias_bf16", limits, rows * cols, args)
}

/// `dst[m] = src[idx[m]]`.
pub fn gather_rows(limits: &Limits, src: u64, src_rows: usize, cols: usize, idx: u64, rows: usize, dst: u64) -> Planned {
    let args = vec![Arg::Ptr(src), Arg::I64(src_rows as i64), i32_of(cols, "cols")?, Arg::Ptr(idx), i32_of(rows, "rows")?, Arg::Ptr(dst)];
    strided("gather_rows_bf16", limits, rows * cols, args)
}

/// Dynamic shared memory of the attention kernel for `head_dim` (mirrors kernels/attention.cu:
/// Q, K and V tiles of 64 rows in bf16).
pub fn attention_smem(head_dim: usize) -> usize {
    3 * 64 * head_dim * 2
}

/// The attention kernel for `head_dim`.
pub fn attention_kernel(head_dim: usize) -> Result<&'static str, String> {
    Ok(match head_dim {
        16 => "attention_varlen_d16_bf16",
        32 => "attention_varlen_d32_bf16",
        64 => "attention_varlen_d64_bf16",
        128 => "attention_varlen_d128_bf16",
        192 => "attention_varlen_d192_bf16",
        d => return Err(format!("attention supports head_dim 16, 32, 64, 128 and 192, not {d}")),
    })
}

/// Causal varlen attention; `tiles` from [`super::plan::attention_tiles`].
#[allow(clippy::too_many_arguments)]
pub fn attention(limits: &Limits, qkv: u64, out: u64, tiles: u64, num_tiles: usize, cu_seqlens: u64, qkv_stride: usize, heads: usize, kv_heads: usize, head_dim: usize, window: usize) -> Planned {
    if num_tiles == 0 {
        return Ok(None);
    }
    let kernel = attention_kernel(head_dim)?;
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(format!("{heads} heads are not a multiple of {kv_heads} kv heads"));
    }
    let smem = smem(limits, attention_smem(head_dim), "attention")?;
    let heads_y = u32::try_from(heads).ok().filter(|&h| h <= 65_535).ok_or_else(|| format!("{heads} heads exceed grid.y"))?;
    let tiles_x = u32::try_from(num_tiles).map_err(|_| format!("{num_tiles} attention tiles exceed one grid"))?;
    let args = vec![
        Arg::Ptr(qkv),
        Arg::Ptr(out),
        Arg::Ptr(tiles),
        Arg::Ptr(cu_seqlens),
        i32_of(qkv_stride, "qkv_stride")?,
        i32_of(heads, "heads")?,
        i32_of(kv_heads, "kv_heads")?,
        Arg::F32(1.0 / (head_dim as f32).sqrt()),
        i32_of(window, "window")?,
    ];
    Ok(Some(Launch { kernel, args, grid: (tiles_x, heads_y), block: 128, smem }))
}

/// Fill `n` elements with uniform values in [-amp, amp): bf16 (`fp8 == false`) or E4M3.
pub fn fill_uniform(limits: &Limits, fp8: bool, ptr: u64, n: usize, seed: u64, amp: f32) -> Planned {
    let kernel = if fp8 { "fill_uniform_e4m3" } else { "fill_uniform_bf16" };
    strided(kernel, limits, n, vec![Arg::I64(n as i64), Arg::Ptr(ptr), Arg::U64(seed), Arg::F32(amp)])
}

/// Set each of `n` bytes to `value`.
pub fn fill_bytes(limits: &Limits, ptr: u64, n: usize, value: u8) -> Planned {
    strided("fill_bytes", limits, n, vec![Arg::I64(n as i64), Arg::Ptr(ptr), Arg::U8(value)])
}

#[cfg(test)]
#[path = "launch_tests.rs"]
mod tests;
