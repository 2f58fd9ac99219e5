//! Best-of-N events: one conversation prompt (`messages`, ending with a user turn) and N
//! candidate answers, each scored as the conversation `messages + candidate`, exactly as if it
//! had come alone, and returned ranked in one output.
//!
//! A candidate that cannot be scored (too long, template error, an invalid answer) gets an
//! `error` entry in its place; the others are still scored and ranked. An event invalid as a
//! whole (no candidates, more than `max_candidates`, messages not ending with a user turn) is an
//! [`EventError`] (`schema` / `invalid_conversation`), dead-lettered like any other. The prepare
//! stage expands an event into its conversations; the publish stage ranks their scores.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{ErrorBody, ErrorKind, EventError, InputEvent, Message, Metadata, Role, Score};

/// One candidate answer: its text (one assistant turn) or its turns.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Candidate {
    /// Defaults to the candidate's index.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
}

/// A best-of-N event as it arrives on the wire.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BestOfNEvent {
    pub id: String,
    pub messages: Vec<Message>,
    pub candidates: Vec<Candidate>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
}

/// Either kind of input event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Single(InputEvent),
    BestOfN(BestOfNEvent),
}

/// Which form a payload takes: it has `candidates` or not.
#[derive(Deserialize)]
struct Probe {
    candidates: Option<serde::de::IgnoredAny>,
}

impl Event {
    /// Parse and validate one payload of either form; errors as [`InputEvent::parse`].
    pub fn parse(bytes: &[u8], max_bytes: usize, max_candidates: usize) -> Result<Self, EventError> {
        // Only an object can be a best-of-N event (serde would also read a struct from an
        // array); anything else gets the ordinary parser's errors.
        let object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let oversized = max_bytes > 0 && bytes.len() > max_bytes;
        if oversized || !object || !serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| p.candidates.is_some()) {
            return InputEvent::parse(bytes, max_bytes).map(Event::Single);
        }
        let event: BestOfNEvent = serde_json::from_slice(bytes).map_err(|e| {
            let id = serde_json::from_slice::<Value>(bytes).ok().and_then(|v| v["id"].as_str().map(str::to_owned));
            EventError::new(ErrorKind::Schema, format!("best-of-N event does not match the schema: {e}")).with_id(id)
        })?;
        event.validate(max_candidates).map_err(|e| e.with_id(Some(event.id.clone())))?;
        Ok(Event::BestOfN(event))
    }
}

impl BestOfNEvent {
    /// Candidates 1 to `max_candidates`; messages ending with a user turn.
    pub fn validate(&self, max_candidates: usize) -> Result<(), EventError> {
        let n = self.candidates.len();
        if n == 0 || n > max_candidates {
            return Err(EventError::new(ErrorKind::Schema, format!("{n} candidates; an event takes 1 to {max_candidates}")));
        }
        match self.messages.last() {
            Some(m) if m.role == Role::User => Ok(()),
            Some(m) => Err(EventError::new(
                ErrorKind::InvalidConversation,
                format!("the messages before the candidates must end with a user turn, got {}", m.role.as_str()),
            )),
            None => Err(EventError::new(ErrorKind::InvalidConversation, "messages is empty")),
        }
    }

    /// Candidate `i`'s id: its own, or its index.
    pub(crate) fn candidate_id(&self, i: usize) -> String {
        self.candidates[i].id.clone().unwrap_or_else(|| i.to_string())
    }

    /// Each candidate as the conversation it is scored as (`messages + candidate`), or why it
    /// cannot be one.
    pub fn conversations(&self) -> Vec<Result<InputEvent, EventError>> {
        (0..self.candidates.len())
            .map(|i| {
                let c = &self.candidates[i];
                let answer = match (&c.content, &c.messages) {
                    (Some(text), None) => vec![Message { role: Role::Assistant, content: text.clone() }],
                    (None, Some(turns)) => turns.clone(),
                    _ => return Err(EventError::new(ErrorKind::Schema, "a candidate has `content` or `messages`, not both or neither")),
                };
                let event = InputEvent {
                    id: self.candidate_id(i),
                    messages: self.messages.iter().cloned().chain(answer).collect(),
                    metadata: None,
                };
                event.validate()?;
                Ok(event)
            })
            .collect()
    }
}

/// One candidate's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub(crate) enum CandidateResult {
    Scored {
        id: String,
        reward: f32,
        #[serde(skip_serializing_if = "Option::is_none")]
        attributes: Option<serde_json::Map<String, Value>>,
        tokens: usize,
        truncated: bool,
    },
    Failed {
        id: String,
        error: ErrorBody,
    },
}

/// A ranked best-of-N event, as published.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RankedEvent {
    pub id: String,
    pub candidates: Vec<CandidateResult>,
    /// Indices of the scored candidates, best first (ties keep input order).
    pub ranking: Vec<usize>,
    /// The best candidate's index; `null` when none could be scored.
    pub best: Option<usize>,
    /// Best reward minus the second's; `null` with fewer than two scored.
    pub margin: Option<f32>,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

/// What became of one candidate: its score with its tokens and truncation flag, or an error.
pub(crate) type Outcome = Result<(Score, usize, bool), EventError>;

impl RankedEvent {
    /// Rank `outcomes` (one per candidate, in order). A non-finite score is that candidate's
    /// `model` error.
    pub fn new(event: BestOfNEvent, outcomes: Vec<Outcome>, model: &str) -> Self {
        let candidates: Vec<CandidateResult> = outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                let id = event.candidate_id(i);
                let o = o.and_then(|s| s.0.check_finite().map(|()| s).map_err(EventError::from));
                match o {
                    Ok((score, tokens, truncated)) => CandidateResult::Scored {
                        id,
                        reward: score.reward,
                        attributes: (!score.attributes.is_empty())
                            .then(|| score.attributes.into_iter().map(|(k, v)| (k, Value::from(f64::from(v)))).collect()),
                        tokens,
                        truncated,
                    },
                    Err(e) => CandidateResult::Failed { id, error: (&e).into() },
                }
            })
            .collect();
        let reward = |i: usize| match &candidates[i] {
            CandidateResult::Scored { reward, .. } => Some(*reward),
            CandidateResult::Failed { .. } => None,
        };
        let mut ranking: Vec<usize> = (0..candidates.len()).filter(|&i| reward(i).is_some()).collect();
        ranking.sort_by(|&a, &b| reward(b).partial_cmp(&reward(a)).unwrap_or(std::cmp::Ordering::Equal));
        let margin = match ranking.as_slice() {
            [a, b, ..] => reward(*a).zip(reward(*b)).map(|(a, b)| a - b),
            _ => None,
        };
        Self {
            id: event.id,
            best: ranking.first().copied(),
            candidates,
            ranking,
            margin,
            model: model.to_owned(),
            metadata: event.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMPT: &str = r#""messages":[{"role":"user","content":"2+2?"}]"#;

    fn parse(s: &str) -> Result<Event, EventError> {
        Event::parse(s.as_bytes(), 0, 3)
    }

    #[test]
    fn events_with_candidates_are_best_of_n_and_others_are_single() {
        let e = parse(&format!(r#"{{"id":"b",{PROMPT},"candidates":[{{"content":"4"}},{{"id":"x","messages":[{{"role":"assistant","content":"5"}}]}}]}}"#)).unwrap();
        let Event::BestOfN(e) = e else { panic!("{e:?}") };
        let convs = e.conversations();
        assert_eq!(convs[0].as_ref().unwrap().id, "0");
        assert_eq!(convs[1].as_ref().unwrap().messages.len(), 2);
        assert_eq!(convs[1].as_ref().unwrap().id, "x");
        assert!(matches!(parse(r#"{"id":"s","messages":[{"role":"assistant","content":"a"}]}"#), Ok(Event::Single(_))));
        // An array is never read as a best-of-N event (serde reads structs from arrays too).
        assert_eq!(parse(r#"[[{"content":"4"}]]"#).unwrap_err().kind, ErrorKind::Schema);
        assert_eq!(parse(&format!("{}{}", "[".repeat(5000), "]".repeat(5000))).unwrap_err().kind, ErrorKind::InvalidJson);
    }

    #[test]
    fn an_event_invalid_as_a_whole_is_refused_and_a_bad_candidate_is_not() {
        let kind = |s: &str| parse(s).unwrap_err().kind;
        assert_eq!(kind(&format!(r#"{{"id":"b",{PROMPT},"candidates":[]}}"#)), ErrorKind::Schema);
        let four = r#"[{"content":"1"},{"content":"2"},{"content":"3"},{"content":"4"}]"#;
        assert_eq!(kind(&format!(r#"{{"id":"b",{PROMPT},"candidates":{four}}}"#)), ErrorKind::Schema);
        let after_assistant = r#""messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]"#;
        let e = parse(&format!(r#"{{"id":"b",{after_assistant},"candidates":[{{"content":"4"}}]}}"#)).unwrap_err();
        assert_eq!((e.kind, e.id.as_deref()), (ErrorKind::InvalidConversation, Some("b")));
        assert_eq!(kind(&format!(r#"{{"id":"b",{PROMPT},"candidates":[{{"text":"4"}}]}}"#)), ErrorKind::Schema);
        let Ok(Event::BestOfN(e)) = parse(&format!(r#"{{"id":"b",{PROMPT},"candidates":[{{"content":" "}},{{}}]}}"#)) else { panic!() };
        let kinds: Vec<ErrorKind> = e.conversations().into_iter().map(|c| c.unwrap_err().kind).collect();
        assert_eq!(kinds, vec![ErrorKind::InvalidConversation, ErrorKind::Schema]);
    }

    #[test]
    fn candidates_are_ranked_best_first_with_errors_in_place() {
        let Ok(Event::BestOfN(e)) = parse(&format!(r#"{{"id":"b",{PROMPT},"candidates":[{{"content":"a"}},{{"content":"b"}},{{"content":"c"}}],"metadata":{{"k":1}}}}"#)) else { panic!() };
        let s = |r: f32| Ok((Score { reward: r, attributes: Vec::new() }, 5, false));
        let out = RankedEvent::new(e, vec![s(0.5), Err(EventError::new(ErrorKind::TooLong, "long")), s(2.0)], "m");
        assert_eq!((out.ranking.clone(), out.best, out.margin), (vec![2, 0], Some(2), Some(1.5)));
        let json = serde_json::to_string(&out).unwrap();
        assert!(json.contains(r#"{"id":"1","error":{"kind":"too_long","message":"long"}}"#), "{json}");
        assert!(json.ends_with(r#""best":2,"margin":1.5,"model":"m","metadata":{"k":1}}"#), "{json}");
    }
}
