//! [`Answer`]: an answer's text as its tokens arrive: complete characters only
//! ([`StreamDecoder`]), cut before the first stop string, and text that may be the
//! start of a stop string held back until the next token settles it.

use q3vl_engine::detokenize::StreamDecoder;
use q3vl_model::prompt::PromptBuilder;
use std::sync::Arc;

/// The text of one answer so far.
pub struct Answer {
    prompts: Arc<PromptBuilder>,
    decoder: StreamDecoder,
    stop: Vec<String>,
    /// Text decoded but not yet released (it may begin a stop string).
    held: String,
    /// Whether a stop string was found (nothing more is released).
    stopped: bool,
    /// Generated tokens seen (eos excluded).
    tokens: usize,
    eos: Vec<u32>,
}

impl Answer {
    /// An empty answer, detokenized by `prompts`' tokenizer, ending at any of `stop`.
    pub fn new(prompts: Arc<PromptBuilder>, stop: Vec<String>, eos: Vec<u32>) -> Answer {
        Answer {
            prompts,
            decoder: StreamDecoder::new(),
            stop,
            held: String::new(),
            stopped: false,
            tokens: 0,
            eos,
        }
    }

    /// Tokens counted in the answer (up to the stop string, if one ended it).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Whether a stop string ended the answer.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds token `id`; returns the text now safe to release.
    pub fn push(&mut self, id: u32) -> String {
        if self.stopped || self.eos.contains(&id) {
            return String::new();
        }
        self.tokens += 1;
        let tok = self.prompts.tokenizer();
        let decode = |ids: &[u32]| tok.decode(ids, true);
        let piece = self.decoder.push(id, &decode).unwrap_or_default();
        self.release(piece, false)
    }

    /// The rest of the text once generation ended.
    pub fn finish(&mut self) -> String {
        let tok = self.prompts.tokenizer();
        let decode = |ids: &[u32]| tok.decode(ids, true);
        let piece = if self.stopped {
            String::new()
        } else {
            self.decoder.finish(&decode).unwrap_or_default()
        };
        self.release(piece, true)
    }

    /// Appends `piece` to the held text and releases what cannot start a stop string
    /// (everything, at the end); at a stop string, releases what precedes it and stops.
    fn release(&mut self, piece: String, end: bool) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(&piece);
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        let keep = if end { 0 } else { self.partial_stop_len() };
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// Bytes at the end of the held text that begin some stop string.
    fn partial_stop_len(&self) -> usize {
        let h = &self.held;
        self.stop
            .iter()
            .flat_map(|s| {
                (1..s.len().min(h.len() + 1))
                    .filter(move |&n| s.is_char_boundary(n) && h.ends_with(&s[..n]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use q3vl_model::config::{Qwen3VlConfig, Size};
    use q3vl_model::shipped;

    fn answer(stop: &[&str]) -> Answer {
        let mut tcfg: serde_json::Value =
            serde_json::from_str(shipped::TOKENIZER_CONFIG_JSON).unwrap();
        tcfg["chat_template"] = serde_json::json!(shipped::CHAT_TEMPLATE);
        let pb = PromptBuilder::from_parts(
            std::path::Path::new("shipped"),
            &shipped::tokenizer_json(),
            &tcfg,
            &Qwen3VlConfig::preset(Size::B2),
        )
        .unwrap();
        Answer::new(
            Arc::new(pb),
            stop.iter().map(|s| s.to_string()).collect(),
            vec![151645],
        )
    }

    fn run(a: &mut Answer, text: &str) -> Vec<String> {
        let ids = a
            .prompts
            .tokenizer()
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        let mut out: Vec<String> = ids.iter().map(|&id| a.push(id)).collect();
        out.push(a.finish());
        out
    }

    #[test]
    fn text_streams_whole_without_stop_strings() {
        let mut a = answer(&[]);
        let text = "Grüße, 你好! A red square. 🦀";
        assert_eq!(run(&mut a, text).concat(), text);
        assert!(!a.stopped());
    }

    #[test]
    fn a_stop_string_cuts_the_answer_and_is_never_streamed() {
        let mut a = answer(&["END", "\n\n"]);
        let pieces = run(&mut a, "It is a cat. EN-dash, then END of it.");
        assert_eq!(pieces.concat(), "It is a cat. EN-dash, then ");
        assert!(a.stopped());
        // The "EN" of "EN-dash" was held until "-" ruled the stop string out.
        assert!(pieces.iter().all(|p| !p.contains("END")));
        let mut b = answer(&["\n\n"]);
        assert_eq!(run(&mut b, "one\ntwo\n\nthree").concat(), "one\ntwo");
    }

    #[test]
    fn eos_is_not_text_nor_counted() {
        let mut a = answer(&[]);
        assert_eq!(a.push(151645), "");
        assert_eq!(a.tokens(), 0);
    }
}
