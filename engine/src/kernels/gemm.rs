//! f32 matrix products for the vision tower, on the `gemm` crate's packed AVX2/FMA
//! kernels.
//!
//! Determinism: the output columns are cut into fixed-width slices (independent of
//! the thread count), each computed by its own single-threaded `gemm` call over the
//! full reduction, so a value never depends on how many threads ran.

use rayon::prelude::*;

/// Output columns per task.
const COLS_PER_TASK: usize = 64;

/// `out[t, n] = Σ_k x[t, k] · w[n, k] (+ bias[n])`: `x` is `m × k`, `w` is `n × k`
/// (the PyTorch `Linear` layout), `out` is `m × n`, all row-major.
pub fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    // Each task writes a column slice of every output row; collect them, then scatter.
    let tasks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(COLS_PER_TASK))
        .into_par_iter()
        .map(|c| {
            let c0 = c * COLS_PER_TASK;
            let nc = COLS_PER_TASK.min(n - c0);
            let mut part = vec![0f32; m * nc];
            // SAFETY: every pointer/stride pair addresses inside its slice: part is
            // m × nc row-major, x is m × k row-major, w[c0..c0+nc] is nc × k row-major,
            // read as its transpose (k × nc) through swapped strides.
            unsafe {
                gemm::gemm(
                    m,
                    nc,
                    k,
                    part.as_mut_ptr(),
                    1,
                    nc as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr().add(c0 * k),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            (c0, part)
        })
        .collect();
    for (c0, part) in tasks {
        let nc = part.len() / m;
        for r in 0..m {
            out[r * n + c0..r * n + c0 + nc].copy_from_slice(&part[r * nc..(r + 1) * nc]);
        }
    }
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(n) {
            for (o, bv) in row.iter_mut().zip(b) {
                *o += bv;
            }
        }
    }
}

/// `out = a · bᵀ` for `a: m × k`, `b: n × k` on the calling thread (attention scores).
pub fn matmul_abt_serial(a: &[f32], m: usize, k: usize, b: &[f32], n: usize, out: &mut [f32]) {
    // SAFETY: as in `linear`, every access stays inside the given slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `out = a · b` for `a: m × k`, `b: k × n` on the calling thread (attention × V).
pub fn matmul_ab_serial(a: &[f32], m: usize, k: usize, b: &[f32], n: usize, out: &mut [f32]) {
    // SAFETY: as in `linear`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_naive() {
        let (m, k, n) = (5, 37, 130);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut out = vec![0f32; m * n];
        linear(&x, m, k, &w, n, Some(&b), &mut out);
        for r in 0..m {
            for c in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum::<f32>() + b[c];
                assert_eq!(out[r * n + c], want);
            }
        }
        let mut o2 = vec![0f32; m * n];
        matmul_abt_serial(&x, m, k, &w, n, &mut o2);
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let mut o3 = vec![0f32; m * n];
        matmul_ab_serial(&x, m, k, &wt, n, &mut o3);
        for i in 0..m * n {
            assert_eq!(o2[i] + b[i % n], out[i]);
            assert_eq!(o3[i], o2[i]);
        }
    }
}
