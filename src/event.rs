//! Input events, scored events and error records: parsing, validation and serialization.
//!
//! Parsing never panics: any byte string either becomes an [`InputEvent`] or an
//! [`EventError`] whose [`ErrorKind`] says why, so the caller can dead-letter it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why an event could not be scored. The wire names (`snake_case`) are part of the
/// dead-letter format and the `reason` label of `scorestream_events_failed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The payload is not valid UTF-8.
    InvalidUtf8,
    /// The payload is not valid JSON (or nests deeper than the parser allows).
    InvalidJson,
    /// Valid JSON that does not match the event schema.
    Schema,
    /// No messages, or the last message is not a non-empty assistant turn.
    InvalidConversation,
    /// The templated conversation does not fit `max_tokens`.
    TooLong,
    /// The payload exceeds the configured size limit.
    Oversized,
    /// The chat template failed to render this conversation.
    Template,
    /// The model failed on the batch holding this event.
    Model,
    /// The sink refused the event's output for good (e.g. larger than the broker's limit).
    Publish,
}

impl ErrorKind {
    /// Every kind, for pre-registering metric label values.
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::InvalidUtf8,
        ErrorKind::InvalidJson,
        ErrorKind::Schema,
        ErrorKind::InvalidConversation,
        ErrorKind::TooLong,
        ErrorKind::Oversized,
        ErrorKind::Template,
        ErrorKind::Model,
        ErrorKind::Publish,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidUtf8 => "invalid_utf8",
            ErrorKind::InvalidJson => "invalid_json",
            ErrorKind::Schema => "schema",
            ErrorKind::InvalidConversation => "invalid_conversation",
            ErrorKind::TooLong => "too_long",
            ErrorKind::Oversized => "oversized",
            ErrorKind::Template => "template",
            ErrorKind::Model => "model",
            ErrorKind::Publish => "publish",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event that could not be scored: the kind, a human-readable message and the id when
/// the payload got far enough to have one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct EventError {
    pub kind: ErrorKind,
    pub message: String,
    pub id: Option<String>,
}

impl EventError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), id: None }
    }

    pub fn with_id(mut self, id: Option<String>) -> Self {
        self.id = id;
        self
    }
}

/// The `error` object of error records and dead letters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
}

impl From<&EventError> for ErrorBody {
    fn from(e: &EventError) -> Self {
        Self { kind: e.kind, message: e.message.clone() }
    }
}

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// A conversation to score, as it arrives on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputEvent {
    pub id: String,
    pub messages: Vec<Message>,
    /// Passed through untouched to the scored event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// Loose view used to recover the id of an event that fails schema validation.
#[derive(Deserialize)]
struct IdOnly {
    id: Option<Value>,
}

impl InputEvent {
    /// Parse and validate one payload. `max_bytes` bounds the payload size (0 = unlimited).
    pub fn parse(bytes: &[u8], max_bytes: usize) -> Result<Self, EventError> {
        if max_bytes > 0 && bytes.len() > max_bytes {
            return Err(EventError::new(
                ErrorKind::Oversized,
                format!("payload is {} bytes, limit is {max_bytes}", bytes.len()),
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            EventError::new(ErrorKind::InvalidUtf8, format!("payload is not UTF-8: {e}"))
        })?;
        // serde_json refuses nesting deeper than 128 levels with an error, never a stack overflow.
        let value: Value = serde_json::from_str(text)
            .map_err(|e| EventError::new(ErrorKind::InvalidJson, format!("invalid JSON: {e}")))?;
        let id = serde_json::from_value::<IdOnly>(value.clone())
            .ok()
            .and_then(|v| v.id)
            .and_then(|v| v.as_str().map(str::to_owned));
        let event: InputEvent = serde_json::from_value(value).map_err(|e| {
            EventError::new(ErrorKind::Schema, format!("event does not match the schema: {e}"))
                .with_id(id.clone())
        })?;
        event.validate().map_err(|e| e.with_id(id))?;
        Ok(event)
    }

    /// The conversation must end with a non-empty assistant turn.
    pub fn validate(&self) -> Result<(), EventError> {
        match self.messages.last() {
            None => Err(EventError::new(ErrorKind::InvalidConversation, "messages is empty")),
            Some(m) if m.role != Role::Assistant => Err(EventError::new(
                ErrorKind::InvalidConversation,
                format!("the last message must be the assistant's, got {}", m.role.as_str()),
            )),
            Some(m) if m.content.trim().is_empty() => Err(EventError::new(
                ErrorKind::InvalidConversation,
                "the last assistant message is empty",
            )),
            Some(_) => Ok(()),
        }
    }
}

/// The model's verdict on one conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// The scalar reward.
    pub reward: f32,
    /// Named outputs for models with more than one output (label, value), in label order.
    pub attributes: Vec<(String, f32)>,
}

/// A scored conversation, as published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoredEvent {
    pub id: String,
    pub reward: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<serde_json::Map<String, Value>>,
    /// Tokens after templating and truncation.
    pub tokens: usize,
    pub truncated: bool,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

impl ScoredEvent {
    pub fn new(event: InputEvent, score: Score, tokens: usize, truncated: bool, model: &str) -> Self {
        let attributes = (!score.attributes.is_empty()).then(|| {
            score
                .attributes
                .into_iter()
                .map(|(k, v)| (k, Value::from(f64::from(v))))
                .collect()
        });
        Self {
            id: event.id,
            reward: score.reward,
            attributes,
            tokens,
            truncated,
            model: model.to_owned(),
            metadata: event.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_valid_event() {
        let e = InputEvent::parse(
            br#"{"id":"a","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}],"metadata":{"k":1}}"#,
            0,
        )
        .unwrap();
        assert_eq!(e.id, "a");
        assert_eq!(e.messages.len(), 2);
        assert_eq!(e.metadata, Some(serde_json::json!({"k":1})));
    }

    #[test]
    fn classifies_bad_input() {
        let kind = |b: &[u8]| InputEvent::parse(b, 1000).unwrap_err().kind;
        assert_eq!(kind(b"\xff\xfe"), ErrorKind::InvalidUtf8);
        assert_eq!(kind(b"{not json"), ErrorKind::InvalidJson);
        assert_eq!(kind(br#"{"id":"x"}"#), ErrorKind::Schema);
        assert_eq!(kind(br#"{"id":"x","messages":[]}"#), ErrorKind::InvalidConversation);
        assert_eq!(
            kind(br#"{"id":"x","messages":[{"role":"assistant","content":"hi"},{"role":"user","content":"q"}]}"#),
            ErrorKind::InvalidConversation
        );
        assert_eq!(kind(&[b' '; 2000]), ErrorKind::Oversized);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(InputEvent::parse(deep.as_bytes(), 0).unwrap_err().kind, ErrorKind::InvalidJson);
    }

    #[test]
    fn schema_errors_keep_the_id() {
        let e = InputEvent::parse(br#"{"id":"x","messages":[{"role":"bot","content":"?"}]}"#, 0)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Schema);
        assert_eq!(e.id.as_deref(), Some("x"));
    }
}
