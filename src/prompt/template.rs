//! Chat templates rendered the way transformers renders them: a Jinja environment with
//! `trim_blocks` and `lstrip_blocks`, loop controls, Python string methods, `raise_exception`,
//! `strftime_now` and a `tojson` that writes what Python's `json.dumps(ensure_ascii=False)` writes
//! (`", "` and `": "` separators, optional `indent`, `sort_keys`), not minijinja's HTML-safe JSON.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};

/// The name the template is registered under.
pub(crate) const NAME: &str = "chat";

/// Compile `source` into an environment ready to render.
pub fn environment(source: &str) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_template_owned(NAME, source.to_owned())?;
    Ok(env)
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson(indent=None, separators=None, sort_keys=False)` as transformers defines it.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item, key) = match separators.as_deref() {
        Some([i, k]) => (i.clone(), k.clone()),
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let mut out = String::new();
    py_json(&json, &PyJson { indent, sort_keys: sort_keys.unwrap_or(false), item, key }, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    indent: Option<usize>,
    sort_keys: bool,
    item: String,
    key: String,
}

/// Write `v` as Python's json.dumps would.
fn py_json(v: &serde_json::Value, o: &PyJson, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = o.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&py_number(n)),
        J::String(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
        J::Array(items) if items.is_empty() => out.push_str("[]"),
        J::Object(map) if map.is_empty() => out.push_str("{}"),
        J::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item);
                }
                newline(out, level + 1);
                py_json(item, o, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) => {
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(&o.key);
                py_json(val, o, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

/// Python's `repr` of a number: integers as is, floats always with a fraction or a two-digit
/// exponent (`1.0`, `1e-05`).
fn py_number(n: &serde_json::Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// `strftime_now(format)`: the current UTC time, for templates that print today's date.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(secs, &format)
}

const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];

/// A subset of C's strftime over a Unix time in UTC: %d %m %Y %y %B %b %H %M %S %%.
pub(crate) fn strftime(unix: i64, format: &str) -> String {
    let days = unix.div_euclid(86_400);
    let rem = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use minijinja::context;

    use super::*;

    fn render(src: &str, ctx: Value) -> Result<String, Error> {
        environment(src)?.get_template(NAME)?.render(ctx)
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let ctx = context! { x => serde_json::json!({"b": [1, 2.5, "é<&>"], "a": null, "c": {"d": true}, "f": 1e-5}) };
        assert_eq!(render("{{ x|tojson }}", ctx.clone()).unwrap(), r#"{"b": [1, 2.5, "é<&>"], "a": null, "c": {"d": true}, "f": 1e-05}"#);
        assert_eq!(
            render("{{ x.c|tojson(indent=2) }}", ctx.clone()).unwrap(),
            "{\n  \"d\": true\n}"
        );
        assert_eq!(render("{{ x|tojson(sort_keys=true) }}", ctx).unwrap().find("\"a\""), Some(1));
    }

    #[test]
    fn jinja_behaves_like_transformers_environment() {
        // trim_blocks + lstrip_blocks, Python string methods, loop controls, raise_exception.
        let src = "{% for m in messages %}\n  {% if loop.index0 == 2 %}{% break %}{% endif %}\n{{ m.content.strip().upper() }}|\n{% endfor %}";
        let ctx = context! { messages => vec![context!{content => " a "}, context!{content => "b"}, context!{content => "c"}] };
        assert_eq!(render(src, ctx).unwrap(), "A|\nB|\n");
        let err = render("{{ raise_exception('roles must alternate') }}", context! {}).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn strftime_formats_dates() {
        assert_eq!(strftime(1_721_952_000, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(strftime(0, "%Y-%m-%d %H:%M:%S %B %%"), "1970-01-01 00:00:00 January %");
    }
}
