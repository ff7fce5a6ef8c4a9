//! The GEMM's packed operands: `A` in [`MR`]-row panels ([`PackedA`]), `B` in
//! [`NR`]-column panels, tile by tile ([`pack_b`]) or once in full ([`PackedB`]).

use super::{BSrc, KC, MR, NC, NR};
use crate::path::{best_path, debug_assert_available, Path};
use crate::row::widen_f16_on;
use crate::OutPtr;
use rayon::prelude::*;
use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use super::x86;

/// Where [`PackedA`] reads `A[i, kk]`.
#[derive(Clone, Copy)]
pub(super) enum ASrc<'a> {
    /// Row-major: `data[i·lda + kk]`.
    Rows { data: &'a [f32], lda: usize },
    /// Transposed: `data[kk·ld + i]`.
    Cols { data: &'a [f32], ld: usize },
}

/// The activation operand `A[i, kk] = data[i·lda + kk]`, packed in the order the
/// register tile reads it (once per product, or once for many products through
/// [`super::gemm_serial_packed_a`]): for each [`KC`] slice, panels of [`MR`] rows
/// stored `[kk][MR]` (rows past `m` are zero). The register tile then reads its six
/// broadcasts per `kk` from one contiguous stream instead of from `MR` rows `lda`
/// floats apart (six streams); a product packs once and shares the panels with every
/// column task. The vision linears ran faster packed than read in place
/// (docs/benchmarks-history.md: "The GEMM packs the activations once per product").
pub struct PackedA {
    data: Vec<f32>,
    pub(super) m: usize,
    /// `m` rounded up to [`MR`].
    mp: usize,
    pub(super) k: usize,
}

impl PackedA {
    /// Packs `m × k` rows of stride `lda` on the calling thread.
    pub fn new(data: &[f32], m: usize, k: usize, lda: usize) -> PackedA {
        PackedA::new_on(best_path(), data, m, k, lda)
    }

    /// [`PackedA::new`] on a given path, which this CPU must run (checked in debug
    /// builds; every path packs the same bits).
    pub(crate) fn new_on(path: Path, data: &[f32], m: usize, k: usize, lda: usize) -> PackedA {
        assert!(lda >= k && (m == 0 || data.len() >= (m - 1) * lda + k));
        PackedA::pack(path, ASrc::Rows { data, lda }, m, k, false)
    }

    /// Packs the `m × k` operand stored transposed, `A[i, kk] = data[kk·ld + i]`,
    /// on the calling thread (attention's V, whose rows are keys, is `A = vᵀ` of the
    /// output product: packed straight from the projection's output, no copy).
    pub fn from_transposed(data: &[f32], m: usize, k: usize, ld: usize) -> PackedA {
        PackedA::from_transposed_on(best_path(), data, m, k, ld)
    }

    /// [`PackedA::from_transposed`] on a given path, which this CPU must run (checked
    /// in debug builds; every path packs the same bits).
    pub(crate) fn from_transposed_on(
        path: Path,
        data: &[f32],
        m: usize,
        k: usize,
        ld: usize,
    ) -> PackedA {
        assert!(ld >= m && (k == 0 || data.len() >= (k - 1) * ld + m));
        PackedA::pack(path, ASrc::Cols { data, ld }, m, k, false)
    }

    /// Packs `a` (`m × k`, bounds checked by the callers) on `path`, which this CPU
    /// must run (checked in debug builds); in parallel over row panels when `parallel`
    /// (on the current rayon pool).
    pub(super) fn pack(path: Path, a: ASrc<'_>, m: usize, k: usize, parallel: bool) -> PackedA {
        debug_assert_available(path);
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
                // SAFETY: as above.
                unsafe { pack_a_panel(path, a, pi, rows, k0..k0 + kc, dst) };
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

    /// The packed values, in the order the register tile reads them.
    #[cfg(test)]
    pub(super) fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// The panel of rows `ir..ir + MR` in the slice at `k0` (`kc` long).
    pub(super) fn panel(&self, k0: usize, kc: usize, ir: usize) -> *const f32 {
        self.data[k0 * self.mp + ir * kc..].as_ptr()
    }
}

/// Writes panel `pi` (its first `rows` rows real, the rest zeros) of the reduction
/// slice `ks` to `dst[kk·MR + i]`.
///
/// # Safety
/// `dst` addresses `ks.len()·MR` floats that only this call writes; `a` holds the
/// panel's rows and slice; this CPU runs `path`.
unsafe fn pack_a_panel(
    path: Path,
    a: ASrc<'_>,
    pi: usize,
    rows: usize,
    ks: Range<usize>,
    dst: *mut f32,
) {
    let (k0, kc) = (ks.start, ks.len());
    match a {
        ASrc::Rows { data, lda } => {
            let row = |i: usize| &data[(pi * MR + i) * lda + k0..][..kc];
            match path {
                // SAFETY: each row holds kc values, dst kc·MR; the path's features
                // are present.
                #[cfg(target_arch = "x86_64")]
                Path::Avx2 | Path::Avx512Vnni if rows == MR => unsafe {
                    x86::pack_a_panel(std::array::from_fn(row), kc, dst)
                },
                _ => {
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
}

/// Packs `B[j, kk]` for `j` in `cols`, `kk` in `ks` (of `B`'s `k`) into `NR`-column
/// panels `[panel][kk][NR]`, zero-padding the last panel, on `path`, which this CPU
/// must run (checked in debug builds); `row` is scratch for [`KC`] floats.
pub(super) fn pack_b(
    path: Path,
    b: BSrc<'_>,
    k: usize,
    cols: Range<usize>,
    ks: Range<usize>,
    out: &mut [f32],
    row: &mut [f32],
) {
    debug_assert_available(path);
    let kc = ks.len();
    let panels = cols.len().div_ceil(NR);
    for p in 0..panels {
        let dst = &mut out[p * kc * NR..(p + 1) * kc * NR];
        let jp = cols.start + p * NR;
        if jp + NR <= cols.end && pack_b_full_panel(path, b, k, jp, ks.clone(), dst) {
            continue;
        }
        pack_b_panel_portable(path, b, k, jp..cols.end, ks.clone(), dst, row);
    }
}

/// Packs the full panel of columns `jp..jp + NR`, slice `ks`, with the path's SIMD
/// code, where it has one for `b`'s kind; returns whether it did. This CPU runs
/// `path` (checked by [`pack_b`]).
fn pack_b_full_panel(
    path: Path,
    b: BSrc<'_>,
    k: usize,
    jp: usize,
    ks: Range<usize>,
    dst: &mut [f32],
) -> bool {
    let (k0, kc) = (ks.start, ks.len());
    match (path, b) {
        // SAFETY (every arm): rows jp..jp+NR of B hold B[j, k0..k0+kc] (B has
        // n ≥ jp + NR columns of k ≥ k0 + kc values), dst holds kc·NR; the path's
        // features are present.
        #[cfg(target_arch = "x86_64")]
        (Path::Avx2 | Path::Avx512Vnni, BSrc::F16(w)) => unsafe {
            x86::pack_f16_panel(w.as_ptr().add(jp * k + k0), k, kc, dst.as_mut_ptr());
            true
        },
        #[cfg(target_arch = "x86_64")]
        (Path::Avx2 | Path::Avx512Vnni, BSrc::F32 { data, rs, cs: 1 }) => unsafe {
            x86::pack_f32_panel(data.as_ptr().add(jp * rs + k0), rs, kc, dst.as_mut_ptr());
            true
        },
        // The slice starts and ends on block boundaries; the scales are n × k/32.
        #[cfg(all(target_arch = "x86_64", feature = "q8"))]
        (Path::Avx2 | Path::Avx512Vnni, BSrc::Q8 { q, s })
            if k0.is_multiple_of(32) && kc.is_multiple_of(32) =>
        unsafe {
            let (q, s) = (
                q.as_ptr().add(jp * k + k0),
                s.as_ptr().add(jp * (k / 32) + k0 / 32),
            );
            x86::pack_q8_panel(q, s, k, kc, dst.as_mut_ptr());
            true
        },
        _ => {
            let _ = (k, jp, k0, kc, dst);
            false
        }
    }
}

/// Packs the panel of columns from `cols.start` (columns from `cols.end` on are
/// zeros), slice `ks`, in plain Rust (f16 widened on `path`).
fn pack_b_panel_portable(
    path: Path,
    b: BSrc<'_>,
    k: usize,
    cols: Range<usize>,
    ks: Range<usize>,
    dst: &mut [f32],
    row: &mut [f32],
) {
    let (jp, j1, k0, kc) = (cols.start, cols.end, ks.start, ks.len());
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
                widen_f16_on(path, &w[j * k + k0..j * k + k0 + kc], &mut row[..kc]);
                for (kk, &v) in row[..kc].iter().enumerate() {
                    dst[kk * NR + jj] = v;
                }
            }
            BSrc::F32 { data, rs, cs } => {
                for kk in 0..kc {
                    dst[kk * NR + jj] = data[j * rs + (k0 + kk) * cs];
                }
            }
            #[cfg(feature = "q8")]
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

/// A `B` operand packed once in full, in the order the GEMM walks it: column
/// chunks of [`NC`] (each padded to [`NR`]), then `KC` slices, then `NR`-column
/// panels `[kk][NR]`. For operands reused by many products (attention's K and V).
pub struct PackedB {
    data: Vec<f32>,
    pub(super) n: usize,
    pub(super) k: usize,
}

impl PackedB {
    /// Packs `b` (`n` columns, reduction length `k`).
    pub fn new(b: BSrc<'_>, n: usize, k: usize) -> PackedB {
        PackedB::new_on(best_path(), b, n, k)
    }

    /// [`PackedB::new`] on a given path, which this CPU must run (checked in debug
    /// builds; every path packs the same bits).
    pub(crate) fn new_on(path: Path, b: BSrc<'_>, n: usize, k: usize) -> PackedB {
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
                let tile = &mut data[off..off + wp * kc];
                pack_b(path, b, k, n0..n1, k0..k0 + kc, tile, &mut row);
                k0 += kc;
            }
            n0 = n1;
        }
        PackedB { data, n, k }
    }

    /// The packed values, in the order the GEMM walks them.
    #[cfg(test)]
    pub(super) fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// The packed tile of columns `n0..` (a chunk start) and the slice at `k0`.
    pub(super) fn tile(&self, n0: usize, n1: usize, k0: usize) -> &[f32] {
        let wp = (n1 - n0).div_ceil(NR) * NR;
        &self.data[n0 * self.k + wp * k0..]
    }
}
