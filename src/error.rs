//! Printing an error with its causes, each once.

use std::fmt;

/// Displays an error and its chain of sources as `error: cause: cause`, leaving out a cause
/// whose text the line already holds (an error that both names its cause in its message and
/// exposes it as its source).
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut source = self.0.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !text.is_empty() && !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = s.source();
        }
        f.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot publish: {0}")]
    struct Embeds(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("the sink failed")]
    struct Wraps(#[source] Embeds);

    #[test]
    fn each_cause_once() {
        let e = Wraps(Embeds(std::io::Error::other("broker away")));
        assert_eq!(Chain(&e).to_string(), "the sink failed: cannot publish: broker away");
    }
}
