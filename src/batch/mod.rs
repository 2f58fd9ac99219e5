//! Micro-batching: packing tokenized events into batches bounded by tokens and events.

pub mod actor;
pub mod policy;
