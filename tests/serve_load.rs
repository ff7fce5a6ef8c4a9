//! A bounded load test of `q3vl serve` on loopback: 16 clients at once, each sending a
//! mix of good requests (text and image, streamed and not), streams it abandons after
//! a few chunks, and hostile requests (malformed JSON, wrong types, a 50 MB body, bad
//! base64, an image bomb, a prompt over the context, 10,000 messages, an unknown
//! model). Every good request gets the answer it gets alone, every bad one its 4xx,
//! the server's peak memory stays bounded and it never stops. The summary line is
//! what RELIABILITY.md records.

mod common;

use common::converted_mode;
use common::server::{image, image_url_body, png_header, post, user, Server};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

const CLIENTS: usize = 16;
const ROUNDS: usize = 16;
const TOKENS: usize = 12;

/// What one request of the mix must get.
enum Want {
    /// 200 and this answer.
    Answer(String),
    /// This status.
    Status(u16),
    /// A stream the client leaves after three events.
    Abandon,
}

/// The good requests, with the answers they get alone.
fn good(srv: &Server) -> Vec<(Value, String)> {
    let img = image("demo_4");
    [
        json!([user("Which colour comes after blue?", None)]),
        json!([user("What is in the image?", Some(&img))]),
        json!([user("hi", None)]),
    ]
    .into_iter()
    .map(|m| {
        let (text, _) = srv.answer(m.clone(), TOKENS);
        let body =
            json!({"model": srv.model, "messages": m, "max_tokens": TOKENS, "temperature": 0});
        (body, text)
    })
    .collect()
}

/// The hostile requests and the status each must get.
fn hostile(model: &str) -> Vec<(String, u16)> {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let hi = json!([{"role": "user", "content": "hi"}]);
    let with_url = |url: String| image_url_body(model, &url).to_string();
    let bomb = png_header(60_000, 60_000);
    let many: Vec<Value> = (0..10_000)
        .map(|i| json!({"role": "user", "content": format!("m{i}")}))
        .collect();
    vec![
        ("{\"model\": \"m\", \"messages\": [".into(), 400),
        (json!({"model": model, "messages": hi, "max_tokens": [1]}).to_string(), 400),
        (json!({"model": model, "messages": [{"role": "user"}]}).to_string(), 400),
        (with_url("data:image/png;base64,@@@@".into()), 400),
        (with_url(format!("data:image/png;base64,{}", b64(&bomb))), 400),
        (json!({"model": model, "messages": [{"role": "user", "content": "word ".repeat(20_000)}]}).to_string(), 400),
        (json!({"model": model, "messages": many}).to_string(), 400),
        (json!({"model": "gpt-4o", "messages": hi}).to_string(), 404),
    ]
}

/// Client `c`'s request in round `r`.
fn request(
    c: usize,
    r: usize,
    good: &[(Value, String)],
    bad: &[(String, u16)],
    model: &str,
) -> (String, bool, Want) {
    match (c + r) % 4 {
        0 | 1 => {
            let (body, text) = &good[(c * 7 + r) % good.len()];
            let stream = (c + r) % 4 == 1;
            let mut b = body.clone();
            b["stream"] = json!(stream);
            (b.to_string(), stream, Want::Answer(text.clone()))
        }
        2 if c.is_multiple_of(4) => {
            let b = json!({"model": model, "messages": [user("hi", None)], "max_tokens": 3000,
                "ignore_eos": true, "stream": true});
            (b.to_string(), true, Want::Abandon)
        }
        _ if c == 5 && r == 2 => {
            let pad = "x".repeat(50 << 20);
            (
                format!("{{\"model\": \"{model}\", \"pad\": \"{pad}\"}}"),
                false,
                Want::Status(413),
            )
        }
        _ => {
            let (body, status) = &bad[(c + r) % bad.len()];
            (body.clone(), false, Want::Status(*status))
        }
    }
}

/// Sends one request and checks it; returns whether it went as it must.
fn check(url: &str, body: &str, stream: bool, want: &Want) -> Result<(), String> {
    let chat = format!("{url}/v1/chat/completions");
    if !stream {
        let (status, v) = post(&chat, body);
        return match want {
            Want::Answer(text) if status == 200 => {
                let got = v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_default();
                (got == text)
                    .then_some(())
                    .ok_or(format!("answer {got:?}, alone {text:?}"))
            }
            Want::Status(s) if status == *s && v["error"]["message"].is_string() => Ok(()),
            _ => Err(format!("status {status}: {v}")),
        };
    }
    let resp = ureq::post(&chat)
        .send_string(body)
        .map_err(|e| e.to_string())?;
    let mut events = BufReader::new(resp.into_reader())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string));
    if let Want::Abandon = want {
        for _ in 0..3 {
            events.next().ok_or("the stream ended early")?;
        }
        return Ok(());
    }
    let mut text = String::new();
    for e in events {
        if e == "[DONE]" {
            break;
        }
        let c: Value = serde_json::from_str(&e).map_err(|e| e.to_string())?;
        text.push_str(
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default(),
        );
    }
    match want {
        Want::Answer(t) if *t == text => Ok(()),
        _ => Err(format!("streamed {text:?}")),
    }
}

#[test]
fn sixteen_clients_good_bad_and_leaving_at_once() {
    let out = converted_mode("shapes", "int8hu", true);
    let mut srv = Server::start(
        &out,
        &[
            "--parallel",
            "4",
            "--body-limit-mib",
            "8",
            "--context",
            "4096",
        ],
    );
    let good = good(&srv);
    let bad = hostile(&srv.model);
    let base_kb = srv.status_kb("VmRSS");
    let (sent, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let t0 = Instant::now();
    let failures: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (good, bad, srv, sent, failed) = (&good, &bad, &srv, &sent, &failed);
                sc.spawn(move || {
                    let mut errs = vec![];
                    for r in 0..ROUNDS {
                        let (body, stream, want) = request(c, r, good, bad, &srv.model);
                        sent.fetch_add(1, Relaxed);
                        if let Err(e) = check(&srv.url, &body, stream, &want) {
                            failed.fetch_add(1, Relaxed);
                            errs.push(format!("client {c} round {r}: {e}"));
                        }
                    }
                    errs
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    assert!(srv.alive(), "the server stopped");
    assert_eq!(
        srv.wait_metric("q3vl_active_requests", |v| v == 0.0),
        0.0,
        "abandoned streams still hold slots"
    );
    let peak_kb = srv.status_kb("VmHWM");
    let (cancelled, generated) = (
        srv.metric("q3vl_requests_total{outcome=\"cancelled\"}"),
        srv.metric("q3vl_generated_tokens_total"),
    );
    eprintln!(
        "load: {} requests from {CLIENTS} clients in {secs:.1} s, {} failed; {cancelled} abandoned streams freed; \
         {generated} tokens generated; server RSS {} MiB before, peak {} MiB",
        sent.load(Relaxed),
        failed.load(Relaxed),
        base_kb >> 10,
        peak_kb >> 10
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        cancelled >= (CLIENTS / 4) as f64,
        "{cancelled} streams freed"
    );
    // Bounded: the 50 MB body is drained, never held; nothing grows with the load.
    assert!(
        peak_kb < base_kb + (256 << 10),
        "peak RSS {peak_kb} kB from {base_kb} kB"
    );
    let (status, _) = common::server::get(&format!("{}/health", srv.url));
    assert_eq!(status, 200);
}
