use super::{ActRow, MultiTask, BLOCK, MAGIC, QMAX};
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
/// with the non-temporal hint (elsewhere). On Intel the non-temporal hint fills L1
/// only, so the L2 streamer never sees the stream: there `prefetchnta` read the
/// weights slower than no prefetch at all, and `prefetcht1` (4–32 KiB ahead) fastest
/// of the hints; on Zen 3 `prefetchnta` read fastest (decode over the 8B bundle's
/// int8 weights, docs/benchmarks-history.md: "Decode prefetches into L2 on Intel").
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
/// (the same instructions) read the 8B bundle's weights markedly slower
/// (docs/benchmarks-history.md: "Each path loops over its task's rows itself").
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

/// Most activation rows one multi-row call takes ([`rows_multi_avx512`]).
pub const MULTI: usize = 4;

/// `N` activation rows against one weight row (the decode steps of `N` sequences):
/// each block's weights are sign-extended once and feed `N` independent chains, so
/// the FMA latency of one chain no longer bounds the row. Each chain is
/// [`row_avx512`]'s, operation for operation, so each result has its bits.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[inline]
unsafe fn row_n_avx512<const N: usize, const L2: bool>(
    w: *const i8,
    ws: *const f16,
    x: *const ActRow,
    nb: usize,
    sc: *mut f32,
) -> [f32; N] {
    for k in 0..N {
        scale_products(ws, (*x.add(k)).d, nb, sc.add(k * nb));
    }
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        if b % 2 == 0 {
            prefetch::<L2>(w.wrapping_add(b * BLOCK));
        }
        let o = b * BLOCK;
        let w16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(w.add(o) as *const __m256i));
        for (k, a) in acc.iter_mut().enumerate() {
            let xq = (*x.add(k)).q;
            let p = _mm512_madd_epi16(w16, _mm512_loadu_si512(xq.add(o) as *const _));
            let s = _mm512_set1_ps(*sc.add(k * nb + b));
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, *a);
        }
    }
    acc.map(|a| {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
        lane_total(_mm256_add_ps(_mm512_castps512_ps256(a), hi))
    })
}

/// [`row_n_avx512`] for AVX2: [`row_avx2`]'s two half-block chains per activation row.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn row_n_avx2<const N: usize, const L2: bool>(
    w: *const i8,
    ws: *const f16,
    x: *const ActRow,
    nb: usize,
    sc: *mut f32,
) -> [f32; N] {
    for k in 0..N {
        scale_products(ws, (*x.add(k)).d, nb, sc.add(k * nb));
    }
    let mut lo = [_mm256_setzero_ps(); N];
    let mut hi = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        if b % 2 == 0 {
            prefetch::<L2>(w.wrapping_add(b * BLOCK));
        }
        let o = b * BLOCK;
        let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(o) as *const __m128i));
        let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(o + 16) as *const __m128i));
        for k in 0..N {
            let xq = (*x.add(k)).q;
            let p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256(xq.add(o) as *const __m256i));
            let p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256(xq.add(o + 16) as *const __m256i));
            let s = _mm256_set1_ps(*sc.add(k * nb + b));
            lo[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), s, lo[k]);
            hi[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), s, hi[k]);
        }
    }
    std::array::from_fn(|k| lane_total(_mm256_add_ps(lo[k], hi[k])))
}

/// Defines a [`super::RowsMultiFn`] named `$name` over `$row` (a `row_n_*` kernel):
/// each weight row against every activation row, [`MULTI`] at a time.
macro_rules! rows_multi_of {
    ($(#[$attr:meta])* $name:ident, $row:ident, $l2:literal) => {
        $(#[$attr])*
        pub unsafe fn $name(task: MultiTask) {
            let MultiTask { w, ws, x, t, nb, sc, n, out, stride } = task;
            for r in 0..n {
                let (wr, wsr) = (w.add(r * nb * BLOCK), ws.add(r * nb));
                let mut k = 0;
                while k < t {
                    let m = (t - k).min(MULTI);
                    let xs = x.add(k);
                    let put = |v: &[f32]| {
                        for (i, &y) in v.iter().enumerate() {
                            *out.add((k + i) * stride + r) = y;
                        }
                    };
                    match m {
                        4 => put(&$row::<4, $l2>(wr, wsr, xs, nb, sc)),
                        3 => put(&$row::<3, $l2>(wr, wsr, xs, nb, sc)),
                        2 => put(&$row::<2, $l2>(wr, wsr, xs, nb, sc)),
                        _ => put(&$row::<1, $l2>(wr, wsr, xs, nb, sc)),
                    }
                    k += m;
                }
            }
        }
    };
}

rows_multi_of!(
    /// [`row_n_avx512`] (L2 prefetch) over rows and activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    rows_multi_avx512_l2, row_n_avx512, true
);
rows_multi_of!(
    /// [`row_n_avx512`] (non-temporal prefetch) over rows and activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    rows_multi_avx512_nta, row_n_avx512, false
);
rows_multi_of!(
    /// [`row_n_avx2`] (L2 prefetch) over rows and activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    rows_multi_avx2_l2, row_n_avx2, true
);
rows_multi_of!(
    /// [`row_n_avx2`] (non-temporal prefetch) over rows and activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    rows_multi_avx2_nta, row_n_avx2, false
);
