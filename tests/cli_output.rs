//! What the binary tells its operator: `--version` names the version, the git revision and the
//! `cuda` feature; log lines carry no colour codes when stderr is not a terminal, and
//! `--log-format json` writes one JSON object per line.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const EVENT: &str = r#"{"id":"a","messages":[{"role":"user","content":"1+1"},{"role":"assistant","content":"2"}]}"#;

fn scorestream(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_scorestream"))
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("SCORESTREAM_LOG_FORMAT")
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start scorestream");
    writeln!(child.stdin.take().unwrap(), "{EVENT}").unwrap();
    child.wait_with_output().unwrap()
}

fn score(extra: &[&str]) -> (String, String) {
    let mut args = extra.to_vec();
    args.extend(["score", "--model", "tests/fixtures/arith"]);
    let out = scorestream(&args, &[]);
    let (stdout, stderr) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap());
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr)
}

#[test]
fn version_names_the_revision_and_the_cuda_feature() {
    let out = scorestream(&["--version"], &[]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    let cuda = if cfg!(feature = "cuda") { "yes" } else { "no" };
    let want = format!("scorestream {} (revision ", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&want) && text.trim_end().ends_with(&format!(", cuda: {cuda})")), "{text}");
    let revision = text.split("(revision ").nth(1).unwrap().split(',').next().unwrap();
    // In a git checkout: the abbreviated commit hash; elsewhere "unknown".
    let in_git = Command::new("git").args(["rev-parse", "HEAD"]).output().is_ok_and(|o| o.status.success());
    if in_git {
        assert!(revision.len() == 12 && revision.chars().all(|c| c.is_ascii_hexdigit()), "{revision}");
    } else {
        assert_eq!(revision, "unknown");
    }
}

#[test]
fn text_logs_carry_no_colour_codes_off_a_terminal() {
    let (stdout, stderr) = score(&[]);
    assert!(stdout.contains(r#""id":"a""#), "{stdout}");
    assert!(stderr.contains("INFO"), "the model load logs at info: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "escape codes in a pipe: {stderr:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    for args in [&["--log-format", "json"][..], &["--log-format=json"]] {
        let (stdout, stderr) = score(args);
        assert_eq!(stdout.lines().count(), 1, "scores stay on stdout: {stdout}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(!lines.is_empty());
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(v["level"].is_string() && v["message"].is_string() && v["timestamp"].is_string(), "{line}");
        }
    }
    // The subcommand may come first too (the flag is global), and the environment selects it.
    let out = scorestream(&["score", "--model", "tests/fixtures/arith"], &[("SCORESTREAM_LOG_FORMAT", "json")]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.lines().all(|l| l.starts_with('{')), "{stderr}");
}
