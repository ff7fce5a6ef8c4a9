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

fn close(
    got: &[f32],
    want: &[f64],
    x: &[f32],
    w: &[f32],
    shape: (usize, usize, usize),
    what: &str,
) {
    let (m, k, n) = shape;
    for i in 0..m {
        for j in 0..n {
            let mag: f64 = (0..k)
                .map(|q| (x[i * k + q] as f64 * w[j * k + q] as f64).abs())
                .sum();
            let d = (got[i * n + j] as f64 - want[i * n + j]).abs();
            assert!(
                d <= mag * 1e-6 + 1e-30,
                "{what} ({i},{j}): {} vs {}",
                got[i * n + j],
                want[i * n + j]
            );
        }
    }
}

/// The linear product of `x` (`m × k`) and the weight `b` (`n` columns), plus `bias`.
fn lin<'a>(
    x: &'a [f32],
    (m, k, n): (usize, usize, usize),
    b: BSrc<'a>,
    bias: Option<&'a [f32]>,
) -> Linear<'a> {
    Linear {
        x,
        m,
        k,
        b,
        n,
        bias,
    }
}

/// `n` values in [−1, 1) with full 24-bit significands, so that products and sums round.
fn rnd(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (lcg(seed) % 2_000_003) as f32 * 1e-6 - 1.0)
        .collect()
}

/// An int8 weight `n × k` and its block scales, and the same weight dequantized.
#[cfg(feature = "q8")]
fn q8_weight(seed: &mut u64, n: usize, k: usize) -> (Vec<i8>, Vec<f16>, Vec<f32>) {
    let q: Vec<i8> = (0..n * k).map(|_| (lcg(seed) % 256) as u8 as i8).collect();
    let s: Vec<f16> = (0..n * k / 32)
        .map(|_| f16::from_f32((lcg(seed) % 997) as f32 * 1e-3 + 1e-4))
        .collect();
    let w = (0..n * k)
        .map(|i| q[i] as f32 * s[i / 32].to_f32())
        .collect();
    (q, s, w)
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
        // The transpose of w (B strided along the reduction), and x transposed with
        // column stride m + 2.
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let mut xt = vec![f32::NAN; k * (m + 2)];
        for i in 0..m {
            for kk in 0..k {
                xt[kk * (m + 2) + i] = x[i * k + kk];
            }
        }
        let shape = (m, k, n);
        let (f16w, f32w) = (
            BSrc::F16(&w16),
            BSrc::F32 {
                data: &w,
                rs: k,
                cs: 1,
            },
        );
        for path in available_paths() {
            let what = format!("{path:?} {m}x{k}x{n}");
            let mut o16 = vec![f32::NAN; m * n];
            linear_on(path, lin(&x, shape, f16w, None), &mut o16);
            close(&o16, &want, &x, &w, shape, &what);
            let mut o32 = vec![f32::NAN; m * n];
            linear_on(path, lin(&x, shape, f32w, Some(&b)), &mut o32);
            for i in 0..m * n {
                assert_eq!(
                    o32[i],
                    o16[i] + b[i % n],
                    "{what}: bias is added after the sum"
                );
            }
            // Into a new (never zeroed) vector: the same bits.
            let ov = linear_vec_on(path, lin(&x, shape, f16w, Some(&b)));
            assert_same_bits(&ov, &o32, &format!("{what} vec"));
            let empty = lin(&x[..0], (m, 0, n), BSrc::F16(&[]), Some(&b));
            let what0 = format!("{what} k = 0");
            assert_same_bits(&linear_vec_on(path, empty), &b.repeat(m), &what0);
            let serial = serial_entries(path, &x, &xt, &wt, shape);
            for (entry, out) in &serial {
                for i in 0..m {
                    for j in 0..n {
                        let (g, w) = (out[i * (n + 3) + j], o16[i * n + j]);
                        assert_eq!(g.to_bits(), w.to_bits(), "{what} {entry} ({i},{j})");
                    }
                }
            }
            if path == best_path() {
                let public = public_entries(&x, &xt, &w16, &wt, shape);
                let mut on_path = vec![o16, ov];
                on_path.extend(serial.into_iter().map(|(_, out)| out));
                for (p, o) in public.iter().zip(&on_path) {
                    assert_same_bits(p, o, &format!("{what}: public entry"));
                }
            }
        }
    }
}

/// Every serial entry on `path`, with `B` strided along the reduction (`wt`, the
/// transpose of the `n × k` weight) and output rows of stride `n + 3`: `gemm_serial`,
/// `gemm_serial_packed`, and `gemm_serial_packed_a` with `A` packed from its rows and
/// from its transpose `xt` (column stride `m + 2`).
fn serial_entries(
    path: Path,
    x: &[f32],
    xt: &[f32],
    wt: &[f32],
    (m, k, n): (usize, usize, usize),
) -> Vec<(&'static str, Vec<f32>)> {
    let bt = BSrc::F32 {
        data: wt,
        rs: 1,
        cs: n,
    };
    let xa = MatRef {
        data: x,
        rows: m,
        cols: k,
        stride: k,
    };
    let out = || vec![f32::NAN; m * (n + 3)];
    let view = |data| MatMut {
        data,
        rows: m,
        cols: n,
        stride: n + 3,
    };
    let mut os = out();
    gemm_serial_on(path, xa, bt, view(&mut os));
    let mut op = out();
    gemm_serial_packed_on(path, xa, &PackedB::new_on(path, bt, n, k), &mut op, n + 3);
    let (mut oa, mut ot) = (out(), out());
    let pa = PackedA::new_on(path, x, m, k, k);
    gemm_serial_packed_a_on(path, &pa, bt, n, &mut oa, n + 3);
    let pt = PackedA::from_transposed_on(path, xt, m, k, m + 2);
    gemm_serial_packed_a_on(path, &pt, bt, n, &mut ot, n + 3);
    vec![
        ("gemm_serial", os),
        ("gemm_serial_packed", op),
        ("gemm_serial_packed_a (rows)", oa),
        ("gemm_serial_packed_a (transposed)", ot),
    ]
}

/// The public entries on the operands of [`linear_matches_naive_on_odd_shapes`], in
/// the order of its results: `linear_f16`, `linear_f16_vec` (with the bias `i · 0.5`),
/// then the serial entries as [`serial_entries`] runs them.
fn public_entries(
    x: &[f32],
    xt: &[f32],
    w16: &[f16],
    wt: &[f32],
    (m, k, n): (usize, usize, usize),
) -> Vec<Vec<f32>> {
    let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let bt = BSrc::F32 {
        data: wt,
        rs: 1,
        cs: n,
    };
    let out = || vec![f32::NAN; m * (n + 3)];
    let mut o16 = vec![f32::NAN; m * n];
    linear_f16(x, m, k, w16, n, None, &mut o16);
    let ov = linear_f16_vec(x, m, k, w16, n, Some(&b));
    let xa = MatRef {
        data: x,
        rows: m,
        cols: k,
        stride: k,
    };
    let mut os = out();
    let c = MatMut {
        data: &mut os,
        rows: m,
        cols: n,
        stride: n + 3,
    };
    gemm_serial(xa, bt, c);
    let mut op = out();
    gemm_serial_packed(x, m, k, &PackedB::new(bt, n, k), &mut op, n + 3);
    let (mut oa, mut ot) = (out(), out());
    gemm_serial_packed_a(&PackedA::new(x, m, k, k), bt, n, &mut oa, n + 3);
    let pt = PackedA::from_transposed(xt, m, k, m + 2);
    gemm_serial_packed_a(&pt, bt, n, &mut ot, n + 3);
    vec![o16, ov, os, op, oa, ot]
}

/// Every path packs `A` and `B` into the portable packing's bits: the AVX2 packers
/// (`A` row panels, f16, contiguous f32 and int8 `B` panels, 8 × 8 transposes with
/// a scalar tail) against the portable loops, on full and partial panels, slices
/// with and without a tail of `kk % 8`, and slices that do not start at 0.
#[test]
fn every_path_packs_the_portable_bits() {
    let mut seed = 11;
    let portable = Path::Portable;
    for (m, k) in [
        (1usize, 5usize),
        (6, 8),
        (7, 37),
        (13, KC + 13),
        (12, 2 * KC),
    ] {
        let (lda, ld) = (k + 3, m + 2);
        let (x, xt) = (rnd(&mut seed, m * lda), rnd(&mut seed, k * ld));
        let rows = PackedA::new_on(portable, &x, m, k, lda);
        let cols = PackedA::from_transposed_on(portable, &xt, m, k, ld);
        for path in available_paths() {
            let what = format!("{path:?} A {m}x{k}");
            let got = PackedA::new_on(path, &x, m, k, lda);
            assert_same_bits(got.as_slice(), rows.as_slice(), &what);
            // In parallel over panels, as the linear entries pack it.
            let got = PackedA::pack(path, ASrc::Rows { data: &x, lda }, m, k, true);
            assert_same_bits(got.as_slice(), rows.as_slice(), &format!("{what} parallel"));
            let got = PackedA::from_transposed_on(path, &xt, m, k, ld);
            assert_same_bits(
                got.as_slice(),
                cols.as_slice(),
                &format!("{what} transposed"),
            );
        }
    }
    for (n, k) in [
        (16usize, 8usize),
        (40, 37),
        (53, KC + 45),
        (35, 96),
        (130, 2 * KC + 64),
    ] {
        let w = rnd(&mut seed, n * k);
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let wt = rnd(&mut seed, k * n);
        let srcs = [
            ("f16", BSrc::F16(&w16)),
            (
                "f32",
                BSrc::F32 {
                    data: &w,
                    rs: k,
                    cs: 1,
                },
            ),
            (
                "f32 strided",
                BSrc::F32 {
                    data: &wt,
                    rs: 1,
                    cs: n,
                },
            ),
        ];
        #[cfg(feature = "q8")]
        let q8w = k.is_multiple_of(32).then(|| q8_weight(&mut seed, n, k));
        #[cfg(feature = "q8")]
        let q8 = q8w.as_ref().map(|(q, s, _)| ("q8", BSrc::Q8 { q, s }));
        #[cfg(not(feature = "q8"))]
        let q8 = None;
        for (kind, src) in srcs.into_iter().chain(q8) {
            let full = PackedB::new_on(portable, src, n, k);
            for path in available_paths() {
                let what = format!("{path:?} B {kind} {n}x{k}");
                let got = PackedB::new_on(path, src, n, k);
                assert_same_bits(got.as_slice(), full.as_slice(), &what);
                // Columns from an unaligned start; a slice from a block boundary past 0.
                let k0 = if k > 64 { 32 } else { k / 2 };
                for (cs, ks) in [(3..n, 0..k.min(KC)), (0..n, k0..(k0 + KC).min(k))] {
                    let tile = |p| {
                        let mut out = vec![f32::NAN; cs.len().div_ceil(NR) * NR * ks.len()];
                        pack_b(p, src, k, cs.clone(), ks.clone(), &mut out, &mut [0.0; KC]);
                        out
                    };
                    let what = format!("{what} cols {cs:?} slice {ks:?}");
                    assert_same_bits(&tile(path), &tile(portable), &what);
                }
            }
        }
    }
}

/// Every SIMD path's products against the portable path's, within the bound of their
/// roundings. Both compute each output as the same sums in the same order:
/// `kc ≤ min(k, KC)` multiply-adds per slice, `S = ⌈k / KC⌉` slices added in order,
/// then the bias. In the standard model (each rounding a factor `1 + δ`, `|δ| ≤ u =
/// 2⁻²⁴`) a product `x·w` meets at most `D = min(k, KC) + S + 1` roundings (its own,
/// when unfused, its slice's additions, the slices' additions and the bias's), so
/// either result is within `γ_D · (Σ|x·w| + |bias|)` of the exact value (`γ_D = D·u /
/// (1 − D·u)`), and the two are within twice that of each other. The SIMD paths fuse
/// each multiply-add, the portable path rounds the product first, so they differ by
/// rounding, not bit for bit; random operands with full significands make them round.
#[test]
fn simd_products_agree_with_portable_within_their_rounding() {
    let mut seed = 17;
    let u = f32::EPSILON as f64 / 2.0;
    for (m, k, n) in [
        (7usize, 37usize, 40usize),
        (13, KC + 45, 70),
        (6, 3 * KC, 33),
        (31, 700, 130),
    ] {
        let shape = (m, k, n);
        let (x, b) = (rnd(&mut seed, m * k), rnd(&mut seed, n));
        let w16: Vec<f16> = rnd(&mut seed, n * k)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let w: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        let cases = [
            ("f16, bias", BSrc::F16(&w16), Some(&b[..]), w.clone()),
            (
                "f32",
                BSrc::F32 {
                    data: &w,
                    rs: k,
                    cs: 1,
                },
                None,
                w.clone(),
            ),
        ];
        #[cfg(feature = "q8")]
        let q8w = k.is_multiple_of(32).then(|| q8_weight(&mut seed, n, k));
        #[cfg(feature = "q8")]
        let q8 = q8w
            .as_ref()
            .map(|(q, s, wq)| ("q8", BSrc::Q8 { q, s }, None, wq.clone()));
        #[cfg(not(feature = "q8"))]
        let q8 = None;
        let d = (k.min(KC) + k.div_ceil(KC) + 1) as f64;
        let gamma = d * u / (1.0 - d * u);
        for (kind, src, bias, wf) in cases.into_iter().chain(q8) {
            let l = lin(&x, shape, src, bias);
            let mut want = vec![f32::NAN; m * n];
            linear_on(Path::Portable, l, &mut want);
            for path in available_paths() {
                let mut got = vec![f32::NAN; m * n];
                linear_on(path, l, &mut got);
                for i in 0..m {
                    for j in 0..n {
                        let mag: f64 = (0..k)
                            .map(|q| (x[i * k + q] as f64 * wf[j * k + q] as f64).abs())
                            .sum::<f64>()
                            + bias.map_or(0.0, |bv| bv[j].abs() as f64);
                        let (g, p) = (got[i * n + j], want[i * n + j]);
                        assert!(
                            (g as f64 - p as f64).abs() <= 2.0 * gamma * mag,
                            "{path:?} {kind} {m}x{k}x{n} ({i},{j}): {g} vs portable {p}"
                        );
                    }
                }
            }
        }
    }
}

/// The bias is added to the finished sum (fused into the last slice's tiles),
/// exactly as a separate pass would: on values whose sums round, over several
/// reduction slices, with full and partial tiles, and with k = 0; on every path.
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
        let wb = BSrc::F32 {
            data: &w,
            rs: k,
            cs: 1,
        };
        for path in available_paths() {
            let mut with = vec![f32::NAN; m * n];
            let mut without = vec![f32::NAN; m * n];
            linear_on(path, lin(&x, (m, k, n), wb, Some(&b)), &mut with);
            linear_on(path, lin(&x, (m, k, n), wb, None), &mut without);
            let want: Vec<f32> = without
                .iter()
                .enumerate()
                .map(|(i, v)| v + b[i % n])
                .collect();
            assert_same_bits(&with, &want, &format!("{path:?} {m}x{k}x{n}"));
        }
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
        let wb = BSrc::F32 {
            data: &w,
            rs: k,
            cs: 1,
        };
        for path in available_paths() {
            let what = format!("{path:?} {m}x{k}x{n}");
            let mut a = vec![f32::NAN; m * n];
            let mut b = vec![f32::NAN; m * n];
            linear_on(
                path,
                lin(&x, (m, k, n), BSrc::Q8 { q: &q, s: &s }, None),
                &mut a,
            );
            linear_on(path, lin(&x, (m, k, n), wb, None), &mut b);
            assert!(
                a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()),
                "{what}"
            );
            close(&a, &naive(&x, m, k, &w, n), &x, &w, (m, k, n), &what);
            if path == best_path() {
                let mut p = vec![f32::NAN; m * n];
                linear_q8(&x, m, k, &q, &s, n, &mut p);
                assert_same_bits(&p, &a, &format!("{what}: linear_q8"));
            }
        }
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
    for path in available_paths() {
        let run = |threads: usize| {
            let mut o = vec![0f32; m * n];
            let l = lin(&x, (m, k, n), BSrc::F16(&w), None);
            on_threads(threads, || linear_on(path, l, &mut o));
            o
        };
        let one = run(1);
        for t in [2, 3] {
            assert_same_bits(&run(t), &one, &format!("{path:?} threads={t}"));
        }
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

#[cfg(target_arch = "x86_64")]
#[test]
fn the_avx512_one_panel_tile_equals_the_avx2_tile_bit_for_bit() {
    // The hardware decides, not Q3VL_KERNEL_PATH: the tile is tested wherever it can run.
    if !available_paths().contains(&Path::Avx512Vnni) {
        eprintln!("no AVX-512 on this CPU: the one-panel tile is not run here");
        return;
    }
    let kc = 257;
    let mut seed = 5;
    let mut r = || (crate::testing::lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0;
    let a: Vec<f32> = (0..kc * MR).map(|_| r()).collect();
    let b: Vec<f32> = (0..kc * NR).map(|_| r()).collect();
    // A wider C (ldc 24) than the tile: the columns past it stay as they were.
    let c0: Vec<f32> = (0..MR * 24).map(|_| r()).collect();
    for first in [true, false] {
        let (mut want, mut got) = (c0.clone(), c0.clone());
        let one = tiles(Path::Avx512Vnni).one;
        // SAFETY: a holds kc·MR floats, b one panel of kc·NR, C MR rows of 24; both
        // paths' features were checked.
        unsafe {
            (tiles(Path::Avx2).one)(kc, a.as_ptr(), b.as_ptr(), want.as_mut_ptr(), 24, first);
            one(kc, a.as_ptr(), b.as_ptr(), got.as_mut_ptr(), 24, first);
        }
        assert_same_bits(&got, &want, &format!("first={first}"));
        assert_same_bits(&got[NR..24], &c0[NR..24], "past the tile");
    }
}
