//! `q3vl serve` end to end over HTTP: its answers are `q3vl run`'s (text, image,
//! streamed or not), a conversation's next turn starts from its cached prompt and
//! still equals a fresh run, concurrent requests get the answers they get alone,
//! bad requests get their 4xx naming the field while the server lives on, a client
//! that leaves frees its slot, a full queue answers 503, and an unverified bundle
//! is refused.

mod common;

use common::server::{
    data_url, fresh_answer, get, image, image_url_body, png_header, post, run_text, stream, user,
    user_images, Server,
};
use common::{converted_fixture, converted_mode, fails, run, s};
use q3vl_model::conversation::{Message, Part, Role};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

const TOKENS: usize = 16;

fn bundle() -> PathBuf {
    converted_mode("shapes", "int8hu", true)
}

#[test]
fn answers_equal_q3vl_runs_streamed_or_not() {
    let out = bundle();
    let srv = Server::start(&out, &[]);
    let (img, wide) = (image("demo_0"), image("wide_3"));
    let cases: [(&str, &[&Path]); 3] = [
        ("Which colour comes after blue?", &[]),
        ("What is in the image?", &[&img]),
        ("Which picture has more shapes?", &[&wide, &img]),
    ];
    for (prompt, images) in cases {
        let want = run_text(&out, prompt, images, TOKENS);
        let (text, _) = srv.answer(json!([user_images(prompt, images)]), TOKENS);
        assert_eq!(text, want, "{prompt}: served vs q3vl run");
        let body = json!({"model": srv.model, "messages": [user_images(prompt, images)], "max_tokens": TOKENS,
            "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
        let events = stream(&srv.url, &body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, want, "{prompt}: streamed vs q3vl run");
        let finish = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str());
        assert_eq!(finish.collect::<Vec<_>>().len(), 1);
        let usage = &chunks.last().unwrap()["usage"];
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{usage}");
        assert!(usage["completion_tokens"].as_u64().unwrap() <= TOKENS as u64);
    }
}

#[test]
fn a_conversations_next_turn_reuses_its_prompt_and_equals_a_fresh_run() {
    let out = bundle();
    let srv = Server::start(&out, &[]);
    let img = image("demo_2");
    let q1 = user("What is in the image?", Some(&img));
    let (a1, _) = srv.answer(json!([q1]), TOKENS);
    let turn2 = json!([q1, {"role": "assistant", "content": a1}, {"role": "user", "content": "And its colour?"}]);
    let (a2, _) = srv.answer(turn2, TOKENS);
    let cached = srv.metric("q3vl_prompt_tokens_cached_total");
    assert!(
        cached > 10.0,
        "the second turn reused {cached} prompt tokens"
    );

    // The same conversation through the engine, fresh.
    let messages = [
        Message {
            role: Role::User,
            parts: vec![Part::Image, Part::Text("What is in the image?".into())],
        },
        Message::text(Role::Assistant, a1),
        Message::text(Role::User, "And its colour?"),
    ];
    let want = fresh_answer(&out, &messages, &[&img], TOKENS);
    assert_eq!(a2, want, "second turn: served vs fresh");
}

/// With no room for cached prompts (`--prompt-cache-mib 0`) every turn runs whole, and
/// still gets the same answer.
#[test]
fn without_a_prompt_cache_turns_run_whole_and_answer_the_same() {
    let out = bundle();
    let srv = Server::start(&out, &["--prompt-cache-mib", "0"]);
    let q1 = user("Which colour comes after blue?", None);
    let (a1, _) = srv.answer(json!([q1]), TOKENS);
    let turn2 = json!([q1, {"role": "assistant", "content": a1}, {"role": "user", "content": "And after red?"}]);
    let (a2, _) = srv.answer(turn2, TOKENS);
    assert_eq!(srv.metric("q3vl_prompt_tokens_cached_total"), 0.0);
    assert_eq!(srv.metric("q3vl_prompt_cache_bytes"), 0.0);
    let messages = [
        Message::text(Role::User, "Which colour comes after blue?"),
        Message::text(Role::Assistant, a1),
        Message::text(Role::User, "And after red?"),
    ];
    assert_eq!(a2, fresh_answer(&out, &messages, &[], TOKENS));
}

#[test]
fn concurrent_requests_get_the_answers_they_get_alone() {
    let out = bundle();
    let srv = Server::start(&out, &["--parallel", "4", "--context", "200000"]);
    let img = image("demo_3");
    let requests: Vec<Value> = [
        ("What is in the image?", Some(img.as_path())),
        ("Which colour comes after blue?", None),
        ("hi", None),
        ("Name a shape.", None),
        (
            "What is in the image? Answer in one word.",
            Some(img.as_path()),
        ),
        ("Count to three.", None),
    ]
    .iter()
    .map(|(q, i)| {
        json!({"model": srv.model, "messages": [user(q, *i)], "max_tokens": 24, "temperature": 0,
            "ignore_eos": true})
    })
    .collect();
    let alone: Vec<Value> = requests.iter().map(|r| srv.chat(r).1).collect();
    // A long stream decodes throughout, so every step below serves it and others.
    let long = json!({"model": srv.model, "messages": [user("hi", None)], "max_tokens": 150_000,
        "ignore_eos": true, "stream": true});
    let background = open_stream(&srv, &long, 3);
    let (steps0, tokens0) = (
        srv.metric("q3vl_decode_steps_total"),
        srv.metric("q3vl_generated_tokens_total"),
    );
    let together: Vec<Value> = std::thread::scope(|sc| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| sc.spawn(|| srv.chat(r).1))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, t) in alone.iter().zip(&together) {
        let text = |v: &Value| v["choices"][0]["message"]["content"].clone();
        assert_eq!(text(a), text(t), "alone vs batched");
        assert_eq!(a["usage"]["completion_tokens"], 24);
    }
    // Batched: fewer decode steps than tokens decoded (each step served several).
    let steps = srv.metric("q3vl_decode_steps_total") - steps0;
    let decoded = srv.metric("q3vl_generated_tokens_total") - tokens0 - requests.len() as f64;
    drop(background);
    assert!(
        steps < decoded,
        "{steps} decode steps for {decoded} decoded tokens"
    );
}

/// Hostile requests: status, the field named (None: no field), and the error code.
fn hostile(srv: &Server) -> Vec<(String, u16, Option<&'static str>, Option<&'static str>)> {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let m = srv.model.as_str();
    let hi = json!([{"role": "user", "content": "hi"}]);
    let words = "lorem ipsum ".repeat(5000);
    let many: Vec<Value> = (0..10_000)
        .map(|i| json!({"role": "user", "content": format!("m{i}")}))
        .collect();
    let img = data_url(&image("demo_0"));
    let nine_images = vec![json!({"type": "image_url", "image_url": {"url": img}}); 9];
    let bomb = format!(
        "data:image/png;base64,{}",
        b64(&png_header(100_000, 100_000))
    );
    let j = |v: Value| v.to_string();
    vec![
        ("{not json".into(), 400, None, None),
        (
            j(json!({"model": m, "messages": "hi"})),
            400,
            Some("messages"),
            None,
        ),
        (
            j(json!({"model": m, "messages": hi, "max_tokens": "many"})),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            j(json!({"model": m, "messages": hi, "temperature": -1})),
            400,
            Some("temperature"),
            None,
        ),
        (
            j(json!({"model": "gpt-4o", "messages": hi})),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            j(
                json!({"model": m, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
            ),
            400,
            Some("messages[0].content[0].text"),
            None,
        ),
        (
            j(image_url_body(m, "data:image/png;base64,!!!")),
            400,
            Some("messages[0].content[0].image_url"),
            None,
        ),
        (
            j(image_url_body(m, "data:image/png;base64,AAAA")),
            400,
            Some("messages[0].content[0].image_url"),
            None,
        ),
        (
            j(image_url_body(m, &bomb)),
            400,
            Some("messages[0].content[0].image_url"),
            None,
        ),
        (
            j(image_url_body(m, "/etc/passwd")),
            400,
            Some("messages[0].content[0].image_url"),
            None,
        ),
        (
            j(json!({"model": m, "messages": [{"role": "user", "content": nine_images}]})),
            400,
            Some("messages[0].content[8].image_url"),
            None,
        ),
        (
            j(json!({"model": m, "messages": [{"role": "user", "content": words}]})),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (
            j(json!({"model": m, "messages": hi, "max_tokens": 1_000_000})),
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            j(json!({"model": m, "messages": many})),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (
            format!(
                "{{\"model\": \"{m}\", \"pad\": \"{}\"}}",
                "x".repeat(3 << 20)
            ),
            413,
            None,
            Some("request_too_large"),
        ),
    ]
}

#[test]
fn bad_requests_get_their_4xx_naming_the_field_and_the_server_lives_on() {
    let out = bundle();
    let mut srv = Server::start(&out, &["--body-limit-mib", "2", "--context", "4096"]);
    for (body, status, param, code) in hostile(&srv) {
        let (got, v) = post(&format!("{}/v1/chat/completions", srv.url), &body);
        let what = &body[..body.len().min(80)];
        assert_eq!(got, status, "{what}: {v}");
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        assert_eq!(e["param"].as_str(), param, "{what}: {v}");
        if let Some(c) = code {
            assert_eq!(e["code"], c, "{what}: {v}");
        }
    }
    assert_eq!(get(&format!("{}/v1/chat/completions", srv.url)).0, 405);
    let (status, v) = get(&format!("{}/v1/nope", srv.url));
    assert_eq!(status, 404);
    assert!(v["error"]["message"].as_str().unwrap().contains("/v1/nope"));
    assert!(srv.alive());
    assert_eq!(get(&format!("{}/health", srv.url)).0, 200);
    let (text, _) = srv.answer(
        json!([user("Which colour comes after blue?", None)]),
        TOKENS,
    );
    assert!(!text.is_empty());
    assert!(srv.metric("q3vl_requests_total{outcome=\"client_error\"}") >= 15.0);
}

#[test]
fn a_client_that_leaves_frees_its_slot_and_a_full_queue_answers_503() {
    let out = bundle();
    let srv = Server::start(
        &out,
        &["--parallel", "1", "--queue", "2", "--context", "200000"],
    );
    let long = json!({"model": srv.model, "messages": [user("hi", None)], "max_tokens": 150_000,
        "ignore_eos": true, "stream": true});
    let mut running = open_stream(&srv, &long, 3);
    // The one slot is taken: the next request waits.
    let waiting = std::thread::spawn({
        let (url, model) = (srv.url.clone(), srv.model.clone());
        move || {
            let body = json!({"model": model, "messages": [user("hi", None)], "max_tokens": 4});
            post(&format!("{url}/v1/chat/completions"), &body.to_string())
        }
    });
    assert_eq!(srv.wait_metric("q3vl_queue_length", |v| v == 1.0), 1.0);
    // A streaming client that leaves while its request waits: never run.
    let mut short = long.clone();
    short["max_tokens"] = json!(3);
    let queued = open_stream(&srv, &short, 1);
    assert_eq!(srv.wait_metric("q3vl_queue_length", |v| v == 2.0), 2.0);
    // The queue is full: the next request is refused.
    let resp = ureq::post(&format!("{}/v1/chat/completions", srv.url))
        .send_string(&json!({"model": srv.model, "messages": [user("hi", None)]}).to_string());
    match resp {
        Err(ureq::Error::Status(503, r)) => {
            assert_eq!(r.header("retry-after"), Some("1"));
            let v: Value = r.into_json().unwrap();
            assert_eq!(v["error"]["code"], "server_overloaded");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    drop(queued);
    // The running stream's client leaves; its slot goes to the waiting request.
    assert!(running.next().is_some());
    drop(running);
    let (status, v) = waiting.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(srv.wait_metric("q3vl_active_requests", |v| v == 0.0), 0.0);
    let cancelled = "q3vl_requests_total{outcome=\"cancelled\"}";
    assert_eq!(srv.wait_metric(cancelled, |v| v == 2.0), 2.0);
    let generated = srv.metric("q3vl_generated_tokens_total");
    assert!(
        generated < 150_000.0,
        "the cancelled request ran on: {generated} tokens"
    );
}

/// A streamed request whose first `events` `data:` lines have arrived; its remaining
/// lines.
fn open_stream(srv: &Server, body: &Value, events: usize) -> impl Iterator<Item = String> {
    let resp = ureq::post(&format!("{}/v1/chat/completions", srv.url))
        .send_string(&body.to_string())
        .unwrap();
    let mut lines = BufReader::new(resp.into_reader())
        .lines()
        .map_while(Result::ok);
    let mut seen = 0;
    while seen < events {
        if lines.next().unwrap().starts_with("data: ") {
            seen += 1;
        }
    }
    lines
}

#[test]
fn an_unverified_bundle_is_served_only_when_allowed() {
    let out = converted_fixture("shapes");
    let o = run(&["serve", "--bundle", s(&out), "--port", "0"]);
    fails(&o, &["not verified", "--allow-unverified"]);
    let srv = Server::start(&out, &["--allow-unverified"]);
    assert_eq!(get(&format!("{}/health", srv.url)).0, 200);
}
