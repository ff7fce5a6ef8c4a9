use super::{GroupTask, BLOCK, GROUP_MAX, MAGIC, PAIR, QMAX};
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
/// stop at 4 KiB pages. Which hint is best depends on the CPU ([`super::Prefetch`]).
const PREFETCH: usize = 8192;

/// Whether this is an Intel CPU ("GenuineIntel" in CPUID leaf 0), where the rows
/// prefetch into L2 by default ([`super::Prefetch`]).
pub(super) fn is_intel() -> bool {
    // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
    #[allow(unused_unsafe)]
    let r = unsafe { __cpuid(0) };
    (r.ebx, r.edx, r.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
}

/// One prefetch of the weight stream: into L2 (`L2`) or non-temporal ([`super::Prefetch`]).
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

/// The row's scale products `sc[b] = f32(ws[b]) · xd[b]`, eight at a time, and
/// `sc[nb] = 0` (the scale of an odd last block's partner).
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
    *sc.add(nb) = 0.0;
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

/// The 16 lanes of a 512-bit accumulator folded and summed in the module's order.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
unsafe fn lane_total_512(a: __m512) -> f32 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
    lane_total(_mm256_add_ps(_mm512_castps512_ps256(a), hi))
}

/// Two f32 at `p` broadcast as a pair to every even and odd lane (one load; no
/// shuffle on the vector ports).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pair_broadcast_512(p: *const f32) -> __m512 {
    _mm512_castpd_ps(_mm512_set1_pd(std::ptr::read_unaligned(p as *const f64)))
}

/// [`pair_broadcast_512`] in 256 bits.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pair_broadcast_256(p: *const f32) -> __m256 {
    _mm256_castpd_ps(_mm256_set1_pd(std::ptr::read_unaligned(p as *const f64)))
}

/// The 32 bytes at `p`, or zero for the partner of an odd last block.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_or_zero(p: *const i8, present: bool) -> __m256i {
    if present {
        _mm256_loadu_si256(p as *const __m256i)
    } else {
        _mm256_setzero_si256()
    }
}

/// A pair of weight blocks (`lo` at `p`, `hi` the next 32 bytes, or zero) as the
/// module's arithmetic reads them on AVX-512: words interleaved (`vpunpcklwd` gives
/// the words `16h + 2v .. +1` of each 128-bit half, `vpunpckhwd` the words
/// `16h + 8 + 2v .. +1`), sign-extended to int16.
#[target_feature(enable = "avx512f,avx512bw,avx2")]
#[inline]
unsafe fn pair_weights_avx512(p: *const i8, partner: bool) -> (__m512i, __m512i) {
    let (b, c) = (
        _mm256_loadu_si256(p as *const __m256i),
        block_or_zero(p.add(BLOCK), partner),
    );
    (
        _mm512_cvtepi8_epi16(_mm256_unpacklo_epi16(b, c)),
        _mm512_cvtepi8_epi16(_mm256_unpackhi_epi16(b, c)),
    )
}

/// `acc + f32(Σ) · s` for one pair of blocks against activations `x` (paired layout):
/// the exact lane sums are one `vpmaddwd` and one `vpdpwssd`.
///
/// `vpdpwssd` is written as assembly ([`crate::gemm16::dpwssd`]): LLVM splits
/// `vpdpwssd(vpmaddwd(..), ..)` into two `vpmaddwd` and an add, one more instruction per
/// pair and activation row.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
#[inline]
unsafe fn pair_fma_avx512(
    wa: __m512i,
    wb: __m512i,
    x: *const i16,
    s: __m512,
    acc: __m512,
) -> __m512 {
    let p = _mm512_madd_epi16(wa, _mm512_loadu_si512(x as *const _));
    let xb = _mm512_loadu_si512(x.add(BLOCK) as *const _);
    let p = crate::gemm16::dpwssd(p, wb, xb);
    _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc)
}

/// AVX-512 row: per pair of blocks one interleave and sign-extension per half, one
/// `vpmaddwd`, one `vpdpwssd`, one convert and one FMA; the two halves of the
/// accumulator are added once at the end.
///
/// Kept out of line: inlined into the loop over a task's rows, the same instructions
/// read the 8B bundle's weights markedly slower (docs/benchmarks-history.md: "Each
/// path loops over its task's rows itself").
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline(never)]
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
    for c in 0..nb.div_ceil(2) {
        // One prefetch per pair: a cache line of weights.
        prefetch::<L2>(w.wrapping_add(c * PAIR));
        let (wa, wb) = pair_weights_avx512(w.add(c * PAIR), 2 * c + 1 < nb);
        let s = pair_broadcast_512(sc.add(2 * c));
        acc = pair_fma_avx512(wa, wb, xq.add(c * PAIR), s, acc);
    }
    lane_total_512(acc)
}

/// A pair of weight blocks' half `h` (bytes `16h ..` of each) as the module's
/// arithmetic reads it on AVX2: the two 128-bit interleaves, sign-extended.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pair_half_weights_avx2(p: *const i8, h: usize, partner: bool) -> (__m256i, __m256i) {
    let b = _mm_loadu_si128(p.add(16 * h) as *const __m128i);
    let c = if partner {
        _mm_loadu_si128(p.add(BLOCK + 16 * h) as *const __m128i)
    } else {
        _mm_setzero_si128()
    };
    (
        _mm256_cvtepi8_epi16(_mm_unpacklo_epi16(b, c)),
        _mm256_cvtepi8_epi16(_mm_unpackhi_epi16(b, c)),
    )
}

/// Half `h` of [`pair_fma_avx512`] on AVX2 (lanes `8h .. 8h + 8`): two `vpmaddwd`
/// and an add form the exact lane sums.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pair_half_fma_avx2(
    (wa, wb): (__m256i, __m256i),
    x: *const i16,
    h: usize,
    s: __m256,
    acc: __m256,
) -> __m256 {
    let pa = _mm256_madd_epi16(wa, _mm256_loadu_si256(x.add(16 * h) as *const __m256i));
    let pb = _mm256_madd_epi16(
        wb,
        _mm256_loadu_si256(x.add(BLOCK + 16 * h) as *const __m256i),
    );
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(pa, pb)), s, acc)
}

/// AVX2 row: [`row_avx512`]'s pairs of blocks, each half of the lanes in its own
/// 256-bit accumulator. Out of line as [`row_avx512`].
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
    for c in 0..nb.div_ceil(2) {
        prefetch::<L2>(w.wrapping_add(c * PAIR));
        let (p, partner) = (w.add(c * PAIR), 2 * c + 1 < nb);
        let (x, s) = (xq.add(c * PAIR), pair_broadcast_256(sc.add(2 * c)));
        lo = pair_half_fma_avx2(pair_half_weights_avx2(p, 0, partner), x, 0, s, lo);
        hi = pair_half_fma_avx2(pair_half_weights_avx2(p, 1, partner), x, 1, s, hi);
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
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub rows_avx512_l2,
    row_avx512::<true>
);
rows_of!(
    /// [`row_avx512`] (non-temporal prefetch) over consecutive rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub rows_avx512_nta,
    row_avx512::<false>
);

/// The scale products of a group's rows against one weight row (the AVX2 loop's), in
/// the group's layout: `sc[(c · 8 + k) · 2 + j] = f32(ws[2c + j]) · xd[(c · 8 + k) · 2 + j]` for
/// the first `ceil(N / 4) · 4` rows `k` (a row past the group's multiplies zero scales
/// and is never read; an odd last block's partner has scale 0). `wsf` is scratch for
/// the row's scales in f32 (`nb + 1` floats).
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn group_scale_products<const N: usize>(
    ws: *const f16,
    xd: *const f32,
    nb: usize,
    wsf: *mut f32,
    sc: *mut f32,
) {
    weight_scales(ws, nb, wsf);
    for c in 0..nb.div_ceil(2) {
        let w2 = pair_broadcast_256(wsf.add(2 * c));
        for q in 0..N.div_ceil(4) {
            let o = (c * GROUP_MAX + 4 * q) * 2;
            _mm256_storeu_ps(sc.add(o), _mm256_mul_ps(w2, _mm256_loadu_ps(xd.add(o))));
        }
    }
}

/// The row's scales in f32, `sc[0..nb]`, and `sc[nb] = 0`.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn weight_scales(ws: *const f16, nb: usize, sc: *mut f32) {
    let full = nb / 8 * 8;
    let mut b = 0;
    while b < full {
        _mm256_storeu_ps(
            sc.add(b),
            _mm256_cvtph_ps(_mm_loadu_si128(ws.add(b) as *const __m128i)),
        );
        b += 8;
    }
    while b < nb {
        *sc.add(b) = (*ws.add(b)).to_f32();
        b += 1;
    }
    *sc.add(nb) = 0.0;
}

/// `R` consecutive weight rows against the `N` activation rows of a group (the decode
/// steps of `N` sequences): each pair of weight blocks is interleaved and
/// sign-extended once per weight row and each activation pair loaded once for the `R`
/// rows, feeding `R · N` independent chains, so neither the FMA latency of one chain
/// nor the loads bound the step. Each chain is [`row_avx512`]'s, operation for
/// operation, so each result has its bits.
///
/// Why two weight rows: with one, a group of eight activation rows spent about three
/// cycles per block and activation row where the arithmetic needs less than two (an
/// L2-resident sweep on the Intel Xeon host, 4096 columns).
///
/// Why each pair's scale products are multiplied here (one `vmulps` of two 64-bit
/// broadcasts per weight row and activation row) rather than stored beforehand, as
/// the AVX2 loop does: the stores and the extra pass cost more than the multiply
/// (8B-shaped decode steps, Intel Xeon host: 4 sequences 400–430 ms a step against
/// 455–515, 8 sequences 737–815 against 849–890, interleaved).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn rows_n_avx512<const R: usize, const N: usize, const L2: bool>(
    w: *const i8,
    ws: *const f16,
    x: *const i16,
    xd: *const f32,
    nb: usize,
    sc: *mut f32,
) -> [[f32; N]; R] {
    let pairs = nb.div_ceil(2);
    let per_row = nb + 1;
    for i in 0..R {
        weight_scales(ws.add(i * nb), nb, sc.add(i * per_row));
    }
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    // Full pairs in the loop; an odd last block after it, with its zero partner.
    for c in 0..nb / 2 {
        pairs_step::<R, N, L2>(w, nb, x, xd, sc, per_row, c, true, &mut acc);
    }
    if nb % 2 == 1 {
        pairs_step::<R, N, L2>(w, nb, x, xd, sc, per_row, pairs - 1, false, &mut acc);
    }
    let mut out = [[0f32; N]; R];
    for (oi, ai) in out.iter_mut().zip(&acc) {
        for (o, &a) in oi.iter_mut().zip(ai) {
            *o = lane_total_512(a);
        }
    }
    out
}

/// Pair `c` of [`rows_n_avx512`]'s rows against its group, into `acc`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn pairs_step<const R: usize, const N: usize, const L2: bool>(
    w: *const i8,
    nb: usize,
    x: *const i16,
    xd: *const f32,
    sc: *const f32,
    per_row: usize,
    c: usize,
    partner: bool,
    acc: &mut [[__m512; N]; R],
) {
    let o = c * PAIR;
    for i in 0..R {
        prefetch::<L2>(w.wrapping_add(i * nb * BLOCK + o));
    }
    // A loop, not `array::from_fn`: a closure does not take the target features, so
    // the call would stay a call.
    let mut wv = [(_mm512_setzero_si512(), _mm512_setzero_si512()); R];
    for (i, v) in wv.iter_mut().enumerate() {
        *v = pair_weights_avx512(w.add(i * nb * BLOCK + o), partner);
    }
    for k in 0..N {
        let xk = x.add((c * N + k) * PAIR);
        for (i, a) in acc.iter_mut().enumerate() {
            let s = _mm512_mul_ps(
                pair_broadcast_512(sc.add(i * per_row + 2 * c)),
                pair_broadcast_512(xd.add((c * GROUP_MAX + k) * 2)),
            );
            a[k] = pair_fma_avx512(wv[i].0, wv[i].1, xk, s, a[k]);
        }
    }
}

/// [`rows_n_avx512`] for AVX2, one weight row at a time (sixteen registers hold
/// [`row_avx2`]'s two half-lane chains for four activation rows).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_n_avx2<const N: usize, const L2: bool>(
    w: *const i8,
    ws: *const f16,
    x: *const i16,
    xd: *const f32,
    nb: usize,
    sc: *mut f32,
) -> [f32; N] {
    let pairs = nb.div_ceil(2);
    group_scale_products::<N>(ws, xd, nb, sc.add(pairs * GROUP_MAX * 2), sc);
    let mut lo = [_mm256_setzero_ps(); N];
    let mut hi = [_mm256_setzero_ps(); N];
    for c in 0..pairs {
        prefetch::<L2>(w.wrapping_add(c * PAIR));
        let (p, partner) = (w.add(c * PAIR), 2 * c + 1 < nb);
        let w0 = pair_half_weights_avx2(p, 0, partner);
        let w1 = pair_half_weights_avx2(p, 1, partner);
        for k in 0..N {
            let xk = x.add((c * N + k) * PAIR);
            let s = pair_broadcast_256(sc.add((c * GROUP_MAX + k) * 2));
            lo[k] = pair_half_fma_avx2(w0, xk, 0, s, lo[k]);
            hi[k] = pair_half_fma_avx2(w1, xk, 1, s, hi[k]);
        }
    }
    let mut out = [0f32; N];
    for (k, o) in out.iter_mut().enumerate() {
        *o = lane_total(_mm256_add_ps(lo[k], hi[k]));
    }
    out
}

/// Writes `v[i][k]` to output `(k, r + i)` of `task`.
#[inline(always)]
unsafe fn put<const R: usize, const N: usize>(task: &GroupTask, r: usize, v: [[f32; N]; R]) {
    for (i, vi) in v.iter().enumerate() {
        for (k, &y) in vi.iter().enumerate() {
            *task.out.add(k * task.stride + r + i) = y;
        }
    }
}

/// Defines a [`super::GroupFn`] named `$name`: the AVX-512 rows two at a time (an odd
/// last row alone) against the group's `N` activation rows.
macro_rules! groups_avx512 {
    ($(#[$attr:meta])* $name:ident, $l2:literal) => {
        $(#[$attr])*
        pub unsafe fn $name(task: GroupTask) {
            $(#[$attr])*
            unsafe fn rows<const N: usize>(task: &GroupTask) {
                let GroupTask { w, ws, x, xd, nb, sc, n, .. } = *task;
                let mut r = 0;
                while r + 2 <= n {
                    let (wr, wsr) = (w.add(r * nb * BLOCK), ws.add(r * nb));
                    put(task, r, rows_n_avx512::<2, N, $l2>(wr, wsr, x, xd, nb, sc));
                    r += 2;
                }
                if r < n {
                    let (wr, wsr) = (w.add(r * nb * BLOCK), ws.add(r * nb));
                    put(task, r, rows_n_avx512::<1, N, $l2>(wr, wsr, x, xd, nb, sc));
                }
            }
            match task.t {
                8 => rows::<8>(&task),
                7 => rows::<7>(&task),
                6 => rows::<6>(&task),
                5 => rows::<5>(&task),
                4 => rows::<4>(&task),
                3 => rows::<3>(&task),
                2 => rows::<2>(&task),
                1 => rows::<1>(&task),
                t => unreachable!("a group of {t} activation rows"),
            }
        }
    };
}

groups_avx512!(
    /// [`rows_n_avx512`] (L2 prefetch) over a task's rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    groups_avx512_l2, true
);
groups_avx512!(
    /// [`rows_n_avx512`] (non-temporal prefetch) over a task's rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    groups_avx512_nta, false
);

/// Defines a [`super::GroupFn`] named `$name`: the AVX2 rows one at a time against the
/// group's `N ≤ 4` activation rows.
macro_rules! groups_avx2 {
    ($(#[$attr:meta])* $name:ident, $l2:literal) => {
        $(#[$attr])*
        pub unsafe fn $name(task: GroupTask) {
            $(#[$attr])*
            unsafe fn rows<const N: usize>(task: &GroupTask) {
                let GroupTask { w, ws, x, xd, nb, sc, n, .. } = *task;
                for r in 0..n {
                    let (wr, wsr) = (w.add(r * nb * BLOCK), ws.add(r * nb));
                    put(task, r, [rows_n_avx2::<N, $l2>(wr, wsr, x, xd, nb, sc)]);
                }
            }
            match task.t {
                4 => rows::<4>(&task),
                3 => rows::<3>(&task),
                2 => rows::<2>(&task),
                1 => rows::<1>(&task),
                t => unreachable!("a group of {t} activation rows"),
            }
        }
    };
}

groups_avx2!(
    /// [`rows_n_avx2`] (L2 prefetch) over a task's rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    groups_avx2_l2, true
);
groups_avx2!(
    /// [`rows_n_avx2`] (non-temporal prefetch) over a task's rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    groups_avx2_nta, false
);
