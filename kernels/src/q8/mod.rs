//! The int8 × int8 product ("W8A8", llama.cpp's Q8_0 way) of int8 per-block-32
//! weights (f16 scales) and activations quantized per block of 32 by [`QActs`]: the
//! blocked kernel [`matmul`] with register tiles of [`TILE_R`] weight rows ×
//! [`TILE_C`] tokens.
//!
//! Compiled only with the cargo feature `q8` (off by default) and tested with it
//! (`cargo test -p q3vl-kernels --features q8`). The engine turns the feature on for
//! the kernel benchmarks of `q3vl bench`, which measure this product beside the
//! shipped ones; no forward pass of the engine calls it: on AVX2 without VNNI its
//! `maddubs`/`madd`/`fma` sequence runs no faster than the f32 FMA GEMM, and the 8-bit
//! activation rounding moved greedy tokens away from the reference on an untrained
//! fixture. The engine's decoder runs prefill on the packed int8 × int16 GEMM
//! ([`crate::gemm16`]) and decode on [`crate::matvec`], both on int16 block-quantized
//! activations.
//!
//! # The W8A8 arithmetic (every path, bit for bit)
//!
//! For one weight row `w` and one activation row `x` with `nb` blocks:
//!
//! ```text
//! acc[0..8] = 0                                          (f32 lanes)
//! for b in 0..nb:
//!     sc = ws[b] · xd[b]                                 (f32 product, rounded)
//!     for l in 0..8:
//!         s = Σ_{j<4} w[32b+4l+j] · x[32b+4l+j]          (exact, i32)
//!         acc[l] = fma(f32(s), sc, acc[l])               (fused multiply-add)
//! result = ((acc0+acc4) + (acc2+acc6)) + ((acc1+acc5) + (acc3+acc7))
//! ```
//!
//! Lane `l` is what `maddubs`+`madd` (AVX2), `dpbusd` (VNNI) and a pairwise-add
//! tree (NEON) produce for bytes `4l..4l+3`, so the SIMD paths only change how the
//! exact integer lane sums are computed; the float operations are the same ones in
//! the same order. One output never depends on the tile it was computed in, on the
//! task split or on the thread count.
//!
//! # Paths
//!
//! `tile` maps the [`Path`] to its register tile of `R × C` (const generic) pairs:
//! portable (the definition), AVX2 (`maddubs` + `madd`), AVX-512 VNNI (256-bit
//! `vpdpbusd`), NEON (`smull` + pairwise adds). The tests compare every tile size of
//! every path the CPU has with the portable dot product, bit for bit.

use crate::path::{assert_available, best_path, debug_assert_available, Path};
use crate::OutPtr;
use half::f16;
use rayon::prelude::*;

/// The kernels' block size, re-exported where the benchmarks of this kernel name it.
pub use crate::BLOCK;

/// f32 accumulator lanes per dot product (see the module docs).
pub const LANES: usize = 8;

/// Weight rows per register tile.
pub const TILE_R: usize = 2;
/// Activation rows (tokens) per register tile.
pub const TILE_C: usize = 4;

/// Activations quantized per 32-block: `rows × cols` int8 values and one f32 scale
/// per block (`d = amax / 127`, `q = round_half_even(x / d)`, so |q| ≤ 127).
#[derive(Debug, Clone, Default)]
pub struct QActs {
    /// Row-major int8 values.
    pub q: Vec<i8>,
    /// Row-major block scales, `cols / 32` per row.
    pub d: Vec<f32>,
    /// Number of rows (tokens).
    pub rows: usize,
    /// Row length; a multiple of 32.
    pub cols: usize,
}

impl QActs {
    /// Quantizes `x` (`rows × cols`, cols a multiple of 32). Rows are quantized in
    /// parallel; each block's result does not depend on that.
    pub fn quantize(x: &[f32], cols: usize) -> QActs {
        QActs::quantize_on(best_path(), x, cols)
    }

    /// [`QActs::quantize`] on a given path, which this CPU must run (checked in debug
    /// builds; every path gives the same bytes).
    pub(crate) fn quantize_on(path: Path, x: &[f32], cols: usize) -> QActs {
        debug_assert_available(path);
        assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols.max(1)));
        let mut q = vec![0i8; x.len()];
        let mut d = vec![0f32; x.len() / BLOCK];
        // Chunks of whole blocks, large enough to be worth a task.
        const PER_TASK: usize = 64 * 1024;
        let chunk = PER_TASK.max(BLOCK);
        x.par_chunks(chunk)
            .zip(q.par_chunks_mut(chunk))
            .zip(d.par_chunks_mut(chunk / BLOCK))
            .for_each(|((xc, qc), dc)| quantize_blocks(path, xc, qc, dc));
        QActs {
            q,
            d,
            rows: x.len() / cols.max(1),
            cols,
        }
    }

    /// Row `r`'s values and scales.
    pub fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let nb = self.cols / BLOCK;
        (
            &self.q[r * self.cols..(r + 1) * self.cols],
            &self.d[r * nb..(r + 1) * nb],
        )
    }
}

/// Quantizes whole blocks on `path` (the AVX2 code, on the AVX2 and AVX-512 paths,
/// runs the same operations, so it gives the same bytes as [`quantize_block`]).
fn quantize_blocks(path: Path, x: &[f32], q: &mut [i8], d: &mut [f32]) {
    debug_assert_available(path);
    match path {
        // SAFETY: the path's features are present; lengths agree.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512Vnni => unsafe { x86::quantize_blocks_avx2(x, q, d) },
        _ => {
            for ((xb, qb), db) in x
                .chunks_exact(BLOCK)
                .zip(q.chunks_exact_mut(BLOCK))
                .zip(d.iter_mut())
            {
                *db = quantize_block(xb, qb);
            }
        }
    }
}

/// Quantizes one block; returns its scale (0 for an all-zero block).
pub fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    if d == 0.0 || !d.is_finite() {
        q.fill(0);
        return if d.is_finite() { 0.0 } else { d };
    }
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v / d).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// The fixed final reduction of the eight lanes (see the module docs).
#[inline(always)]
fn hsum_lanes(a: [f32; LANES]) -> f32 {
    let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

/// One dot product on the portable path, with the per-block scale products `sc`
/// already formed (`sc[b] = ws[b] · xd[b]`).
fn dot_sc_portable(w: &[i8], x: &[i8], sc: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for ((wb, xb), &s) in w.chunks_exact(BLOCK).zip(x.chunks_exact(BLOCK)).zip(sc) {
        for (l, a) in acc.iter_mut().enumerate() {
            let mut sum = 0i32;
            for j in 4 * l..4 * l + 4 {
                sum += wb[j] as i32 * xb[j] as i32;
            }
            *a = (sum as f32).mul_add(s, *a);
        }
    }
    hsum_lanes(acc)
}

/// Portable reference: `Σ_b Σ_l fma(lane sums)` as in the module docs.
pub fn dot_portable(w: &[i8], ws: &[f32], x: &[i8], xd: &[f32]) -> f32 {
    let sc: Vec<f32> = ws.iter().zip(xd).map(|(a, b)| a * b).collect();
    dot_sc_portable(w, x, &sc)
}

/// Weight rows as a tile reads them: row `r` at `q + r·ld` (`nb · 32` bytes), its
/// f16 block scales at `s + r·nb`.
#[derive(Clone, Copy)]
struct WeightRows {
    q: *const i8,
    s: *const f16,
    ld: usize,
}

/// Quantized activation rows as a tile reads them: row `c` at `q + c·ld` (`nb · 32`
/// bytes), its f32 block scales at `d + c·nb`.
#[derive(Clone, Copy)]
struct ActRows {
    q: *const i8,
    d: *const f32,
    ld: usize,
}

/// A register tile: `out[r·C + c] = dot(w row r, x row c)` for `R × C` pairs of
/// `nb` blocks each. The tile first forms the scale products `f32(ws[b])·xd[b]` of
/// every pair into `sc` (`R·C·nb` floats).
///
/// # Safety
/// Every row holds `nb · 32` readable bytes and its `nb` scales, `sc` has room for
/// `R·C·nb` floats, `out` for `R·C`, and the function's target features are present.
type TileFn = unsafe fn(w: WeightRows, x: ActRows, nb: usize, sc: *mut f32, out: *mut f32);

/// `sc[(r·C + c)·nb + b] = f32(ws[r·nb + b]) · xd[c·nb + b]`, the scale products
/// of a tile (plain loop).
///
/// # Safety
/// As [`TileFn`].
#[inline(always)]
unsafe fn scale_products<const R: usize, const C: usize>(
    ws: *const f16,
    xd: *const f32,
    nb: usize,
    sc: *mut f32,
) {
    for r in 0..R {
        for c in 0..C {
            // SAFETY: see `TileFn`.
            let (a, b, d) = unsafe {
                (
                    std::slice::from_raw_parts(ws.add(r * nb), nb),
                    std::slice::from_raw_parts(xd.add(c * nb), nb),
                    std::slice::from_raw_parts_mut(sc.add((r * C + c) * nb), nb),
                )
            };
            for ((o, p), q) in d.iter_mut().zip(a).zip(b) {
                *o = p.to_f32() * q;
            }
        }
    }
}

/// The portable tile.
unsafe fn tile_portable<const R: usize, const C: usize>(
    w: WeightRows,
    x: ActRows,
    nb: usize,
    sc: *mut f32,
    out: *mut f32,
) {
    let WeightRows {
        q: w,
        s: ws,
        ld: ldw,
    } = w;
    let ActRows {
        q: x,
        d: xd,
        ld: ldx,
    } = x;
    // SAFETY: see `TileFn`.
    unsafe { scale_products::<R, C>(ws, xd, nb, sc) };
    let n = nb * BLOCK;
    for r in 0..R {
        // SAFETY: the caller guarantees every row and the scale products are readable.
        let wr = unsafe { std::slice::from_raw_parts(w.add(r * ldw), n) };
        for c in 0..C {
            let (xr, s) = unsafe {
                (
                    std::slice::from_raw_parts(x.add(c * ldx), n),
                    std::slice::from_raw_parts(sc.add((r * C + c) * nb), nb),
                )
            };
            unsafe { *out.add(r * C + c) = dot_sc_portable(wr, xr, s) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "aarch64")]
mod neon;

/// The instance of tile `f` for `rows` × `cols` (1..=[`TILE_R`] × 1..=[`TILE_C`]).
macro_rules! tile_for {
    ($($f:ident)::+, $rows:expr, $cols:expr) => {
        match ($rows, $cols) {
            (1, 1) => $($f)::+::<1, 1> as TileFn,
            (1, 2) => $($f)::+::<1, 2>,
            (1, 3) => $($f)::+::<1, 3>,
            (1, 4) => $($f)::+::<1, 4>,
            (2, 1) => $($f)::+::<2, 1>,
            (2, 2) => $($f)::+::<2, 2>,
            (2, 3) => $($f)::+::<2, 3>,
            (2, 4) => $($f)::+::<2, 4>,
            (r, c) => panic!("no {r} × {c} tile"),
        }
    };
}

/// The register tile of `path` for `rows` × `cols` pairs (1..=[`TILE_R`] ×
/// 1..=[`TILE_C`]); the callers check that the CPU runs `path` ([`assert_available`]).
fn tile(path: Path, rows: usize, cols: usize) -> TileFn {
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => tile_for!(x86::tile_avx2, rows, cols),
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => tile_for!(x86::tile_vnni, rows, cols),
        #[cfg(target_arch = "aarch64")]
        Path::Neon => tile_for!(neon::tile_neon, rows, cols),
        _ => tile_for!(tile_portable, rows, cols),
    }
}

/// One dot product on `path` (the 1 × 1 tile); `ws` are the weight row's f16
/// block scales.
pub fn dot_on(path: Path, w: &[i8], ws: &[f16], x: &[i8], xd: &[f32]) -> f32 {
    assert!(w.len() == x.len() && w.len().is_multiple_of(BLOCK));
    assert!(ws.len() == w.len() / BLOCK && xd.len() == ws.len());
    assert_available(path);
    let mut sc = vec![0f32; ws.len()];
    let mut out = 0f32;
    let (wr, xr) = (
        WeightRows {
            q: w.as_ptr(),
            s: ws.as_ptr(),
            ld: 0,
        },
        ActRows {
            q: x.as_ptr(),
            d: xd.as_ptr(),
            ld: 0,
        },
    );
    // SAFETY: lengths checked above; the path was detected on this CPU.
    unsafe { tile(path, 1, 1)(wr, xr, ws.len(), sc.as_mut_ptr(), &mut out) };
    out
}

/// `Σ_b Σ_l fma(...)` (module docs) on the best path.
pub fn dot(w: &[i8], ws: &[f16], x: &[i8], xd: &[f32]) -> f32 {
    dot_on(best_path(), w, ws, x, xd)
}

/// Weight rows per parallel task: a panel of about 128 KiB of weights, which stays
/// in L2 while every token tile passes over it. Any value gives the same numbers.
fn rows_per_task(rows: usize, cols: usize, tokens: usize) -> usize {
    let panel = ((128 << 10) / cols.max(1)).clamp(TILE_R, 64) / TILE_R * TILE_R;
    if tokens == 1 {
        // Decode streams every weight once; small tasks balance the threads.
        return panel.min(16).min(rows.max(1));
    }
    panel.min(rows.max(1))
}

/// `out[t, r] = Σ_c x[t, c] · W[r, c]` (the module's arithmetic) for int8 `W`
/// (`rows × cols`, f16 block scales `s`) and quantized activations `x` (`t × cols`);
/// `out` is `t × rows`, row-major. Parallel over tasks of weight rows on the current
/// rayon pool; each task runs token tiles of [`TILE_C`] over register tiles of
/// [`TILE_R`] rows, so its weight panel is read from memory once and reused from
/// cache by every token.
pub fn matmul(q: &[i8], s: &[f16], rows: usize, cols: usize, x: &QActs, out: &mut [f32]) {
    matmul_on(best_path(), q, s, rows, cols, x, out)
}

/// [`matmul`] on a given path (tests compare the paths).
pub fn matmul_on(
    path: Path,
    q: &[i8],
    s: &[f16],
    rows: usize,
    cols: usize,
    x: &QActs,
    out: &mut [f32],
) {
    assert!(cols.is_multiple_of(BLOCK) && x.cols == cols);
    let (nb, t) = (cols / BLOCK, x.rows);
    assert_eq!(q.len(), rows * cols);
    assert_eq!(s.len(), rows * nb);
    assert_eq!(x.q.len(), t * cols);
    assert_eq!(x.d.len(), t * nb);
    assert_eq!(out.len(), t * rows);
    if rows == 0 || t == 0 || nb == 0 {
        out.fill(0.0);
        return;
    }
    assert_available(path);
    let mc = rows_per_task(rows, cols, t);
    let optr = OutPtr(out.as_mut_ptr());
    (0..rows.div_ceil(mc)).into_par_iter().for_each(|task| {
        let r0 = task * mc;
        let r1 = (r0 + mc).min(rows);
        let mut sc = vec![0f32; TILE_R * TILE_C.min(t) * nb];
        let mut out_tile = [0f32; TILE_R * TILE_C];
        let mut t0 = 0;
        while t0 < t {
            let cc = TILE_C.min(t - t0);
            let mut r = r0;
            while r < r1 {
                let rc = TILE_R.min(r1 - r);
                // SAFETY: rows r..r+rc of q (and their scales in s) and tokens
                // t0..t0+cc of x are in bounds (checked lengths), sc has room for
                // rc·cc·nb products, out_tile for rc·cc, and the path was
                // detected on this CPU.
                unsafe {
                    let w = WeightRows {
                        q: q.as_ptr().add(r * cols),
                        s: s.as_ptr().add(r * nb),
                        ld: cols,
                    };
                    let xr = ActRows {
                        q: x.q.as_ptr().add(t0 * cols),
                        d: x.d.as_ptr().add(t0 * nb),
                        ld: cols,
                    };
                    tile(path, rc, cc)(w, xr, nb, sc.as_mut_ptr(), out_tile.as_mut_ptr());
                }
                for i in 0..rc {
                    for c in 0..cc {
                        // SAFETY: (t0 + c, r + i) is inside `out` (t × rows), and only
                        // this task writes row r + i.
                        unsafe { *optr.get().add((t0 + c) * rows + r + i) = out_tile[i * cc + c] };
                    }
                }
                r += rc;
            }
            t0 += cc;
        }
    });
}

#[cfg(test)]
mod tests;
