//! Command implementations behind the CLI.

// pub mod compare; (enabled once crate::prompt::Prompter lands)
pub mod inspect;
pub mod quantize;
// pub mod score; (enabled once crate::prompt::Prompter lands)
