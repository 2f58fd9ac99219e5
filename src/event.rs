//! Input events, scored events and error records: parsing, validation and serialization.
//!
//! Parsing never panics: any byte string either becomes an [`InputEvent`] or an
//! [`EventError`] whose [`ErrorKind`] says why, so the caller can dead-letter it.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
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
    /// A `[[route]]` expression failed on this event (a missing field, a wrong type).
    Route,
}

impl ErrorKind {
    /// Every kind, for pre-registering metric label values.
    pub(crate) const ALL: [ErrorKind; 10] = [
        ErrorKind::InvalidUtf8,
        ErrorKind::InvalidJson,
        ErrorKind::Schema,
        ErrorKind::InvalidConversation,
        ErrorKind::TooLong,
        ErrorKind::Oversized,
        ErrorKind::Template,
        ErrorKind::Model,
        ErrorKind::Publish,
        ErrorKind::Route,
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
            ErrorKind::Route => "route",
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

    pub(crate) fn with_id(mut self, id: Option<String>) -> Self {
        self.id = id;
        self
    }
}

/// The `error` object of error records and dead letters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct ErrorBody {
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
    pub metadata: Option<Metadata>,
}

/// An event's `metadata`, kept as the JSON text it arrived as: numbers are never converted,
/// so `123456789012345678901234567890` and `-0` leave exactly as they came. Whitespace between
/// tokens is dropped (an output stays one line); every string and number keeps its bytes.
#[derive(Debug, Clone)]
pub struct Metadata(Box<RawValue>);

impl Metadata {
    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Metadata {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        RawValue::from_string(minify(raw.get())).map(Self).map_err(serde::de::Error::custom)
    }
}

/// Valid JSON text without the whitespace between its tokens; strings are copied as they are.
fn minify(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if matches!(c, ' ' | '\t' | '\n' | '\r') {
            continue;
        }
        out.push(c);
    }
    out
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
        // serde_json refuses nesting deeper than 128 levels with an error, never a stack overflow
        // (metadata is skipped over without recursion).
        let invalid = |e: serde_json::Error| EventError::new(ErrorKind::InvalidJson, format!("invalid JSON: {e}"));
        let event: InputEvent = match serde_json::from_str(text) {
            Ok(event) => event,
            Err(e) if e.is_data() => {
                // The first error is a schema one; the text may still not be JSON further on.
                serde_json::from_str::<Value>(text).map_err(invalid)?;
                let id = serde_json::from_str::<IdOnly>(text)
                    .ok()
                    .and_then(|v| v.id)
                    .and_then(|v| v.as_str().map(str::to_owned));
                return Err(EventError::new(ErrorKind::Schema, format!("event does not match the schema: {e}")).with_id(id));
            }
            Err(e) => return Err(invalid(e)),
        };
        event.validate().map_err(|e| e.with_id(Some(event.id.clone())))?;
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

impl Score {
    /// A score is published only when every number in it is finite (JSON has no NaN or
    /// infinity; serde would write `null`). The error names the first bad value.
    pub(crate) fn check_finite(&self) -> Result<(), NonFinite> {
        if !self.reward.is_finite() {
            return Err(NonFinite::Reward(self.reward));
        }
        match self.attributes.iter().find(|(_, v)| !v.is_finite()) {
            Some((name, v)) => Err(NonFinite::Attribute { name: name.clone(), value: *v }),
            None => Ok(()),
        }
    }
}

/// A score that cannot be published: a value is NaN or infinite.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NonFinite {
    #[error("the model produced a non-finite reward ({0})")]
    Reward(f32),
    #[error("the model produced a non-finite value for attribute {name:?} ({value})")]
    Attribute { name: String, value: f32 },
}

impl From<NonFinite> for EventError {
    /// A non-finite score is a `model` error of its event.
    fn from(e: NonFinite) -> Self {
        EventError::new(ErrorKind::Model, e.to_string())
    }
}

/// A scored conversation, as published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct ScoredEvent {
    pub id: String,
    pub reward: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<serde_json::Map<String, Value>>,
    /// Tokens after templating and truncation.
    pub tokens: usize,
    pub truncated: bool,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
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
        assert_eq!(e.metadata.as_ref().map(Metadata::get), Some(r#"{"k":1}"#));
    }

    #[test]
    fn metadata_passes_through_byte_exact() {
        let line = br#"{"id":"m","messages":[{"role":"assistant","content":"a"}],"metadata":{"big":123456789012345678901234567890, "neg0":-0,"f":1.50e3,"s":"a \" b  c","n":[ -0.0 , 1E400 ]}}"#;
        let event = InputEvent::parse(line, 0).unwrap();
        let score = Score { reward: 0.5, attributes: Vec::new() };
        let out = serde_json::to_string(&ScoredEvent::new(event, score, 3, false, "m")).unwrap();
        let want = r#""metadata":{"big":123456789012345678901234567890,"neg0":-0,"f":1.50e3,"s":"a \" b  c","n":[-0.0,1E400]}}"#;
        assert!(out.ends_with(want), "{out}");
    }

    #[test]
    fn non_finite_scores_are_refused() {
        let ok = Score { reward: 1.0, attributes: vec![("a".into(), 2.0)] };
        assert!(ok.check_finite().is_ok());
        assert!(Score { reward: f32::NAN, ..ok.clone() }.check_finite().unwrap_err().to_string().contains("reward"));
        assert!(Score { reward: 1.0, attributes: vec![("a".into(), f32::INFINITY)] }.check_finite().unwrap_err().to_string().contains("\"a\""));
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
        // A schema mistake before a syntax error is still invalid JSON.
        assert_eq!(kind(br#"{"id":1,"messages":[}"#), ErrorKind::InvalidJson);
        let deep_meta = format!(r#"{{"id":"d","messages":[{{"role":"assistant","content":"a"}}],"metadata":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
        assert!(InputEvent::parse(deep_meta.as_bytes(), 0).is_ok(), "deep metadata is carried, not recursed into");
    }

    #[test]
    fn schema_errors_keep_the_id() {
        let e = InputEvent::parse(br#"{"id":"x","messages":[{"role":"bot","content":"?"}]}"#, 0)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Schema);
        assert_eq!(e.id.as_deref(), Some("x"));
    }
}
