use super::*;
use crate::path::available_paths;
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
        assert_same_bits(&linear_f16_vec(&x, m, k, &w16, n, Some(&b)), &o32, "vec");
        assert_same_bits(
            &linear_f16_vec(&x[..0], m, 0, &[], n, Some(&b)),
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
        let xa = MatRef {
            data: &x,
            rows: m,
            cols: k,
            stride: k,
        };
        let oc = MatMut {
            data: &mut os,
            rows: m,
            cols: n,
            stride: n + 3,
        };
        gemm_serial(xa, bt, oc);
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

#[cfg(feature = "q8")]
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
    // SAFETY: a, b and the tile are sized for kc.
    unsafe { micro_portable(kc, a.as_ptr(), b.as_ptr(), want.as_mut_ptr(), NR, true) };
    for path in available_paths() {
        let mut got = vec![0f32; MR * NR];
        // SAFETY: a, b and the tile are sized for kc; the path is available.
        unsafe { (tiles(path).one)(kc, a.as_ptr(), b.as_ptr(), got.as_mut_ptr(), NR, true) };
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{path:?}: {g} vs {w}"
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_avx512_pair_tile_equals_two_avx2_tiles_bit_for_bit() {
    // The hardware decides, not Q3VL_KERNEL_PATH: the tile is tested wherever it can run.
    if !available_paths().contains(&Path::Avx512Vnni) {
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
        let (avx2, avx512) = (tiles(Path::Avx2), tiles(Path::Avx512Vnni));
        let pair = avx512.pair.expect("the AVX-512 path has a pair tile");
        // SAFETY: a holds kc·MR floats, b two panels of kc·NR, the tiles MR × 2NR;
        // both paths' features were checked.
        unsafe {
            for u in 0..2 {
                let (bu, cu) = (b.as_ptr().add(u * kc * NR), want.as_mut_ptr().add(u * NR));
                (avx2.one)(kc, a.as_ptr(), bu, cu, 2 * NR, first);
            }
            pair(kc, a.as_ptr(), b.as_ptr(), got.as_mut_ptr(), 2 * NR, first);
        }
        assert_same_bits(&got, &want, &format!("first={first}"));
    }
}
