//! Printing an error with its causes, each once.

use std::fmt;

/// Displays an error and its chain of sources as `error: cause: cause`, leaving out a cause
/// whose text the line already holds (an error that both names its cause in its message and
/// exposes it as its source).
pub(crate) struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chain = std::iter::successors(Some(self.0), |e| e.source());
        f.write_str(&join_causes(chain.map(|e| e.to_string())))
    }
}

/// `a: b: c` from the texts of an error and its causes (outermost first), leaving out a cause
/// whose text the line already holds. `main` prints every error this way.
pub fn join_causes(texts: impl IntoIterator<Item = String>) -> String {
    let mut line = String::new();
    for text in texts {
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
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
