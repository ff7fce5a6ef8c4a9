//! A `q3vl serve` child on a free port, and small HTTP helpers for talking to it.

use super::{q3vl, s};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The model id it serves.
    pub model: String,
}

impl Server {
    /// Starts `q3vl serve --bundle OUT --port 0 EXTRA…` and waits for its listening line.
    pub fn start(out: &Path, extra: &[&str]) -> Server {
        let mut child = q3vl()
            .args(["serve", "--bundle", s(out), "--port", "0"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("q3vl serve starts");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let url = loop {
            let mut line = String::new();
            if err.read_line(&mut line).unwrap() == 0 {
                panic!("q3vl serve exited before listening:\n{seen}");
            }
            seen.push_str(&line);
            if let Some(at) = line.find("http://") {
                let url = line[at..].split_whitespace().next().unwrap();
                break url.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = err.read_to_string(&mut sink);
        });
        let model = get(&format!("{url}/v1/models")).1["data"][0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        Server { child, url, model }
    }

    /// POSTs a chat request; returns the status and the JSON body.
    pub fn chat(&self, body: &Value) -> (u16, Value) {
        post(
            &format!("{}/v1/chat/completions", self.url),
            &body.to_string(),
        )
    }

    /// A greedy, non-streamed chat request's answer text and finish reason.
    pub fn answer(&self, messages: Value, max_tokens: usize) -> (String, String) {
        let (status, body) = self.chat(&json!({"model": self.model, "messages": messages,
            "max_tokens": max_tokens, "temperature": 0}));
        assert_eq!(status, 200, "{body}");
        let c = &body["choices"][0];
        (
            c["message"]["content"].as_str().unwrap().to_string(),
            c["finish_reason"].as_str().unwrap().to_string(),
        )
    }

    /// A metric's value from `/metrics` (the first sample whose line starts with `name`).
    pub fn metric(&self, name: &str) -> f64 {
        let text = ureq::get(&format!("{}/metrics", self.url))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }

    /// Polls `/metrics` until `name` satisfies `ok` (at most two minutes).
    pub fn wait_metric(&self, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let t0 = Instant::now();
        loop {
            let v = self.metric(name);
            if ok(v) || t0.elapsed() > Duration::from_secs(120) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A line of `/proc/PID/status` in kB (`VmRSS`, `VmHWM`).
    pub fn status_kb(&self, key: &str) -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        st.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc status"))
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// GETs `url`.
pub fn get(url: &str) -> (u16, Value) {
    read(ureq::get(url).call())
}

/// POSTs a JSON body.
pub fn post(url: &str, body: &str) -> (u16, Value) {
    read(
        ureq::post(url)
            .set("content-type", "application/json")
            .send_string(body),
    )
}

/// A PNG or JPEG file as a `data:` URL.
pub fn data_url(path: &Path) -> String {
    use base64::Engine as _;
    let bytes = std::fs::read(path).unwrap();
    let mime = if path.extension().is_some_and(|e| e == "png") {
        "png"
    } else {
        "jpeg"
    };
    format!(
        "data:image/{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A streamed answer: its `data:` payloads in order (`[DONE]` included).
pub fn stream(url: &str, body: &Value) -> Vec<String> {
    let resp = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("content-type", "application/json")
        .send_string(&body.to_string())
        .unwrap();
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    BufReader::new(resp.into_reader())
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// A fixture picture, `fixtures/shapes/images/NAME.png`.
pub fn image(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/shapes/images/{name}.png"))
}

/// `q3vl run --json`'s greedy answer text.
pub fn run_text(out: &Path, prompt: &str, images: &[&Path], tokens: usize) -> String {
    let n = tokens.to_string();
    let mut args = vec![
        "run",
        "--bundle",
        s(out),
        "--prompt",
        prompt,
        "--max-new-tokens",
        &n,
        "--json",
    ];
    for p in images {
        args.extend(["--image", s(p)]);
    }
    let v: Value = serde_json::from_str(&super::ok(&args)).unwrap();
    v["text"].as_str().unwrap().to_string()
}

/// A user message of one text and at most one image (before it).
pub fn user(text: &str, image: Option<&Path>) -> Value {
    user_images(text, image.as_slice())
}

/// A user message: the images (as data: URLs), then the text.
pub fn user_images(text: &str, images: &[&Path]) -> Value {
    let mut parts = vec![];
    for p in images {
        parts.push(json!({"type": "image_url", "image_url": {"url": data_url(p)}}));
    }
    parts.push(json!({"type": "text", "text": text}));
    json!({"role": "user", "content": parts})
}

/// The engine's greedy answer to a whole conversation, run fresh (no cached prompt):
/// what a served conversation's turn must equal.
pub fn fresh_answer(
    out: &Path,
    messages: &[q3vl_model::conversation::Message],
    images: &[&Path],
    tokens: usize,
) -> String {
    use q3vl_engine::{Engine, EngineOptions, GenerateParams};
    let e = Engine::open(out, &EngineOptions::default()).unwrap();
    let pb = e.prompt_builder().unwrap();
    let feats: Vec<_> = images
        .iter()
        .map(|p| {
            let patched = e
                .preprocess(&q3vl_model::image::load_rgb(p).unwrap(), false)
                .unwrap();
            std::sync::Arc::new(
                e.encode_image(&patched.pixel_values, patched.grid_thw)
                    .unwrap(),
            )
        })
        .collect();
    let grids: Vec<[usize; 3]> = feats.iter().map(|f| f.grid_thw).collect();
    let prompt = pb.conversation(messages, &grids).unwrap();
    let params = GenerateParams {
        max_new_tokens: tokens,
        ..GenerateParams::default()
    };
    let g = e
        .generate(&prompt.ids, &feats, &params, &mut |_| {})
        .unwrap();
    pb.decode(&g.tokens).unwrap()
}

/// A PNG whose header claims `w × h` pixels (and holds no pixels): an image bomb.
pub fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32fast::hash(&ihdr).to_be_bytes());
    png
}

/// A request with one image URL and the text "hi".
pub fn image_url_body(model: &str, url: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]})
}
