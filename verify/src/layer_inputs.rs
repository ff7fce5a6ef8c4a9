//! The input of each decoder layer, as a trace or a reference run recorded it: the
//! embeddings for layer 0, then each layer's output plus, for the first layers of an
//! image prompt, its DeepStack addition at the image rows (docs/qwen3-vl-reference.md).
//! The one place the verifier adds DeepStack features.

use crate::error::Result;
use candle_core::Tensor;
use q3vl_model::text::{add_rows, image_rows};
use q3vl_model::{taps, Qwen3VlConfig};

/// The input to each of the `L` decoder layers, then to the final norm (`L + 1`
/// tensors), from the taps `tap` looks up by name; `ids` are the prompt's, and
/// `has_image` says whether DeepStack features exist.
pub fn layer_inputs<'t>(
    cfg: &Qwen3VlConfig,
    ids: &[u32],
    has_image: bool,
    tap: impl Fn(&str) -> Result<&'t Tensor>,
) -> Result<Vec<Tensor>> {
    let img_rows = image_rows(ids, cfg.image_token_id);
    let n_ds = match has_image {
        true => cfg.vision.deepstack_visual_indexes.len(),
        false => 0,
    };
    let mut inputs = vec![tap(taps::TEXT_EMBED)?.clone()];
    for i in 0..cfg.text.num_hidden_layers {
        let mut x = tap(&taps::text_layer(i))?.clone();
        if i < n_ds && !img_rows.is_empty() {
            x = add_rows(&x, &img_rows, tap(&taps::vision_deepstack(i))?)?;
        }
        inputs.push(x);
    }
    Ok(inputs)
}
