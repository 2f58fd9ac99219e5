//! What the binary tells its operator: `--version` names the version, the git revision and the
//! `cuda` feature.

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
