//! A packed micro-batch: the token ids of several sequences laid end to end, with each token's
//! position inside its own sequence and the sequence boundaries. No padding, so no sequence's
//! result can depend on another's.

use std::ops::Range;

/// Several sequences packed into one token stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// `[tokens]`: every sequence's ids, concatenated.
    pub ids: Vec<u32>,
    /// `[tokens]`: each token's position within its sequence.
    pub positions: Vec<u32>,
    /// `[sequences + 1]`: sequence `i` is `cu_seqlens[i]..cu_seqlens[i + 1]`.
    pub cu_seqlens: Vec<usize>,
}

impl Packed {
    /// Pack sequences in order. Empty sequences are allowed and yield empty ranges.
    pub fn new<S: AsRef<[u32]>>(seqs: &[S]) -> Self {
        let total = seqs.iter().map(|s| s.as_ref().len()).sum();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut cu_seqlens = Vec::with_capacity(seqs.len() + 1);
        cu_seqlens.push(0);
        for s in seqs {
            let s = s.as_ref();
            ids.extend_from_slice(s);
            positions.extend(0..s.len() as u32);
            cu_seqlens.push(ids.len());
        }
        Self { ids, positions, cu_seqlens }
    }

    pub fn num_tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn num_seqs(&self) -> usize {
        self.cu_seqlens.len() - 1
    }

    /// The token range of each sequence.
    pub fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.cu_seqlens.windows(2).map(|w| w[0]..w[1])
    }

    /// The longest sequence.
    pub fn max_len(&self) -> usize {
        self.ranges().map(|r| r.len()).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_positions_per_sequence() {
        let p = Packed::new(&[vec![5, 6, 7], vec![8], vec![9, 10]]);
        assert_eq!(p.ids, vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(p.positions, vec![0, 1, 2, 0, 0, 1]);
        assert_eq!(p.ranges().collect::<Vec<_>>(), vec![0..3, 3..4, 4..6]);
        assert_eq!((p.num_seqs(), p.max_len()), (3, 3));
    }
}
