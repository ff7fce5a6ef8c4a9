//! Cases for the model crate's readers: `config.json`, `preprocessor_config.json`,
//! `generation_config.json`, safetensors checkpoints (one file or sharded), images,
//! and the tokenizer with its chat template.

use super::harness::{ensure, Case, Refuse};
use super::mutate::{bytes_n, json_file, safetensors_file, Rng};
use super::seeds::{fixture, jpegs, put, sharded, MODELS, PNGS};
use q3vl_model::config::eos_ids;
use q3vl_model::image::{load_rgb, preprocess, Resize};
use q3vl_model::prompt::PromptBuilder;
use q3vl_model::{layout, Checkpoint, PreprocessorConfig, Qwen3VlConfig};
use std::path::{Component, Path};

/// `config.json`: parsed, then what every caller does next (derived sizes, the
/// tensor layout it implies), which must not panic or grow without bound.
pub fn config_json(rng: &mut Rng, dir: &Path) -> Case {
    let seed = fixture(&format!("{}/config.json", rng.pick(&MODELS)));
    put(dir, "config.json", &json_file(rng, &seed));
    let cfg = Qwen3VlConfig::from_dir(dir).refused()?;
    let (t, v) = (&cfg.text, &cfg.vision);
    ensure(t.rms_norm_eps.is_finite() && t.rms_norm_eps > 0.0, || {
        format!("accepted rms_norm_eps {}", t.rms_norm_eps)
    })?;
    ensure(t.rope_theta.is_finite() && t.rope_theta > 0.0, || {
        format!("accepted rope_theta {}", t.rope_theta)
    })?;
    let _ = (
        t.gqa_groups(),
        v.head_dim(),
        v.pos_grid(),
        v.patch_dim(),
        v.merged_dim(),
    );
    let _ = layout::checkpoint_tensors(&cfg);
    Ok(())
}

/// A small RGB test image.
fn test_image(w: usize, h: usize) -> q3vl_model::image::Rgb8 {
    q3vl_model::image::Rgb8 {
        width: w,
        height: h,
        data: (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect(),
    }
}

/// `preprocessor_config.json`, then an image preprocessed with HF's dynamic resize,
/// which depends on this file alone. (The fixed grid also depends on the model's
/// patch size and the vision bundle's metadata: the `engine` case covers it.)
pub fn preprocessor_config(rng: &mut Rng, dir: &Path) -> Case {
    let seed = fixture(&format!("{}/preprocessor_config.json", rng.pick(&MODELS)));
    put(dir, "preprocessor_config.json", &json_file(rng, &seed));
    let pp = PreprocessorConfig::from_dir(dir).refused()?;
    // The normalisation runs in f32: a value finite only in f64 (1e308) is not.
    let finite = pp
        .image_mean
        .iter()
        .chain(&pp.image_std)
        .all(|x| x.is_finite())
        && pp.rescale_factor.is_finite();
    ensure(finite, || {
        format!(
            "accepted mean {:?}, std {:?}, rescale {} (not finite as used)",
            pp.image_mean, pp.image_std, pp.rescale_factor
        )
    })?;
    preprocess(&test_image(40, 30), &pp, Resize::Dynamic)
        .refused()
        .map(drop)
}

/// `generation_config.json`'s stop ids.
pub fn generation_config(rng: &mut Rng, dir: &Path) -> Case {
    let seed = fixture(&format!("{}/generation_config.json", rng.pick(&MODELS)));
    put(dir, "generation_config.json", &json_file(rng, &seed));
    eos_ids(dir).refused().map(drop)
}

/// The checkpoint reader's promises once it accepts a file: the tensors of each file
/// lie inside it without overlap or gap (the safetensors rule), and every value widens.
fn check_checkpoint(ck: &Checkpoint, dir: &Path) -> Case {
    for (fi, f) in ck.files().iter().enumerate() {
        let inside = f
            .path
            .strip_prefix(dir)
            .is_ok_and(|rel| rel.components().all(|c| matches!(c, Component::Normal(_))));
        ensure(inside, || {
            format!("opened {} outside {}", f.path.display(), dir.display())
        })?;
        let bytes = std::fs::read(&f.path).expect("the file just opened");
        let header = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let mut ranges: Vec<_> = ck
            .names()
            .filter_map(|n| ck.info(n))
            .filter(|i| i.file == fi)
            .map(|i| i.range.clone())
            .collect();
        ranges.sort_by_key(|r| (r.start, r.end));
        let mut at = 8 + header;
        for r in &ranges {
            ensure(r.start == at, || {
                format!(
                    "{}: accepted a tensor at byte {} where {at} was expected (overlap or gap)",
                    f.path.display(),
                    r.start
                )
            })?;
            at = r.end;
        }
        ensure(at == bytes.len(), || {
            format!(
                "{}: accepted {} bytes after the last tensor",
                f.path.display(),
                bytes.len() - at.min(bytes.len())
            )
        })?;
    }
    let names: Vec<String> = ck.names().map(str::to_owned).collect();
    for n in &names {
        if ck.info(n).is_some_and(|i| i.dtype.bitsize() >= 8) {
            let _ = ck.f32(n);
        }
    }
    Ok(())
}

/// `model.safetensors` of a fixture, mutated in its header mostly, opened as a
/// checkpoint and then as a conversion source (layout, dtypes, stray tensors).
pub fn checkpoint(rng: &mut Rng, dir: &Path) -> Case {
    let model = *rng.pick(&MODELS);
    put(
        dir,
        "config.json",
        &fixture(&format!("{model}/config.json")),
    );
    let seed = fixture(&format!("{model}/model.safetensors"));
    put(dir, "model.safetensors", &safetensors_file(rng, &seed));
    let ck = Checkpoint::open(dir).refused()?;
    check_checkpoint(&ck, dir)?;
    drop(ck);
    q3vl_convert::source::SourceCheckpoint::open(dir)
        .refused()
        .map(drop)
}

/// A sharded checkpoint: the index or one shard mutated.
pub fn sharded_checkpoint(rng: &mut Rng, dir: &Path) -> Case {
    let files = sharded();
    let names: Vec<&String> = files.keys().collect();
    let victim = *rng.pick(&names);
    for (name, bytes) in files {
        if name == victim && name.ends_with(".json") {
            put(dir, name, &json_file(rng, bytes));
        } else if name == victim {
            put(dir, name, &safetensors_file(rng, bytes));
        } else {
            put(dir, name, bytes);
        }
    }
    let ck = Checkpoint::open(dir).refused()?;
    check_checkpoint(&ck, dir)
}

/// Rewrites a PNG's IHDR width or height and fixes the chunk's CRC, so the decoder
/// gets past the checksum to the size.
fn png_dimensions(rng: &mut Rng, png: &mut [u8]) {
    if png.len() < 33 || &png[12..16] != b"IHDR" {
        return;
    }
    let v: u32 = *rng.pick(&[0, 1, 2, 0x7fff_ffff, u32::MAX, 1 << 16, 100_000, 9000]);
    let at = 16 + 4 * rng.below(2);
    png[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
}

/// Rewrites a JPEG's frame height or width (the SOF0 segment).
fn jpeg_dimensions(rng: &mut Rng, jpg: &mut [u8]) {
    let Some(sof) = jpg.windows(2).position(|w| w == [0xff, 0xc0]) else {
        return;
    };
    let at = sof + 5 + 2 * rng.below(2);
    if at + 2 <= jpg.len() {
        let v: u16 = *rng.pick(&[0, 1, 2, 0x7fff, u16::MAX, 8192]);
        jpg[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// A PNG or JPEG: byte mutations, a rewritten size field, or a plain truncation into
/// the image data (which must be refused: a cut file is not an image).
pub fn image(rng: &mut Rng, dir: &Path) -> Case {
    let i = rng.below(PNGS.len());
    let jpeg = rng.one_in(2);
    let mut data = if jpeg {
        jpegs()[i].clone()
    } else {
        fixture(PNGS[i])
    };
    let truncated = match rng.below(8) {
        0 => {
            data.truncate(rng.below(data.len() - 16));
            true
        }
        1 | 2 if jpeg => {
            jpeg_dimensions(rng, &mut data);
            false
        }
        1 | 2 => {
            png_dimensions(rng, &mut data);
            false
        }
        _ => {
            bytes_n(rng, &mut data, usize::MAX);
            false
        }
    };
    let path = dir.join(if jpeg { "image.jpg" } else { "image.png" });
    put(
        dir,
        path.file_name().and_then(|n| n.to_str()).expect("a name"),
        &data,
    );
    let img = load_rgb(&path);
    ensure(!(truncated && img.is_ok()), || {
        format!(
            "a {} cut to {} bytes decoded",
            if jpeg { "JPEG" } else { "PNG" },
            data.len()
        )
    })?;
    let img = img.refused()?;
    ensure(img.data.len() == img.width * img.height * 3, || {
        "RGB buffer of the wrong size".into()
    })?;
    let pp = PreprocessorConfig::default();
    if img.width * img.height <= 1 << 20 {
        preprocess(&img, &pp, Resize::Fixed(448)).refused()?;
    }
    if img.width * img.height <= 1 << 16 {
        preprocess(&img, &pp, Resize::Dynamic).refused()?;
    }
    Ok(())
}

/// Jinja fragments that reach the template engine's other paths.
const JINJA: [&str; 8] = [
    "{{",
    "{%",
    "%}",
    "}}",
    "{% for m in messages %}{{ m }}",
    "{{ raise_exception('x') }}",
    "{{ messages[99999] }}",
    "{% set x = 1 %}",
];

/// The tokenizer files: `tokenizer.json`, `tokenizer_config.json` (with the chat
/// template inside) or `chat_template.jinja` mutated; then a chat prompt rendered,
/// tokenized and decoded.
pub fn prompt(rng: &mut Rng, dir: &Path) -> Case {
    let model = *rng.pick(&MODELS);
    let files = [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ];
    // Without the template in tokenizer_config.json the .jinja file is the one read.
    let drop_inline = rng.one_in(3);
    let victim = rng.below(files.len());
    for (k, f) in files.iter().enumerate() {
        let mut seed = fixture(&format!("{model}/{f}"));
        if drop_inline && *f == "tokenizer_config.json" {
            let mut v: serde_json::Value = serde_json::from_slice(&seed).expect("fixture JSON");
            v.as_object_mut().map(|o| o.remove("chat_template"));
            seed = serde_json::to_vec(&v).expect("serializes");
        }
        let bytes = match (k == victim, f.ends_with(".json")) {
            (false, _) => seed,
            (true, true) => json_file(rng, &seed),
            (true, false) => mutate_template(rng, &seed),
        };
        put(dir, f, &bytes);
    }
    let cfg =
        Qwen3VlConfig::from_dir(&super::seeds::fixtures().join(model)).expect("fixture config");
    let pb = PromptBuilder::from_dir(dir, &cfg).refused()?;
    let p = pb
        .chat("What is in the image?", Some([1, 4, 4]))
        .refused()?;
    pb.decode(&p.ids).refused().map(drop)
}

fn mutate_template(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut t = seed.to_vec();
    if rng.one_in(2) {
        bytes_n(rng, &mut t, usize::MAX);
    } else {
        let at = rng.below(t.len());
        let frag = rng.pick(&JINJA).as_bytes().to_vec();
        t.splice(at..at, frag);
    }
    t
}
