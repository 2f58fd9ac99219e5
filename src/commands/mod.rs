//! Command implementations behind the CLI.

pub mod compare;
pub mod inspect;
pub mod quantize;
pub mod score;
