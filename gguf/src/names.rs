//! The names llama.cpp gives Qwen3-VL's tensors (as its converter writes them for
//! `Qwen3VLForConditionalGeneration`), paired with the HF names q3vl's model reads.
//!
//! Text (`qwen3vl`): `token_embd`, `output_norm`, `output` (an untied head), and under
//! `blk.N` each decoder layer's norms and linears. Projector (`clip`, `qwen3vl_merger`):
//! the Conv3d patch embedding split into its temporal halves (`v.patch_embd.weight`,
//! `v.patch_embd.weight.1`), each ViT block under `v.blk.J`, the merger as
//! `v.post_ln`/`mm.0`/`mm.2`, and each DeepStack merger as `v.deepstack.L` with `L` the
//! index of the ViT block it reads.

use q3vl_model::layout::{self, EMBED, LM_HEAD};
use q3vl_model::Qwen3VlConfig;

/// The embedding table.
pub const TOKEN_EMBD: &str = "token_embd.weight";
/// The final RMSNorm.
pub const OUTPUT_NORM: &str = "output_norm.weight";
/// An untied LM head.
pub const OUTPUT: &str = "output.weight";

/// (HF leaf under a decoder layer, llama.cpp's name under `blk.N`).
pub const TEXT_LAYER: [(&str, &str); 11] = [
    ("input_layernorm.weight", "attn_norm"),
    ("self_attn.q_proj.weight", "attn_q"),
    ("self_attn.k_proj.weight", "attn_k"),
    ("self_attn.v_proj.weight", "attn_v"),
    ("self_attn.o_proj.weight", "attn_output"),
    ("self_attn.q_norm.weight", "attn_q_norm"),
    ("self_attn.k_norm.weight", "attn_k_norm"),
    ("post_attention_layernorm.weight", "ffn_norm"),
    ("mlp.gate_proj.weight", "ffn_gate"),
    ("mlp.up_proj.weight", "ffn_up"),
    ("mlp.down_proj.weight", "ffn_down"),
];

/// llama.cpp's name of decoder layer `i`'s tensor `short` (`attn_q`).
pub fn blk(i: usize, short: &str) -> String {
    format!("blk.{i}.{short}.weight")
}

/// (HF name, llama.cpp name) of every text tensor, in the converter's order; the head
/// only when `with_head` (an untied one).
pub fn text_pairs(cfg: &Qwen3VlConfig, with_head: bool) -> Vec<(String, String)> {
    let mut out = vec![
        (EMBED.to_string(), TOKEN_EMBD.to_string()),
        (
            format!("{}.norm.weight", layout::TEXT),
            OUTPUT_NORM.to_string(),
        ),
    ];
    if with_head {
        out.push((LM_HEAD.to_string(), OUTPUT.to_string()));
    }
    for i in 0..cfg.text.num_hidden_layers {
        for (leaf, short) in TEXT_LAYER {
            out.push((layout::text_layer(i, leaf), blk(i, short)));
        }
    }
    out
}

/// The HF name of the Conv3d patch embedding, stored in GGUF as temporal halves.
pub fn patch_embed() -> String {
    layout::visual("patch_embed.proj.weight")
}

/// llama.cpp's name of the patch embedding's temporal slice `k`.
pub fn patch_half(k: usize) -> String {
    match k {
        0 => "v.patch_embd.weight".to_string(),
        k => format!("v.patch_embd.weight.{k}"),
    }
}

/// (HF name, llama.cpp name) of every vision tensor but the Conv3d weight
/// ([`patch_half`]), in the converter's order.
pub fn mmproj_pairs(cfg: &Qwen3VlConfig) -> Vec<(String, String)> {
    let v = &cfg.vision;
    let both = |hf: String, gg: String| {
        ["weight", "bias"].map(|part| (format!("{hf}.{part}"), format!("{gg}.{part}")))
    };
    let mut out = vec![
        (
            layout::visual("patch_embed.proj.bias"),
            "v.patch_embd.bias".into(),
        ),
        (
            layout::visual("pos_embed.weight"),
            "v.position_embd.weight".into(),
        ),
    ];
    let block = [
        ("norm1", "ln1"),
        ("attn.qkv", "attn_qkv"),
        ("attn.proj", "attn_out"),
        ("norm2", "ln2"),
        ("mlp.linear_fc1", "ffn_up"),
        ("mlp.linear_fc2", "ffn_down"),
    ];
    for j in 0..v.depth {
        for (hf, gg) in block {
            out.extend(both(layout::vision_block(j, hf), format!("v.blk.{j}.{gg}")));
        }
    }
    for (hf, gg) in [
        ("norm", "v.post_ln"),
        ("linear_fc1", "mm.0"),
        ("linear_fc2", "mm.2"),
    ] {
        out.extend(both(layout::visual(&format!("merger.{hf}")), gg.into()));
    }
    for (k, &layer) in v.deepstack_visual_indexes.iter().enumerate() {
        for (hf, gg) in [
            ("norm", "norm"),
            ("linear_fc1", "fc1"),
            ("linear_fc2", "fc2"),
        ] {
            out.extend(both(
                layout::deepstack(k, hf),
                format!("v.deepstack.{layer}.{gg}"),
            ));
        }
    }
    out
}
