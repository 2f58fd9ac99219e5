//! Micro-batching: packing tokenized events into batches bounded by tokens and events.

pub(crate) mod actor;
pub mod policy;
