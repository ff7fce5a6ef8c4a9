//! The comparison kernels of `make bench-q8` (feature `q8-bench`), beside the
//! engine's own int8-weight linear on the same data: the packed f32 GEMM on the int8
//! weights dequantized tile by tile (the reference's arithmetic, and the engine's
//! prefill before the int16 GEMM) and the int8 × int8 (W8A8, Q8_0-style) product.
//! Neither runs in the engine; `q3vl bench` does not measure them.

use super::kernels::{q8_linear_rate, q8_rate, PREFILL_SHAPE};
use super::KernelRate;
use crate::kernels::q8::{self, QActs};

/// The packed f32 GEMM on int8 weights dequantized tile by tile
/// ([`crate::kernels::gemm::linear_q8`]), for comparison with [`q8_linear_rate`];
/// best of `reps`.
pub fn q8_f32_gemm_rate(rows: usize, cols: usize, tokens: usize, reps: usize) -> KernelRate {
    q8_rate(rows, cols, tokens, reps, |q, s, x, out| {
        crate::kernels::gemm::linear_q8(x, tokens, cols, q, s, rows, out)
    })
}

/// The int8 × int8 (W8A8, Q8_0-style) matrix product [`q8::matmul`], activations
/// quantized per call, for comparison with [`q8_linear_rate`]; best of `reps`.
pub fn q8_matmul_rate(rows: usize, cols: usize, tokens: usize, reps: usize) -> KernelRate {
    q8_rate(rows, cols, tokens, reps, |q, s, x, out| {
        let xq = QActs::quantize(x, cols);
        q8::matmul(q, s, rows, cols, &xq, out);
    })
}

/// For each `(rows, cols, tokens)` shape (none: the 8B prefill linear), the engine's
/// prefill linear, the dequantized f32 GEMM and the W8A8 product on the same data,
/// named as `q3vl bench` named them; on the current rayon pool, best of `reps`.
pub fn q8_comparison(shapes: &[(usize, usize, usize)], reps: usize) -> Vec<(String, KernelRate)> {
    let default = [PREFILL_SHAPE];
    let shapes = if shapes.is_empty() {
        &default[..]
    } else {
        shapes
    };
    let mut v = Vec::new();
    for &(r, c, t) in shapes {
        v.push((
            format!("prefill w8a16 gemm {r}x{c} x {t} tok"),
            q8_linear_rate(r, c, t, reps),
        ));
        v.push((
            format!("f32 gemm (dequantized) {r}x{c} x {t} tok"),
            q8_f32_gemm_rate(r, c, t, reps),
        ));
        v.push((
            format!("w8a8 {r}x{c} x {t} tok"),
            q8_matmul_rate(r, c, t, reps),
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_rates_are_positive() {
        // The per-CPU rate is absent or positive, never infinite (a call too short
        // for the CPU clock to register).
        let r = q8_matmul_rate(8, 64, 5, 1);
        assert!(
            r.g_per_cpu_s.is_none_or(|v| v.is_finite() && v > 0.0),
            "{r:?}"
        );
        assert!(q8_matmul_rate(8, 64, 5, 1).g_per_s > 0.0);
        assert!(q8_f32_gemm_rate(8, 64, 5, 1).g_per_s > 0.0);
        let named = q8_comparison(&[(8, 64, 5)], 1);
        assert_eq!(named.len(), 3);
        assert!(named.iter().all(|(_, r)| r.g_per_s > 0.0), "{named:?}");
    }
}
