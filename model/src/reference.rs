//! The fp32 reference end to end: vision tower, prompt prefill with every tap, and
//! greedy or teacher-forced continuations, as the oracle trace records them.

use crate::config::Qwen3VlConfig;
use crate::error::Result;
use crate::prompt::Prompt;
use crate::source::WeightSource;
use crate::taps::{self, Taps};
use crate::text::{Decoder, ImageFeatures};
use crate::vision::{self, VisionOutput};
use candle_core::Tensor;
use std::collections::BTreeMap;

/// How to continue after the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Continuation {
    /// Greedy argmax for this many steps; eos does not stop it.
    Greedy(usize),
    /// Feed these tokens (e.g. the oracle's own decode) and record the logits that
    /// precede each one.
    Forced(Vec<u32>),
}

/// One continuation's result.
#[derive(Debug, Clone)]
pub struct ContinuationRun {
    /// The tokens (chosen, or forced).
    pub tokens: Vec<u32>,
    /// `[D, V]` logits that chose (or preceded) each token; None when D = 0.
    pub logits: Option<Tensor>,
}

/// Everything one reference run produced.
pub struct ReferenceRun {
    /// Intermediate tensors under trace names, plus `logits` `[T, V]`.
    pub taps: BTreeMap<String, Tensor>,
    /// The image features the decoder consumed.
    pub vision: Option<VisionOutput>,
    /// One result per requested continuation, in order.
    pub continuations: Vec<ContinuationRun>,
}

/// An image as the model takes it.
pub struct ImageInput<'a> {
    /// `[P, C·T·p·p]` patch rows.
    pub pixel_values: &'a Tensor,
    /// (t, h, w) in patches.
    pub grid_thw: [usize; 3],
}

/// Runs the reference on one prompt: its images (in prompt order), the prompt with
/// every tap, then each continuation from the same prefilled cache. `keep_weights` keeps decoder
/// layers resident (fast for small models); without it each pass streams the layers.
pub fn run(
    cfg: &Qwen3VlConfig,
    src: &dyn WeightSource,
    prompt: &Prompt,
    images: &[ImageInput<'_>],
    continuations: &[Continuation],
    keep_weights: bool,
) -> Result<ReferenceRun> {
    run_replaying(cfg, src, prompt, images, continuations, keep_weights, None)
}

/// [`run`], with each decoder layer also run on `replay[i]` during the prompt pass
/// ([`Decoder::forward_replaying`]).
pub fn run_replaying(
    cfg: &Qwen3VlConfig,
    src: &dyn WeightSource,
    prompt: &Prompt,
    images: &[ImageInput<'_>],
    continuations: &[Continuation],
    keep_weights: bool,
    replay: Option<&[Tensor]>,
) -> Result<ReferenceRun> {
    let mut tp = Taps::recording();
    let vision = vision_of(cfg, src, images, &mut tp)?;
    let features = ImageFeatures {
        embeds: vision.as_ref().map(|v| v.embeds.clone()),
        deepstack: vision
            .as_ref()
            .map(|v| v.deepstack.clone())
            .unwrap_or_default(),
    };
    let mut dec = Decoder::new(cfg, src, keep_weights);
    let normed =
        dec.forward_replaying(&prompt.ids, &prompt.positions, &features, &mut tp, replay)?;
    let logits = dec.logits(&normed)?;
    let prefilled = dec.snapshot();
    let last = logits.narrow(0, logits.dim(0)? - 1, 1)?;
    let mut runs = Vec::with_capacity(continuations.len());
    for c in continuations {
        dec.restore(&prefilled);
        runs.push(continue_from(&mut dec, prompt.next_position, &last, c)?);
    }
    tp.put(taps::LOGITS, &logits);
    Ok(ReferenceRun {
        taps: tp.into_map(),
        vision,
        continuations: runs,
    })
}

/// The tower on each image, its outputs and taps joined along the rows, image after
/// image: what HF's tower computes on all the images' patches at once (its attention
/// and mergers never mix two images).
fn vision_of(
    cfg: &Qwen3VlConfig,
    src: &dyn WeightSource,
    images: &[ImageInput<'_>],
    tp: &mut Taps,
) -> Result<Option<VisionOutput>> {
    let mut outs = Vec::with_capacity(images.len());
    let mut taps: Vec<BTreeMap<String, Tensor>> = Vec::with_capacity(images.len());
    for img in images {
        let mut own = Taps::recording();
        outs.push(vision::forward(
            &cfg.vision,
            src,
            img.pixel_values,
            img.grid_thw,
            &mut own,
        )?);
        taps.push(own.into_map());
    }
    let Some(first) = taps.first() else {
        return Ok(None);
    };
    for name in first.keys() {
        let parts: Vec<&Tensor> = taps.iter().filter_map(|t| t.get(name)).collect();
        tp.put(name.clone(), &Tensor::cat(&parts, 0)?);
    }
    let embeds: Vec<&Tensor> = outs.iter().map(|o| &o.embeds).collect();
    let deepstack = (0..outs[0].deepstack.len())
        .map(|k| {
            let parts: Vec<&Tensor> = outs.iter().map(|o| &o.deepstack[k]).collect();
            Tensor::cat(&parts, 0)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Some(VisionOutput {
        embeds: Tensor::cat(&embeds, 0)?,
        deepstack,
    }))
}

fn continue_from(
    dec: &mut Decoder<'_>,
    next_position: i64,
    last: &Tensor,
    c: &Continuation,
) -> Result<ContinuationRun> {
    match c {
        Continuation::Forced(tokens) => forced(dec, next_position, last, tokens),
        Continuation::Greedy(steps) => greedy(dec, next_position, last, *steps),
    }
}

/// Teacher forcing in one batched pass: the tokens (all but the last) go through
/// the decoder together after the prompt, so a streamed model reads its weights once.
fn forced(
    dec: &mut Decoder<'_>,
    next_position: i64,
    last: &Tensor,
    tokens: &[u32],
) -> Result<ContinuationRun> {
    if tokens.is_empty() {
        return Ok(ContinuationRun {
            tokens: vec![],
            logits: None,
        });
    }
    let feed = &tokens[..tokens.len() - 1];
    let mut rows = vec![last.clone()];
    if !feed.is_empty() {
        // Decode positions advance on all three axes together.
        let pos: Vec<[i64; 3]> = (0..feed.len())
            .map(|k| [next_position + k as i64; 3])
            .collect();
        let h = dec.forward(feed, &pos, &ImageFeatures::default(), &mut Taps::off())?;
        rows.push(dec.logits(&h)?);
    }
    Ok(ContinuationRun {
        tokens: tokens.to_vec(),
        logits: Some(Tensor::cat(&rows, 0)?),
    })
}

/// Free-running greedy decode, one token at a time through the KV cache.
fn greedy(
    dec: &mut Decoder<'_>,
    next_position: i64,
    last: &Tensor,
    steps: usize,
) -> Result<ContinuationRun> {
    let mut tokens = Vec::with_capacity(steps);
    let mut rows = Vec::with_capacity(steps);
    let mut last = last.clone();
    let none = ImageFeatures::default();
    for k in 0..steps {
        let next = argmax(&last)?;
        rows.push(last.clone());
        tokens.push(next);
        if k + 1 == steps {
            break;
        }
        let p = next_position + k as i64;
        let h = dec.forward(&[next], &[[p; 3]], &none, &mut Taps::off())?;
        last = dec.logits(&h)?;
    }
    Ok(ContinuationRun {
        tokens,
        logits: if rows.is_empty() {
            None
        } else {
            Some(Tensor::cat(&rows, 0)?)
        },
    })
}

/// Index of the largest logit of a `[1, V]` row; the first one on ties, as torch.
pub fn argmax(row: &Tensor) -> Result<u32> {
    let v = row.flatten_all()?.to_vec1::<f32>()?;
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

/// Top-1 of every row of a `[T, V]` logits tensor.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let t = logits.dim(0)?;
    (0..t).map(|i| argmax(&logits.narrow(0, i, 1)?)).collect()
}
