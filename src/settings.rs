//! What every component's config section is made of, below all of them: [`Secret`] values that
//! `Debug` never shows, scalars read as text, and [`Invalid`], the refusal a section's own
//! validation returns (the config tree turns it into `ConfigError::Invalid`, same message).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A config value refused by validation: the dotted field (`source.brokers`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

/// `Err(Invalid)` for `field`, as whichever error the caller returns.
pub fn invalid<T, E: From<Invalid>>(field: &str, message: &str) -> Result<T, E> {
    Err(Invalid { field: field.to_owned(), message: message.to_owned() }.into())
}

/// `v` must be above zero.
pub fn positive(field: &str, v: usize) -> Result<(), Invalid> {
    if v == 0 {
        return invalid(field, "must be above zero");
    }
    Ok(())
}

/// `v` must hold more than white space.
pub fn non_empty(field: &str, v: &str) -> Result<(), Invalid> {
    if v.trim().is_empty() {
        return invalid(field, "must not be empty");
    }
    Ok(())
}

/// A secret string: serialized as is (so the config can be rendered back) but never shown by
/// `Debug`. A number or boolean is taken as its text, so a secret such as `123456` passed
/// through `SCORESTREAM__...` (read as TOML) still works.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarText("a secret (token or password) as a string; a number or boolean is taken as its text"))
            .map(Secret)
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// Option and key names whose values are secrets (librdkafka's, and the NATS `token` and
/// `password`).
pub(crate) fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "sasl.oauthbearer.config", "ssl.key.pem", "ssl_key"].iter().any(|s| k.contains(s))
}

/// Reads a string, or a number or boolean as its text; the error for anything else says
/// `expected {0}` (and never quotes the value: it may be a secret).
pub(crate) struct ScalarText(pub &'static str);

impl serde::de::Visitor<'_> for ScalarText {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_never_shown_by_debug() {
        assert_eq!(format!("{:?}", Secret("s3cret".into())), "\"<redacted>\"");
    }

    #[test]
    fn a_secret_of_the_wrong_shape_says_what_is_expected() {
        let text = |v: &str| format!("[s]\npassword = {v}\n").parse::<toml::Table>().unwrap()["s"]["password"].clone();
        assert_eq!(text("123456").try_into::<Secret>().unwrap().expose(), "123456");
        let e = text("[\"a\", \"b\"]").try_into::<Secret>().unwrap_err().to_string();
        assert!(e.contains("expected a secret (token or password) as a string") && !e.contains("untagged"), "{e}");
    }
}
