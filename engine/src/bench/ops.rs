//! The arithmetic of a phase, counted from the model's shape: multiply-adds of the
//! linears and of attention's two products (scores and the weighted sum of values; at
//! the 8B shape and a 448² image, 11% of the vision tower's and under 1% of a 211-token
//! prefill's). Norms, activations and softmax are left out. A phase's rate in
//! operations per second, over an instruction's peak ([`super::peaks`]), says how much
//! of the machine it uses.

use q3vl_model::config::{TextConfig, VisionConfig};

/// Multiply-adds of the decoder's linears per token (q, k, v, o and the gated MLP of
/// every layer).
pub fn text_linear_macs_per_token(tc: &TextConfig) -> u64 {
    let (h, i) = (tc.hidden_size as u64, tc.intermediate_size as u64);
    let q = (tc.num_attention_heads * tc.head_dim) as u64;
    let kv = (tc.num_key_value_heads * tc.head_dim) as u64;
    let layer = h * q + 2 * h * kv + q * h + 3 * h * i;
    tc.num_hidden_layers as u64 * layer
}

/// Operations (2 per multiply-add) of a prefill of `tokens`: every layer's linears
/// for each token, causal attention (token `i` against the `i + 1` positions up to
/// it, for scores and values), and the head's for the last token.
pub fn prefill_ops(tc: &TextConfig, tokens: usize) -> f64 {
    let head = (tc.vocab_size * tc.hidden_size) as u64;
    let t = tokens as u64;
    let attention = (tc.num_attention_heads * tc.head_dim) as u64 * t * (t + 1);
    let macs = text_linear_macs_per_token(tc) * t + tc.num_hidden_layers as u64 * attention;
    2.0 * (macs + head) as f64
}

/// Operations (2 per multiply-add) of the vision tower on an image of `patches`
/// patches: the patch embedding and every block's projections per patch, every
/// block's full attention (each patch against every patch, for scores and values),
/// the merger and each DeepStack merger per merged token.
pub fn vision_ops(vc: &VisionConfig, patches: usize) -> f64 {
    let (h, i, p) = (
        vc.hidden_size as u64,
        vc.intermediate_size as u64,
        patches as u64,
    );
    let embed =
        (vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size) as u64 * h;
    let block = 3 * h * h + h * h + 2 * h * i + 2 * p * h;
    let m = (vc.spatial_merge_size * vc.spatial_merge_size) as u64;
    let merged_in = h * m;
    let merger = merged_in * merged_in + merged_in * vc.out_hidden_size as u64;
    let mergers = 1 + vc.deepstack_visual_indexes.len() as u64;
    let macs = p * (embed + vc.depth as u64 * block) + p / m * mergers * merger;
    2.0 * macs as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use q3vl_model::config::{Qwen3VlConfig, Size};

    #[test]
    fn the_8b_shape_counts_its_linears_and_attention() {
        let c = Qwen3VlConfig::preset(Size::B8);
        // 36 layers × (2 × 4096² + 2 × 4096 × 1024 + 3 × 4096 × 12288) = 6.946e9.
        assert_eq!(text_linear_macs_per_token(&c.text), 6_945_767_424);
        let head = 151_936.0 * 4096.0;
        // Two tokens: 1 + 2 scored positions, 32 heads of 128, 36 layers.
        let attention = 36.0 * 4096.0 * 2.0 * 3.0;
        let want = 2.0 * (2.0 * 6_945_767_424.0 + attention + head);
        assert_eq!(prefill_ops(&c.text, 2), want);
        // One 448² image: 784 patches, 196 merged tokens; attention 2 · 784 · 1152 per
        // patch and block.
        let v = vision_ops(&c.vision, 784);
        let block = 4.0 * 1152.0 * 1152.0 + 2.0 * 1152.0 * 4304.0 + 2.0 * 784.0 * 1152.0;
        let embed = 1536.0 * 1152.0;
        let merger = 4608.0 * 4608.0 + 4608.0 * 4096.0;
        let want = 2.0 * (784.0 * (embed + 27.0 * block) + 196.0 * 4.0 * merger);
        assert_eq!(v, want);
    }
}
