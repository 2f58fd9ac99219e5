//! The launchers against the kernel sources: each `extern "C" __global__` signature in
//! `kernels/*.cu` (the `ATTENTION_KERNEL(D)` macro expanded) is parsed into parameter kinds,
//! and every launcher's arguments must match them one for one.

use std::collections::BTreeMap;

use super::*;

const CU: [&str; 7] = [
    include_str!("../../../kernels/norm.cu"),
    include_str!("../../../kernels/rotary.cu"),
    include_str!("../../../kernels/act.cu"),
    include_str!("../../../kernels/elementwise.cu"),
    include_str!("../../../kernels/attention.cu"),
    include_str!("../../../kernels/attention_v2.cu"),
    include_str!("../../../kernels/fp8.cu"),
];

/// The source without comments, with backslash-continued lines joined.
fn clean(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else {
            let c = rest.chars().next().unwrap_or_default();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out.replace("\\\n", " ")
}

fn kind_of(param: &str) -> Kind {
    if param.contains('*') {
        return Kind::Ptr;
    }
    let words: Vec<&str> = param.split_whitespace().filter(|w| *w != "const").collect();
    let ty = words[..words.len() - 1].join(" ");
    match ty.as_str() {
        "int" => Kind::I32,
        "long long" => Kind::I64,
        "unsigned long long" => Kind::U64,
        "float" => Kind::F32,
        "unsigned char" => Kind::U8,
        other => panic!("parameter type {other:?} ({param}) has no Kind: extend Kind and the launchers"),
    }
}

/// `(name, parameter kinds)` of every `extern "C" __global__` function in `src`.
fn signatures(src: &str) -> Vec<(String, Vec<Kind>)> {
    let mut out = Vec::new();
    for chunk in src.split("extern \"C\" __global__").skip(1) {
        let mut head = chunk.trim_start().strip_prefix("void").expect("kernels return void").trim_start();
        if let Some(r) = head.strip_prefix("__launch_bounds__(") {
            head = &r[r.find(')').expect("closed __launch_bounds__") + 1..];
        }
        let open = head.find('(').expect("parameter list");
        let close = head.find(')').expect("closed parameter list");
        let name = head[..open].trim().to_owned();
        let params = head[open + 1..close].split(',').map(str::trim).filter(|p| !p.is_empty()).map(kind_of).collect();
        out.push((name, params));
    }
    out
}

/// Every kernel in the sources, `ATTENTION_KERNEL(D)` expanded for each `D` it is used with.
fn kernel_table() -> BTreeMap<String, Vec<Kind>> {
    let mut table = BTreeMap::new();
    for src in CU.map(clean) {
        let mut plain = String::new();
        let mut macros: Vec<(String, String)> = Vec::new(); // (name, body) of `#define NAME(D) body`
        for line in src.lines() {
            if let Some(def) = line.trim_start().strip_prefix("#define ") {
                if let Some((name, body)) = def.split_once("(D)") {
                    macros.push((name.trim().to_owned(), body.to_owned()));
                    continue;
                }
            }
            let used = macros.iter().find_map(|(name, body)| {
                let arg = line.trim().strip_prefix(name.as_str())?.strip_prefix('(')?.strip_suffix(')')?;
                Some(body.replace("##D##", arg))
            });
            plain.push_str(&used.unwrap_or_else(|| line.to_owned()));
            plain.push('\n');
        }
        for (name, params) in signatures(&plain) {
            assert!(table.insert(name.clone(), params).is_none(), "{name} is defined twice");
        }
    }
    table
}

const LIMITS: Limits = Limits { max_blocks: 132 * 16, max_dynamic_smem: 227 * 1024 };

/// Every head size of the supported families (Llama 64/128, Phi/Falcon-class 80/96,
/// Nemotron-4 192, Gemma 256) and of the fixtures (16, 24, 32).
const V2_HEAD_DIMS: [usize; 9] = [16, 24, 32, 64, 80, 96, 128, 192, 256];

/// An attention call with placeholder pointers.
fn attn(num_tiles: usize, heads: usize, kv_heads: usize, head_dim: usize, window: usize) -> AttnArgs {
    let qkv_stride = (heads + 2 * kv_heads) * head_dim;
    AttnArgs { qkv: 1, out: 2, tiles: 3, num_tiles, cu_seqlens: 4, prefix_of: 5, qkv_stride, heads, kv_heads, head_dim, window, quant: None }
}

/// One launch of every kernel, through the launchers the engine calls.
fn every_launch() -> Vec<Launch> {
    let l = &LIMITS;
    let mut all: Vec<Planned> = vec![
        norm(l, false, 1, 2, 3, 0, 1e-5, 4, 8192, 5, 6, 7),
        norm(l, true, 1, 2, 3, 4, 1e-5, 4, 8192, 5, 6, 7),
        rotary(l, 1, 16, 72, 128, 10240, 128, 2, 3),
        head_norm(l, 1, 16, 64, 8, 128, 10240, 2, 3, 1e-6),
        head_norm_rotary(l, 1, 16, 64, 8, 128, 10240, 2, 3, 1e-6, 64, 4, 5),
        add(l, 1, 2, 1000),
        quant_rows(1, 4, 8192, 2, 3),
        scale_epilogue(l, 1, 4, 8192, 2, 3, 0, None),
        scale_epilogue(l, 1, 4, 10240, 2, 3, 4, Some(&Rotary { heads: 72, head_dim: 128, rot_dim: 64, positions: 5, inv_freq: 6 })),
        add_bias(l, 1, 4, 8192, 2),
        gather_rows(l, 1, 100, 8192, 2, 4, 3),
        fill_uniform(l, false, 1, 1000, 7, 1.0),
        fill_uniform(l, true, 1, 1000, 7, 448.0),
        fill_bytes(l, 1, 1000, 0xFF),
    ];
    for k in ["swiglu_quant_bf16", "geglu_quant_bf16", "relu2_quant_bf16"] {
        all.push(act_quant(l, k, 1, 4, 28672, 2, 3, 4));
    }
    for d in [16, 32, 64, 128, 192] {
        all.push(attention(l, AttentionKernel::V1, &attn(10, 64, 8, d, 0)));
    }
    for d in V2_HEAD_DIMS {
        all.push(attention(l, AttentionKernel::V2, &attn(10, 64, 8, d, 0)));
    }
    let quant = Some(AttnQuant { q: 6, q_scale: 7, amax: 8, arrived: 9 });
    all.push(attention(l, AttentionKernel::V2, &AttnArgs { quant, ..attn(10, 64, 8, 128, 0) }));
    all.into_iter().map(|p| p.expect("plannable").expect("work to do")).collect()
}

#[test]
fn every_launcher_passes_its_kernels_parameter_list() {
    let table = kernel_table();
    let launches = every_launch();
    for l in &launches {
        let params = table.get(l.kernel).unwrap_or_else(|| panic!("{} is launched but not defined in kernels/*.cu", l.kernel));
        let passed: Vec<Kind> = l.args.iter().map(Arg::kind).collect();
        assert_eq!(&passed, params, "{}: launcher arguments vs the kernel's parameters", l.kernel);
    }
    let launched: std::collections::BTreeSet<&str> = launches.iter().map(|l| l.kernel).collect();
    for name in table.keys() {
        assert!(launched.contains(name.as_str()), "{name} has no launcher");
    }
    assert_eq!(table.len(), 30);
}

#[test]
fn the_signature_parser_sees_types_and_macros() {
    let src = clean(
        "extern \"C\" __global__ void k(const bf16* a /* [n] */, long long n, unsigned char v, // x\n float f) {}\n\
         #define K(D) extern \"C\" __global__ void __launch_bounds__(128) k_d##D##_x(int a, \\\n unsigned long long s) {}\n",
    );
    assert_eq!(signatures(&src), vec![("k".into(), vec![Kind::Ptr, Kind::I64, Kind::U8, Kind::F32]), ("k_d##D##_x".into(), vec![Kind::I32, Kind::U64])]);
    assert!(kernel_table()["attention_varlen_d128_bf16"].len() == 10);
    // v2 takes v1's parameters, then the fused quantization's four pointers.
    let v2 = &kernel_table()["attention_v2_d24_bf16"];
    assert_eq!(v2[..10], kernel_table()["attention_varlen_d128_bf16"][..]);
    assert_eq!(v2[10..], [Kind::Ptr; 4]);
}

#[test]
fn launches_are_clamped_and_bad_shapes_refused() {
    let l = &LIMITS;
    let a = attention(l, AttentionKernel::V1, &attn(5000, 64, 8, 128, 0)).unwrap().unwrap();
    assert_eq!((a.grid, a.block, a.smem), ((5000, 64), 128, 49_152));
    assert!(attention(l, AttentionKernel::V1, &attn(5, 64, 6, 128, 0)).unwrap_err().contains("multiple"));
    assert!(attention(l, AttentionKernel::V1, &attn(5, 64, 8, 96, 0)).unwrap_err().contains("head_dim"));
    assert!(attention(l, AttentionKernel::V2, &attn(5, 64, 8, 40, 0)).unwrap_err().contains("head_dim"));
    assert_eq!(attention(l, AttentionKernel::V1, &attn(0, 64, 8, 128, 0)), Ok(None));
    // The fused FP8 output: v2 passes its buffers (null without it); v1 refuses it.
    let quant = Some(AttnQuant { q: 6, q_scale: 7, amax: 8, arrived: 9 });
    let fused = attention(l, AttentionKernel::V2, &AttnArgs { quant, ..attn(5, 64, 8, 128, 0) }).unwrap().unwrap();
    assert_eq!(fused.args[10..], [Arg::Ptr(6), Arg::Ptr(7), Arg::Ptr(8), Arg::Ptr(9)]);
    // Tile-major: blocks of a tile along x (64 for 64/8 heads), tiles along y.
    assert_eq!(fused.grid, (64, 5));
    let many = AttnArgs { quant, ..attn(70_000, 64, 8, 128, 0) };
    assert!(attention(l, AttentionKernel::V2, &many).unwrap_err().contains("grid.y of 70000"));
    let plain = attention(l, AttentionKernel::V2, &attn(5, 64, 8, 128, 0)).unwrap().unwrap();
    assert_eq!((plain.args[10..].to_vec(), plain.grid), (vec![Arg::Ptr(0); 4], (5, 64)));
    assert!(attention(l, AttentionKernel::V1, &AttnArgs { quant, ..attn(5, 64, 8, 128, 0) }).unwrap_err().contains("v1"));
    let unaligned = AttnArgs { qkv_stride: 10241, ..attn(5, 64, 8, 128, 0) };
    assert!(attention(l, AttentionKernel::V2, &unaligned).unwrap_err().contains("16-byte"));
    let small = Limits { max_blocks: 8, max_dynamic_smem: 48 * 1024 };
    assert!(norm(&small, false, 1, 0, 2, 0, 1e-5, 4, 32768, 0, 3, 4).unwrap_err().contains("shared memory"));
    let big = add(&small, 1, 2, 1 << 40).unwrap().unwrap();
    assert_eq!((big.grid, big.block), ((8, 1), 256));
    assert!(rotary(l, 1, 1 << 31, 1, 128, 128, 128, 2, 3).unwrap_err().contains("tokens"));
    assert!(head_norm_rotary(l, 1, 16, 64, 8, 128, 10240, 2, 3, 1e-6, 130, 4, 5).unwrap_err().contains("rotary"));
    // The fused epilogue's rotary: its heads inside the row, an even rot_dim within a head.
    let rot = Rotary { heads: 72, head_dim: 128, rot_dim: 128, positions: 5, inv_freq: 6 };
    assert!(scale_epilogue(l, 1, 4, 10240, 2, 3, 0, Some(&rot)).is_ok());
    assert!(scale_epilogue(l, 1, 4, 9000, 2, 3, 0, Some(&rot)).unwrap_err().contains("rows of 9000"));
    assert!(scale_epilogue(l, 1, 4, 10240, 2, 3, 0, Some(&Rotary { rot_dim: 63, ..rot })).unwrap_err().contains("rotary"));
    let plain = scale_epilogue(l, 1, 4, 10240, 2, 3, 0, None).unwrap().unwrap();
    assert_eq!(plain.args[6..], [Arg::I32(0), Arg::I32(1), Arg::I32(0), Arg::Ptr(0), Arg::Ptr(0)], "no rotary: zero heads");
}

/// Most dynamic shared memory per block (opt-in) of each architecture the kernels are built
/// for: A100 163 KB, A10/A40/L4/L40S 99 KB, H100/H200 227 KB.
const ARCH_SMEM: [(&str, u32); 4] = [("sm_80", 163 * 1024), ("sm_86", 99 * 1024), ("sm_89", 99 * 1024), ("sm_90a", 227 * 1024)];

#[test]
fn both_attention_kernels_fit_every_architectures_shared_memory() {
    for (arch, max) in ARCH_SMEM {
        let l = Limits { max_blocks: 1 << 16, max_dynamic_smem: max };
        for d in V2_HEAD_DIMS {
            let a = attention(&l, AttentionKernel::V2, &attn(7, 32, 8, d, 0)).unwrap_or_else(|e| panic!("{arch} d{d}: {e}")).expect("work");
            assert_eq!((a.kernel, a.block), (attention_kernel(AttentionKernel::V2, d).expect("kernel"), 128));
            assert!(a.smem <= max, "{arch} d{d}: {} bytes", a.smem);
        }
        for d in [16, 32, 64, 128, 192] {
            assert!(attention(&l, AttentionKernel::V1, &attn(7, 32, 8, d, 0)).is_ok(), "{arch} v1 d{d}");
        }
    }
    // Key tiles of 64 up to a padded head size of 128, 32 above; rows padded to an odd number
    // of 16-byte chunks unless a multiple of 8 chunks (swizzled).
    assert_eq!(attention_v2_smem(128), (64 + 4 * 64) * 16 * 16);
    assert_eq!(attention_v2_smem(256), (64 + 4 * 32) * 32 * 16);
    assert_eq!(attention_v2_smem(24), (64 + 4 * 64) * 5 * 16);
    assert_eq!(attention_v2_smem(80), (64 + 4 * 64) * 11 * 16);
    assert_eq!((attention_v2_key_tile(128), attention_v2_key_tile(192)), (64, 32));
}

/// kernels/attention_v2.cu's block geometry, mirrored: the (token, head) rows block `y` of a
/// 64-token tile starting at `q0` of a `len`-token segment computes.
fn v2_rows(heads: usize, kv_heads: usize, y: usize, q0: usize, len: usize) -> Vec<(usize, usize)> {
    let group = heads / kv_heads;
    let g = group.min(64);
    let hc = group.div_ceil(g);
    let qt = 64 / g;
    let s = 64usize.div_ceil(qt);
    let (kvh, chunk, sub) = (y / (hc * s), y % (hc * s) / s, y % s);
    let qb = q0 + sub * qt;
    let qb_end = (qb + qt).min((q0 + 64).min(len));
    if qb >= qb_end {
        return Vec::new();
    }
    let rows_valid = if hc == 1 { (qb_end - qb) * g } else { g.min(group - chunk * g) };
    assert!(rows_valid <= 64);
    (0..rows_valid).map(|r| (qb + r / g, kvh * group + chunk * g + r % g)).collect()
}

#[test]
fn v2_blocks_cover_every_query_of_every_head_once() {
    for (heads, kv) in [(64, 8), (14, 2), (32, 32), (128, 1), (96, 1), (6, 2), (28, 4)] {
        for len in [1usize, 63, 64, 100, 200] {
            let mut seen = vec![0u32; len * heads];
            let grid_y = attention_v2_grid_y(heads, kv);
            for q0 in (0..len).step_by(64) {
                for y in 0..grid_y {
                    // The CPU emulation of the fused FP8 output walks the same rows.
                    assert_eq!(crate::engine::reference::attn_quant::v2_block_rows(heads, kv, y, q0, len), v2_rows(heads, kv, y, q0, len));
                    for (tok, head) in v2_rows(heads, kv, y, q0, len) {
                        assert!(tok < len && head < heads && tok >= q0 && tok < q0 + 64, "{heads}/{kv} len {len}: ({tok}, {head})");
                        // A row's head reads its own group's K/V head.
                        assert_eq!(head / (heads / kv), y / (grid_y / kv), "{heads}/{kv}");
                        seen[tok * heads + head] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{heads}/{kv} len {len}");
        }
    }
    assert_eq!(attention_v2_grid_y(64, 8), 64);
    assert_eq!(attention_v2_grid_y(128, 1), 128);
}

/// kernels/attention_v2.cu's `Av2Tile<C>::at`, mirrored: the 16-byte chunk slot of (row, chunk).
fn tile_at(c: usize, row: usize, chunk: usize) -> usize {
    if c % 8 == 0 { row * c + (chunk ^ (row & 7)) } else { row * (c + 1) + chunk }
}

#[test]
fn v2_shared_memory_layout_is_a_bijection_and_ldmatrix_reads_are_conflict_free() {
    for d in V2_HEAD_DIMS {
        let c = d.div_ceil(16) * 16 / 8;
        let stride = if c % 8 == 0 { c } else { c + 1 };
        let mut used = std::collections::BTreeSet::new();
        for row in 0..64 {
            for chunk in 0..c {
                let at = tile_at(c, row, chunk);
                assert!(at >= row * stride && at < (row + 1) * stride, "d{d}: ({row}, {chunk}) leaves its row");
                assert!(used.insert(at), "d{d}: ({row}, {chunk}) shares a slot");
            }
        }
        // One ldmatrix phase: 8 consecutive rows (from a multiple of 8), one logical chunk,
        // 16 bytes each; 8 different bank groups (slot mod 8) means no conflict.
        for row0 in (0..64).step_by(8) {
            for chunk in 0..c {
                let banks: std::collections::BTreeSet<usize> = (row0..row0 + 8).map(|r| tile_at(c, r, chunk) % 8).collect();
                assert_eq!(banks.len(), 8, "d{d}: rows {row0}.. chunk {chunk}");
            }
        }
    }
}
