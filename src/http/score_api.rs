//! `POST /v1/score`: score events over HTTP with the worker's resident model.
//!
//! The body is one JSON event, a JSON array of events, or JSONL (one event a line); the answer
//! has the same shape (an object, an array, JSONL) with one result per event, in order, each the
//! JSON line the stream would publish: the scored event, or for an invalid event its error
//! record (`{"error": {...}, "payload", "source": {"http": ...}}`), the request still 200.
//! Posted events join the stream's micro-batches through the pipeline's HTTP lane
//! ([`crate::source::http`]). Limits: the body (`http.max_body_bytes`, else 413), the events
//! waiting at a time (`http.max_pending_events`, else 429 with `Retry-After`), the time the body
//! takes to arrive (`http.body_timeout`, else 408), and, with `http.token_file`, a bearer token
//! (else 401).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::value::RawValue;

use crate::source::http::{HttpLane, Refusal};

/// What `/v1/score` needs.
#[derive(Clone)]
pub struct ScoreApi {
    pub lane: HttpLane,
    pub max_body_bytes: usize,
    /// How long a body may take to arrive once its header is in (`http.body_timeout`).
    pub body_timeout: std::time::Duration,
    /// The bearer token requests must carry, when set.
    pub token: Option<Arc<str>>,
}

/// The shape of a request's body, which the answer follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    One,
    Array,
    Lines,
}

/// The events of a body and its shape: a JSON array, one JSON value, else JSONL (blank lines
/// skipped; a line that is not JSON is still an event, whose result is its error record).
/// A body sent as JSONL (`Content-Type: application/x-ndjson` or `application/jsonl`) is always
/// read as lines, so that a one-line body, or lines that together happen to form one JSON value,
/// mean what they would mean in a file given to `scorestream score`.
fn split(body: &Bytes, jsonl: bool) -> (Shape, Vec<Bytes>) {
    let trimmed = body.trim_ascii_start();
    if !jsonl && trimmed.first() == Some(&b'[') {
        if let Ok(items) = serde_json::from_slice::<Vec<&RawValue>>(body) {
            let events = items.iter().map(|r| Bytes::copy_from_slice(r.get().as_bytes())).collect();
            return (Shape::Array, events);
        }
    }
    if !jsonl && serde_json::from_slice::<&RawValue>(body).is_ok() {
        return (Shape::One, vec![body.clone()]);
    }
    let lines = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty())
        .map(|l| body.slice_ref(l.strip_suffix(b"\r").unwrap_or(l)))
        .collect();
    (Shape::Lines, lines)
}

fn join(shape: Shape, results: Vec<Bytes>) -> (Vec<u8>, &'static str) {
    let sep: &[u8] = if shape == Shape::Lines { b"\n" } else { b"," };
    let mut out = Vec::with_capacity(results.iter().map(|r| r.len() + 1).sum::<usize>() + 2);
    if shape == Shape::Array {
        out.push(b'[');
    }
    for (i, r) in results.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(sep);
        }
        out.extend_from_slice(r);
    }
    match shape {
        Shape::Array => out.push(b']'),
        Shape::Lines => out.push(b'\n'),
        Shape::One => {}
    }
    let content_type = if shape == Shape::Lines { "application/x-ndjson" } else { "application/json" };
    (out, content_type)
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    (status, format!("{}\n", message.into())).into_response()
}

fn authorized(api: &ScoreApi, headers: &HeaderMap) -> bool {
    let Some(token) = &api.token else { return true };
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some(given) = given.strip_prefix("Bearer ") else { return false };
    // Same time whatever the first difference, so the token cannot be guessed byte by byte.
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The `POST /v1/score` handler.
pub async fn score(State(api): State<ScoreApi>, headers: HeaderMap, body: Body) -> Response {
    if !authorized(&api, &headers) {
        let mut r = plain(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    // A slow body holds its connection only: its events are submitted once it is whole, so it
    // never holds pending places or a batch.
    let body = match tokio::time::timeout(api.body_timeout, axum::body::to_bytes(body, api.max_body_bytes)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is over {} bytes", api.max_body_bytes))
        }
        Err(_) => {
            let mut r = plain(StatusCode::REQUEST_TIMEOUT, format!("the body did not arrive within {:?}", api.body_timeout));
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    };
    let jsonl = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/x-ndjson") || t.starts_with("application/jsonl"));
    let (shape, events) = split(&body, jsonl);
    if events.is_empty() {
        return plain(StatusCode::BAD_REQUEST, "no events in the body");
    }
    let reservation = match api.lane.reserve(events.len()) {
        Ok(r) => r,
        Err(Refusal::TooMany { max }) => {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, format!("more than {max} events in one request"))
        }
        Err(_) => {
            let mut r = plain(StatusCode::TOO_MANY_REQUESTS, "too many events waiting; retry later");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    };
    match api.lane.score(&reservation, events).await {
        Ok(results) => {
            let (body, content_type) = join(shape, results);
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Err(_) => plain(StatusCode::SERVICE_UNAVAILABLE, "the worker is stopping"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_one_event_an_array_or_lines() {
        let (shape, events) = split(&Bytes::from_static(br#" {"id":"a"} "#), false);
        assert_eq!((shape, events.len()), (Shape::One, 1));
        let (shape, events) = split(&Bytes::from_static(br#"[{"id":"a"}, {"id":"b"}]"#), false);
        assert_eq!(shape, Shape::Array);
        assert_eq!(events, [Bytes::from_static(br#"{"id":"a"}"#), Bytes::from_static(br#"{"id":"b"}"#)]);
        let (shape, events) = split(&Bytes::from_static(b"{\"id\":\"a\"}\r\n\n{oops\n"), false);
        assert_eq!(shape, Shape::Lines);
        assert_eq!(events, [Bytes::from_static(br#"{"id":"a"}"#), Bytes::from_static(b"{oops")]);
        assert!(split(&Bytes::from_static(b" \n "), false).1.is_empty());
    }

    #[test]
    fn a_jsonl_body_is_always_lines() {
        let (shape, events) = split(&Bytes::from_static(br#"[{"id":"a"}, {"id":"b"}]"#), true);
        assert_eq!((shape, events.len()), (Shape::Lines, 1), "one line, one (invalid) event");
        let (shape, events) = split(&Bytes::from_static(b"{\"id\":\n\"a\"}\n"), true);
        assert_eq!((shape, events.len()), (Shape::Lines, 2), "two lines that form one JSON value are two events");
    }

    #[test]
    fn answers_follow_the_shape() {
        let r = || vec![Bytes::from_static(b"{}"), Bytes::from_static(b"[]")];
        assert_eq!(join(Shape::Array, r()).0, b"[{},[]]");
        assert_eq!(join(Shape::Lines, r()).0, b"{}\n[]\n");
        assert_eq!(join(Shape::One, vec![Bytes::from_static(b"{}")]).0, b"{}");
    }
}
