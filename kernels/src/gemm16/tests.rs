use super::*;
use crate::matvec::quantize_block16;
use crate::path::available_paths;
use crate::testing::{assert_same_bits, lcg, on_threads, random_weight};

/// One output of the module's arithmetic, straight from the definition (the
/// tests' reference).
fn naive(x: &[f32], q: &[i8], s: &[f16]) -> f32 {
    let mut acc = 0f32;
    let mut xq = [0i16; BLOCK];
    for b in 0..x.len() / BLOCK {
        let d = quantize_block16(&x[b * BLOCK..][..BLOCK], &mut xq);
        let sum: i32 = (0..BLOCK)
            .map(|t| q[b * BLOCK + t] as i32 * xq[t] as i32)
            .sum();
        acc = (sum as f32).mul_add(s[b].to_f32() * d, acc);
    }
    acc
}

/// Activations with every block's magnitude different, extremes included, so
/// the quantized values reach ±32767.
fn acts(seed: &mut u64, m: usize, k: usize) -> Vec<f32> {
    (0..m * k)
        .map(|i| {
            let scale = [1e-3, 1.0, 37.0, 0.25][(i / BLOCK) % 4];
            ((lcg(seed) % 20001) as f32 - 10000.0) / 10000.0 * scale
        })
        .collect()
}

fn reference(x: &[f32], m: usize, k: usize, q: &[i8], s: &[f16], n: usize) -> Vec<f32> {
    let nb = k / BLOCK;
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = naive(&x[i * k..][..k], &q[j * k..][..k], &s[j * nb..][..nb]);
        }
    }
    out
}

#[test]
fn every_path_matches_the_definition_bit_for_bit_on_odd_shapes() {
    let mut seed = 11;
    // m around the tile (6) and MC (96); n around NR (16), two panels (32) and a
    // task; k around KC (256: 8 blocks), including one block.
    for &(m, k, n) in &[
        (1, 32, 1),
        (2, 64, 16),
        (3, 32, 20),
        (4, 96, 18),
        (5, 64, 17),
        (6, 256, 16),
        (6, 288, 32),
        (7, 288, 33),
        (11, 64, 48),
        (13, 544, 70),
        (97, 96, 300),
    ] {
        let x = acts(&mut seed, m, k);
        let (q, s) = random_weight(&mut seed, n, k / BLOCK);
        let want = reference(&x, m, k, &q, &s, n);
        for path in available_paths() {
            let mut out = vec![f32::NAN; m * n];
            let w = Int8Weight { q: &q, s: &s, n, k };
            linear_w8a16_on(path, &x, m, w, &mut out);
            assert_same_bits(&out, &want, &format!("{path:?} {m}x{k}x{n}"));
        }
    }
}

#[test]
fn every_tile_equals_the_portable_tile() {
    // Each path's tiles (every row count; one panel, and two where the path has a
    // pair tile) on the same packed operands as the portable tile, in two calls
    // (the second continues the first's sums), as two KC slices do.
    let mut seed = 5;
    let (m, k, n) = (MR, 3 * KC / 2, 2 * NR);
    let x = acts(&mut seed, m, k);
    let (q, s) = random_weight(&mut seed, n, k / BLOCK);
    let a = PackedActs::new(best_path(), &x, m, k);
    let nb = k / BLOCK;
    let half = nb / 2;
    let run = |path: Path, kern: MicroFn, width: usize| {
        // The weights packed in two slices (half, then the rest), each slice's
        // panels adjacent, as `gemm_cols` packs them.
        let mut out = vec![f32::NAN; m * width];
        for (b0, nbk) in [(0, half), (half, nb - half)] {
            let mut bq = vec![0i32; 2 * nbk * PAIRS * NR];
            let mut bs = vec![0f32; 2 * nbk * NR];
            let w = Int8Weight { q: &q, s: &s, n, k };
            pack_weights(path, w, 0..n, b0..b0 + nbk, &mut bq, &mut bs);
            let (ap, ad) = a.panel(0, b0);
            let ops = Panels {
                a: ap,
                ad,
                b: bq.as_ptr(),
                bd: bs.as_ptr(),
            };
            // SAFETY: the operands hold nbk blocks of two panels; out is MR × width.
            unsafe { kern(nbk, ops, out.as_mut_ptr(), width, b0 == 0) };
        }
        out
    };
    let port = run(Path::Portable, micro_portable, NR);
    let want = reference(&x, m, k, &q, &s, n);
    let cols = |v: &[f32], w: usize, rows: usize, c: usize| -> Vec<f32> {
        (0..rows).flat_map(|i| v[i * w..][..c].to_vec()).collect()
    };
    assert_same_bits(&port, &cols(&want, n, m, NR), "portable vs definition");
    for path in available_paths() {
        for rows in 1..=MR {
            let one = run(path, micro(path, rows), NR);
            let what = format!("{path:?} tile of {rows} rows");
            assert_same_bits(&one[..rows * NR], &port[..rows * NR], &what);
            if let Some(kp) = micro_pair(path, rows) {
                let two = run(path, kp, n);
                let what = format!("{path:?} pair tile of {rows} rows");
                assert_same_bits(&two[..rows * n], &want[..rows * n], &what);
            }
        }
    }
}

#[test]
fn the_weight_packing_paths_agree() {
    let mut seed = 3;
    let (n, k) = (40, 352);
    let nb = k / BLOCK;
    let (q, s) = random_weight(&mut seed, n, nb);
    let panels = n.div_ceil(NR);
    // A full slice (the transposed scales) and a short last one, from block 2:
    // two full panels (the SIMD packing) and a partial one (the scalar packing).
    for nbk in [KC / BLOCK, 3] {
        let mut pairs = vec![0i32; panels * nbk * PAIRS * NR];
        let mut scales = vec![0f32; panels * nbk * NR];
        for path in available_paths() {
            let w = Int8Weight { q: &q, s: &s, n, k };
            pack_weights(path, w, 0..n, 2..2 + nbk, &mut pairs, &mut scales);
            for p in 0..panels {
                for jj in 0..NR {
                    let j = p * NR + jj;
                    for blk in 0..nbk {
                        let want = if j < n {
                            s[j * nb + 2 + blk].to_f32()
                        } else {
                            0.0
                        };
                        let got = scales[(p * nbk + blk) * NR + jj];
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{path:?} scale j={j} b={blk}"
                        );
                        for pp in 0..PAIRS {
                            let got = pairs[((p * nbk + blk) * PAIRS + pp) * NR + jj];
                            let (lo, hi) = if j < n {
                                let c = j * k + (2 + blk) * BLOCK + 2 * pp;
                                (q[c] as i32, q[c + 1] as i32)
                            } else {
                                (0, 0)
                            };
                            assert_eq!(
                                (got as i16 as i32, got >> 16),
                                (lo, hi),
                                "{path:?} nbk={nbk} j={j} b={blk} p={pp}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut seed = 9;
    let (m, k, n) = (20, 512, 700);
    let x = acts(&mut seed, m, k);
    let (q, s) = random_weight(&mut seed, n, k / BLOCK);
    let run = |threads| {
        on_threads(threads, || {
            let mut out = vec![0f32; m * n];
            linear_w8a16(&x, m, k, &q, &s, n, &mut out);
            out
        })
    };
    let one = run(1);
    assert_same_bits(&run(2), &one, "2 threads");
    assert_same_bits(&run(3), &one, "3 threads");
}

#[test]
fn a_row_does_not_depend_on_the_other_rows() {
    let mut seed = 21;
    let (m, k, n) = (15, 256, 48);
    let x = acts(&mut seed, m, k);
    let (q, s) = random_weight(&mut seed, n, k / BLOCK);
    let mut all = vec![0f32; m * n];
    linear_w8a16(&x, m, k, &q, &s, n, &mut all);
    let mut last = vec![0f32; n];
    linear_w8a16(&x[(m - 1) * k..], 1, k, &q, &s, n, &mut last);
    assert_same_bits(&last, &all[(m - 1) * n..], "last row alone");
}

#[test]
fn is_close_to_the_f32_product_and_propagates_nan() {
    let mut seed = 17;
    let (m, k, n) = (8, 256, 24);
    let mut x = acts(&mut seed, m, k);
    let (q, s) = random_weight(&mut seed, n, k / BLOCK);
    // The f32 GEMM on the dequantized weights (the bits of `gemm::linear_q8`, which
    // its own test checks).
    let w: Vec<f32> = (0..n * k)
        .map(|i| q[i] as f32 * s[i / BLOCK].to_f32())
        .collect();
    let mut f32out = vec![0f32; m * n];
    crate::gemm::linear(&x, m, k, &w, n, None, &mut f32out);
    let mut out = vec![0f32; m * n];
    linear_w8a16(&x, m, k, &q, &s, n, &mut out);
    for (i, (a, b)) in out.iter().zip(&f32out).enumerate() {
        // Per block the rounding moves each activation by at most amax/65534.
        let bound = 1e-4 * f32out.iter().map(|v| v.abs()).fold(0.0, f32::max);
        assert!((a - b).abs() <= bound, "i={i}: {a} vs {b}");
    }
    x[3 * k + 40] = f32::NAN;
    linear_w8a16(&x, m, k, &q, &s, n, &mut out);
    assert!(out[3 * n..4 * n].iter().all(|v| v.is_nan()));
    assert!(out[..3 * n]
        .iter()
        .chain(&out[4 * n..])
        .all(|v| v.is_finite()));
}

#[test]
fn empty_shapes() {
    let mut out = vec![1f32; 6];
    linear_w8a16(&[], 2, 0, &[], &[], 3, &mut out);
    assert!(out.iter().all(|&v| v == 0.0));
    linear_w8a16(&[], 0, 32, &[0; 96], &[f16::ONE; 3], 3, &mut []);
}
