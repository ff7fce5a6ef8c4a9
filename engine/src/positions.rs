//! M-RoPE positions from (id, index) alone: the id-space trick (`docs/zoo-recipe.md` §5).
//!
//! Each `<|image_pad|>` becomes `vocab + slot`, slots counting the prompt's image
//! tokens in order; an image token's (t, h, w) position follows from its index and
//! slot, and text after each image is shifted back by that image's `N − max(h', w')`
//! (the rope shift, as HF's `get_rope_index` does), so no position tensor is carried
//! around.

use crate::error::{EngineError, Result};

/// Where one image sits in the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpan {
    /// Index of the first image token.
    pub start: usize,
    /// Number of image tokens N (merged grid h' × w').
    pub tokens: usize,
    /// Merged grid width w'.
    pub grid_w: usize,
    /// Rope positions the image consumes: max(h', w').
    pub extent: usize,
    /// The slot of its first token (slots count the prompt's image tokens in order).
    pub first_slot: usize,
    /// How far the images before it shifted the positions back.
    pub shift_before: i64,
}

impl ImageSpan {
    /// Index of the first token after the image.
    pub fn end(&self) -> usize {
        self.start + self.tokens
    }

    /// How far the image shifts the text after it back: `N − max(h', w')`.
    pub fn shift(&self) -> i64 {
        self.tokens as i64 - self.extent as i64
    }

    /// Whether slot `slot` is one of this image's.
    pub fn holds(&self, slot: usize) -> bool {
        (self.first_slot..self.first_slot + self.tokens).contains(&slot)
    }
}

/// The (t, h, w) position of the token with id `id` at sequence index `index`, the
/// prompt's images being `images` (in order).
pub fn position(index: usize, id: u32, vocab: u32, images: &[ImageSpan]) -> [i64; 3] {
    let p = index as i64;
    if id >= vocab {
        let slot = (id - vocab) as usize;
        if let Some(img) = images.iter().find(|s| s.holds(slot)) {
            let local = (slot - img.first_slot) as i64;
            // The image's first token sits at its index less the shift before it.
            let s0 = p - local - img.shift_before;
            let w = img.grid_w as i64;
            return [s0, s0 + local / w, s0 + local % w];
        }
    }
    let shift: i64 = images
        .iter()
        .filter(|s| index >= s.end())
        .map(ImageSpan::shift)
        .sum();
    [p - shift; 3]
}

/// Rewrites the image pads of `ids` to `vocab + slot`, returning the new ids and
/// where each image sits. `images` gives each image's (tokens, h', w') in prompt
/// order; image k takes the next `tokens` pads, which must be one run. Errors when
/// an id is outside the vocabulary, or the pads do not match the images.
pub fn map_image_ids(
    ids: &[u32],
    image_token_id: u32,
    vocab: u32,
    images: &[(usize, usize, usize)],
) -> Result<(Vec<u32>, Vec<ImageSpan>)> {
    if let Some(&id) = ids.iter().find(|&&id| id >= vocab) {
        return Err(EngineError::TokenOutsideVocab { id, vocab });
    }
    let pads: Vec<usize> = (0..ids.len())
        .filter(|&i| ids[i] == image_token_id)
        .collect();
    let want: usize = images.iter().map(|g| g.0).sum();
    if pads.len() != want {
        return Err(EngineError::ImageTokenCount {
            prompt: pads.len(),
            image: (!images.is_empty()).then_some(want),
        });
    }
    let mut out = ids.to_vec();
    let mut spans = Vec::with_capacity(images.len());
    let (mut slot, mut shift) = (0usize, 0i64);
    for &(tokens, gh, gw) in images {
        let run = &pads[slot..slot + tokens];
        let Some(&start) = run.first() else {
            return Err(EngineError::ImageTokenCount {
                prompt: 0,
                image: Some(0),
            });
        };
        if run.last() != Some(&(start + tokens - 1)) {
            return Err(EngineError::ImageTokensSplit);
        }
        for (k, &i) in run.iter().enumerate() {
            out[i] = vocab + (slot + k) as u32;
        }
        let span = ImageSpan {
            start,
            tokens,
            grid_w: gw,
            extent: gh.max(gw),
            first_slot: slot,
            shift_before: shift,
        };
        shift += span.shift();
        slot += tokens;
        spans.push(span);
    }
    Ok((out, spans))
}

#[cfg(test)]
mod tests {
    use super::*;
    use q3vl_model::prompt::rope_index;

    /// Every token's position of mapped ids `m`.
    fn positions_of(m: &[u32], vocab: u32, spans: &[ImageSpan]) -> Vec<[i64; 3]> {
        m.iter()
            .enumerate()
            .map(|(i, &id)| position(i, id, vocab, spans))
            .collect()
    }

    #[test]
    fn equals_rope_index_with_and_without_an_image() {
        let (pad, vocab) = (151655u32, 151936u32);
        for (gh, gw) in [(28usize, 28usize), (20, 36), (36, 12)] {
            let n = gh / 2 * (gw / 2);
            let mut ids = vec![151644, 872, 198, 151652];
            ids.extend(std::iter::repeat_n(pad, n));
            ids.extend([151653, 100, 101, 151645, 198, 151644, 77091, 198]);
            let (want, next) = rope_index(&ids, pad, &[[1, gh, gw]], 2).unwrap();
            let (mapped, spans) = map_image_ids(&ids, pad, vocab, &[(n, gh / 2, gw / 2)]).unwrap();
            let got = positions_of(&mapped, vocab, &spans);
            assert_eq!(got, want, "grid {gh}x{gw}");
            // Decode steps continue from rope_index's next position.
            let t = ids.len();
            assert_eq!(position(t, 5, vocab, &spans), [next; 3]);
            assert_eq!(position(t + 3, 5, vocab, &spans), [next + 3; 3]);
        }
        let ids = [1u32, 2, 3];
        let (want, _) = rope_index(&ids, pad, &[], 2).unwrap();
        let (m, spans) = map_image_ids(&ids, pad, vocab, &[]).unwrap();
        let got = positions_of(&m, vocab, &spans);
        assert_eq!(got, want);
    }

    #[test]
    fn equals_rope_index_with_several_images() {
        let (pad, vocab) = (151655u32, 151936u32);
        // Wide, tall and square images, with text between them and two adjacent.
        let grids = [[1usize, 8, 20], [1, 24, 4], [1, 6, 6]];
        let mut ids = vec![151644, 872, 198];
        for (k, g) in grids.iter().enumerate() {
            ids.push(151652);
            ids.extend(std::iter::repeat_n(pad, g[1] / 2 * (g[2] / 2)));
            ids.push(151653);
            if k == 0 {
                ids.extend([100, 101, 102]);
            }
        }
        ids.extend([151645, 198, 151644, 77091, 198]);
        let (want, next) = rope_index(&ids, pad, &grids, 2).unwrap();
        let geom: Vec<_> = grids
            .iter()
            .map(|g| (g[1] / 2 * (g[2] / 2), g[1] / 2, g[2] / 2))
            .collect();
        let (mapped, spans) = map_image_ids(&ids, pad, vocab, &geom).unwrap();
        let got = positions_of(&mapped, vocab, &spans);
        assert_eq!(got, want);
        assert_eq!(position(ids.len(), 5, vocab, &spans), [next; 3]);
        // Back-to-back images: their pads form one run, split by the token counts.
        let mut two = vec![1u32];
        two.extend(std::iter::repeat_n(pad, 4 + 6));
        two.push(2);
        let g2 = [[1usize, 4, 4], [1, 4, 6]];
        let (want, _) = rope_index(&two, pad, &g2, 2).unwrap();
        let (m, spans) = map_image_ids(&two, pad, vocab, &[(4, 2, 2), (6, 2, 3)]).unwrap();
        let got = positions_of(&m, vocab, &spans);
        assert_eq!(got, want);
    }

    #[test]
    fn bad_pad_runs_are_rejected() {
        assert!(map_image_ids(&[1, 9, 2, 9], 9, 100, &[(2, 1, 2)]).is_err());
        assert!(map_image_ids(&[1, 9, 9], 9, 100, &[]).is_err());
        assert!(map_image_ids(&[1, 9, 9], 9, 100, &[(3, 1, 3)]).is_err());
        assert!(map_image_ids(&[1, 500], 9, 100, &[]).is_err());
        assert!(map_image_ids(&[1, 9, 9, 2, 9], 9, 100, &[(1, 1, 1), (2, 1, 2)]).is_err());
        assert!(map_image_ids(&[1, 9, 2, 9], 9, 100, &[(1, 1, 1), (0, 0, 0), (1, 1, 1)]).is_err());
    }
}
