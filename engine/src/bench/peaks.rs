//! The instruction peaks of this CPU on all of the pool's threads at once
//! ([`crate::kernels::peak`]): the bound a compute-bound phase (prefill, vision) is
//! measured against, beside the peer.

use crate::kernels::path::Path;
use crate::kernels::peak::{form, issue, Instruction};
use std::time::Instant;

/// Rounds of one thread's peak loop per timing: 12 instructions a round, tens of
/// milliseconds at a few instructions per nanosecond, long enough for the clock.
const ROUNDS: u64 = 8_000_000;

/// One instruction's peak.
#[derive(Debug, Clone, Copy)]
pub struct Peak {
    /// The instruction.
    pub instruction: Instruction,
    /// How the path issues it (mnemonics).
    pub form: &'static str,
    /// Operations (2 per multiply-add) per second on all threads, in units of 10⁹.
    pub g_per_s: f64,
}

/// The peak of every instruction `path` issues ([`form`]), each on every thread of
/// the current rayon pool at once; best of `reps` timings.
pub fn instruction_peaks(path: Path, reps: usize) -> Vec<Peak> {
    Instruction::ALL
        .into_iter()
        .filter_map(|instruction| {
            let (form, _) = form(instruction, path)?;
            let mut best = 0f64;
            for _ in 0..reps.max(1) {
                let t = Instant::now();
                let ops: f64 = rayon::broadcast(|_| issue(instruction, path, ROUNDS))
                    .into_iter()
                    .flatten()
                    .map(|done| done.ops)
                    .sum();
                best = best.max(ops / t.elapsed().as_secs_f64() / 1e9);
            }
            Some(Peak {
                instruction,
                form,
                g_per_s: best,
            })
        })
        .collect()
}

/// The peak of `instruction` among `peaks`, G operations/s.
pub fn peak_of(peaks: &[Peak], instruction: Instruction) -> Option<f64> {
    peaks
        .iter()
        .find(|p| p.instruction == instruction)
        .map(|p| p.g_per_s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::path::best_path;

    #[test]
    fn peaks_are_positive_where_the_path_has_them() {
        let path = best_path();
        let peaks = instruction_peaks(path, 1);
        for i in Instruction::ALL {
            match (form(i, path), peak_of(&peaks, i)) {
                (Some(_), Some(g)) => assert!(g.is_finite() && g > 0.0, "{i:?} {g}"),
                (None, None) => {}
                other => panic!("{i:?}: {other:?}"),
            }
        }
    }
}
