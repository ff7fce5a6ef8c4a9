//! The engine as a reader of bundles: a pair with one file of either bundle mutated
//! (its size and digest mostly re-recorded, as a consistent corruption would be),
//! opened, and asked one question about an image, end to end.

use super::bundle_readers::{rerecord, OUT};
use super::harness::{Case, Refuse};
use super::mutate::{json_file, safetensors_file, Rng};
use super::seeds::{pair, put};
use q3vl_engine::{Engine, EngineOptions, GenerateParams};
use std::path::Path;

/// One case: open, tokenize, preprocess (fixed or dynamic), encode, generate two tokens.
pub fn engine(rng: &mut Rng, dir: &Path) -> Case {
    let p = pair();
    let out = dir.join(OUT);
    p.write(&out);
    let rels: Vec<&String> = p.files.keys().collect();
    let victim = *rng.pick(&rels);
    let bytes = if victim.ends_with(".safetensors") {
        safetensors_file(rng, &p.files[victim])
    } else {
        json_file(rng, &p.files[victim])
    };
    put(&out, victim, &bytes);
    if !rng.one_in(4) {
        rerecord(&out, victim);
    }
    let opts = EngineOptions {
        threads: Some(1),
        verify_checksums: false,
        context: None,
    };
    let engine = Engine::open(&out, &opts).refused()?;
    let pb = engine.prompt_builder().refused()?;
    let img = q3vl_model::image::Rgb8 {
        width: 64,
        height: 48,
        data: (0..64 * 48 * 3).map(|i| (i * 13 % 251) as u8).collect(),
    };
    let patched = engine.preprocess(&img, rng.one_in(2)).refused()?;
    let feats = engine
        .encode_image(&patched.pixel_values, patched.grid_thw)
        .refused()?;
    let prompt = pb
        .chat("What is in the image?", Some(patched.grid_thw))
        .refused()?;
    let params = GenerateParams {
        max_new_tokens: 2,
        ..GenerateParams::default()
    };
    engine
        .generate(
            &prompt.ids,
            &[std::sync::Arc::new(feats)],
            &params,
            &mut |_| {},
        )
        .refused()
        .map(drop)
}
