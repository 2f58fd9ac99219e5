//! Routing of scored events: ordered `[[route]]` rules, each a CEL expression over the scored
//! event as published and a destination (a named sink of `[sinks.<name>]`, or `drop`).
//!
//! The expressions are compiled once, when the config is validated and again when the worker
//! starts; the first rule whose expression is `true` wins and an event no rule matches goes to
//! the default `[sink]`. An expression sees the top-level fields of the published JSON line
//! (`reward`, `attributes`, `tokens`, `truncated`, `model`, `metadata`, `id`, and whatever a
//! best-of-N record carries); a field the event does not have is absent, so `has(...)` tests
//! for it. An expression that fails on an event (a missing field, a wrong type, a result that is
//! not a boolean) is that event's failure: the pipeline dead-letters it with kind `route`.

use std::collections::BTreeMap;

use cel::{Context, Program, Value};

use crate::config::RouteRule;

/// The destination name that discards an event (it counts as delivered).
pub const DROP: &str = "drop";
/// The `route` label of events no rule matched.
pub const DEFAULT: &str = "default";

/// A rule that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route[{index}].when: {message}")]
    Expression { index: usize, message: String },
    #[error("route[{index}].to: no sink named {name:?} (name one of [sinks.<name>] or \"drop\")")]
    UnknownSink { index: usize, name: String },
}

/// Where one scored event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The default `[sink]`: no rule matched.
    Default,
    /// The named sink at this index of [`Router::names`].
    Sink(usize),
    /// Discarded; counts as delivered.
    Drop,
}

/// The compiled rules.
#[derive(Default)]
pub struct Router {
    rules: Vec<(Program, Route)>,
    names: Vec<String>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("rules", &self.rules.len()).field("names", &self.names).finish()
    }
}

impl Router {
    /// Compile `rules` against the named sinks `sinks` (their names, in the order the pipeline
    /// holds them).
    pub fn compile<'a>(rules: &[RouteRule], sinks: impl IntoIterator<Item = &'a String>) -> Result<Self, RouteError> {
        let names: Vec<String> = sinks.into_iter().cloned().collect();
        let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, rule) in rules.iter().enumerate() {
            let program = Program::compile(&rule.when)
                .map_err(|e| RouteError::Expression { index: i, message: e.to_string() })?;
            let route = match (rule.to.as_str(), index.get(rule.to.as_str())) {
                (DROP, _) => Route::Drop,
                (_, Some(&n)) => Route::Sink(n),
                (name, None) => return Err(RouteError::UnknownSink { index: i, name: name.to_owned() }),
            };
            compiled.push((program, route));
        }
        Ok(Self { rules: compiled, names })
    }

    /// Whether there is any rule (without rules every event goes to the default sink).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The named sinks' names, by index.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The `route` label of `route`.
    pub fn label(&self, route: Route) -> &str {
        match route {
            Route::Default => DEFAULT,
            Route::Drop => DROP,
            Route::Sink(i) => self.names.get(i).map_or(DEFAULT, String::as_str),
        }
    }

    /// The route of a scored event from `origin`: posted events (`/v1/score`) are answered to
    /// their request, never routed.
    pub fn route_from(&self, origin: &crate::record::Origin, scored: &[u8]) -> Result<Route, String> {
        match origin {
            crate::record::Origin::Http { .. } => Ok(Route::Default),
            _ => self.route(scored),
        }
    }

    /// The route of the scored event whose JSON line is `scored`; `Err` with the message when a
    /// rule's expression fails on it.
    pub fn route(&self, scored: &[u8]) -> Result<Route, String> {
        if self.rules.is_empty() {
            return Ok(Route::Default);
        }
        let fields: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(scored).map_err(|e| format!("the scored event is not a JSON object: {e}"))?;
        let mut context = Context::default();
        for (name, value) in fields {
            let value = cel::to_value(&value).map_err(|e| format!("field {name}: {e}"))?;
            context.add_variable_from_value(name, value);
        }
        for (i, (program, route)) in self.rules.iter().enumerate() {
            match program.execute(&context) {
                Ok(Value::Bool(true)) => return Ok(*route),
                Ok(Value::Bool(false)) => {}
                Ok(other) => return Err(format!("route[{i}].when gave {other:?}, not a boolean")),
                Err(e) => return Err(format!("route[{i}].when: {e}")),
            }
        }
        Ok(Route::Default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(when: &str, to: &str) -> RouteRule {
        RouteRule { when: when.into(), to: to.into() }
    }

    fn router(rules: &[RouteRule]) -> Router {
        Router::compile(rules, &["review".to_owned(), "archive".to_owned()]).unwrap()
    }

    #[test]
    fn the_first_matching_rule_wins_and_no_match_is_the_default() {
        let r = router(&[
            rule("reward < 0.2", "review"),
            rule("metadata.tier == 'free' && reward < 0.5", "drop"),
            rule("reward < 0.5", "archive"),
        ]);
        let line = |reward: f64, tier: &str| format!(r#"{{"id":"a","reward":{reward},"tokens":3,"truncated":false,"model":"m","metadata":{{"tier":"{tier}"}}}}"#);
        assert_eq!(r.route(line(0.1, "free").as_bytes()), Ok(Route::Sink(0)));
        assert_eq!(r.route(line(0.3, "free").as_bytes()), Ok(Route::Drop));
        assert_eq!(r.route(line(0.3, "paid").as_bytes()), Ok(Route::Sink(1)));
        assert_eq!(r.route(line(0.9, "paid").as_bytes()), Ok(Route::Default));
        assert_eq!(r.label(Route::Sink(1)), "archive");
    }

    #[test]
    fn attributes_tokens_and_truncated_are_visible() {
        let r = router(&[rule("attributes.helpfulness > 0.5 && tokens >= 3 && !truncated && model == 'm'", "review")]);
        let line = br#"{"id":"a","reward":0.1,"attributes":{"helpfulness":0.75},"tokens":3,"truncated":false,"model":"m"}"#;
        assert_eq!(r.route(line), Ok(Route::Sink(0)));
    }

    #[test]
    fn a_failing_expression_is_the_events_error() {
        let r = router(&[rule("metadata.tier == 'free'", "review")]);
        let err = r.route(br#"{"id":"a","reward":0.1,"tokens":3,"truncated":false,"model":"m"}"#).unwrap_err();
        assert!(err.contains("route[0].when"), "{err}");
        let r = router(&[rule("reward", "review")]);
        let err = r.route(br#"{"id":"a","reward":0.1,"tokens":3,"truncated":false,"model":"m"}"#).unwrap_err();
        assert!(err.contains("not a boolean"), "{err}");
    }

    #[test]
    fn bad_expressions_and_unknown_sinks_name_the_rule() {
        let err = Router::compile(&[rule("reward < 1", "drop"), rule("reward <", "review")], &["review".to_owned()])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("route[1].when: "), "{err}");
        let err = Router::compile(&[rule("reward < 1", "nowhere")], &["review".to_owned()]).unwrap_err().to_string();
        assert!(err.contains("route[0].to") && err.contains("nowhere"), "{err}");
    }
}
