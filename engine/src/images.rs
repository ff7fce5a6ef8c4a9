//! [`PromptImages`]: a prompt's images, each one's tower output and where it sits in
//! the sequence, so the decoder finds the rows of image slot k.

use crate::positions::ImageSpan;
use crate::vision::EncodedImage;
use std::sync::Arc;

/// The images of one prompt, in prompt order.
#[derive(Debug, Clone, Default)]
pub struct PromptImages {
    /// Each image's tower output.
    pub features: Vec<Arc<EncodedImage>>,
    /// Each image's place (from [`crate::positions::map_image_ids`]).
    pub spans: Vec<ImageSpan>,
}

impl PromptImages {
    /// Whether the prompt has no image.
    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// The image holding slot `slot`, and the slot's row in it.
    pub fn row(&self, slot: usize) -> Option<(&EncodedImage, usize)> {
        let k = self.spans.iter().position(|s| s.holds(slot))?;
        Some((&self.features[k], slot - self.spans[k].first_slot))
    }
}
