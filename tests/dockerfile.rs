//! The container image (Dockerfile; no container engine in CI, so its text is checked): the
//! binary it ships is built stripped and gets the git revision the build context lacks.

fn dockerfile() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap()
}

/// The shell command of the `RUN` instruction that builds the binary (continuation lines joined).
fn build_command(text: &str) -> String {
    let joined = text.replace("\\\n", " ");
    joined.lines().find(|l| l.starts_with("RUN") && l.contains("cargo build")).expect("a RUN cargo build").to_owned()
}

#[test]
fn the_image_ships_a_stripped_binary() {
    let text = dockerfile();
    let build = build_command(&text);
    let cargo = build.find("cargo build").unwrap();
    let before = &build[..cargo];
    assert!(before.contains("CARGO_PROFILE_RELEASE_STRIP=symbols"), "{build}");
    assert!(before.contains("CARGO_PROFILE_RELEASE_DEBUG=0"), "{build}");
    assert!(build[cargo..].contains("--release") && build.contains("target/release/scorestream"), "{build}");
}

#[test]
fn the_image_build_passes_the_git_revision() {
    let text = dockerfile();
    let build_stage = text.split("\nFROM ").nth(1).unwrap();
    assert!(build_stage.contains("ARG GIT_REVISION"), "{build_stage}");
    assert!(build_stage.contains("ENV SCORESTREAM_GIT_REVISION=${GIT_REVISION}"), "{build_stage}");
}
