//! The gate "engine ≡ reference" on the fixtures: the engine's greedy tokens equal
//! the fp32 reference's on the bundle's dequantized weights, and its tokens and
//! logits are bit-identical with 1 and 2 threads.

mod common;

use common::converted_fixture;
use q3vl_engine::{Engine, EngineOptions, GenerateParams};
use q3vl_model::reference::{self, Continuation, ImageInput};
use q3vl_verify::compare::cosine;
use std::path::Path;

const STEPS: usize = 8;

fn engine(out: &Path, threads: usize) -> Engine {
    Engine::open(
        out,
        &EngineOptions {
            threads: Some(threads),
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

fn params() -> GenerateParams {
    GenerateParams {
        max_new_tokens: STEPS,
        ignore_eos: true,
        keep_logits: true,
        ..GenerateParams::default()
    }
}

/// Engine greedy tokens vs the reference's, for one prompt with any number of
/// images (each resized to the fixed grid, or with `dynamic` by smart_resize).
fn compare(fixture: &str, prompt: &str, images: &[&str], dynamic: bool) {
    let out = converted_fixture(fixture);
    let e = engine(&out, 2);
    let pb = e.prompt_builder().unwrap();
    let patched: Vec<_> = images
        .iter()
        .map(|p| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(p);
            e.preprocess(&q3vl_model::image::load_rgb(&path).unwrap(), dynamic)
                .unwrap()
        })
        .collect();
    let feats: Vec<_> = patched
        .iter()
        .map(|p| std::sync::Arc::new(e.encode_image(&p.pixel_values, p.grid_thw).unwrap()))
        .collect();
    let grids: Vec<[usize; 3]> = patched.iter().map(|p| p.grid_thw).collect();
    let pr = pb.chat_images(prompt, &grids).unwrap();
    let g = e.generate(&pr.ids, &feats, &params(), &mut |_| {}).unwrap();

    let bundles = q3vl_bundle::Bundles::open(&out).unwrap();
    let src = q3vl_verify::BundleSource::new(&bundles);
    let pv: Vec<_> = patched.iter().map(|p| p.to_tensor().unwrap()).collect();
    let img: Vec<ImageInput> = patched
        .iter()
        .zip(&pv)
        .map(|(p, t)| ImageInput {
            pixel_values: t,
            grid_thw: p.grid_thw,
        })
        .collect();
    let r = reference::run(
        e.config(),
        &src,
        &pr,
        &img,
        &[Continuation::Greedy(STEPS)],
        true,
    )
    .unwrap();
    let want = &r.continuations[0].tokens;
    assert_eq!(
        &g.tokens, want,
        "{fixture}: engine vs reference greedy tokens"
    );

    // Scoring the prompt runs the last layer for every token; generation runs it for
    // the last token alone. That token's logits must be the same bits, and every
    // position must agree with the reference's prompt logits.
    let rows = e.prompt_logits(&pr.ids, &feats).unwrap();
    assert_eq!(rows.len(), pr.ids.len());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert_eq!(
        bits(rows.last().unwrap()),
        bits(&g.step_logits[0]),
        "{fixture}: last prompt row vs the first generated step's logits"
    );
    let reference: Vec<Vec<f32>> = r.taps["logits"].to_vec2().unwrap();
    assert_eq!(reference.len(), rows.len());
    for (i, (got, want)) in rows.iter().zip(&reference).enumerate() {
        let cos = cosine(got, want);
        assert!(
            cos >= 0.99999,
            "{fixture}: prompt position {i}: logits cos {cos}"
        );
        let (top, margin) = top1_and_margin(want);
        if margin >= 0.1 {
            assert_eq!(
                top1_and_margin(got).0,
                top,
                "{fixture}: prompt position {i}: top-1"
            );
        }
    }
}

/// The arg-max and its lead over the runner-up.
fn top1_and_margin(v: &[f32]) -> (usize, f32) {
    let top = (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
    let second = (0..v.len())
        .filter(|&i| i != top)
        .map(|i| v[i])
        .fold(f32::NEG_INFINITY, f32::max);
    (top, v[top] - second)
}

#[test]
fn engine_equals_reference_on_shapes_image_prompt() {
    compare(
        "shapes",
        "What is in the image?",
        &["fixtures/shapes/images/demo_0.png"],
        false,
    );
}

/// Two images of different sizes in one prompt: each gets its own M-RoPE positions,
/// the text after each is shifted as HF's `get_rope_index` does, and each image's
/// DeepStack features land at its own rows.
#[test]
fn engine_equals_reference_on_two_images_of_different_sizes() {
    compare(
        "shapes",
        "Which picture has more shapes?",
        &[
            "fixtures/shapes/images/demo_1.png",
            "fixtures/tied/traces/image.png",
        ],
        true,
    );
}

#[test]
fn engine_equals_reference_on_text_prompts() {
    compare("shapes", "Which colour comes after blue?", &[], false);
    compare("tied", "hello there", &[], false);
}

#[test]
fn tokens_and_logits_do_not_depend_on_threads() {
    let out = converted_fixture("shapes");
    let runs: Vec<_> = [1, 2]
        .iter()
        .map(|&t| {
            let e = engine(&out, t);
            let pb = e.prompt_builder().unwrap();
            let rgb = q3vl_model::image::load_rgb(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes/images/demo_4.png"),
            )
            .unwrap();
            let p = e.preprocess(&rgb, false).unwrap();
            let f = e.encode_image(&p.pixel_values, p.grid_thw).unwrap();
            let pr = pb.chat("What is in the image?", Some(p.grid_thw)).unwrap();
            (
                f,
                e.generate(
                    &pr.ids,
                    &[std::sync::Arc::new(
                        e.encode_image(&p.pixel_values, p.grid_thw).unwrap(),
                    )],
                    &params(),
                    &mut |_| {},
                )
                .unwrap(),
            )
        })
        .collect();
    assert_eq!(runs[0].0.embeds, runs[1].0.embeds, "vision features");
    assert_eq!(runs[0].1.tokens, runs[1].1.tokens);
    for (a, b) in runs[0].1.step_logits.iter().zip(&runs[1].1.step_logits) {
        let (ab, bb): (Vec<u32>, Vec<u32>) = (
            a.iter().map(|v| v.to_bits()).collect(),
            b.iter().map(|v| v.to_bits()).collect(),
        );
        assert_eq!(ab, bb, "logits differ between 1 and 2 threads");
    }
}

/// The f16 body/head modes run too (f16 weights × f32 activations) and match the
/// reference on their own dequantized weights.
#[test]
fn int8lin_and_fp16_modes_run_and_match_the_reference() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes");
    for mode in ["int8lin", "fp16"] {
        let out = common::scratch(&format!("mode-{mode}"));
        common::ok(&[
            "convert",
            "--src",
            common::s(&src),
            "--out",
            common::s(&out),
            "--mode",
            mode,
        ]);
        let e = engine(&out, 2);
        let pr = e
            .prompt_builder()
            .unwrap()
            .chat("Which colour comes after red?", None)
            .unwrap();
        let g = e.generate(&pr.ids, &[], &params(), &mut |_| {}).unwrap();
        let bundles = q3vl_bundle::Bundles::open(&out).unwrap();
        let src = q3vl_verify::BundleSource::new(&bundles);
        let r = reference::run(
            e.config(),
            &src,
            &pr,
            &[],
            &[Continuation::Greedy(STEPS)],
            true,
        )
        .unwrap();
        assert_eq!(g.tokens, r.continuations[0].tokens, "{mode}");
    }
}
