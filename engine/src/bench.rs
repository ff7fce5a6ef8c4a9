//! Machine measurements for `q3vl bench`: streaming memory read bandwidth and peak
//! resident memory.

use rayon::prelude::*;
use std::time::Instant;

/// Multi-threaded streaming read bandwidth in bytes/s: every thread sums its part of
/// a `bytes`-sized buffer (choose ≫ last-level cache); best of `reps` passes.
pub fn memory_read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let chunk = n.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(chunk)
            .map(|c| {
                // Four independent lanes keep the loads, not the adds, the bottleneck.
                let mut acc = [0u64; 4];
                for q in c.chunks_exact(4) {
                    for l in 0..4 {
                        acc[l] = acc[l].wrapping_add(q[l]);
                    }
                }
                acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
            })
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
        let secs = t.elapsed().as_secs_f64();
        best = best.max((n * 8) as f64 / secs);
    }
    best
}

/// Peak resident set size (VmHWM) in bytes, where /proc is available.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_something() {
        assert!(memory_read_bandwidth(1 << 20, 1) > 0.0);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
        }
    }
}
