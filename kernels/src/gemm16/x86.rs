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
/// `vpdpwssd` ([`dpwssd`]) with the activation pair broadcast from memory; per block, each
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
                    *v = dpwssd(*v, av, bv[u]);
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

/// `acc + Σ pairs(a · b)` per 32-bit lane: one `vpdpwssd`, written as assembly
/// because LLVM splits `_mm512_dpwssd_epi32` into `vpmaddwd` + `vpaddd`, which doubled
/// the tile's arithmetic instructions (docs/benchmarks-history.md: "Prefill issues
/// vpdpwssd"); the decode kernel's pairs use it too.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
pub(crate) unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: vpdpwssd reads and writes registers only; the function requires
    // AVX-512 VNNI.
    std::arch::asm!(
        "vpdpwssd {acc}, {a}, {b}",
        acc = inout(zmm_reg) acc,
        a = in(zmm_reg) a,
        b = in(zmm_reg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
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
