//! The int8 × int8 product ("W8A8", llama.cpp's Q8_0 way) of int8 per-block-32
//! weights (f16 scales) and activations quantized per block of 32 by [`QActs`]: the
//! blocked kernel [`matmul`] with register tiles of [`TILE_R`] weight rows ×
//! [`TILE_C`] tokens.
//!
//! Kept, tested and benchmarked (`q3vl bench --kernels-only`) but not used by the
//! engine: on AVX2 without VNNI its `maddubs`/`madd`/`fma` sequence runs no faster
//! than the f32 FMA GEMM, and the 8-bit activation rounding moved greedy tokens away
//! from the reference on an untrained fixture. The engine's decoder runs prefill on
//! the packed int8 × int16 GEMM ([`crate::gemm16`]) and decode on [`crate::matvec`],
//! both on int16 block-quantized activations.
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

use super::OutPtr;
pub use crate::path::{available_paths, best_path, Path};
use half::f16;
use rayon::prelude::*;

/// Elements per quantization block (`docs/quantization.md`).
pub const BLOCK: usize = 32;

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
        assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols.max(1)));
        let mut q = vec![0i8; x.len()];
        let mut d = vec![0f32; x.len() / BLOCK];
        // Chunks of whole blocks, large enough to be worth a task.
        const PER_TASK: usize = 64 * 1024;
        let chunk = PER_TASK.max(BLOCK);
        x.par_chunks(chunk)
            .zip(q.par_chunks_mut(chunk))
            .zip(d.par_chunks_mut(chunk / BLOCK))
            .for_each(|((xc, qc), dc)| quantize_blocks(xc, qc, dc));
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

/// Quantizes whole blocks, on AVX2 where the CPU has it (the same operations, so
/// the same bytes as [`quantize_block`]).
fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if best_path() != Path::Portable {
        // SAFETY: every x86 path beyond portable includes AVX2; lengths agree.
        unsafe { x86::quantize_blocks_avx2(x, q, d) };
        return;
    }
    for ((xb, qb), db) in x
        .chunks_exact(BLOCK)
        .zip(q.chunks_exact_mut(BLOCK))
        .zip(d.iter_mut())
    {
        *db = quantize_block(xb, qb);
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

/// A register tile: `out[r·C + c] = dot(w row r, x row c)` for `R × C` pairs, where
/// weight row `r` starts at `w + r·ldw` with its f16 block scales at `ws + r·nb`,
/// and activation row `c` at `x + c·ldx` with f32 scales at `xd + c·nb`. The tile
/// first forms the scale products `f32(ws[b])·xd[b]` of every pair into `sc`
/// (`R·C·nb` floats).
///
/// # Safety
/// Every row holds `nb · 32` readable bytes and its `nb` scales, `sc` has room for
/// `R·C·nb` floats, `out` for `R·C`, and the function's target features are present.
pub type TileFn = unsafe fn(
    w: *const i8,
    ws: *const f16,
    ldw: usize,
    x: *const i8,
    xd: *const f32,
    ldx: usize,
    nb: usize,
    sc: *mut f32,
    out: *mut f32,
);

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

/// The tile functions of one path, indexed `[R - 1][C - 1]`.
type TileTable = [[TileFn; TILE_C]; TILE_R];

/// The portable tile.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_portable<const R: usize, const C: usize>(
    w: *const i8,
    ws: *const f16,
    ldw: usize,
    x: *const i8,
    xd: *const f32,
    ldx: usize,
    nb: usize,
    sc: *mut f32,
    out: *mut f32,
) {
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

/// Builds a `[R][C]` table of one generic tile function.
macro_rules! tile_table {
    ($f:ident) => {
        [
            [$f::<1, 1>, $f::<1, 2>, $f::<1, 3>, $f::<1, 4>],
            [$f::<2, 1>, $f::<2, 2>, $f::<2, 3>, $f::<2, 4>],
        ]
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BLOCK;
    use half::f16;
    use std::arch::x86_64::*;

    /// Software prefetch distance along a weight row, in bytes (a prefetch never
    /// faults, so running past the row's end is harmless).
    const PREFETCH: usize = 1024;

    /// The fixed lane reduction of the module docs on one `__m256`.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // (a0+a4, a1+a5, a2+a6, a3+a7)
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        // (s0+s2, s1+s3)
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        // (s0+s2) + (s1+s3)
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// [`super::scale_products`] with F16C: eight blocks' scales widened at a time
    /// (exact), then the same f32 products.
    #[inline(always)]
    unsafe fn scale_products_f16c<const R: usize, const C: usize>(
        ws: *const f16,
        xd: *const f32,
        nb: usize,
        sc: *mut f32,
    ) {
        let full = nb / 8 * 8;
        for r in 0..R {
            let wr = ws.add(r * nb);
            for c in 0..C {
                let (xr, dst) = (xd.add(c * nb), sc.add((r * C + c) * nb));
                let mut b = 0;
                while b < full {
                    let wv = _mm256_cvtph_ps(_mm_loadu_si128(wr.add(b) as *const __m128i));
                    _mm256_storeu_ps(dst.add(b), _mm256_mul_ps(wv, _mm256_loadu_ps(xr.add(b))));
                    b += 8;
                }
                while b < nb {
                    *dst.add(b) = (*wr.add(b)).to_f32() * *xr.add(b);
                    b += 1;
                }
            }
        }
    }

    /// [`super::quantize_block`] on every block of `x`: the amax is a max (exact,
    /// order-free), then the same division, round-half-even and clamp per value.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_blocks_avx2(x: &[f32], q: &mut [i8], d: &mut [f32]) {
        assert!(x.len() == q.len() && x.len() == d.len() * BLOCK);
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        for (b, db) in d.iter_mut().enumerate() {
            let p = x.as_ptr().add(b * BLOCK);
            let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
            let a = v.map(|vv| _mm256_and_ps(vv, abs_mask));
            let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_movehdup_ps(m));
            let amax = _mm_cvtss_f32(m);
            let dd = amax / 127.0;
            let qp = q.as_mut_ptr().add(b * BLOCK);
            if dd == 0.0 || !dd.is_finite() {
                _mm256_storeu_si256(qp as *mut __m256i, _mm256_setzero_si256());
                *db = if dd.is_finite() { 0.0 } else { dd };
                continue;
            }
            let vd = _mm256_set1_ps(dd);
            let i = v.map(|vv| {
                let r = _mm256_round_ps(
                    _mm256_div_ps(vv, vd),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                );
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
            });
            let w = _mm256_packs_epi16(
                _mm256_packs_epi32(i[0], i[1]),
                _mm256_packs_epi32(i[2], i[3]),
            );
            _mm256_storeu_si256(qp as *mut __m256i, _mm256_permutevar8x32_epi32(w, order));
            *db = dd;
        }
    }

    /// AVX2 tile: per block, |w| (u8) × x·sign(w) (i8) with `maddubs`, pairs summed
    /// to the eight i32 lanes with `madd`, converted and fused-multiply-added with the
    /// block's scale product. |w| = 128 is fine as u8 and x is never −128 after
    /// quantization, so x·sign(w) cannot overflow; i16 pair sums stay ≤ 2·128·127.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_avx2<const R: usize, const C: usize>(
        w: *const i8,
        ws: *const f16,
        ldw: usize,
        x: *const i8,
        xd: *const f32,
        ldx: usize,
        nb: usize,
        sc: *mut f32,
        out: *mut f32,
    ) {
        scale_products_f16c::<R, C>(ws, xd, nb, sc);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..nb {
            let o = b * BLOCK;
            let mut xv = [_mm256_setzero_si256(); C];
            for (c, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_si256(x.add(c * ldx + o) as *const __m256i);
            }
            for (r, accr) in acc.iter_mut().enumerate() {
                if b % 2 == 0 {
                    // Decode streams the weights from memory: ask for them early.
                    _mm_prefetch(w.add(r * ldw + o + PREFETCH), _MM_HINT_T0);
                }
                let wv = _mm256_loadu_si256(w.add(r * ldw + o) as *const __m256i);
                let aw = _mm256_sign_epi8(wv, wv);
                for (c, a) in accr.iter_mut().enumerate() {
                    let sx = _mm256_sign_epi8(xv[c], wv);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                    let s = _mm256_broadcast_ss(&*sc.add((r * C + c) * nb + b));
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, *a);
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            for (c, a) in accr.iter().enumerate() {
                *out.add(r * C + c) = hsum(*a);
            }
        }
    }

    /// AVX-512 VNNI tile (256-bit `vpdpbusd`, needs AVX512VL): the same |w| /
    /// x·sign(w) split, each lane's four products summed by `dpbusd` straight into
    /// i32. This machine has no AVX-512, so this path is compiled and gated by
    /// runtime detection but not exercised here.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_vnni<const R: usize, const C: usize>(
        w: *const i8,
        ws: *const f16,
        ldw: usize,
        x: *const i8,
        xd: *const f32,
        ldx: usize,
        nb: usize,
        sc: *mut f32,
        out: *mut f32,
    ) {
        scale_products_f16c::<R, C>(ws, xd, nb, sc);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..nb {
            let o = b * BLOCK;
            let mut xv = [_mm256_setzero_si256(); C];
            for (c, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_si256(x.add(c * ldx + o) as *const __m256i);
            }
            for (r, accr) in acc.iter_mut().enumerate() {
                if b % 2 == 0 {
                    _mm_prefetch(w.add(r * ldw + o + PREFETCH), _MM_HINT_T0);
                }
                let wv = _mm256_loadu_si256(w.add(r * ldw + o) as *const __m256i);
                let aw = _mm256_abs_epi8(wv);
                for (c, a) in accr.iter_mut().enumerate() {
                    let sx = _mm256_sign_epi8(xv[c], wv);
                    let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
                    let s = _mm256_broadcast_ss(&*sc.add((r * C + c) * nb + b));
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, *a);
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            for (c, a) in accr.iter().enumerate() {
                *out.add(r * C + c) = hsum(*a);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::BLOCK;
    use std::arch::aarch64::*;

    /// Lanes 0..4 (bytes 0..16) or 4..8 (bytes 16..32) of one block: widening
    /// i8×i8 → i16 products (|p| ≤ 2¹⁴), pairwise-added to i32 twice, so lane `l`
    /// holds bytes `4l..4l+3` as on x86.
    #[inline(always)]
    unsafe fn half_lanes(w: int8x16_t, x: int8x16_t) -> int32x4_t {
        let lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(x)));
        let hi = vpaddlq_s16(vmull_high_s8(w, x));
        vpaddq_s32(lo, hi)
    }

    /// NEON tile: two `float32x4` accumulators per pair (lanes 0..4 and 4..8).
    #[target_feature(enable = "neon")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_neon<const R: usize, const C: usize>(
        w: *const i8,
        ws: *const half::f16,
        ldw: usize,
        x: *const i8,
        xd: *const f32,
        ldx: usize,
        nb: usize,
        sc: *mut f32,
        out: *mut f32,
    ) {
        super::scale_products::<R, C>(ws, xd, nb, sc);
        let mut lo = [[vdupq_n_f32(0.0); C]; R];
        let mut hi = [[vdupq_n_f32(0.0); C]; R];
        for b in 0..nb {
            let o = b * BLOCK;
            for r in 0..R {
                let w0 = vld1q_s8(w.add(r * ldw + o));
                let w1 = vld1q_s8(w.add(r * ldw + o + 16));
                for c in 0..C {
                    let x0 = vld1q_s8(x.add(c * ldx + o));
                    let x1 = vld1q_s8(x.add(c * ldx + o + 16));
                    let s = vdupq_n_f32(*sc.add((r * C + c) * nb + b));
                    lo[r][c] = vfmaq_f32(lo[r][c], vcvtq_f32_s32(half_lanes(w0, x0)), s);
                    hi[r][c] = vfmaq_f32(hi[r][c], vcvtq_f32_s32(half_lanes(w1, x1)), s);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                // (a0+a4, a1+a5, a2+a6, a3+a7), then (s0+s2, s1+s3), then their sum.
                let s = vaddq_f32(lo[r][c], hi[r][c]);
                let t = vadd_f32(vget_low_f32(s), vget_high_f32(s));
                *out.add(r * C + c) = vget_lane_f32::<0>(t) + vget_lane_f32::<1>(t);
            }
        }
    }
}

/// The tile table of `path`. Panics if the CPU lacks it (only [`available_paths`]
/// are valid).
fn tiles(path: Path) -> &'static TileTable {
    assert!(
        available_paths().contains(&path),
        "{path:?} is not available on this CPU"
    );
    static PORTABLE: TileTable = tile_table!(tile_portable);
    #[cfg(target_arch = "x86_64")]
    static AVX2: TileTable = {
        use x86::tile_avx2;
        tile_table!(tile_avx2)
    };
    #[cfg(target_arch = "x86_64")]
    static VNNI: TileTable = {
        use x86::tile_vnni;
        tile_table!(tile_vnni)
    };
    #[cfg(target_arch = "aarch64")]
    static NEON: TileTable = {
        use arm::tile_neon;
        tile_table!(tile_neon)
    };
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => &AVX2,
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => &VNNI,
        #[cfg(target_arch = "aarch64")]
        Path::Neon => &NEON,
        _ => &PORTABLE,
    }
}

/// One dot product on `path` (the 1 × 1 tile); `ws` are the weight row's f16
/// block scales.
pub fn dot_on(path: Path, w: &[i8], ws: &[f16], x: &[i8], xd: &[f32]) -> f32 {
    assert!(w.len() == x.len() && w.len().is_multiple_of(BLOCK));
    assert!(ws.len() == w.len() / BLOCK && xd.len() == ws.len());
    let mut sc = vec![0f32; ws.len()];
    let mut out = 0f32;
    // SAFETY: lengths checked above; the path was detected on this CPU.
    unsafe {
        tiles(path)[0][0](
            w.as_ptr(),
            ws.as_ptr(),
            0,
            x.as_ptr(),
            xd.as_ptr(),
            0,
            ws.len(),
            sc.as_mut_ptr(),
            &mut out,
        )
    };
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
    let table = tiles(path);
    let mc = rows_per_task(rows, cols, t);
    let optr = OutPtr(out.as_mut_ptr());
    (0..rows.div_ceil(mc)).into_par_iter().for_each(|task| {
        let r0 = task * mc;
        let r1 = (r0 + mc).min(rows);
        let mut sc = vec![0f32; TILE_R * TILE_C.min(t) * nb];
        let mut tile = [0f32; TILE_R * TILE_C];
        let mut t0 = 0;
        while t0 < t {
            let cc = TILE_C.min(t - t0);
            let mut r = r0;
            while r < r1 {
                let rc = TILE_R.min(r1 - r);
                // SAFETY: rows r..r+rc of q (and their scales in s) and tokens
                // t0..t0+cc of x are in bounds (checked lengths), sc has room for
                // rc·cc·nb products, tile for rc·cc, and the table's path was
                // detected on this CPU.
                unsafe {
                    table[rc - 1][cc - 1](
                        q.as_ptr().add(r * cols),
                        s.as_ptr().add(r * nb),
                        cols,
                        x.q.as_ptr().add(t0 * cols),
                        x.d.as_ptr().add(t0 * nb),
                        cols,
                        nb,
                        sc.as_mut_ptr(),
                        tile.as_mut_ptr(),
                    );
                }
                for i in 0..rc {
                    for c in 0..cc {
                        // SAFETY: (t0 + c, r + i) is inside `out` (t × rows), and only
                        // this task writes row r + i.
                        unsafe { *optr.get().add((t0 + c) * rows + r + i) = tile[i * cc + c] };
                    }
                }
                r += rc;
            }
            t0 += cc;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        assert_same_bits, lcg, on_threads, random_rows, random_scales, random_weight,
    };

    #[test]
    fn every_tile_of_every_path_matches_portable_bit_for_bit() {
        let mut seed = 7;
        let paths = available_paths();
        println!("q8 paths on this CPU: {paths:?}");
        for nb in [1usize, 2, 3, 4, 5, 7, 9, 33, 128, 131] {
            for _case in 0..6 {
                let w = random_rows(&mut seed, TILE_R, nb, true);
                let x = random_rows(&mut seed, TILE_C, nb, false);
                let ws = random_scales(&mut seed, TILE_R * nb, true);
                let ws16: Vec<f16> = ws.iter().map(|&v| f16::from_f32(v)).collect();
                let xd = random_scales(&mut seed, TILE_C * nb, false);
                let n = nb * BLOCK;
                let want: Vec<Vec<f32>> = (0..TILE_R)
                    .map(|r| {
                        (0..TILE_C)
                            .map(|c| {
                                dot_portable(
                                    &w[r * n..(r + 1) * n],
                                    &ws[r * nb..(r + 1) * nb],
                                    &x[c * n..(c + 1) * n],
                                    &xd[c * nb..(c + 1) * nb],
                                )
                            })
                            .collect()
                    })
                    .collect();
                for &p in &paths {
                    for rc in 1..=TILE_R {
                        for cc in 1..=TILE_C {
                            let mut sc = vec![0f32; rc * cc * nb];
                            let mut out = vec![0f32; rc * cc];
                            // SAFETY: rc rows of w and cc rows of x, each n bytes with
                            // nb scales; sc and out sized above; the path is available.
                            unsafe {
                                tiles(p)[rc - 1][cc - 1](
                                    w.as_ptr(),
                                    ws16.as_ptr(),
                                    n,
                                    x.as_ptr(),
                                    xd.as_ptr(),
                                    n,
                                    nb,
                                    sc.as_mut_ptr(),
                                    out.as_mut_ptr(),
                                )
                            };
                            for i in 0..rc {
                                for c in 0..cc {
                                    assert_eq!(
                                        out[i * cc + c].to_bits(),
                                        want[i][c].to_bits(),
                                        "{p:?} tile {rc}x{cc} pair ({i},{c}) nb={nb}"
                                    );
                                }
                            }
                        }
                    }
                    let got = dot_on(p, &w[..n], &ws16[..nb], &x[..n], &xd[..nb]);
                    assert_eq!(got.to_bits(), want[0][0].to_bits(), "{p:?} dot nb={nb}");
                }
            }
        }
    }

    #[test]
    fn portable_dot_is_close_to_exact() {
        let mut seed = 3;
        for nb in [1usize, 4, 128] {
            let w = random_rows(&mut seed, 1, nb, true);
            let x = random_rows(&mut seed, 1, nb, false);
            let ws = random_scales(&mut seed, nb, true);
            let xd = random_scales(&mut seed, nb, false);
            let exact: f64 = (0..nb)
                .map(|b| {
                    let s: i64 = (0..BLOCK)
                        .map(|j| w[b * BLOCK + j] as i64 * x[b * BLOCK + j] as i64)
                        .sum();
                    s as f64 * ws[b] as f64 * xd[b] as f64
                })
                .sum();
            let mag: f64 = (0..nb)
                .map(|b| 32.0 * 128.0 * 127.0 * ws[b] as f64 * xd[b] as f64)
                .sum();
            let got = dot_portable(&w, &ws, &x, &xd) as f64;
            assert!(
                (got - exact).abs() <= mag * 1e-6,
                "nb={nb}: {got} vs {exact}"
            );
        }
    }

    #[test]
    fn matmul_is_independent_of_paths_tiles_and_threads() {
        let mut seed = 11;
        // Rows and tokens that are not multiples of the tiles or of the task size.
        for (rows, nb, t) in [
            (1usize, 1usize, 1usize),
            (5, 3, 7),
            (67, 4, 13),
            (130, 9, 1),
            (33, 131, 6),
        ] {
            let cols = nb * BLOCK;
            let (q, s) = random_weight(&mut seed, rows, nb);
            let xf: Vec<f32> = (0..t * cols)
                .map(|i| ((lcg(&mut seed) % 2001) as f32 - 1000.0) * 1e-3 * (1 + i % 5) as f32)
                .collect();
            let x = QActs::quantize(&xf, cols);
            let mut want = vec![0f32; t * rows];
            for tok in 0..t {
                let (xr, xd) = x.row(tok);
                for r in 0..rows {
                    let ws: Vec<f32> = s[r * nb..(r + 1) * nb].iter().map(|v| v.to_f32()).collect();
                    want[tok * rows + r] = dot_portable(&q[r * cols..(r + 1) * cols], &ws, xr, xd);
                }
            }
            for &p in &available_paths() {
                for threads in [1usize, 2, 3] {
                    let mut out = vec![f32::NAN; t * rows];
                    on_threads(threads, || matmul_on(p, &q, &s, rows, cols, &x, &mut out));
                    let what = format!("{p:?} threads={threads} rows={rows} nb={nb} t={t}");
                    assert_same_bits(&out, &want, &what);
                }
            }
        }
    }

    #[test]
    fn extreme_block_sum_is_exact() {
        let w = vec![-128i8; 32];
        let x = vec![-127i8; 32];
        for &p in &available_paths() {
            let got = dot_on(p, &w, &[f16::ONE], &x, &[1.0]);
            assert_eq!(got, (32 * 128 * 127) as f32, "{p:?}");
        }
    }

    #[test]
    fn quantization_is_symmetric_and_bounded() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.37).collect();
        let q = QActs::quantize(&x, 64);
        assert_eq!(q.rows, 1);
        assert!(q.q.iter().all(|&v| v >= -127));
        assert_eq!(q.q[0], -127);
        // Dequantized values are within half a step.
        for (i, v) in x.iter().enumerate() {
            let d = q.d[i / 32];
            assert!((q.q[i] as f32 * d - v).abs() <= d * 0.5 + 1e-6);
        }
        let z = QActs::quantize(&[0.0; 32], 32);
        assert_eq!(z.d[0], 0.0);
        assert!(z.q.iter().all(|&v| v == 0));
        // Ties, tiny and huge values, zeros, and blocks that end up all-zero.
        let mut seed = 5u64;
        let mut odd: Vec<f32> = (0..32 * 64)
            .map(|i| match i % 7 {
                0 => ((lcg(&mut seed) % 255) as f32 - 127.0) * 0.5,
                1 => 0.0,
                2 => -1e-30,
                3 => 3e38 * if i % 2 == 0 { 1.0 } else { -1.0 },
                _ => ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-3,
            })
            .collect();
        odd[64..96].fill(0.0);
        odd[96..128].fill(-0.0);
        let qo = QActs::quantize(&odd, 64);
        for (b, xb) in odd.chunks_exact(32).enumerate() {
            let mut qq = [0i8; 32];
            let d = quantize_block(xb, &mut qq);
            assert_eq!(d.to_bits(), qo.d[b].to_bits(), "block {b}");
            assert_eq!(&qq[..], &qo.q[b * 32..(b + 1) * 32], "block {b}");
        }
        // Large inputs are quantized in parallel chunks; the result is per block.
        let big: Vec<f32> = (0..3 * 70_000 / 32 * 32)
            .map(|i| ((i * 37) % 101) as f32 - 50.0)
            .collect();
        let qb = QActs::quantize(&big, 32);
        for (b, xb) in big.chunks_exact(32).enumerate() {
            let mut qq = [0i8; 32];
            let d = quantize_block(xb, &mut qq);
            assert_eq!(d.to_bits(), qb.d[b].to_bits());
            assert_eq!(&qq[..], &qb.q[b * 32..(b + 1) * 32]);
        }
    }
}
