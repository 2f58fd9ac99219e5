//! A packed micro-batch: the token ids of several sequences laid end to end, with each token's
//! position inside its own sequence and the segment boundaries. No padding, so no sequence's
//! result can depend on another's.
//!
//! Plain form: one segment per sequence. Tree form ([`Packed::shared`]): sequences that begin
//! with the same token ids form a group laid out as the shared prefix once (a segment of its
//! own, scored by nobody), then each member's suffix, its positions continuing after the
//! prefix. A suffix token attends to the prefix and to its own earlier suffix tokens only, so
//! each member's hidden states are those it would have alone.

use std::ops::Range;

/// Several sequences packed into one token stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// `[tokens]`: every segment's ids, concatenated.
    pub ids: Vec<u32>,
    /// `[tokens]`: each token's position within its sequence.
    pub positions: Vec<u32>,
    /// `[segments + 1]`: segment `i` is `cu_seqlens[i]..cu_seqlens[i + 1]`. In the plain form
    /// a segment is a sequence.
    pub cu_seqlens: Vec<usize>,
    /// `[segments]`: the segment holding the shared prefix this segment continues (a suffix),
    /// or `None` (a whole sequence, or a shared prefix).
    pub prefix_of: Vec<Option<usize>>,
    /// `[sequences]`: the segment that ends each sequence, in the batch's order.
    pub(crate) seq_segments: Vec<usize>,
}

impl Packed {
    /// Pack sequences in order, one segment each. Empty sequences yield empty ranges.
    pub fn new<S: AsRef<[u32]>>(seqs: &[S]) -> Self {
        let total = seqs.iter().map(|s| s.as_ref().len()).sum();
        let mut p = Self::with_capacity(total, seqs.len());
        for s in seqs {
            p.push_segment(s.as_ref(), 0, None);
        }
        p.seq_segments = (0..seqs.len()).collect();
        p
    }

    /// Pack sequences, sharing within groups whose token ids begin with the same
    /// `min_shared` or more tokens (0: never; then this is [`Packed::new`]). Scores still come
    /// out in the order of `seqs`.
    pub fn shared<S: AsRef<[u32]>>(seqs: &[S], min_shared: usize) -> Self {
        if min_shared == 0 || seqs.len() < 2 {
            return Self::new(seqs);
        }
        let groups = group_by_prefix(seqs, min_shared);
        let total = seqs.iter().map(|s| s.as_ref().len()).sum();
        let mut p = Self::with_capacity(total, seqs.len() + groups.len());
        p.seq_segments = vec![0; seqs.len()];
        for (members, shared) in groups {
            if members.len() == 1 {
                p.seq_segments[members[0]] = p.push_segment(seqs[members[0]].as_ref(), 0, None);
                continue;
            }
            let prefix = p.push_segment(&seqs[members[0]].as_ref()[..shared], 0, None);
            for m in members {
                p.seq_segments[m] = p.push_segment(&seqs[m].as_ref()[shared..], shared, Some(prefix));
            }
        }
        p
    }

    fn with_capacity(tokens: usize, segments: usize) -> Self {
        let mut cu_seqlens = Vec::with_capacity(segments + 1);
        cu_seqlens.push(0);
        Self {
            ids: Vec::with_capacity(tokens),
            positions: Vec::with_capacity(tokens),
            cu_seqlens,
            prefix_of: Vec::with_capacity(segments),
            seq_segments: Vec::with_capacity(segments),
        }
    }

    /// Append a segment whose first token sits at `start`; returns its index.
    fn push_segment(&mut self, ids: &[u32], start: usize, prefix: Option<usize>) -> usize {
        self.ids.extend_from_slice(ids);
        self.positions.extend((start..start + ids.len()).map(|p| p as u32));
        self.cu_seqlens.push(self.ids.len());
        self.prefix_of.push(prefix);
        self.prefix_of.len() - 1
    }

    pub fn num_tokens(&self) -> usize {
        self.ids.len()
    }

    /// The sequences scored (shared prefixes are not sequences).
    pub(crate) fn num_seqs(&self) -> usize {
        self.seq_segments.len()
    }

    /// Whether some segment continues a shared prefix (the tree form).
    pub fn is_tree(&self) -> bool {
        self.prefix_of.iter().any(Option::is_some)
    }

    /// The token range of each segment.
    pub fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.cu_seqlens.windows(2).map(|w| w[0]..w[1])
    }

    /// The token range of segment `i`.
    pub(crate) fn range(&self, i: usize) -> Range<usize> {
        self.cu_seqlens[i]..self.cu_seqlens[i + 1]
    }

    /// Sequence `i` as (its shared prefix's range, or an empty one; its own segment's range).
    pub(crate) fn seq_parts(&self, i: usize) -> (Range<usize>, Range<usize>) {
        let seg = self.seq_segments[i];
        let own = self.range(seg);
        let prefix = self.prefix_of[seg].map_or(own.start..own.start, |p| self.range(p));
        (prefix, own)
    }

    /// The longest segment.
    #[cfg(test)]
    pub(crate) fn max_len(&self) -> usize {
        self.ranges().map(|r| r.len()).max().unwrap_or(0)
    }

    /// Tokens computed once instead of once per sequence: for each shared prefix, its length
    /// times the members beyond the first.
    pub fn shared_tokens(&self) -> usize {
        let mut members = vec![0usize; self.prefix_of.len()];
        for p in self.prefix_of.iter().flatten() {
            members[*p] += 1;
        }
        members.iter().enumerate().filter(|(_, &m)| m > 1).map(|(i, &m)| (m - 1) * self.range(i).len()).sum()
    }
}

/// Groups of sequence indices and the prefix length each group shares (the whole length for a
/// group of one). Sequences are sorted by their ids, so sequences that share a prefix are
/// neighbours; the sorted list is then cut into runs that save the most tokens in all (a run of
/// `m` whose common prefix is `c >= min_shared` tokens saves `(m - 1) · c`), by dynamic
/// programming over the cut points: O(n²) for n sequences, nothing next to a forward pass.
fn group_by_prefix<S: AsRef<[u32]>>(seqs: &[S], min_shared: usize) -> Vec<(Vec<usize>, usize)> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by(|&a, &b| seqs[a].as_ref().cmp(seqs[b].as_ref()));
    let n = order.len();
    let common = |a: usize, b: usize| {
        let (a, b) = (seqs[order[a]].as_ref(), seqs[order[b]].as_ref());
        a.iter().zip(b).take_while(|(x, y)| x == y).count()
    };
    let adjacent: Vec<usize> = (1..n).map(|i| common(i - 1, i)).collect();
    // best[j]: the most tokens saved over the first j sorted sequences; cut[j]: where the last
    // run starts.
    let (mut best, mut cut) = (vec![0usize; n + 1], vec![0usize; n + 1]);
    for j in 1..=n {
        (best[j], cut[j]) = (best[j - 1], j - 1);
        let mut shared = usize::MAX;
        for i in (0..j - 1).rev() {
            shared = shared.min(adjacent[i]);
            if shared < min_shared {
                break;
            }
            let saved = best[i] + (j - i - 1) * shared;
            if saved > best[j] {
                (best[j], cut[j]) = (saved, i);
            }
        }
    }
    let mut groups = Vec::new();
    let mut j = n;
    while j > 0 {
        let i = cut[j];
        let shared = if j - i == 1 { seqs[order[i]].as_ref().len() } else { adjacent[i..j - 1].iter().copied().min().unwrap_or(0) };
        groups.push((order[i..j].to_vec(), shared));
        j = i;
    }
    groups.reverse();
    groups
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
        assert!(!p.is_tree());
        assert_eq!(p.shared_tokens(), 0);
    }

    #[test]
    fn a_shared_prefix_is_laid_out_once_with_suffix_positions_after_it() {
        let seqs = [vec![1, 2, 3, 4], vec![9, 9], vec![1, 2, 3, 5, 6], vec![1, 2, 3]];
        let p = Packed::shared(&seqs, 3);
        assert!(p.is_tree());
        // Sorted: [1,2,3], [1,2,3,4], [1,2,3,5,6] share 3 tokens; [9,9] stays alone.
        assert_eq!(p.ids, vec![1, 2, 3, 4, 5, 6, 9, 9]);
        assert_eq!(p.positions, vec![0, 1, 2, 3, 3, 4, 0, 1]);
        assert_eq!(p.ranges().collect::<Vec<_>>(), vec![0..3, 3..3, 3..4, 4..6, 6..8]);
        assert_eq!(p.prefix_of, vec![None, Some(0), Some(0), Some(0), None]);
        assert_eq!(p.seq_segments, vec![2, 4, 3, 1]);
        assert_eq!(p.seq_parts(0), (0..3, 3..4));
        assert_eq!(p.seq_parts(1), (6..6, 6..8));
        assert_eq!(p.shared_tokens(), 6);
        // Below the threshold, or switched off: the plain form.
        assert!(!Packed::shared(&seqs, 4).is_tree());
        assert_eq!(Packed::shared(&seqs, 0), Packed::new(&seqs));
    }

    #[test]
    fn a_member_that_would_shrink_the_savings_starts_a_new_group() {
        // [1,1,1,1,1,1] twice share 6; a third sharing only 2 would save 4 instead of 6.
        let seqs = [vec![1, 1, 1, 1, 1, 1, 7], vec![1, 1, 1, 1, 1, 1, 8], vec![1, 1, 2]];
        let p = Packed::shared(&seqs, 2);
        assert_eq!(p.shared_tokens(), 6);
        assert_eq!(p.seq_parts(2), (p.seq_parts(2).1.start..p.seq_parts(2).1.start, p.seq_parts(2).1));
        // Two short-prefix neighbours sorted before a long-prefix group do not drag it down.
        let seqs = [vec![1, 1, 9], vec![1, 1, 8], vec![1, 1, 5, 5, 5, 5, 1], vec![1, 1, 5, 5, 5, 5, 2], vec![1, 1, 5, 5, 5, 5]];
        assert_eq!(Packed::shared(&seqs, 2).shared_tokens(), 2 * 6 + 2);
    }
}
