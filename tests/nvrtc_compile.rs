//! Every kernel in `kernels/*.cu` compiles with NVRTC 13.0 to CUBIN for each architecture the
//! engine runs on (sm_80 A100, sm_86 A10/A40, sm_89 L4/L40S, sm_90a H100/H200; the FP8 kernels
//! only for sm_89 and later), with no GPU, within its register budget and without spills (from
//! ptxas's own report in NVRTC's log); the CUBIN cache and the prebuilt kernels (`scorestream
//! kernels`) round-trip. NVRTC and
//! the CUDA headers come from the `nvidia-cuda-nvrtc==13.0.*` and `nvidia-cuda-runtime==13.0.*`
//! wheels (found through `SCORESTREAM_NVRTC` / `SCORESTREAM_NVRTC_LIB` /
//! `SCORESTREAM_CUDA_INCLUDE`, or by asking `python3`). Without them the tests skip, unless `CI`
//! is set, where they fail.
#![cfg(feature = "cuda")]

mod missing_tool;

use std::path::PathBuf;

use scorestream::engine::cuda::compile::{cached_cubin, check_resources, compile_cubin, include_dirs, kernels_for, source_hash, FP8_KERNELS};
use scorestream::engine::cuda::precision::ARCHES;
use scorestream::engine::cuda::{nvrtc, prebuilt};

fn missing(what: &str) {
    missing_tool::skip_or_fail(
        what,
        "pip install \"nvidia-cuda-nvrtc==13.0.*\" \"nvidia-cuda-runtime==13.0.*\" \
         (or set SCORESTREAM_NVRTC_LIB and SCORESTREAM_CUDA_INCLUDE)",
    );
}

/// The CUDA headers, when NVRTC and the headers are both found (else the skip/fail policy).
fn toolchain() -> Option<Vec<PathBuf>> {
    if let Err(e) = nvrtc::global() {
        missing(&format!("libnvrtc not found ({e})"));
        return None;
    }
    let includes = include_dirs();
    if includes.is_empty() {
        missing("CUDA headers (cuda_fp8.h) not found");
        return None;
    }
    Some(includes)
}

#[test]
fn every_kernel_compiles_to_cubin_for_every_architecture_without_spills() {
    let Some(includes) = toolchain() else { return };
    for arch in ARCHES {
        let image = compile_cubin(arch, &includes).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(&image.cubin[..4], b"\x7fELF", "{arch}: NVRTC returned no CUBIN (ELF) image");
        let names = String::from_utf8_lossy(&image.cubin);
        let kernels = kernels_for(arch);
        for k in &kernels {
            assert!(names.contains(k), "{arch}: kernel {k} missing from the CUBIN");
        }
        // The FP8-only kernels exist exactly where FP8 tensor cores do (sm_89 and later).
        let fp8 = arch == "sm_89" || arch == "sm_90a";
        for k in FP8_KERNELS {
            assert_eq!(names.contains(k), fp8, "{arch}: {k}");
        }
        // ptxas's report, parsed from NVRTC's log: every kernel, ≤ 255 registers, no spills.
        assert_eq!(image.resources.len(), kernels.len(), "{arch}: ptxas reported {:?}\n{}", image.resources, image.log);
        if let Err(problems) = check_resources(arch, &image.resources) {
            panic!("{arch}: kernels over their resource budget:\n{problems}\n\nNVRTC log:\n{}", image.log);
        }
        for r in &image.resources {
            eprintln!("{arch:<7} {:<28} {:>3} registers, {} B stack", r.name, r.registers, r.stack_bytes);
        }
    }
}

#[test]
fn the_chosen_nvrtc_is_the_13_0_one_and_says_so() {
    if toolchain().is_none() {
        return;
    }
    let nv = nvrtc::global().expect("loaded above");
    assert_eq!(nv.version.0, 13, "NVRTC {:?} from {}", nv.version, nv.path.display());
    assert!(nv.path.is_file(), "{}", nv.path.display());
    // The library file this process mapped is the one chosen, not another copy found by name.
    let loaded = scorestream::engine::cuda::probe::loaded_cuda_libraries();
    let canon = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
    assert!(loaded.iter().any(|p| canon(p) == canon(&nv.path)), "{} not in {loaded:?}", nv.path.display());
}

#[test]
fn compiled_kernels_are_cached_by_source_hash() {
    if toolchain().is_none() {
        return;
    }
    let cache = tempfile::tempdir().expect("temp dir");
    cached_cubin("sm_90a", cache.path()).unwrap_or_else(|e| panic!("{e}"));
    let files: Vec<_> = std::fs::read_dir(cache.path()).expect("cache dir").filter_map(Result::ok).collect();
    assert_eq!(files.len(), 1, "one CUBIN per (arch, NVRTC version, source)");
    let name = files[0].file_name().to_string_lossy().into_owned();
    assert!(name.starts_with("kernels-sm_90a-") && name.ends_with(".cubin"), "{name}");
    // A second start reads the file instead of compiling: a planted marker survives.
    let path = files[0].path();
    let mut bytes = std::fs::read(&path).expect("cubin");
    bytes.extend_from_slice(b"cached");
    std::fs::write(&path, &bytes).expect("write");
    let (again, from) = cached_cubin("sm_90a", cache.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(again.ends_with(b"cached"));
    assert_eq!(from, path);
}

#[test]
fn the_kernels_command_writes_cubins_the_engine_accepts() {
    if toolchain().is_none() {
        return;
    }
    let out = tempfile::tempdir().expect("temp dir");
    // One architecture without FP8 and one with; `--arch all` (the default) writes all four.
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(["kernels", "--arch", "sm_80,sm_90a", "--out"])
        .arg(out.path())
        .output()
        .expect("run scorestream kernels");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("attention_varlen_d128_bf16") && stdout.contains("SCORESTREAM_PREBUILT_KERNELS="), "{stdout}");
    for arch in ["sm_80", "sm_90a"] {
        let (cubin, manifest) = prebuilt::load(arch, out.path()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(&cubin[..4], b"\x7fELF");
        assert_eq!(manifest.source_hash, source_hash());
        assert!(manifest.nvrtc.starts_with("13."), "{}", manifest.nvrtc);
        assert_eq!(manifest.kernels.len(), kernels_for(arch).len(), "{arch}");
    }
    // The prebuilt sm_80 kernels hold no FP8 kernel.
    let (_, ampere) = prebuilt::load("sm_80", out.path()).expect("sm_80");
    assert!(ampere.kernels.iter().all(|k| !FP8_KERNELS.contains(&k.name.as_str())), "{:?}", ampere.kernels);
}
