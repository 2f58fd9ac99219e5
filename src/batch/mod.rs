//! Micro-batching: packing tokenized events into batches bounded by tokens and events, and the
//! `[batch]` section that bounds them ([`BatchConfig`]).

pub(crate) mod actor;
pub mod config;
pub mod policy;

pub use config::BatchConfig;
