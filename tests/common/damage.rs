//! Damage to a converted output folder (`q3vl convert --out OUT`: a language bundle
//! and its vision bundle) of the kinds a buggy converter would cause, with the
//! checksums resealed afterwards: the bundle still passes `metadata.json`'s sha256
//! checks and the pair binding, so only the numerical gates can find the damage.

use q3vl_bundle::Bundles;
use q3vl_model::layout;
use q3vl_model::Checkpoint;
use safetensors::tensor::Dtype;
use std::path::{Path, PathBuf};

/// The two bundle folders of a conversion output folder.
pub struct Pair {
    /// The language bundle (`<short>_decode_<mode>`).
    pub language: PathBuf,
    /// The vision bundle (`<short>_vision`).
    pub vision: PathBuf,
}

/// The pair a conversion wrote into `out`.
pub fn pair(out: &Path) -> Pair {
    let b = Bundles::open(out).unwrap();
    Pair {
        language: b.language.dir().to_path_buf(),
        vision: b.vision.dir().to_path_buf(),
    }
}

/// Where one tensor's bytes are: file, byte range, dtype, shape.
struct Located {
    file: PathBuf,
    range: std::ops::Range<usize>,
    dtype: Dtype,
    shape: Vec<usize>,
}

fn locate(bundle: &Path, name: &str) -> Located {
    let ck = Checkpoint::open(bundle).unwrap();
    let info = ck
        .info(name)
        .unwrap_or_else(|| panic!("{name} in {}", bundle.display()));
    Located {
        file: ck.files()[info.file].path.clone(),
        range: info.range.clone(),
        dtype: info.dtype,
        shape: info.shape.clone(),
    }
    // The map is dropped here, before anything rewrites the file.
}

/// Rewrites tensor `name` of `bundle` in place through `f(bytes, shape)` (same size).
pub fn edit_tensor(bundle: &Path, name: &str, f: impl FnOnce(&mut [u8], &[usize])) {
    let at = locate(bundle, name);
    let mut bytes = std::fs::read(&at.file).unwrap();
    f(&mut bytes[at.range.clone()], &at.shape);
    std::fs::write(&at.file, bytes).unwrap();
}

/// Exchanges the bytes of two tensors of equal dtype and shape (names stay put).
pub fn swap_tensors(bundle: &Path, a: &str, b: &str) {
    let (x, y) = (locate(bundle, a), locate(bundle, b));
    assert_eq!((x.dtype, &x.shape), (y.dtype, &y.shape), "{a} vs {b}");
    assert_eq!(x.file, y.file, "{a} and {b} in one file");
    let mut bytes = std::fs::read(&x.file).unwrap();
    let first = bytes[x.range.clone()].to_vec();
    bytes.copy_within(y.range.clone(), x.range.start);
    bytes[y.range.clone()].copy_from_slice(&first);
    std::fs::write(&x.file, bytes).unwrap();
}

/// Multiplies every f16 value of `bytes` by `factor` (rounded back to f16).
pub fn scale_f16(bytes: &mut [u8], factor: f32) {
    for b in bytes.chunks_exact_mut(2) {
        let v = half::f16::from_le_bytes([b[0], b[1]]).to_f32() * factor;
        b.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }
}

/// Re-records the size and sha256 of every file in `bundle/metadata.json`, as a
/// converter with a numerical bug would have: the damage is then the gates' to find,
/// not the checksums'.
pub fn reseal(bundle: &Path) {
    use sha2::{Digest, Sha256};
    let p = bundle.join("metadata.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    for (rel, entry) in m["files"].as_object_mut().unwrap() {
        let bytes = std::fs::read(bundle.join(rel)).unwrap();
        entry["sha256"] = hex::encode(Sha256::digest(&bytes)).into();
        entry["size"] = bytes.len().into();
    }
    std::fs::write(&p, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// Reseals both bundles of `out` as a buggy converter would have written them: the
/// vision bundle's files, then the language bundle's files and its binding to the
/// vision bundle's (new) `metadata.json`.
pub fn reseal_pair(out: &Path) {
    use sha2::{Digest, Sha256};
    let p = pair(out);
    reseal(&p.vision);
    let vision_meta = std::fs::read(p.vision.join("metadata.json")).unwrap();
    let lang_meta = p.language.join("metadata.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&lang_meta).unwrap()).unwrap();
    m["companion_sha256"] = hex::encode(Sha256::digest(&vision_meta)).into();
    std::fs::write(&lang_meta, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    reseal(&p.language);
}

/// (a) Every int8 body linear of decoder layer `layer` with its scales × `factor`
/// (q, k, v, o, gate, up, down: a converter that used the wrong scale for one layer).
/// Needs an int8 mode (`int8hu`, `int8lin`).
pub fn scale_layer(out: &Path, layer: usize, factor: f32) {
    let lang = pair(out).language;
    let cfg = q3vl_model::Qwen3VlConfig::from_dir(&lang).unwrap();
    for (leaf, _) in layout::text_linears(&cfg) {
        let name = format!("{}.scales", layout::text_layer(layer, leaf));
        edit_tensor(&lang, &name, |b, _| scale_f16(b, factor));
    }
    reseal_pair(out);
}

/// (b) Rows `r1` and `r2` of the int8 weight `weight` exchanged, with their scales (a
/// converter that permuted output channels). Needs an int8 mode.
pub fn swap_rows(out: &Path, weight: &str, r1: usize, r2: usize) {
    let lang = pair(out).language;
    for name in [weight.to_string(), format!("{weight}.scales")] {
        edit_tensor(&lang, &name, |b, shape| {
            let row = b.len() / shape[0];
            let first = b[r1 * row..(r1 + 1) * row].to_vec();
            b.copy_within(r2 * row..(r2 + 1) * row, r1 * row);
            b[r2 * row..(r2 + 1) * row].copy_from_slice(&first);
        });
    }
    reseal_pair(out);
}

/// (c) One block of 32 int8 values of row `row` of `weight` zeroed, and its scale (a
/// converter that skipped a block). Needs an int8 mode.
pub fn zero_block(out: &Path, weight: &str, row: usize, block: usize) {
    let lang = pair(out).language;
    edit_tensor(&lang, weight, |b, shape| {
        let at = row * shape[1] + block * 32;
        b[at..at + 32].fill(0);
    });
    edit_tensor(&lang, &format!("{weight}.scales"), |b, shape| {
        let at = (row * shape[1] + block) * 2;
        b[at..at + 2].fill(0);
    });
    reseal_pair(out);
}

/// The (row, block) of `weight`'s largest scale: the block a converter bug in the
/// overflow path (a block zeroed instead of refused) would strike first.
pub fn largest_block(out: &Path, weight: &str) -> (usize, usize) {
    let lang = pair(out).language;
    let at = locate(&lang, &format!("{weight}.scales"));
    let bytes = std::fs::read(&at.file).unwrap();
    let scales: Vec<f32> = bytes[at.range]
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let best = (0..scales.len())
        .max_by(|&a, &b| scales[a].total_cmp(&scales[b]))
        .unwrap();
    (best / at.shape[1], best % at.shape[1])
}

/// (d) The LM head's scales × `factor` (every logit × `factor`: a converter that
/// mis-rounded the head's scales). Needs `int8hu`, the mode with an int8 head.
pub fn scale_head(out: &Path, factor: f32) {
    let lang = pair(out).language;
    let name = format!("{}.scales", layout::LM_HEAD);
    edit_tensor(&lang, &name, |b, _| scale_f16(b, factor));
    reseal_pair(out);
}

/// (f) The decoder's final norm weight (stored f32) × `factor`: every logit × about
/// `factor`, with every layer and the head untouched. Any mode.
pub fn scale_final_norm(out: &Path, factor: f32) {
    let lang = pair(out).language;
    let name = format!("{}.norm.weight", layout::TEXT);
    edit_tensor(&lang, &name, |b, _| {
        for c in b.chunks_exact_mut(4) {
            let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * factor;
            c.copy_from_slice(&v.to_le_bytes());
        }
    });
    reseal_pair(out);
}

/// (e) DeepStack mergers `a` and `b` exchanged in the vision bundle (every tensor of
/// one in the other's place: a converter that numbered them wrong). Any mode.
pub fn swap_deepstack(out: &Path, a: usize, b: usize) {
    let vision = pair(out).vision;
    let leaves = [
        "norm.weight",
        "norm.bias",
        "linear_fc1.weight",
        "linear_fc1.bias",
        "linear_fc2.weight",
        "linear_fc2.bias",
    ];
    for leaf in leaves {
        swap_tensors(
            &vision,
            &layout::deepstack(a, leaf),
            &layout::deepstack(b, leaf),
        );
    }
    reseal_pair(out);
}
