//! The prompt stage's [`Preparer`] over the model's tokenizer and chat template, shared by the
//! worker and `scorestream score`.

use super::Preparer;
use crate::event::{EventError, InputEvent};
use crate::prompt::{Prompter, TruncationPolicy};

/// Templates and tokenizes an event within the length limit in force.
pub(crate) struct PromptPreparer {
    pub prompter: Prompter,
    /// The engine's length limit: `max_tokens` capped by the model's positions.
    pub max_tokens: usize,
    pub policy: TruncationPolicy,
}

impl Preparer for PromptPreparer {
    fn prepare(&self, event: &InputEvent) -> Result<(Vec<u32>, bool), EventError> {
        let p = self.prompter.prepare(&event.messages, self.max_tokens, self.policy)?;
        Ok((p.ids, p.truncated))
    }
}
