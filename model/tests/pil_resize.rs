//! `resize_bicubic` against Pillow 13's `Image.resize((w, h), BICUBIC)`, byte for byte,
//! on the vectors in `tests/data/pil_resize/` (written by
//! `oracle/make_pil_resize_vectors.py`). The two-pass cases are chosen so that the
//! other pass order gives different bytes: a wrong order fails here.

use q3vl_model::image::{load_rgb, resize_bicubic};
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/pil_resize")
}

fn size(v: &serde_json::Value) -> (usize, usize) {
    let a = v.as_array().expect("[w, h]");
    (
        a[0].as_u64().unwrap() as usize,
        a[1].as_u64().unwrap() as usize,
    )
}

#[test]
fn image_bicubic_resize_matches_pillow_in_both_pass_orders() {
    let dir = data_dir();
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json");
    let manifest: serde_json::Value = serde_json::from_str(&text).expect("manifest is JSON");
    let cases = manifest["cases"].as_array().expect("cases");
    let mut seen = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let src = load_rgb(&dir.join(case["src"].as_str().unwrap())).unwrap();
        let want = load_rgb(&dir.join(case["out"].as_str().unwrap())).unwrap();
        let (sw, sh) = size(&case["src_size"]);
        let (ow, oh) = size(&case["out_size"]);
        assert_eq!((src.width, src.height), (sw, sh), "{name}: source size");
        assert_eq!((want.width, want.height), (ow, oh), "{name}: output size");
        seen.insert(case["first_pass"].as_str().unwrap().to_string());
        let got = resize_bicubic(&src, ow, oh);
        assert_eq!((got.width, got.height), (ow, oh), "{name}: resized size");
        let differ = got
            .data
            .iter()
            .zip(&want.data)
            .filter(|(a, b)| a != b)
            .count();
        if differ != 0 {
            failures.push(format!(
                "{name}: {sw}x{sh} -> {ow}x{oh} ({} first): {differ} bytes differ from Pillow",
                case["first_pass"].as_str().unwrap()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The vectors must keep covering both orders and the single-pass case.
    for kind in ["horizontal", "vertical", "single"] {
        assert!(seen.contains(kind), "no {kind} case in the manifest");
    }
}
