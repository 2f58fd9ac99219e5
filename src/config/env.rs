//! Environment overlay: `SCORESTREAM__<SECTION>__<KEY>=value` sets `<section>.<key>` (any depth,
//! one `__` per level; names are lower-cased). The value is read as a TOML value when it parses
//! as one (`256`, `true`, `["cpu", "cuda:0"]`, `"quoted"`), else taken as a plain string (`20ms`,
//! `kafka:9092`). Values that are always strings keep their exact text: secrets (`token`,
//! `password`) and raw librdkafka options (anything under `options`), so `123` or `1e3` stay
//! as written.

use super::ConfigError;

/// Prefix of the variables the overlay reads.
pub const ENV_PREFIX: &str = "SCORESTREAM__";

/// Apply every `SCORESTREAM__...` variable in `vars` to `tree`, in name order (so a deeper
/// key applied after its table wins over it).
pub fn apply_env(tree: &mut toml::Table, vars: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = vars.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    vars.sort();
    for (name, value) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env { var: name, message: "empty key segment".into() });
        }
        let value = if keeps_text(&path) { toml::Value::String(value) } else { parse_value(&value) };
        set(tree, &path, value).map_err(|message| ConfigError::Env { var: name.clone(), message })?;
    }
    Ok(())
}

/// Whether the key at `path` is a string whatever its text looks like.
fn keeps_text(path: &[String]) -> bool {
    let leaf = path.last().map(String::as_str);
    matches!(leaf, Some("token" | "password" | "user" | "group_id" | "durable" | "topic" | "subject" | "stream"))
        || path.iter().rev().skip(1).any(|k| k == "options" || k == "option_files")
}

/// A TOML value if `raw` is one, else the string itself.
fn parse_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
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
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    #[test]
    fn sets_typed_values_at_any_depth() {
        let mut t: toml::Table = "[batch]\nmax_batch_events = 4\n".parse().unwrap();
        apply_env(
            &mut t,
            vars(&[
                ("SCORESTREAM__BATCH__MAX_BATCH_EVENTS", "8"),
                ("SCORESTREAM__BATCH__MAX_WAIT", "5ms"),
                ("SCORESTREAM__SOURCE__OPTIONS__SECURITY.PROTOCOL", "SASL_SSL"),
                ("SCORESTREAM__MODEL__DEVICES", r#"["cuda:0","cuda:1"]"#),
                ("SCORESTREAM_LOG", "debug"),
                ("SCORESTREAM__SOURCE__PASSWORD", "1e3"),
                ("SCORESTREAM__SOURCE__OPTIONS__LINGER.MS", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(t["batch"]["max_batch_events"].as_integer(), Some(8));
        assert_eq!(t["batch"]["max_wait"].as_str(), Some("5ms"));
        assert_eq!(t["source"]["options"]["security.protocol"].as_str(), Some("SASL_SSL"));
        assert_eq!(t["model"]["devices"].as_array().map(Vec::len), Some(2));
        assert!(!t.contains_key("log"));
        assert_eq!(t["source"]["password"].as_str(), Some("1e3"));
        assert_eq!(t["source"]["options"]["linger.ms"].as_str(), Some("5"));
    }

    #[test]
    fn refuses_to_descend_into_a_scalar() {
        let mut t: toml::Table = "shutdown_timeout = \"3s\"\n".parse().unwrap();
        let err = apply_env(&mut t, vars(&[("SCORESTREAM__SHUTDOWN_TIMEOUT__X", "1")])).unwrap_err();
        assert!(err.to_string().contains("shutdown_timeout is not a table"), "{err}");
    }
}
