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
