//! Token ids of chat-templated conversations equal transformers'
//! `apply_chat_template(messages, tokenize=True, add_generation_prompt=False)` for every fixture
//! (every template layout: string and named list in tokenizer_config.json, chat_template.jinja,
//! and the built-in NeMo format), and template errors are reported as such.

mod common_fixtures;

use common_fixtures::{fixture_names, Reference};
use scorestream::event::{ErrorKind, InputEvent, Message, Role};
use scorestream::prompt::{Prompter, TruncationPolicy};

fn events(path: &std::path::Path) -> Vec<InputEvent> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| InputEvent::parse(l.as_bytes(), 0).unwrap())
        .collect()
}

#[test]
fn token_ids_equal_transformers_for_every_fixture() {
    for name in fixture_names() {
        let dir = common_fixtures::dir(&name);
        let convs = if dir.join("conversations.jsonl").exists() {
            events(&dir.join("conversations.jsonl"))
        } else {
            events(&common_fixtures::root().join("conversations.jsonl"))
        };
        let prompter = Prompter::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let reference = Reference::load(&name);
        assert_eq!(convs.len(), reference.events.len(), "{name}");
        for (ev, r) in convs.iter().zip(&reference.events) {
            assert_eq!(ev.id, r.id);
            let got = prompter.prepare(&ev.messages, 100_000, TruncationPolicy::Reject).unwrap();
            assert_eq!(got.ids, r.input_ids, "{name}/{}: token ids differ from transformers'", ev.id);
        }
    }
}

#[test]
fn a_template_exception_is_a_template_error() {
    let prompter = Prompter::load(&common_fixtures::dir("mistral_seqcls")).unwrap();
    let m = |role, c: &str| Message { role, content: c.to_owned() };
    let err = prompter
        .prepare(&[m(Role::User, "a"), m(Role::User, "b"), m(Role::Assistant, "c")], 4096, TruncationPolicy::Reject)
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Template);
    assert!(err.message.contains("alternate"), "{}", err.message);
}

#[test]
fn truncation_keeps_the_system_message_and_the_final_exchange() {
    let prompter = Prompter::load(&common_fixtures::dir("llama_seqcls")).unwrap();
    let conv = events(&common_fixtures::root().join("conversations.jsonl"))
        .into_iter()
        .find(|e| e.id == "long-multi")
        .unwrap();
    let full = prompter.prepare(&conv.messages, 100_000, TruncationPolicy::Reject).unwrap().ids;
    let system_and_last: Vec<Message> =
        [conv.messages[0].clone()].into_iter().chain(conv.messages[conv.messages.len() - 2..].iter().cloned()).collect();
    let minimal = prompter.prepare(&system_and_last, 100_000, TruncationPolicy::Reject).unwrap().ids;
    // A limit between the two keeps some but not all exchanges, always the newest ones.
    let limit = (full.len() + minimal.len()) / 2;
    let cut = prompter.prepare(&conv.messages, limit, TruncationPolicy::DropOldestTurns).unwrap();
    assert!(cut.truncated && cut.ids.len() <= limit && cut.ids.len() > minimal.len());
    assert!(full.ends_with(&cut.ids[cut.ids.len() - 20..]), "the newest turns are kept");
    let exact = prompter.prepare(&conv.messages, minimal.len(), TruncationPolicy::DropOldestTurns).unwrap();
    assert_eq!(exact.ids, minimal, "down to the system message and the final exchange");
    let err = prompter.prepare(&conv.messages, minimal.len() - 1, TruncationPolicy::DropOldestTurns).unwrap_err();
    assert_eq!(err.kind, ErrorKind::TooLong);
    let err = prompter.prepare(&conv.messages, limit, TruncationPolicy::Reject).unwrap_err();
    assert_eq!(err.kind, ErrorKind::TooLong);
}

#[test]
fn a_directory_without_template_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common_fixtures::dir("llama_seqcls");
    for f in ["tokenizer.json", "config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let err = Prompter::load(tmp.path()).err().expect("no template").to_string();
    assert!(err.contains("no chat template") && err.contains("chat_template.jinja"), "{err}");
}
