//! A stage: a contiguous range of decoder layers on one device, plus the embedding when it is
//! the first stage and the final norm and reward head when it is the last. A model on one device
//! is one stage holding everything; a sharded model is a pipeline of stages.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::config::ArchConfig;
use super::head::RewardHead;
use super::layers::{DecoderLayer, Embedding, Norm};
use super::packed::Packed;
use super::rope::Rotary;
use super::weights::Vb;
use super::ModelError;
use crate::event::Score;

/// What flows between stages.
#[derive(Debug)]
pub enum Activations {
    /// The first stage's input: the packed token ids themselves.
    Tokens,
    /// `[tokens, hidden]` from the previous stage.
    Hidden(Tensor),
}

/// What a stage produces.
#[derive(Debug)]
pub enum StageOutput {
    /// `[tokens, hidden]` for the next stage.
    Hidden(Tensor),
    /// One score per sequence, from the last stage.
    Scores(Vec<Score>),
}

/// Layers `range` of a model on `device`.
pub struct Stage {
    pub(crate) range: Range<usize>,
    embed: Option<Embedding>,
    layers: Vec<DecoderLayer>,
    tail: Option<(Norm, RewardHead)>,
    rotary: Rotary,
    dtype: DType,
    device: Device,
}

impl Stage {
    /// Load layers `range` (the embedding when it starts at 0, the head when it ends at the
    /// last layer). `vb` is the checkpoint root on the stage's device and dtype.
    pub fn load(
        vb: &Vb,
        cfg: &ArchConfig,
        range: Range<usize>,
        reward_row: usize,
        attribute_weights: Option<&[f32]>,
    ) -> Result<Self, ModelError> {
        let model = vb.pp("model");
        let embed = (range.start == 0).then(|| Embedding::load(&model.pp("embed_tokens"), cfg)).transpose()?;
        let layers = range
            .clone()
            .map(|i| DecoderLayer::load(&model.pp("layers").pp(i), cfg, i))
            .collect::<Result<Vec<_>, _>>()?;
        let tail = if range.end == cfg.num_layers {
            let norm = Norm::load(&model.pp("norm"), cfg.hidden_size, cfg.norm, cfg.norm_eps)?;
            Some((norm, RewardHead::load(vb, cfg, reward_row, attribute_weights)?))
        } else {
            None
        };
        Ok(Self { range, embed, layers, tail, rotary: Rotary::new(cfg), dtype: vb.dtype, device: vb.device.clone() })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Run the packed batch through this stage.
    pub fn forward(&self, packed: &Packed, input: Activations) -> Result<StageOutput, ModelError> {
        let mut x = match (input, &self.embed) {
            (Activations::Tokens, Some(e)) => e.forward(&packed.ids)?.to_dtype(self.dtype)?,
            (Activations::Hidden(h), _) => h.to_device(&self.device)?.to_dtype(self.dtype)?,
            (Activations::Tokens, None) => {
                return Err(ModelError::weights(format!("stage {:?} holds no embedding but got token ids", self.range), None))
            }
        };
        if packed.num_tokens() == 0 {
            return Ok(StageOutput::Scores(Vec::new()));
        }
        let tables = self.rotary.tables(&packed.positions, self.dtype, &self.device)?;
        for layer in &self.layers {
            x = layer.forward(&x, &self.rotary, &tables, packed)?;
        }
        match &self.tail {
            None => Ok(StageOutput::Hidden(x)),
            Some((norm, head)) => {
                let rows: Vec<u32> = head.read_positions(packed).into_iter().map(|i| i as u32).collect();
                let last = x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
                Ok(StageOutput::Scores(head.forward(&norm.forward(&last)?)?))
            }
        }
    }
}

/// Split `layer_bytes` into `stages` contiguous ranges balanced by bytes, counting `first_extra`
/// (the embedding) on the first stage and `last_extra` (norm and head) on the last. Every stage
/// gets at least one layer when there are enough layers.
pub(crate) fn plan_stages(layer_bytes: &[usize], first_extra: usize, last_extra: usize, stages: usize) -> Vec<Range<usize>> {
    let n = layer_bytes.len();
    let stages = stages.clamp(1, n.max(1));
    let total: usize = layer_bytes.iter().sum::<usize>() + first_extra + last_extra;
    let mut ranges = Vec::with_capacity(stages);
    let (mut start, mut acc) = (0usize, first_extra);
    for s in 0..stages {
        let remaining_stages = stages - s - 1;
        if remaining_stages == 0 {
            ranges.push(start..n);
            break;
        }
        let target = total * (s + 1) / stages;
        let mut end = start;
        // Take layers while doing so moves the cumulative total closer to this stage's target,
        // always taking one and always leaving one per later stage.
        while end < n - remaining_stages {
            let next = acc + layer_bytes[end];
            if end > start && next.abs_diff(target) > acc.abs_diff(target) {
                break;
            }
            acc = next;
            end += 1;
        }
        ranges.push(start..end);
        start = end;
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_contiguous_and_balanced() {
        let r = plan_stages(&[10; 8], 0, 0, 2);
        assert_eq!(r, vec![0..4, 4..8]);
        // A heavy embedding pushes layers off the first stage.
        let r = plan_stages(&[10; 8], 40, 0, 2);
        assert_eq!(r, vec![0..2, 2..8]);
        let r = plan_stages(&[10; 3], 0, 0, 3);
        assert_eq!(r, vec![0..1, 1..2, 2..3]);
        // More stages than layers: one layer each.
        assert_eq!(plan_stages(&[10; 2], 0, 0, 5), vec![0..1, 1..2]);
        assert_eq!(plan_stages(&[10; 5], 0, 0, 1), vec![0..5]);
    }
}
