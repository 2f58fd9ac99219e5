//! The JSON lines the pipeline publishes: scored events, and dead letters that always fit their
//! destination.
//!
//! A dead letter carries the error, the event id when known, the original payload (a string, or
//! base64 with `"payload_encoding": "base64"` when it is not UTF-8) and where the input came
//! from. When the whole line would exceed the destination's message limit, the payload is cut to
//! the longest prefix that fits (at a character boundary) and the line says so:
//! `"payload_truncated": true`, `"payload_bytes"` (the original length) and `"payload_sha256"`
//! (of the original bytes), so the input can still be found and checked.

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::event::{ErrorBody, EventError, InputEvent, Score, ScoredEvent};
use crate::record::Origin;

/// The scored event's JSON line.
pub(crate) fn scored_payload(event: InputEvent, score: Score, tokens: usize, truncated: bool, model: &str) -> Bytes {
    let scored = ScoredEvent::new(event, score, tokens, truncated, model);
    // Serializing a struct of strings, numbers and JSON values cannot fail.
    Bytes::from(serde_json::to_vec(&scored).unwrap_or_default())
}

/// The dead letter's JSON line, at most `limit` bytes when given (see the module doc). Only a
/// limit smaller than the line without any payload is exceeded.
pub(crate) fn dead_letter_payload(error: &EventError, payload: &[u8], origin: &Origin, limit: Option<usize>) -> Bytes {
    let text = std::str::from_utf8(payload).ok();
    let whole = render(error, origin, text, payload, None);
    let Some(limit) = limit.filter(|l| whole.len() > *l) else { return whole };
    let digest = Sha256::digest(payload);
    let cut = Cut { original_len: payload.len(), sha256: digest.iter().map(|b| format!("{b:02x}")).collect() };
    let at = |n: usize| -> Bytes {
        match text {
            Some(t) => {
                let mut n = n.min(t.len());
                while !t.is_char_boundary(n) {
                    n -= 1;
                }
                render(error, origin, Some(&t[..n]), &payload[..n], Some(&cut))
            }
            None => render(error, origin, None, &payload[..n], Some(&cut)),
        }
    };
    // The longest prefix whose line fits: the line's length grows with the prefix.
    let (mut lo, mut hi) = (0usize, payload.len());
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if at(mid).len() <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    at(lo)
}

/// `scorestream score`'s error record: `{"id"?, "line", "error"}`, `line` counting from 1 (for
/// an input that did not come from a file, no `line`). The input itself stays in the input file.
pub(crate) fn error_record(error: &EventError, origin: &Origin) -> Bytes {
    let mut obj = serde_json::Map::new();
    if let Some(id) = &error.id {
        obj.insert("id".into(), Value::String(id.clone()));
    }
    if let Origin::File { line, .. } = origin {
        obj.insert("line".into(), json!(line));
    }
    obj.insert("error".into(), serde_json::to_value(ErrorBody::from(error)).unwrap_or(Value::Null));
    Bytes::from(serde_json::to_vec(&Value::Object(obj)).unwrap_or_default())
}

/// How a payload was cut to fit.
struct Cut {
    original_len: usize,
    sha256: String,
}

fn render(error: &EventError, origin: &Origin, text: Option<&str>, bytes: &[u8], cut: Option<&Cut>) -> Bytes {
    let mut obj = serde_json::Map::new();
    obj.insert("error".into(), serde_json::to_value(ErrorBody::from(error)).unwrap_or(Value::Null));
    if let Some(id) = &error.id {
        obj.insert("id".into(), Value::String(id.clone()));
    }
    match text {
        Some(text) => {
            obj.insert("payload".into(), Value::String(text.to_owned()));
        }
        None => {
            obj.insert("payload".into(), json!(base64::engine::general_purpose::STANDARD.encode(bytes)));
            obj.insert("payload_encoding".into(), json!("base64"));
        }
    }
    if let Some(cut) = cut {
        obj.insert("payload_truncated".into(), json!(true));
        obj.insert("payload_bytes".into(), json!(cut.original_len));
        obj.insert("payload_sha256".into(), json!(cut.sha256));
    }
    obj.insert("source".into(), origin.to_json());
    Bytes::from(serde_json::to_vec(&Value::Object(obj)).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ErrorKind;

    fn nats(sequence: u64) -> Origin {
        Origin::Nats { stream: "S".into(), stream_created: 5, consumer: "c".into(), sequence: Some(sequence), delivered: 1 }
    }

    #[test]
    fn dead_letters_keep_the_payload_and_origin() {
        let e = EventError::new(ErrorKind::Schema, "bad").with_id(Some("x".into()));
        let v: Value = serde_json::from_slice(&dead_letter_payload(&e, b"{\"id\":\"x\"}", &nats(7), None)).unwrap();
        assert_eq!(
            v,
            json!({"error": {"kind": "schema", "message": "bad"}, "id": "x", "payload": "{\"id\":\"x\"}",
                   "source": {"stream": "S", "consumer": "c", "sequence": 7, "delivered": 1}})
        );
        let e = EventError::new(ErrorKind::InvalidUtf8, "no");
        let origin = Origin::Kafka { topic: "t".into(), partition: 2, offset: 9, epoch: 0 };
        let v: Value = serde_json::from_slice(&dead_letter_payload(&e, b"\xff\x00", &origin, Some(1000))).unwrap();
        assert_eq!(v["payload"], "/wA=");
        assert_eq!(v["payload_encoding"], "base64");
        assert_eq!(v["source"], json!({"topic": "t", "partition": 2, "offset": 9}));
        assert!(v.get("id").is_none() && v.get("payload_truncated").is_none());
    }

    #[test]
    fn error_records_name_the_line_and_keep_no_payload() {
        let e = EventError::new(ErrorKind::Schema, "bad").with_id(Some("x".into()));
        let file = Origin::File { path: "in.jsonl".into(), line: 4 };
        assert_eq!(
            std::str::from_utf8(&error_record(&e, &file)).unwrap(),
            r#"{"id":"x","line":4,"error":{"kind":"schema","message":"bad"}}"#
        );
        let v: Value = serde_json::from_slice(&error_record(&EventError::new(ErrorKind::InvalidJson, "no"), &nats(1))).unwrap();
        assert_eq!(v, json!({"error": {"kind": "invalid_json", "message": "no"}}));
    }

    #[test]
    fn a_dead_letter_is_cut_to_fit_its_limit() {
        // Escaping doubles the size of this payload: `9"` becomes `9\"` in a JSON string, and
        // the input's own escapes double again.
        let payload = format!(r#"{{"id":"big","messages":[{{"role":"user","content":"{}"}}]}}"#, r#"9\""#.repeat(5000));
        let e = EventError::new(ErrorKind::TooLong, "too long").with_id(Some("big".into()));
        let whole = dead_letter_payload(&e, payload.as_bytes(), &nats(1), None);
        assert!(whole.len() > payload.len());
        for limit in [whole.len() - 1, 20_000, 5_000, 400] {
            let line = dead_letter_payload(&e, payload.as_bytes(), &nats(1), Some(limit));
            assert!(line.len() <= limit && line.len() + 8 > limit, "{} for limit {limit}", line.len());
            let v: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["payload_truncated"], true);
            assert_eq!(v["payload_bytes"], payload.len());
            let sha: String = Sha256::digest(payload.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(v["payload_sha256"], sha);
            assert!(payload.starts_with(v["payload"].as_str().unwrap()));
            assert_eq!(v["id"], "big");
        }
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        let payload = "é".repeat(1000);
        let e = EventError::new(ErrorKind::InvalidJson, "no");
        let v: Value = serde_json::from_slice(&dead_letter_payload(&e, payload.as_bytes(), &nats(2), Some(601))).unwrap();
        let kept = v["payload"].as_str().unwrap();
        assert!(!kept.is_empty() && payload.starts_with(kept));
        // Not even the envelope fits: the smallest line is returned.
        let tiny = dead_letter_payload(&e, payload.as_bytes(), &nats(2), Some(10));
        let v: Value = serde_json::from_slice(&tiny).unwrap();
        assert_eq!(v["payload"], "");
    }
}
