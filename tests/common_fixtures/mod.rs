//! Shared access to the committed fixtures under `tests/fixtures/` and their transformers
//! reference outputs.
#![allow(dead_code)]

use std::path::PathBuf;

use serde::Deserialize;

/// `tests/fixtures`, or `SCORESTREAM_FIXTURES_DIR` when set (to try freshly generated ones).
pub fn root() -> PathBuf {
    std::env::var_os("SCORESTREAM_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

pub fn dir(name: &str) -> PathBuf {
    root().join(name)
}

/// Every fixture directory that has a `reference.json`, sorted.
pub fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root())
        .expect("tests/fixtures exists")
        .filter_map(Result::ok)
        .filter(|e| e.path().join("reference.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[derive(Debug, Deserialize)]
pub struct RefEvent {
    pub id: String,
    pub input_ids: Vec<u32>,
    #[serde(default)]
    pub logits: Vec<f32>,
    pub reward: f32,
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub events: Vec<RefEvent>,
    #[serde(default)]
    pub fp8: Option<serde_json::Value>,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        let path = dir(name).join("reference.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}
