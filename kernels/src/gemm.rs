//! f32 matrix products for the vision tower (and prefill attention): a packed,
//! cache-blocked GEMM with a 6 × 16 AVX2/FMA register kernel, or a 6 × 32 AVX-512
//! one over two adjacent panels where the CPU has it (the same chains, so the same
//! bits; on a 2-core Xeon host the 8B vision linears ran at 215–218 GFLOP/s on the
//! AVX2 tile and 263–347 on the AVX-512 one). The "weight" operand
//! can be f16 (the vision tower's tensors), widened to f32 once per cache tile while
//! it is packed, so no f32 copy of a tensor is ever made.
//!
//! Blocking (per task of up to 256 output columns): for each [`KC`]-long slice of
//! the reduction the weight tile (`columns × KC`) is packed and stays in L2; `MC`
//! rows of activations at a time stay in L2 and are read in place; each register
//! tile (`MR × NR`) sums its slice in registers and adds it to the output.
//!
//! Determinism: an output element is always the same chain, `((0 + s₀) + s₁) + …`
//! over the `KC` slices in order, each slice a sequential fused multiply-add chain
//! over its `k`; how columns are split into tasks (which depends on the thread
//! count) never changes that chain.

use super::OutPtr;
use half::f16;
use rayon::prelude::*;

/// Rows of the register tile.
pub const MR: usize = 6;
/// Columns of the register tile.
pub const NR: usize = 16;
/// Reduction slice per packing pass.
pub const KC: usize = 256;
/// Rows of activations per L2 block.
const MC: usize = 16 * MR;
/// Columns of `B` packed at a time by the serial entries and [`PackedB`] (a
/// multiple of [`NR`]); also the narrowest parallel task.
pub const NC: usize = 64;
/// The widest parallel task of [`linear_f16`], in output columns: its `B` tile
/// (`MAX_TASK_COLS × KC` f32, 256 KiB) stays in L2.
const MAX_TASK_COLS: usize = 256;

/// The "weight" operand `B`, read as `B[j, kk]` for output column `j` and reduction
/// index `kk`.
#[derive(Clone, Copy)]
pub enum BSrc<'a> {
    /// f16, `B[j, kk] = w[j·k + kk]` (a PyTorch `Linear` weight `[n, k]`).
    F16(&'a [f16]),
    /// int8 per-block-32 (`docs/quantization.md`), dequantized exactly while packing:
    /// `B[j, kk] = f32(q[j·k + kk]) · f32(s[j·k/32 + kk/32])` (8 × 11 significant
    /// bits, so the f32 product is exact).
    Q8 {
        /// `[n, k]` values.
        q: &'a [i8],
        /// `[n, k/32]` block scales.
        s: &'a [f16],
    },
    /// f32 with strides: `B[j, kk] = data[j·rs + kk·cs]`.
    F32 {
        /// The values.
        data: &'a [f32],
        /// Stride between output columns.
        rs: usize,
        /// Stride along the reduction.
        cs: usize,
    },
}

/// Where [`PackedA`] reads `A[i, kk]`.
#[derive(Clone, Copy)]
enum ASrc<'a> {
    /// Row-major: `data[i·lda + kk]`.
    Rows { data: &'a [f32], lda: usize },
    /// Transposed: `data[kk·ld + i]`.
    Cols { data: &'a [f32], ld: usize },
}

/// The activation operand `A[i, kk] = data[i·lda + kk]`, packed in the order the
/// register tile reads it (once per product, or once for many products through
/// [`gemm_serial_packed_a`]): for each [`KC`] slice, panels of [`MR`] rows
/// stored `[kk][MR]` (rows past `m` are zero). The tile then reads one contiguous
/// stream instead of `MR` strided rows, which keeps it near the FMA peak when the
/// rows come from L2 (measured: 53 → 80+ GFLOP/s on one core for the 8B vision
/// linears).
pub struct PackedA {
    data: Vec<f32>,
    m: usize,
    /// `m` rounded up to [`MR`].
    mp: usize,
    k: usize,
}

impl PackedA {
    /// Packs `m × k` rows of stride `lda` on the calling thread.
    pub fn new(data: &[f32], m: usize, k: usize, lda: usize) -> PackedA {
        assert!(lda >= k && (m == 0 || data.len() >= (m - 1) * lda + k));
        PackedA::pack(ASrc::Rows { data, lda }, m, k, false)
    }

    /// Packs the `m × k` operand stored transposed, `A[i, kk] = data[kk·ld + i]`,
    /// on the calling thread (attention's V, whose rows are keys, is `A = vᵀ` of the
    /// output product: packed straight from the projection's output, no copy).
    pub fn from_transposed(data: &[f32], m: usize, k: usize, ld: usize) -> PackedA {
        assert!(ld >= m && (k == 0 || data.len() >= (k - 1) * ld + m));
        PackedA::pack(ASrc::Cols { data, ld }, m, k, false)
    }

    /// Packs `a` (`m × k`, bounds checked by the callers); in parallel over row
    /// panels when `parallel` (on the current rayon pool).
    fn pack(a: ASrc<'_>, m: usize, k: usize, parallel: bool) -> PackedA {
        let mp = m.div_ceil(MR) * MR;
        // Not zeroed first: the panels below write every element, the padding rows'
        // zeros included (a memset of the whole buffer cost about 1% of a vision encode).
        let mut out: Vec<f32> = Vec::with_capacity(mp * k);
        // One task per row panel: it writes that panel's part of every KC slice.
        let fill = |pi: usize, out: OutPtr| {
            let rows = MR.min(m - pi * MR);
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                // SAFETY: the panel's kc·MR elements start at k0·mp + pi·kc·MR and end
                // at or before k0·mp + (pi + 1)·kc·MR ≤ mp·k (the capacity); only the
                // task of panel pi writes them.
                let dst = unsafe { out.get().add(k0 * mp + pi * kc * MR) };
                match a {
                    ASrc::Rows { data, lda } => {
                        let row = |i: usize| &data[(pi * MR + i) * lda + k0..][..kc];
                        #[cfg(target_arch = "x86_64")]
                        if rows == MR && avx2() {
                            // SAFETY: each row holds kc values, dst kc·MR; the
                            // features were detected.
                            unsafe { x86::pack_a_panel(std::array::from_fn(row), kc, dst) };
                            k0 += kc;
                            continue;
                        }
                        for i in 0..rows {
                            for (kk, &v) in row(i).iter().enumerate() {
                                // SAFETY: inside the panel (see above).
                                unsafe { *dst.add(kk * MR + i) = v };
                            }
                        }
                        for i in rows..MR {
                            for kk in 0..kc {
                                // SAFETY: inside the panel (see above).
                                unsafe { *dst.add(kk * MR + i) = 0.0 };
                            }
                        }
                    }
                    ASrc::Cols { data, ld } => {
                        for kk in 0..kc {
                            let col = &data[(k0 + kk) * ld + pi * MR..][..rows];
                            for i in 0..MR {
                                let v = col.get(i).copied().unwrap_or(0.0);
                                // SAFETY: inside the panel (see above).
                                unsafe { *dst.add(kk * MR + i) = v };
                            }
                        }
                    }
                }
                k0 += kc;
            }
        };
        let optr = OutPtr(out.as_mut_ptr());
        if parallel {
            (0..mp / MR).into_par_iter().for_each(|pi| fill(pi, optr));
        } else {
            (0..mp / MR).for_each(|pi| fill(pi, optr));
        }
        // SAFETY: every one of the mp·k elements was written above: each panel pi
        // writes rows pi·MR..(pi + 1)·MR (values or padding zeros) of every slice.
        unsafe { out.set_len(mp * k) };
        PackedA {
            data: out,
            m,
            mp,
            k,
        }
    }

    /// The panel of rows `ir..ir + MR` in the slice at `k0` (`kc` long).
    fn panel(&self, k0: usize, kc: usize, ir: usize) -> *const f32 {
        self.data[k0 * self.mp + ir * kc..].as_ptr()
    }
}

/// One register tile: `c[i·ldc + j] (=|+=) Σ_kk a[kk·MR + i] · b[kk·NR + j]` for
/// `i < MR`, `j < NR`, `kk` in order; stores when `first`, else adds.
///
/// # Safety
/// `a` holds `kc·MR` floats, `b` holds `kc·NR`, `c` addresses an `MR × NR` tile with
/// row stride `ldc`, and the function's target features are present.
type MicroFn =
    unsafe fn(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, first: bool);

/// Portable register tile (unfused multiply-add; the SIMD path fuses, so the two
/// agree to rounding, not bit for bit).
unsafe fn micro_portable(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    for kk in 0..kc {
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: see `MicroFn`.
            let av = unsafe { *a.add(kk * MR + i) };
            for (j, v) in row.iter_mut().enumerate() {
                *v += av * unsafe { *b.add(kk * NR + j) };
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            // SAFETY: see `MicroFn`.
            let p = unsafe { c.add(i * ldc + j) };
            unsafe { *p = if first { *v } else { *p + *v } };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use half::f16;
    use std::arch::x86_64::*;

    /// Asks for the first and last cache line of each of `rows` C-tile rows (`bytes`
    /// long, `ldc` floats apart). The C tile is usually out of cache (a product's
    /// output outgrows L2): asked for now, its lines arrive while the tile computes
    /// instead of stalling the stores at the end (measured on the 8B vision fc1, one
    /// core, interleaved runs: 56 → 75 GFLOP/s).
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
    /// lane's chain is the AVX2 tile's, so the two give the same bits; twice the
    /// lanes per instruction doubles the FMA rate where 512-bit FMAs issue at the
    /// 256-bit rate.
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

    /// Widens `n` f16 values (exact), eight at a time with F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen_f16c(src: *const f16, dst: *mut f32, n: usize) {
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.add(i) as *const __m128i);
            _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        while i < n {
            *dst.add(i) = (*src.add(i)).to_f32();
            i += 1;
        }
    }
}

/// The C-tile prefetch and the 8 × 8 register transpose, shared with the int16 GEMM.
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{prefetch_tile, transpose8};

/// The register tile of the running path (chosen once, in [`crate::path`]).
fn micro() -> MicroFn {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        return x86::micro_avx2;
    }
    micro_portable
}

/// The register tile over two adjacent full panels (`MR` × 2[`NR`]), where this
/// CPU's path has one (AVX-512).
fn micro_pair() -> Option<MicroFn> {
    #[cfg(target_arch = "x86_64")]
    if crate::path::best_path() == crate::path::Path::Avx512Vnni {
        return Some(x86::micro_avx512_pair);
    }
    None
}

#[cfg(target_arch = "x86_64")]
use crate::path::avx2;

/// Widens f16 to f32 (exact) on the fastest path of this CPU.
pub fn widen_f16(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: lengths are equal; the features were detected.
        unsafe { x86::widen_f16c(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
        return;
    }
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// Packs `B[j, k0..k0+kc]` for `j` in `j0..j1` into `NR`-column panels
/// `[panel][kk][NR]`, zero-padding the last panel.
#[allow(clippy::too_many_arguments)]
fn pack_b(
    b: BSrc<'_>,
    k: usize,
    j0: usize,
    j1: usize,
    k0: usize,
    kc: usize,
    out: &mut [f32],
    row: &mut [f32],
) {
    let panels = (j1 - j0).div_ceil(NR);
    for p in 0..panels {
        let dst = &mut out[p * kc * NR..(p + 1) * kc * NR];
        let jp = j0 + p * NR;
        #[cfg(target_arch = "x86_64")]
        if jp + NR <= j1 && avx2() {
            match b {
                BSrc::F16(w) => {
                    // SAFETY: rows jp..jp+NR of w hold k values each (w is n × k
                    // with n ≥ j1), k0 + kc ≤ k, dst holds kc·NR; the features were
                    // detected.
                    unsafe {
                        x86::pack_f16_panel(w.as_ptr().add(jp * k + k0), k, kc, dst.as_mut_ptr())
                    };
                    continue;
                }
                BSrc::F32 { data, rs, cs: 1 } => {
                    // SAFETY: rows jp..jp+NR hold B[j, k0..k0+kc] at data[j·rs + k0..]
                    // (B has n ≥ j1 columns of k ≥ k0 + kc values); dst holds kc·NR;
                    // the features were detected.
                    unsafe {
                        x86::pack_f32_panel(
                            data.as_ptr().add(jp * rs + k0),
                            rs,
                            kc,
                            dst.as_mut_ptr(),
                        )
                    };
                    continue;
                }
                BSrc::Q8 { q, s } if k0.is_multiple_of(32) && kc.is_multiple_of(32) => {
                    // SAFETY: as above for the n × k values and n × k/32 scales;
                    // the slice starts and ends on block boundaries.
                    unsafe {
                        x86::pack_q8_panel(
                            q.as_ptr().add(jp * k + k0),
                            s.as_ptr().add(jp * (k / 32) + k0 / 32),
                            k,
                            kc,
                            dst.as_mut_ptr(),
                        )
                    };
                    continue;
                }
                _ => {}
            }
        }
        for jj in 0..NR {
            let j = jp + jj;
            if j >= j1 {
                for kk in 0..kc {
                    dst[kk * NR + jj] = 0.0;
                }
                continue;
            }
            match b {
                BSrc::F16(w) => {
                    widen_f16(&w[j * k + k0..j * k + k0 + kc], &mut row[..kc]);
                    for (kk, &v) in row[..kc].iter().enumerate() {
                        dst[kk * NR + jj] = v;
                    }
                }
                BSrc::F32 { data, rs, cs } => {
                    for kk in 0..kc {
                        dst[kk * NR + jj] = data[j * rs + (k0 + kk) * cs];
                    }
                }
                BSrc::Q8 { q, s } => {
                    let nb = k / 32;
                    for kk in 0..kc {
                        let c = k0 + kk;
                        dst[kk * NR + jj] = q[j * k + c] as f32 * s[j * nb + c / 32].to_f32();
                    }
                }
            }
        }
    }
}

/// A `B` operand packed once in full, in the order the GEMM walks it: column
/// chunks of [`NC`] (each padded to [`NR`]), then `KC` slices, then `NR`-column
/// panels `[kk][NR]`. For operands reused by many products (attention's K and V).
pub struct PackedB {
    data: Vec<f32>,
    n: usize,
    k: usize,
}

impl PackedB {
    /// Packs `b` (`n` columns, reduction length `k`).
    pub fn new(b: BSrc<'_>, n: usize, k: usize) -> PackedB {
        let np = n.div_ceil(NR) * NR;
        let mut data = vec![0f32; np * k];
        let mut row = vec![0f32; KC];
        let mut n0 = 0;
        while n0 < n {
            let n1 = (n0 + NC).min(n);
            let wp = (n1 - n0).div_ceil(NR) * NR;
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                let off = n0 * k + wp * k0;
                pack_b(
                    b,
                    k,
                    n0,
                    n1,
                    k0,
                    kc,
                    &mut data[off..off + wp * kc],
                    &mut row,
                );
                k0 += kc;
            }
            n0 = n1;
        }
        PackedB { data, n, k }
    }

    /// The packed tile of columns `n0..` (a chunk start) and the slice at `k0`.
    fn tile(&self, n0: usize, n1: usize, k0: usize) -> &[f32] {
        let wp = (n1 - n0).div_ceil(NR) * NR;
        &self.data[n0 * self.k + wp * k0..]
    }
}

/// Where [`gemm_cols`] gets its `B` tiles.
#[derive(Clone, Copy)]
enum BOp<'a> {
    /// Packed tile by tile from the source (weights: no full copy).
    Src(BSrc<'a>),
    /// Already packed.
    Packed(&'a PackedB),
}

/// `C[i, j] = Σ_kk A[i, kk] · B[j, kk]` for all rows and the columns `j0..j1`, on
/// the calling thread, `chunk` columns of `B` packed at a time (a multiple of [`NR`];
/// [`NC`] for a [`PackedB`]). `c` points at `C[0, 0]` with row stride `ldc`. With
/// a `bias` (indexed by column), `C[i, j] + bias[j]` is stored instead, added to each
/// tile after its last slice while the tile is still in cache: the same two roundings
/// as a separate pass over `C`, without the pass.
///
/// # Safety
/// `c` addresses `a.m` rows of `ldc` floats with `j1 ≤ ldc`, no other thread
/// touches columns `j0..j1` meanwhile, and a bias holds at least `j1` values.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_cols(
    a: &PackedA,
    b: BOp<'_>,
    j0: usize,
    j1: usize,
    chunk: usize,
    c: *mut f32,
    ldc: usize,
    bias: Option<&[f32]>,
) {
    let (m, k) = (a.m, a.k);
    let (kern, kern_pair) = (micro(), micro_pair());
    // The B tile buffer is kept per thread: a fresh one per call (up to 256 KiB)
    // costs a memset and page faults every time.
    let mut bp = B_TILE.take();
    if matches!(b, BOp::Src(_)) && bp.len() < chunk * KC {
        bp.resize(chunk * KC, 0.0);
    }
    let mut row = vec![0f32; KC];
    let mut tile = [0f32; MR * NR];
    let mut n0 = j0;
    while n0 < j1 {
        let n1 = (n0 + chunk).min(j1);
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let first = k0 == 0;
            let bias = bias.filter(|_| k0 + kc == k);
            let bt: &[f32] = match b {
                BOp::Src(src) => {
                    pack_b(src, k, n0, n1, k0, kc, &mut bp, &mut row);
                    &bp
                }
                BOp::Packed(pb) => pb.tile(n0, n1, k0),
            };
            let mut ic = 0;
            while ic < m {
                let mc = MC.min(m - ic);
                let panels = (n1 - n0).div_ceil(NR);
                let mut p = 0;
                while p < panels {
                    let jc = n0 + p * NR;
                    // Two full panels at once where the path has a tile for them.
                    let pair = kern_pair.filter(|_| jc + 2 * NR <= n1);
                    let span = if pair.is_some() { 2 } else { 1 };
                    let cols = (span * NR).min(n1 - jc);
                    let bptr = bt[p * kc * NR..(p + span) * kc * NR].as_ptr();
                    let mut ir = ic;
                    while ir < ic + mc {
                        let rows = MR.min(m - ir);
                        let aptr = a.panel(k0, kc, ir);
                        // SAFETY: the A panel holds kc·MR floats, the B panels span·kc·NR;
                        // the tile is inside C (or is the local buffer).
                        unsafe {
                            match pair {
                                Some(kp) if rows == MR => {
                                    kp(kc, aptr, bptr, c.add(ir * ldc + jc), ldc, first)
                                }
                                None if rows == MR && cols == NR => {
                                    kern(kc, aptr, bptr, c.add(ir * ldc + jc), ldc, first)
                                }
                                _ => {
                                    for u in 0..span {
                                        let bu = bptr.add(u * kc * NR);
                                        kern(kc, aptr, bu, tile.as_mut_ptr(), NR, true);
                                        for i in 0..rows {
                                            for j in 0..NR.min(cols - u * NR) {
                                                let p = c.add((ir + i) * ldc + jc + u * NR + j);
                                                let v = tile[i * NR + j];
                                                *p = if first { v } else { *p + v };
                                            }
                                        }
                                    }
                                }
                            }
                            if let Some(bv) = bias {
                                let bv = &bv[jc..jc + cols];
                                for i in 0..rows {
                                    let row = std::slice::from_raw_parts_mut(
                                        c.add((ir + i) * ldc + jc),
                                        cols,
                                    );
                                    for (o, b) in row.iter_mut().zip(bv) {
                                        *o += b;
                                    }
                                }
                            }
                        }
                        ir += MR;
                    }
                    p += span;
                }
                ic += mc;
            }
            k0 += kc;
        }
        n0 = n1;
    }
    B_TILE.set(bp);
}

thread_local! {
    /// [`gemm_cols`]' packing buffer for `B` tiles, reused by the thread's next call.
    static B_TILE: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `out[i, j] = Σ_kk x[i, kk] · w[j, kk] (+ bias[j])`: `x` is `m × k` f32, `w` is the
/// f16 `n × k` weight (PyTorch `Linear` layout), `out` is `m × n`, all row-major.
/// Parallel over tasks of [`NC`] columns on the current rayon pool.
pub fn linear_f16(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f16],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(w.len(), n * k);
    linear_src(x, m, k, BSrc::F16(w), n, bias, out);
}

/// `out[i, j] = Σ_kk x[i, kk] · W[j, kk]` for an int8 per-block-32 weight `W`
/// (`q`: `[n, k]`, `s`: `[n, k/32]` f16 scales), dequantized exactly tile by tile
/// while packing: the reference's arithmetic on the bundle's weights, up to the
/// summation order. Parallel as [`linear_f16`]. The engine's prefill used this until
/// [`crate::gemm16`] replaced it; `q3vl bench` still measures it beside that.
#[allow(clippy::too_many_arguments)]
pub fn linear_q8(x: &[f32], m: usize, k: usize, q: &[i8], s: &[f16], n: usize, out: &mut [f32]) {
    assert!(k.is_multiple_of(32));
    assert_eq!(q.len(), n * k);
    assert_eq!(s.len(), n * k / 32);
    linear_src(x, m, k, BSrc::Q8 { q, s }, n, None, out);
}

/// [`linear_f16`] for an f32 weight.
pub fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(w.len(), n * k);
    linear_src(
        x,
        m,
        k,
        BSrc::F32 {
            data: w,
            rs: k,
            cs: 1,
        },
        n,
        bias,
        out,
    );
}

fn linear_src(
    x: &[f32],
    m: usize,
    k: usize,
    b: BSrc<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(out.len(), m * n);
    check_linear(x, m, k, n, bias);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in out.chunks_exact_mut(n) {
            match bias {
                Some(bv) => row.copy_from_slice(bv),
                None => row.fill(0.0),
            }
        }
    } else {
        // SAFETY: `out` holds m·n floats (checked above), borrowed for the call.
        unsafe { linear_product(x, m, k, b, n, bias, out.as_mut_ptr()) };
    }
}

/// [`linear_f16`] into a new vector, which is never zeroed: the product writes
/// every element (zeroing a vision tower's outputs first cost about 1% of an encode,
/// on the allocating thread alone).
pub fn linear_f16_new(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f16],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(w.len(), n * k);
    if m == 0 || n == 0 || k == 0 {
        let mut out = vec![0f32; m * n];
        linear_src(x, m, k, BSrc::F16(w), n, bias, &mut out);
        return out;
    }
    check_linear(x, m, k, n, bias);
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: the capacity is m·n floats; the product writes each of them (every
    // register tile's first reduction slice stores its elements), so all are
    // initialized before the length is set.
    unsafe {
        linear_product(x, m, k, BSrc::F16(w), n, bias, out.as_mut_ptr());
        out.set_len(m * n);
    }
    out
}

/// The activation and bias shapes of a linear, checked once for every weight kind
/// (the public entries check their weight).
fn check_linear(x: &[f32], m: usize, k: usize, n: usize, bias: Option<&[f32]>) {
    assert_eq!(x.len(), m * k);
    if let Some(bv) = bias {
        assert_eq!(bv.len(), n);
    }
}

/// The output columns of one parallel task of an `n`-column product on the current
/// rayon pool (a multiple of [`NR`], from [`NC`] to 256; the int16 GEMM uses it too).
/// About eight tasks per thread: a thread that finishes early steals the next one, so
/// the last task leaves the other thread idle for a small fraction of the product
/// (with three per thread, the 8B vision's 1152-column products were six tasks, and
/// one slow task idled a core for a sixth of the time). Narrower tasks re-read the
/// packed activations from cache more often, which costs little. The split never
/// changes a value (see the module docs).
pub(crate) fn task_width(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (n.div_ceil(8 * threads).div_ceil(NR) * NR).clamp(NC, MAX_TASK_COLS)
}

/// The parallel product behind the linear entries, once their shapes are checked
/// (`x`: `m × k` with `m, n, k > 0`; a bias of `n`): writes every element of the
/// `m × n` output at `out`.
///
/// # Safety
/// `out` addresses `m·n` floats that nothing else touches during the call.
unsafe fn linear_product(
    x: &[f32],
    m: usize,
    k: usize,
    b: BSrc<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    // The activations are packed once, shared by every column task.
    let a = PackedA::pack(ASrc::Rows { data: x, lda: k }, m, k, true);
    let width = task_width(n);
    let optr = OutPtr(out);
    (0..n.div_ceil(width)).into_par_iter().for_each(|t| {
        let j0 = t * width;
        // SAFETY: `out` is m × n; this task alone writes columns j0..j0+width;
        // a bias holds n values.
        unsafe {
            gemm_cols(
                &a,
                BOp::Src(b),
                j0,
                (j0 + width).min(n),
                width,
                optr.get(),
                n,
                bias,
            )
        };
    });
}

/// `c = a · bᵀ` on the calling thread: `a` is `m × k` with row stride `lda`, `b`
/// as in [`BSrc`] (`n` columns), `c` is `m × n` with row stride `ldc`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_serial(
    a: &[f32],
    m: usize,
    k: usize,
    lda: usize,
    b: BSrc<'_>,
    n: usize,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(n <= ldc && (m == 0 || c.len() >= (m - 1) * ldc + n));
    check_b(b, n, k);
    serial(a, m, k, lda, BOp::Src(b), n, c, ldc);
}

/// `c = a · bᵀ` on the calling thread with a pre-packed `a` ([`PackedA`], for an
/// operand shared by many products: attention's transposed V); `b` as in [`BSrc`]
/// (`n` columns), `c` is `a.m × n` with row stride `ldc`. The results equal
/// [`gemm_serial`]'s on the same operands bit for bit.
pub fn gemm_serial_packed_a(a: &PackedA, b: BSrc<'_>, n: usize, c: &mut [f32], ldc: usize) {
    let (m, k) = (a.m, a.k);
    assert!(n <= ldc && (m == 0 || c.len() >= (m - 1) * ldc + n));
    check_b(b, n, k);
    if empty_product(m, n, k, c, ldc) {
        return;
    }
    // SAFETY: c holds m rows of ldc ≥ n floats (checked above), used by this thread
    // only.
    unsafe { gemm_cols(a, BOp::Src(b), 0, n, NC, c.as_mut_ptr(), ldc, None) };
}

/// The serial products' degenerate shapes: nothing to write when `m` or `n` is 0,
/// zeros when `k` is 0. Returns whether the product is done.
fn empty_product(m: usize, n: usize, k: usize, c: &mut [f32], ldc: usize) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        for r in 0..m {
            c[r * ldc..r * ldc + n].fill(0.0);
        }
        return true;
    }
    false
}

/// Panics unless `b` holds `n` columns of `k` values.
fn check_b(b: BSrc<'_>, n: usize, k: usize) {
    match b {
        BSrc::F16(w) => assert!(w.len() >= n * k),
        BSrc::Q8 { q, s } => {
            assert!(k.is_multiple_of(32) && q.len() >= n * k && s.len() >= n * k / 32)
        }
        BSrc::F32 { data, rs, cs } => {
            assert!(n == 0 || k == 0 || data.len() > (n - 1) * rs + (k - 1) * cs)
        }
    }
}

/// `c = a · bᵀ` on the calling thread with a pre-packed `b` ([`PackedB`]); `a` is
/// `m × b.k` with row stride `lda`, `c` is `m × b.n` with row stride `ldc`. The
/// results equal [`gemm_serial`]'s on the same operands bit for bit.
pub fn gemm_serial_packed(a: &[f32], m: usize, lda: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    let (n, k) = (b.n, b.k);
    assert!(n <= ldc && (m == 0 || c.len() >= (m - 1) * ldc + n));
    serial(a, m, k, lda, BOp::Packed(b), n, c, ldc);
}

/// The single-threaded product both serial entry points share, once their operand
/// checks have passed: `c[.., ..n] = a · bᵀ` (zeros when `k` is 0).
#[allow(clippy::too_many_arguments)]
fn serial(
    a: &[f32],
    m: usize,
    k: usize,
    lda: usize,
    b: BOp<'_>,
    n: usize,
    c: &mut [f32],
    ldc: usize,
) {
    if empty_product(m, n, k, c, ldc) {
        return;
    }
    let a = PackedA::new(a, m, k, lda);
    // SAFETY: c holds m rows of ldc ≥ n floats (checked by the callers), used by this
    // thread only.
    unsafe { gemm_cols(&a, b, 0, n, NC, c.as_mut_ptr(), ldc, None) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_same_bits, lcg, on_threads};

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut o = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k)
                    .map(|q| x[i * k + q] as f64 * w[j * k + q] as f64)
                    .sum();
            }
        }
        o
    }

    fn close(got: &[f32], want: &[f64], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
        for i in 0..m {
            for j in 0..n {
                let mag: f64 = (0..k)
                    .map(|q| (x[i * k + q] as f64 * w[j * k + q] as f64).abs())
                    .sum();
                let d = (got[i * n + j] as f64 - want[i * n + j]).abs();
                assert!(
                    d <= mag * 1e-6 + 1e-30,
                    "({i},{j}): {} vs {}",
                    got[i * n + j],
                    want[i * n + j]
                );
            }
        }
    }

    #[test]
    fn linear_matches_naive_on_odd_shapes() {
        for (m, k, n) in [
            (1usize, 1usize, 1usize),
            (5, 37, 130),
            (7, 300, 17),
            (13, 513, 70),
            (100, 64, 33),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7) % 13) as f32 * 0.25 - 1.5)
                .collect();
            let w16: Vec<f16> = (0..n * k)
                .map(|i| f16::from_f32(((i * 5) % 11) as f32 * 0.125 - 0.6))
                .collect();
            let w: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let want = naive(&x, m, k, &w, n);
            let mut o16 = vec![f32::NAN; m * n];
            linear_f16(&x, m, k, &w16, n, None, &mut o16);
            close(&o16, &want, &x, &w, m, k, n);
            let mut o32 = vec![f32::NAN; m * n];
            linear(&x, m, k, &w, n, Some(&b), &mut o32);
            for i in 0..m * n {
                assert_eq!(o32[i], o16[i] + b[i % n], "bias is added after the sum");
            }
            // Into a new (never zeroed) vector: the same bits.
            assert_same_bits(&linear_f16_new(&x, m, k, &w16, n, Some(&b)), &o32, "new");
            assert_same_bits(
                &linear_f16_new(&x[..0], m, 0, &[], n, Some(&b)),
                &b.repeat(m),
                "k = 0",
            );
            // The serial entry, with strided B (the transpose of w) and padded rows.
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let bt = BSrc::F32 {
                data: &wt,
                rs: 1,
                cs: n,
            };
            // Every serial entry writes rows of stride n + 3 holding linear_f16's bits.
            let same_as_linear = |out: &[f32]| {
                for i in 0..m {
                    for j in 0..n {
                        assert_eq!(out[i * (n + 3) + j].to_bits(), o16[i * n + j].to_bits());
                    }
                }
            };
            let mut os = vec![f32::NAN; m * (n + 3)];
            gemm_serial(&x, m, k, k, bt, n, &mut os, n + 3);
            same_as_linear(&os);
            let pb = PackedB::new(bt, n, k);
            let mut op = vec![f32::NAN; m * (n + 3)];
            gemm_serial_packed(&x, m, k, &pb, &mut op, n + 3);
            same_as_linear(&op);
            // A packed once, from its rows or from its transpose (column stride m + 2).
            let mut xt = vec![f32::NAN; k * (m + 2)];
            for i in 0..m {
                for kk in 0..k {
                    xt[kk * (m + 2) + i] = x[i * k + kk];
                }
            }
            for pa in [
                PackedA::new(&x, m, k, k),
                PackedA::from_transposed(&xt, m, k, m + 2),
            ] {
                let mut oa = vec![f32::NAN; m * (n + 3)];
                gemm_serial_packed_a(&pa, bt, n, &mut oa, n + 3);
                same_as_linear(&oa);
            }
        }
    }

    /// The bias is added to the finished sum (fused into the last slice's tiles),
    /// exactly as a separate pass would: on values whose sums round, over several
    /// reduction slices, with full and partial tiles, and with k = 0.
    #[test]
    fn bias_is_added_to_the_finished_sum() {
        let mut seed = 5;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (lcg(&mut seed) % 100_003) as f32 * 1.37e-5 - 0.6)
                .collect()
        };
        for (m, k, n) in [(13usize, 3 * KC + 5, 40usize), (6, KC, 16), (3, 0, 5)] {
            let (x, w, b) = (rnd(m * k), rnd(n * k), rnd(n));
            let mut with = vec![f32::NAN; m * n];
            let mut without = vec![f32::NAN; m * n];
            linear(&x, m, k, &w, n, Some(&b), &mut with);
            linear(&x, m, k, &w, n, None, &mut without);
            let want: Vec<f32> = without
                .iter()
                .enumerate()
                .map(|(i, v)| v + b[i % n])
                .collect();
            assert_same_bits(&with, &want, &format!("{m}x{k}x{n}"));
        }
    }

    #[test]
    fn linear_q8_equals_the_gemm_on_dequantized_weights() {
        // n = 130: eight full panels (the SIMD dequantizing pack) and a partial one.
        for (m, k, n) in [(1usize, 32usize, 1usize), (7, 288, 130), (13, 544, 40)] {
            let q: Vec<i8> = (0..n * k).map(|i| ((i * 7919) % 256) as u8 as i8).collect();
            let s: Vec<f16> = (0..n * k / 32)
                .map(|i| f16::from_f32(((i * 31) % 97) as f32 * 1e-3 + 1e-4))
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| q[i] as f32 * s[i / 32].to_f32())
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 13) % 29) as f32 * 0.1 - 1.4)
                .collect();
            let mut a = vec![f32::NAN; m * n];
            let mut b = vec![f32::NAN; m * n];
            linear_q8(&x, m, k, &q, &s, n, &mut a);
            linear(&x, m, k, &w, n, None, &mut b);
            assert!(
                a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()),
                "{m}x{k}x{n}"
            );
            close(&a, &naive(&x, m, k, &w, n), &x, &w, m, k, n);
        }
    }

    #[test]
    fn linear_does_not_depend_on_threads() {
        let (m, k, n) = (31usize, 700usize, 200usize);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1013) as f32 * 1e-3 - 0.5)
            .collect();
        let w: Vec<f16> = (0..n * k)
            .map(|i| f16::from_f32(((i * 104729) % 997) as f32 * 1e-3 - 0.5))
            .collect();
        let run = |threads: usize| {
            let mut o = vec![0f32; m * n];
            on_threads(threads, || linear_f16(&x, m, k, &w, n, None, &mut o));
            o
        };
        let one = run(1);
        for t in [2, 3] {
            assert_same_bits(&run(t), &one, &format!("threads={t}"));
        }
    }

    #[test]
    fn portable_and_simd_register_tiles_agree_to_rounding() {
        let kc = 300;
        let a: Vec<f32> = (0..kc * MR)
            .map(|i| ((i * 31) % 17) as f32 * 0.1 - 0.8)
            .collect();
        let b: Vec<f32> = (0..kc * NR)
            .map(|i| ((i * 13) % 19) as f32 * 0.1 - 0.9)
            .collect();
        let mut want = vec![0f32; MR * NR];
        let mut got = vec![0f32; MR * NR];
        // SAFETY: a, b and the tiles are sized for kc.
        unsafe {
            micro_portable(kc, a.as_ptr(), b.as_ptr(), want.as_mut_ptr(), NR, true);
            micro()(kc, a.as_ptr(), b.as_ptr(), got.as_mut_ptr(), NR, true);
        }
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_pair_tile_equals_two_avx2_tiles_bit_for_bit() {
        // The hardware decides, not Q3VL_KERNEL_PATH: the tile is tested wherever it can run.
        if !crate::path::available_paths().contains(&crate::path::Path::Avx512Vnni) {
            eprintln!("no AVX-512 on this CPU: the pair tile is not run here");
            return;
        }
        let kc = 301;
        let mut seed = 3;
        let mut r = || (crate::testing::lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0;
        let a: Vec<f32> = (0..kc * MR).map(|_| r()).collect();
        let b: Vec<f32> = (0..2 * kc * NR).map(|_| r()).collect();
        let c0: Vec<f32> = (0..MR * 2 * NR).map(|_| r()).collect();
        for first in [true, false] {
            let (mut want, mut got) = (c0.clone(), c0.clone());
            // SAFETY: a holds kc·MR floats, b two panels of kc·NR, the tiles MR × 2NR;
            // both paths' features were checked.
            unsafe {
                for u in 0..2 {
                    let (bu, cu) = (b.as_ptr().add(u * kc * NR), want.as_mut_ptr().add(u * NR));
                    x86::micro_avx2(kc, a.as_ptr(), bu, cu, 2 * NR, first);
                }
                x86::micro_avx512_pair(kc, a.as_ptr(), b.as_ptr(), got.as_mut_ptr(), 2 * NR, first);
            }
            assert_same_bits(&got, &want, &format!("first={first}"));
        }
    }

    #[test]
    fn widen_is_exact() {
        let src: Vec<f16> = (0..37u16)
            .map(|i| f16::from_bits(i.wrapping_mul(1777)))
            .collect();
        let mut dst = vec![0f32; 37];
        widen_f16(&src, &mut dst);
        for (s, d) in src.iter().zip(&dst) {
            assert!(s.to_f32().to_bits() == d.to_bits() || (s.is_nan() && d.is_nan()));
        }
    }
}
