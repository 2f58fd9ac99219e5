//! Reward heads: which token is read and how its hidden state becomes a reward.
//!
//! - `*ForCausalLM` (Llama-3.1-Nemotron-70B-Reward-HF): the logit of one vocabulary row (0 by
//!   default) at the last token. Only that row is loaded; the vocabulary projection is never
//!   computed.
//! - `*ForSequenceClassification`: the `score` layer at the rightmost token that is not the pad
//!   token, exactly as transformers picks it; named outputs from `id2label`, and a scalar reward
//!   that is the weighted sum (Nemotron-4 SteerLM weights by default) or the only output.

use candle_core::{DType, Tensor};

use super::config::{ArchConfig, HeadKind, STEERLM_WEIGHTS};
use super::packed::Packed;
use super::weights::Vb;
use super::ModelError;
use crate::event::Score;

/// The linear head over the final hidden state of each sequence's scored token.
#[derive(Debug, Clone)]
pub(crate) struct RewardHead {
    /// `[outputs, hidden]`, f32.
    weight: Tensor,
    /// Index of the token to read, per sequence: "last" or "rightmost non-pad".
    pad_token_id: Option<u32>,
    labels: Vec<String>,
    /// Weights of the scalar reward over the outputs.
    reward_weights: Vec<f32>,
}

impl RewardHead {
    /// `vb` is the checkpoint root.
    pub fn load(vb: &Vb, cfg: &ArchConfig, reward_row: usize, weights: Option<&[f32]>) -> Result<Self, ModelError> {
        let (weight, pad_token_id) = match cfg.head {
            HeadKind::LmHeadRow { tied } => {
                if reward_row >= cfg.vocab_size {
                    return Err(ModelError::config(
                        "reward_row",
                        format!("{reward_row} is outside the vocabulary of {}", cfg.vocab_size),
                    ));
                }
                let name = if tied || !vb.contains("lm_head.weight") { "model.embed_tokens.weight" } else { "lm_head.weight" };
                let row = vb.weights.load_rows(name, reward_row, 1, &vb.device)?;
                (row, None)
            }
            HeadKind::Score => (vb.pp("score").get((cfg.labels.len(), cfg.hidden_size), "weight")?, cfg.pad_token_id),
        };
        let n = cfg.labels.len();
        let reward_weights = match weights {
            Some(w) if w.len() != n => {
                return Err(ModelError::config(
                    "attribute_weights",
                    format!("has {} weights but the model has {n} outputs ({:?})", w.len(), cfg.labels),
                ))
            }
            Some(w) => w.to_vec(),
            None if cfg.is_steerlm() => STEERLM_WEIGHTS.to_vec(),
            None => (0..n).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect(),
        };
        Ok(Self { weight: weight.to_dtype(DType::F32)?, pad_token_id, labels: cfg.labels.clone(), reward_weights })
    }

    /// The packed index of the token each sequence is scored at. A sequence that is all
    /// padding is read at its first token, as transformers' `argmax` over an all-zero mask does.
    /// A sequence in a shared-prefix group is its prefix, then its own segment.
    pub(crate) fn read_positions(&self, packed: &Packed) -> Vec<usize> {
        (0..packed.num_seqs())
            .map(|i| {
                let (prefix, own) = packed.seq_parts(i);
                let first = if prefix.is_empty() { own.start } else { prefix.start };
                let mut tokens = own.rev().chain(prefix.rev());
                match self.pad_token_id {
                    None => tokens.next().unwrap_or(first),
                    Some(pad) => tokens.find(|&i| packed.ids[i] != pad).unwrap_or(first),
                }
            })
            .collect()
    }

    /// `hidden: [sequences, hidden]` (already normalized) → one score per sequence.
    pub fn forward(&self, hidden: &Tensor) -> Result<Vec<Score>, ModelError> {
        let logits = hidden.to_dtype(DType::F32)?.matmul(&self.weight.t()?)?.to_vec2::<f32>()?;
        Ok(logits.into_iter().map(|row| self.score(&row)).collect())
    }

    fn score(&self, outputs: &[f32]) -> Score {
        let reward = outputs.iter().zip(&self.reward_weights).map(|(o, w)| o * w).sum();
        let attributes = if outputs.len() > 1 {
            self.labels.iter().cloned().zip(outputs.iter().copied()).collect()
        } else {
            Vec::new()
        };
        Score { reward, attributes }
    }
}
