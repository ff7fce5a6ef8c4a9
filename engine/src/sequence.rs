//! [`Sequence`]: one request's generation, advanced a prefill chunk or a decode step
//! at a time, so a scheduler can interleave many requests (continuous batching) and
//! start a conversation's next turn from its earlier prompt ([`PromptCache`]).
//!
//! [`Engine::generate`] is these same steps run to the end, so a request's tokens
//! are the same alone, batched with others, chunked or resumed from a cached prefix:
//! - a decode step's linears run every sequence's token at once, in the one-token
//!   arithmetic, each output one dot product ([`crate::decoder::TextModel::forward_decode`]);
//! - prefill chunks are never one token long (a one-token pass uses the decode
//!   arithmetic), and a prefill row's result does not depend on how the prompt was cut;
//! - a cached prompt keeps only positions a prefill computed: the answer that followed
//!   it was computed in decode steps, so the next turn's prefill runs it again.

use crate::decoder::Rows;
use crate::engine::{Engine, GenerateParams, Generation, Timings};
use crate::error::{check_logits, Result};
use crate::images::PromptImages;
use crate::kv_cache::KvCache;
use crate::positions::ImageSpan;
use crate::sampler::Sampler;
use crate::vision::EncodedImage;
use std::sync::Arc;
use std::time::Instant;

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It chose an eos id.
    Eos,
    /// It produced `max_new_tokens` tokens.
    Length,
}

/// One request's generation in progress.
pub struct Sequence {
    /// The prompt's HF ids (what a later prompt is compared with).
    ids: Vec<u32>,
    /// The prompt in id space (image pads mapped to `vocab + slot`).
    mapped: Vec<u32>,
    images: PromptImages,
    cache: KvCache,
    sampler: Sampler,
    params: GenerateParams,
    out: Generation,
    /// The last token chosen, still to be run through the model.
    pending: Option<u32>,
    finish: Option<Finish>,
}

impl Sequence {
    /// Prompt tokens.
    pub fn prompt_len(&self) -> usize {
        self.mapped.len()
    }

    /// Prompt tokens not yet run through the model.
    pub fn prompt_left(&self) -> usize {
        self.mapped.len().saturating_sub(self.cache.len())
    }

    /// Whether the sequence waits for a decode step (its prompt is done and it has
    /// not finished).
    pub fn decoding(&self) -> bool {
        self.pending.is_some()
    }

    /// Why it stopped, once it has.
    pub fn finish(&self) -> Option<Finish> {
        self.finish
    }

    /// What it generated so far (timings' rates set).
    pub fn generation(&self) -> Generation {
        let mut g = self.out.clone();
        g.timings.set_rates();
        g
    }

    /// The prompt's positions, for the next turn of the conversation to start from
    /// (the generated tokens' positions are dropped; see the module).
    pub fn into_prompt_cache(self) -> PromptCache {
        let n = self.mapped.len().min(self.cache.len());
        PromptCache {
            cache: self.cache.resized(n, n),
            ids: self.ids[..n].to_vec(),
            images: self.images.features,
        }
    }
}

/// A prompt's KV cache kept after its request: the prefix a later request (the same
/// conversation's next turn) may start from.
pub struct PromptCache {
    /// HF ids of the positions held.
    ids: Vec<u32>,
    /// The prompt's images, in order.
    images: Vec<Arc<EncodedImage>>,
    cache: KvCache,
}

impl PromptCache {
    /// Positions held.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.cache.allocated_bytes()
    }

    /// How many leading positions a prompt (HF ids, pads expanded) with `images` can
    /// take from this cache: the common prefix, cut before the first pad
    /// (`image_token_id`) of an image that is not the same in both, and leaving at
    /// least two tokens to run (a one-token pass would use the decode arithmetic; see
    /// the module).
    pub fn reusable(
        &self,
        ids: &[u32],
        images: &[Arc<EncodedImage>],
        image_token_id: u32,
    ) -> usize {
        // Pad number c belongs to image k while c < the first k+1 images' tokens;
        // each image is compared once, at its first pad.
        let (mut pads, mut k, mut before) = (0usize, 0usize, 0usize);
        let mut same: Option<bool> = None;
        let mut common = 0;
        for (a, b) in self.ids.iter().zip(ids) {
            if a != b {
                break;
            }
            if *a == image_token_id {
                while self
                    .images
                    .get(k)
                    .is_some_and(|f| pads >= before + f.tokens)
                {
                    before += self.images[k].tokens;
                    k += 1;
                    same = None;
                }
                let pair = (self.images.get(k), images.get(k));
                let is_same = *same.get_or_insert_with(|| match pair {
                    (Some(x), Some(y)) => Arc::ptr_eq(x, y) || same_features(x, y),
                    _ => false,
                });
                if !is_same {
                    break;
                }
                pads += 1;
            }
            common += 1;
        }
        common.min(ids.len().saturating_sub(2))
    }
}

/// Whether two encoded images give the decoder the same rows.
fn same_features(a: &EncodedImage, b: &EncodedImage) -> bool {
    a.grid_thw == b.grid_thw && a.embeds == b.embeds && a.deepstack == b.deepstack
}

/// Prefill tokens a chunk runs so that no chunk, this one or the last, is one token
/// long (see the module): `want` of `left`, or all of them.
fn chunk_len(left: usize, want: usize) -> usize {
    let want = want.max(2);
    if left <= want || left - want < 2 {
        left
    } else {
        want
    }
}

impl Engine {
    /// Starts a request: checks the prompt (HF ids, pads expanded) against the image
    /// and the context, and sizes its cache; with `reuse`, takes the positions it
    /// shares with that earlier prompt ([`PromptCache::reusable`]). Nothing runs yet.
    pub fn begin(
        &self,
        ids: &[u32],
        images: &[Arc<EncodedImage>],
        params: &GenerateParams,
        reuse: Option<&PromptCache>,
    ) -> Result<Sequence> {
        let (mapped, images) = self.map_prompt(ids, images)?;
        let need = self.check_context(ids.len(), params.max_new_tokens)?;
        let pad = self.config().image_token_id;
        let cache = match reuse {
            Some(r) => r
                .cache
                .resized(r.reusable(ids, &images.features, pad), need),
            None => self.new_cache(need.max(1)),
        };
        let finish = (params.max_new_tokens == 0).then_some(Finish::Length);
        Ok(Sequence {
            out: Generation {
                tokens: Vec::new(),
                step_logits: Vec::new(),
                stopped_at_eos: false,
                timings: Timings {
                    prompt_tokens: ids.len(),
                    cached_tokens: cache.len(),
                    ..Timings::default()
                },
            },
            ids: ids.to_vec(),
            mapped,
            images,
            cache,
            sampler: Sampler::new(params.temperature, params.top_p, params.seed),
            params: params.clone(),
            pending: None,
            finish,
        })
    }

    /// Runs about `max_tokens` more of `seq`'s prompt (the last chunk also gives the
    /// first token's logits); returns the first token once chosen.
    pub fn prefill(&self, seq: &mut Sequence, max_tokens: usize) -> Result<Option<u32>> {
        let left = seq.prompt_left();
        if seq.finish.is_some() || left == 0 {
            return Ok(None);
        }
        let t0 = Instant::now();
        let from = seq.cache.len();
        let n = chunk_len(left, max_tokens);
        let chunk = &seq.mapped[from..from + n];
        if n < left {
            // Not the last chunk: its positions go to the cache, no logits are needed.
            self.forward_only(chunk, &seq.images, &mut seq.cache)?;
            seq.out.timings.prefill_ms += t0.elapsed().as_secs_f64() * 1e3;
            return Ok(None);
        }
        let logits = self.forward_logits(chunk, &seq.images, &mut seq.cache, Rows::Last)?;
        seq.out.timings.prefill_ms += t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let next = self.choose(seq, logits)?;
        seq.out.timings.decode_ms += t1.elapsed().as_secs_f64() * 1e3;
        Ok(Some(next))
    }

    /// One decode step of every sequence in `seqs` (each must be [`Sequence::decoding`]):
    /// the weights are read once for all of them. Returns each one's new token.
    pub fn decode_step(&self, seqs: &mut [&mut Sequence]) -> Result<Vec<u32>> {
        let t0 = Instant::now();
        let ids: Vec<u32> = seqs
            .iter()
            .map(|s| s.pending.expect("decode_step takes decoding sequences"))
            .collect();
        let spans: Vec<Vec<ImageSpan>> = seqs.iter().map(|s| s.images.spans.clone()).collect();
        let spans: Vec<&[ImageSpan]> = spans.iter().map(Vec::as_slice).collect();
        let mut caches: Vec<&mut KvCache> = seqs.iter_mut().map(|s| &mut s.cache).collect();
        let logits = self.forward_decode_logits(&ids, &mut caches, &spans)?;
        let vocab = self.text.config().vocab_size;
        let mut chosen = Vec::with_capacity(seqs.len());
        for (seq, row) in seqs.iter_mut().zip(logits.chunks_exact(vocab)) {
            seq.out.timings.decode_steps += 1;
            chosen.push(self.choose(seq, row.to_vec())?);
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        for seq in seqs.iter_mut() {
            seq.out.timings.decode_ms += ms;
        }
        Ok(chosen)
    }

    /// Samples `seq`'s next token from `logits` and records it; sets the finish at eos
    /// or at `max_new_tokens`.
    fn choose(&self, seq: &mut Sequence, logits: Vec<f32>) -> Result<u32> {
        let step = seq.out.tokens.len();
        check_logits(&logits, logits.len(), |_| format!("generated token {step}"))?;
        let next = seq.sampler.sample(&logits);
        seq.pending = None;
        if !seq.params.ignore_eos && self.eos_ids().contains(&next) {
            seq.out.stopped_at_eos = true;
            seq.finish = Some(Finish::Eos);
            return Ok(next);
        }
        seq.out.tokens.push(next);
        if seq.params.keep_logits {
            seq.out.step_logits.push(logits);
        }
        if seq.out.tokens.len() >= seq.params.max_new_tokens {
            seq.finish = Some(Finish::Length);
        } else {
            seq.pending = Some(next);
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_len;

    #[test]
    fn no_chunk_is_one_token() {
        for left in 1..40 {
            for want in 0..12 {
                let mut rest = left;
                let mut chunks = vec![];
                while rest > 0 {
                    let n = chunk_len(rest, want);
                    chunks.push(n);
                    rest -= n;
                }
                assert!(
                    left == 1 || chunks.iter().all(|&n| n >= 2),
                    "{left} {want}: {chunks:?}"
                );
            }
        }
    }
}
