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
    let quads = words.chunks_exact(4);
    let rest = quads.remainder();
    for q in quads {
        for l in 0..4 {
            acc[l] = acc[l].wrapping_add(q[l]);
        }
    }
    acc.iter().chain(rest).fold(0u64, |a, b| a.wrapping_add(*b))
}

/// How a bandwidth probe reads its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// Plain loads: the hardware prefetchers alone.
    Plain,
    /// Loads plus a software prefetch into L2 (`prefetcht1`) of every line 8 KiB
    /// ahead, as the decode kernel issues on Intel CPUs.
    PrefetchL2,
    /// The same with the non-temporal hint (`prefetchnta`), as the decode kernel
    /// issues elsewhere.
    PrefetchNta,
}

impl Reader {
    /// The readers this CPU has (the prefetching ones on x86-64 only).
    pub fn all() -> &'static [Reader] {
        if cfg!(target_arch = "x86_64") {
            &[Reader::Plain, Reader::PrefetchL2, Reader::PrefetchNta]
        } else {
            &[Reader::Plain]
        }
    }

    /// The reader's name, as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Reader::Plain => "plain",
            Reader::PrefetchL2 => "prefetch_l2",
            Reader::PrefetchNta => "prefetch_nta",
        }
    }

    /// A wrapping sum of `words` read this way.
    fn sum(self, words: &[u64]) -> u64 {
        match self {
            Reader::Plain => lane_sum(words),
            #[cfg(target_arch = "x86_64")]
            Reader::PrefetchL2 => prefetching_sum::<{ std::arch::x86_64::_MM_HINT_T1 }>(words),
            #[cfg(target_arch = "x86_64")]
            Reader::PrefetchNta => prefetching_sum::<{ std::arch::x86_64::_MM_HINT_NTA }>(words),
            #[cfg(not(target_arch = "x86_64"))]
            _ => lane_sum(words),
        }
    }
}

/// [`lane_sum`] with a software prefetch of hint `HINT`, 8 KiB ahead, per 64-byte
/// line (beyond 4 KiB pages, where the hardware prefetchers stop).
#[cfg(target_arch = "x86_64")]
fn prefetching_sum<const HINT: i32>(words: &[u64]) -> u64 {
    const AHEAD: usize = 8192;
    let mut acc = 0u64;
    for line in words.chunks(8) {
        let p = line.as_ptr().cast::<i8>().wrapping_add(AHEAD);
        // SAFETY: a prefetch reads nothing and never faults, wherever it points.
        #[allow(unused_unsafe)]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<HINT>(p)
        };
        acc = acc.wrapping_add(lane_sum(line));
    }
    acc
}

/// The streaming read bandwidth of each [`Reader`], bytes/s.
#[derive(Debug, Clone, Default)]
pub struct ReadBandwidth {
    /// Each reader's best pass.
    pub by_reader: Vec<(Reader, f64)>,
}

impl ReadBandwidth {
    /// The fastest reader's bandwidth: the best this memory reads.
    pub fn best(&self) -> f64 {
        self.by_reader.iter().map(|r| r.1).fold(0.0, f64::max)
    }

    /// Each reader's better figure of `self` and `other`.
    pub fn max(&self, other: &ReadBandwidth) -> ReadBandwidth {
        let by_reader = self
            .by_reader
            .iter()
            .map(|&(r, v)| {
                let o = other
                    .by_reader
                    .iter()
                    .find(|x| x.0 == r)
                    .map_or(0.0, |x| x.1);
                (r, v.max(o))
            })
            .collect();
        ReadBandwidth { by_reader }
    }
}

/// Multi-threaded streaming read bandwidth of a `bytes`-sized buffer (choose ≫
/// last-level cache) by every [`Reader`]: every thread sums its parts of the buffer;
/// best of `reps` passes per reader, the readers taking turns.
///
/// The buffer asks for 2 MiB pages, as the engine's mapped weights do
/// ([`q3vl_bundle::Bundle::open`]), so the bound is the best this memory reads (a
/// `Vec` on 4 KiB pages, where transparent huge pages are opt-in, reads markedly
/// slower; BENCHMARKS.md has the figures). Where the map fails, a `Vec` is used.
/// Several readers, because the decode kernel's software prefetch reads faster than
/// the hardware prefetchers alone on some CPUs: a bound from plain loads only was
/// beaten by the decode sweep (105% "of the bound").
pub fn memory_read_bandwidth(bytes: usize, reps: usize) -> ReadBandwidth {
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
    let mut by_reader: Vec<(Reader, f64)> = Reader::all().iter().map(|&r| (r, 0.0)).collect();
    for _ in 0..reps.max(1) {
        for (reader, best) in by_reader.iter_mut() {
            let t = Instant::now();
            let s: u64 = buf
                .par_chunks(chunk)
                .map(|c| reader.sum(c))
                .reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(s);
            *best = best.max((n * 8) as f64 / t.elapsed().as_secs_f64());
        }
    }
    ReadBandwidth { by_reader }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reader_measures_something() {
        let b = memory_read_bandwidth(1 << 20, 1);
        assert_eq!(b.by_reader.len(), Reader::all().len());
        assert!(b.by_reader.iter().all(|r| r.1 > 0.0), "{b:?}");
        assert_eq!(
            b.best(),
            b.by_reader.iter().map(|r| r.1).fold(0.0, f64::max)
        );
        let doubled = ReadBandwidth {
            by_reader: b.by_reader.iter().map(|&(r, v)| (r, 2.0 * v)).collect(),
        };
        assert_eq!(b.max(&doubled).best(), 2.0 * b.best());
    }

    #[test]
    fn every_reader_sums_the_same() {
        let words: Vec<u64> = (0..10_007u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let want = words.iter().fold(0u64, |a, b| a.wrapping_add(*b));
        for r in Reader::all() {
            assert_eq!(r.sum(&words), want, "{r:?}");
        }
    }
}
