//! Prompt building: chat template rendering, tokenization and the truncation policy.
//!
//! Produces exactly the ids of transformers'
//! `apply_chat_template(messages, tokenize=True, add_generation_prompt=False)`: the template is
//! rendered with the tokenizer's special tokens in context and the text is tokenized without
//! adding special tokens. A Nemotron-4 checkpoint without a template gets NeMo-Aligner's reward
//! format. A [`Prompter`] is immutable after loading and shared across threads.

mod nemo;
pub mod template;

use std::path::{Path, PathBuf};

use minijinja::Environment;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::event::{ErrorKind, EventError, Message, Role};

/// What to do with a conversation longer than `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TruncationPolicy {
    /// Drop the oldest user/assistant exchanges (keeping the system message and the final
    /// exchange) until the conversation fits; fail with `too_long` if it never does.
    #[default]
    DropOldestTurns,
    /// Fail with `too_long`.
    Reject,
}

/// Errors while loading the tokenizer or the template.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot load the tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("the chat template does not compile: {0}")]
    Template(#[from] minijinja::Error),
    #[error("no chat template: looked for `chat_template` in {config} and for {jinja}")]
    NoTemplate { config: PathBuf, jinja: PathBuf },
    #[error("{path} must hold a JSON object, found {found}")]
    NotAnObject { path: PathBuf, found: &'static str },
    #[error("the chat template ({origin}) renders an ordinary conversation to {chars} characters and 0 tokens: nothing could be scored")]
    RendersNothing { origin: String, chars: usize },
}

/// A conversation ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub ids: Vec<u32>,
    /// Whether older exchanges were dropped to fit `max_tokens`.
    pub truncated: bool,
}

enum Format {
    Jinja(Box<Environment<'static>>),
    Nemo,
}

/// Templating and tokenization for one model.
pub struct Prompter {
    tokenizer: Tokenizer,
    format: Format,
    /// Special tokens passed to the template (`bos_token`, `eos_token`, ...).
    special: serde_json::Map<String, Value>,
}

impl Prompter {
    /// Load `tokenizer.json`, `tokenizer_config.json` and the chat template of `dir`.
    pub fn load(dir: &Path) -> Result<Self, PromptError> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| PromptError::Tokenizer { path: tok_path.clone(), message: e.to_string() })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = match read_json(&cfg_path)? {
            None => Value::Null,
            Some(v @ Value::Object(_)) => v,
            Some(other) => return Err(PromptError::NotAnObject { path: cfg_path, found: json_kind(&other) }),
        };
        let special = special_tokens(&cfg);
        let jinja_path = dir.join("chat_template.jinja");
        // transformers lets a separate chat_template.jinja override tokenizer_config's template.
        let (source, origin) = match std::fs::read_to_string(&jinja_path) {
            Ok(s) => (Some(s), jinja_path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (config_template(&cfg), format!("`chat_template` in {}", cfg_path.display()))
            }
            Err(source) => return Err(PromptError::Io { path: jinja_path, source }),
        };
        let format = match source {
            Some(src) => Format::Jinja(Box::new(template::environment(&src)?)),
            None if is_nemotron(dir)? => Format::Nemo,
            None => return Err(PromptError::NoTemplate { config: cfg_path, jinja: jinja_path }),
        };
        let prompter = Self { tokenizer, format, special };
        prompter.check_renders(origin)?;
        Ok(prompter)
    }

    /// Refuse a template (an empty file, say) that turns an ordinary exchange into no tokens: it
    /// would fail every event. A template that raises on the probe is left to fail per event.
    fn check_renders(&self, origin: String) -> Result<(), PromptError> {
        let probe = probe_conversation();
        match (self.render(&probe), self.encode(&probe)) {
            (Ok(text), Ok(ids)) if ids.is_empty() => Err(PromptError::RendersNothing { origin, chars: text.chars().count() }),
            _ => Ok(()),
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Render and tokenize `messages` within `max_tokens` under `policy`. A conversation that
    /// comes out as no tokens at all is a `template` error: there is no token to score at.
    pub fn prepare(&self, messages: &[Message], max_tokens: usize, policy: TruncationPolicy) -> Result<Prepared, EventError> {
        let prepared = self.prepare_within(messages, max_tokens, policy)?;
        if prepared.ids.is_empty() {
            let chars = self.render(messages).map(|t| t.chars().count()).unwrap_or(0);
            return Err(EventError::new(
                ErrorKind::Template,
                format!("the templated conversation ({chars} characters) tokenizes to 0 tokens: nothing to score"),
            ));
        }
        Ok(prepared)
    }

    fn prepare_within(&self, messages: &[Message], max_tokens: usize, policy: TruncationPolicy) -> Result<Prepared, EventError> {
        let ids = self.encode(messages)?;
        if ids.len() <= max_tokens {
            return Ok(Prepared { ids, truncated: false });
        }
        let too_long = |n: usize| {
            EventError::new(ErrorKind::TooLong, format!("the conversation has {n} tokens, the limit is {max_tokens}"))
        };
        if policy == TruncationPolicy::Reject {
            return Err(too_long(ids.len()));
        }
        let starts = exchange_starts(messages);
        // Drop the `k` oldest exchanges; the last one always stays. Fewer exchanges never
        // means more tokens, so the smallest `k` that fits is found by bisection.
        let system = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
        let attempt = |k: usize| -> Result<Vec<u32>, EventError> {
            let kept: Vec<Message> = messages[..system].iter().chain(&messages[starts[k]..]).cloned().collect();
            self.encode(&kept)
        };
        let last = starts.len() - 1;
        let shortest = attempt(last)?;
        if shortest.len() > max_tokens {
            return Err(EventError::new(
                ErrorKind::TooLong,
                format!("the final exchange alone has {} tokens, the limit is {max_tokens}", shortest.len()),
            ));
        }
        // Invariant: `best` are the ids for `hi`, which fits; every k < `lo` does not.
        let (mut lo, mut hi, mut best) = (1, last, shortest);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let ids = attempt(mid)?;
            if ids.len() <= max_tokens {
                best = ids;
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(Prepared { ids: best, truncated: true })
    }

    /// Render and tokenize without truncation.
    pub(crate) fn encode(&self, messages: &[Message]) -> Result<Vec<u32>, EventError> {
        let text = self.render(messages)?;
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EventError::new(ErrorKind::Template, format!("tokenization failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The templated text of `messages`.
    pub fn render(&self, messages: &[Message]) -> Result<String, EventError> {
        match &self.format {
            Format::Nemo => Ok(nemo::render(messages)),
            Format::Jinja(env) => {
                let mut ctx = self.special.clone();
                ctx.insert("messages".into(), serde_json::to_value(messages).unwrap_or_default());
                ctx.insert("add_generation_prompt".into(), Value::Bool(false));
                env.get_template(template::NAME)
                    .and_then(|t| t.render(minijinja::Value::from_serialize(&ctx)))
                    .map_err(|e| EventError::new(ErrorKind::Template, template_message(&e)))
            }
        }
    }
}

/// A short, ordinary exchange every template should render: checked when a template is loaded
/// and scored by the worker's warm-up batch.
pub(crate) fn probe_conversation() -> Vec<Message> {
    vec![
        Message { role: Role::User, content: "Hello.".into() },
        Message { role: Role::Assistant, content: "Hello! How can I help?".into() },
    ]
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The innermost message of a template error (raise_exception's text, not the wrapper).
fn template_message(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) => format!("chat template: {d}"),
        None => format!("chat template: {e}"),
    }
}

/// Indexes where each exchange starts: at each user message after the system message (a
/// conversation with no user message is one exchange).
fn exchange_starts(messages: &[Message]) -> Vec<usize> {
    let first = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
    let mut starts: Vec<usize> = (first..messages.len()).filter(|&i| messages[i].role == Role::User).collect();
    if starts.first() != Some(&first) {
        starts.insert(0, first);
    }
    starts
}

fn read_json(path: &Path) -> Result<Option<Value>, PromptError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|source| PromptError::Json { path: path.to_owned(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PromptError::Io { path: path.to_owned(), source }),
    }
}

/// `chat_template` as a string, or the template named "default" of a list of named templates.
fn config_template(cfg: &Value) -> Option<String> {
    match cfg.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// The special tokens transformers passes to templates, as strings (AddedToken objects are
/// reduced to their `content`).
fn special_tokens(cfg: &Value) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for key in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
        let token = match cfg.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        if let Some(t) = token {
            out.insert(key.to_owned(), Value::String(t));
        }
    }
    out
}

fn is_nemotron(dir: &Path) -> Result<bool, PromptError> {
    Ok(read_json(&dir.join("config.json"))?
        .and_then(|c| c.get("model_type").and_then(Value::as_str).map(|t| t == "nemotron"))
        .unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str) -> Message {
        Message { role, content: content.to_owned() }
    }

    #[test]
    fn exchanges_start_at_user_turns() {
        use Role::*;
        let m = [msg(System, "s"), msg(User, "a"), msg(Assistant, "b"), msg(User, "c"), msg(Assistant, "d")];
        assert_eq!(exchange_starts(&m), vec![1, 3]);
        assert_eq!(exchange_starts(&m[1..]), vec![0, 2]);
        assert_eq!(exchange_starts(&[msg(Assistant, "x")]), vec![0]);
    }

    #[test]
    fn named_templates_use_default() {
        let cfg = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
                                     "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"});
        assert_eq!(config_template(&cfg).as_deref(), Some("D"));
        let sp = special_tokens(&cfg);
        assert_eq!((sp["bos_token"].as_str(), sp["eos_token"].as_str()), (Some("<s>"), Some("</s>")));
    }
}
