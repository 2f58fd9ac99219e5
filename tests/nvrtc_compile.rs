//! Every kernel in `kernels/*.cu` compiles with NVRTC 13.0 for `sm_90a` (Hopper), with no GPU:
//! NVRTC and the CUDA headers come from the `nvidia-cuda-nvrtc==13.0.*` and
//! `nvidia-cuda-runtime==13.0.*` wheels (found through `SCORESTREAM_NVRTC_LIB` /
//! `SCORESTREAM_CUDA_INCLUDE`, or by asking `python3`). Without them the test skips, unless
//! `CI` is set, where it fails.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use scorestream::engine::cuda::compile::{cached_ptx, compile_ptx, include_dirs, python_nvidia_dir, KERNELS};
use scorestream::engine::cuda::probe::{preload_from, Library};

fn nvrtc_lib_dir() -> Option<PathBuf> {
    std::env::var_os("SCORESTREAM_NVRTC_LIB").map(PathBuf::from).or_else(|| python_nvidia_dir("lib"))
}

fn missing(what: &str) {
    let msg = format!(
        "{what}: pip install \"nvidia-cuda-nvrtc==13.0.*\" \"nvidia-cuda-runtime==13.0.*\" \
         (or set SCORESTREAM_NVRTC_LIB and SCORESTREAM_CUDA_INCLUDE)"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("skipping NVRTC compile test: {msg}");
}

#[test]
fn every_kernel_compiles_for_sm_90a() {
    if let Some(dir) = nvrtc_lib_dir() {
        preload_from(&dir);
    }
    if !Library::Nvrtc.present() {
        return missing("libnvrtc not found");
    }
    let includes = include_dirs();
    if includes.is_empty() {
        return missing("CUDA headers (cuda_fp8.h) not found");
    }
    let ptx = compile_ptx("sm_90a", &includes).unwrap_or_else(|e| panic!("{e}"));
    assert!(ptx.contains(".target sm_90a"), "PTX is not for sm_90a");
    for k in KERNELS {
        assert!(ptx.contains(&format!(".entry {k}(")), "kernel {k} missing from the PTX");
    }
    // The attention kernels run on the tensor cores.
    assert!(ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"), "no tensor-core MMA in the PTX");
}

#[test]
fn compiled_kernels_are_cached_by_source_hash() {
    if let Some(dir) = nvrtc_lib_dir() {
        preload_from(&dir);
    }
    if !Library::Nvrtc.present() || include_dirs().is_empty() {
        return missing("libnvrtc or the CUDA headers not found");
    }
    let cache = tempfile::tempdir().expect("temp dir");
    cached_ptx("sm_90a", cache.path()).unwrap_or_else(|e| panic!("{e}"));
    let files: Vec<_> = std::fs::read_dir(cache.path()).expect("cache dir").filter_map(Result::ok).collect();
    assert_eq!(files.len(), 1, "one PTX file per (arch, NVRTC version, source)");
    let name = files[0].file_name().to_string_lossy().into_owned();
    assert!(name.starts_with("kernels-sm_90a-") && name.ends_with(".ptx"), "{name}");
    // A second start reads the file instead of compiling: a planted marker survives.
    let path = files[0].path();
    let text = std::fs::read_to_string(&path).expect("ptx") + "\n// cached\n";
    std::fs::write(&path, &text).expect("write");
    let again = cached_ptx("sm_90a", cache.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(again.to_src().ends_with("// cached\n"));
}
