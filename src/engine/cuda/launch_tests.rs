//! The launchers against the kernel sources: each `extern "C" __global__` signature in
//! `kernels/*.cu` (the `ATTENTION_KERNEL(D)` macro expanded) is parsed into parameter kinds,
//! and every launcher's arguments must match them one for one.

use std::collections::BTreeMap;

use super::*;

const CU: [&str; 6] = [
    include_str!("../../../kernels/norm.cu"),
    include_str!("../../../kernels/rotary.cu"),
    include_str!("../../../kernels/act.cu"),
    include_str!("../../../kernels/elementwise.cu"),
    include_str!("../../../kernels/attention.cu"),
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

/// One launch of every kernel, through the launchers the engine calls.
fn every_launch() -> Vec<Launch> {
    let l = &LIMITS;
    let mut all: Vec<Planned> = vec![
        norm(l, false, 1, 2, 3, 0, 1e-5, 4, 8192, 5, 6, 7),
        norm(l, true, 1, 2, 3, 4, 1e-5, 4, 8192, 5, 6, 7),
        rotary(l, 1, 16, 72, 128, 10240, 128, 2, 3),
        head_norm(l, 1, 16, 64, 8, 128, 10240, 2, 3, 1e-6),
        add(l, 1, 2, 1000),
        quant_rows(1, 4, 8192, 2, 3),
        scale_epilogue(l, 1, 4, 8192, 2, 3, 0),
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
        all.push(attention(l, 1, 2, 3, 10, 4, (64 + 16) * d, 64, 8, d, 0));
    }
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
    assert_eq!(table.len(), 20);
}

#[test]
fn the_signature_parser_sees_types_and_macros() {
    let src = clean(
        "extern \"C\" __global__ void k(const bf16* a /* [n] */, long long n, unsigned char v, // x\n float f) {}\n\
         #define K(D) extern \"C\" __global__ void __launch_bounds__(128) k_d##D##_x(int a, \\\n unsigned long long s) {}\n",
    );
    assert_eq!(signatures(&src), vec![("k".into(), vec![Kind::Ptr, Kind::I64, Kind::U8, Kind::F32]), ("k_d##D##_x".into(), vec![Kind::I32, Kind::U64])]);
    assert!(kernel_table()["attention_varlen_d128_bf16"].len() == 9);
}

#[test]
fn launches_are_clamped_and_bad_shapes_refused() {
    let l = &LIMITS;
    let a = attention(l, 1, 2, 3, 5000, 4, 10240, 64, 8, 128, 0).unwrap().unwrap();
    assert_eq!((a.grid, a.block, a.smem), ((5000, 64), 128, 49_152));
    assert!(attention(l, 1, 2, 3, 5, 4, 1, 64, 6, 128, 0).unwrap_err().contains("multiple"));
    assert!(attention(l, 1, 2, 3, 5, 4, 1, 64, 8, 96, 0).unwrap_err().contains("head_dim"));
    assert_eq!(attention(l, 1, 2, 3, 0, 4, 1, 64, 8, 128, 0), Ok(None));
    let small = Limits { max_blocks: 8, max_dynamic_smem: 48 * 1024 };
    assert!(norm(&small, false, 1, 0, 2, 0, 1e-5, 4, 32768, 0, 3, 4).unwrap_err().contains("shared memory"));
    let big = add(&small, 1, 2, 1 << 40).unwrap().unwrap();
    assert_eq!((big.grid, big.block), ((8, 1), 256));
    assert!(rotary(l, 1, 1 << 31, 1, 128, 128, 128, 2, 3).unwrap_err().contains("tokens"));
}
