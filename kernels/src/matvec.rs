//! The decode matrix-vector product ("W8A16"): int8 per-block-32 weights with f16
//! scales, times activations rounded per block of 32 to int16.
//!
//! Why int16 activations: decode streams every weight once per token, so the
//! kernel must retire 32 weight bytes in fewer cycles than memory delivers them.
//! With f32 activations each 8 weights cost a widen, a convert and an FMA, and the
//! kernel topped out at about 8 GB/s per core, below what two cores can read. With
//! int16 activations 16 products are one `vpmaddwd`, and half the instructions
//! remain. Rounding to 16 bits per block moves an activation by at most 2⁻¹⁶ of its
//! block's largest value, far below the int8 weights' own step (int8 activations,
//! llama.cpp's Q8_0 way, moved greedy tokens away from the reference on an
//! untrained fixture; see [`super::q8`]).
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
//! `vpmaddwd`, one convert and one FMA, with no shuffle to fold the block's halves.
//! Over 4.2 GB of the 8B bundle's mapped weights (2 threads kept awake, three
//! alternating runs on a 2-core Xeon host), the earlier definition (eight lanes, each
//! two pairs' sum) read 28.3–29.4 GB/s and this one, with `RowsFn`'s loop,
//! 29.6–30.2, where a plain sum over the same bytes read 34.2–35.0.

use super::OutPtr;
pub use crate::path::{available_paths, best_path, Path};
use half::f16;
use rayon::prelude::*;

/// Elements per quantization block (`docs/quantization.md`).
pub const BLOCK: usize = 32;

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
        assert!(cols.is_multiple_of(BLOCK) && cols > 0 && x.len().is_multiple_of(cols));
        let mut q = vec![0i16; x.len()];
        let mut d = vec![0f32; x.len() / BLOCK];
        for ((xb, qb), db) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .zip(d.iter_mut())
        {
            *db = quantize_block16(xb, qb);
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
    assert!(x.len() == BLOCK && q.len() == BLOCK);
    #[cfg(target_arch = "x86_64")]
    if matches!(best_path(), Path::Avx2 | Path::Avx512Vnni) {
        // SAFETY: both hold one block (checked); the path's features are present.
        return unsafe { x86::quantize_block16_avx2(x.as_ptr(), q.as_mut_ptr()) };
    }
    quantize_block16_portable(x, q)
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

/// One row's dot product (the signature of every path's row, which the x86 tests
/// call alone): weight row `w`, its scales `ws`, the quantized activation row
/// `xq`/`xd`, and `sc`; the contract is [`RowsFn`]'s for one row.
#[cfg(all(test, target_arch = "x86_64"))]
type RowFn = unsafe fn(
    w: *const i8,
    ws: *const f16,
    xq: *const i16,
    xd: *const f32,
    nb: usize,
    sc: *mut f32,
) -> f32;

/// `n` consecutive rows' dot products into `out[0..n]`: rows `w`, `w + nb · 32`, …
/// with scales `ws`, `ws + nb`, …, against one quantized activation row.
///
/// Why a loop inside each path's function rather than a call per row from the
/// driver: decode over the 8B bundle's mapped weights read 27.7 GB/s with the driver
/// storing each call's result, 28.6 with the loop inside the path's target features
/// storing them, and 29.0 with no result kept at all (medians of 5, a 2-core Xeon
/// host). The row itself stays a call (see `row_avx2`).
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
mod x86 {
    use super::{BLOCK, MAGIC, QMAX};
    use half::f16;
    use std::arch::x86_64::*;

    /// [`super::quantize_block16`] on AVX2: the same operations, eight lanes at a
    /// time (max and IEEE division, addition and subtraction round the same in a
    /// vector lane as in a scalar; the clamped values are integers, so truncating
    /// converts them exactly).
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_block16_avx2(x: *const f32, q: *mut i16) -> f32 {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.add(8 * i)));
        let nan = _mm256_or_ps(
            _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_UNORD_Q>(v[0], v[0]),
                _mm256_cmp_ps::<_CMP_UNORD_Q>(v[1], v[1]),
            ),
            _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_UNORD_Q>(v[2], v[2]),
                _mm256_cmp_ps::<_CMP_UNORD_Q>(v[3], v[3]),
            ),
        );
        let zero = _mm256_setzero_si256();
        if _mm256_movemask_ps(nan) != 0 {
            _mm256_storeu_si256(q as *mut __m256i, zero);
            _mm256_storeu_si256(q.add(16) as *mut __m256i, zero);
            return f32::NAN;
        }
        let sign = _mm256_set1_ps(-0.0);
        let a = v.map(|vi| _mm256_andnot_ps(sign, vi));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / QMAX;
        if d == 0.0 || !d.is_finite() {
            _mm256_storeu_si256(q as *mut __m256i, zero);
            _mm256_storeu_si256(q.add(16) as *mut __m256i, zero);
            return d;
        }
        let (dv, magic) = (_mm256_set1_ps(d), _mm256_set1_ps(MAGIC));
        let (lo, hi) = (_mm256_set1_ps(-QMAX), _mm256_set1_ps(QMAX));
        let r = v.map(|vi| {
            let t = _mm256_sub_ps(_mm256_add_ps(_mm256_div_ps(vi, dv), magic), magic);
            _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(t, lo), hi))
        });
        // packs interleaves 128-bit halves; the permute puts the values back in order.
        for h in 0..2 {
            let p = _mm256_packs_epi32(r[2 * h], r[2 * h + 1]);
            let p = _mm256_permute4x64_epi64::<0xD8>(p);
            _mm256_storeu_si256(q.add(16 * h) as *mut __m256i, p);
        }
        d
    }

    /// Prefetch distance along a task's weight rows (bytes): the hardware prefetchers
    /// stop at 4 KiB pages. Which hint is best depends on the CPU (see [`prefetch`]).
    const PREFETCH: usize = 8192;

    /// Whether the rows prefetch into L2 (`prefetcht1`, on Intel CPUs) rather than
    /// with the non-temporal hint (elsewhere). Measured on the 8B bundle's int8
    /// weights × one token, 2 threads, best of 3 passes over 2 GiB:
    /// - 2-core Zen 3 host: `prefetchnta` at 8 KiB read 15.2–16.7 GB/s, `prefetcht0`
    ///   at 2 KiB 13.5 (a plain sum over the same bytes: 19.0–19.3);
    /// - 2-core Xeon host (AVX-512): `prefetchnta` at 8 KiB 13.5 GB/s, no prefetch
    ///   18.7, `prefetcht0` at 8 KiB 23.0, `prefetcht1` at 4–32 KiB 25.2–26.3 (a
    ///   plain sum: 34.8). On Intel the non-temporal hint fills L1 only, so the L2
    ///   streamer never sees the stream.
    pub fn prefetch_l2() -> bool {
        static L2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *L2.get_or_init(|| {
            // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
            #[allow(unused_unsafe)]
            let r = unsafe { __cpuid(0) };
            // "GenuineIntel" in EBX, EDX, ECX.
            (r.ebx, r.edx, r.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
        })
    }

    /// One prefetch of the weight stream with the hint chosen by [`prefetch_l2`].
    /// Wrapping: the address may pass the end of the weights (a prefetch never faults).
    #[inline(always)]
    fn prefetch<const L2: bool>(p: *const i8) {
        let p = p.wrapping_add(PREFETCH);
        // SAFETY: a prefetch reads nothing and never faults.
        unsafe {
            if L2 {
                _mm_prefetch::<_MM_HINT_T1>(p)
            } else {
                _mm_prefetch::<_MM_HINT_NTA>(p)
            }
        }
    }

    /// The row's scale products `sc[b] = f32(ws[b]) · xd[b]`, eight at a time.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn scale_products(ws: *const f16, xd: *const f32, nb: usize, sc: *mut f32) {
        let full = nb / 8 * 8;
        let mut b = 0;
        while b < full {
            let s = _mm256_cvtph_ps(_mm_loadu_si128(ws.add(b) as *const __m128i));
            _mm256_storeu_ps(sc.add(b), _mm256_mul_ps(s, _mm256_loadu_ps(xd.add(b))));
            b += 8;
        }
        while b < nb {
            *sc.add(b) = (*ws.add(b)).to_f32() * *xd.add(b);
            b += 1;
        }
    }

    /// Block `b` folded into the pair lanes: `lo` takes pairs 0–7 (the block's first
    /// 16 bytes), `hi` pairs 8–15, each `fma(f32(p), sc, acc)`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block_avx2(
        w: *const i8,
        xq: *const i16,
        b: usize,
        sc: f32,
        lo: __m256,
        hi: __m256,
    ) -> (__m256, __m256) {
        let o = b * BLOCK;
        let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(o) as *const __m128i));
        let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(o + 16) as *const __m128i));
        let p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256(xq.add(o) as *const __m256i));
        let p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256(xq.add(o + 16) as *const __m256i));
        let s = _mm256_set1_ps(sc);
        (
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), s, lo),
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), s, hi),
        )
    }

    /// The folded lanes `t` summed in the module's order:
    /// `((t0+t4) + (t2+t6)) + ((t1+t5) + (t3+t7))`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn lane_total(t: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// AVX2 row: the scale products first (one pass over the row's scales), then per
    /// block two sign-extensions to int16, two `vpmaddwd`, two converts and two FMAs
    /// (pairs 0–7 and 8–15 in two registers).
    ///
    /// Kept out of line: inlined into the loop over a task's rows, the AVX-512 row
    /// (the same instructions) read the 8B bundle's weights at 24.5 GB/s instead of
    /// 28.6 on a 2-core Xeon host.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline(never)]
    pub unsafe fn row_avx2<const L2: bool>(
        w: *const i8,
        ws: *const f16,
        xq: *const i16,
        xd: *const f32,
        nb: usize,
        sc: *mut f32,
    ) -> f32 {
        scale_products(ws, xd, nb, sc);
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        // Two blocks (one cache line of weights) per iteration: one prefetch and no
        // branch for it.
        let pairs = nb / 2 * 2;
        let mut b = 0;
        while b < pairs {
            prefetch::<L2>(w.wrapping_add(b * BLOCK));
            (lo, hi) = block_avx2(w, xq, b, *sc.add(b), lo, hi);
            (lo, hi) = block_avx2(w, xq, b + 1, *sc.add(b + 1), lo, hi);
            b += 2;
        }
        if b < nb {
            (lo, hi) = block_avx2(w, xq, b, *sc.add(b), lo, hi);
        }
        lane_total(_mm256_add_ps(lo, hi))
    }

    rows_of!(
        /// [`row_avx2`] (L2 prefetch) over consecutive rows.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub rows_avx2_l2,
        row_avx2::<true>
    );
    rows_of!(
        /// [`row_avx2`] (non-temporal prefetch) over consecutive rows.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub rows_avx2_nta,
        row_avx2::<false>
    );
    rows_of!(
        /// [`row_avx512`] (L2 prefetch) over consecutive rows.
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        pub rows_avx512_l2,
        row_avx512::<true>
    );
    rows_of!(
        /// [`row_avx512`] (non-temporal prefetch) over consecutive rows.
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        pub rows_avx512_nta,
        row_avx512::<false>
    );

    /// Block `b` folded into the 16 pair lanes: one sign-extension, one `vpmaddwd`,
    /// one convert, one FMA.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn block_avx512(w: *const i8, xq: *const i16, b: usize, sc: f32, acc: __m512) -> __m512 {
        let o = b * BLOCK;
        let w16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(w.add(o) as *const __m256i));
        let p = _mm512_madd_epi16(w16, _mm512_loadu_si512(xq.add(o) as *const _));
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(sc), acc)
    }

    /// AVX-512 row: the module's arithmetic as written, one block per 512-bit
    /// `vpmaddwd`; the two halves of the accumulator are added once at the end.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    #[inline(never)] // see `row_avx2`
    pub unsafe fn row_avx512<const L2: bool>(
        w: *const i8,
        ws: *const f16,
        xq: *const i16,
        xd: *const f32,
        nb: usize,
        sc: *mut f32,
    ) -> f32 {
        scale_products(ws, xd, nb, sc);
        let mut acc = _mm512_setzero_ps();
        let pairs = nb / 2 * 2;
        let mut b = 0;
        while b < pairs {
            prefetch::<L2>(w.wrapping_add(b * BLOCK));
            acc = block_avx512(w, xq, b, *sc.add(b), acc);
            acc = block_avx512(w, xq, b + 1, *sc.add(b + 1), acc);
            b += 2;
        }
        if b < nb {
            acc = block_avx512(w, xq, b, *sc.add(b), acc);
        }
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
        lane_total(_mm256_add_ps(_mm512_castps512_ps256(acc), hi))
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::BLOCK;
    use half::f16;
    use std::arch::aarch64::*;

    rows_of!(
        /// [`row_neon`] over consecutive rows.
        #[target_feature(enable = "neon")]
        pub rows_neon,
        row_neon
    );

    /// NEON row: per block the four 8-byte quarters widened to int16, multiplied
    /// into int32 (`smull`), adjacent products added pairwise (`addp`, so lane `l`
    /// of a quarter's result holds its bytes `2l, 2l+1`), converted, and fused into
    /// the pair lanes 0–3, 4–7, 8–11 and 12–15.
    #[target_feature(enable = "neon")]
    pub unsafe fn row_neon(
        w: *const i8,
        ws: *const f16,
        xq: *const i16,
        xd: *const f32,
        nb: usize,
        _sc: *mut f32,
    ) -> f32 {
        let mut acc = [vdupq_n_f32(0.0); 4];
        for b in 0..nb {
            let o = b * BLOCK;
            let sc = vdupq_n_f32((*ws.add(b)).to_f32() * *xd.add(b));
            // Pair lanes h/2 .. h/2+3 and h/2+4 .. h/2+7 of the 16-byte half at byte h.
            let half = |h: usize| {
                let wv = vld1q_s8(w.add(o + h));
                let (wl, wh) = (vmovl_s8(vget_low_s8(wv)), vmovl_high_s8(wv));
                let (x0, x1) = (vld1q_s16(xq.add(o + h)), vld1q_s16(xq.add(o + h + 8)));
                let p0 = vpaddq_s32(
                    vmull_s16(vget_low_s16(wl), vget_low_s16(x0)),
                    vmull_high_s16(wl, x0),
                );
                let p1 = vpaddq_s32(
                    vmull_s16(vget_low_s16(wh), vget_low_s16(x1)),
                    vmull_high_s16(wh, x1),
                );
                (p0, p1)
            };
            let (p0, p1) = half(0);
            let (p2, p3) = half(16);
            for (a, p) in acc.iter_mut().zip([p0, p1, p2, p3]) {
                *a = vfmaq_f32(*a, vcvtq_f32_s32(p), sc);
            }
        }
        // t[0..4] and t[4..8], then [t0+t4, t1+t5, t2+t6, t3+t7], then the module's
        // order.
        let s = vaddq_f32(vaddq_f32(acc[0], acc[2]), vaddq_f32(acc[1], acc[3]));
        (vgetq_lane_f32::<0>(s) + vgetq_lane_f32::<2>(s))
            + (vgetq_lane_f32::<1>(s) + vgetq_lane_f32::<3>(s))
    }
}

fn rows_fn(path: Path) -> RowsFn {
    assert!(
        available_paths().contains(&path),
        "{path:?} is not available on this CPU"
    );
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
    let xa = Acts16::quantize(x, cols);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_same_bits, lcg, on_threads, random_weight};

    #[test]
    fn quantization_is_bounded_and_within_half_a_step() {
        let mut seed = 3u64;
        let x: Vec<f32> = (0..32 * 40)
            .map(|i| match i % 5 {
                0 => 0.0,
                1 => ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-3,
                2 => -1e-30,
                _ => ((lcg(&mut seed) % 2001) as f32 - 1000.0) * 10f32.powi(i % 7 - 3),
            })
            .collect();
        let a = Acts16::quantize(&x, 64);
        for (i, v) in x.iter().enumerate() {
            let d = a.d[i / 32];
            assert!(a.q[i].unsigned_abs() <= 32767);
            assert!(
                (a.q[i] as f32 * d - v).abs() <= d * 0.5 * (1.0 + 1e-6),
                "{i}"
            );
        }
        // The block's largest magnitude maps to ±32767.
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let k = (0..32)
                .max_by(|&i, &j| xb[i].abs().total_cmp(&xb[j].abs()))
                .unwrap();
            assert_eq!(a.q[b * 32 + k].unsigned_abs(), 32767, "block {b}");
        }
        // Exactly half-way values round to even (a block whose step is exactly 1).
        for (i, v) in x.iter().enumerate() {
            let d = a.d[i / 32];
            assert_eq!(a.q[i], (v / d).round_ties_even() as i16, "{i}");
        }
        let mut ties = [0f32; 32];
        ties[0] = 32767.0;
        for (i, t) in ties.iter_mut().enumerate().skip(1) {
            *t = (i as f32 - 16.0) + 0.5;
        }
        let ta = Acts16::quantize(&ties, 32);
        assert_eq!(ta.d[0], 1.0);
        for (i, t) in ties.iter().enumerate() {
            assert_eq!(ta.q[i], t.round_ties_even() as i16, "tie {t}");
        }
        let z = Acts16::quantize(&[0.0; 32], 32);
        assert_eq!(z.d[0], 0.0);
        assert!(z.q.iter().all(|&v| v == 0));
    }

    #[test]
    fn block_quantization_paths_agree_bit_for_bit() {
        let mut seed = 41u64;
        let specials = [
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            -1e-40,
            1e-45,
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            0.5,
            -32767.5,
        ];
        for case in 0..400 {
            let mut x: Vec<f32> = (0..BLOCK)
                .map(|_| {
                    let e = (lcg(&mut seed) % 60) as i32 - 30;
                    ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-4 * 2f32.powi(e)
                })
                .collect();
            // Some blocks get one or two special values, some are all one value.
            match case % 4 {
                0 => x[(case / 4) % BLOCK] = specials[(case / 4) % specials.len()],
                1 => x.fill(specials[(case / 4) % specials.len()]),
                2 => {
                    x[3] = specials[case % specials.len()];
                    x[31] = specials[(case / 7) % specials.len()];
                }
                _ => {}
            }
            let (mut a, mut b) = ([0i16; BLOCK], [0i16; BLOCK]);
            let da = quantize_block16(&x, &mut a);
            let db = quantize_block16_portable(&x, &mut b);
            assert_eq!(da.to_bits(), db.to_bits(), "case {case}: scale");
            assert_eq!(a, b, "case {case}: values");
        }
    }

    #[test]
    fn non_finite_activations_give_nan_not_garbage() {
        let (q, s) = random_weight(&mut 9, 3, 2);
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = vec![0.5f32; 64];
            x[40] = bad;
            for &p in &available_paths() {
                let mut out = vec![0f32; 3];
                matvec_on(p, &q, &s, 3, 64, &x, &mut out);
                assert!(out.iter().all(|v| v.is_nan()), "{p:?} {bad}: {out:?}");
            }
        }
    }

    #[test]
    fn extreme_block_sum_is_exact_on_every_path() {
        // 32 · 128 · 32767: the largest block sum, from sixteen pair lanes each at
        // 2 · 128 · 32767, under 2²⁴; exact only if every lane sum is.
        let w = vec![-128i8; 32];
        let x = vec![-1.0f32; 32];
        let xa = Acts16::quantize(&x, 32);
        assert!(xa.q.iter().all(|&v| v == -32767));
        assert_eq!(
            dot_portable(&w, &[f16::ONE], &xa.q, &[1.0]),
            (32 * 128 * 32767) as f32
        );
        let want = dot_portable(&w, &[f16::ONE], &xa.q, &xa.d);
        for &p in &available_paths() {
            let mut out = [0f32];
            matvec_on(p, &w, &[f16::ONE], 1, 32, &x, &mut out);
            assert_eq!(out[0].to_bits(), want.to_bits(), "{p:?}");
        }
    }

    /// Both prefetch hints of each x86 row (only one runs on a given CPU) give the
    /// portable row's bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn both_prefetch_variants_of_each_row_match_portable() {
        let mut seed = 31;
        for nb in [1usize, 2, 17, 128] {
            let cols = nb * BLOCK;
            let (q, s) = random_weight(&mut seed, 1, nb);
            let x: Vec<f32> = (0..cols)
                .map(|_| ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-3)
                .collect();
            let xa = Acts16::quantize(&x, cols);
            let want = dot_portable(&q, &s, &xa.q, &xa.d);
            let mut rows: Vec<(RowFn, &str)> = Vec::new();
            if available_paths().contains(&Path::Avx2) {
                rows.push((x86::row_avx2::<true>, "avx2 t1"));
                rows.push((x86::row_avx2::<false>, "avx2 nta"));
            }
            if available_paths().contains(&Path::Avx512Vnni) {
                rows.push((x86::row_avx512::<true>, "avx512 t1"));
                rows.push((x86::row_avx512::<false>, "avx512 nta"));
            }
            let mut sc = vec![0f32; nb];
            for (row, what) in rows {
                // SAFETY: one row of nb blocks, its scales and activations; sc holds nb
                // floats; the row's path is available.
                let got = unsafe {
                    row(
                        q.as_ptr(),
                        s.as_ptr(),
                        xa.q.as_ptr(),
                        xa.d.as_ptr(),
                        nb,
                        sc.as_mut_ptr(),
                    )
                };
                assert_eq!(got.to_bits(), want.to_bits(), "{what} nb={nb}");
            }
        }
    }

    /// The definition, restated from the module docs one operation at a time: a change
    /// to `dot_portable` that changes its bits must change the docs too.
    #[test]
    fn portable_dot_is_the_documented_arithmetic() {
        let mut seed = 77;
        for nb in [1usize, 2, 5, 40] {
            let (w, ws) = random_weight(&mut seed, 1, nb);
            let x: Vec<f32> = (0..nb * BLOCK)
                .map(|i| ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-3 * (1 + i % 7) as f32)
                .collect();
            let xa = Acts16::quantize(&x, nb * BLOCK);
            let mut acc = [0f32; 16];
            for (b, (s, d)) in ws.iter().zip(&xa.d).enumerate() {
                let sc = s.to_f32() * d;
                for (j, a) in acc.iter_mut().enumerate() {
                    let (i0, i1) = (32 * b + 2 * j, 32 * b + 2 * j + 1);
                    let p = w[i0] as i32 * xa.q[i0] as i32 + w[i1] as i32 * xa.q[i1] as i32;
                    *a = (p as f32).mul_add(sc, *a);
                }
            }
            let t: Vec<f32> = (0..8).map(|l| acc[l] + acc[l + 8]).collect();
            let want = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
            let got = dot_portable(&w, &ws, &xa.q, &xa.d);
            assert_eq!(got.to_bits(), want.to_bits(), "nb={nb}");
        }
    }

    /// Each path's task loop over more rows than it gathers at once (and an odd count)
    /// gives each row's portable bits in place.
    #[test]
    fn task_loops_cover_every_row() {
        let mut seed = 5;
        let (rows, nb) = (2 * ROWS_MAX + 23, 3);
        let cols = nb * BLOCK;
        let (q, s) = random_weight(&mut seed, rows, nb);
        let x: Vec<f32> = (0..cols)
            .map(|_| ((lcg(&mut seed) % 2001) as f32 - 1000.0) * 1e-2)
            .collect();
        let xa = Acts16::quantize(&x, cols);
        let want: Vec<f32> = (0..rows)
            .map(|r| {
                dot_portable(
                    &q[r * cols..(r + 1) * cols],
                    &s[r * nb..(r + 1) * nb],
                    &xa.q,
                    &xa.d,
                )
            })
            .collect();
        for &p in &available_paths() {
            let mut out = vec![f32::NAN; rows + 1];
            let mut sc = vec![0f32; nb];
            // SAFETY: `rows` rows of q and s, one activation row, nb scratch floats,
            // `rows` outputs; the path is available.
            unsafe {
                rows_fn(p)(
                    q.as_ptr(),
                    s.as_ptr(),
                    ActRow {
                        q: xa.q.as_ptr(),
                        d: xa.d.as_ptr(),
                    },
                    nb,
                    sc.as_mut_ptr(),
                    rows,
                    out.as_mut_ptr(),
                )
            };
            assert_same_bits(&out[..rows], &want, &format!("{p:?}"));
            assert!(out[rows].is_nan(), "{p:?} wrote past its rows");
        }
    }

    #[test]
    fn paths_match_portable_bit_for_bit_and_are_accurate() {
        let mut seed = 23;
        for (rows, nb, t) in [
            (1usize, 1usize, 1usize),
            (7, 3, 2),
            (13, 9, 1),
            (9, 131, 1),
            (64, 16, 3),
            (300, 4, 1),
        ] {
            let cols = nb * BLOCK;
            let (q, s) = random_weight(&mut seed, rows, nb);
            let x: Vec<f32> = (0..t * cols)
                .map(|i| ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-4 * (1 + i % 3) as f32)
                .collect();
            let xa = Acts16::quantize(&x, cols);
            let mut want = vec![0f32; t * rows];
            for tok in 0..t {
                let (xq, xd) = xa.row(tok);
                let xr = &x[tok * cols..(tok + 1) * cols];
                for r in 0..rows {
                    let (w, sr) = (&q[r * cols..(r + 1) * cols], &s[r * nb..(r + 1) * nb]);
                    let got = dot_portable(w, sr, xq, xd);
                    want[tok * rows + r] = got;
                    // Against the exact product on the unrounded activations: the
                    // int16 rounding is at most half a step of each block.
                    let term = |c: usize| w[c] as f64 * sr[c / 32].to_f64() * xr[c] as f64;
                    let exact: f64 = (0..cols).map(term).sum();
                    let slack: f64 = (0..cols)
                        .map(|c| (w[c] as f64 * sr[c / 32].to_f64()).abs() * xd[c / 32] as f64)
                        .sum::<f64>()
                        * 0.5;
                    let mag: f64 = (0..cols).map(|c| term(c).abs()).sum();
                    assert!(
                        (got as f64 - exact).abs() <= slack + mag * 1e-6 + 1e-30,
                        "{got} vs {exact}"
                    );
                }
            }
            for &p in &available_paths() {
                for threads in [1usize, 2, 3] {
                    let mut out = vec![f32::NAN; t * rows];
                    on_threads(threads, || matvec_on(p, &q, &s, rows, cols, &x, &mut out));
                    let what = format!("{p:?} threads={threads} rows={rows} nb={nb} t={t}");
                    assert_same_bits(&out, &want, &what);
                }
            }
        }
    }
}
