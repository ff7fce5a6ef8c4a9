use half::f16;
use std::arch::x86_64::*;

/// AVX2+FMA f32 dot: one 8-lane FMA accumulator, lanes summed in order, then the tail.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < full {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc,
        );
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut s = 0f32;
    for l in lanes {
        s += l;
    }
    for j in full..n {
        s += a[j] * b[j];
    }
    s
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
