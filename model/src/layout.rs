//! The Hugging Face tensor layout of a Qwen3-VL checkpoint: every tensor's name,
//! shape and role, derived from the config (`docs/qwen3-vl-reference.md` §2).

use crate::config::Qwen3VlConfig;

/// Prefix of the decoder's tensors.
pub const TEXT: &str = "model.language_model";
/// Prefix of the vision tower's tensors.
pub const VISUAL: &str = "model.visual";
/// The LM head.
pub const LM_HEAD: &str = "lm_head.weight";
/// The token embedding table.
pub const EMBED: &str = "model.language_model.embed_tokens.weight";

/// What a tensor is, which decides how a bundle stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TensorClass {
    /// A decoder projection (`q/k/v/o_proj`, `gate/up/down_proj`): int8 in the int8 modes.
    TextLinear,
    /// The LM head (`lm_head.weight`).
    Head,
    /// The token embedding table.
    Embedding,
    /// Any one-dimensional tensor (norm weights, biases).
    Vector,
    /// The vision tower's learned position table (kept f32).
    VisionPosEmbed,
    /// Every other vision tensor (f16).
    Vision,
}

impl TensorClass {
    /// A stable lower-case name for metadata and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            TensorClass::TextLinear => "text_linear",
            TensorClass::Head => "head",
            TensorClass::Embedding => "embedding",
            TensorClass::Vector => "vector",
            TensorClass::VisionPosEmbed => "vision_pos_embed",
            TensorClass::Vision => "vision",
        }
    }
}

/// One expected tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// HF name.
    pub name: String,
    /// Shape the config implies.
    pub shape: Vec<usize>,
    /// Role.
    pub class: TensorClass,
}

/// Name of a decoder-layer tensor, e.g. `text_layer(3, "self_attn.q_proj.weight")`.
pub fn text_layer(i: usize, leaf: &str) -> String {
    format!("{TEXT}.layers.{i}.{leaf}")
}

/// Name of a ViT-block tensor.
pub fn vision_block(j: usize, leaf: &str) -> String {
    format!("{VISUAL}.blocks.{j}.{leaf}")
}

/// Name of a vision tensor outside the blocks (`patch_embed.proj.weight`, `merger.norm.weight`, ...).
pub fn visual(leaf: &str) -> String {
    format!("{VISUAL}.{leaf}")
}

/// Name of a DeepStack merger tensor.
pub fn deepstack(k: usize, leaf: &str) -> String {
    format!("{VISUAL}.deepstack_merger_list.{k}.{leaf}")
}

/// The seven body linears of one decoder layer, as (leaf name, [out, in]).
pub fn text_linears(cfg: &Qwen3VlConfig) -> [(&'static str, [usize; 2]); 7] {
    let t = &cfg.text;
    let (h, q, kv, i) = (
        t.hidden_size,
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
        t.intermediate_size,
    );
    [
        ("self_attn.q_proj.weight", [q, h]),
        ("self_attn.k_proj.weight", [kv, h]),
        ("self_attn.v_proj.weight", [kv, h]),
        ("self_attn.o_proj.weight", [h, q]),
        ("mlp.gate_proj.weight", [i, h]),
        ("mlp.up_proj.weight", [i, h]),
        ("mlp.down_proj.weight", [h, i]),
    ]
}

/// The decoder's tensors (embedding, layers, final norm, head), in checkpoint order.
/// For a tied config the head is listed only when `include_tied_head` is set.
pub fn text_tensors(cfg: &Qwen3VlConfig, include_tied_head: bool) -> Vec<TensorSpec> {
    let t = &cfg.text;
    let mut out = vec![TensorSpec {
        name: EMBED.into(),
        shape: vec![t.vocab_size, t.hidden_size],
        class: TensorClass::Embedding,
    }];
    for i in 0..t.num_hidden_layers {
        out.extend(text_layer_tensors(cfg, i));
    }
    out.push(vec1(format!("{TEXT}.norm.weight"), t.hidden_size));
    if !cfg.tie_word_embeddings || include_tied_head {
        out.push(TensorSpec {
            name: LM_HEAD.into(),
            shape: vec![t.vocab_size, t.hidden_size],
            class: TensorClass::Head,
        });
    }
    out
}

/// The tensors of decoder layer `i`.
pub fn text_layer_tensors(cfg: &Qwen3VlConfig, i: usize) -> Vec<TensorSpec> {
    let t = &cfg.text;
    let mut out = vec![
        vec1(text_layer(i, "input_layernorm.weight"), t.hidden_size),
        vec1(
            text_layer(i, "post_attention_layernorm.weight"),
            t.hidden_size,
        ),
        vec1(text_layer(i, "self_attn.q_norm.weight"), t.head_dim),
        vec1(text_layer(i, "self_attn.k_norm.weight"), t.head_dim),
    ];
    for (leaf, [o, n]) in text_linears(cfg) {
        out.push(TensorSpec {
            name: text_layer(i, leaf),
            shape: vec![o, n],
            class: TensorClass::TextLinear,
        });
    }
    out
}

/// The vision tower's tensors.
pub fn vision_tensors(cfg: &Qwen3VlConfig) -> Vec<TensorSpec> {
    let v = &cfg.vision;
    let (d, iv, m, o) = (
        v.hidden_size,
        v.intermediate_size,
        v.merged_dim(),
        v.out_hidden_size,
    );
    let mat = |name: String, shape: Vec<usize>| TensorSpec {
        name,
        shape,
        class: TensorClass::Vision,
    };
    let mut out = vec![
        mat(
            visual("patch_embed.proj.weight"),
            vec![
                d,
                v.in_channels,
                v.temporal_patch_size,
                v.patch_size,
                v.patch_size,
            ],
        ),
        vec1(visual("patch_embed.proj.bias"), d),
        TensorSpec {
            name: visual("pos_embed.weight"),
            shape: vec![v.num_position_embeddings, d],
            class: TensorClass::VisionPosEmbed,
        },
    ];
    for j in 0..v.depth {
        for n in ["norm1", "norm2"] {
            out.push(vec1(vision_block(j, &format!("{n}.weight")), d));
            out.push(vec1(vision_block(j, &format!("{n}.bias")), d));
        }
        out.push(mat(vision_block(j, "attn.qkv.weight"), vec![3 * d, d]));
        out.push(vec1(vision_block(j, "attn.qkv.bias"), 3 * d));
        out.push(mat(vision_block(j, "attn.proj.weight"), vec![d, d]));
        out.push(vec1(vision_block(j, "attn.proj.bias"), d));
        out.push(mat(vision_block(j, "mlp.linear_fc1.weight"), vec![iv, d]));
        out.push(vec1(vision_block(j, "mlp.linear_fc1.bias"), iv));
        out.push(mat(vision_block(j, "mlp.linear_fc2.weight"), vec![d, iv]));
        out.push(vec1(vision_block(j, "mlp.linear_fc2.bias"), d));
    }
    let merger = |out: &mut Vec<TensorSpec>, name: &dyn Fn(&str) -> String, norm: usize| {
        out.push(vec1(name("norm.weight"), norm));
        out.push(vec1(name("norm.bias"), norm));
        out.push(mat(name("linear_fc1.weight"), vec![m, m]));
        out.push(vec1(name("linear_fc1.bias"), m));
        out.push(mat(name("linear_fc2.weight"), vec![o, m]));
        out.push(vec1(name("linear_fc2.bias"), o));
    };
    merger(&mut out, &|leaf| visual(&format!("merger.{leaf}")), d);
    for k in 0..v.deepstack_visual_indexes.len() {
        merger(&mut out, &|leaf| deepstack(k, leaf), m);
    }
    out
}

/// Every tensor a checkpoint of this config must hold (the tied head excluded).
pub fn checkpoint_tensors(cfg: &Qwen3VlConfig) -> Vec<TensorSpec> {
    let mut out = text_tensors(cfg, false);
    out.extend(vision_tensors(cfg));
    out
}

fn vec1(name: String, n: usize) -> TensorSpec {
    TensorSpec {
        name,
        shape: vec![n],
        class: TensorClass::Vector,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Size;

    /// The parameter counts match the published model sizes.
    #[test]
    fn preset_parameter_counts() {
        let count = |s| -> f64 {
            let c = Qwen3VlConfig::preset(s);
            checkpoint_tensors(&c)
                .iter()
                .map(|t| t.shape.iter().product::<usize>() as f64)
                .sum::<f64>()
                / 1e9
        };
        let (b2, b4, b8) = (count(Size::B2), count(Size::B4), count(Size::B8));
        assert!((2.0..2.3).contains(&b2), "2B: {b2}");
        assert!((4.3..4.6).contains(&b4), "4B: {b4}");
        assert!((8.6..8.9).contains(&b8), "8B: {b8}");
    }
}
