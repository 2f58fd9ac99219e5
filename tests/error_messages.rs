//! Errors reach the user with each cause printed once (`error: a: b: c`, no part repeated), for
//! the mistakes people make first: a missing model directory, a missing config file, a config
//! that does not parse.

use std::process::Command;

/// Run `scorestream args…`, expect failure, return its `error:` line.
fn error_line(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_scorestream")).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {stderr}")).to_owned()
}

fn assert_each_cause_once(line: &str) {
    let parts: Vec<&str> = line.trim_start_matches("error: ").split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "{p:?} is printed twice in {line:?}");
    }
}

#[test]
fn each_cause_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "").unwrap();
    let no_config = dir.path().join("no-such.toml");
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "[model\npath = 1\n").unwrap();
    let cases: [Vec<&str>; 4] = [
        vec!["score", "--model", missing.to_str().unwrap(), "--input", input.to_str().unwrap()],
        vec!["run", "--config", no_config.to_str().unwrap()],
        vec!["check-config", "--config", no_config.to_str().unwrap()],
        vec!["check-config", "--config", bad_toml.to_str().unwrap()],
    ];
    for args in cases {
        let line = error_line(&args);
        assert_each_cause_once(&line);
        if args[0] != "check-config" || args[2].ends_with("no-such.toml") {
            assert!(line.to_lowercase().contains("no such file"), "{line}");
        }
    }
}
