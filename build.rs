//! Build script: records the git revision and the enabled features for `--version` and the
//! `scorestream_build_info` metric.
//!
//! The revision is `SCORESTREAM_GIT_REVISION` when set (the Dockerfile passes it: the build
//! context has no `.git`), else `git rev-parse --short=12 HEAD`, else "unknown" (a source tarball,
//! or no git installed).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=SCORESTREAM_GIT_REVISION");
    let revision = std::env::var("SCORESTREAM_GIT_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // Rebuild when HEAD moves (a commit, a checkout); in a worktree these are its own files.
    for file in ["HEAD", "logs/HEAD"] {
        if let Some(path) = git(&["rev-parse", "--git-path", file]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let features = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() { "cuda" } else { "" };
    let cuda = if features.contains("cuda") { "yes" } else { "no" };
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rustc-env=SCORESTREAM_GIT_REVISION={revision}");
    println!("cargo:rustc-env=SCORESTREAM_FEATURES={features}");
    println!("cargo:rustc-env=SCORESTREAM_LONG_VERSION={version} (revision {revision}, cuda: {cuda})");
}
