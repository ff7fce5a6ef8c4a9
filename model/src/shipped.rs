//! Files q3vl ships inside its binary, so that nothing it does needs a path outside
//! the repository or the installed tool: the real Qwen3 tokenizer and the Qwen3-VL
//! Instruct chat template (both Qwen's, Apache-2.0; provenance and licence files in
//! `model/data/`).

use std::io::Read;

/// Qwen's `tokenizer.json`, gzip-compressed (2 MB instead of 11 MB in the binary and
/// the repository).
const TOKENIZER_JSON_GZ: &[u8] = include_bytes!("../data/qwen3-tokenizer/tokenizer.json.gz");

/// The sha256 of the uncompressed `tokenizer.json`, as published.
pub const TOKENIZER_JSON_SHA256: &str =
    "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4";

/// Qwen's `tokenizer_config.json`, as published (its own chat template is Qwen3's
/// text-only one; [`CHAT_TEMPLATE`] is the Qwen3-VL one).
pub const TOKENIZER_CONFIG_JSON: &str =
    include_str!("../data/qwen3-tokenizer/tokenizer_config.json");

/// The Qwen3-VL Instruct chat template (Qwen/Qwen3-VL-8B-Instruct), verbatim; the
/// oracle reads the same file.
pub const CHAT_TEMPLATE: &str = include_str!("../data/qwen3_vl_chat_template.jinja");

/// The real Qwen3 `tokenizer.json` (151 936-entry vocabulary with the special tokens).
pub fn tokenizer_json() -> Vec<u8> {
    let mut out = Vec::with_capacity(12 << 20);
    flate2::read::GzDecoder::new(TOKENIZER_JSON_GZ)
        .read_to_end(&mut out)
        .expect("the shipped tokenizer.json.gz is a valid gzip stream (checked by a test)");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_shipped_tokenizer_is_the_published_one() {
        let bytes = tokenizer_json();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), TOKENIZER_JSON_SHA256);
        let tok = tokenizers::Tokenizer::from_bytes(&bytes).unwrap();
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(151644));
        assert_eq!(tok.token_to_id("<|image_pad|>"), Some(151655));
        let cfg: serde_json::Value = serde_json::from_str(TOKENIZER_CONFIG_JSON).unwrap();
        assert_eq!(cfg["eos_token"], "<|im_end|>");
    }

    #[test]
    fn the_chat_template_is_the_qwen3_vl_one() {
        assert_eq!(
            hex::encode(Sha256::digest(CHAT_TEMPLATE.as_bytes())),
            "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
        );
    }
}
