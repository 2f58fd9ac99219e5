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

/// [`head_norm`] then [`rotary`] (rot_dim of each head) over the same q and k heads, fused.
#[allow(clippy::too_many_arguments)]
pub fn head_norm_rotary(limits: &Limits, x: u64, tokens: usize, q_heads: usize, kv_heads: usize, head_dim: usize, row_stride: usize, q_w: u64, k_w: u64, eps: f32,
                        rot_dim: usize, positions: u64, inv_freq: u64) -> Planned {
    let Some(mut l) = head_norm(limits, x, tokens, q_heads, kv_heads, head_dim, row_stride, q_w, k_w, eps)? else { return Ok(None) };
    if rot_dim > head_dim || rot_dim % 2 != 0 {
        return Err(format!("rotary over {rot_dim} of {head_dim} dims"));
    }
    l.kernel = "head_rmsnorm_rotary_bf16";
    l.args.extend([i32_of(rot_dim, "rot_dim")?, Arg::Ptr(positions), Arg::Ptr(inv_freq)]);
    Ok(Some(l))
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

/// Rotary over the first `heads` heads of each row (rotate_half layout, `rot_dim` of each
/// head's `head_dim` dims), as [`rotary`] applies it: what a fused epilogue rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotary {
    pub heads: usize,
    pub head_dim: usize,
    pub rot_dim: usize,
    /// `[rows]` u32.
    pub positions: u64,
    /// `[rot_dim / 2]` f32.
    pub inv_freq: u64,
}

/// `y = bf16(bf16(y · rs · cs) + bias)`: the FP8 GEMM's scales when cuBLASLt cannot apply them;
/// with `rot`, rotary on its heads in the same pass (equal to [`rotary`] afterwards).
#[allow(clippy::too_many_arguments)]
pub fn scale_epilogue(limits: &Limits, y: u64, rows: usize, cols: usize, rs: u64, cs: u64, bias: u64, rot: Option<&Rotary>) -> Planned {
    let mut args = vec![Arg::Ptr(y), Arg::I64(rows as i64), i32_of(cols, "cols")?, Arg::Ptr(rs), Arg::Ptr(cs), Arg::Ptr(bias)];
    match rot {
        Some(r) => {
            if r.rot_dim > r.head_dim || r.rot_dim % 2 != 0 || r.heads * r.head_dim > cols {
                return Err(format!("rotary over {} of {} dims of {} heads in rows of {cols}", r.rot_dim, r.head_dim, r.heads));
            }
            args.extend([i32_of(r.heads, "heads")?, i32_of(r.head_dim, "head_dim")?, i32_of(r.rot_dim, "rot_dim")?, Arg::Ptr(r.positions), Arg::Ptr(r.inv_freq)]);
        }
        None => args.extend([Arg::I32(0), Arg::I32(1), Arg::I32(0), Arg::Ptr(0), Arg::Ptr(0)]),
    }
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

pub use crate::model::options::AttentionKernel;

/// One attention call over a packed batch: device buffers and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnArgs {
    /// `[tokens, qkv_stride]` bf16: q heads, k heads, v heads of each token.
    pub qkv: u64,
    /// `[tokens, heads · head_dim]` bf16.
    pub out: u64,
    /// `[num_tiles, 2]` i32 from [`super::plan::attention_tiles`].
    pub tiles: u64,
    pub num_tiles: usize,
    /// `[segments + 1]` i32.
    pub cu_seqlens: u64,
    /// `[segments]` i32: the shared-prefix segment each segment continues, or −1; 0 (null):
    /// no segment continues one.
    pub prefix_of: u64,
    pub qkv_stride: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window in tokens, 0 for none.
    pub window: usize,
    /// Also write the output quantized per token (attention v2 only).
    pub quant: Option<AttnQuant>,
}

/// The attention output's per-token FP8 quantization, fused into attention v2: where it goes
/// and the kernel's bookkeeping, which must be zero at launch and is left zero (the workspace
/// zeroes it once, [`super::plan::BufferPlan::attn_amax`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnQuant {
    /// `[tokens, heads · head_dim]` E4M3.
    pub q: u64,
    /// `[tokens]` f32.
    pub q_scale: u64,
    /// `[tokens]` u32: each token's |O| max (f32 bits) while its tile is in flight.
    pub amax: u64,
    /// `[num_tiles]` u32: the blocks of each tile that are done.
    pub arrived: u64,
}

/// Dynamic shared memory of `attention_varlen_d*_bf16` for `head_dim` (mirrors
/// kernels/attention.cu: Q, K and V tiles of 64 rows in bf16).
pub fn attention_smem(head_dim: usize) -> usize {
    3 * 64 * head_dim * 2
}

/// The head size `attention_v2_d*_bf16` computes with (a multiple of 16: the mma's k step).
fn v2_padded(head_dim: usize) -> usize {
    head_dim.div_ceil(16) * 16
}

/// Keys per tile of `attention_v2_d*_bf16` (kernels/attention_v2.cu): 64 up to a padded head
/// size of 128, 32 above. The CPU reference takes the same tiles.
pub fn attention_v2_key_tile(head_dim: usize) -> usize {
    if v2_padded(head_dim) <= 128 { 64 } else { 32 }
}

/// Dynamic shared memory of `attention_v2_d*_bf16`: 64 Q rows and two buffers each of K and V
/// tiles, rows of 16-byte chunks, swizzled when a row holds a multiple of 8 chunks, else padded
/// by one.
pub fn attention_v2_smem(head_dim: usize) -> usize {
    let chunks = v2_padded(head_dim) / 8;
    let stride = if chunks % 8 == 0 { chunks } else { chunks + 1 };
    (64 + 4 * attention_v2_key_tile(head_dim)) * stride * 16
}

/// `grid.y` of `attention_v2_d*_bf16`: per KV head, `chunks` of up to 64 query heads of its
/// group times `subtiles` of `64 / G` tokens of each 64-token schedule tile (mirrors the
/// kernel's `G`, `hc` and `S`).
pub fn attention_v2_grid_y(heads: usize, kv_heads: usize) -> usize {
    let group = heads / kv_heads;
    let g = group.min(64);
    let per_block = 64 / g;
    kv_heads * group.div_ceil(g) * 64usize.div_ceil(per_block)
}

/// The attention kernel of `kernel` for `head_dim`.
pub fn attention_kernel(kernel: AttentionKernel, head_dim: usize) -> Result<&'static str, String> {
    Ok(match (kernel, head_dim) {
        (AttentionKernel::V1, 16) => "attention_varlen_d16_bf16",
        (AttentionKernel::V1, 32) => "attention_varlen_d32_bf16",
        (AttentionKernel::V1, 64) => "attention_varlen_d64_bf16",
        (AttentionKernel::V1, 128) => "attention_varlen_d128_bf16",
        (AttentionKernel::V1, 192) => "attention_varlen_d192_bf16",
        (AttentionKernel::V1, d) => return Err(format!("attention v1 supports head_dim 16, 32, 64, 128 and 192, not {d}")),
        (AttentionKernel::V2, 16) => "attention_v2_d16_bf16",
        (AttentionKernel::V2, 24) => "attention_v2_d24_bf16",
        (AttentionKernel::V2, 32) => "attention_v2_d32_bf16",
        (AttentionKernel::V2, 64) => "attention_v2_d64_bf16",
        (AttentionKernel::V2, 80) => "attention_v2_d80_bf16",
        (AttentionKernel::V2, 96) => "attention_v2_d96_bf16",
        (AttentionKernel::V2, 128) => "attention_v2_d128_bf16",
        (AttentionKernel::V2, 192) => "attention_v2_d192_bf16",
        (AttentionKernel::V2, 256) => "attention_v2_d256_bf16",
        (AttentionKernel::V2, d) => {
            return Err(format!("attention v2 supports head_dim 16, 24, 32, 64, 80, 96, 128, 192 and 256, not {d}"))
        }
    })
}

/// Causal varlen attention (tree layout when `a.prefix_of` is set) with `kernel`; grid
/// `(tiles, blocks per tile)`, or `(blocks per tile, tiles)` with v2's fused quantization.
pub fn attention(limits: &Limits, kernel: AttentionKernel, a: &AttnArgs) -> Planned {
    if a.num_tiles == 0 {
        return Ok(None);
    }
    let name = attention_kernel(kernel, a.head_dim)?;
    if a.kv_heads == 0 || a.heads % a.kv_heads != 0 {
        return Err(format!("{} heads are not a multiple of {} kv heads", a.heads, a.kv_heads));
    }
    // 16-byte loads of every head's row.
    if a.qkv_stride % 8 != 0 || a.qkv_stride < (a.heads + 2 * a.kv_heads) * a.head_dim {
        return Err(format!("qkv rows of {} elements do not hold {} heads of {} in 16-byte steps", a.qkv_stride, a.heads + 2 * a.kv_heads, a.head_dim));
    }
    if kernel == AttentionKernel::V1 && a.quant.is_some() {
        return Err("attention v1 does not quantize its output (quant_rows_bf16 does)".into());
    }
    let (bytes, grid_y, what) = match kernel {
        AttentionKernel::V1 => (attention_smem(a.head_dim), a.heads, "attention"),
        AttentionKernel::V2 => (attention_v2_smem(a.head_dim), attention_v2_grid_y(a.heads, a.kv_heads), "attention v2"),
    };
    let smem = smem(limits, bytes, what)?;
    // Tile-major with the fused quantization (a tile's blocks close together, so its last
    // block reads O back from L2): blocks per tile along x, tiles along y.
    let (per_tile, tiles) = (grid_y, a.num_tiles);
    let (gx, gy) = if a.quant.is_some() { (per_tile, tiles) } else { (tiles, per_tile) };
    let grid_y = u32::try_from(gy).ok().filter(|&h| h <= 65_535).ok_or_else(|| format!("{what}: grid.y of {gy} exceeds 65535"))?;
    let tiles_x = u32::try_from(gx).map_err(|_| format!("{what}: grid.x of {gx} exceeds one grid"))?;
    let mut args = vec![
        Arg::Ptr(a.qkv),
        Arg::Ptr(a.out),
        Arg::Ptr(a.tiles),
        Arg::Ptr(a.cu_seqlens),
        Arg::Ptr(a.prefix_of),
        i32_of(a.qkv_stride, "qkv_stride")?,
        i32_of(a.heads, "heads")?,
        i32_of(a.kv_heads, "kv_heads")?,
        Arg::F32(1.0 / (a.head_dim as f32).sqrt()),
        i32_of(a.window, "window")?,
    ];
    if kernel == AttentionKernel::V2 {
        let qz = a.quant.unwrap_or(AttnQuant { q: 0, q_scale: 0, amax: 0, arrived: 0 });
        args.extend([Arg::Ptr(qz.q), Arg::Ptr(qz.q_scale), Arg::Ptr(qz.amax), Arg::Ptr(qz.arrived)]);
    }
    Ok(Some(Launch { kernel: name, args, grid: (tiles_x, grid_y), block: 128, smem }))
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
