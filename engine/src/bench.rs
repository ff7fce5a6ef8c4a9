//! Machine measurements for `q3vl bench`: streaming memory read bandwidth, peak
//! resident memory, CPU time, and kernel micro-benchmarks on random data of the real
//! shapes (the decoder's int8-weight linears for prefill and decode, the int8 × int8
//! and f32 GEMM kernels for comparison, and the vision f32 GEMM).

use crate::kernels::q8::{self, QActs};
use crate::weights::{Lin, Pass};
use half::f16;
use rayon::prelude::*;
use std::time::Instant;

/// One micro-benchmark's result: best-of wall time and the rate it implies.
#[derive(Debug, Clone, Copy)]
pub struct KernelRate {
    /// Best wall time of one call, milliseconds.
    pub ms: f64,
    /// Operations (2 per multiply-add) per second, in units of 10⁹.
    pub g_per_s: f64,
    /// Operations per CPU-second of all threads (best call), in units of 10⁹: on a
    /// shared machine, a steadier per-core figure than the wall-time rate. None when
    /// the CPU time is unavailable or too short to register (a call of microseconds).
    pub g_per_cpu_s: Option<f64>,
}

impl KernelRate {
    /// The rate of `ops` operations done in `wall` seconds using `cpu` CPU-seconds.
    fn of(ops: f64, wall: f64, cpu: f64) -> KernelRate {
        KernelRate {
            ms: wall * 1e3,
            g_per_s: ops / wall / 1e9,
            // `best_of` leaves f64::MAX where /proc is unreadable.
            g_per_cpu_s: (cpu > 0.0 && cpu < f64::MAX).then(|| ops / cpu / 1e9),
        }
    }
}

/// CPU time of every thread of this process, in seconds, with nanosecond
/// resolution (`/proc/self/task/*/schedstat`); None where unavailable.
pub fn threads_cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        // A thread may end between the listing and the read: skip it.
        let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) else {
            continue;
        };
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}

/// Runs `f` `reps` times; the best wall time and the best CPU time (seconds).
fn best_of(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
    for _ in 0..reps.max(1) {
        let c0 = threads_cpu_seconds();
        let t = Instant::now();
        f();
        wall = wall.min(t.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (c0, threads_cpu_seconds()) {
            cpu = cpu.min(b - a);
        }
    }
    (wall, cpu)
}

/// A deterministic generator for benchmark data.
fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

/// Random int8 weights, f16 scales and f32 activations of a shape.
fn q8_case(rows: usize, cols: usize, tokens: usize) -> (Vec<i8>, Vec<f16>, Vec<f32>) {
    let mut seed = 1;
    let q: Vec<i8> = (0..rows * cols)
        .map(|_| lcg(&mut seed) as u8 as i8)
        .collect();
    let s: Vec<f16> = (0..rows * cols / q8::BLOCK)
        .map(|_| f16::from_f32((lcg(&mut seed) % 1000) as f32 * 1e-5))
        .collect();
    let x: Vec<f32> = (0..tokens * cols)
        .map(|_| (lcg(&mut seed) % 2001) as f32 * 1e-3 - 1.0)
        .collect();
    (q, s, x)
}

/// Times `product(weights, scales, activations, out)` on [`q8_case`]'s data of one
/// shape: best of `reps`, as multiply-adds × 2 per second.
fn q8_rate(
    rows: usize,
    cols: usize,
    tokens: usize,
    reps: usize,
    mut product: impl FnMut(&[i8], &[f16], &[f32], &mut [f32]),
) -> KernelRate {
    let (q, s, x) = q8_case(rows, cols, tokens);
    let mut out = vec![0f32; tokens * rows];
    let (wall, cpu) = best_of(reps, || {
        product(&q, &s, &x, &mut out);
        std::hint::black_box(&out);
    });
    KernelRate::of(2.0 * (rows * cols * tokens) as f64, wall, cpu)
}

/// The engine's int8-weight linear ([`crate::weights::Lin::matmul`]): an int8
/// `rows × cols` weight against `tokens` f32 activation rows, in the arithmetic of
/// the pass that runs that many tokens (the int16-activation GEMM for a prefill, the
/// int16-activation matrix-vector kernel for a decode step); on the current rayon
/// pool, best of `reps`.
pub fn q8_linear_rate(rows: usize, cols: usize, tokens: usize, reps: usize) -> KernelRate {
    q8_rate(rows, cols, tokens, reps, |q, s, x, out| {
        let lin = Lin::Q8 { q, s, rows, cols };
        lin.matmul(Pass::of(tokens), x, tokens, out);
    })
}

/// The packed f32 GEMM on the same int8 weights dequantized tile by tile
/// ([`crate::kernels::gemm::linear_q8`], the reference's arithmetic, and the engine's
/// prefill before the int16 GEMM), for comparison with [`q8_linear_rate`]; best of
/// `reps`.
pub fn q8_f32_gemm_rate(rows: usize, cols: usize, tokens: usize, reps: usize) -> KernelRate {
    q8_rate(rows, cols, tokens, reps, |q, s, x, out| {
        crate::kernels::gemm::linear_q8(x, tokens, cols, q, s, rows, out)
    })
}

/// The int8 × int8 (W8A8, Q8_0-style) matrix product [`q8::matmul`], activations
/// quantized per call, for comparison with [`q8_linear_rate`]; best of `reps`.
pub fn q8_matmul_rate(rows: usize, cols: usize, tokens: usize, reps: usize) -> KernelRate {
    q8_rate(rows, cols, tokens, reps, |q, s, x, out| {
        let xq = QActs::quantize(x, cols);
        q8::matmul(q, s, rows, cols, &xq, out);
    })
}

/// The vision GEMM: `m` rows of f32 activations against an f16 `n × k` weight with
/// bias ([`crate::kernels::gemm::linear_f16`]), on the current rayon pool; best of `reps`.
pub fn f16_linear_rate(m: usize, k: usize, n: usize, reps: usize) -> KernelRate {
    let mut seed = 2;
    let w: Vec<f16> = (0..n * k)
        .map(|_| f16::from_f32((lcg(&mut seed) % 2001) as f32 * 1e-4 - 0.1))
        .collect();
    let bias: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
    let x: Vec<f32> = (0..m * k)
        .map(|_| (lcg(&mut seed) % 2001) as f32 * 1e-3 - 1.0)
        .collect();
    let mut out = vec![0f32; m * n];
    let (wall, cpu) = best_of(reps, || {
        crate::kernels::gemm::linear_f16(&x, m, k, &w, n, Some(&bias), &mut out);
        std::hint::black_box(&out);
    });
    KernelRate::of(2.0 * (m * n * k) as f64, wall, cpu)
}

/// The decode step's matrix products alone: every int8 weight of `bundle` against
/// one activation row, with the pool's other threads kept awake as in a decode step
/// ([`crate::awake`]) ([`crate::kernels::matvec::matvec`]), straight from the memory map, on the
/// current rayon pool. Returns the best sweep's weight bytes (values and scales) per
/// second over `reps` sweeps.
pub fn q8_sweep_rate(bundle: &q3vl_bundle::Bundle, reps: usize) -> f64 {
    let weights: Vec<_> = bundle
        .tensor_names()
        .into_iter()
        .filter_map(|n| bundle.q8(n))
        .collect();
    let bytes: usize = weights.iter().map(|(q, s, _)| q.len() + 2 * s.len()).sum();
    let cols_max = weights.iter().map(|(_, _, [_, c])| *c).max().unwrap_or(0);
    let x: Vec<f32> = (0..cols_max)
        .map(|i| ((i % 17) as f32 - 8.0) * 0.01)
        .collect();
    let rows_max = weights.iter().map(|(_, _, [r, _])| *r).max().unwrap_or(0);
    let mut out = vec![0f32; rows_max];
    let (wall, _) = best_of(reps, || {
        // As in a decode step: the pool's other threads kept awake between products.
        crate::awake::awake_here(|| {
            for (q, s, [rows, cols]) in &weights {
                let o = &mut out[..*rows];
                crate::kernels::matvec::matvec(q, s, *rows, *cols, &x[..*cols], o);
                std::hint::black_box(o);
            }
        })
    });
    bytes as f64 / wall
}

/// A plain read of the bytes [`q8_sweep_rate`] reads (every int8 weight of `bundle` and
/// its scales, straight from the memory map; a sum, no products), on the current rayon
/// pool: best bytes per second over `reps` passes. Beside [`memory_read_bandwidth`] it
/// separates the kernel's efficiency from the speed of the weights' own pages, which
/// is not always the anonymous buffer's (page-cache placement; on a 2-core Xeon host
/// a file's 2 MiB-mapped pages read at 27–28 GB/s in one hour and 34.8 in another,
/// while a fresh anonymous buffer read at 34 in both).
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
/// ([`q3vl_bundle::Bundle::open`]), so the bound is the best this memory reads: on a
/// 2-core Xeon host a 1 GiB sum read 34.6 GB/s on 2 MiB pages and 22.0 on 4 KiB
/// pages (a `Vec`, where transparent huge pages are opt-in). Where the map fails, a
/// `Vec` is used.
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

/// CPU time (user + system) this process has used so far, in seconds, where /proc
/// is available (10 ms resolution). On a shared machine, CPU time per phase is a
/// steadier figure than wall time.
pub fn process_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14, 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
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
    fn kernel_rates_are_positive() {
        // The per-CPU rate is absent or positive, never infinite (a call too short
        // for the CPU clock to register).
        let r = q8_matmul_rate(8, 64, 5, 1);
        assert!(
            r.g_per_cpu_s.is_none_or(|v| v.is_finite() && v > 0.0),
            "{r:?}"
        );
        assert!(q8_matmul_rate(8, 64, 5, 1).g_per_s > 0.0);
        assert!(q8_linear_rate(8, 64, 5, 1).g_per_s > 0.0);
        assert!(q8_f32_gemm_rate(8, 64, 5, 1).g_per_s > 0.0);
        assert!(q8_linear_rate(8, 64, 1, 1).g_per_s > 0.0);
        assert!(f16_linear_rate(7, 32, 16, 1).g_per_s > 0.0);
    }

    #[test]
    fn measures_something() {
        assert!(memory_read_bandwidth(1 << 20, 1) > 0.0);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
            // CPU times are optional (schedstat may be compiled out).
            assert!(process_cpu_seconds().is_none_or(|c| c >= 0.0));
            assert!(threads_cpu_seconds().is_none_or(|c| c >= 0.0));
        }
    }
}
