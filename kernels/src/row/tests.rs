use super::*;
use crate::path::available_paths;

#[test]
fn f32_dot_matches_portable_closely() {
    for n in [1usize, 7, 8, 9, 64, 72, 100] {
        let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot_f32(&a, &b) as f64 - exact).abs() < 1e-4);
        assert!((dot_f32_portable(&a, &b) as f64 - exact).abs() < 1e-4);
        for path in available_paths() {
            let got = dot_f32_on(path, &a, &b) as f64;
            assert!((got - exact).abs() < 1e-4, "{path:?} n={n}");
        }
    }
}

#[test]
fn widen_is_exact_on_every_path() {
    let src: Vec<f16> = (0..37u16)
        .map(|i| f16::from_bits(i.wrapping_mul(1777)))
        .collect();
    for path in available_paths() {
        let mut dst = vec![0f32; 37];
        widen_f16_on(path, &src, &mut dst);
        for (s, d) in src.iter().zip(&dst) {
            assert!(
                s.to_f32().to_bits() == d.to_bits() || (s.is_nan() && d.is_nan()),
                "{path:?}"
            );
        }
    }
}
