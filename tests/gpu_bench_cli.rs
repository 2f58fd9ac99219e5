//! `gpu_bench` parses its arguments before it touches CUDA: `--help` and usage errors print and
//! exit without opening a GPU (here there is none, and no libcuda: opening one would fail with
//! a CUDA error instead). And no timing event is created with cudarc's default flags, which
//! disable timing (`elapsed_ms` then fails at the first measurement).
#![cfg(feature = "cuda")]

use std::process::Command;

fn gpu_bench(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gpu_bench"))
        .args(args)
        // Even where a GPU exists, a command that ignored its arguments would reach for it
        // through these; usage handling must not.
        .env("SCORESTREAM_NVRTC", "/nonexistent/libnvrtc.so.13")
        .env_remove("SCORESTREAM_PREBUILT_KERNELS")
        .output()
        .expect("run gpu_bench");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn no_cuda(text: &str) {
    for word in ["libcuda", "CUDA library", "CUDA driver", "libnvrtc", "GPU 0", "\"kind\""] {
        assert!(!text.contains(word), "usage output mentions {word:?}, so CUDA was touched:\n{text}");
    }
}

#[test]
fn help_prints_usage_and_exits_zero_without_a_gpu() {
    let (code, stdout, stderr) = gpu_bench(&["--help"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("Usage: gpu_bench <COMMAND>"), "{stdout}");
    for cmd in ["probe", "check", "parity", "gemm", "time", "layers", "load-parity", "load", "hop", "kernels"] {
        assert!(stdout.contains(cmd), "--help does not list {cmd}:\n{stdout}");
    }
    no_cuda(&(stdout + &stderr));
    let (code, stdout, _) = gpu_bench(&["layers", "--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("--max-layers"), "{stdout}");
}

#[test]
fn usage_errors_exit_two_before_any_gpu_is_opened() {
    for args in [&["bogus"][..], &[], &["layers", "--max-layers", "many"], &["kernels"], &["load", "--max-layers", "all"]] {
        let (code, stdout, stderr) = gpu_bench(args);
        assert_eq!(code, Some(2), "{args:?}: {stdout}\n{stderr}");
        assert!(stderr.contains("Usage: gpu_bench") || stderr.contains("try '--help'"), "{args:?}: {stderr}");
        no_cuda(&(stdout + &stderr));
    }
}

#[test]
fn no_event_is_created_with_timing_disabled() {
    use scorestream::engine::cuda::device::TIMING_EVENT_FLAGS;
    assert_eq!(TIMING_EVENT_FLAGS, cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    // cudarc's `new_event(None)` means CU_EVENT_DISABLE_TIMING: nothing in the bench or the
    // engine may create an event that way, or spell the flag out.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(root.join("benches/gpu")).expect("benches/gpu").map(|e| e.expect("entry").path()).collect();
    files.extend(std::fs::read_dir(root.join("src/engine/cuda")).expect("src/engine/cuda").map(|e| e.expect("entry").path()));
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "rs")) {
        let text = std::fs::read_to_string(f).expect("source");
        let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        assert!(!code.contains("new_event(None)"), "{}: an event with timing disabled", f.display());
        assert!(!code.contains("CU_EVENT_DISABLE_TIMING"), "{}: CU_EVENT_DISABLE_TIMING", f.display());
    }
}
