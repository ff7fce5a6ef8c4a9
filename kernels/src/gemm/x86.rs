use super::{MR, NR};
use half::f16;
use std::arch::x86_64::*;

/// Asks for the first and last cache line of each of `rows` C-tile rows (`bytes`
/// long, `ldc` floats apart). The C tile is usually out of cache (a product's
/// output outgrows L2): asked for now, its lines arrive while the tile computes
/// instead of stalling the stores at the end (measured on the 8B vision fc1:
/// docs/benchmarks-history.md, "The f32 GEMM's register tile prefetches its C tile").
#[inline(always)]
pub(crate) fn prefetch_tile(c: *const f32, ldc: usize, rows: usize, bytes: usize) {
    for i in 0..rows {
        let p = c.wrapping_add(i * ldc) as *const i8;
        // SAFETY: a prefetch reads nothing and never faults.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(bytes - 1));
        }
    }
}

/// The 6 × 16 AVX2/FMA register tile: 12 accumulators, two B loads and six A
/// broadcasts (from the packed panel) per `kk`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn micro_avx2(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    prefetch_tile(c, ldc, MR, 4 * NR);
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let (mut ap, mut bp) = (a, b);
    for _ in 0..kc {
        let b0 = _mm256_loadu_ps(bp);
        let b1 = _mm256_loadu_ps(bp.add(8));
        for (i, r) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*ap.add(i));
            r[0] = _mm256_fmadd_ps(av, b0, r[0]);
            r[1] = _mm256_fmadd_ps(av, b1, r[1]);
        }
        ap = ap.add(MR);
        bp = bp.add(NR);
    }
    for (i, r) in acc.iter().enumerate() {
        let p = c.add(i * ldc);
        if first {
            _mm256_storeu_ps(p, r[0]);
            _mm256_storeu_ps(p.add(8), r[1]);
        } else {
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), r[0]));
            _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), r[1]));
        }
    }
}

/// The 6 × 32 AVX-512 register tile over two adjacent `NR`-column panels (the
/// second `kc · NR` floats after the first, as every `B` tile is laid out): 12
/// accumulators of 16 lanes, two B loads and six A broadcasts per `kk`. Each
/// lane's chain is the AVX2 tile's, so the two give the same bits; it issues half
/// the instructions of two AVX2 tiles (see the module docs for when that is faster).
#[target_feature(enable = "avx512f")]
pub unsafe fn micro_avx512_pair(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    prefetch_tile(c, ldc, MR, 8 * NR);
    let b1 = b.add(kc * NR);
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let mut ap = a;
    for kk in 0..kc {
        let v0 = _mm512_loadu_ps(b.add(kk * NR));
        let v1 = _mm512_loadu_ps(b1.add(kk * NR));
        for (i, r) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ap.add(i));
            r[0] = _mm512_fmadd_ps(av, v0, r[0]);
            r[1] = _mm512_fmadd_ps(av, v1, r[1]);
        }
        ap = ap.add(MR);
    }
    for (i, r) in acc.iter().enumerate() {
        for (u, v) in r.iter().enumerate() {
            let p = c.add(i * ldc + u * NR);
            if first {
                _mm512_storeu_ps(p, *v);
            } else {
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *v));
            }
        }
    }
}

/// The 6 × 16 AVX-512 register tile over one panel: six accumulators of 16 lanes,
/// one B load and six A broadcasts per `kk`. Each lane's chain is the AVX2 tile's,
/// so the two give the same bits; it issues half the FMAs. It runs where the pair
/// tile cannot: a lone last panel, the rows past a product's last full tile, and
/// attention's products whose 72 columns end in half a panel (3% of the samples
/// of an 8B image prompt ran the AVX2 tile there).
#[target_feature(enable = "avx512f")]
pub unsafe fn micro_avx512_one(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    prefetch_tile(c, ldc, MR, 4 * NR);
    let mut acc = [_mm512_setzero_ps(); MR];
    let mut ap = a;
    for kk in 0..kc {
        let v = _mm512_loadu_ps(b.add(kk * NR));
        for (i, r) in acc.iter_mut().enumerate() {
            *r = _mm512_fmadd_ps(_mm512_set1_ps(*ap.add(i)), v, *r);
        }
        ap = ap.add(MR);
    }
    for (i, r) in acc.iter().enumerate() {
        let p = c.add(i * ldc);
        if first {
            _mm512_storeu_ps(p, *r);
        } else {
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *r));
        }
    }
}

/// Transposes an 8 × 8 block of f32 rows in registers.
#[inline(always)]
pub(crate) unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// Packs one full `NR`-column panel into `dst[kk·NR + jj]` for `kk < kc`:
/// `eight(jj, kk)` reads `B[jj, kk..kk + 8]` of the panel as f32, `one(jj, kk)`
/// one value (for the last `kc % 8`); 8 × 8 blocks are transposed in registers.
/// Inlined into its callers, whose target features the closures share.
#[inline(always)]
unsafe fn pack_panel(
    kc: usize,
    dst: *mut f32,
    eight: impl Fn(usize, usize) -> __m256,
    one: impl Fn(usize, usize) -> f32,
) {
    let full = kc / 8 * 8;
    let mut kk = 0;
    while kk < full {
        for half in 0..NR / 8 {
            let rows: [__m256; 8] = std::array::from_fn(|i| eight(half * 8 + i, kk));
            let cols = transpose8(rows);
            for (q, v) in cols.iter().enumerate() {
                _mm256_storeu_ps(dst.add((kk + q) * NR + half * 8), *v);
            }
        }
        kk += 8;
    }
    for kk in full..kc {
        for jj in 0..NR {
            *dst.add(kk * NR + jj) = one(jj, kk);
        }
    }
}

/// Packs one full `MR`-row panel of `A` (`rows[i]` holds `A[i, k0..k0 + kc]`)
/// into `dst[kk·MR + i]`: eight values of each row at a time, transposed in
/// registers (two rows of zeros fill the 8 × 8 block). Each column's eight
/// lanes are stored whole, its two extra lanes overwritten by the next column's
/// store, except the block's last column, stored as 4 + 2 lanes so nothing past
/// it is touched (a masked store would do it in one, but `vmaskmovps` to memory
/// is microcoded on AMD: the packing took 2.4% of a vision encode with it).
#[target_feature(enable = "avx2")]
pub unsafe fn pack_a_panel(rows: [&[f32]; MR], kc: usize, dst: *mut f32) {
    const { assert!(MR == 6) };
    let full = kc / 8 * 8;
    let mut kk = 0;
    while kk < full {
        let r: [__m256; 8] = std::array::from_fn(|i| {
            if i < MR {
                _mm256_loadu_ps(rows[i].as_ptr().add(kk))
            } else {
                _mm256_setzero_ps()
            }
        });
        let cols = transpose8(r);
        for (q, v) in cols[..7].iter().enumerate() {
            _mm256_storeu_ps(dst.add((kk + q) * MR), *v);
        }
        let last = dst.add((kk + 7) * MR);
        _mm_storeu_ps(last, _mm256_castps256_ps128(cols[7]));
        _mm_storel_epi64(
            last.add(4) as *mut __m128i,
            _mm_castps_si128(_mm256_extractf128_ps::<1>(cols[7])),
        );
        kk += 8;
    }
    for kk in full..kc {
        for (i, row) in rows.iter().enumerate() {
            *dst.add(kk * MR + i) = row[kk];
        }
    }
}

/// Packs one full `NR`-column panel of f16 rows (`w` at the panel's first row
/// and reduction index, row stride `k`), widening with F16C.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn pack_f16_panel(w: *const f16, k: usize, kc: usize, dst: *mut f32) {
    pack_panel(
        kc,
        dst,
        |jj, kk| _mm256_cvtph_ps(_mm_loadu_si128(w.add(jj * k + kk) as *const __m128i)),
        |jj, kk| (*w.add(jj * k + kk)).to_f32(),
    )
}

/// Packs one full `NR`-column panel of f32 rows (`w` at the panel's first row
/// and reduction index, row stride `rs`).
#[target_feature(enable = "avx2")]
pub unsafe fn pack_f32_panel(w: *const f32, rs: usize, kc: usize, dst: *mut f32) {
    pack_panel(
        kc,
        dst,
        |jj, kk| _mm256_loadu_ps(w.add(jj * rs + kk)),
        |jj, kk| *w.add(jj * rs + kk),
    )
}

/// Packs one full `NR`-column panel of int8 rows (`q` at the panel's first row
/// and reduction index, row stride `k`; `s` its block scales, row stride
/// `k / 32`), dequantizing `f32(q) · f32(s)` (exact) and transposing 8 × 8
/// blocks in registers. `kc` is a multiple of 32. The eight rows' scales of a
/// block are widened together, once per block, and multiply the transposed
/// vectors (one vector of scales, not a broadcast per row).
#[cfg(feature = "q8")]
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn pack_q8_panel(q: *const i8, s: *const f16, k: usize, kc: usize, dst: *mut f32) {
    let nb = k / 32;
    let mut kb = 0;
    while kb < kc {
        for half in 0..NR / 8 {
            let r0 = half * 8;
            let raw: [u16; 8] =
                std::array::from_fn(|i| (*s.add((r0 + i) * nb + kb / 32)).to_bits());
            // Lane i: the scale of row r0 + i, which after the transpose is the
            // scale of every lane of every output vector of this block.
            let sc = _mm256_cvtph_ps(_mm_loadu_si128(raw.as_ptr() as *const __m128i));
            for kk in (kb..kb + 32).step_by(8) {
                let rows: [__m256; 8] = std::array::from_fn(|i| {
                    let v = _mm_loadl_epi64(q.add((r0 + i) * k + kk) as *const __m128i);
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
                });
                let cols = transpose8(rows);
                for (c, v) in cols.iter().enumerate() {
                    _mm256_storeu_ps(dst.add((kk + c) * NR + r0), _mm256_mul_ps(*v, sc));
                }
            }
        }
        kb += 32;
    }
}
