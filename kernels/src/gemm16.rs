//! The prefill product of int8 weights ("W8A16 GEMM"): int8 per-block-32 weights
//! with f16 scales, times activation rows quantized per block of 32 to int16 (as
//! the decode kernel quantizes its one row, [`crate::matvec::Acts16`]), all prompt
//! rows at once.
//!
//! Why: prefill is compute-bound. Without AVX-512 VNNI the f32 FMA tile retires 8
//! multiply-adds per instruction, at most two per cycle; `vpmaddwd` retires 16
//! exact int16 products per instruction. On this project's 2-core Zen 3 host one
//! core ran 38.6 G f32 multiply-adds per second through independent FMAs and 55
//! G through `vpmaddwd` + `vpaddd` (a throughput loop, BENCHMARKS.md), so the
//! integer tile has about 1.4x the f32 tile's ceiling, and its weight panels are
//! half as large (int16, not f32). int8 activations would allow `vpmaddubsw` and
//! twice that again, but they moved greedy tokens off the reference
//! ([`crate::q8`]); int16 rounding moves an activation by at most 2⁻¹⁶ of its block's
//! largest value.
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
//! one 512-bit register holds a panel's 16 columns). On a 2-core Xeon host the
//! 4096 × 4096 × 211 product ran at 257–260 GFLOP/s on the AVX2 tile and 483–519 on
//! the VNNI tile (`Q3VL_KERNEL_PATH=avx2` against the default, `q3vl bench
//! --kernels-only`).
//! On aarch64 a NEON tile (`smlal` into int32, `addp` per block) runs one row at a
//! time; it is tested bit for bit under qemu (`make test-aarch64`), not timed.

use crate::matvec::{quantize_block16, BLOCK};
use crate::path::{best_path, Path};
use crate::OutPtr;
use half::f16;
use rayon::prelude::*;

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
    /// Quantizes and packs `x` (`m × k`, row-major, `k` a multiple of 32), in
    /// parallel over row panels.
    fn new(x: &[f32], m: usize, k: usize) -> PackedActs {
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
                        sp[b * MR + i] = quantize_block16(&row[b * BLOCK..][..BLOCK], &mut q);
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
mod x86 {
    use super::{Panels, MR, NR, PAIRS};
    use crate::gemm::{prefetch_tile, transpose8};
    use half::f16;
    use std::arch::x86_64::*;

    /// The `R` × 16 AVX2 register tile (`R ≤ MR`: the first `R` rows of the panel;
    /// fewer for a product's last rows): per pair, two weight loads, `R` activation
    /// broadcasts and `2R` `vpmaddwd` + `vpaddd` into int32 accumulators, two pairs
    /// per loop iteration; per block, each accumulator converted and fused into its
    /// f32 accumulator (kept on the stack: 12 int32 and 12 f32 vectors do not fit in
    /// 16 registers).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn micro_avx2<const R: usize>(
        nbk: usize,
        p: Panels,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        let Panels { a, ad, b, bd } = p;
        let mut f = [[_mm256_setzero_ps(); 2]; R];
        if !first {
            for (i, r) in f.iter_mut().enumerate() {
                let p = c.add(i * ldc);
                r[0] = _mm256_loadu_ps(p);
                r[1] = _mm256_loadu_ps(p.add(8));
            }
        } else {
            prefetch_tile(c, ldc, R, 4 * NR);
        }
        let (mut ap, mut bp) = (a, b);
        for blk in 0..nbk {
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for _ in 0..PAIRS / 2 {
                for u in 0..2 {
                    let b0 = _mm256_loadu_si256(bp.add(u * NR) as *const __m256i);
                    let b1 = _mm256_loadu_si256(bp.add(u * NR + 8) as *const __m256i);
                    for (i, r) in acc.iter_mut().enumerate() {
                        let av = _mm256_set1_epi32(*ap.add(u * MR + i));
                        r[0] = _mm256_add_epi32(r[0], _mm256_madd_epi16(av, b0));
                        r[1] = _mm256_add_epi32(r[1], _mm256_madd_epi16(av, b1));
                    }
                }
                ap = ap.add(2 * MR);
                bp = bp.add(2 * NR);
            }
            let s0 = _mm256_loadu_ps(bd.add(blk * NR));
            let s1 = _mm256_loadu_ps(bd.add(blk * NR + 8));
            for (i, (r, fr)) in acc.iter().zip(f.iter_mut()).enumerate() {
                let d = _mm256_broadcast_ss(&*ad.add(blk * MR + i));
                fr[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r[0]), _mm256_mul_ps(s0, d), fr[0]);
                fr[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r[1]), _mm256_mul_ps(s1, d), fr[1]);
            }
        }
        for (i, r) in f.iter().enumerate() {
            let p = c.add(i * ldc);
            _mm256_storeu_ps(p, r[0]);
            _mm256_storeu_ps(p.add(8), r[1]);
        }
    }

    /// The `R` × `16·P` AVX-512 VNNI register tile over `P` adjacent weight panels
    /// (panel `u`'s pairs and scales lie `u · nbk` blocks after the first's, as
    /// [`super::pack_weights`] stores them): per pair, `P` weight loads and `R · P`
    /// `vpdpwssd` with the activation pair broadcast from memory; per block, each
    /// int32 accumulator converted and fused into its f32 accumulator. With `R = 6`,
    /// `P = 2` the 12 + 12 accumulators stay in registers (the AVX2 tile spills its
    /// f32 ones), and 12 independent `vpdpwssd` chains cover the instruction's latency.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    pub unsafe fn micro_vnni<const R: usize, const P: usize>(
        nbk: usize,
        p: Panels,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        let Panels { a, ad, b, bd } = p;
        let (bstride, sstride) = (nbk * PAIRS * NR, nbk * NR);
        let mut f = [[_mm512_setzero_ps(); P]; R];
        for (i, r) in f.iter_mut().enumerate() {
            let p = c.add(i * ldc);
            for (u, v) in r.iter_mut().enumerate() {
                if first {
                    // The C tile is usually out of cache; ask for it while the tile computes.
                    _mm_prefetch::<_MM_HINT_T0>(p.add(u * NR) as *const i8);
                } else {
                    *v = _mm512_loadu_ps(p.add(u * NR));
                }
            }
        }
        let (mut ap, mut bp) = (a, b);
        for blk in 0..nbk {
            let mut acc = [[_mm512_setzero_si512(); P]; R];
            for _ in 0..PAIRS {
                let bv: [__m512i; P] =
                    std::array::from_fn(|u| _mm512_loadu_si512(bp.add(u * bstride) as *const _));
                for (i, r) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(*ap.add(i));
                    for (u, v) in r.iter_mut().enumerate() {
                        *v = _mm512_dpwssd_epi32(*v, av, bv[u]);
                    }
                }
                ap = ap.add(MR);
                bp = bp.add(NR);
            }
            let s: [__m512; P] =
                std::array::from_fn(|u| _mm512_loadu_ps(bd.add(u * sstride + blk * NR)));
            for (i, (r, fr)) in acc.iter().zip(f.iter_mut()).enumerate() {
                let d = _mm512_set1_ps(*ad.add(blk * MR + i));
                for u in 0..P {
                    let sc = _mm512_mul_ps(s[u], d);
                    fr[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(r[u]), sc, fr[u]);
                }
            }
        }
        for (i, r) in f.iter().enumerate() {
            for (u, v) in r.iter().enumerate() {
                _mm512_storeu_ps(c.add(i * ldc + u * NR), *v);
            }
        }
    }

    /// Widens one full `NR`-row panel's block scales (`s` at the panel's first row
    /// and block, row stride `nb`) into `dst[b·NR + jj]`. A full slice (8 blocks) is
    /// two 8 × 8 transposes: one 16-byte load per row, where a scalar loop took a
    /// dependent load and a feature check per scale (4% of an 8B prefill).
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn pack_scales(s: *const f16, nb: usize, nbk: usize, dst: *mut f32) {
        if nbk == 8 {
            for half in 0..NR / 8 {
                let rows: [__m256; 8] = std::array::from_fn(|r| {
                    let src = s.add((half * 8 + r) * nb) as *const __m128i;
                    _mm256_cvtph_ps(_mm_loadu_si128(src))
                });
                for (blk, v) in transpose8(rows).iter().enumerate() {
                    _mm256_storeu_ps(dst.add(blk * NR + half * 8), *v);
                }
            }
        } else {
            for jj in 0..NR {
                for blk in 0..nbk {
                    let h = _mm_cvtsi32_si128((*s.add(jj * nb + blk)).to_bits() as i32);
                    *dst.add(blk * NR + jj) = _mm_cvtss_f32(_mm_cvtph_ps(h));
                }
            }
        }
    }

    /// Packs one full `NR`-row weight panel's `nbk` blocks (`q` at the panel's first
    /// row and block, row stride `k` bytes) into `dst[(b·PAIRS + p)·NR + jj]`: row
    /// `jj`'s pair `p` of block `b`, sign-extended to two int16. Eight rows' eight
    /// pairs are one 8 × 8 transpose of 32-bit lanes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn pack_panel(q: *const i8, k: usize, nbk: usize, dst: *mut i32) {
        for blk in 0..nbk {
            for half in 0..NR / 8 {
                for p0 in (0..PAIRS).step_by(8) {
                    let rows: [__m256; 8] = std::array::from_fn(|r| {
                        let src = q.add((half * 8 + r) * k + blk * 32 + 2 * p0);
                        let v = _mm_loadu_si128(src as *const __m128i);
                        _mm256_castsi256_ps(_mm256_cvtepi8_epi16(v))
                    });
                    let cols = transpose8(rows);
                    for (pp, v) in cols.iter().enumerate() {
                        let o = (blk * PAIRS + p0 + pp) * NR + half * 8;
                        _mm256_storeu_ps(dst.add(o) as *mut f32, *v);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{Panels, MR, NR, PAIRS};
    use std::arch::aarch64::*;

    /// The `R` × 16 NEON register tile, one row at a time: per pair, the row's
    /// activation pair broadcast and four weight vectors (four columns' pairs each)
    /// multiplied into eight int32 accumulators with `smlal`/`smlal2`, each lane one
    /// product half of a column; per block, `addp` joins each column's two halves
    /// (exact: 32 products of at most 128 · 32767), and the sums are converted and
    /// fused into the row's four f32 accumulators.
    #[target_feature(enable = "neon")]
    pub unsafe fn micro_neon<const R: usize>(
        nbk: usize,
        p: Panels,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        let Panels { a, ad, b, bd } = p;
        for i in 0..R {
            let crow = c.add(i * ldc);
            let mut f: [float32x4_t; 4] = if first {
                [vdupq_n_f32(0.0); 4]
            } else {
                std::array::from_fn(|q| vld1q_f32(crow.add(4 * q)))
            };
            for blk in 0..nbk {
                let mut acc = [vdupq_n_s32(0); 8];
                for pp in 0..PAIRS {
                    let o = blk * PAIRS + pp;
                    let av = vreinterpretq_s16_s32(vdupq_n_s32(*a.add(o * MR + i)));
                    let bp = b.add(o * NR) as *const i16;
                    for q in 0..NR / 4 {
                        let bv = vld1q_s16(bp.add(8 * q));
                        acc[2 * q] = vmlal_s16(acc[2 * q], vget_low_s16(bv), vget_low_s16(av));
                        acc[2 * q + 1] = vmlal_high_s16(acc[2 * q + 1], bv, av);
                    }
                }
                let d = vdupq_n_f32(*ad.add(blk * MR + i));
                for (q, fq) in f.iter_mut().enumerate() {
                    let s = vpaddq_s32(acc[2 * q], acc[2 * q + 1]);
                    let sc = vmulq_f32(vld1q_f32(bd.add(blk * NR + 4 * q)), d);
                    *fq = vfmaq_f32(*fq, vcvtq_f32_s32(s), sc);
                }
            }
            for (q, fq) in f.iter().enumerate() {
                vst1q_f32(crow.add(4 * q), *fq);
            }
        }
    }
}

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
    #[cfg(target_arch = "x86_64")]
    match path {
        Path::Avx512Vnni => return tile_for_rows!(rows, x86::micro_vnni, 1),
        Path::Avx2 => return tile_for_rows!(rows, x86::micro_avx2),
        _ => {}
    }
    #[cfg(target_arch = "aarch64")]
    if path == Path::Neon {
        return tile_for_rows!(rows, neon::micro_neon);
    }
    let _ = (path, rows);
    micro_portable
}

/// The tile of `path` over two adjacent full panels (`rows` × 2[`NR`]), where the
/// path has one: AVX-512 holds a panel's 16 columns in one register, so one panel
/// alone leaves too few independent accumulators.
fn micro_pair(path: Path, rows: usize) -> Option<MicroFn> {
    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx512Vnni {
        return Some(tile_for_rows!(rows, x86::micro_vnni, 2));
    }
    let _ = (path, rows);
    None
}

/// Packs weight rows `j0..j1`, blocks `b0..b0 + nbk`, into `NR`-row panels
/// (`pairs`: `[panel][b][p][NR]`, `scales`: `[panel][b][NR]`), zero-padding the
/// last panel.
#[allow(clippy::too_many_arguments)]
fn pack_weights(
    path: Path,
    q: &[i8],
    s: &[f16],
    k: usize,
    j0: usize,
    j1: usize,
    b0: usize,
    nbk: usize,
    pairs: &mut [i32],
    scales: &mut [f32],
) {
    let nb = k / BLOCK;
    // Only x86 has a SIMD packing.
    let _ = path;
    for p in 0..(j1 - j0).div_ceil(NR) {
        let jp = j0 + p * NR;
        let dst = &mut pairs[p * nbk * PAIRS * NR..][..nbk * PAIRS * NR];
        let sd = &mut scales[p * nbk * NR..][..nbk * NR];
        #[cfg(target_arch = "x86_64")]
        if jp + NR <= j1 && simd(path) {
            // SAFETY: rows jp..jp+NR of q hold k values and of s nb scales each (q is
            // n × k, s is n × nb, n ≥ j1); blocks b0..b0+nbk lie inside the rows; dst
            // holds nbk·PAIRS·NR, sd nbk·NR; the path's features are present.
            unsafe {
                x86::pack_panel(
                    q.as_ptr().add(jp * k + b0 * BLOCK),
                    k,
                    nbk,
                    dst.as_mut_ptr(),
                );
                x86::pack_scales(s.as_ptr().add(jp * nb + b0), nb, nbk, sd.as_mut_ptr());
            }
            continue;
        }
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
}

/// Whether `path` has the AVX2 packing (AVX2, F16C).
#[cfg(target_arch = "x86_64")]
fn simd(path: Path) -> bool {
    matches!(path, Path::Avx2 | Path::Avx512Vnni)
}

thread_local! {
    /// A task's weight tile buffers, reused by the thread's next task.
    static TILE: std::cell::Cell<(Vec<i32>, Vec<f32>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Output columns `j0..j1` of every row, on the calling thread.
///
/// # Safety
/// `c` addresses `a.m` rows of `ldc ≥ j1` floats, and no other thread touches
/// columns `j0..j1` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_cols(
    path: Path,
    a: &PackedActs,
    q: &[i8],
    s: &[f16],
    j0: usize,
    j1: usize,
    c: *mut f32,
    ldc: usize,
) {
    let (m, nb) = (a.m, a.nb);
    let k = nb * BLOCK;
    let (kern, has_pair) = (micro(path, MR), micro_pair(path, MR).is_some());
    let panels = (j1 - j0).div_ceil(NR);
    let kcb = KC / BLOCK;
    let (mut bq, mut bs) = TILE.take();
    bq.resize(panels * kcb * PAIRS * NR, 0);
    bs.resize(panels * kcb * NR, 0.0);
    let mut tile = [0f32; MR * NR];
    let mut b0 = 0;
    while b0 < nb {
        let nbk = kcb.min(nb - b0);
        let first = b0 == 0;
        pack_weights(path, q, s, k, j0, j1, b0, nbk, &mut bq, &mut bs);
        let mut ic = 0;
        while ic < m {
            let mc = MC.min(m - ic);
            let mut p = 0;
            while p < panels {
                let jc = j0 + p * NR;
                let cols = NR.min(j1 - jc);
                let (b, bd) = (
                    bq[p * nbk * PAIRS * NR..].as_ptr(),
                    bs[p * nbk * NR..].as_ptr(),
                );
                // Two full panels at once where the path has a tile for them.
                let pair = has_pair && jc + 2 * NR <= j1;
                let mut ir = ic;
                while ir < ic + mc {
                    let rows = MR.min(m - ir);
                    let (pa, pad) = a.panel(ir, b0);
                    let ops = Panels {
                        a: pa,
                        ad: pad,
                        b,
                        bd,
                    };
                    // SAFETY: the panels hold nbk blocks (two panels for a pair tile,
                    // which is called only when both are full); the tile is inside C
                    // (a tile of fewer rows writes only its rows), or is the local
                    // buffer, loaded with C's partial sums when continuing.
                    unsafe {
                        let out = c.add(ir * ldc + jc);
                        if let Some(kp) = micro_pair(path, rows).filter(|_| pair) {
                            kp(nbk, ops, out, ldc, first);
                        } else if rows == MR && cols == NR {
                            kern(nbk, ops, out, ldc, first);
                        } else {
                            for i in 0..rows {
                                for j in 0..cols {
                                    tile[i * NR + j] = if first {
                                        0.0
                                    } else {
                                        *c.add((ir + i) * ldc + jc + j)
                                    };
                                }
                            }
                            // The last rows of a product take a shorter tile.
                            micro(path, rows)(nbk, ops, tile.as_mut_ptr(), NR, first);
                            for i in 0..rows {
                                for j in 0..cols {
                                    *c.add((ir + i) * ldc + jc + j) = tile[i * NR + j];
                                }
                            }
                        }
                    }
                    ir += MR;
                }
                p += if pair { 2 } else { 1 };
            }
            ic += mc;
        }
        b0 += nbk;
    }
    TILE.set((bq, bs));
}

/// `out[i, j]` for an int8 per-block-32 weight `W` (`q`: `[n, k]`, `s`: `[n, k/32]`
/// f16 scales) and f32 activations `x` (`m × k`): the module's arithmetic. Parallel
/// over tasks of output columns on the current rayon pool; the results do not
/// depend on the split.
pub fn linear_w8a16(x: &[f32], m: usize, k: usize, q: &[i8], s: &[f16], n: usize, out: &mut [f32]) {
    linear_w8a16_on(best_path(), x, m, k, q, s, n, out)
}

/// [`linear_w8a16`] on a given path (tests compare the paths; every path gives the
/// same bits).
#[allow(clippy::too_many_arguments)]
pub fn linear_w8a16_on(
    path: Path,
    x: &[f32],
    m: usize,
    k: usize,
    q: &[i8],
    s: &[f16],
    n: usize,
    out: &mut [f32],
) {
    assert!(
        crate::path::available_paths().contains(&path),
        "{path:?} is not available on this CPU"
    );
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
    let a = PackedActs::new(x, m, k);
    // NR is the f32 GEMM's too, so its task split fits this tile.
    let width = crate::gemm::task_width(n);
    let optr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(width)).into_par_iter().for_each(|t| {
        let j0 = t * width;
        // SAFETY: `out` is m × n; this task alone writes columns j0..j0+width.
        unsafe { gemm_cols(path, &a, q, s, j0, (j0 + width).min(n), optr.get(), n) };
    });
}

/// One output of the module's arithmetic, straight from the definition (the
/// tests' reference).
#[cfg(test)]
fn naive(x: &[f32], q: &[i8], s: &[f16]) -> f32 {
    let mut acc = 0f32;
    let mut xq = [0i16; BLOCK];
    for b in 0..x.len() / BLOCK {
        let d = quantize_block16(&x[b * BLOCK..][..BLOCK], &mut xq);
        let sum: i32 = (0..BLOCK)
            .map(|t| q[b * BLOCK + t] as i32 * xq[t] as i32)
            .sum();
        acc = (sum as f32).mul_add(s[b].to_f32() * d, acc);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_same_bits, lcg, on_threads, random_weight};

    /// Activations with every block's magnitude different, extremes included, so
    /// the quantized values reach ±32767.
    fn acts(seed: &mut u64, m: usize, k: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| {
                let scale = [1e-3, 1.0, 37.0, 0.25][(i / BLOCK) % 4];
                ((lcg(seed) % 20001) as f32 - 10000.0) / 10000.0 * scale
            })
            .collect()
    }

    fn reference(x: &[f32], m: usize, k: usize, q: &[i8], s: &[f16], n: usize) -> Vec<f32> {
        let nb = k / BLOCK;
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = naive(&x[i * k..][..k], &q[j * k..][..k], &s[j * nb..][..nb]);
            }
        }
        out
    }

    #[test]
    fn every_path_matches_the_definition_bit_for_bit_on_odd_shapes() {
        let mut seed = 11;
        // m around the tile (6) and MC (96); n around NR (16), two panels (32) and a
        // task; k around KC (256: 8 blocks), including one block.
        for &(m, k, n) in &[
            (1, 32, 1),
            (2, 64, 16),
            (3, 32, 20),
            (4, 96, 18),
            (5, 64, 17),
            (6, 256, 16),
            (6, 288, 32),
            (7, 288, 33),
            (11, 64, 48),
            (13, 544, 70),
            (97, 96, 300),
        ] {
            let x = acts(&mut seed, m, k);
            let (q, s) = random_weight(&mut seed, n, k / BLOCK);
            let want = reference(&x, m, k, &q, &s, n);
            for path in crate::path::available_paths() {
                let mut out = vec![f32::NAN; m * n];
                linear_w8a16_on(path, &x, m, k, &q, &s, n, &mut out);
                assert_same_bits(&out, &want, &format!("{path:?} {m}x{k}x{n}"));
            }
        }
    }

    #[test]
    fn every_tile_equals_the_portable_tile() {
        // Each path's tiles (every row count; one panel, and two where the path has a
        // pair tile) on the same packed operands as the portable tile, in two calls
        // (the second continues the first's sums), as two KC slices do.
        let mut seed = 5;
        let (m, k, n) = (MR, 3 * KC / 2, 2 * NR);
        let x = acts(&mut seed, m, k);
        let (q, s) = random_weight(&mut seed, n, k / BLOCK);
        let a = PackedActs::new(&x, m, k);
        let nb = k / BLOCK;
        let half = nb / 2;
        let run = |path: Path, kern: MicroFn, width: usize| {
            // The weights packed in two slices (half, then the rest), each slice's
            // panels adjacent, as `gemm_cols` packs them.
            let mut out = vec![f32::NAN; m * width];
            for (b0, nbk) in [(0, half), (half, nb - half)] {
                let mut bq = vec![0i32; 2 * nbk * PAIRS * NR];
                let mut bs = vec![0f32; 2 * nbk * NR];
                pack_weights(path, &q, &s, k, 0, n, b0, nbk, &mut bq, &mut bs);
                let (ap, ad) = a.panel(0, b0);
                let ops = Panels {
                    a: ap,
                    ad,
                    b: bq.as_ptr(),
                    bd: bs.as_ptr(),
                };
                // SAFETY: the operands hold nbk blocks of two panels; out is MR × width.
                unsafe { kern(nbk, ops, out.as_mut_ptr(), width, b0 == 0) };
            }
            out
        };
        let port = run(Path::Portable, micro_portable, NR);
        let want = reference(&x, m, k, &q, &s, n);
        let cols = |v: &[f32], w: usize, rows: usize, c: usize| -> Vec<f32> {
            (0..rows).flat_map(|i| v[i * w..][..c].to_vec()).collect()
        };
        assert_same_bits(&port, &cols(&want, n, m, NR), "portable vs definition");
        for path in crate::path::available_paths() {
            for rows in 1..=MR {
                let one = run(path, micro(path, rows), NR);
                let what = format!("{path:?} tile of {rows} rows");
                assert_same_bits(&one[..rows * NR], &port[..rows * NR], &what);
                if let Some(kp) = micro_pair(path, rows) {
                    let two = run(path, kp, n);
                    let what = format!("{path:?} pair tile of {rows} rows");
                    assert_same_bits(&two[..rows * n], &want[..rows * n], &what);
                }
            }
        }
    }

    #[test]
    fn the_weight_packing_paths_agree() {
        let mut seed = 3;
        let (n, k) = (40, 352);
        let nb = k / BLOCK;
        let (q, s) = random_weight(&mut seed, n, nb);
        let panels = n.div_ceil(NR);
        // A full slice (the transposed scales) and a short last one, from block 2:
        // two full panels (the SIMD packing) and a partial one (the scalar packing).
        for nbk in [KC / BLOCK, 3] {
            let mut pairs = vec![0i32; panels * nbk * PAIRS * NR];
            let mut scales = vec![0f32; panels * nbk * NR];
            for path in crate::path::available_paths() {
                pack_weights(path, &q, &s, k, 0, n, 2, nbk, &mut pairs, &mut scales);
                for p in 0..panels {
                    for jj in 0..NR {
                        let j = p * NR + jj;
                        for blk in 0..nbk {
                            let want = if j < n {
                                s[j * nb + 2 + blk].to_f32()
                            } else {
                                0.0
                            };
                            let got = scales[(p * nbk + blk) * NR + jj];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{path:?} scale j={j} b={blk}"
                            );
                            for pp in 0..PAIRS {
                                let got = pairs[((p * nbk + blk) * PAIRS + pp) * NR + jj];
                                let (lo, hi) = if j < n {
                                    let c = j * k + (2 + blk) * BLOCK + 2 * pp;
                                    (q[c] as i32, q[c + 1] as i32)
                                } else {
                                    (0, 0)
                                };
                                assert_eq!(
                                    (got as i16 as i32, got >> 16),
                                    (lo, hi),
                                    "{path:?} nbk={nbk} j={j} b={blk} p={pp}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let mut seed = 9;
        let (m, k, n) = (20, 512, 700);
        let x = acts(&mut seed, m, k);
        let (q, s) = random_weight(&mut seed, n, k / BLOCK);
        let run = |threads| {
            on_threads(threads, || {
                let mut out = vec![0f32; m * n];
                linear_w8a16(&x, m, k, &q, &s, n, &mut out);
                out
            })
        };
        let one = run(1);
        assert_same_bits(&run(2), &one, "2 threads");
        assert_same_bits(&run(3), &one, "3 threads");
    }

    #[test]
    fn a_row_does_not_depend_on_the_other_rows() {
        let mut seed = 21;
        let (m, k, n) = (15, 256, 48);
        let x = acts(&mut seed, m, k);
        let (q, s) = random_weight(&mut seed, n, k / BLOCK);
        let mut all = vec![0f32; m * n];
        linear_w8a16(&x, m, k, &q, &s, n, &mut all);
        let mut last = vec![0f32; n];
        linear_w8a16(&x[(m - 1) * k..], 1, k, &q, &s, n, &mut last);
        assert_same_bits(&last, &all[(m - 1) * n..], "last row alone");
    }

    #[test]
    fn is_close_to_the_f32_product_and_propagates_nan() {
        let mut seed = 17;
        let (m, k, n) = (8, 256, 24);
        let mut x = acts(&mut seed, m, k);
        let (q, s) = random_weight(&mut seed, n, k / BLOCK);
        let mut f32out = vec![0f32; m * n];
        crate::gemm::linear_q8(&x, m, k, &q, &s, n, &mut f32out);
        let mut out = vec![0f32; m * n];
        linear_w8a16(&x, m, k, &q, &s, n, &mut out);
        for (i, (a, b)) in out.iter().zip(&f32out).enumerate() {
            // Per block the rounding moves each activation by at most amax/65534.
            let bound = 1e-4 * f32out.iter().map(|v| v.abs()).fold(0.0, f32::max);
            assert!((a - b).abs() <= bound, "i={i}: {a} vs {b}");
        }
        x[3 * k + 40] = f32::NAN;
        linear_w8a16(&x, m, k, &q, &s, n, &mut out);
        assert!(out[3 * n..4 * n].iter().all(|v| v.is_nan()));
        assert!(out[..3 * n]
            .iter()
            .chain(&out[4 * n..])
            .all(|v| v.is_finite()));
    }

    #[test]
    fn empty_shapes() {
        let mut out = vec![1f32; 6];
        linear_w8a16(&[], 2, 0, &[], &[], 3, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
        linear_w8a16(&[], 0, 32, &[0; 96], &[f16::ONE; 3], 3, &mut []);
    }
}
