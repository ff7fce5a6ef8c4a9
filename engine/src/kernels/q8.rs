//! int8 weights (per-block-32, f16 scales) × int8 activations (per-block-32, f32
//! scales), the decoder's hot loop.
//!
//! Per block the products are summed exactly in i32; the SIMD paths only speed up
//! that integer sum. The f32 accumulation `acc += sumi · (dw · dx)` then runs block
//! by block in the same order on every path, so every path returns bit-identical
//! results (the tests check it).

use half::f16;
use std::sync::OnceLock;

/// Elements per quantization block (spec/quantization.md).
pub const BLOCK: usize = 32;

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
    /// Quantizes `x` (`rows × cols`, cols a multiple of 32).
    pub fn quantize(x: &[f32], cols: usize) -> QActs {
        assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols.max(1)));
        let mut q = vec![0i8; x.len()];
        let mut d = vec![0f32; x.len() / BLOCK];
        for ((xb, qb), db) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .zip(&mut d)
        {
            *db = quantize_block(xb, qb);
        }
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

/// One dot-product implementation: `Σ_b sumi_b · (ws[b] · xd[b])`, where `ws` are
/// the weight row's f16 scales widened to f32 (exact) once per row.
///
/// # Safety
/// `w` and `x` have the same length, a multiple of 32, with `len/32` scales each;
/// the function's target features are present (guaranteed by [`path_fn`]).
pub type DotFn = unsafe fn(w: &[i8], ws: &[f32], x: &[i8], xd: &[f32]) -> f32;

/// Four dot products of one weight row with four activation rows (prefill), each
/// bit-identical to [`DotFn`] on that row: the weight loads are shared, the
/// per-row reduction order is not changed.
///
/// # Safety
/// As [`DotFn`], for each of the four activation rows.
pub type Dot4Fn = unsafe fn(w: &[i8], ws: &[f32], x: [&[i8]; 4], xd: [&[f32]; 4]) -> [f32; 4];

/// The shared, fixed-order float accumulation of four block sums.
#[inline(always)]
fn acc4(acc: &mut f32, s: [i32; 4], ws: &[f32], xd: &[f32]) {
    for k in 0..4 {
        *acc += s[k] as f32 * (ws[k] * xd[k]);
    }
}

/// Portable reference path.
pub fn dot_portable(w: &[i8], ws: &[f32], x: &[i8], xd: &[f32]) -> f32 {
    let mut acc = 0f32;
    for ((wb, xb), (s, d)) in w
        .chunks_exact(BLOCK)
        .zip(x.chunks_exact(BLOCK))
        .zip(ws.iter().zip(xd))
    {
        let sumi: i32 = wb.iter().zip(xb).map(|(&a, &b)| a as i32 * b as i32).sum();
        acc += sumi as f32 * (s * d);
    }
    acc
}

/// The portable path behind the [`DotFn`] signature.
unsafe fn dot_portable_fn(w: &[i8], ws: &[f32], x: &[i8], xd: &[f32]) -> f32 {
    dot_portable(w, ws, x, xd)
}

/// Four portable dots.
unsafe fn dot4_portable_fn(w: &[i8], ws: &[f32], x: [&[i8]; 4], xd: [&[f32]; 4]) -> [f32; 4] {
    [0, 1, 2, 3].map(|k| dot_portable(w, ws, x[k], xd[k]))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{acc4, BLOCK};
    use std::arch::x86_64::*;

    /// Eight i32 partial sums of one block: |w| (as u8) × x·sign(w) (as i8) with
    /// maddubs then madd. |w| = 128 is fine as u8, and x is never −128 after
    /// quantization, so x·sign(w) cannot overflow; pair sums stay ≤ 2·128·127 < 2¹⁵.
    #[inline(always)]
    unsafe fn block_avx2(w: *const i8, x: *const i8) -> __m256i {
        let wv = _mm256_loadu_si256(w as *const __m256i);
        let xv = _mm256_loadu_si256(x as *const __m256i);
        let aw = _mm256_sign_epi8(wv, wv);
        let sx = _mm256_sign_epi8(xv, wv);
        let p16 = _mm256_maddubs_epi16(aw, sx);
        _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
    }

    /// Horizontal sums of four blocks' partials, in block order.
    #[inline(always)]
    unsafe fn hsum4(p0: __m256i, p1: __m256i, p2: __m256i, p3: __m256i) -> [i32; 4] {
        let h01 = _mm256_hadd_epi32(p0, p1);
        let h23 = _mm256_hadd_epi32(p2, p3);
        let h = _mm256_hadd_epi32(h01, h23);
        let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        let mut out = [0i32; 4];
        _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, s);
        out
    }

    /// AVX2 path: four blocks per step.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_avx2(w: &[i8], ws: &[f32], x: &[i8], xd: &[f32]) -> f32 {
        let nb = w.len() / BLOCK;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = 0f32;
        let mut b = 0;
        while b + 4 <= nb {
            let o = b * BLOCK;
            let s = hsum4(
                block_avx2(wp.add(o), xp.add(o)),
                block_avx2(wp.add(o + BLOCK), xp.add(o + BLOCK)),
                block_avx2(wp.add(o + 2 * BLOCK), xp.add(o + 2 * BLOCK)),
                block_avx2(wp.add(o + 3 * BLOCK), xp.add(o + 3 * BLOCK)),
            );
            acc4(&mut acc, s, &ws[b..b + 4], &xd[b..b + 4]);
            b += 4;
        }
        while b < nb {
            let o = b * BLOCK;
            let z = _mm256_setzero_si256();
            let s = hsum4(block_avx2(wp.add(o), xp.add(o)), z, z, z);
            acc += s[0] as f32 * (ws[b] * xd[b]);
            b += 1;
        }
        acc
    }

    /// AVX2, four activation rows against one weight row: |w| is computed once per
    /// block and shared; each row's sums and accumulation are exactly `dot_avx2`'s.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot4_avx2(w: &[i8], ws: &[f32], x: [&[i8]; 4], xd: [&[f32]; 4]) -> [f32; 4] {
        // No closures here: they would not inherit `avx2` and the intrinsics would
        // become calls.
        let nb = w.len() / BLOCK;
        let wp = w.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [0f32; 4];
        let mut b = 0;
        while b + 4 <= nb {
            let o = b * BLOCK;
            let w0 = _mm256_loadu_si256(wp.add(o) as *const __m256i);
            let w1 = _mm256_loadu_si256(wp.add(o + BLOCK) as *const __m256i);
            let w2 = _mm256_loadu_si256(wp.add(o + 2 * BLOCK) as *const __m256i);
            let w3 = _mm256_loadu_si256(wp.add(o + 3 * BLOCK) as *const __m256i);
            let a0 = _mm256_sign_epi8(w0, w0);
            let a1 = _mm256_sign_epi8(w1, w1);
            let a2 = _mm256_sign_epi8(w2, w2);
            let a3 = _mm256_sign_epi8(w3, w3);
            for k in 0..4 {
                let xp = x[k].as_ptr().add(o);
                let x0 = _mm256_loadu_si256(xp as *const __m256i);
                let x1 = _mm256_loadu_si256(xp.add(BLOCK) as *const __m256i);
                let x2 = _mm256_loadu_si256(xp.add(2 * BLOCK) as *const __m256i);
                let x3 = _mm256_loadu_si256(xp.add(3 * BLOCK) as *const __m256i);
                let p0 =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(x0, w0)), ones);
                let p1 =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(x1, w1)), ones);
                let p2 =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(a2, _mm256_sign_epi8(x2, w2)), ones);
                let p3 =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(a3, _mm256_sign_epi8(x3, w3)), ones);
                let s = hsum4(p0, p1, p2, p3);
                acc4(&mut acc[k], s, &ws[b..b + 4], &xd[k][b..b + 4]);
            }
            b += 4;
        }
        while b < nb {
            let o = b * BLOCK;
            let z = _mm256_setzero_si256();
            for k in 0..4 {
                let s = hsum4(block_avx2(wp.add(o), x[k].as_ptr().add(o)), z, z, z);
                acc[k] += s[0] as f32 * (ws[b] * xd[k][b]);
            }
            b += 1;
        }
        acc
    }

    /// AVX-512 VNNI path (256-bit `vpdpbusd`, needs AVX512VL): the same |w| / x·sign(w)
    /// split, summed by `dpbusd` straight into i32 lanes. This machine has no AVX-512,
    /// so this path is compiled and gated by runtime detection but not exercised here.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn dot_vnni(w: &[i8], ws: &[f32], x: &[i8], xd: &[f32]) -> f32 {
        let nb = w.len() / BLOCK;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        // A macro, not a closure: closures would not inherit the target features.
        macro_rules! one {
            ($o:expr) => {{
                let wv = _mm256_loadu_si256(wp.add($o) as *const __m256i);
                let xv = _mm256_loadu_si256(xp.add($o) as *const __m256i);
                let aw = _mm256_abs_epi8(wv);
                let sx = _mm256_sign_epi8(xv, wv);
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx)
            }};
        }
        let mut acc = 0f32;
        let mut b = 0;
        while b + 4 <= nb {
            let o = b * BLOCK;
            let s = hsum4(
                one!(o),
                one!(o + BLOCK),
                one!(o + 2 * BLOCK),
                one!(o + 3 * BLOCK),
            );
            acc4(&mut acc, s, &ws[b..b + 4], &xd[b..b + 4]);
            b += 4;
        }
        while b < nb {
            let z = _mm256_setzero_si256();
            let s = hsum4(one!(b * BLOCK), z, z, z);
            acc += s[0] as f32 * (ws[b] * xd[b]);
            b += 1;
        }
        acc
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::BLOCK;
    use std::arch::aarch64::*;

    /// NEON path: widening i8×i8 → i16 products (|p| ≤ 2¹⁴), pairwise-added to i32.
    #[target_feature(enable = "neon")]
    pub unsafe fn dot_neon(w: &[i8], ws: &[f32], x: &[i8], xd: &[f32]) -> f32 {
        let nb = w.len() / BLOCK;
        let mut acc = 0f32;
        for b in 0..nb {
            let o = b * BLOCK;
            let mut s = vdupq_n_s32(0);
            for h in 0..2 {
                let wv = vld1q_s8(w.as_ptr().add(o + 16 * h));
                let xv = vld1q_s8(x.as_ptr().add(o + 16 * h));
                let lo = vmull_s8(vget_low_s8(wv), vget_low_s8(xv));
                let hi = vmull_high_s8(wv, xv);
                s = vpadalq_s16(s, lo);
                s = vpadalq_s16(s, hi);
            }
            acc += vaddvq_s32(s) as f32 * (ws[b] * xd[b]);
        }
        acc
    }
}

/// Which dot-product path runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Plain Rust.
    Portable,
    /// x86-64 AVX2.
    Avx2,
    /// x86-64 AVX-512 VNNI (with VL/BW).
    Avx512Vnni,
    /// aarch64 NEON.
    Neon,
}

/// The paths this CPU can run, best last.
pub fn available_paths() -> Vec<Path> {
    let mut v = vec![Path::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            v.push(Path::Avx2);
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            v.push(Path::Avx512Vnni);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Path::Neon);
        }
    }
    v
}

/// The function of `path`. Panics if the CPU lacks it (only [`available_paths`] are valid).
pub fn path_fn(path: Path) -> DotFn {
    assert!(
        available_paths().contains(&path),
        "{path:?} is not available on this CPU"
    );
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => x86::dot_avx2,
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => x86::dot_vnni,
        #[cfg(target_arch = "aarch64")]
        Path::Neon => arm::dot_neon,
        _ => dot_portable_fn,
    }
}

/// The four-row function of `path`: AVX2 has its own; the others run four single dots
/// (bit-identical either way).
pub fn path_fn4(path: Path) -> Dot4Fn {
    assert!(
        available_paths().contains(&path),
        "{path:?} is not available on this CPU"
    );
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512Vnni => x86::dot4_avx2,
        _ => dot4_portable_fn,
    }
}

/// The best path of this CPU, chosen once.
pub fn best_path() -> Path {
    static BEST: OnceLock<Path> = OnceLock::new();
    *BEST.get_or_init(|| *available_paths().last().expect("portable is always there"))
}

/// `Σ_b sumi_b · (ws[b] · xd[b])` on the best path.
#[inline]
pub fn dot(w: &[i8], ws: &[f32], x: &[i8], xd: &[f32]) -> f32 {
    assert!(w.len() == x.len() && w.len().is_multiple_of(BLOCK));
    assert!(ws.len() == w.len() / BLOCK && xd.len() == ws.len());
    static F: OnceLock<DotFn> = OnceLock::new();
    let f = F.get_or_init(|| path_fn(best_path()));
    // SAFETY: lengths checked above; the path was detected on this CPU.
    unsafe { f(w, ws, x, xd) }
}

/// Four dots of one weight row on the best path (see [`Dot4Fn`]).
#[inline]
pub fn dot4(w: &[i8], ws: &[f32], x: [&[i8]; 4], xd: [&[f32]; 4]) -> [f32; 4] {
    assert!(w.len().is_multiple_of(BLOCK) && ws.len() == w.len() / BLOCK);
    for k in 0..4 {
        assert!(x[k].len() == w.len() && xd[k].len() == ws.len());
    }
    static F: OnceLock<Dot4Fn> = OnceLock::new();
    let f = F.get_or_init(|| path_fn4(best_path()));
    // SAFETY: lengths checked above; the path was detected on this CPU.
    unsafe { f(w, ws, x, xd) }
}

/// Widens a weight row's f16 scales to f32 (exact), once per row.
pub fn widen_scales(s: &[f16], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    s.convert_to_f32_slice(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for test data.
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    fn random_case(seed: &mut u64, nb: usize) -> (Vec<i8>, Vec<f32>, Vec<i8>, Vec<f32>) {
        let n = nb * BLOCK;
        let mut w: Vec<i8> = (0..n)
            .map(|_| (lcg(seed) % 256) as i32 as u8 as i8)
            .collect();
        let mut x: Vec<i8> = (0..n)
            .map(|_| ((lcg(seed) % 255) as i32 - 127) as i8)
            .collect();
        // The extremes: weights reach −128 (absmax head) and ±127, activations ±127.
        if n >= 4 {
            w[0] = -128;
            w[1] = 127;
            w[2] = -127;
            w[3] = -128;
            x[0] = -127;
            x[1] = 127;
            x[2] = -127;
            x[3] = 127;
        }
        // One block of all extremes: the largest possible sums.
        if nb > 1 {
            w[BLOCK..2 * BLOCK].fill(-128);
            x[BLOCK..2 * BLOCK].fill(-127);
        }
        let ws = (0..nb)
            .map(|_| f16::from_f32((lcg(seed) % 1000) as f32 * 1e-4).to_f32())
            .collect();
        let xd = (0..nb).map(|_| (lcg(seed) % 1000) as f32 * 3e-3).collect();
        (w, ws, x, xd)
    }

    #[test]
    fn every_path_matches_portable_bit_for_bit() {
        let mut seed = 7;
        let paths = available_paths();
        println!("dot paths on this CPU: {paths:?}");
        for nb in [1usize, 2, 3, 4, 5, 7, 9, 33, 128, 131] {
            for _row in 0..20 {
                let (w, ws, x, xd) = random_case(&mut seed, nb);
                let want = dot_portable(&w, &ws, &x, &xd);
                // Three more activation rows for the four-row kernels.
                let more: Vec<_> = (0..3).map(|_| random_case(&mut seed, nb)).collect();
                let xs = [&x[..], &more[0].2[..], &more[1].2[..], &more[2].2[..]];
                let ds = [&xd[..], &more[0].3[..], &more[1].3[..], &more[2].3[..]];
                let want4 = xs
                    .iter()
                    .zip(ds)
                    .map(|(xk, dk)| dot_portable(&w, &ws, xk, dk))
                    .collect::<Vec<_>>();
                for &p in &paths {
                    // SAFETY: the path is available and the lengths match.
                    let got = unsafe { path_fn(p)(&w, &ws, &x, &xd) };
                    assert_eq!(got.to_bits(), want.to_bits(), "{p:?} nb={nb}");
                    // SAFETY: as above, for each row.
                    let got4 = unsafe { path_fn4(p)(&w, &ws, xs, ds) };
                    for k in 0..4 {
                        assert_eq!(
                            got4[k].to_bits(),
                            want4[k].to_bits(),
                            "{p:?} four-row k={k} nb={nb}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_block_sum_is_exact() {
        let w = vec![-128i8; 32];
        let x = vec![-127i8; 32];
        let got = dot(&w, &[1.0], &x, &[1.0]);
        assert_eq!(got, (32 * 128 * 127) as f32);
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
    }
}
