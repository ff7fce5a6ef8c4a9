//! Streaming read bandwidths: of a fresh buffer (the decode bound's denominator) and
//! of the bundle's own mapped weights.

use super::best_of;
use rayon::prelude::*;
use std::time::Instant;

/// A plain read of the bytes [`super::q8_sweep_rate`] reads (every int8 weight of
/// `bundle` and its scales, straight from the memory map; a sum, no products), on the
/// current rayon pool: best bytes per second over `reps` passes. Beside
/// [`memory_read_bandwidth`] it separates the kernel's efficiency from the speed of the
/// weights' own pages, which is not always the anonymous buffer's (page-cache
/// placement: a file's 2 MiB-mapped pages have read slower in one hour than in
/// another on the same host, while a fresh anonymous buffer read the same in both).
pub fn weights_read_bandwidth(bundle: &q3vl_bundle::Bundle, reps: usize) -> f64 {
    let parts = bundle.stored_bytes(|n| bundle.q8(n).is_some());
    let bytes: usize = parts.iter().map(|b| b.len()).sum();
    let (wall, _) = best_of(reps, || {
        let s: u64 = parts
            .par_iter()
            .flat_map(|b| b.par_chunks(1 << 20))
            .map(|c| {
                // SAFETY: every bit pattern is a u64. The unaligned ends (under 8 bytes
                // per MiB) are left out of the sum, not of the byte count.
                let (_, words, _) = unsafe { c.align_to::<u64>() };
                lane_sum(words)
            })
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
    });
    bytes as f64 / wall
}

/// A wrapping sum of `words` in four independent lanes, so the loads, not the adds,
/// are the bottleneck.
fn lane_sum(words: &[u64]) -> u64 {
    let mut acc = [0u64; 4];
    for q in words.chunks_exact(4) {
        for l in 0..4 {
            acc[l] = acc[l].wrapping_add(q[l]);
        }
    }
    acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
}

/// Multi-threaded streaming read bandwidth in bytes/s: every thread sums its part of
/// a `bytes`-sized buffer (choose ≫ last-level cache); best of `reps` passes.
///
/// The buffer asks for 2 MiB pages, as the engine's mapped weights do
/// ([`q3vl_bundle::Bundle::open`]), so the bound is the best this memory reads (a
/// `Vec` on 4 KiB pages, where transparent huge pages are opt-in, reads markedly
/// slower; BENCHMARKS.md has the figures). Where the map fails, a `Vec` is used.
pub fn memory_read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = (bytes / 8).max(1);
    let mut map = memmap2::MmapMut::map_anon(n * 8).ok();
    let mut vec = Vec::new();
    let buf: &mut [u64] = match map.as_mut() {
        Some(m) => {
            #[cfg(target_os = "linux")]
            let _ = m.advise(memmap2::Advice::HugePage);
            // SAFETY: every bit pattern is a u64; the map is page-aligned, so the
            // aligned middle is all of it.
            let (_, mid, _) = unsafe { m.align_to_mut::<u64>() };
            mid
        }
        None => {
            vec.resize(n, 0u64);
            &mut vec
        }
    };
    // Written first, so every page is resident before the timed reads.
    buf.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        for (j, v) in c.iter_mut().enumerate() {
            *v = (i << 16 | j) as u64;
        }
    });
    let buf = &*buf;
    let chunk = n.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(chunk)
            .map(lane_sum)
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
        let secs = t.elapsed().as_secs_f64();
        best = best.max((n * 8) as f64 / secs);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_something() {
        assert!(memory_read_bandwidth(1 << 20, 1) > 0.0);
    }
}
