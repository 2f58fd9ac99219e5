//! The real Llama-3.1 vocabulary (128,256 tokens, converted from Meta's tiktoken file by
//! `scripts/llama3_tokenizer.py` at test-setup time): scorestream's ids for the chat-templated
//! fixture conversations equal transformers'.

mod missing_tool;

use std::path::PathBuf;

use scorestream::event::InputEvent;
use scorestream::prompt::{Prompter, TruncationPolicy};
use serde::Deserialize;

#[derive(Deserialize)]
struct RefIds {
    id: String,
    input_ids: Vec<u32>,
}

#[test]
fn llama31_token_ids_equal_transformers() {
    let dir = std::env::var_os("SCORESTREAM_LLAMA3_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/llama3-tokenizer"));
    if !dir.join("reference_ids.json").exists() {
        let what = format!("{} is missing", dir.display());
        missing_tool::skip_or_fail(&what, &format!("python3 scripts/llama3_tokenizer.py {}", dir.display()));
        return;
    }
    let prompter = Prompter::load(&dir).unwrap();
    assert_eq!(prompter.tokenizer().get_vocab_size(true), 128_256);
    let refs: Vec<RefIds> = serde_json::from_str(&std::fs::read_to_string(dir.join("reference_ids.json")).unwrap()).unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/conversations.jsonl")).unwrap();
    let events: Vec<InputEvent> = text.lines().filter(|l| !l.is_empty()).map(|l| InputEvent::parse(l.as_bytes(), 0).unwrap()).collect();
    assert_eq!(events.len(), refs.len());
    for (ev, r) in events.iter().zip(&refs) {
        assert_eq!(ev.id, r.id);
        let ids = prompter.prepare(&ev.messages, 1 << 20, TruncationPolicy::Reject).unwrap().ids;
        assert_eq!(ids, r.input_ids, "{}: ids differ from transformers'", ev.id);
        assert_eq!(ids[0], 128_000, "starts with <|begin_of_text|>");
    }
}
