//! The text decoder on int8 (or f16) weights: embedding by id (text row or image
//! row), pre-norm layers with q/k RMSNorm and interleaved M-RoPE, GQA causal
//! attention over the KV cache, SwiGLU MLP, DeepStack additions after the first
//! layers, final norm and head. Prefill runs all prompt tokens through each matrix
//! product at once; decode is the same code with one token. Generation needs only the
//! last token's output, so a prefill's last layer caches every token's K and V but
//! runs q, attention, o and the MLP for the last row alone ([`Rows::Last`]; 1/36 of
//! an 8B prefill's work, with the same bits for that row).

use crate::error::Result;
use crate::kernels::gemm::{gemm_serial, BSrc, MatMut, MatRef};
use crate::kernels::row::{dot_f32, widen_f16};
use crate::kernels::vmath;
use crate::kv_cache::KvCache;
use crate::positions::{position, ImageSpan};
use crate::vision::ImageFeatures;
use crate::weights::{vector, Lin, Pass};
use half::f16;
use q3vl_bundle::Bundle;
use q3vl_model::config::TextConfig;
use q3vl_model::layout::{text_layer, EMBED};
use q3vl_model::rope::{inv_freq, mrope_axis};
use rayon::prelude::*;
use std::collections::HashMap;

/// Elements per parallel task of the element-wise passes.
const ELEMS_PER_TASK: usize = 1 << 14;

/// Prefill query rows per attention block (bounds the scores a thread holds).
const QUERY_BLOCK: usize = 64;

/// The seven body linears, in the order [`LayerParams`] holds their names.
pub const LINEARS: [&str; 7] = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

/// One layer's small f32 tensors, loaded at open, plus its linears' names.
pub struct LayerParams {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    names: [String; 7],
}

/// Which tokens' final hidden states a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// The last token's (what generation needs): the last layer then computes its
    /// attention output and MLP for that token alone.
    Last,
    /// Every new token's (scoring a prompt).
    All,
}

/// The decoder's resident state: small tensors and names; big weights stay mapped.
pub struct TextModel {
    cfg: TextConfig,
    layers: Vec<LayerParams>,
    final_norm: Vec<f32>,
    head: String,
    inv_freq: Vec<f32>,
    axis: Vec<usize>,
}

/// Everything a forward pass borrows.
pub struct Weights<'a> {
    /// The language bundle.
    pub bundle: &'a Bundle,
    /// Scale overrides (test hook).
    pub overrides: &'a HashMap<String, Vec<f16>>,
}

impl TextModel {
    /// Loads the small tensors and checks every large one's shape and dtype.
    pub fn load(b: &Bundle, overrides: &HashMap<String, Vec<f16>>) -> Result<TextModel> {
        let cfg = b.config().text.clone();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let names = LINEARS.map(|l| text_layer(i, l));
            let p = LayerParams {
                input_norm: vector(b, &text_layer(i, "input_layernorm.weight"), h)?,
                post_norm: vector(b, &text_layer(i, "post_attention_layernorm.weight"), h)?,
                q_norm: vector(b, &text_layer(i, "self_attn.q_norm.weight"), hd)?,
                k_norm: vector(b, &text_layer(i, "self_attn.k_norm.weight"), hd)?,
                names,
            };
            let shapes = Self::shapes(&cfg);
            for (n, (r, c)) in p.names.iter().zip(shapes) {
                Lin::resolve(b, n, r, c, overrides)?;
            }
            layers.push(p);
        }
        let head = b
            .head_tensor()
            .map(str::to_string)
            .unwrap_or_else(|| q3vl_model::layout::LM_HEAD.to_string());
        Lin::resolve(b, &head, cfg.vocab_size, h, overrides)?;
        Lin::resolve(b, EMBED, cfg.vocab_size, h, overrides)?;
        let inv = inv_freq(hd, cfg.rope_theta);
        let axis = (0..inv.len())
            .map(|j| mrope_axis(j, cfg.mrope_section))
            .collect();
        Ok(TextModel {
            final_norm: vector(b, &format!("{}.norm.weight", q3vl_model::layout::TEXT), h)?,
            cfg,
            layers,
            head,
            inv_freq: inv,
            axis,
        })
    }

    /// `[out, in]` of the seven linears.
    fn shapes(cfg: &TextConfig) -> [(usize, usize); 7] {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    }

    /// The text config.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Names of the tensors one decode step reads (all linears and the head).
    pub fn linear_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .layers
            .iter()
            .flat_map(|l| l.names.iter().map(String::as_str))
            .collect();
        v.push(&self.head);
        v
    }

    /// Runs `ids` (already in id space) at sequence indices `cache.len()..`, filling
    /// the cache; returns the final-normed hidden states of `rows` (`[rows, H]`).
    pub fn forward(
        &self,
        w: &Weights<'_>,
        ids: &[u32],
        image: Option<(&ImageFeatures, &ImageSpan)>,
        cache: &mut KvCache,
        rows: Rows,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (hsz, hd, nh, nkv) = (
            c.hidden_size,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
        );
        let t = ids.len();
        let past = cache.len();
        let vocab = c.vocab_size as u32;
        let eps = c.rms_norm_eps as f32;
        let lin =
            |name: &str, r: usize, cc: usize| Lin::resolve(w.bundle, name, r, cc, w.overrides);
        // Embedding: the f16 text row, or the image row for ids ≥ vocab.
        let embed = lin(EMBED, c.vocab_size, hsz)?;
        let Lin::F16 { w: table, .. } = embed else {
            return Err(crate::EngineError::Tensor {
                name: EMBED.into(),
                msg: "the embedding table must be F16".into(),
            });
        };
        let mut x = vec![0f32; t * hsz];
        for (row, &id) in x.chunks_exact_mut(hsz).zip(ids) {
            if id >= vocab {
                let (f, _) = image.expect("image ids imply image features");
                let slot = (id - vocab) as usize;
                row.copy_from_slice(&f.embeds[slot * hsz..(slot + 1) * hsz]);
            } else {
                let id = id as usize;
                widen_f16(&table[id * hsz..(id + 1) * hsz], row);
            }
        }
        // cos/sin of every token from its (id, index) position.
        let half = self.inv_freq.len();
        let mut cos = vec![0f32; t * half];
        let mut sin = vec![0f32; t * half];
        for (k, &id) in ids.iter().enumerate() {
            let p = position(past + k, id, vocab, image.map(|(_, s)| s));
            for j in 0..half {
                let a = p[self.axis[j]] as f32 * self.inv_freq[j];
                cos[k * half + j] = a.cos();
                sin[k * half + j] = a.sin();
            }
        }
        let shapes = Self::shapes(c);
        let pass = Pass::of(t);
        let mut h = vec![0f32; t * hsz];
        for (li, layer) in self.layers.iter().enumerate() {
            let l: Vec<Lin<'_>> = layer
                .names
                .iter()
                .zip(shapes)
                .map(|(n, (r, cc))| lin(n, r, cc))
                .collect::<Result<_>>()?;
            // Rows r0.. of this layer's output are still needed: all of them, except in
            // the last layer, where only the last token's feeds the head. Every token's
            // K and V are still computed and cached. Each kept row is computed exactly
            // as with all rows present (the products and attention work row by row).
            let r0 = if li + 1 == self.layers.len() && rows == Rows::Last {
                t - 1
            } else {
                0
            };
            let tq = t - r0;
            rms_norm_rows(&x, &layer.input_norm, eps, &mut h);
            let mut q = vec![0f32; tq * nh * hd];
            let mut k = vec![0f32; t * nkv * hd];
            let mut v = vec![0f32; t * nkv * hd];
            l[0].matmul(pass, &h[r0 * hsz..], tq, &mut q);
            l[1].matmul(pass, &h, t, &mut k);
            l[2].matmul(pass, &h, t, &mut v);
            for (qh, tok) in q
                .chunks_exact_mut(hd)
                .zip((r0..t).flat_map(|tk| std::iter::repeat_n(tk, nh)))
            {
                rms_norm_in_place(qh, &layer.q_norm, eps);
                rope(
                    qh,
                    &cos[tok * half..(tok + 1) * half],
                    &sin[tok * half..(tok + 1) * half],
                );
            }
            for (kh, tok) in k
                .chunks_exact_mut(hd)
                .zip((0..t).flat_map(|tk| std::iter::repeat_n(tk, nkv)))
            {
                rms_norm_in_place(kh, &layer.k_norm, eps);
                rope(
                    kh,
                    &cos[tok * half..(tok + 1) * half],
                    &sin[tok * half..(tok + 1) * half],
                );
            }
            cache.write(li, &k, &v, t);
            let attn = attention(cache, li, &q, t, r0, past, nh, nkv, hd);
            let xk = &mut x[r0 * hsz..];
            let hk = &mut h[..tq * hsz];
            let mut o = vec![0f32; tq * hsz];
            l[3].matmul(pass, &attn, tq, &mut o);
            for (xv, ov) in xk.iter_mut().zip(&o) {
                *xv += ov;
            }
            rms_norm_rows(xk, &layer.post_norm, eps, hk);
            let inter = c.intermediate_size;
            let mut g = vec![0f32; tq * inter];
            let mut u = vec![0f32; tq * inter];
            l[4].matmul(pass, hk, tq, &mut g);
            l[5].matmul(pass, hk, tq, &mut u);
            g.par_chunks_mut(ELEMS_PER_TASK)
                .zip(u.par_chunks(ELEMS_PER_TASK))
                .for_each(|(gc, uc)| vmath::silu_mul(gc, uc));
            l[6].matmul(pass, &g, tq, &mut o);
            for (xv, ov) in xk.iter_mut().zip(&o) {
                *xv += ov;
            }
            // DeepStack: after layer li, add feature li at the image rows.
            if let Some((f, _)) = image {
                if let Some(ds) = f.deepstack.get(li) {
                    for (row, &id) in xk.chunks_exact_mut(hsz).zip(&ids[r0..]) {
                        if id >= vocab {
                            let slot = (id - vocab) as usize;
                            for (a, b) in row.iter_mut().zip(&ds[slot * hsz..(slot + 1) * hsz]) {
                                *a += b;
                            }
                        }
                    }
                }
            }
        }
        cache.advance(t);
        let r0 = match rows {
            Rows::Last => t - 1,
            Rows::All => 0,
        };
        let mut out = vec![0f32; (t - r0) * hsz];
        rms_norm_rows(&x[r0 * hsz..], &self.final_norm, eps, &mut out);
        Ok(out)
    }

    /// Logits of final-normed hidden states (`[rows, H]` → `[rows, vocab]`), each row
    /// by the decode kernel, so a row's logits do not depend on the others.
    pub fn logits(&self, w: &Weights<'_>, hidden: &[f32]) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let head = Lin::resolve(
            w.bundle,
            &self.head,
            c.vocab_size,
            c.hidden_size,
            w.overrides,
        )?;
        let t = hidden.len() / c.hidden_size;
        let mut out = vec![0f32; t * c.vocab_size];
        head.matmul(Pass::Decode, hidden, t, &mut out);
        Ok(out)
    }
}

/// `w · x / sqrt(mean(x²) + eps)` over each row of `x` into `out`.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * r);
        }
    }
}

fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let n = x.len();
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
    let r = 1.0 / (ss + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = g * (*v * r);
    }
}

/// Rotate-half RoPE of one head: `x·cos + rotate_half(x)·sin`, with cos/sin of the
/// first half repeated for the second.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for j in 0..half {
        let (a, b) = (x[j], x[j + half]);
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j] + a * sin[j];
    }
}

/// Causal GQA attention over the cache for queries `r0..t` of the pass's `t` new
/// tokens (at indices `past..`; `q: [t − r0, nh·hd]`); returns `[t − r0, nh·hd]`.
/// Heads run in parallel. A decode pass (`t = 1`) takes fixed-order dot products; a
/// prefill goes through the packed GEMM in blocks of [`QUERY_BLOCK`] queries:
/// scores, causal softmax, then `P · V`. A query's result does not depend on `r0`
/// (see the block loop).
#[allow(clippy::too_many_arguments)]
fn attention(
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    t: usize,
    r0: usize,
    past: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
) -> Vec<f32> {
    let groups = nh / nkv;
    let scale = (hd as f32).powf(-0.5);
    let per_head: Vec<Vec<f32>> = (0..nh)
        .into_par_iter()
        .map(|h| {
            let (ks, vs) = cache.head(layer, h / groups, past + t);
            let mut out = vec![0f32; (t - r0) * hd];
            if t == 1 {
                let n = past + 1;
                let qi = &q[h * hd..(h + 1) * hd];
                let mut scores = vec![0f32; n];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = dot_f32(qi, &ks[j * hd..(j + 1) * hd]) * scale;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in &mut scores {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                for (j, &p) in scores.iter().enumerate() {
                    for (ov, &vv) in out.iter_mut().zip(&vs[j * hd..(j + 1) * hd]) {
                        *ov += p * vv;
                    }
                }
                let inv = 1.0 / sum;
                for ov in out.iter_mut() {
                    *ov *= inv;
                }
                return out;
            }
            let mut scores = vec![0f32; QUERY_BLOCK.min(t) * (past + t)];
            let mut i0 = r0;
            while i0 < t {
                // Blocks end where they would with every query present (at multiples
                // of QUERY_BLOCK), so each query sees the same `n` keys whatever `r0`.
                let qb = (QUERY_BLOCK - i0 % QUERY_BLOCK).min(t - i0);
                // Keys visible to the block's last query.
                let n = past + i0 + qb;
                let s = &mut scores[..qb * n];
                gemm_serial(
                    MatRef {
                        data: &q[(i0 - r0) * nh * hd + h * hd..],
                        rows: qb,
                        cols: hd,
                        stride: nh * hd,
                    },
                    BSrc::F32 {
                        data: ks,
                        rs: hd,
                        cs: 1,
                    },
                    MatMut {
                        data: s,
                        rows: qb,
                        cols: n,
                        stride: n,
                    },
                );
                for (r, row) in s.chunks_exact_mut(n).enumerate() {
                    let visible = past + i0 + r + 1;
                    vmath::softmax_row(&mut row[..visible], scale);
                    row[visible..].fill(0.0);
                }
                gemm_serial(
                    MatRef {
                        data: s,
                        rows: qb,
                        cols: n,
                        stride: n,
                    },
                    BSrc::F32 {
                        data: vs,
                        rs: 1,
                        cs: hd,
                    },
                    MatMut {
                        data: &mut out[(i0 - r0) * hd..(i0 - r0 + qb) * hd],
                        rows: qb,
                        cols: hd,
                        stride: hd,
                    },
                );
                i0 += qb;
            }
            out
        })
        .collect();
    let mut out = vec![0f32; (t - r0) * nh * hd];
    for (h, ph) in per_head.iter().enumerate() {
        for i in 0..t - r0 {
            out[(i * nh + h) * hd..(i * nh + h + 1) * hd]
                .copy_from_slice(&ph[i * hd..(i + 1) * hd]);
        }
    }
    out
}
