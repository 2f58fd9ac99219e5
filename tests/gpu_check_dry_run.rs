//! The control flow of `scripts/gpu_check.sh` without a GPU: the bench and PyTorch commands are
//! replaced by `benches/gpu/sample/fake_gpu_bench.sh`, which prints the committed sample output
//! (marked as sample, not measured), and `benches/gpu/report.py` runs on what the steps wrote. So the
//! script cannot be what breaks in a rare GPU slot: at most 10 files under `$OUT`, a failing or
//! timed-out step never stops the later ones and keeps what it printed, and the table comes last.
//! Needs bash, coreutils' `timeout` and python3 (standard library only).

mod missing_tool;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether bash, `timeout` and python3 are here: without them the test is skipped outside CI
/// and fails under `CI` (`tests/missing_tool`).
fn tools_present() -> bool {
    let missing: Vec<&str> = ["bash", "timeout", "python3"].into_iter().filter(|t| Command::new(t).arg("--version").output().is_err()).collect();
    if missing.is_empty() {
        return true;
    }
    missing_tool::skip_or_fail(&format!("{} not found", missing.join(", ")), "install Debian's bash, coreutils and python3");
    false
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_script(out: &Path, envs: &[(&str, &str)]) -> Output {
    let fake = root().join("benches/gpu/sample/fake_gpu_bench.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("scripts/gpu_check.sh"))
        .env("OUT", out)
        .env("GPU_BENCH", &fake)
        .env("TORCH_REF", format!("{} torch", fake.display()))
        .env("GPU_CHECK_SKIP_SETUP", "1")
        .env_remove("FAKE_FAIL")
        .env_remove("FAKE_HANG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run scripts/gpu_check.sh")
}

fn read(out: &Path, name: &str) -> String {
    std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The `{"kind":"step",...}` line each step's file ends with.
fn step_status(out: &Path, name: &str) -> String {
    let text = read(out, &format!("{name}.jsonl"));
    let last = text.lines().rev().find(|l| l.contains(r#""kind":"step""#)).unwrap_or_else(|| panic!("{name}: no step line in\n{text}"));
    last.split(r#""status":""#).nth(1).and_then(|r| r.split('"').next()).unwrap_or_default().to_owned()
}

fn files_in(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out).expect("OUT").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

const STEPS: [&str; 9] = ["probe", "check", "parity", "gemm", "time", "layers", "torch", "hop", "load"];

#[test]
fn every_step_runs_and_the_table_comes_last() {
    if !tools_present() {
        return;
    }
    let out = tempfile::tempdir().expect("temp dir");
    let run = run_script(out.path(), &[]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    let names = files_in(out.path());
    assert!(names.len() <= 10, "{names:?}");
    assert_eq!(names.len(), 10, "{names:?}");
    for s in STEPS {
        assert_eq!(step_status(out.path(), s), "ok", "{s}");
    }
    // The report's table is the last thing printed, and says the data is a sample.
    let table = read(out.path(), "table.md");
    assert!(stdout.trim_end().ends_with(table.trim_end()), "the table is not printed last:\n{stdout}");
    assert!(table.trim_end().ends_with("NOT a measurement.**"), "{table}");
    assert!(table.contains("| 4096 | scorestream fp8 | 80 |"), "{table}");
    // The bf16 path (what Ampere GPUs run) is measured beside FP8 and PyTorch bf16.
    assert!(table.contains("| 4096 | scorestream bf16 | 16 |") && table.contains("| 4096 | torch bf16 |"), "{table}");
    assert!(table.contains("| square | bf16 | 8192×8192×8192 |") && table.contains("bf16 ceiling: 578.7 TFLOP/s"), "{table}");
    assert!(table.contains("parity arith bf16 vs cpu_bf16") && table.contains("Layer loop (bf16): 16 layers"), "{table}");
    // The attention v2 and shared-prefix (tree) parity rows say what they ran.
    assert!(table.contains("parity arith fp8 attention v2 vs cpu_fp8_bf16") && table.contains("parity arith bf16 layout tree attention v2 vs cpu_plain"), "{table}");
    assert!(table.contains("| probe | ok | 0 |") && table.contains("| torch | ok | 0 |"), "{table}");
    assert!(table.contains("FP8 ceiling: 845.8 TFLOP/s"), "{table}");
    // The on-device load (bit-for-bit against the host load, GB/s) and the device hop.
    assert!(table.contains("- load parity arith fp8 (on the device): 0 of 1") && table.contains("| device | fp8 | 12 |"), "{table}");
    assert!(table.contains("| same_device | 16384 |") && table.contains("- hop parity arith (cuda:0,cuda:0): max |Δreward| 0.00e+00 pass"), "{table}");
}

#[test]
fn a_failing_and_a_hanging_step_do_not_stop_the_later_ones() {
    if !tools_present() {
        return;
    }
    let out = tempfile::tempdir().expect("temp dir");
    // Leftovers of an earlier run in $OUT are replaced, not added to.
    std::fs::write(out.path().join("check.jsonl"), "{\"kind\":\"check\",\"kernel\":\"stale\",\"rel_err\":1,\"tol\":1,\"pass\":false}\n").unwrap();
    let run = run_script(out.path(), &[("FAKE_FAIL", "check"), ("FAKE_HANG", "layers"), ("GPU_CHECK_TIMEOUT_LAYERS", "2")]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(1), "a failed step makes the script fail:\n{stdout}");
    assert!(files_in(out.path()).len() <= 10);
    assert_eq!(step_status(out.path(), "check"), "failed");
    assert!(read(out.path(), "check.jsonl").contains("sample failure of check"), "stderr kept in the step's file");
    assert!(!read(out.path(), "check.jsonl").contains("stale"));
    assert_eq!(step_status(out.path(), "layers"), "timeout");
    // What the timed-out step printed before the timeout is kept.
    assert!(read(out.path(), "layers.jsonl").contains(r#""tokens":16384"#));
    for later in ["time", "torch"] {
        assert_eq!(step_status(out.path(), later), "ok", "{later}");
    }
    let table = read(out.path(), "table.md");
    assert!(table.contains("| check | failed | 3 |") && table.contains("| layers | timeout | 124 |"), "{table}");
    // The failed step's row says why, from the error line the step printed.
    assert!(table.contains("| Error: sample failure of check |"), "{table}");
    assert!(stdout.trim_end().ends_with(table.trim_end()), "the table is not printed last:\n{stdout}");
}

#[test]
fn a_spent_budget_skips_the_remaining_steps_and_still_prints_the_table() {
    if !tools_present() {
        return;
    }
    let out = tempfile::tempdir().expect("temp dir");
    // 21 s of budget less 15 s kept for the report: the hanging probe gets 6 s, then nothing is left.
    let run = run_script(out.path(), &[("FAKE_HANG", "probe"), ("GPU_CHECK_BUDGET_S", "21")]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(1), "{stdout}");
    assert_eq!(step_status(out.path(), "probe"), "timeout");
    for s in &STEPS[1..] {
        assert_eq!(step_status(out.path(), s), "skipped", "{s}");
    }
    assert!(files_in(out.path()).len() <= 10);
    let table = read(out.path(), "table.md");
    assert!(table.contains("| torch | skipped |") && table.contains("NVIDIA H200 (sample)"), "{table}");
    assert!(stdout.trim_end().ends_with(table.trim_end()));
}

#[test]
fn the_report_skips_cut_off_lines_and_keeps_other_sections() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let f = dir.path().join("cut.jsonl");
    std::fs::write(
        &f,
        "{\"kind\":\"sample\"}\n{\"kind\":\"gemm\",\"shape\":\"square\",\"m\":1,\"n\":1,\"k\":1,\"fast_accum\":true,\"mode\":\"Epilogue\",\"ms\":1,\"tflops\":500.0}\n\
         {\"kind\":\"check\",\"kernel\":\"x\"}\n{\"kind\":\"layers\",\"tokens\":4096,\"seqs\":2,\"lay",
    )
    .unwrap();
    let run = Command::new("python3").arg(root().join("benches/gpu/report.py")).arg(&f).arg(dir.path().join("missing.jsonl")).output().expect("python3");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("(checks: malformed rows, section left out"), "{stdout}");
    assert!(stdout.contains("FP8 ceiling: 500.0 TFLOP/s") && stdout.contains("cannot read"), "{stdout}");
}
