//! The text decoder, fp32 (`docs/qwen3-vl-reference.md` §4): embedding with image rows scattered
//! in, pre-norm layers with q/k RMSNorm before interleaved M-RoPE, GQA with a causal
//! mask, DeepStack additions after the first layers at image positions, final norm, head.

use crate::config::{Qwen3VlConfig, TextConfig};
use crate::error::{Error, Result};
use crate::layout::{text_layer, EMBED, TEXT};
use crate::ops::{attention, linear, rms_norm};
use crate::rope;
use crate::source::WeightSource;
use crate::taps::{self, Taps};
use candle_core::{Device, Tensor};

/// One decoder layer's weights, f32.
pub struct DecoderLayer {
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

impl DecoderLayer {
    /// Loads layer `i` from `src`, checking every shape.
    pub fn load(cfg: &TextConfig, src: &dyn WeightSource, i: usize) -> Result<Self> {
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let t = |leaf: &str, shape: &[usize]| src.tensor(&text_layer(i, leaf), shape);
        Ok(DecoderLayer {
            input_layernorm: t("input_layernorm.weight", &[h])?,
            post_attention_layernorm: t("post_attention_layernorm.weight", &[h])?,
            q_norm: t("self_attn.q_norm.weight", &[hd])?,
            k_norm: t("self_attn.k_norm.weight", &[hd])?,
            q_proj: t("self_attn.q_proj.weight", &[q, h])?,
            k_proj: t("self_attn.k_proj.weight", &[kv, h])?,
            v_proj: t("self_attn.v_proj.weight", &[kv, h])?,
            o_proj: t("self_attn.o_proj.weight", &[h, q])?,
            gate_proj: t("mlp.gate_proj.weight", &[inter, h])?,
            up_proj: t("mlp.up_proj.weight", &[inter, h])?,
            down_proj: t("mlp.down_proj.weight", &[h, inter])?,
        })
    }

    /// `h = x + o_proj(Attn(RMS_in x))`, `out = h + down(silu(gate(RMS_post h)) · up(RMS_post h))`.
    /// `cache` holds this layer's rotated keys and values of earlier positions and is extended.
    pub fn forward(
        &self,
        cfg: &TextConfig,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (t, hd) = (x.dim(0)?, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let eps = cfg.rms_norm_eps;
        let h = rms_norm(x, &self.input_layernorm, eps)?;
        // Per-head RMSNorm of q and k, before RoPE; v is not normed.
        let q = rms_norm(
            &linear(&h, &self.q_proj, None)?.reshape((t, nh, hd))?,
            &self.q_norm,
            eps,
        )?
        .transpose(0, 1)?;
        let k = rms_norm(
            &linear(&h, &self.k_proj, None)?.reshape((t, nkv, hd))?,
            &self.k_norm,
            eps,
        )?
        .transpose(0, 1)?;
        let v = linear(&h, &self.v_proj, None)?
            .reshape((t, nkv, hd))?
            .transpose(0, 1)?
            .contiguous()?;
        let q = rope::apply(&q, cos, sin)?;
        let k = rope::apply(&k, cos, sin)?;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let s = k.dim(1)?;
        let past = s - t;
        // GQA: query head j reads key/value head j / groups.
        let g = cfg.gqa_groups();
        let rep = |z: &Tensor| -> candle_core::Result<Tensor> {
            if g == 1 {
                Ok(z.clone())
            } else {
                z.unsqueeze(1)?
                    .expand((nkv, g, s, hd))?
                    .reshape((nh, s, hd))
            }
        };
        let mask = causal_mask(t, past)?;
        let a = attention(
            &q,
            &rep(&k)?,
            &rep(&v)?,
            (hd as f64).powf(-0.5),
            mask.as_ref(),
        )?
        .transpose(0, 1)?
        .reshape((t, nh * hd))?;
        let x = (x + linear(&a, &self.o_proj, None)?)?;
        let h = rms_norm(&x, &self.post_attention_layernorm, eps)?;
        let gate = linear(&h, &self.gate_proj, None)?.silu()?;
        let up = linear(&h, &self.up_proj, None)?;
        let mlp = linear(&(gate * up)?, &self.down_proj, None)?;
        Ok((x + mlp)?)
    }
}

/// Additive mask `[t, past + t]`: query i may see keys ≤ past + i. None for one query.
fn causal_mask(t: usize, past: usize) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let s = past + t;
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(m, (t, s), &Device::Cpu)?))
}

/// Image features entering the decoder for one prompt.
#[derive(Debug, Clone, Default)]
pub struct ImageFeatures {
    /// `[N, H]` rows replacing the image-pad embeddings, in order.
    pub embeds: Option<Tensor>,
    /// DeepStack features `[N, H]`, added after layers 0, 1, ...
    pub deepstack: Vec<Tensor>,
}

/// A running decoder: KV cache plus (optionally) resident layer weights.
pub struct Decoder<'a> {
    cfg: &'a Qwen3VlConfig,
    src: &'a dyn WeightSource,
    layers: Vec<Option<DecoderLayer>>,
    keep_weights: bool,
    cache: Vec<Option<(Tensor, Tensor)>>,
}

impl<'a> Decoder<'a> {
    /// A decoder reading `src`. With `keep_weights` each layer is loaded once and kept;
    /// without, it is loaded for every pass and dropped after (peak ≈ one layer).
    pub fn new(cfg: &'a Qwen3VlConfig, src: &'a dyn WeightSource, keep_weights: bool) -> Self {
        let n = cfg.text.num_hidden_layers;
        Decoder {
            cfg,
            src,
            layers: (0..n).map(|_| None).collect(),
            keep_weights,
            cache: vec![None; n],
        }
    }

    /// A copy of the KV cache (tensors are shared, not copied), to branch from.
    pub fn snapshot(&self) -> Vec<Option<(Tensor, Tensor)>> {
        self.cache.clone()
    }

    /// Rewinds the KV cache to a snapshot.
    pub fn restore(&mut self, snapshot: &[Option<(Tensor, Tensor)>]) {
        self.cache = snapshot.to_vec();
    }

    /// Tokens already in the KV cache.
    pub fn cached_len(&self) -> usize {
        self.cache[0]
            .as_ref()
            .map(|(k, _)| k.dim(1).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Token embeddings for `ids`, with image rows scattered in at `image_token_id`.
    pub fn embed(&self, ids: &[u32], image: &ImageFeatures) -> Result<Tensor> {
        let t = &self.cfg.text;
        let x = self.src.rows(EMBED, [t.vocab_size, t.hidden_size], ids)?;
        let img_rows: Vec<usize> = image_rows(ids, self.cfg.image_token_id);
        match &image.embeds {
            None if !img_rows.is_empty() => Err(Error::Prompt(format!(
                "the prompt has {} image tokens but no image features were given",
                img_rows.len()
            ))),
            None => Ok(x),
            Some(e) => {
                if e.dim(0)? != img_rows.len() {
                    return Err(Error::Prompt(format!(
                        "the prompt has {} image tokens but the image gives {} embeddings",
                        img_rows.len(),
                        e.dim(0)?
                    )));
                }
                scatter_rows(&x, &img_rows, e)
            }
        }
    }

    /// Runs `ids` at `positions` through every layer, extending the cache; returns the
    /// final-norm hidden states `[T, H]`. Records `text.*` taps when asked.
    pub fn forward(
        &mut self,
        ids: &[u32],
        positions: &[[i64; 3]],
        image: &ImageFeatures,
        taps: &mut Taps,
    ) -> Result<Tensor> {
        self.forward_replaying(ids, positions, image, taps, None)
    }

    /// [`Decoder::forward`], and with `replay` (one `[T, H]` input per layer, e.g. the
    /// oracle's own) each layer also runs on its replay input while its weights are
    /// loaded, without a cache, recorded as [`taps::text_layer_local`].
    pub fn forward_replaying(
        &mut self,
        ids: &[u32],
        positions: &[[i64; 3]],
        image: &ImageFeatures,
        taps: &mut Taps,
        replay: Option<&[Tensor]>,
    ) -> Result<Tensor> {
        let t = &self.cfg.text;
        let mut x = self.embed(ids, image)?;
        taps.put(taps::TEXT_EMBED, &x);
        let (cos, sin) = rope::mrope_cos_sin(positions, t)?;
        let img_rows = image_rows(ids, self.cfg.image_token_id);
        for i in 0..t.num_hidden_layers {
            let loaded;
            let layer = match &self.layers[i] {
                Some(l) => l,
                None => {
                    loaded = DecoderLayer::load(t, self.src, i)?;
                    &loaded
                }
            };
            x = layer.forward(t, &x, &cos, &sin, &mut self.cache[i])?;
            taps.put(taps::text_layer(i), &x);
            if let Some(input) = replay.and_then(|r| r.get(i)) {
                let local = layer.forward(t, input, &cos, &sin, &mut None)?;
                taps.put(taps::text_layer_local(i), &local);
            }
            if let Some(ds) = image.deepstack.get(i) {
                if !img_rows.is_empty() {
                    x = add_rows(&x, &img_rows, ds)?;
                }
            }
            if self.keep_weights && self.layers[i].is_none() {
                self.layers[i] = Some(DecoderLayer::load(t, self.src, i)?);
            }
        }
        let w = self
            .src
            .tensor(&format!("{TEXT}.norm.weight"), &[t.hidden_size])?;
        let x = rms_norm(&x, &w, t.rms_norm_eps)?;
        taps.put(taps::TEXT_NORM, &x);
        Ok(x)
    }

    /// Logits `[T, V]` of final-norm hidden states, reading the head in row chunks.
    pub fn logits(&self, normed: &Tensor) -> Result<Tensor> {
        let t = &self.cfg.text;
        let name = self.src.head_name(self.cfg);
        let chunk = 8192usize;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < t.vocab_size {
            let n = chunk.min(t.vocab_size - start);
            let ids: Vec<u32> = (start as u32..(start + n) as u32).collect();
            let w = self.src.rows(name, [t.vocab_size, t.hidden_size], &ids)?;
            parts.push(linear(normed, &w, None)?);
            start += n;
        }
        Ok(Tensor::cat(&parts, 1)?)
    }
}

/// Indexes of the image-pad tokens.
pub fn image_rows(ids: &[u32], image_token_id: u32) -> Vec<usize> {
    ids.iter()
        .enumerate()
        .filter(|(_, &id)| id == image_token_id)
        .map(|(i, _)| i)
        .collect()
}

fn rows_op(x: &Tensor, rows: &[usize], src: &Tensor, add: bool) -> Result<Tensor> {
    let (t, h) = x.dims2()?;
    let mut data = x.flatten_all()?.to_vec1::<f32>()?;
    let s = src.flatten_all()?.to_vec1::<f32>()?;
    for (k, &r) in rows.iter().enumerate() {
        let dst = &mut data[r * h..(r + 1) * h];
        for (d, v) in dst.iter_mut().zip(&s[k * h..(k + 1) * h]) {
            if add {
                *d += v;
            } else {
                *d = *v;
            }
        }
    }
    Ok(Tensor::from_vec(data, (t, h), &Device::Cpu)?)
}

/// `x` with rows `rows` replaced by `src`'s rows (HF `masked_scatter`).
pub fn scatter_rows(x: &Tensor, rows: &[usize], src: &Tensor) -> Result<Tensor> {
    rows_op(x, rows, src, false)
}

/// `x` with `src`'s rows added to rows `rows` (the DeepStack addition).
pub fn add_rows(x: &Tensor, rows: &[usize], src: &Tensor) -> Result<Tensor> {
    rows_op(x, rows, src, true)
}
