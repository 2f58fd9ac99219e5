//! Command implementations behind the CLI.

pub mod inspect;
// pub mod score; (enabled once crate::prompt::Prompter lands)
