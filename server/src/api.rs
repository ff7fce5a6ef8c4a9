//! The OpenAI chat-completions request, read and checked: every field the server
//! honours is validated, the answer-changing fields it does not implement (`n` > 1,
//! penalties, `logit_bias`, `logprobs`, tools, a response format) are refused, and
//! every error names the field (`messages[2].content[0]`). Other fields (`user`,
//! `metadata`, …) are ignored.

use crate::error::ApiError;
use q3vl_model::conversation::{Message, Part, Role};
use serde::Deserialize;
use serde_json::Value;

/// Stop strings a request may give at most (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// The fields of a request body, as sent (messages still raw JSON).
#[derive(Debug, Deserialize)]
struct Wire {
    model: String,
    messages: Vec<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    logit_bias: Option<serde_json::Map<String, Value>>,
    /// vLLM's and llama.cpp's extension: generate exactly the tokens asked for.
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// The bytes of a `data:image/png;base64,…` or `data:image/jpeg;base64,…` URL.
    Data(Vec<u8>),
    /// A local file (`file:///…` or an absolute path; only with `--allow-local-files`).
    File(std::path::PathBuf),
}

/// An image of the conversation and the field it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The request field, for errors (`messages[0].content[1].image_url`).
    pub param: String,
    /// Its bytes or path.
    pub source: ImageSource,
}

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The model asked for.
    pub model: String,
    /// The conversation; its image parts are `images`, in order.
    pub messages: Vec<Message>,
    /// The conversation's images.
    pub images: Vec<ImageRef>,
    /// Stream server-sent events.
    pub stream: bool,
    /// Send a last chunk with the token counts (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Tokens to generate at most; None: the server's default.
    pub max_tokens: Option<usize>,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// PRNG seed: the request's, else a fresh one per request (as OpenAI samples
    /// anew each time).
    pub seed: u64,
    /// Strings that end the answer (not included in it).
    pub stop: Vec<String>,
    /// Go on past eos (the `ignore_eos` extension of vLLM and llama.cpp's server).
    pub ignore_eos: bool,
}

impl ChatRequest {
    /// Reads and checks a request body.
    pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        let wire: Wire = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            // "." is the whole body, "?" a place the parser could not name.
            let param = if path == "." || path == "?" {
                String::new()
            } else {
                path
            };
            ApiError::invalid(param, format!("invalid request body: {}", e.inner()))
        })?;
        wire.check()
    }
}

/// A seed no earlier request of this process had: the clock mixed with a counter.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    now ^ COUNT
        .fetch_add(1, Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A number in `range`, or an error naming `param`.
fn in_range(
    v: Option<f64>,
    default: f64,
    param: &str,
    ok: impl Fn(f64) -> bool,
    want: &str,
) -> Result<f32, ApiError> {
    let v = v.unwrap_or(default);
    if !v.is_finite() || !ok(v) {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be {want}, got {v}"),
        ));
    }
    Ok(v as f32)
}

impl Wire {
    fn check(self) -> Result<ChatRequest, ApiError> {
        self.refuse_unsupported()?;
        let temperature = in_range(
            self.temperature,
            1.0,
            "temperature",
            |t| (0.0..=2.0).contains(&t),
            "in [0, 2]",
        )?;
        let top_p = in_range(
            self.top_p,
            1.0,
            "top_p",
            |p| p > 0.0 && p <= 1.0,
            "in (0, 1]",
        )?;
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => Some(("max_completion_tokens", n)),
            (None, Some(n)) => Some(("max_tokens", n)),
            (None, None) => None,
        };
        if let Some((param, 0)) = max_tokens {
            return Err(ApiError::invalid(
                param,
                format!("{param} must be at least 1"),
            ));
        }
        let stop = match self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                format!("stop takes at most {MAX_STOP} non-empty strings"),
            ));
        }
        let (messages, images) = read_messages(&self.messages)?;
        let stream = self.stream.unwrap_or(false);
        Ok(ChatRequest {
            model: self.model,
            messages,
            images,
            stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            max_tokens: max_tokens.map(|(_, n)| usize::try_from(n).unwrap_or(usize::MAX)),
            temperature,
            top_p,
            // Any integer seeds the generator; negative ones wrap.
            seed: self.seed.map_or_else(fresh_seed, |s| s as u64),
            stop,
            ignore_eos: self.ignore_eos,
        })
    }

    /// Fields whose meaning the server does not implement: refused rather than
    /// ignored, since ignoring them would change the answer silently.
    fn refuse_unsupported(&self) -> Result<(), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
        for (param, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    param,
                    format!("{param} is not supported"),
                ));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias is not supported",
            ));
        }
        if self.logprobs == Some(true) {
            return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid("tools", "tool calls are not supported"));
        }
        if let Some(f) = &self.response_format {
            if f.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::invalid(
                    "response_format",
                    "only the text response format is supported",
                ));
            }
        }
        Ok(())
    }
}

/// The conversation of `messages`, and its images in order.
fn read_messages(messages: &[Value]) -> Result<(Vec<Message>, Vec<ImageRef>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut images = vec![];
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        out.push(read_message(m, &format!("messages[{i}]"), &mut images)?);
    }
    Ok((out, images))
}

fn read_message(m: &Value, at: &str, images: &mut Vec<ImageRef>) -> Result<Message, ApiError> {
    let Some(obj) = m.as_object() else {
        return Err(ApiError::invalid(at, format!("{at} must be an object")));
    };
    let role = match obj.get("role").and_then(Value::as_str) {
        Some("system" | "developer") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("{at}.role"),
                format!("{at}.role `{other}` is not one of system, developer, user, assistant"),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                format!("{at}.role"),
                format!("{at}.role must be a string"),
            ))
        }
    };
    let parts = match obj.get("content") {
        Some(Value::String(s)) => vec![Part::Text(s.clone())],
        Some(Value::Null) | None if role == Role::Assistant => vec![],
        Some(Value::Array(list)) => {
            let mut parts = vec![];
            for (j, p) in list.iter().enumerate() {
                parts.push(read_part(p, &format!("{at}.content[{j}]"), role, images)?);
            }
            parts
        }
        _ => {
            return Err(ApiError::invalid(
                format!("{at}.content"),
                format!("{at}.content must be a string or an array of parts"),
            ))
        }
    };
    Ok(Message { role, parts })
}

fn read_part(
    p: &Value,
    at: &str,
    role: Role,
    images: &mut Vec<ImageRef>,
) -> Result<Part, ApiError> {
    let bad = |field: &str, msg: String| Err(ApiError::invalid(format!("{at}{field}"), msg));
    match p.get("type").and_then(Value::as_str) {
        Some("text") => match p.get("text").and_then(Value::as_str) {
            Some(t) => Ok(Part::Text(t.to_string())),
            None => bad(".text", format!("{at}.text must be a string")),
        },
        Some("image_url") if role == Role::User => {
            let url = p
                .get("image_url")
                .and_then(|u| u.get("url").or(Some(u)))
                .and_then(Value::as_str);
            let Some(url) = url else {
                return bad(".image_url", format!("{at}.image_url.url must be a string"));
            };
            let param = format!("{at}.image_url");
            let source = image_source(url)
                .map_err(|msg| ApiError::invalid(&param, format!("{param}: {msg}")))?;
            images.push(ImageRef { param, source });
            Ok(Part::Image)
        }
        Some("image_url") => bad(".type", format!("{at}: only user messages may hold images")),
        Some(other) => bad(
            ".type",
            format!("{at}.type `{other}` is not supported (text, image_url)"),
        ),
        None => bad(".type", format!("{at}.type must be a string")),
    }
}

/// The image an `image_url` names: a base64 `data:` URL of a PNG or JPEG, or a local
/// file (checked against `--allow-local-files` later).
fn image_source(url: &str) -> Result<ImageSource, String> {
    use base64::Engine as _;
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or("a data: URL needs a comma before its data")?;
        let mime = meta
            .strip_suffix(";base64")
            .ok_or("only base64 data: URLs are supported")?;
        if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg") {
            return Err(format!("`{mime}` is not image/png or image/jpeg"));
        }
        return base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map(ImageSource::Data)
            .map_err(|e| format!("bad base64: {e}"));
    }
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err("a file:// URL must name an absolute path (file:///…)".into());
        }
        return Ok(ImageSource::File(path.into()));
    }
    if url.starts_with('/') {
        return Ok(ImageSource::File(url.into()));
    }
    Err("only data: URLs (and local files, with --allow-local-files) are accepted; remote URLs are not fetched".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(v.to_string().as_bytes())
    }

    fn param(v: Value) -> Option<String> {
        parse(v).unwrap_err().param
    }

    #[test]
    fn a_full_request_reads() {
        let r = parse(
            json!({"model": "m", "stream": true, "max_tokens": 7, "temperature": 0,
            "stop": "\n\n", "seed": -1, "stream_options": {"include_usage": true},
            "messages": [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]},
                {"role": "assistant", "content": null}]}),
        )
        .unwrap();
        assert_eq!(r.messages.len(), 3);
        assert_eq!(
            r.messages[1].parts,
            vec![Part::Text("hi".into()), Part::Image]
        );
        assert_eq!(r.images[0].param, "messages[1].content[1].image_url");
        assert_eq!(
            r.images[0].source,
            ImageSource::Data(vec![0x89, b'P', b'N', b'G', 13, 10])
        );
        assert_eq!(
            (r.max_tokens, r.temperature, r.seed),
            (Some(7), 0.0, u64::MAX)
        );
        let unseeded = || {
            let m = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            parse(m).unwrap().seed
        };
        assert_ne!(unseeded(), unseeded(), "unseeded requests sample anew");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.stop, vec!["\n\n"]);
    }

    #[test]
    fn every_bad_field_is_named() {
        let m = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({"messages": m}), None),
            (
                json!({"model": "m", "messages": m, "max_tokens": "9"}),
                Some("max_tokens"),
            ),
            (
                json!({"model": "m", "messages": m, "max_tokens": 0}),
                Some("max_tokens"),
            ),
            (
                json!({"model": "m", "messages": m, "temperature": 3}),
                Some("temperature"),
            ),
            (
                json!({"model": "m", "messages": m, "top_p": 0}),
                Some("top_p"),
            ),
            (json!({"model": "m", "messages": m, "n": 2}), Some("n")),
            (
                json!({"model": "m", "messages": m, "logit_bias": {"5": 100}}),
                Some("logit_bias"),
            ),
            (
                json!({"model": "m", "messages": m, "stop": ["a", "b", "c", "d", "e"]}),
                Some("stop"),
            ),
            (json!({"model": "m", "messages": []}), Some("messages")),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                Some("messages[0].role"),
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
                Some("messages[0].content"),
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
                Some("messages[0].content[0].type"),
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
                Some("messages[0].content[0].image_url"),
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]}),
                Some("messages[0].content[0].image_url"),
            ),
            (
                json!({"model": "m", "messages": [{"role": "assistant", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}),
                Some("messages[0].content[0].type"),
            ),
        ];
        for (body, want) in cases {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), want, "{body}: {}", e.message);
        }
        assert!(param(json!({"model": "m", "messages": "hi"})).is_some());
        let e = ChatRequest::parse(b"{not json").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.starts_with("invalid request body"),
            "{}",
            e.message
        );
    }
}
