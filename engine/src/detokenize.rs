//! UTF-8-safe streaming detokenization: byte-level BPE tokens can end in the middle
//! of a character, so text is only released once it decodes to complete characters.

/// Accumulates generated ids and yields the newly completed text after each one.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Bytes of the decoded text already released.
    emitted: usize,
}

impl StreamDecoder {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id`; returns the text it completes (possibly empty). `decode` turns ids
    /// into text (special tokens skipped), e.g. the tokenizer's decode.
    pub fn push<E>(
        &mut self,
        id: u32,
        decode: &dyn Fn(&[u32]) -> Result<String, E>,
    ) -> Result<String, E> {
        self.ids.push(id);
        let text = decode(&self.ids)?;
        // An incomplete character decodes to U+FFFD; wait for the rest of it.
        if text.ends_with('\u{FFFD}')
            || text.len() < self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(String::new());
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(new)
    }

    /// Whatever is still held back (a trailing incomplete character, as U+FFFD).
    pub fn finish<E>(&mut self, decode: &dyn Fn(&[u32]) -> Result<String, E>) -> Result<String, E> {
        let text = decode(&self.ids)?;
        if text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the real Qwen3 tokenizer (the one q3vl ships): multi-byte text (CJK, emoji) split across
    /// byte-level tokens streams out as complete characters only, and in full.
    #[test]
    fn streams_multibyte_text_with_the_real_tokenizer() {
        let json = q3vl_model::shipped::tokenizer_json();
        let tok = tokenizers::Tokenizer::from_bytes(&json).unwrap();
        let text = "Grüße 你好，世界! 🦀🎉 naïve café — ok";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let decode = |ids: &[u32]| tok.decode(ids, true);
        let mut s = StreamDecoder::new();
        let mut out = String::new();
        let mut held = false;
        for &id in &ids {
            let piece = s.push(id, &decode).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "emitted a broken character: {piece:?}"
            );
            held |= piece.is_empty();
            out.push_str(&piece);
        }
        out.push_str(&s.finish(&decode).unwrap());
        assert_eq!(out, text);
        // The emoji are split over several byte tokens, so something was held back.
        assert!(
            held,
            "expected at least one token ending inside a character"
        );
    }

    #[test]
    fn holds_back_incomplete_characters() {
        // A fake decoder over raw bytes: id = byte.
        let decode = |ids: &[u32]| -> Result<String, ()> {
            let b: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        };
        let mut s = StreamDecoder::new();
        let bytes = "a€".as_bytes();
        let pieces: Vec<String> = bytes
            .iter()
            .map(|&b| s.push(b as u32, &decode).unwrap())
            .collect();
        assert_eq!(pieces, vec!["a", "", "", "€"]);
    }
}
