use super::{ActRows, WeightRows, BLOCK};
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
pub unsafe fn tile_avx2<const R: usize, const C: usize>(
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
/// i32. The tests run it (every tile size against the portable dot product, bit for
/// bit, and through `matmul_on`) on every CPU whose [`crate::path::available_paths`]
/// include `Avx512Vnni` (AVX-512 F, VL, BW and VNNI); on other CPUs it is compiled
/// but never called.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
pub unsafe fn tile_vnni<const R: usize, const C: usize>(
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
