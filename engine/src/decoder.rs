//! The text decoder on int8 (or f16) weights (`docs/qwen3-vl-reference.md` §4; read
//! it beside `model/src/text.rs`, the fp32 reference, whose names it uses): embedding
//! by id (text row or image row), pre-norm layers with q/k RMSNorm and interleaved
//! M-RoPE, GQA causal attention over the KV cache, SwiGLU MLP, DeepStack additions
//! after the first layers, final norm and head.
//!
//! Prefill runs all prompt tokens through each matrix product at once; decode is the
//! same code with one token, or, for several sequences at once (continuous batching),
//! [`TextModel::forward_decode`]: one token per sequence through each product, rope,
//! cache and attention each sequence's own. Generation needs only the last token's output, so a
//! prefill's last layer caches every token's K and V but runs q, attention, o and the
//! MLP for the last row alone ([`Rows::Last`]; 1/36 of an 8B prefill's work, with the
//! same bits for that row).

use crate::causal_attention::{attention, AttentionShape, Queries};
use crate::error::{EngineError, Result};
use crate::images::PromptImages;
use crate::kernels::row::widen_f16;
use crate::kernels::vmath;
use crate::kv_cache::KvCache;
use crate::ops::{add_in_place, rms_norm_in_place, rms_norm_rows, RopeTable, ELEMS_PER_TASK};
use crate::positions::{position, ImageSpan};
use crate::weights::{vector, Lin, Pass};
use q3vl_bundle::Bundle;
use q3vl_model::config::TextConfig;
use q3vl_model::layout::{text_layer, text_linears, EMBED, LM_HEAD, TEXT};
use q3vl_model::rope::{inv_freq, mrope_axis};
use rayon::prelude::*;

/// Which tokens' final hidden states a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// The last token's (what generation needs): the last layer then computes its
    /// attention output and MLP for that token alone.
    Last,
    /// Every new token's (scoring a prompt).
    All,
}

impl Rows {
    /// The first of `tokens` new rows whose output is kept.
    fn first_kept_row(self, tokens: usize) -> usize {
        match self {
            Rows::Last => tokens - 1,
            Rows::All => 0,
        }
    }
}

/// A linear weight of the bundle: its name and `[out, in]` shape (checked at load).
struct Linear {
    name: String,
    shape: [usize; 2],
}

impl Linear {
    /// The weight, borrowed from `b`'s memory map.
    fn resolve<'a>(&self, b: &'a Bundle) -> Result<Lin<'a>> {
        Lin::resolve(b, &self.name, self.shape[0], self.shape[1])
    }
}

/// One decoder layer: its norms, loaded at open, and its seven linears by name (the
/// weights stay mapped; [`DecoderLayer::weights`] borrows them for one pass).
struct DecoderLayer {
    input_layernorm: Vec<f32>,
    post_attention_layernorm: Vec<f32>,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    /// In [`text_linears`]' order: q, k, v, o, gate, up, down.
    linears: [Linear; 7],
}

/// A layer's linears, borrowed from the memory map for one forward pass.
struct LayerWeights<'a> {
    q_proj: Lin<'a>,
    k_proj: Lin<'a>,
    v_proj: Lin<'a>,
    o_proj: Lin<'a>,
    gate_proj: Lin<'a>,
    up_proj: Lin<'a>,
    down_proj: Lin<'a>,
}

/// One layer's place in a forward pass.
struct LayerPass<'p> {
    cfg: &'p TextConfig,
    /// The pass's arithmetic.
    pass: Pass,
    /// cos/sin of the pass's new tokens.
    rope: &'p RopeTable,
    /// The layer's index (its slot in the KV cache).
    layer: usize,
    /// Positions cached before the pass, new tokens, and the rows kept.
    queries: Queries,
}

impl DecoderLayer {
    /// Loads layer `i`'s norms from `b` and checks its linears' shapes and dtypes.
    fn load(b: &Bundle, cfg: &q3vl_model::Qwen3VlConfig, i: usize) -> Result<DecoderLayer> {
        let (h, hd) = (cfg.text.hidden_size, cfg.text.head_dim);
        let t = |leaf: &str, len: usize| vector(b, &text_layer(i, leaf), len);
        let layer = DecoderLayer {
            input_layernorm: t("input_layernorm.weight", h)?,
            post_attention_layernorm: t("post_attention_layernorm.weight", h)?,
            q_norm: t("self_attn.q_norm.weight", hd)?,
            k_norm: t("self_attn.k_norm.weight", hd)?,
            linears: text_linears(cfg).map(|(leaf, shape)| Linear {
                name: text_layer(i, leaf),
                shape,
            }),
        };
        for l in &layer.linears {
            l.resolve(b)?;
        }
        Ok(layer)
    }

    /// The seven linears, borrowed from `b`.
    fn weights<'a>(&self, b: &'a Bundle) -> Result<LayerWeights<'a>> {
        let [q, k, v, o, gate, up, down] = &self.linears;
        Ok(LayerWeights {
            q_proj: q.resolve(b)?,
            k_proj: k.resolve(b)?,
            v_proj: v.resolve(b)?,
            o_proj: o.resolve(b)?,
            gate_proj: gate.resolve(b)?,
            up_proj: up.resolve(b)?,
            down_proj: down.resolve(b)?,
        })
    }

    /// `x += o_proj(Attn(RMS_in x))`, then `x += down(silu(gate(RMS_post x)) · up(RMS_post x))`,
    /// on the kept rows of `x` (`[tokens, H]`); every row's K and V go to the cache.
    fn forward(&self, b: &Bundle, x: &mut [f32], cache: &mut KvCache, p: &LayerPass) -> Result<()> {
        let w = self.weights(b)?;
        self.self_attn(&w, x, cache, p);
        let from = p.queries.first_kept_row * p.cfg.hidden_size;
        self.mlp(&w, &mut x[from..], p.cfg, p.pass);
        Ok(())
    }

    /// One decode step of several sequences: row r of `x` (`[n, H]`) is the new token
    /// of the sequence with cache `caches[r]` and rope `ropes[r]`. Every linear runs on
    /// all rows at once in the decode arithmetic, so each weight is read once for the
    /// batch and a row's result is the one it has alone (each output is one dot
    /// product); rope, cache and attention are each sequence's own.
    fn forward_decode(
        &self,
        b: &Bundle,
        x: &mut [f32],
        caches: &mut [&mut KvCache],
        ropes: &[RopeTable],
        layer: usize,
        c: &TextConfig,
    ) -> Result<()> {
        let w = self.weights(b)?;
        let (hsz, hd, n) = (c.hidden_size, c.head_dim, caches.len());
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let eps = c.rms_norm_eps as f32;
        let mut h = vec![0f32; n * hsz];
        rms_norm_rows(x, &self.input_layernorm, eps, &mut h);
        let mut q = vec![0f32; n * nh * hd];
        let mut k = vec![0f32; n * nkv * hd];
        let mut v = vec![0f32; n * nkv * hd];
        w.q_proj.matmul(Pass::Decode, &h, n, &mut q);
        w.k_proj.matmul(Pass::Decode, &h, n, &mut k);
        w.v_proj.matmul(Pass::Decode, &h, n, &mut v);
        let shape = AttentionShape {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        };
        let mut a = Vec::with_capacity(n * nh * hd);
        for (r, cache) in caches.iter_mut().enumerate() {
            let (qr, kr) = (
                &mut q[r * nh * hd..(r + 1) * nh * hd],
                &mut k[r * nkv * hd..(r + 1) * nkv * hd],
            );
            norm_and_rotate(qr, nh, &self.q_norm, eps, &ropes[r], 0);
            norm_and_rotate(kr, nkv, &self.k_norm, eps, &ropes[r], 0);
            cache.write(layer, kr, &v[r * nkv * hd..(r + 1) * nkv * hd], 1);
            let queries = Queries {
                past: cache.len(),
                tokens: 1,
                first_kept_row: 0,
            };
            a.extend(attention(cache, layer, qr, shape, queries));
        }
        let mut o = vec![0f32; n * hsz];
        w.o_proj.matmul(Pass::Decode, &a, n, &mut o);
        add_in_place(x, &o);
        self.mlp(&w, x, c, Pass::Decode);
        Ok(())
    }

    /// The attention sublayer: RMSNorm → q/k/v → per-head q_norm/k_norm → RoPE →
    /// cache → causal attention → o_proj, added to the kept rows of `x`.
    fn self_attn(&self, w: &LayerWeights, x: &mut [f32], cache: &mut KvCache, p: &LayerPass) {
        let c = p.cfg;
        let (hsz, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let eps = c.rms_norm_eps as f32;
        let Queries {
            tokens: t,
            first_kept_row: first,
            ..
        } = p.queries;
        // q, attention and o for rows first.. only; k and v for every row.
        let kept = t - first;
        let mut h = vec![0f32; t * hsz];
        rms_norm_rows(x, &self.input_layernorm, eps, &mut h);
        let mut q = vec![0f32; kept * nh * hd];
        let mut k = vec![0f32; t * nkv * hd];
        let mut v = vec![0f32; t * nkv * hd];
        w.q_proj.matmul(p.pass, &h[first * hsz..], kept, &mut q);
        w.k_proj.matmul(p.pass, &h, t, &mut k);
        w.v_proj.matmul(p.pass, &h, t, &mut v);
        // Per-head RMSNorm of q and k, before RoPE; v is not normed.
        norm_and_rotate(&mut q, nh, &self.q_norm, eps, p.rope, first);
        norm_and_rotate(&mut k, nkv, &self.k_norm, eps, p.rope, 0);
        cache.write(p.layer, &k, &v, t);
        let shape = AttentionShape {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        };
        let a = attention(cache, p.layer, &q, shape, p.queries);
        let mut o = vec![0f32; kept * hsz];
        w.o_proj.matmul(p.pass, &a, kept, &mut o);
        add_in_place(&mut x[first * hsz..], &o);
    }

    /// The MLP sublayer on rows `x`: RMSNorm → gate/up → silu(gate) · up → down, added
    /// to `x`.
    fn mlp(&self, w: &LayerWeights, x: &mut [f32], c: &TextConfig, pass: Pass) {
        let (hsz, inter) = (c.hidden_size, c.intermediate_size);
        let rows = x.len() / hsz;
        let mut h = vec![0f32; rows * hsz];
        rms_norm_rows(
            x,
            &self.post_attention_layernorm,
            c.rms_norm_eps as f32,
            &mut h,
        );
        let mut gate = vec![0f32; rows * inter];
        let mut up = vec![0f32; rows * inter];
        w.gate_proj.matmul(pass, &h, rows, &mut gate);
        w.up_proj.matmul(pass, &h, rows, &mut up);
        gate.par_chunks_mut(ELEMS_PER_TASK)
            .zip(up.par_chunks(ELEMS_PER_TASK))
            .for_each(|(g, u)| vmath::silu_mul(g, u));
        let mut down = vec![0f32; rows * hsz];
        w.down_proj.matmul(pass, &gate, rows, &mut down);
        add_in_place(x, &down);
    }
}

/// RMSNorm then RoPE of every head of `x` (`[rows, heads·hd]`, row r being new token
/// `first_row + r`).
fn norm_and_rotate(
    x: &mut [f32],
    heads: usize,
    norm: &[f32],
    eps: f32,
    rope: &RopeTable,
    first_row: usize,
) {
    for (i, head) in x.chunks_exact_mut(norm.len()).enumerate() {
        rms_norm_in_place(head, norm, eps);
        rope.apply(head, first_row + i / heads);
    }
}

/// The decoder's resident state: the layers' norms and names, the final norm, the rope
/// frequencies; the big weights stay mapped.
pub struct TextModel {
    cfg: TextConfig,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    embed_tokens: Linear,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    /// The M-RoPE axis (t, h, w) of each frequency.
    axis: Vec<usize>,
}

impl TextModel {
    /// Loads the small tensors and checks every large one's shape and dtype.
    pub fn load(b: &Bundle) -> Result<TextModel> {
        let full = b.config();
        let cfg = full.text.clone();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(b, full, i))
            .collect::<Result<Vec<_>>>()?;
        let table = [cfg.vocab_size, h];
        let lm_head = Linear {
            name: b.head_tensor().unwrap_or(LM_HEAD).to_string(),
            shape: table,
        };
        lm_head.resolve(b)?;
        let embed_tokens = Linear {
            name: EMBED.into(),
            shape: table,
        };
        embed_tokens.resolve(b)?;
        let inv = inv_freq(hd, cfg.rope_theta);
        let axis = (0..inv.len())
            .map(|j| mrope_axis(j, cfg.mrope_section))
            .collect();
        Ok(TextModel {
            norm: vector(b, &format!("{TEXT}.norm.weight"), h)?,
            cfg,
            layers,
            embed_tokens,
            lm_head,
            inv_freq: inv,
            axis,
        })
    }

    /// The text config.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Bytes of weights one decode step reads in full: every linear and the head.
    pub fn decode_weight_bytes(&self, b: &Bundle) -> Result<u64> {
        let linears = self.layers.iter().flat_map(|l| &l.linears);
        let mut total = 0u64;
        for l in linears.chain([&self.lm_head]) {
            total += l.resolve(b)?.bytes() as u64;
        }
        Ok(total)
    }

    /// Runs `ids` (already in id space; the prompt's images are `images`) at sequence
    /// indices `cache.len()..`, filling the cache; returns the final-normed hidden
    /// states of `rows` (`[rows, H]`).
    pub fn forward(
        &self,
        b: &Bundle,
        ids: &[u32],
        images: &PromptImages,
        cache: &mut KvCache,
        rows: Rows,
    ) -> Result<Vec<f32>> {
        let (t, past) = (ids.len(), cache.len());
        let mut x = self.embed(b, ids, images)?;
        let rope = self.mrope_cos_sin(ids, past, &images.spans);
        let pass = Pass::of(t);
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            // Rows first_kept_row.. of this layer's output are still needed: all of
            // them, except in the last layer, where only the last token's feeds the
            // head. Every token's K and V are still computed and cached. Each kept row
            // is computed exactly as with all rows present (the products and attention
            // work row by row).
            let first_kept_row = if i == last { rows.first_kept_row(t) } else { 0 };
            let p = LayerPass {
                cfg: &self.cfg,
                pass,
                rope: &rope,
                layer: i,
                queries: Queries {
                    past,
                    tokens: t,
                    first_kept_row,
                },
            };
            layer.forward(b, &mut x, cache, &p)?;
            let from = first_kept_row * self.cfg.hidden_size;
            self.deepstack_add(&mut x[from..], &ids[first_kept_row..], images, i);
        }
        cache.advance(t);
        let from = rows.first_kept_row(t) * self.cfg.hidden_size;
        Ok(self.final_norm(&x[from..]))
    }

    /// One decode step of several sequences at once (continuous batching): `ids[r]`
    /// (a text id) runs after `caches[r]`, whose images sit at `images[r]`; returns the
    /// final-normed hidden states `[n, H]`. Row r equals what [`TextModel::forward`]
    /// gives for that token alone, bit for bit: the linears read each weight once for
    /// all rows, in the arithmetic of a one-token pass.
    pub fn forward_decode(
        &self,
        b: &Bundle,
        ids: &[u32],
        caches: &mut [&mut KvCache],
        images: &[&[ImageSpan]],
    ) -> Result<Vec<f32>> {
        assert!(ids.len() == caches.len() && ids.len() == images.len());
        let mut x = self.embed(b, ids, &PromptImages::default())?;
        let ropes: Vec<RopeTable> = ids
            .iter()
            .zip(caches.iter())
            .zip(images)
            .map(|((&id, c), &img)| self.mrope_cos_sin(&[id], c.len(), img))
            .collect();
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward_decode(b, &mut x, caches, &ropes, i, &self.cfg)?;
        }
        for c in caches.iter_mut() {
            c.advance(1);
        }
        Ok(self.final_norm(&x))
    }

    /// Token embeddings of `ids`: the f16 text row, or the image row for ids ≥ vocab.
    fn embed(&self, b: &Bundle, ids: &[u32], images: &PromptImages) -> Result<Vec<f32>> {
        let hsz = self.cfg.hidden_size;
        let vocab = self.cfg.vocab_size as u32;
        let Lin::F16 { w: table, .. } = self.embed_tokens.resolve(b)? else {
            return Err(EngineError::Tensor {
                name: EMBED.into(),
                msg: "the embedding table must be F16".into(),
            });
        };
        let mut x = vec![0f32; ids.len() * hsz];
        for (row, &id) in x.chunks_exact_mut(hsz).zip(ids) {
            if id >= vocab {
                let (f, r) = images
                    .row((id - vocab) as usize)
                    .ok_or(EngineError::TokenOutsideVocab { id, vocab })?;
                row.copy_from_slice(&f.embeds[r * hsz..(r + 1) * hsz]);
            } else {
                let id = id as usize;
                widen_f16(&table[id * hsz..(id + 1) * hsz], row);
            }
        }
        Ok(x)
    }

    /// cos/sin of every new token from its (id, index) position.
    fn mrope_cos_sin(&self, ids: &[u32], past: usize, images: &[ImageSpan]) -> RopeTable {
        let vocab = self.cfg.vocab_size as u32;
        let angles = ids.iter().enumerate().flat_map(|(k, &id)| {
            let p = position(past + k, id, vocab, images);
            (0..self.inv_freq.len()).map(move |j| p[self.axis[j]] as f32 * self.inv_freq[j])
        });
        RopeTable::from_angles(angles, self.inv_freq.len())
    }

    /// DeepStack: after layer `layer`, each image's feature `layer` is added at its
    /// rows of `x` (`ids` being the rows' ids).
    fn deepstack_add(&self, x: &mut [f32], ids: &[u32], images: &PromptImages, layer: usize) {
        let (hsz, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size as u32);
        for (row, &id) in x.chunks_exact_mut(hsz).zip(ids) {
            if id < vocab {
                continue;
            }
            let Some((f, r)) = images.row((id - vocab) as usize) else {
                continue;
            };
            if let Some(ds) = f.deepstack.get(layer) {
                add_in_place(row, &ds[r * hsz..(r + 1) * hsz]);
            }
        }
    }

    /// The final RMSNorm of rows `x`.
    fn final_norm(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        rms_norm_rows(x, &self.norm, self.cfg.rms_norm_eps as f32, &mut out);
        out
    }

    /// Logits of final-normed hidden states (`[rows, H]` → `[rows, vocab]`), each row
    /// by the decode kernel, so a row's logits do not depend on the others.
    pub fn logits(&self, b: &Bundle, hidden: &[f32]) -> Result<Vec<f32>> {
        let head = self.lm_head.resolve(b)?;
        let t = hidden.len() / self.cfg.hidden_size;
        let mut out = vec![0f32; t * self.cfg.vocab_size];
        head.matmul(Pass::Decode, hidden, t, &mut out);
        Ok(out)
    }
}
