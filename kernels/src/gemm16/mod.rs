//! The prefill product of int8 weights ("W8A16 GEMM"): int8 per-block-32 weights
//! with f16 scales, times activation rows quantized per block of 32 to int16 (as
//! the decode kernel quantizes its one row, [`crate::matvec::Acts16`]), all prompt
//! rows at once.
//!
//! Why: prefill is compute-bound. Without AVX-512 VNNI the f32 FMA tile retires 8
//! multiply-adds per instruction, at most two per cycle; `vpmaddwd` retires 16
//! exact int16 products per instruction, so the integer tile has the higher ceiling
//! (measured in a throughput loop: docs/benchmarks-history.md, "prefill on int16
//! activations"), and its weight panels are half as large (int16, not f32). int8
//! activations would allow `vpmaddubsw` and twice that again, but they moved greedy
//! tokens off the reference (the `q8` kernel, behind the cargo feature `q8`); int16
//! rounding moves an activation by at most 2⁻¹⁶ of its block's largest value.
//!
//! # The arithmetic (every path, bit for bit)
//!
//! Each activation row is quantized per block as in [`crate::matvec`]: `d[i, b] =
//! amax / 32767`, `q[i, ·] = round_half_even(x / d)`. Then, for output `(i, j)`:
//!
//! ```text
//! acc = 0                                                        (f32)
//! for b in 0..k/32:
//!     S  = Σ_{t < 32} w[j, 32b + t] · q[i, 32b + t]              (exact, i32)
//!     sc = f32(ws[j, b]) · d[i, b]                               (f32 product, rounded)
//!     acc = fma(f32(S), sc, acc)                                 (f32(S) rounded to even)
//! out[i, j] = acc
//! ```
//!
//! `|S| ≤ 32 · 128 · 32767 < 2³¹`, so the integer sums cannot overflow, and how a
//! path forms them (pairs in `vpmaddwd`, then adds) cannot change them. The chain
//! over blocks runs in order on one thread, so an output does not depend on the
//! task split, the thread count or the number of rows in the product.
//!
//! # Blocking
//! As the f32 GEMM ([`crate::gemm`]): parallel tasks of output columns; per task
//! and [`KC`]-long slice the weight tile is packed (int8 widened to int16 pairs,
//! transposed so one vector holds 8 columns' pair) and stays in L2; the activations
//! are quantized and packed once per product into [`MR`]-row panels; a register tile
//! sums one block in int32 accumulators, then folds the block into its f32
//! accumulators. The AVX2 tile is 6 × 16 (12 int32 vectors); the AVX-512 VNNI tile
//! is 6 × 32 over two adjacent panels (`vpdpwssd` fuses the multiply and the add, and
//! one 512-bit register holds a panel's 16 columns), so where the CPU has it the
//! VNNI tile is the faster one: half the instructions per product and twice the
//! lanes (`Q3VL_KERNEL_PATH=avx2` against the default, `q3vl bench --kernels-only`).
//! On aarch64 a NEON tile (`smlal` into int32, `addp` per block) runs one row at a
//! time; it is tested bit for bit under qemu (`make test-aarch64`), not timed.

use crate::gemm::CTile;
use crate::matvec::quantize_block16_on;
use crate::path::{assert_available, best_path, Path};
use crate::{OutPtr, BLOCK};
use half::f16;
use rayon::prelude::*;
use std::ops::Range;

/// Rows of the register tile.
pub const MR: usize = 6;
/// Columns of the register tile.
pub const NR: usize = crate::gemm::NR;
/// Reduction slice per weight packing pass (a multiple of [`BLOCK`]).
pub const KC: usize = 256;
/// Rows of activations per L2 block.
const MC: usize = 16 * MR;
/// int16 pairs per block.
const PAIRS: usize = BLOCK / 2;

/// Two int16 values of consecutive reduction indices as one 32-bit lane, the low
/// half first: the operand layout of `vpmaddwd`.
fn pair(lo: i16, hi: i16) -> i32 {
    ((lo as u16 as u32) | ((hi as u16 as u32) << 16)) as i32
}

/// The two int16 values of a [`pair`], widened.
fn unpair(v: i32) -> (i32, i32) {
    (v as i16 as i32, v >> 16)
}

/// The activations of one product, quantized per block to int16 and packed in the
/// order the register tile reads them: per [`MR`]-row panel and block, the 16 pairs
/// `(q[i, 2p], q[i, 2p+1])` as one `i32` each, stored `[p][MR]`, and the block's
/// scales `[MR]` (rows past `m` are zero, and so are their results).
struct PackedActs {
    pairs: Vec<i32>,
    scales: Vec<f32>,
    m: usize,
    nb: usize,
}

impl PackedActs {
    /// Quantizes (on `path`) and packs `x` (`m × k`, row-major, `k` a multiple of
    /// 32), in parallel over row panels.
    fn new(path: Path, x: &[f32], m: usize, k: usize) -> PackedActs {
        let nb = k / BLOCK;
        let panels = m.div_ceil(MR);
        let mut pairs = vec![0i32; panels * nb * PAIRS * MR];
        let mut scales = vec![0f32; panels * nb * MR];
        pairs
            .par_chunks_mut(nb * PAIRS * MR)
            .zip(scales.par_chunks_mut(nb * MR))
            .enumerate()
            .for_each(|(pi, (pp, sp))| {
                let mut q = [0i16; BLOCK];
                for i in 0..MR.min(m - pi * MR) {
                    let row = &x[(pi * MR + i) * k..][..k];
                    for b in 0..nb {
                        let xb = &row[b * BLOCK..][..BLOCK];
                        sp[b * MR + i] = quantize_block16_on(path, xb, &mut q);
                        for p in 0..PAIRS {
                            pp[(b * PAIRS + p) * MR + i] = pair(q[2 * p], q[2 * p + 1]);
                        }
                    }
                }
            });
        PackedActs {
            pairs,
            scales,
            m,
            nb,
        }
    }

    /// Panel `ir / MR`'s pairs and scales from block `b0` on.
    fn panel(&self, ir: usize, b0: usize) -> (*const i32, *const f32) {
        let pi = ir / MR;
        (
            self.pairs[((pi * self.nb + b0) * PAIRS) * MR..].as_ptr(),
            self.scales[(pi * self.nb + b0) * MR..].as_ptr(),
        )
    }
}

/// The operands of one register tile: the activation panel's pairs `a` (`[b][p][MR]`)
/// and scales `ad` (`[b][MR]`), the weight panel's pairs `b` (`[b][p][NR]`) and f32
/// scales `bd` (`[b][NR]`).
#[derive(Clone, Copy)]
struct Panels {
    a: *const i32,
    ad: *const f32,
    b: *const i32,
    bd: *const f32,
}

/// One register tile over `nbk` blocks of `p`: for `i < MR` (or the tile's own row
/// count, see [`micro`]), `j < NR`, the module's chain continued from `c[i·ldc + j]`
/// (from 0 when `first`), stored back to `c`.
///
/// # Safety
/// `p`'s pointers address `nbk` blocks of their layouts, `c` an `MR × NR` tile of row
/// stride `ldc`, and the function's target features are present.
type MicroFn = unsafe fn(nbk: usize, p: Panels, c: *mut f32, ldc: usize, first: bool);

/// The portable register tile: the module's arithmetic, written out.
unsafe fn micro_portable(nbk: usize, p: Panels, c: *mut f32, ldc: usize, first: bool) {
    let Panels { a, ad, b, bd } = p;
    let mut acc = [[0f32; NR]; MR];
    if !first {
        for (i, row) in acc.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                // SAFETY: see `MicroFn`.
                *v = unsafe { *c.add(i * ldc + j) };
            }
        }
    }
    for blk in 0..nbk {
        for (i, row) in acc.iter_mut().enumerate() {
            // Integer sums are exact, so the loop order is free: columns innermost,
            // where a compiler can vectorize.
            let mut s = [0i32; NR];
            for p in 0..PAIRS {
                // SAFETY: see `MicroFn`.
                let x = unsafe { *a.add((blk * PAIRS + p) * MR + i) };
                // SAFETY: see `MicroFn`.
                let w = unsafe { std::slice::from_raw_parts(b.add((blk * PAIRS + p) * NR), NR) };
                let (x0, x1) = unpair(x);
                for (sj, &wj) in s.iter_mut().zip(w) {
                    let (w0, w1) = unpair(wj);
                    *sj += x0 * w0 + x1 * w1;
                }
            }
            // SAFETY: see `MicroFn`.
            let d = unsafe { *ad.add(blk * MR + i) };
            for (j, (v, sj)) in row.iter_mut().zip(s).enumerate() {
                // SAFETY: see `MicroFn`.
                let sc = unsafe { *bd.add(blk * NR + j) } * d;
                *v = (sj as f32).mul_add(sc, *v);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            // SAFETY: see `MicroFn`.
            unsafe { *c.add(i * ldc + j) = *v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

/// The assembly `vpdpwssd`, shared with the decode kernel.
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::dpwssd;

#[cfg(target_arch = "aarch64")]
mod neon;

/// The instance of tile `f` for `rows` (1..=MR; more means MR) rows, its other const
/// parameters after the row count.
macro_rules! tile_for_rows {
    ($rows:expr, $($f:ident)::+ $(, $more:expr)*) => {
        match $rows {
            1 => $($f)::+::<1 $(, $more)*> as MicroFn,
            2 => $($f)::+::<2 $(, $more)*>,
            3 => $($f)::+::<3 $(, $more)*>,
            4 => $($f)::+::<4 $(, $more)*>,
            5 => $($f)::+::<5 $(, $more)*>,
            _ => $($f)::+::<MR $(, $more)*>,
        }
    };
}

/// The register tile of `path` for the first `rows` (1..=MR) rows of one panel. The
/// portable tile always computes all [`MR`].
fn micro(path: Path, rows: usize) -> MicroFn {
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => tile_for_rows!(rows, x86::micro_vnni, 1),
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => tile_for_rows!(rows, x86::micro_avx2),
        #[cfg(target_arch = "aarch64")]
        Path::Neon => tile_for_rows!(rows, neon::micro_neon),
        _ => micro_portable,
    }
}

/// The tile of `path` over two adjacent full panels (`rows` × 2[`NR`]), where the
/// path has one: AVX-512 holds a panel's 16 columns in one register, so one panel
/// alone leaves too few independent accumulators.
fn micro_pair(path: Path, rows: usize) -> Option<MicroFn> {
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => Some(tile_for_rows!(rows, x86::micro_vnni, 2)),
        _ => {
            let _ = rows;
            None
        }
    }
}

/// An int8 per-block-32 weight `W` of `n` rows of `k` values: `q` (`[n, k]`) and its
/// f16 block scales `s` (`[n, k/32]`).
#[derive(Clone, Copy)]
pub(crate) struct Int8Weight<'a> {
    /// The values, row-major.
    pub(crate) q: &'a [i8],
    /// The block scales, row-major.
    pub(crate) s: &'a [f16],
    /// Rows (output columns of the product).
    pub(crate) n: usize,
    /// Row length (the reduction), a multiple of 32.
    pub(crate) k: usize,
}

/// Packs weight rows `cols`, blocks `blocks`, into `NR`-row panels (`pairs`:
/// `[panel][b][p][NR]`, `scales`: `[panel][b][NR]`), zero-padding the last panel.
fn pack_weights(
    path: Path,
    w: Int8Weight<'_>,
    cols: Range<usize>,
    blocks: Range<usize>,
    pairs: &mut [i32],
    scales: &mut [f32],
) {
    let nbk = blocks.len();
    for p in 0..cols.len().div_ceil(NR) {
        let jp = cols.start + p * NR;
        let dst = &mut pairs[p * nbk * PAIRS * NR..][..nbk * PAIRS * NR];
        let sd = &mut scales[p * nbk * NR..][..nbk * NR];
        match path {
            // Only x86 has a SIMD packing (AVX2, F16C), for full panels.
            #[cfg(target_arch = "x86_64")]
            // SAFETY: rows jp..jp+NR of q hold k values and of s nb scales each (q is
            // n × k, s is n × nb, n ≥ cols.end); the blocks lie inside the rows; dst
            // holds nbk·PAIRS·NR, sd nbk·NR; the path's features are present.
            Path::Avx2 | Path::Avx512Vnni if jp + NR <= cols.end => unsafe {
                let (k, b0, nb) = (w.k, blocks.start, w.k / BLOCK);
                let src = w.q.as_ptr().add(jp * k + b0 * BLOCK);
                x86::pack_panel(src, k, nbk, dst.as_mut_ptr());
                x86::pack_scales(w.s.as_ptr().add(jp * nb + b0), nb, nbk, sd.as_mut_ptr());
            },
            _ => pack_panel_portable(w, jp..cols.end, blocks.clone(), dst, sd),
        }
    }
}

/// [`pack_weights`] of the one panel starting at row `rows.start` (rows from
/// `rows.end` on are padding), in plain Rust.
fn pack_panel_portable(
    w: Int8Weight<'_>,
    rows: Range<usize>,
    blocks: Range<usize>,
    dst: &mut [i32],
    sd: &mut [f32],
) {
    let (Int8Weight { q, s, k, .. }, nb) = (w, w.k / BLOCK);
    let (jp, j1, b0, nbk) = (rows.start, rows.end, blocks.start, blocks.len());
    for jj in 0..NR {
        let j = jp + jj;
        for blk in 0..nbk {
            sd[blk * NR + jj] = if j < j1 {
                s[j * nb + b0 + blk].to_f32()
            } else {
                0.0
            };
        }
    }
    for jj in 0..NR {
        let j = jp + jj;
        for blk in 0..nbk {
            for pp in 0..PAIRS {
                dst[(blk * PAIRS + pp) * NR + jj] = if j < j1 {
                    let c = j * k + (b0 + blk) * BLOCK + 2 * pp;
                    pair(q[c] as i16, q[c + 1] as i16)
                } else {
                    0
                };
            }
        }
    }
}

thread_local! {
    /// A task's weight tile buffers, reused by the thread's next task.
    static TILE: std::cell::Cell<(Vec<i32>, Vec<f32>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Output columns `cols` of every row, on the calling thread: per [`KC`] slice of the
/// reduction, the slice's weights packed, then every register tile over them.
///
/// # Safety
/// `c` addresses `a.m` rows of `ldc ≥ cols.end` floats, and no other thread touches
/// columns `cols` meanwhile.
unsafe fn gemm_cols(
    path: Path,
    a: &PackedActs,
    w: Int8Weight<'_>,
    cols: Range<usize>,
    c: *mut f32,
    ldc: usize,
) {
    let nb = a.nb;
    let panels = cols.len().div_ceil(NR);
    let kcb = KC / BLOCK;
    let (mut bq, mut bs) = TILE.take();
    bq.resize(panels * kcb * PAIRS * NR, 0);
    bs.resize(panels * kcb * NR, 0.0);
    let mut tile = [0f32; MR * NR];
    let mut b0 = 0;
    while b0 < nb {
        let nbk = kcb.min(nb - b0);
        pack_weights(path, w, cols.clone(), b0..b0 + nbk, &mut bq, &mut bs);
        let slice = WeightSlice {
            pairs: &bq,
            scales: &bs,
            blocks: b0..b0 + nbk,
            cols: cols.clone(),
        };
        // SAFETY: as this function's.
        unsafe { slice_tiles(path, a, slice, c, ldc, &mut tile) };
        b0 += nbk;
    }
    TILE.set((bq, bs));
}

/// One [`KC`] slice of a task's weights, packed by [`pack_weights`]: blocks `blocks`
/// of the output columns `cols`.
struct WeightSlice<'a> {
    pairs: &'a [i32],
    scales: &'a [f32],
    blocks: Range<usize>,
    cols: Range<usize>,
}

/// Every register tile of one weight slice: all rows, the slice's columns.
///
/// # Safety
/// As [`gemm_cols`]'; `buf` is the task's scratch tile.
unsafe fn slice_tiles(
    path: Path,
    a: &PackedActs,
    w: WeightSlice<'_>,
    c: *mut f32,
    ldc: usize,
    buf: &mut [f32; MR * NR],
) {
    let m = a.m;
    let (j0, j1, b0, nbk) = (w.cols.start, w.cols.end, w.blocks.start, w.blocks.len());
    let first = b0 == 0;
    let (kern, has_pair) = (micro(path, MR), micro_pair(path, MR).is_some());
    let panels = (j1 - j0).div_ceil(NR);
    let mut ic = 0;
    while ic < m {
        let mc = MC.min(m - ic);
        let mut p = 0;
        while p < panels {
            let jc = j0 + p * NR;
            let cols = NR.min(j1 - jc);
            let (b, bd) = (
                w.pairs[p * nbk * PAIRS * NR..].as_ptr(),
                w.scales[p * nbk * NR..].as_ptr(),
            );
            // Two full panels at once where the path has a tile for them.
            let pair = has_pair && jc + 2 * NR <= j1;
            let mut ir = ic;
            while ir < ic + mc {
                let (pa, pad) = a.panel(ir, b0);
                let ops = Panels {
                    a: pa,
                    ad: pad,
                    b,
                    bd,
                };
                let t = CTile {
                    // SAFETY: row ir, column jc is inside C.
                    c: unsafe { c.add(ir * ldc + jc) },
                    ldc,
                    rows: MR.min(m - ir),
                    cols,
                    first,
                };
                // SAFETY: the panels hold nbk blocks (two panels for a pair tile,
                // which is called only when both are full); the tile is inside C.
                unsafe { run_tile(path, kern, nbk, ops, t, pair, buf) };
                ir += MR;
            }
            p += if pair { 2 } else { 1 };
        }
        ic += mc;
    }
}

/// One register tile into `t`: the pair tile where `pair` allows, `kern` (the
/// path's full tile) on a full tile, else a tile of `t.rows` rows into `buf`, loaded
/// with C's partial sums when continuing, then copied to C.
///
/// # Safety
/// `ops` hold `nbk` blocks (of two panels when `pair`); `t` lies inside C.
unsafe fn run_tile(
    path: Path,
    kern: MicroFn,
    nbk: usize,
    ops: Panels,
    t: CTile,
    pair: bool,
    buf: &mut [f32; MR * NR],
) {
    let CTile {
        c: out,
        ldc,
        rows,
        cols,
        first,
    } = t;
    // SAFETY: as this function's; a tile of fewer rows writes only its rows.
    unsafe {
        if let Some(kp) = micro_pair(path, rows).filter(|_| pair) {
            kp(nbk, ops, out, ldc, first);
        } else if rows == MR && cols == NR {
            kern(nbk, ops, out, ldc, first);
        } else {
            for i in 0..rows {
                for j in 0..cols {
                    buf[i * NR + j] = if first { 0.0 } else { *out.add(i * ldc + j) };
                }
            }
            // The last rows of a product take a shorter tile.
            micro(path, rows)(nbk, ops, buf.as_mut_ptr(), NR, first);
            for i in 0..rows {
                for j in 0..cols {
                    *out.add(i * ldc + j) = buf[i * NR + j];
                }
            }
        }
    }
}

/// `out[i, j]` for an int8 per-block-32 weight `W` (`q`: `[n, k]`, `s`: `[n, k/32]`
/// f16 scales) and f32 activations `x` (`m × k`): the module's arithmetic. Parallel
/// over tasks of output columns on the current rayon pool; the results do not
/// depend on the split.
pub fn linear_w8a16(x: &[f32], m: usize, k: usize, q: &[i8], s: &[f16], n: usize, out: &mut [f32]) {
    linear_w8a16_on(best_path(), x, m, Int8Weight { q, s, n, k }, out)
}

/// [`linear_w8a16`] on a given path (tests compare the paths; every path gives the
/// same bits).
pub(crate) fn linear_w8a16_on(path: Path, x: &[f32], m: usize, w: Int8Weight<'_>, out: &mut [f32]) {
    assert_available(path);
    let Int8Weight { q, s, n, k } = w;
    assert!(k.is_multiple_of(BLOCK));
    assert_eq!(x.len(), m * k);
    assert_eq!(q.len(), n * k);
    assert_eq!(s.len(), n * k / BLOCK);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let a = PackedActs::new(path, x, m, k);
    // NR is the f32 GEMM's too, so its task split fits this tile.
    let width = crate::gemm::task_width(n);
    let optr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(width)).into_par_iter().for_each(|t| {
        let j0 = t * width;
        // SAFETY: `out` is m × n; this task alone writes columns j0..j0+width.
        unsafe { gemm_cols(path, &a, w, j0..(j0 + width).min(n), optr.get(), n) };
    });
}

#[cfg(test)]
mod tests;
