//! [`Scorer`]: what the pipeline's score stage asks of the engine, and the engine's answer.

use futures::future::BoxFuture;

use super::{Engine, EngineError};
use crate::event::Score;

/// Scores batches of token sequences (the engine).
pub trait Scorer: Send + Sync + 'static {
    /// One score per sequence, in order. An error is a fault of the engine (the batch is
    /// retried), except one that names a refused sequence ([`EngineError::refused_sequence`]).
    fn score(&self, batch: Vec<Vec<u32>>) -> BoxFuture<'static, Result<Vec<Score>, EngineError>>;
    /// Name published in each scored event.
    fn model_name(&self) -> String;
    /// Batches worth keeping in flight at once (the engine's pipeline depth).
    fn depth(&self) -> usize;
}

impl Scorer for Engine {
    fn score(&self, batch: Vec<Vec<u32>>) -> BoxFuture<'static, Result<Vec<Score>, EngineError>> {
        let engine = self.clone();
        Box::pin(async move { engine.score(batch).await })
    }
    fn model_name(&self) -> String {
        self.info().name.clone()
    }
    fn depth(&self) -> usize {
        self.info().stages.len().max(1)
    }
}
