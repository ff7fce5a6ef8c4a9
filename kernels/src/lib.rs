//! q3vl-kernels: the compute kernels of the q3vl engine, with no dependency beyond
//! `half` and `rayon` (so they can be tested alone, also on other architectures:
//! `make test-aarch64`).
//!
//! The decode matrix-vector product of int8 per-block-32 weights
//! and int16 block-quantized activations, the packed f32 GEMM of the vision tower and
//! prefill (int8 and f16 weights widened tile by tile), the int8×int8 (Q8_0-style)
//! block product kept for comparison, f16-weight × f32 dot products, and vectorized
//! element-wise math.
//!
//! Determinism rule shared by every kernel here: one output element is always
//! produced by one dot product whose reduction runs in a fixed order on one thread,
//! so results do not depend on the thread count.

pub mod f16dot;
pub mod gemm;
pub mod matvec;
pub mod q8;
pub mod vmath;

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

    /// Asserts `got` equals `want` bit for bit, naming the first differing index.
    pub(crate) fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{what} i={i}: {g} vs {w}");
        }
    }
}
