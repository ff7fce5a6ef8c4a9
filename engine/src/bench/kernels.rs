//! Kernel micro-benchmarks on random data of the real shapes: the decoder's
//! int8-weight linear in the arithmetic of prefill and of decode, the vision f32 GEMM,
//! and the decode sweep over a bundle's int8 weights.

use super::{best_of, lcg, KernelRate};
use crate::kernels::matvec::{matvec_prefetching, prefetch, Prefetch};
use crate::kernels::path::best_path;
use crate::kernels::BLOCK;
use crate::weights::{Lin, Pass};
use crate::{Engine, EngineError, Result};
use half::f16;

/// The prefill linear's default shape (Qwen3-VL-8B): the 4096 × 4096 q_proj over a
/// 211-token prompt.
pub const PREFILL_SHAPE: (usize, usize, usize) = (4096, 4096, 211);
/// One decode step's largest matrix (gate/up, 8B), larger than the last-level cache.
pub const DECODE_SHAPE: (usize, usize) = (12288, 4096);
/// The vision GEMMs of one 448² image (784 patches; 8B qkv, fc1, fc2): name, M, K, N.
pub const VISION_SHAPES: [(&str, usize, usize, usize); 3] = [
    ("qkv", 784, 1152, 3456),
    ("fc1", 784, 1152, 4304),
    ("fc2", 784, 4304, 1152),
];

/// The micro-benchmarks' shapes; empty lists take the 8B defaults.
#[derive(Debug, Clone, Default)]
pub struct KernelShapes {
    /// Prefill int8-weight linears, `(rows, cols, tokens)`.
    pub prefill: Vec<(usize, usize, usize)>,
    /// Vision f32 GEMMs, `(m, k, n)`: patches × in → out.
    pub vision: Vec<(usize, usize, usize)>,
}

/// Random int8 weights, f16 scales and f32 activations of a shape.
pub(crate) fn q8_case(rows: usize, cols: usize, tokens: usize) -> (Vec<i8>, Vec<f16>, Vec<f32>) {
    let mut seed = 1;
    let q: Vec<i8> = (0..rows * cols)
        .map(|_| lcg(&mut seed) as u8 as i8)
        .collect();
    let s: Vec<f16> = (0..rows * cols / BLOCK)
        .map(|_| f16::from_f32((lcg(&mut seed) % 1000) as f32 * 1e-5))
        .collect();
    let x: Vec<f32> = (0..tokens * cols)
        .map(|_| (lcg(&mut seed) % 2001) as f32 * 1e-3 - 1.0)
        .collect();
    (q, s, x)
}

/// Times `product(weights, scales, activations, out)` on [`q8_case`]'s data of one
/// shape: best of `reps`, as multiply-adds × 2 per second.
pub(crate) fn q8_rate(
    rows: usize,
    cols: usize,
    tokens: usize,
    reps: usize,
    mut product: impl FnMut(&[i8], &[f16], &[f32], &mut [f32]),
) -> KernelRate {
    let (q, s, x) = q8_case(rows, cols, tokens);
    let mut out = vec![0f32; tokens * rows];
    let (wall, cpu) = best_of(reps, || {
        product(&q, &s, &x, &mut out);
        std::hint::black_box(&out);
    });
    KernelRate::of(2.0 * (rows * cols * tokens) as f64, wall, cpu)
}

/// The engine's int8-weight linear ([`crate::weights::Lin::matmul`]): an int8
/// `rows × cols` weight against `tokens` f32 activation rows, in the arithmetic of
/// the pass that runs that many tokens (the int16-activation GEMM for a prefill, the
/// int16-activation matrix-vector kernel for a decode step); on the current rayon
/// pool, best of `reps`.
pub fn q8_linear_rate(rows: usize, cols: usize, tokens: usize, reps: usize) -> KernelRate {
    q8_rate(rows, cols, tokens, reps, |q, s, x, out| {
        let lin = Lin::Q8 { q, s, rows, cols };
        lin.matmul(Pass::of(tokens), x, tokens, out);
    })
}

/// The vision GEMM: `m` rows of f32 activations against an f16 `n × k` weight with
/// bias ([`crate::kernels::gemm::linear_f16`]), on the current rayon pool; best of `reps`.
pub fn f16_linear_rate(m: usize, k: usize, n: usize, reps: usize) -> KernelRate {
    let mut seed = 2;
    let w: Vec<f16> = (0..n * k)
        .map(|_| f16::from_f32((lcg(&mut seed) % 2001) as f32 * 1e-4 - 0.1))
        .collect();
    let bias: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
    let x: Vec<f32> = (0..m * k)
        .map(|_| (lcg(&mut seed) % 2001) as f32 * 1e-3 - 1.0)
        .collect();
    let mut out = vec![0f32; m * n];
    let (wall, cpu) = best_of(reps, || {
        crate::kernels::gemm::linear_f16(&x, m, k, &w, n, Some(&bias), &mut out);
        std::hint::black_box(&out);
    });
    KernelRate::of(2.0 * (m * n * k) as f64, wall, cpu)
}

/// The decode step's matrix products alone: every int8 weight of `bundle` against
/// one activation row, with the pool's other threads kept awake as in a decode step
/// ([`crate::awake`]) ([`crate::kernels::matvec::matvec`]), straight from the memory
/// map, on the current rayon pool. Returns the best sweep's weight bytes (values and
/// scales) per second over `reps` sweeps with the prefetch the decode kernel issues.
pub fn q8_sweep_rate(bundle: &q3vl_bundle::Bundle, reps: usize) -> f64 {
    let chosen = prefetch();
    q8_sweep_rates(bundle, reps, &[chosen])[0].1
}

/// [`q8_sweep_rate`] with each prefetch of `variants`, the variants taking turns
/// sweep by sweep (this host drifts): bytes/s of each.
pub fn q8_sweep_rates(
    bundle: &q3vl_bundle::Bundle,
    reps: usize,
    variants: &[Prefetch],
) -> Vec<(Prefetch, f64)> {
    let weights: Vec<_> = bundle
        .tensor_names()
        .into_iter()
        .filter_map(|n| bundle.q8(n))
        .collect();
    let bytes: usize = weights.iter().map(|(q, s, _)| q.len() + 2 * s.len()).sum();
    let cols_max = weights.iter().map(|(_, _, [_, c])| *c).max().unwrap_or(0);
    let x: Vec<f32> = (0..cols_max)
        .map(|i| ((i % 17) as f32 - 8.0) * 0.01)
        .collect();
    let rows_max = weights.iter().map(|(_, _, [r, _])| *r).max().unwrap_or(0);
    let mut out = vec![0f32; rows_max];
    let path = best_path();
    let mut best = vec![f64::MAX; variants.len()];
    for _ in 0..reps.max(1) {
        for (pf, best) in variants.iter().zip(best.iter_mut()) {
            let (wall, _) = best_of(1, || {
                // As in a decode step: the pool's other threads kept awake between
                // products.
                crate::awake::awake_here(|| {
                    for (q, s, [rows, cols]) in &weights {
                        let o = &mut out[..*rows];
                        matvec_prefetching(path, *pf, q, s, *rows, *cols, &x[..*cols], o);
                        std::hint::black_box(o);
                    }
                })
            });
            *best = best.min(wall);
        }
    }
    variants
        .iter()
        .zip(best)
        .map(|(pf, wall)| (*pf, bytes as f64 / wall))
        .collect()
}

/// The kernel rates, named as `q3vl bench` reports them: the prefill int8-weight
/// linear of each prefill shape, the decode linear, the vision GEMM of each vision
/// shape. On the current rayon pool.
pub fn kernel_rates(shapes: &KernelShapes) -> Vec<(String, KernelRate)> {
    let mut v = Vec::new();
    let default = [PREFILL_SHAPE];
    let prefill = if shapes.prefill.is_empty() {
        &default[..]
    } else {
        &shapes.prefill[..]
    };
    for &(r, c, t) in prefill {
        v.push((
            format!("prefill w8a16 gemm {r}x{c} x {t} tok"),
            q8_linear_rate(r, c, t, 7),
        ));
    }
    let (r, c) = DECODE_SHAPE;
    v.push((
        format!("decode w8a16 {r}x{c} x 1 tok"),
        q8_linear_rate(r, c, 1, 7),
    ));
    if shapes.vision.is_empty() {
        for (name, m, k, n) in VISION_SHAPES {
            v.push((
                format!("vision {name} {m}x{k} -> {n}"),
                f16_linear_rate(m, k, n, 5),
            ));
        }
    }
    for &(m, k, n) in &shapes.vision {
        v.push((
            format!("vision {m}x{k} -> {n}"),
            f16_linear_rate(m, k, n, 5),
        ));
    }
    v
}

/// What `q3vl bench --kernels-only` measures.
#[derive(Debug, Clone)]
pub struct KernelBench {
    /// Worker threads.
    pub threads: usize,
    /// The kernels' instruction path.
    pub kernel_path: &'static str,
    /// The decode kernel's prefetch ([`super::run::decode_prefetch_name`]).
    pub decode_prefetch: &'static str,
    /// [`kernel_rates`].
    pub rates: Vec<(String, KernelRate)>,
    /// With an engine: [`q8_sweep_rate`] over its language bundle, bytes/s.
    pub decode_sweep: Option<f64>,
}

/// The micro-benchmarks on `threads` threads (the engine's, else the given count,
/// else every core), plus the decode sweep over `engine`'s int8 weights.
pub fn kernels_only(
    engine: Option<&Engine>,
    threads: Option<usize>,
    shapes: &KernelShapes,
) -> Result<KernelBench> {
    let threads = match engine {
        Some(e) => e.threads(),
        None => {
            threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        }
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|source| EngineError::ThreadPool { threads, source })?;
    let rates = pool.install(|| kernel_rates(shapes));
    let decode_sweep = engine.map(|e| pool.install(|| q8_sweep_rate(e.language(), 5)));
    Ok(KernelBench {
        threads,
        kernel_path: best_path().name(),
        decode_prefetch: super::run::decode_prefetch_name(),
        rates,
        decode_sweep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_rates_are_positive() {
        // The per-CPU rate is absent or positive, never infinite (a call too short
        // for the CPU clock to register).
        let r = q8_linear_rate(8, 64, 5, 1);
        assert!(
            r.g_per_cpu_s.is_none_or(|v| v.is_finite() && v > 0.0),
            "{r:?}"
        );
        assert!(q8_linear_rate(8, 64, 5, 1).g_per_s > 0.0);
        assert!(q8_linear_rate(8, 64, 1, 1).g_per_s > 0.0);
        assert!(f16_linear_rate(7, 32, 16, 1).g_per_s > 0.0);
    }
}
