//! Real clients against `q3vl serve`: the official `openai` Python package (pinned in
//! oracle/requirements.txt; run when the oracle environment is installed, required by
//! `make test-interop`) and curl. Text, an image, two images and a two-turn
//! conversation, streamed and not: every answer equals `q3vl run`'s (or, for the
//! second turn, the engine's fresh run of the whole conversation).

mod common;

use common::server::{fresh_answer, image, run_text, user, user_images, Server};
use common::{converted_mode, oracle_python, s};
use q3vl_model::conversation::{Message, Part, Role};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const TOKENS: usize = 16;

/// The cases: name, messages, and the answer they must get.
fn cases(out: &Path) -> Vec<(&'static str, Value, String)> {
    let (a, b) = (image("demo_2"), image("wide_3"));
    let q = "What is in the image?";
    let first = run_text(out, q, &[&a], TOKENS);
    let history = [
        Message {
            role: Role::User,
            parts: vec![Part::Image, Part::Text(q.into())],
        },
        Message::text(Role::Assistant, first.clone()),
        Message::text(Role::User, "And its colour?"),
    ];
    vec![
        (
            "text",
            json!([user("Which colour comes after blue?", None)]),
            run_text(out, "Which colour comes after blue?", &[], TOKENS),
        ),
        ("image", json!([user(q, Some(&a))]), first.clone()),
        (
            "two_images",
            json!([user_images("Which picture has more shapes?", &[&b, &a])]),
            run_text(out, "Which picture has more shapes?", &[&b, &a], TOKENS),
        ),
        (
            "two_turns",
            json!([user(q, Some(&a)), {"role": "assistant", "content": first},
                {"role": "user", "content": "And its colour?"}]),
            fresh_answer(out, &history, &[&a], TOKENS),
        ),
    ]
}

#[test]
fn the_openai_python_package_gets_q3vl_runs_answers() {
    let Some(python) = oracle_python() else {
        eprintln!("NOT RUN: the openai package half (the oracle environment is not installed: make oracle)");
        return;
    };
    let out = converted_mode("shapes", "int8hu", true);
    let srv = Server::start(&out, &[]);
    let cases = cases(&out);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("requests.json");
    let mut named = serde_json::Map::new();
    for (name, messages, _) in &cases {
        named.insert(name.to_string(), messages.clone());
    }
    let req = json!({"model": srv.model, "max_tokens": TOKENS, "cases": named});
    std::fs::write(&file, req.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("oracle/openai_client.py");
    let o = Command::new(python)
        .args([
            s(&script),
            "--base-url",
            &format!("{}/v1", srv.url),
            "--requests",
            s(&file),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(got["openai"], "3.63.0");
    assert_eq!(got["models"], json!([srv.model]));
    for (name, _, want) in &cases {
        let c = &got["cases"][name];
        assert_eq!(c["text"], *want, "{name}: openai, not streamed");
        assert_eq!(c["streamed"], *want, "{name}: openai, streamed");
        assert_eq!(
            c["stream_finishes"].as_array().unwrap().len(),
            1,
            "{name}: {c}"
        );
        assert_eq!(c["usage"], c["stream_usage"], "{name}");
        assert!(
            c["usage"]["prompt_tokens"].as_u64().unwrap() > 0,
            "{name}: {c}"
        );
    }
    assert_eq!(
        got["errors"]["unknown_model"],
        json!([404, "model_not_found"])
    );
    assert_eq!(
        got["errors"]["bad_temperature"],
        json!([400, "temperature"])
    );
}

/// curl's answer: the HTTP status and body of a POST.
fn curl(url: &str, body: &Value, extra: &[&str]) -> (String, String) {
    let o = Command::new("curl")
        .args([
            "-sS",
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
        ])
        .args(extra)
        .args(["--data-binary", "@-", &format!("{url}/v1/chat/completions")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(body.to_string().as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.to_string(), body.to_string())
}

#[test]
fn curl_gets_q3vl_runs_answers() {
    if Command::new("curl").arg("--version").output().is_err() {
        assert!(
            oracle_python().is_none(),
            "curl is missing where the interop tests must run"
        );
        eprintln!("NOT RUN: the curl half (no curl on this machine)");
        return;
    }
    let out = converted_mode("shapes", "int8hu", true);
    let srv = Server::start(&out, &[]);
    for (name, messages, want) in cases(&out) {
        let body = json!({"model": srv.model, "messages": messages, "max_tokens": TOKENS, "temperature": 0});
        let (status, text) = curl(&srv.url, &body, &[]);
        assert_eq!(status, "200", "{name}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], want, "{name}: curl");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (status, sse) = curl(&srv.url, &streamed, &["-N"]);
        assert_eq!(status, "200", "{name}");
        let pieces: String = sse
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(pieces, want, "{name}: curl, streamed");
        assert!(sse.trim_end().ends_with("data: [DONE]"), "{name}: {sse}");
    }
    let (status, text) = curl(&srv.url, &json!({"model": "x", "messages": []}), &[]);
    assert_eq!(status, "400", "{text}");
}
