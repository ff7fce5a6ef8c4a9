use super::*;
use crate::path::available_paths;

fn inputs() -> Vec<f32> {
    let mut v: Vec<f32> = (0..20011).map(|i| (i as f32 - 10005.0) * 0.0091).collect();
    v.extend([
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        88.0,
        88.5,
        100.0,
        -86.9,
        -87.0,
        -87.1,
        -200.0,
        f32::NEG_INFINITY,
        0.5,
        -0.5,
        0.346_573_6,
    ]);
    v
}

#[test]
fn exp_is_accurate() {
    for x in inputs() {
        let got = exp_portable(x) as f64;
        if x < X_MIN {
            assert_eq!(got, 0.0);
            continue;
        }
        let want = (x.min(X_MAX) as f64).exp();
        assert!(
            ((got - want) / want).abs() < 3e-7,
            "exp({x}) = {got}, want {want}"
        );
    }
}

#[test]
fn every_path_matches_portable_bit_for_bit() {
    let xs = inputs();
    for path in available_paths() {
        let mut e = xs.clone();
        exp_slice_on(path, &mut e);
        for (x, g) in xs.iter().zip(&e) {
            assert_eq!(g.to_bits(), exp_portable(*x).to_bits(), "{path:?} exp({x})");
        }
        let mut g = xs.clone();
        let u: Vec<f32> = xs.iter().map(|v| v * 0.5 + 1.0).collect();
        silu_mul_on(path, &mut g, &u);
        for ((x, uv), gv) in xs.iter().zip(&u).zip(&g) {
            let want = silu_mul_one(*x, *uv);
            assert_eq!(gv.to_bits(), want.to_bits(), "{path:?} silu({x})");
        }
        let mut h = xs.clone();
        gelu_tanh_on(path, &mut h);
        for (x, hv) in xs.iter().zip(&h) {
            let want = gelu_tanh_one(*x);
            assert_eq!(hv.to_bits(), want.to_bits(), "{path:?} gelu({x})");
        }
        for len in [1usize, 7, 8, 9, 31, 32, 40, 47, 100, 784] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 23) as f32 * 0.7 - 5.0)
                .collect();
            let mut a = row.clone();
            let mut b = row.clone();
            softmax_row_on(path, &mut a, 0.125);
            softmax_row_portable(&mut b, 0.125);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{path:?} len {len}"
            );
        }
    }
}

#[test]
fn activations_match_their_definitions() {
    for x in inputs()
        .into_iter()
        .filter(|v| v.is_finite() && v.abs() < 80.0)
    {
        let xd = x as f64;
        let silu = xd / (1.0 + (-xd).exp());
        let mut g = [x];
        silu_mul(&mut g, &[1.0]);
        assert!(
            (g[0] as f64 - silu).abs() <= 1e-6 * (1.0 + silu.abs()),
            "silu({x})"
        );
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let gelu = 0.5 * xd * (1.0 + (c * (xd + 0.044715 * xd * xd * xd)).tanh());
        let mut h = [x];
        gelu_tanh(&mut h);
        assert!(
            (h[0] as f64 - gelu).abs() <= 1e-6 * (1.0 + gelu.abs()),
            "gelu({x})"
        );
    }
    let mut row = vec![1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
    softmax_row(&mut row, 1.0);
    let z: f64 = (1f64).exp() + (2f64).exp() + (3f64).exp();
    for (i, v) in row.iter().take(3).enumerate() {
        assert!((*v as f64 - ((i + 1) as f64).exp() / z).abs() < 1e-6);
    }
    assert_eq!(row[3], 0.0);
}
