//! M-RoPE positions from (id, index) alone: the id-space trick (`docs/zoo-recipe.md` §5).
//!
//! Each `<|image_pad|>` becomes `vocab + slot`; an image token's (t, h, w) position
//! follows from its index and slot, and text after the image is shifted back by
//! `N − max(h', w')` (the rope shift), so no position tensor is carried around.

use crate::error::{EngineError, Result};

/// Where the (single) image sits in the sequence.
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
}

impl ImageSpan {
    /// Index from which text is shifted.
    pub fn shift_start(&self) -> usize {
        self.start + self.tokens
    }

    /// How far text after the image is shifted back.
    pub fn shift_amount(&self) -> i64 {
        self.tokens as i64 - self.extent as i64
    }
}

/// The (t, h, w) position of the token with id `id` at sequence index `index`.
pub fn position(index: usize, id: u32, vocab: u32, image: Option<&ImageSpan>) -> [i64; 3] {
    let p = index as i64;
    match image {
        Some(img) if id >= vocab => {
            let slot = (id - vocab) as i64;
            let s0 = p - slot;
            let w = img.grid_w as i64;
            let (row, col) = (slot / w, slot % w);
            [s0, s0 + row, s0 + col]
        }
        Some(img) if index >= img.shift_start() => [p - img.shift_amount(); 3],
        _ => [p; 3],
    }
}

/// Rewrites the image pads of `ids` to `vocab + slot`, returning the new ids and the
/// image span. Errors when an id is outside the vocabulary or the pads are not one
/// run of `tokens`.
pub fn map_image_ids(
    ids: &[u32],
    image_token_id: u32,
    vocab: u32,
    image: Option<(usize, usize, usize)>,
) -> Result<(Vec<u32>, Option<ImageSpan>)> {
    let pads: Vec<usize> = (0..ids.len())
        .filter(|&i| ids[i] == image_token_id)
        .collect();
    if let Some(&id) = ids.iter().find(|&&id| id >= vocab) {
        return Err(EngineError::TokenOutsideVocab { id, vocab });
    }
    let Some((tokens, gh, gw)) = image else {
        if !pads.is_empty() {
            return Err(EngineError::ImageTokenCount {
                prompt: pads.len(),
                image: None,
            });
        }
        return Ok((ids.to_vec(), None));
    };
    if pads.len() != tokens {
        return Err(EngineError::ImageTokenCount {
            prompt: pads.len(),
            image: Some(tokens),
        });
    }
    let start = pads[0];
    if pads.last() != Some(&(start + tokens - 1)) {
        return Err(EngineError::ImageTokensSplit);
    }
    let mut out = ids.to_vec();
    for (slot, &i) in pads.iter().enumerate() {
        out[i] = vocab + slot as u32;
    }
    Ok((
        out,
        Some(ImageSpan {
            start,
            tokens,
            grid_w: gw,
            extent: gh.max(gw),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use q3vl_model::prompt::rope_index;

    #[test]
    fn equals_rope_index_with_and_without_an_image() {
        let (pad, vocab) = (151655u32, 151936u32);
        for (gh, gw) in [(28usize, 28usize), (20, 36), (36, 12)] {
            let n = gh / 2 * (gw / 2);
            let mut ids = vec![151644, 872, 198, 151652];
            ids.extend(std::iter::repeat_n(pad, n));
            ids.extend([151653, 100, 101, 151645, 198, 151644, 77091, 198]);
            let (want, next) = rope_index(&ids, pad, &[[1, gh, gw]], 2).unwrap();
            let (mapped, span) =
                map_image_ids(&ids, pad, vocab, Some((n, gh / 2, gw / 2))).unwrap();
            let got: Vec<[i64; 3]> = mapped
                .iter()
                .enumerate()
                .map(|(i, &id)| position(i, id, vocab, span.as_ref()))
                .collect();
            assert_eq!(got, want, "grid {gh}x{gw}");
            // Decode steps continue from rope_index's next position.
            let t = ids.len();
            assert_eq!(position(t, 5, vocab, span.as_ref()), [next; 3]);
            assert_eq!(position(t + 3, 5, vocab, span.as_ref()), [next + 3; 3]);
        }
        let ids = [1u32, 2, 3];
        let (want, _) = rope_index(&ids, pad, &[], 2).unwrap();
        let (m, span) = map_image_ids(&ids, pad, vocab, None).unwrap();
        let got: Vec<_> = m
            .iter()
            .enumerate()
            .map(|(i, &id)| position(i, id, vocab, span.as_ref()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn bad_pad_runs_are_rejected() {
        assert!(map_image_ids(&[1, 9, 2, 9], 9, 100, Some((2, 1, 2))).is_err());
        assert!(map_image_ids(&[1, 9, 9], 9, 100, None).is_err());
        assert!(map_image_ids(&[1, 9, 9], 9, 100, Some((3, 1, 3))).is_err());
        assert!(map_image_ids(&[1, 500], 9, 100, None).is_err());
    }
}
