//! The decode matrix-vector product ("W8A16"): int8 per-block-32 weights with f16
//! scales, times activations rounded per block of 32 to int16.
//!
//! Why int16 activations: decode streams every weight once per token, so the
//! kernel must retire 32 weight bytes in fewer cycles than memory delivers them.
//! With f32 activations each 8 weights cost a widen, a convert and an FMA, and one
//! core could not keep up with memory. With int16 activations 16 products are one
//! `vpmaddwd`, and half the instructions remain. Rounding to 16 bits per block moves
//! an activation by at most 2⁻¹⁶ of its block's largest value, far below the int8
//! weights' own step (int8 activations, llama.cpp's Q8_0 way, moved greedy tokens
//! away from the reference on an untrained fixture; see the `q8` kernel, behind the
//! cargo feature `q8`).
//!
//! # The arithmetic (every path, bit for bit)
//!
//! The activation row `x` is quantized once per product ([`Acts16`]): per block
//! `d = amax / 32767`, `q = round_half_even(x / d)`, so `|q| ≤ 32767`. Then for one
//! weight row `w` with `nb` blocks:
//!
//! ```text
//! acc[0..16] = 0                                            (f32 lanes)
//! for b in 0..nb:
//!     sc = f32(ws[b]) · xd[b]                               (f32 product, rounded)
//!     for j in 0..16:
//!         p = w[32b+2j] · q[32b+2j] + w[32b+2j+1] · q[32b+2j+1]   (exact, i32)
//!         acc[j] = fma(f32(p), sc, acc[j])                  (fused multiply-add)
//! t[l] = acc[l] + acc[l+8]                                  (l < 8)
//! result = ((t0+t4) + (t2+t6)) + ((t1+t5) + (t3+t7))
//! ```
//!
//! Lane `j` holds the pair `vpmaddwd` forms in lane `j` when a block's 32 bytes are
//! sign-extended to int16 in one 512-bit register (on AVX2 and NEON, lanes 0–7
//! come from the block's first 16 bytes and 8–15 from the second). `|p| ≤ 2 · 128 ·
//! 32767 < 2²⁴`, so `f32(p)` is exact and a path only changes how it forms the
//! exact pair sums. An output never depends on the task split or the thread count.
//!
//! Why one lane per pair: on AVX-512 a block is then one sign-extension, one
//! `vpmaddwd`, one convert and one FMA, with no shuffle to fold the block's halves;
//! it streams the weights faster than the earlier definition (eight lanes, each two
//! pairs' sum), closer to a plain sum over the same bytes (docs/benchmarks-history.md:
//! "The decode arithmetic has one f32 lane per `vpmaddwd` pair").
//!
//! # Paths
//!
//! `rows_fn` maps the [`Path`] to its row loop: the portable one (the definition),
//! AVX2 (two 256-bit `vpmaddwd` per block, also run on CPUs with AVX-512 but without
//! the path chosen), AVX-512 (one 512-bit `vpmaddwd` per block), NEON (`smull` +
//! `addp`). The x86 rows each come in two prefetch variants, of which the CPU vendor
//! picks one. The tests compare every path the CPU has with the portable one, bit
//! for bit.

use crate::path::{assert_available, best_path, debug_assert_available, Path};
use crate::{OutPtr, BLOCK};
use half::f16;
use rayon::prelude::*;

/// Largest activation magnitude after quantization.
const QMAX: f32 = 32767.0;

/// Adding 1.5 · 2²³ rounds `|v / d| ≤ 32767 + ε` half-to-even in the default
/// rounding mode (as `round_ties_even` does, without a libm call per value).
const MAGIC: f32 = 12_582_912.0;

/// Activations quantized per block of 32 to int16, one f32 scale per block.
#[derive(Debug, Clone, Default)]
pub struct Acts16 {
    /// Row-major int16 values.
    pub q: Vec<i16>,
    /// Row-major block scales, `cols / 32` per row.
    pub d: Vec<f32>,
    /// Row length; a multiple of 32.
    pub cols: usize,
}

impl Acts16 {
    /// Quantizes `x` (rows of `cols`, a multiple of 32) block by block.
    pub fn quantize(x: &[f32], cols: usize) -> Acts16 {
        Acts16::quantize_on(best_path(), x, cols)
    }

    /// [`Acts16::quantize`] on a given path, which this CPU must run (checked in debug
    /// builds; every path gives the same bits).
    pub(crate) fn quantize_on(path: Path, x: &[f32], cols: usize) -> Acts16 {
        debug_assert_available(path);
        assert!(cols.is_multiple_of(BLOCK) && cols > 0 && x.len().is_multiple_of(cols));
        let mut q = vec![0i16; x.len()];
        let mut d = vec![0f32; x.len() / BLOCK];
        for ((xb, qb), db) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .zip(d.iter_mut())
        {
            *db = quantize_block16_on(path, xb, qb);
        }
        Acts16 { q, d, cols }
    }

    /// Row `r`'s values and scales.
    pub fn row(&self, r: usize) -> (&[i16], &[f32]) {
        let nb = self.cols / BLOCK;
        (
            &self.q[r * self.cols..(r + 1) * self.cols],
            &self.d[r * nb..(r + 1) * nb],
        )
    }
}

/// Quantizes one block (32 values) to int16; returns its scale: 0 for an all-zero
/// block, and NaN or ±∞ when the block holds one (its values are then 0, so every
/// product with the block is NaN, as in f32 arithmetic). The same bits on every path
/// (a prefill quantizes every prompt row before each of its products: on one
/// scalar division per value that was about 1% of an 8B prefill).
pub fn quantize_block16(x: &[f32], q: &mut [i16]) -> f32 {
    quantize_block16_on(best_path(), x, q)
}

/// [`quantize_block16`] on a given path (the AVX2 code also runs on the AVX-512 path),
/// which this CPU must run (checked in debug builds).
pub(crate) fn quantize_block16_on(path: Path, x: &[f32], q: &mut [i16]) -> f32 {
    debug_assert_available(path);
    assert!(x.len() == BLOCK && q.len() == BLOCK);
    match path {
        // SAFETY: both hold one block (checked); the path's features are present.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512Vnni => unsafe {
            x86::quantize_block16_avx2(x.as_ptr(), q.as_mut_ptr())
        },
        _ => quantize_block16_portable(x, q),
    }
}

/// [`quantize_block16`] in plain Rust: the definition.
pub fn quantize_block16_portable(x: &[f32], q: &mut [i16]) -> f32 {
    let mut amax = 0f32;
    for v in x {
        if v.is_nan() {
            q.fill(0);
            return f32::NAN;
        }
        amax = amax.max(v.abs());
    }
    let d = amax / QMAX;
    if d == 0.0 || !d.is_finite() {
        q.fill(0);
        return d;
    }
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (((v / d) + MAGIC) - MAGIC).clamp(-QMAX, QMAX) as i16;
    }
    d
}

/// One dot product on the portable path: the module's arithmetic.
pub fn dot_portable(w: &[i8], ws: &[f16], xq: &[i16], xd: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (((wb, qb), s), d) in w
        .chunks_exact(BLOCK)
        .zip(xq.chunks_exact(BLOCK))
        .zip(ws)
        .zip(xd)
    {
        let sc = s.to_f32() * d;
        for (j, a) in acc.iter_mut().enumerate() {
            let p =
                wb[2 * j] as i32 * qb[2 * j] as i32 + wb[2 * j + 1] as i32 * qb[2 * j + 1] as i32;
            *a = (p as f32).mul_add(sc, *a);
        }
    }
    let t: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]))
}

/// `n` consecutive rows' dot products into `out[0..n]`: rows `w`, `w + nb · 32`, …
/// with scales `ws`, `ws + nb`, …, against one quantized activation row.
///
/// Why a loop inside each path's function rather than a call per row from the
/// driver: with the loop inside the path's target features storing the results,
/// decode streams the weights faster than with the driver storing each call's
/// result (docs/benchmarks-history.md: "Each path loops over its task's rows
/// itself"). The row itself stays a call (see `row_avx2`).
///
/// # Safety
/// `w` addresses `n` rows of `nb · 32` bytes, `ws` their `n · nb` f16 scales, `x` one
/// activation row (`nb · 32` values, `nb` scales), `sc` scratch for `nb` floats and
/// `out` `n` floats; the function's target features are present.
type RowsFn = unsafe fn(
    w: *const i8,
    ws: *const f16,
    x: ActRow,
    nb: usize,
    sc: *mut f32,
    n: usize,
    out: *mut f32,
);

/// `n` consecutive weight rows (as [`RowsFn`]) against `t` activation rows `x[0..t]`
/// ([`MultiTask`]): output `(tok, r)` goes to `out[tok · stride + r]`. Each output is
/// the same dot product a [`RowsFn`] gives.
///
/// Why: a decode step of several sequences (continuous batching) multiplies each
/// weight row by several activation rows. Row by row, each product is one chain of
/// dependent FMAs, and its latency, not memory, bounds the step; interleaving the
/// activation rows' chains on one sign-extended weight block hides it.
///
/// # Safety
/// As [`RowsFn`], for `t` activation rows and `out` holding `(t − 1) · stride + n`
/// floats.
#[cfg(target_arch = "x86_64")]
type RowsMultiFn = unsafe fn(MultiTask);

/// What a [`RowsMultiFn`] works on.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct MultiTask {
    /// `n` weight rows of `nb · 32` bytes.
    w: *const i8,
    /// Their `n · nb` scales.
    ws: *const f16,
    /// `t` activation rows.
    x: *const ActRow,
    t: usize,
    nb: usize,
    /// Scratch for `x86::MULTI · nb` floats.
    sc: *mut f32,
    n: usize,
    /// Output `(tok, r)` at `out[tok · stride + r]`.
    out: *mut f32,
    stride: usize,
}

/// One quantized activation row, as a [`RowsFn`] reads it: `nb · 32` int16 values
/// and `nb` scales.
#[derive(Clone, Copy)]
struct ActRow {
    q: *const i16,
    d: *const f32,
}

/// Rows a [`RowsFn`] gathers on the stack before writing them out.
const ROWS_MAX: usize = 64;

/// Defines a [`RowsFn`] named `$name` looping `$row` under the attributes given.
macro_rules! rows_of {
    ($(#[$attr:meta])* $vis:vis $name:ident, $row:expr) => {
        $(#[$attr])*
        $vis unsafe fn $name(
            w: *const i8,
            ws: *const f16,
            x: $crate::matvec::ActRow,
            nb: usize,
            sc: *mut f32,
            n: usize,
            out: *mut f32,
        ) {
            // Results gather on the stack and reach `out` once per 64 rows.
            let mut done = 0;
            while done < n {
                let m = (n - done).min($crate::matvec::ROWS_MAX);
                let mut loc = [0f32; $crate::matvec::ROWS_MAX];
                for (i, v) in loc[..m].iter_mut().enumerate() {
                    let r = done + i;
                    // SAFETY: see `RowsFn`.
                    *v = unsafe { $row(w.add(r * nb * BLOCK), ws.add(r * nb), x.q, x.d, nb, sc) };
                }
                // SAFETY: out addresses n floats (`RowsFn`); done + m ≤ n.
                unsafe { std::ptr::copy_nonoverlapping(loc.as_ptr(), out.add(done), m) };
                done += m;
            }
        }
    };
}

rows_of!(
    /// [`row_portable`] over consecutive rows.
    rows_portable,
    row_portable
);

/// The portable row (the reference of every path).
unsafe fn row_portable(
    w: *const i8,
    ws: *const f16,
    xq: *const i16,
    xd: *const f32,
    nb: usize,
    _sc: *mut f32,
) -> f32 {
    let n = nb * BLOCK;
    // SAFETY: see `RowsFn` (for one row).
    unsafe {
        dot_portable(
            std::slice::from_raw_parts(w, n),
            std::slice::from_raw_parts(ws, nb),
            std::slice::from_raw_parts(xq, n),
            std::slice::from_raw_parts(xd, nb),
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "aarch64")]
mod neon;

/// The row loop of `path` (see the module's paths). Panics if the CPU lacks it.
fn rows_fn(path: Path) -> RowsFn {
    assert_available(path);
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 if x86::prefetch_l2() => x86::rows_avx2_l2,
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => x86::rows_avx2_nta,
        // No `vpdpwssd` here: each block's sums are folded into f32 at once, so
        // there is no integer chain for it to fuse into.
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni if x86::prefetch_l2() => x86::rows_avx512_l2,
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => x86::rows_avx512_nta,
        #[cfg(target_arch = "aarch64")]
        Path::Neon => neon::rows_neon,
        _ => rows_portable,
    }
}

/// The multi-row loop of `path`, where it has one.
#[cfg(target_arch = "x86_64")]
fn rows_multi_fn(path: Path) -> Option<RowsMultiFn> {
    assert_available(path);
    match path {
        Path::Avx2 if x86::prefetch_l2() => Some(x86::rows_multi_avx2_l2),
        Path::Avx2 => Some(x86::rows_multi_avx2_nta),
        Path::Avx512Vnni if x86::prefetch_l2() => Some(x86::rows_multi_avx512_l2),
        Path::Avx512Vnni => Some(x86::rows_multi_avx512_nta),
        _ => None,
    }
}

/// `out[t, r] = Σ_c x[t, c] · W[r, c]` for int8 `W` (`rows × cols`, f16 block scales
/// `s`) and f32 activations `x` (`tokens × cols`), quantized here to int16 per block
/// ([`Acts16`]); `out` is `tokens × rows`. Each output is one dot product with the
/// module's arithmetic. Parallel over tasks of weight rows on the current rayon pool;
/// meant for decode (one token), where the weights stream from memory once.
pub fn matvec(q: &[i8], s: &[f16], rows: usize, cols: usize, x: &[f32], out: &mut [f32]) {
    matvec_on(best_path(), q, s, rows, cols, x, out)
}

/// [`matvec`] on a given path (tests compare the paths).
pub fn matvec_on(
    path: Path,
    q: &[i8],
    s: &[f16],
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) {
    assert!(cols.is_multiple_of(BLOCK) && cols > 0);
    let (nb, t) = (cols / BLOCK, x.len() / cols);
    assert_eq!(x.len(), t * cols);
    assert_eq!(q.len(), rows * cols);
    assert_eq!(s.len(), rows * nb);
    assert_eq!(out.len(), t * rows);
    if rows == 0 || t == 0 {
        return;
    }
    let rows_of_path = rows_fn(path);
    let xa = Acts16::quantize_on(path, x, cols);
    #[cfg(target_arch = "x86_64")]
    if t > 1 {
        if let Some(multi) = rows_multi_fn(path) {
            return matvec_multi(multi, q, s, rows, cols, &xa, out);
        }
    }
    // About 32 KiB of weights per task: small tasks balance the threads; one row at
    // a time keeps a single sequential stream per thread, which the prefetchers
    // follow best.
    let mc = ((32 << 10) / cols).clamp(1, 64);
    let optr = OutPtr(out.as_mut_ptr());
    (0..rows.div_ceil(mc)).into_par_iter().for_each_init(
        || vec![0f32; nb],
        |sc, task| {
            let (r0, r1) = (task * mc, ((task + 1) * mc).min(rows));
            for tok in 0..t {
                let (xq, xd) = xa.row(tok);
                // SAFETY: rows r0..r1 of q and s and token tok of xa are in bounds
                // (checked lengths); sc holds nb floats; the path was detected on this
                // CPU; outputs (tok, r0..r1) are inside `out` and only this task writes
                // them.
                unsafe {
                    rows_of_path(
                        q.as_ptr().add(r0 * cols),
                        s.as_ptr().add(r0 * nb),
                        ActRow {
                            q: xq.as_ptr(),
                            d: xd.as_ptr(),
                        },
                        nb,
                        sc.as_mut_ptr(),
                        r1 - r0,
                        optr.get().add(tok * rows + r0),
                    )
                };
            }
        },
    );
}

/// [`matvec_on`] for several activation rows with a multi-row loop: the same tasks of
/// weight rows, each running every activation row against its rows at once.
#[cfg(target_arch = "x86_64")]
fn matvec_multi(
    multi: RowsMultiFn,
    q: &[i8],
    s: &[f16],
    rows: usize,
    cols: usize,
    xa: &Acts16,
    out: &mut [f32],
) {
    let (nb, t) = (cols / BLOCK, xa.q.len() / cols);
    let mc = ((32 << 10) / cols).clamp(1, 64);
    let optr = OutPtr(out.as_mut_ptr());
    (0..rows.div_ceil(mc)).into_par_iter().for_each_init(
        || vec![0f32; x86::MULTI * nb],
        |sc, task| {
            let (r0, r1) = (task * mc, ((task + 1) * mc).min(rows));
            let acts: Vec<ActRow> = (0..t)
                .map(|tok| {
                    let (xq, xd) = xa.row(tok);
                    ActRow {
                        q: xq.as_ptr(),
                        d: xd.as_ptr(),
                    }
                })
                .collect();
            // SAFETY: rows r0..r1 of q and s and every activation row are in bounds
            // (checked lengths in matvec_on); sc holds MULTI · nb floats; the path was
            // detected on this CPU; outputs (·, r0..r1) are inside `out` and only this
            // task writes them.
            unsafe {
                multi(MultiTask {
                    w: q.as_ptr().add(r0 * cols),
                    ws: s.as_ptr().add(r0 * nb),
                    x: acts.as_ptr(),
                    t,
                    nb,
                    sc: sc.as_mut_ptr(),
                    n: r1 - r0,
                    out: optr.get().add(r0),
                    stride: rows,
                })
            };
        },
    );
}

#[cfg(test)]
mod tests;
