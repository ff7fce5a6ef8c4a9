//! Token gates: top-1 agreement at firm positions, and greedy decode reproduction
//! counted up to the first ambiguous oracle step.

use serde::Serialize;

/// Per-position top-1 comparison over a run of logits.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Top1Sweep {
    /// Positions compared (firm ones).
    pub firm: usize,
    /// Firm positions whose top-1 agrees.
    pub agree: usize,
    /// Positions skipped as ambiguous.
    pub ambiguous: Vec<usize>,
    /// Firm positions that disagree: (position, ours, oracle).
    pub mismatches: Vec<(usize, u32, u32)>,
}

/// The token [`top2`] reports for a row holding NaN: no real id, so it agrees with
/// no other token and the comparison fails.
pub const NO_TOKEN: u32 = u32::MAX;

/// Top-1 of one logits row (the first on ties, as torch's argmax) and its margin
/// over the runner-up (0 on a tie). A row with a NaN has no top-1: ([`NO_TOKEN`],
/// NaN), which counts as firm (`NaN < firm` is false) and matches nothing.
pub fn top2(row: &[f32]) -> (u32, f64) {
    if row.iter().any(|x| x.is_nan()) {
        return (NO_TOKEN, f64::NAN);
    }
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    let second = row
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != best)
        .map(|(_, &x)| x as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    (
        best as u32,
        row.get(best).map_or(0.0, |&b| b as f64) - second,
    )
}

/// Compares our top-1 at every position with the oracle's, skipping ambiguous ones.
pub fn top1_sweep(ours: &[u32], oracle_top1: &[u32], margins: &[f64], firm: f64) -> Top1Sweep {
    let mut s = Top1Sweep {
        firm: 0,
        agree: 0,
        ambiguous: vec![],
        mismatches: vec![],
    };
    for (i, ((&a, &b), &m)) in ours.iter().zip(oracle_top1).zip(margins).enumerate() {
        if m < firm {
            s.ambiguous.push(i);
            continue;
        }
        s.firm += 1;
        if a == b {
            s.agree += 1;
        } else {
            s.mismatches.push((i, a, b));
        }
    }
    s
}

/// A greedy decode compared with the oracle's.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecodeMatch {
    /// Steps compared (those before the first ambiguous oracle step, up to the limit).
    pub counted: usize,
    /// Of those, the leading steps that match.
    pub matched: usize,
    /// The first ambiguous oracle step, if one was reached.
    pub first_ambiguous: Option<usize>,
    /// The first step where the tokens differ, if any within `counted`.
    pub first_mismatch: Option<usize>,
}

impl DecodeMatch {
    /// All counted steps matched (and at least one was counted).
    pub fn passed(&self) -> bool {
        self.first_mismatch.is_none()
    }
}

/// Compares our greedy tokens with the oracle's for up to `limit` steps, stopping
/// the count at the first ambiguous oracle step.
pub fn decode_match(
    ours: &[u32],
    oracle: &[u32],
    margins: &[f64],
    firm: f64,
    limit: usize,
) -> DecodeMatch {
    let n = limit.min(oracle.len()).min(ours.len());
    let first_ambiguous = margins.iter().take(n).position(|&m| m < firm);
    let counted = first_ambiguous.unwrap_or(n);
    let first_mismatch = (0..counted).find(|&i| ours[i] != oracle[i]);
    DecodeMatch {
        counted,
        matched: first_mismatch.unwrap_or(counted),
        first_ambiguous,
        first_mismatch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_positions_never_fail() {
        let s = top1_sweep(&[1, 2, 3], &[1, 9, 4], &[1.0, 0.05, 0.2], 0.1);
        assert_eq!((s.firm, s.agree), (2, 1));
        assert_eq!(s.ambiguous, vec![1]);
        assert_eq!(s.mismatches, vec![(2, 3, 4)]);
    }

    #[test]
    fn nan_rows_never_agree() {
        let (t, m) = top2(&[0.5, f32::NAN, 0.1]);
        assert_eq!(t, NO_TOKEN);
        assert!(m.is_nan());
        // Counted as firm, and it matches no token.
        let s = top1_sweep(&[0], &[t], &[m], 0.1);
        assert_eq!((s.firm, s.agree), (1, 0));
        assert!(!decode_match(&[0], &[t], &[m], 0.1, 1).passed());
    }

    #[test]
    fn top2_takes_the_first_of_equal_logits() {
        assert_eq!(top2(&[0.5, 2.0, 1.75, 2.0]), (1, 0.0));
        assert_eq!(top2(&[3.0, 1.0, 2.5]), (0, 0.5));
        assert_eq!(top2(&[1.0]).0, 0);
    }

    #[test]
    fn decode_count_stops_at_first_ambiguous_step() {
        let d = decode_match(
            &[1, 2, 7, 8],
            &[1, 2, 3, 4],
            &[1.0, 1.0, 0.01, 1.0],
            0.1,
            24,
        );
        assert_eq!((d.counted, d.matched, d.first_ambiguous), (2, 2, Some(2)));
        assert!(d.passed());
        let d = decode_match(&[1, 5, 3], &[1, 2, 3], &[1.0; 3], 0.1, 24);
        assert_eq!(d.first_mismatch, Some(1));
        assert!(!d.passed());
    }
}
