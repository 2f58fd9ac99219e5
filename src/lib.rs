//! scorestream: scores LLM conversations with a resident reward model.
//!
//! Data flows one way: source → event → prompt → batch → engine → sink, with acks flowing back.

pub mod batch;
pub(crate) mod candidates;
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
pub mod route;
pub mod score_api;
pub mod sink;
pub mod source;
