//! Continuous batching and prefix caching keep a request's numbers: a greedy
//! request's tokens and logits are the same bits alone, batched with others (of
//! other prompt lengths, with and without an image, joining at other steps), with
//! its prompt cut into chunks, or resumed from its conversation's cached prompt.

mod common;

use common::converted_fixture;
use q3vl_engine::{Engine, EngineOptions, GenerateParams, Generation, Sequence};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

const STEPS: usize = 10;

fn params() -> GenerateParams {
    GenerateParams {
        max_new_tokens: STEPS,
        ignore_eos: true,
        keep_logits: true,
        ..GenerateParams::default()
    }
}

fn bits(g: &Generation) -> Vec<Vec<u32>> {
    g.step_logits
        .iter()
        .map(|l| l.iter().map(|v| v.to_bits()).collect())
        .collect()
}

/// A request: prompt ids and its image's features.
struct Request {
    ids: Vec<u32>,
    images: Vec<Arc<q3vl_engine::EncodedImage>>,
}

/// Fixture picture `fixtures/shapes/images/NAME.png` through the tower (fixed grid).
fn encoded(e: &Engine, name: &str) -> Arc<q3vl_engine::EncodedImage> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/shapes/images/{name}.png"));
    let p = e
        .preprocess(&q3vl_model::image::load_rgb(&path).unwrap(), false)
        .unwrap();
    Arc::new(e.encode_image(&p.pixel_values, p.grid_thw).unwrap())
}

fn requests(e: &Engine) -> Vec<Request> {
    let pb = e.prompt_builder().unwrap();
    let f = encoded(e, "demo_1");
    let text = |q: &str| Request {
        ids: pb.chat(q, None).unwrap().ids,
        images: vec![],
    };
    vec![
        Request {
            ids: pb
                .chat("What is in the image?", Some(f.grid_thw))
                .unwrap()
                .ids,
            images: vec![f],
        },
        text("Which colour comes after blue?"),
        text("hi"),
        text("Name three shapes, then say which one has the most corners and why."),
    ]
}

#[test]
fn batched_chunked_and_staggered_requests_equal_their_runs_alone() {
    let out = converted_fixture("shapes");
    let e = Engine::open(&out, &EngineOptions::default()).unwrap();
    let reqs = requests(&e);
    let alone: Vec<Generation> = reqs
        .iter()
        .map(|r| {
            e.generate(&r.ids, &r.images, &params(), &mut |_| {})
                .unwrap()
        })
        .collect();
    // Request k joins at step 2k and runs its prompt in chunks of 3 + k tokens, one
    // chunk per step, while the others decode.
    let mut seqs: Vec<Option<Sequence>> = (0..reqs.len()).map(|_| None).collect();
    for step in 0..200 {
        for (k, r) in reqs.iter().enumerate() {
            if step == 2 * k {
                seqs[k] = Some(e.begin(&r.ids, &r.images, &params(), None).unwrap());
            }
            if let Some(s) = seqs[k].as_mut().filter(|s| s.prompt_left() > 0) {
                e.prefill(s, 3 + k).unwrap();
            }
        }
        let mut batch: Vec<&mut Sequence> =
            seqs.iter_mut().flatten().filter(|s| s.decoding()).collect();
        if !batch.is_empty() {
            e.decode_step(&mut batch).unwrap();
        }
        if seqs
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| s.finish().is_some()))
        {
            break;
        }
    }
    for (k, (s, a)) in seqs.iter().zip(&alone).enumerate() {
        let g = s.as_ref().unwrap().generation();
        assert_eq!(g.tokens.len(), STEPS, "request {k} finished");
        assert_eq!(g.tokens, a.tokens, "request {k}: tokens, batched vs alone");
        assert!(bits(&g) == bits(a), "request {k}: logits, batched vs alone");
    }
}

#[test]
fn a_conversations_next_turn_from_its_cached_prompt_equals_a_fresh_run() {
    let out = converted_fixture("shapes");
    let e = Engine::open(&out, &EngineOptions::default()).unwrap();
    let pb = e.prompt_builder().unwrap();
    let f = encoded(&e, "demo_2");
    let first_user = json!({"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is in the image?"}]});
    let turn1 = pb
        .encode(
            &pb.render(&json!([first_user]), true).unwrap(),
            &[f.grid_thw],
        )
        .unwrap();
    let mut s1 = e
        .begin(&turn1.ids, std::slice::from_ref(&f), &params(), None)
        .unwrap();
    e.prefill(&mut s1, usize::MAX).unwrap();
    while s1.decoding() {
        e.decode_step(&mut [&mut s1]).unwrap();
    }
    let answer = pb
        .tokenizer()
        .decode(&s1.generation().tokens, true)
        .unwrap();
    let messages = json!([first_user,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what colour is it?"}]);
    let turn2 = pb
        .encode(&pb.render(&messages, true).unwrap(), &[f.grid_thw])
        .unwrap();
    let cached = s1.into_prompt_cache();
    let fresh = e
        .generate(&turn2.ids, std::slice::from_ref(&f), &params(), &mut |_| {})
        .unwrap();
    let mut s2 = e
        .begin(
            &turn2.ids,
            std::slice::from_ref(&f),
            &params(),
            Some(&cached),
        )
        .unwrap();
    e.prefill(&mut s2, usize::MAX).unwrap();
    while s2.decoding() {
        e.decode_step(&mut [&mut s2]).unwrap();
    }
    let resumed = s2.generation();
    assert!(
        resumed.timings.cached_tokens >= turn1.ids.len() - 2,
        "{} of the first turn's {} prompt tokens reused",
        resumed.timings.cached_tokens,
        turn1.ids.len()
    );
    assert_eq!(resumed.tokens, fresh.tokens, "tokens, resumed vs fresh");
    assert!(bits(&resumed) == bits(&fresh), "logits, resumed vs fresh");

    // Another image in the same place shares no image position with the cache.
    let other = encoded(&e, "demo_3");
    let s3 = e
        .begin(&turn2.ids, &[other], &params(), Some(&cached))
        .unwrap();
    let first_pad = turn2
        .ids
        .iter()
        .position(|&id| id == e.config().image_token_id);
    assert_eq!(Some(s3.generation().timings.cached_tokens), first_pad);
}
