//! q3vl-kernels: the compute kernels of the q3vl engine, with no dependency beyond
//! `half` and `rayon` (so they can be tested alone, also on other architectures:
//! `make test-aarch64`).
//!
//! The products of int8 per-block-32 weights and int16 block-quantized activations
//! (decode's matrix-vector kernel [`matvec`], prefill's packed GEMM [`gemm16`]), the
//! packed f32 GEMM of the vision tower and attention ([`gemm`]: f16 weights widened tile
//! by tile), the f32 dot product and f16 widening of one row ([`row`]), and vectorized
//! element-wise math ([`vmath`]). With the cargo feature `q8` (off by default, for the
//! engine's comparison benchmarks): the int8×int8 (Q8_0-style) block product `q8` and
//! the f32 GEMM on dequantized int8 weights, `gemm::linear_q8`.
//!
//! Every kernel is one directory: `mod.rs` states the arithmetic, holds the portable
//! code (the definition every SIMD path is tested against), the dispatch and the public
//! entries; `x86.rs` and `neon.rs` hold the SIMD paths; `tests.rs` the tests. How a
//! kernel picks its path is one style for all of them: see [`path`].
//!
//! Determinism rule shared by every kernel here: one output element is always
//! produced by one dot product whose reduction runs in a fixed order on one thread,
//! so results do not depend on the thread count.

pub mod gemm;
pub mod gemm16;
pub mod matvec;
pub mod path;
pub mod peak;
#[cfg(feature = "q8")]
pub mod q8;
pub mod row;
pub mod vmath;

/// Elements per quantization block of the int8 weights and of the quantized
/// activations (`docs/quantization.md`).
pub const BLOCK: usize = 32;

/// A raw output pointer that parallel tasks share; each task writes only its own,
/// disjoint elements (the callers' SAFETY comments say which).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);

impl OutPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: every user writes disjoint elements from different tasks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Test helpers shared by the kernels' thread-independence tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::BLOCK;
    use half::f16;

    /// Runs `f` on a fresh rayon pool of `threads` threads.
    pub(crate) fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    /// A small deterministic generator for test data (a 64-bit LCG's high bits).
    pub(crate) fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// Random weights (−128..=127, as the absmax head allows), activations
    /// (−127..=127, as quantization produces) and scales, with the extremes planted.
    pub(crate) fn random_rows(seed: &mut u64, nrows: usize, nb: usize, weights: bool) -> Vec<i8> {
        let n = nb * BLOCK;
        let mut v: Vec<i8> = (0..nrows * n)
            .map(|_| {
                if weights {
                    (lcg(seed) % 256) as u8 as i8
                } else {
                    ((lcg(seed) % 255) as i32 - 127) as i8
                }
            })
            .collect();
        let (lo, hi) = if weights {
            (-128i8, 127i8)
        } else {
            (-127, 127)
        };
        for r in 0..nrows {
            let row = &mut v[r * n..(r + 1) * n];
            // Extremes at the start of every row, one block of all-extreme values
            // (the largest possible sums), and one block of all-max / all-min.
            row[..4].copy_from_slice(&[lo, hi, -127, lo]);
            if nb > 1 {
                row[BLOCK..2 * BLOCK].fill(lo);
            }
            if nb > 2 {
                let b = 2 + (r % (nb - 2));
                row[b * BLOCK..(b + 1) * BLOCK].fill(if r % 2 == 0 { hi } else { lo });
            }
        }
        v
    }

    /// An int8 weight of `rows × nb` blocks (extremes planted) and its f16 scales.
    pub(crate) fn random_weight(seed: &mut u64, rows: usize, nb: usize) -> (Vec<i8>, Vec<f16>) {
        let q = random_rows(seed, rows, nb, true);
        let s = random_scales(seed, rows * nb, true)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        (q, s)
    }

    /// Positive block scales in [1e-5, 0.3), rounded to f16 when `f16_exact`.
    pub(crate) fn random_scales(seed: &mut u64, n: usize, f16_exact: bool) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let v = (lcg(seed) % 1000) as f32 * 3e-4 + 1e-5;
                if f16_exact {
                    f16::from_f32(v).to_f32()
                } else {
                    v
                }
            })
            .collect()
    }

    /// Asserts `got` equals `want` bit for bit, naming the first differing index.
    pub(crate) fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{what} i={i}: {g} vs {w}");
        }
    }
}
