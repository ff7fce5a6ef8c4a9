use super::*;
use crate::path::available_paths;
use crate::testing::{
    assert_same_bits, lcg, on_threads, random_rows, random_scales, random_weight,
};

#[test]
fn every_tile_of_every_path_matches_portable_bit_for_bit() {
    let mut seed = 7;
    let paths = available_paths();
    println!("q8 paths on this CPU: {paths:?}");
    for nb in [1usize, 2, 3, 4, 5, 7, 9, 33, 128, 131] {
        for _case in 0..6 {
            let w = random_rows(&mut seed, TILE_R, nb, true);
            let x = random_rows(&mut seed, TILE_C, nb, false);
            let ws = random_scales(&mut seed, TILE_R * nb, true);
            let ws16: Vec<f16> = ws.iter().map(|&v| f16::from_f32(v)).collect();
            let xd = random_scales(&mut seed, TILE_C * nb, false);
            let n = nb * BLOCK;
            let want: Vec<Vec<f32>> = (0..TILE_R)
                .map(|r| {
                    (0..TILE_C)
                        .map(|c| {
                            dot_portable(
                                &w[r * n..(r + 1) * n],
                                &ws[r * nb..(r + 1) * nb],
                                &x[c * n..(c + 1) * n],
                                &xd[c * nb..(c + 1) * nb],
                            )
                        })
                        .collect()
                })
                .collect();
            for &p in &paths {
                for rc in 1..=TILE_R {
                    for cc in 1..=TILE_C {
                        let mut sc = vec![0f32; rc * cc * nb];
                        let mut out = vec![0f32; rc * cc];
                        let wr = WeightRows {
                            q: w.as_ptr(),
                            s: ws16.as_ptr(),
                            ld: n,
                        };
                        let xr = ActRows {
                            q: x.as_ptr(),
                            d: xd.as_ptr(),
                            ld: n,
                        };
                        // SAFETY: rc rows of w and cc rows of x, each n bytes with
                        // nb scales; sc and out sized above; the path is available.
                        unsafe { tile(p, rc, cc)(wr, xr, nb, sc.as_mut_ptr(), out.as_mut_ptr()) };
                        for i in 0..rc {
                            for c in 0..cc {
                                assert_eq!(
                                    out[i * cc + c].to_bits(),
                                    want[i][c].to_bits(),
                                    "{p:?} tile {rc}x{cc} pair ({i},{c}) nb={nb}"
                                );
                            }
                        }
                    }
                }
                let got = dot_on(p, &w[..n], &ws16[..nb], &x[..n], &xd[..nb]);
                assert_eq!(got.to_bits(), want[0][0].to_bits(), "{p:?} dot nb={nb}");
            }
        }
    }
}

#[test]
fn portable_dot_is_close_to_exact() {
    let mut seed = 3;
    for nb in [1usize, 4, 128] {
        let w = random_rows(&mut seed, 1, nb, true);
        let x = random_rows(&mut seed, 1, nb, false);
        let ws = random_scales(&mut seed, nb, true);
        let xd = random_scales(&mut seed, nb, false);
        let exact: f64 = (0..nb)
            .map(|b| {
                let s: i64 = (0..BLOCK)
                    .map(|j| w[b * BLOCK + j] as i64 * x[b * BLOCK + j] as i64)
                    .sum();
                s as f64 * ws[b] as f64 * xd[b] as f64
            })
            .sum();
        let mag: f64 = (0..nb)
            .map(|b| 32.0 * 128.0 * 127.0 * ws[b] as f64 * xd[b] as f64)
            .sum();
        let got = dot_portable(&w, &ws, &x, &xd) as f64;
        assert!(
            (got - exact).abs() <= mag * 1e-6,
            "nb={nb}: {got} vs {exact}"
        );
    }
}

#[test]
fn matmul_is_independent_of_paths_tiles_and_threads() {
    let mut seed = 11;
    // Rows and tokens that are not multiples of the tiles or of the task size.
    for (rows, nb, t) in [
        (1usize, 1usize, 1usize),
        (5, 3, 7),
        (67, 4, 13),
        (130, 9, 1),
        (33, 131, 6),
    ] {
        let cols = nb * BLOCK;
        let (q, s) = random_weight(&mut seed, rows, nb);
        let xf: Vec<f32> = (0..t * cols)
            .map(|i| ((lcg(&mut seed) % 2001) as f32 - 1000.0) * 1e-3 * (1 + i % 5) as f32)
            .collect();
        let x = QActs::quantize(&xf, cols);
        let mut want = vec![0f32; t * rows];
        for tok in 0..t {
            let (xr, xd) = x.row(tok);
            for r in 0..rows {
                let ws: Vec<f32> = s[r * nb..(r + 1) * nb].iter().map(|v| v.to_f32()).collect();
                want[tok * rows + r] = dot_portable(&q[r * cols..(r + 1) * cols], &ws, xr, xd);
            }
        }
        for &p in &available_paths() {
            for threads in [1usize, 2, 3] {
                let mut out = vec![f32::NAN; t * rows];
                on_threads(threads, || matmul_on(p, &q, &s, rows, cols, &x, &mut out));
                let what = format!("{p:?} threads={threads} rows={rows} nb={nb} t={t}");
                assert_same_bits(&out, &want, &what);
            }
        }
    }
}

#[test]
fn extreme_block_sum_is_exact() {
    let w = vec![-128i8; 32];
    let x = vec![-127i8; 32];
    for &p in &available_paths() {
        let got = dot_on(p, &w, &[f16::ONE], &x, &[1.0]);
        assert_eq!(got, (32 * 128 * 127) as f32, "{p:?}");
    }
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
    // Ties, tiny and huge values, zeros, and blocks that end up all-zero.
    let mut seed = 5u64;
    let mut odd: Vec<f32> = (0..32 * 64)
        .map(|i| match i % 7 {
            0 => ((lcg(&mut seed) % 255) as f32 - 127.0) * 0.5,
            1 => 0.0,
            2 => -1e-30,
            3 => 3e38 * if i % 2 == 0 { 1.0 } else { -1.0 },
            _ => ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-3,
        })
        .collect();
    odd[64..96].fill(0.0);
    odd[96..128].fill(-0.0);
    // Every path quantizes as `quantize_block` does, byte for byte.
    for &p in &available_paths() {
        let qo = QActs::quantize_on(p, &odd, 64);
        for (b, xb) in odd.chunks_exact(32).enumerate() {
            let mut qq = [0i8; 32];
            let d = quantize_block(xb, &mut qq);
            assert_eq!(d.to_bits(), qo.d[b].to_bits(), "{p:?} block {b}");
            assert_eq!(&qq[..], &qo.q[b * 32..(b + 1) * 32], "{p:?} block {b}");
        }
    }
    // Large inputs are quantized in parallel chunks; the result is per block.
    let big: Vec<f32> = (0..3 * 70_000 / 32 * 32)
        .map(|i| ((i * 37) % 101) as f32 - 50.0)
        .collect();
    for &p in &available_paths() {
        let qb = QActs::quantize_on(p, &big, 32);
        for (b, xb) in big.chunks_exact(32).enumerate() {
            let mut qq = [0i8; 32];
            let d = quantize_block(xb, &mut qq);
            assert_eq!(d.to_bits(), qb.d[b].to_bits(), "{p:?}");
            assert_eq!(&qq[..], &qb.q[b * 32..(b + 1) * 32], "{p:?}");
        }
    }
}
