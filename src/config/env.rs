//! Environment overlay: `SCORESTREAM__<SECTION>__<KEY>=value` sets `<section>.<key>` (any depth,
//! one `__` per level; names are lower-cased).
//!
//! A value is read against the config's own types: where the schema takes a string, the text
//! stays a string as written (`transactional_id = 42` is `"42"`, a password `1e3` stays `1e3`);
//! elsewhere a value that reads as TOML (`256`, `true`, `["cpu", "cuda:0"]`) is taken as that.
//! serde cannot say which type a field wants without trying (sections chosen by `type` are
//! buffered before their fields are seen), so each override whose text also reads as a TOML
//! non-string is tried both ways and the first assignment that deserializes wins, text first.

use serde::de::DeserializeOwned;

use super::ConfigError;

/// Prefix of the variables the overlay reads.
pub const ENV_PREFIX: &str = "SCORESTREAM__";

/// Overrides whose type is tried both ways, at most; past it, non-strings are taken as TOML.
const MAX_AMBIGUOUS: usize = 10;

/// One `SCORESTREAM__...` variable.
struct Override {
    var: String,
    path: Vec<String>,
    text: String,
    /// The text read as a TOML value other than a string, when it reads as one.
    typed: Option<toml::Value>,
}

/// Overlay every `SCORESTREAM__...` variable in `vars` on `tree` (in name order, so a deeper key
/// applied after its table wins over it) and deserialize the result as `T`.
pub fn overlay<T: DeserializeOwned>(
    tree: toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let overrides = parse(vars)?;
    let ambiguous: Vec<usize> = (0..overrides.len()).filter(|&i| overrides[i].typed.is_some()).collect();
    let deserialize = |typed: &dyn Fn(usize) -> bool| -> Result<T, ConfigError> {
        let mut t = tree.clone();
        apply(&mut t, &overrides, typed)?;
        toml::Value::Table(t).try_into().map_err(|e| ConfigError::Schema { source: Box::new(e) })
    };
    if ambiguous.len() <= MAX_AMBIGUOUS {
        // Assignments with the fewest typed values first: text is kept wherever the schema
        // takes it. `mask` bit j set = ambiguous override j is typed.
        let mut masks: Vec<u32> = (0..1u32 << ambiguous.len()).collect();
        masks.sort_by_key(|m| m.count_ones());
        for mask in masks.into_iter().filter(|m| *m != (1u32 << ambiguous.len()) - 1) {
            let typed = |i: usize| ambiguous.iter().position(|&a| a == i).is_some_and(|j| mask & (1 << j) != 0);
            if let Ok(config) = deserialize(&typed) {
                return Ok(config);
            }
        }
    }
    // Every value typed: the assignment plain TOML would give, and its error if it fails.
    deserialize(&|_| true)
}

fn parse(vars: impl IntoIterator<Item = (String, String)>) -> Result<Vec<Override>, ConfigError> {
    let mut vars: Vec<(String, String)> = vars.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    vars.sort();
    vars.into_iter()
        .map(|(var, text)| {
            let path: Vec<String> = var[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                return Err(ConfigError::Env { var, message: "empty key segment".into() });
            }
            let typed = parse_value(&text).filter(|v| !v.is_str());
            Ok(Override { var, path, text, typed })
        })
        .collect()
}

fn apply(tree: &mut toml::Table, overrides: &[Override], typed: &dyn Fn(usize) -> bool) -> Result<(), ConfigError> {
    for (i, o) in overrides.iter().enumerate() {
        let value = match &o.typed {
            Some(v) if typed(i) => v.clone(),
            _ => parse_value(&o.text).filter(toml::Value::is_str).unwrap_or_else(|| toml::Value::String(o.text.clone())),
        };
        set(tree, &o.path, value).map_err(|message| ConfigError::Env { var: o.var.clone(), message })?;
    }
    Ok(())
}

/// `raw` read as a TOML value (a quoted `"text"` is the string inside the quotes).
fn parse_value(raw: &str) -> Option<toml::Value> {
    format!("v = {raw}").parse::<toml::Table>().ok()?.remove("v")
}

fn set(tree: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("no key")?;
    let mut table = tree;
    for (depth, key) in parents.iter().enumerate() {
        let entry = table.entry(key.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| format!("{} is not a table", path[..=depth].join(".")))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    #[derive(Debug, Deserialize)]
    struct Batch {
        max_batch_events: usize,
        max_wait: Option<String>,
        name: Option<String>,
        flags: Option<Vec<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(tag = "type", rename_all = "lowercase")]
    enum Sink {
        Kafka { topic: String, options: Option<BTreeMap<String, String>>, retries: Option<i64> },
    }

    #[derive(Debug, Deserialize)]
    struct Tree {
        batch: Batch,
        sink: Option<Sink>,
    }

    #[test]
    fn values_follow_the_schema_at_any_depth() {
        let t: toml::Table = "[batch]\nmax_batch_events = 4\n".parse().unwrap();
        let tree: Tree = overlay(
            t,
            vars(&[
                ("SCORESTREAM__BATCH__MAX_BATCH_EVENTS", "8"),
                ("SCORESTREAM__BATCH__MAX_WAIT", "5ms"),
                ("SCORESTREAM__BATCH__NAME", "1e3"),
                ("SCORESTREAM__BATCH__FLAGS", r#"["a", "b"]"#),
                ("SCORESTREAM_LOG", "debug"),
                ("SCORESTREAM__SINK__TYPE", "kafka"),
                ("SCORESTREAM__SINK__TOPIC", "42"),
                ("SCORESTREAM__SINK__RETRIES", "-1"),
                ("SCORESTREAM__SINK__OPTIONS__LINGER.MS", "5"),
                ("SCORESTREAM__SINK__OPTIONS__ENABLE.IDEMPOTENCE", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(tree.batch.max_batch_events, 8);
        assert_eq!(tree.batch.max_wait.as_deref(), Some("5ms"));
        assert_eq!(tree.batch.name.as_deref(), Some("1e3"), "a string field keeps the text as written");
        assert_eq!(tree.batch.flags.map(|f| f.len()), Some(2));
        let Some(Sink::Kafka { topic, options, retries }) = tree.sink else { panic!("kafka sink expected") };
        assert_eq!((topic.as_str(), retries), ("42", Some(-1)), "inside a section chosen by `type` too");
        let options = options.unwrap();
        assert_eq!((options["linger.ms"].as_str(), options["enable.idempotence"].as_str()), ("5", "true"));
    }

    #[test]
    fn a_value_no_type_accepts_reports_the_typed_error() {
        let t: toml::Table = "[batch]\nmax_batch_events = 4\n".parse().unwrap();
        let err = overlay::<Tree>(t, vars(&[("SCORESTREAM__BATCH__MAX_BATCH_EVENTS", "true")])).unwrap_err();
        assert!(err.to_string().contains("invalid type: boolean"), "{err}");
    }

    #[test]
    fn refuses_to_descend_into_a_scalar() {
        let t: toml::Table = "shutdown_timeout = \"3s\"\n".parse().unwrap();
        let err = overlay::<toml::Table>(t, vars(&[("SCORESTREAM__SHUTDOWN_TIMEOUT__X", "1")])).unwrap_err();
        assert!(err.to_string().contains("shutdown_timeout is not a table"), "{err}");
    }
}
