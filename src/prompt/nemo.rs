//! NeMo-Aligner's reward-model prompt format (`examples/nlp/data/steerlm/common.py`), used for
//! Nemotron-4 checkpoints that ship no chat template.

use crate::event::{Message, Role};

/// NeMo-Aligner's default system prompt.
pub(crate) const SYSTEM_PROMPT: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// `<extra_id_0>System\n{system}\n`, then `<extra_id_1>User\n{text}\n` /
/// `<extra_id_1>Assistant\n{text}\n` per turn, then `<extra_id_2>` (the label prefix).
pub fn render(messages: &[Message]) -> String {
    let (system, turns) = match messages.first() {
        Some(m) if m.role == Role::System => (m.content.as_str(), &messages[1..]),
        _ => (SYSTEM_PROMPT, messages),
    };
    let mut out = format!("<extra_id_0>System\n{system}\n");
    for m in turns {
        let who = match m.role {
            Role::User => "User",
            Role::Assistant => "Assistant",
            // A system message after the first turn is kept as a user-visible turn of its own.
            Role::System => "System",
        };
        out.push_str(&format!("<extra_id_1>{who}\n{}\n", m.content));
    }
    out.push_str("<extra_id_2>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_reward_format() {
        let m = |role, c: &str| Message { role, content: c.to_owned() };
        let text = render(&[m(Role::User, "Hi"), m(Role::Assistant, "Hello!")]);
        assert_eq!(
            text,
            format!("<extra_id_0>System\n{SYSTEM_PROMPT}\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello!\n<extra_id_2>")
        );
        let text = render(&[m(Role::System, "Be brief."), m(Role::User, "Q"), m(Role::Assistant, "A")]);
        assert!(text.starts_with("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nQ\n"));
    }
}
