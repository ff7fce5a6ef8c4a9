//! Vectorized element-wise math: `exp`, softmax rows, SiLU·up and the tanh GELU.
//!
//! The AVX2 path and the portable path run the same IEEE operations in the same
//! order (fused multiply-adds where the SIMD code fuses), so they agree bit for bit
//! (the tests check it); results never depend on threads.
//!
//! `exp(x)`: `n = round_even(x·log2 e)`, `r = x − n·ln2` (two-part ln2), the Cephes
//! polynomial `1 + r + r²·P(r)`, scaled by `2ⁿ`. Inputs are clamped to ≤ 88 and
//! inputs below −87 give 0. Relative error ≲ 2·10⁻⁷.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5;
const X_MAX: f32 = 88.0;
const X_MIN: f32 = -87.0;
/// √(2/π), the tanh GELU's constant.
const GELU_C: f32 = 0.797_884_6;

/// `exp(x)` on the portable path (the reference for the SIMD path).
#[inline]
pub fn exp_portable(x: f32) -> f32 {
    let small = x < X_MIN;
    let x = x.min(X_MAX);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = P0;
    p = p.mul_add(r, P1);
    p = p.mul_add(r, P2);
    p = p.mul_add(r, P3);
    p = p.mul_add(r, P4);
    p = p.mul_add(r, P5);
    let y = p.mul_add(r * r, r) + 1.0;
    let scale = f32::from_bits(((n as i32).wrapping_add(127) as u32) << 23);
    if small {
        0.0
    } else {
        y * scale
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// Eight `exp`s, the same operations as [`exp_portable`].
    #[inline(always)]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let small = _mm256_cmp_ps(x, _mm256_set1_ps(X_MIN), _CMP_LT_OQ);
        let x = _mm256_min_ps(x, _mm256_set1_ps(X_MAX));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut p = _mm256_set1_ps(P0);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        let out = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
        _mm256_andnot_ps(small, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_slice(x: &mut [f32]) {
        let n = x.len() / 8 * 8;
        let p = x.as_mut_ptr();
        let mut i = 0;
        while i < n {
            _mm256_storeu_ps(p.add(i), exp8(_mm256_loadu_ps(p.add(i))));
            i += 8;
        }
        for v in &mut x[n..] {
            *v = exp_portable(*v);
        }
    }

    /// See [`super::softmax_row`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_row(row: &mut [f32], scale: f32) {
        let n = row.len() / 8 * 8;
        let p = row.as_mut_ptr();
        let sv = _mm256_set1_ps(scale);
        // Max of the scaled values (max is exact and order-free, so four vector
        // accumulators give the scalar fold's value; a scalar fold is one serial
        // chain and took three quarters of a vision attention row's softmax).
        let mut m4 = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        let n32 = row.len() / 32 * 32;
        let mut i = 0;
        while i < n32 {
            for (j, m) in m4.iter_mut().enumerate() {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(i + 8 * j)), sv);
                *m = _mm256_max_ps(*m, v);
            }
            i += 32;
        }
        while i < n {
            m4[0] = _mm256_max_ps(m4[0], _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), sv));
            i += 8;
        }
        let mv = _mm256_max_ps(_mm256_max_ps(m4[0], m4[1]), _mm256_max_ps(m4[2], m4[3]));
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), mv);
        let mut max = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for &v in &row[n..] {
            max = max.max(v * scale);
        }
        let mv = _mm256_set1_ps(max);
        let mut lanes = _mm256_setzero_ps();
        let mut i = 0;
        while i < n {
            let e = exp8(_mm256_sub_ps(
                _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), sv),
                mv,
            ));
            _mm256_storeu_ps(p.add(i), e);
            lanes = _mm256_add_ps(lanes, e);
            i += 8;
        }
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), lanes);
        let mut sum = super::sum_lanes(l);
        for v in &mut row[n..] {
            *v = exp_portable(*v * scale - max);
            sum += *v;
        }
        let inv = _mm256_set1_ps(1.0 / sum);
        let mut i = 0;
        while i < n {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
            i += 8;
        }
        let inv = 1.0 / sum;
        for v in &mut row[n..] {
            *v *= inv;
        }
    }

    /// See [`super::silu_mul`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
        let n = g.len() / 8 * 8;
        let (gp, up) = (g.as_mut_ptr(), u.as_ptr());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let x = _mm256_loadu_ps(gp.add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(gp.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.add(i))));
            i += 8;
        }
        for (gv, uv) in g[n..].iter_mut().zip(&u[n..]) {
            *gv = super::silu_mul_one(*gv, *uv);
        }
    }

    /// See [`super::gelu_tanh`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_tanh(x: &mut [f32]) {
        let n = x.len() / 8 * 8;
        let p = x.as_mut_ptr();
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let v = _mm256_loadu_ps(p.add(i));
            let v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
            let u = _mm256_mul_ps(
                _mm256_set1_ps(GELU_C),
                _mm256_fmadd_ps(_mm256_set1_ps(0.044715), v3, v),
            );
            let e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0), u));
            _mm256_storeu_ps(p.add(i), _mm256_div_ps(v, _mm256_add_ps(one, e)));
            i += 8;
        }
        for v in &mut x[n..] {
            *v = super::gelu_tanh_one(*v);
        }
    }
}

/// The eight lane sums in the order the SIMD path reduces them.
#[inline]
fn sum_lanes(l: [f32; 8]) -> f32 {
    let s = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

#[inline]
fn silu_mul_one(g: f32, u: f32) -> f32 {
    g / (1.0 + exp_portable(-g)) * u
}

#[inline]
fn gelu_tanh_one(v: f32) -> f32 {
    let u = GELU_C * 0.044715f32.mul_add(v * v * v, v);
    v / (1.0 + exp_portable(-2.0 * u))
}

/// Whether the AVX2/FMA builds can run (only x86-64 has them).
#[cfg(target_arch = "x86_64")]
fn simd() -> bool {
    crate::path::avx2()
}

/// `x[i] = exp(x[i])`.
pub fn exp_slice(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the features were detected.
        unsafe { x86::exp_slice(x) };
        return;
    }
    for v in x {
        *v = exp_portable(*v);
    }
}

/// In place, `row = softmax(row · scale)`: the max of the scaled values is
/// subtracted before `exp`; the sum runs over eight lanes in a fixed order.
pub fn softmax_row(row: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the features were detected.
        unsafe { x86::softmax_row(row, scale) };
        return;
    }
    softmax_row_portable(row, scale)
}

fn softmax_row_portable(row: &mut [f32], scale: f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
    let n = row.len() / 8 * 8;
    let mut lanes = [0f32; 8];
    for c in row[..n].chunks_exact_mut(8) {
        for (l, v) in lanes.iter_mut().zip(c) {
            *v = exp_portable(*v * scale - max);
            *l += *v;
        }
    }
    let mut sum = sum_lanes(lanes);
    for v in &mut row[n..] {
        *v = exp_portable(*v * scale - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `g[i] = silu(g[i]) · u[i]`, with `silu(x) = x / (1 + exp(−x))`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len());
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the features were detected; lengths are equal.
        unsafe { x86::silu_mul(g, u) };
        return;
    }
    for (gv, uv) in g.iter_mut().zip(u) {
        *gv = silu_mul_one(*gv, *uv);
    }
}

/// In place, `gelu(x, approximate="tanh")` written as `x / (1 + exp(−2u))`,
/// `u = √(2/π)·(x + 0.044715·x³)` (the same function: `½(1 + tanh u) = σ(2u)`).
pub fn gelu_tanh(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the features were detected.
        unsafe { x86::gelu_tanh(x) };
        return;
    }
    for v in x {
        *v = gelu_tanh_one(*v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (0..20011).map(|i| (i as f32 - 10005.0) * 0.0091).collect();
        v.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            88.0,
            88.5,
            100.0,
            -86.9,
            -87.0,
            -87.1,
            -200.0,
            f32::NEG_INFINITY,
            0.5,
            -0.5,
            0.346_573_6,
        ]);
        v
    }

    #[test]
    fn exp_is_accurate() {
        for x in inputs() {
            let got = exp_portable(x) as f64;
            if x < X_MIN {
                assert_eq!(got, 0.0);
                continue;
            }
            let want = (x.min(X_MAX) as f64).exp();
            assert!(
                ((got - want) / want).abs() < 3e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn simd_matches_portable_bit_for_bit() {
        let xs = inputs();
        let mut e = xs.clone();
        exp_slice(&mut e);
        for (x, g) in xs.iter().zip(&e) {
            assert_eq!(g.to_bits(), exp_portable(*x).to_bits(), "exp({x})");
        }
        let mut g = xs.clone();
        let u: Vec<f32> = xs.iter().map(|v| v * 0.5 + 1.0).collect();
        silu_mul(&mut g, &u);
        for ((x, uv), gv) in xs.iter().zip(&u).zip(&g) {
            assert_eq!(gv.to_bits(), silu_mul_one(*x, *uv).to_bits(), "silu({x})");
        }
        let mut h = xs.clone();
        gelu_tanh(&mut h);
        for (x, hv) in xs.iter().zip(&h) {
            assert_eq!(hv.to_bits(), gelu_tanh_one(*x).to_bits(), "gelu({x})");
        }
        for len in [1usize, 7, 8, 9, 31, 32, 40, 47, 100, 784] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 23) as f32 * 0.7 - 5.0)
                .collect();
            let mut a = row.clone();
            let mut b = row.clone();
            softmax_row(&mut a, 0.125);
            softmax_row_portable(&mut b, 0.125);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "len {len}"
            );
        }
    }

    #[test]
    fn activations_match_their_definitions() {
        for x in inputs()
            .into_iter()
            .filter(|v| v.is_finite() && v.abs() < 80.0)
        {
            let xd = x as f64;
            let silu = xd / (1.0 + (-xd).exp());
            let mut g = [x];
            silu_mul(&mut g, &[1.0]);
            assert!(
                (g[0] as f64 - silu).abs() <= 1e-6 * (1.0 + silu.abs()),
                "silu({x})"
            );
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let gelu = 0.5 * xd * (1.0 + (c * (xd + 0.044715 * xd * xd * xd)).tanh());
            let mut h = [x];
            gelu_tanh(&mut h);
            assert!(
                (h[0] as f64 - gelu).abs() <= 1e-6 * (1.0 + gelu.abs()),
                "gelu({x})"
            );
        }
        let mut row = vec![1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
        softmax_row(&mut row, 1.0);
        let z: f64 = (1f64).exp() + (2f64).exp() + (3f64).exp();
        for (i, v) in row.iter().take(3).enumerate() {
            assert!((*v as f64 - ((i + 1) as f64).exp() / z).abs() < 1e-6);
        }
        assert_eq!(row[3], 0.0);
    }
}
