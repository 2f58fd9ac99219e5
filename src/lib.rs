//! scorestream: scores LLM conversations with a resident reward model.
//!
//! Data flows one way: source → event → prompt → batch → engine → sink, with acks flowing back.

pub mod batch;
pub mod cli;
pub mod commands;
pub mod engine;
pub mod error;
pub mod event;
pub(crate) mod exactly_once;
pub mod model;
pub mod nats;
pub mod prompt;
pub mod app;
pub mod config;
pub mod health;
pub mod http;
pub(crate) mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod record;
pub mod settings;
pub mod sink;
pub mod source;
