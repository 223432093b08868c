//! `SeqRanges`: the seqs a session has written to its client, as sorted, merged,
//! inclusive ranges. Acknowledgements delete exactly these (never a seq the client was not
//! sent, e.g. one whose insert was still in flight when a later seq went out).

/// Sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqRanges {
    ranges: Vec<(u64, u64)>,
}

impl SeqRanges {
    pub fn contains(&self, seq: u64) -> bool {
        match self.ranges.binary_search_by(|&(lo, _)| lo.cmp(&seq)) {
            Ok(_) => true,
            Err(0) => false,
            Err(i) => self.ranges[i - 1].1 >= seq,
        }
    }

    /// Adds `seq` (usually one past the last range: O(1)).
    pub fn insert(&mut self, seq: u64) {
        if let Some(last) = self.ranges.last_mut() {
            if seq == last.1 + 1 {
                last.1 = seq;
                return;
            }
            if seq > last.1 {
                self.ranges.push((seq, seq));
                return;
            }
        } else {
            self.ranges.push((seq, seq));
            return;
        }
        if self.contains(seq) {
            return;
        }
        let i = self.ranges.partition_point(|&(lo, _)| lo < seq);
        let joins_prev = i > 0 && self.ranges[i - 1].1 + 1 == seq;
        let joins_next = i < self.ranges.len() && self.ranges[i].0 == seq + 1;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = seq,
            (false, true) => self.ranges[i].0 = seq,
            (false, false) => self.ranges.insert(i, (seq, seq)),
        }
    }

    /// Removes and returns every range part at or below `upto`.
    pub fn take_upto(&mut self, upto: u64) -> Vec<(u64, u64)> {
        let n = self.ranges.partition_point(|&(lo, _)| lo <= upto);
        let mut taken: Vec<(u64, u64)> = self.ranges.drain(..n).collect();
        if let Some(last) = taken.last_mut() {
            if last.1 > upto {
                self.ranges.insert(0, (upto + 1, last.1));
                last.1 = upto;
            }
        }
        taken
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many ranges (a hole splits one in two): small in practice.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The highest seq in the set.
    pub fn max(&self) -> Option<u64> {
        self.ranges.last().map(|r| r.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(seqs: &[u64]) -> SeqRanges {
        let mut r = SeqRanges::default();
        for s in seqs {
            r.insert(*s);
        }
        r
    }

    #[test]
    fn merges_and_keeps_holes() {
        let r = of(&[1, 2, 3, 5, 6, 9]);
        assert_eq!(r.ranges, vec![(1, 3), (5, 6), (9, 9)]);
        assert!(
            r.contains(2) && r.contains(9) && !r.contains(4) && !r.contains(7) && !r.contains(0)
        );
        let r = of(&[5, 3, 4, 1, 2, 1]);
        assert_eq!(r.ranges, vec![(1, 5)]);
        let r = of(&[10, 2, 6, 4, 3, 5]);
        assert_eq!(r.ranges, vec![(2, 6), (10, 10)]);
    }

    #[test]
    fn take_upto_splits_a_range() {
        let mut r = of(&[1, 2, 3, 5, 6, 7, 9]);
        assert_eq!(r.take_upto(6), vec![(1, 3), (5, 6)]);
        assert_eq!(r.ranges, vec![(7, 7), (9, 9)]);
        assert_eq!(r.take_upto(8), vec![(7, 7)]);
        assert_eq!(r.take_upto(0), vec![]);
        assert_eq!(r.max(), Some(9));
        assert_eq!(r.take_upto(100), vec![(9, 9)]);
        assert!(r.is_empty());
    }
}
