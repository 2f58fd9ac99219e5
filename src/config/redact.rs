//! Secret values kept out of TOML syntax errors. The parser's message quotes the offending line
//! (`5 | password = hunter2`); a broken file cannot be parsed to learn which keys are secret, so
//! the lines that hold secrets are found in the text itself, by key name.

use std::collections::BTreeMap;

use crate::settings::is_secret_option;

const REDACTED: &str = "<redacted>";

/// `rendered` (a TOML error for `text`) with the value of every secret key replaced.
pub fn redact_toml_error(text: &str, rendered: &str) -> String {
    let secret = secret_lines(text);
    let fragments: Vec<&str> = secret_fragments(text, &secret);
    let mut out: Vec<String> = rendered.lines().map(|l| redact_quoted_line(l, &secret)).collect();
    // Belt and braces: a secret value quoted anywhere else in the message.
    for line in &mut out {
        for f in &fragments {
            if line.contains(f) {
                *line = line.replace(f, REDACTED);
            }
        }
    }
    out.join("\n")
}

/// 1-based line numbers of `text` that hold (part of) a secret value, and the byte column where
/// the secret starts on that line.
fn secret_lines(text: &str) -> BTreeMap<usize, usize> {
    let mut lines = BTreeMap::new();
    // The closing delimiter of a multi-line string that holds a secret.
    let mut open: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(delim) = open {
            lines.insert(i + 1, 0);
            if line.contains(delim) {
                open = None;
            }
            continue;
        }
        let Some(at) = secret_value_start(line) else { continue };
        lines.insert(i + 1, at);
        let value = line[at..].trim_start();
        open = ["\"\"\"", "'''"].into_iter().find(|d| value.starts_with(d) && !value[3..].contains(d));
    }
    lines
}

/// Where the value of a secret key starts on `line`: after the `=` of the first key (plain,
/// dotted or quoted, also inside an inline table) whose name marks a secret.
fn secret_value_start(line: &str) -> Option<usize> {
    line.match_indices('=').find_map(|(eq, _)| {
        let before = &line[..eq];
        let key_start = before.rfind(['{', ',']).map_or(0, |i| i + 1);
        let key = before[key_start..].trim().replace(['"', '\''], "");
        (!key.is_empty() && is_secret_option(&key)).then_some(eq + 1)
    })
}

/// The secret values themselves (whole, and without quotes), for the rare message that quotes
/// one outside the source line. Short ones are left out: they would blank unrelated text, and
/// the line rule already covers the quoted line.
fn secret_fragments<'a>(text: &'a str, secret: &BTreeMap<usize, usize>) -> Vec<&'a str> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(&at) = secret.get(&(i + 1)) {
            let value = line[at..].trim();
            for v in [value, value.trim_matches(['"', '\''])] {
                if v.len() >= 4 && !out.contains(&v) {
                    out.push(v);
                }
            }
        }
    }
    out
}

/// A `  5 | source text` line of the error, with the secret part of line 5 replaced.
fn redact_quoted_line(line: &str, secret: &BTreeMap<usize, usize>) -> String {
    let Some((number, content)) = line.split_once(" | ") else { return line.to_owned() };
    let Ok(n) = number.trim().parse::<usize>() else { return line.to_owned() };
    match secret.get(&n) {
        Some(&at) if at <= content.len() && content.is_char_boundary(at) => {
            format!("{number} | {}{REDACTED}", &content[..at])
        }
        Some(_) => format!("{number} | {REDACTED}"),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax_error(text: &str) -> String {
        let e = text.parse::<toml::Table>().unwrap_err();
        redact_toml_error(text, &e.to_string())
    }

    #[test]
    fn secret_values_never_show_in_syntax_errors() {
        let cases = [
            "[source]\ntype = \"nats\"\npassword = hunter2-is-secret\n",
            "[source]\ntoken = \"unterminated-secret-token\n",
            "[sink.options]\n\"sasl.password\" = sasl-secret-value\n",
            "[sink]\noptions = { \"sasl.password\" = s3cr3t-inline, \"linger.ms\" = \"5\" }\n",
            "[source]\npassword = \"\"\"first-secret-line\nsecond-secret-line\n= oops\n",
        ];
        for text in cases {
            let shown = syntax_error(text);
            for secret in ["hunter2", "unterminated-secret", "sasl-secret", "s3cr3t", "first-secret", "second-secret"] {
                assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
            }
            assert!(shown.contains("line"), "{shown}");
        }
    }

    #[test]
    fn other_lines_stay_as_they_are() {
        let shown = syntax_error("[source]\npassword = \"fine\"\nsubject = in.put\n");
        assert!(shown.contains("subject = in.put"), "{shown}");
    }
}
