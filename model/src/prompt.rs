//! Prompts: the checkpoint's tokenizer and chat template, `<|image_pad|>` expansion,
//! and HF `get_rope_index` M-RoPE positions (`docs/qwen3-vl-reference.md` §4, §6).

use crate::config::Qwen3VlConfig;
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A tokenised prompt ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Token ids, each image's pads already expanded.
    pub ids: Vec<u32>,
    /// (t, h, w) M-RoPE position of every token.
    pub positions: Vec<[i64; 3]>,
    /// Position of the first generated token (all three axes).
    pub next_position: i64,
}

impl Prompt {
    /// HF's `rope_deltas`: next position minus prompt length.
    pub fn rope_delta(&self) -> i64 {
        self.next_position - self.ids.len() as i64
    }
}

/// The tokenizer plus chat template of a checkpoint or bundle.
pub struct PromptBuilder {
    tokenizer: tokenizers::Tokenizer,
    /// The same tokenizer with special-token strings encoded as plain text (for
    /// message text; see [`crate::conversation`]).
    plain: tokenizers::Tokenizer,
    /// The strings of the special added tokens.
    specials: Vec<String>,
    template: String,
    special: Value,
    image_token_id: u32,
    video_token_id: u32,
    merge: usize,
}

fn prompt_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Prompt(format!("{}: {msg}", path.display()))
}

/// Finds the chat template: `tokenizer_config.json` "chat_template", then
/// `chat_template.jinja`, then `chat_template.json`.
/// The chat template `tokenizer_config.json` carries itself: a string, or the
/// "default" entry of a list of named templates.
pub fn inline_template(tcfg: &Value) -> Option<&str> {
    match tcfg.get("chat_template")? {
        Value::String(s) => Some(s),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str),
        _ => None,
    }
}

fn find_template(dir: &Path, tcfg: &Value) -> Result<String> {
    if let Some(t) = inline_template(tcfg) {
        return Ok(t.to_string());
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return crate::input::read_regular_to_string(&jinja).map_err(|e| Error::io(&jinja, e));
    }
    let js = dir.join("chat_template.json");
    if js.exists() {
        if let Some(t) = crate::config::read_json(&js)?
            .get("chat_template")
            .and_then(Value::as_str)
        {
            return Ok(t.to_string());
        }
    }
    Err(prompt_err(
        &dir.join("tokenizer_config.json"),
        "no chat_template (also looked for chat_template.jinja and chat_template.json)",
    ))
}

/// Parses `tokenizer.json` (`path` names it in errors).
///
/// tokenizers 0.22 panics on some malformed files instead of returning an error (an
/// `expect` in its decoder deserializer; a merge sliced past its end when
/// `continuing_subword_prefix` is longer than the merge), so the parse runs under
/// [`crate::error::catch_quietly`]: a bad file is an error naming it, not an internal
/// error.
fn parse_tokenizer(path: &Path, bytes: &[u8]) -> Result<tokenizers::Tokenizer> {
    match crate::error::catch_quietly(|| tokenizers::Tokenizer::from_bytes(bytes)) {
        Ok(t) => t.map_err(|e| prompt_err(path, e)),
        Err(why) => Err(prompt_err(path, format!("is malformed ({why})"))),
    }
}

fn special_token(tcfg: &Value, key: &str) -> Value {
    match tcfg.get(key) {
        Some(Value::String(s)) => json!(s),
        Some(Value::Object(o)) => o.get("content").cloned().unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

impl PromptBuilder {
    /// Loads `tokenizer.json` and `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path, cfg: &Qwen3VlConfig) -> Result<Self> {
        let tok_path: PathBuf = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(prompt_err(&tok_path, "file not found"));
        }
        let tok_bytes =
            crate::input::read_regular(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
        let tcfg_path = dir.join("tokenizer_config.json");
        let tcfg = if tcfg_path.exists() {
            crate::config::read_json(&tcfg_path)?
        } else {
            json!({})
        };
        Self::from_parts(dir, &tok_bytes, &tcfg, cfg)
    }

    /// Builds from the bytes of `tokenizer.json` and the parsed `tokenizer_config.json`
    /// of folder `dir` (where a template outside the config is looked for, and which
    /// names the files in errors): what the converter checks before writing a bundle.
    pub fn from_parts(
        dir: &Path,
        tokenizer_json: &[u8],
        tcfg: &Value,
        cfg: &Qwen3VlConfig,
    ) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = parse_tokenizer(&tok_path, tokenizer_json)?;
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let specials = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content)
            .collect();
        let template = find_template(dir, tcfg)?;
        let special = json!({
            "bos_token": special_token(tcfg, "bos_token"),
            "eos_token": special_token(tcfg, "eos_token"),
            "pad_token": special_token(tcfg, "pad_token"),
        });
        let b = PromptBuilder {
            tokenizer,
            plain,
            specials,
            template,
            special,
            image_token_id: cfg.image_token_id,
            video_token_id: cfg.video_token_id,
            merge: cfg.vision.spatial_merge_size,
        };
        // The config's image token must be the tokenizer's `<|image_pad|>`.
        if let Some(id) = b.tokenizer.token_to_id("<|image_pad|>") {
            if id != cfg.image_token_id {
                return Err(prompt_err(
                    &tok_path,
                    format!(
                        "<|image_pad|> is id {id} but config.json says image_token_id {}",
                        cfg.image_token_id
                    ),
                ));
            }
        }
        Ok(b)
    }

    /// Renders and tokenises two test conversations, one text-only and one with a
    /// small image, as `q3vl run` would: a template that does not parse or fails to
    /// render, or a tokenizer that cannot encode its output, is found here instead of
    /// at run time.
    pub fn self_test(&self) -> Result<()> {
        let m = self.merge;
        self.chat("What is in this picture?", None)?;
        self.chat("What is in this picture?", Some([1, 2 * m, 2 * m]))?;
        Ok(())
    }

    /// The strings of the special added tokens (`<|im_start|>`, …).
    pub(crate) fn special_strings(&self) -> &[String] {
        &self.specials
    }

    /// The vision merge size (image tokens are patches / merge²).
    pub(crate) fn merge(&self) -> usize {
        self.merge
    }

    /// The underlying tokenizer.
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Renders `messages` (HF chat format) with the checkpoint's template.
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.template)
            .map_err(|e| Error::Prompt(format!("chat template does not parse: {e}")))?;
        let mut ctx = self.special.clone();
        ctx["messages"] = messages.clone();
        ctx["add_generation_prompt"] = json!(add_generation_prompt);
        env.get_template("chat")
            .and_then(|t| t.render(&ctx))
            .map_err(|e| Error::Prompt(format!("chat template failed: {e}")))
    }

    /// Tokenises rendered text, expanding the k-th `<|image_pad|>` to the k-th image's
    /// token count, and computes the M-RoPE positions.
    pub fn encode(&self, text: &str, image_grids: &[[usize; 3]]) -> Result<Prompt> {
        let ids = self.tokenize(text, false)?;
        self.expand(ids, image_grids)
    }

    /// Token ids of `text`; with `as_text`, special-token strings in it are plain
    /// text, not control tokens.
    pub(crate) fn tokenize(&self, text: &str, as_text: bool) -> Result<Vec<u32>> {
        let tok = if as_text {
            &self.plain
        } else {
            &self.tokenizer
        };
        // encode_fast: no character offsets, which only cost memory here.
        let enc = tok
            .encode_fast(text, false)
            .map_err(|e| Error::Prompt(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Expands the k-th `<|image_pad|>` of `tokens` to the k-th image's token count and
    /// computes the M-RoPE positions.
    pub(crate) fn expand(&self, tokens: Vec<u32>, image_grids: &[[usize; 3]]) -> Result<Prompt> {
        let mut ids = Vec::with_capacity(tokens.len());
        let mut img = 0;
        for id in tokens {
            if id == self.image_token_id {
                let g = image_grids.get(img).ok_or_else(|| {
                    Error::Prompt(format!(
                        "the prompt has more <|image_pad|> placeholders than the {} image(s) given",
                        image_grids.len()
                    ))
                })?;
                let n = g.iter().product::<usize>() / (self.merge * self.merge);
                ids.extend(std::iter::repeat_n(id, n));
                img += 1;
            } else if id == self.video_token_id {
                return Err(Error::Prompt("video inputs are not supported".into()));
            } else {
                ids.push(id);
            }
        }
        if img != image_grids.len() {
            return Err(Error::Prompt(format!(
                "{} image(s) given but the prompt has {img} <|image_pad|> placeholder(s)",
                image_grids.len()
            )));
        }
        let (positions, next_position) =
            rope_index(&ids, self.image_token_id, image_grids, self.merge)?;
        Ok(Prompt {
            ids,
            positions,
            next_position,
        })
    }

    /// A one-turn chat prompt: user `text` with an optional image of grid `grid_thw`,
    /// rendered with the generation prompt.
    /// The text is text: see [`crate::conversation`].
    pub fn chat(&self, text: &str, grid_thw: Option<[usize; 3]>) -> Result<Prompt> {
        let grids: Vec<[usize; 3]> = grid_thw.into_iter().collect();
        self.chat_images(text, &grids)
    }

    /// A one-turn chat prompt: the images of grids `grids` (in order), then user
    /// `text`, rendered with the generation prompt.
    pub fn chat_images(&self, text: &str, grids: &[[usize; 3]]) -> Result<Prompt> {
        use crate::conversation::{Message, Part, Role};
        let mut parts = vec![Part::Image; grids.len()];
        parts.push(Part::Text(text.to_string()));
        let messages = [Message {
            role: Role::User,
            parts,
        }];
        // Our own messages hold one image part per image: a mismatch is the files'.
        self.conversation(&messages, grids).map_err(|e| match e {
            Error::Prompt(msg) => Error::Prompt(format!(
                "the chat template and tokenizer do not make a usable prompt: {msg}"
            )),
            e => e,
        })
    }

    /// Decodes ids to text, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Prompt(format!("detokenizer failed: {e}")))
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

/// HF `get_rope_index` for one sequence: text tokens advance all three axes together;
/// an image's N = (h/m)(w/m) tokens sit at (s, s+r, s+c) and the text after it resumes
/// at s + max(h/m, w/m). Returns every token's position and the next free position.
pub fn rope_index(
    ids: &[u32],
    image_token_id: u32,
    image_grids: &[[usize; 3]],
    merge: usize,
) -> Result<(Vec<[i64; 3]>, i64)> {
    let mut pos = Vec::with_capacity(ids.len());
    let mut next: i64 = 0;
    let mut i = 0;
    let mut img = 0;
    while i < ids.len() {
        if ids[i] != image_token_id {
            pos.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let [t, h, w] = *image_grids
            .get(img)
            .ok_or_else(|| Error::Prompt("more image-token runs than images".to_string()))?;
        let (lh, lw) = (h / merge, w / merge);
        let n = t * lh * lw;
        if i + n > ids.len() || ids[i..i + n].iter().any(|&x| x != image_token_id) {
            return Err(Error::Prompt(format!(
                "image {img} needs {n} consecutive <|image_pad|> tokens"
            )));
        }
        for ti in 0..t {
            for r in 0..lh {
                for c in 0..lw {
                    pos.push([next + ti as i64, next + r as i64, next + c as i64]);
                }
            }
        }
        next += (t.max(lh).max(lw)) as i64;
        i += n;
        img += 1;
    }
    Ok((pos, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/qwen3-vl-reference.md`'s 448² example (§6): image tokens at (4, 4+r, 4+c),
    /// `<|vision_end|>` at 18, rope delta −182.
    #[test]
    fn rope_index_of_the_448_example() {
        let mut ids = vec![151644, 872, 198, 151652];
        ids.extend(std::iter::repeat_n(151655, 196));
        ids.extend([151653, 100, 101, 151645, 198, 151644, 77091, 198]);
        let (pos, next) = rope_index(&ids, 151655, &[[1, 28, 28]], 2).unwrap();
        assert_eq!(pos[3], [3, 3, 3]);
        assert_eq!(pos[4], [4, 4, 4]);
        assert_eq!(pos[4 + 14 + 3], [4, 5, 7]);
        assert_eq!(pos[199], [4, 17, 17]);
        assert_eq!(pos[200], [18, 18, 18]);
        let t = ids.len() as i64;
        assert_eq!(next - t, -182);
    }

    #[test]
    fn text_only_positions_are_a_ramp() {
        let (pos, next) = rope_index(&[5, 6, 7], 99, &[], 2).unwrap();
        assert_eq!(pos, vec![[0; 3], [1; 3], [2; 3]]);
        assert_eq!(next, 3);
    }

    #[test]
    fn short_image_runs_are_rejected() {
        assert!(rope_index(&[1, 99, 99, 2], 99, &[[1, 4, 4]], 2).is_err());
    }
}
