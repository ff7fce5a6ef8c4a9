//! Several images and several turns through the gates: the HF oracle's traces of a
//! two-image prompt and of a two-turn conversation with an image in the first turn
//! (`fixtures/shapes/traces/two_*.safetensors`) pass the fp32 ladder, the quantized
//! gates and engine ≡ reference; a conversation the trace was not made from fails
//! `prompt.ids`.

mod common;

use common::{converted_fixture, ok, run, s};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn trace(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/shapes/traces/{name}.safetensors"))
}

/// The report of `verify SIDE SUBJECT` on both traces.
fn report(side: &str, subject: &Path, dir: &Path) -> Value {
    let rep = dir.join(side.trim_start_matches('-'));
    let (a, b) = (trace("two_images"), trace("two_turns"));
    ok(&[
        "verify",
        side,
        s(subject),
        "--trace",
        s(&a),
        "--trace",
        s(&b),
        "--report",
        s(&rep),
    ]);
    serde_json::from_str(&std::fs::read_to_string(rep.join("report.json")).unwrap()).unwrap()
}

/// Each trace's gates by name: (passed, value).
fn gates(report: &Value) -> Vec<Vec<(String, bool, String)>> {
    report["traces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["gates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| {
                    let name = g["name"].as_str().unwrap().to_string();
                    (name, g["passed"].as_bool().unwrap(), g["value"].to_string())
                })
                .collect()
        })
        .collect()
}

#[test]
fn two_images_and_two_turns_pass_every_gate_against_the_hf_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes");
    let bundle = converted_fixture("shapes");
    for (side, subject, must) in [
        (
            "--src",
            src.as_path(),
            &["prompt.ids", "vision.ladder", "text.ladder", "logits.kld"][..],
        ),
        (
            "--bundle",
            bundle.as_path(),
            &[
                "prompt.ids",
                "vision.ladder",
                "text.ladder",
                "engine.reference",
            ][..],
        ),
    ] {
        let r = report(side, subject, dir.path());
        for (k, trace) in gates(&r).iter().enumerate() {
            for want in must {
                let g = trace.iter().find(|g| g.0 == *want);
                assert!(g.is_some_and(|g| g.1), "{side} trace {k}: {want} {g:?}");
            }
            assert!(trace.iter().all(|g| g.1), "{side} trace {k}: {trace:?}");
        }
    }
}

/// The two-turn trace with its conversation's assistant turn rewritten (same length):
/// the prompt rebuilt from it no longer has the trace's ids.
#[test]
fn a_conversation_other_than_the_traces_fails_prompt_ids() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(trace("two_turns")).unwrap();
    let (from, to) = (
        "a red square at the bottom right",
        "a red circle at the top right!!!",
    );
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .expect("the assistant turn");
    let mut edited = bytes.clone();
    edited[at..at + to.len()].copy_from_slice(to.as_bytes());
    let copy = dir.path().join("two_turns.safetensors");
    std::fs::write(&copy, edited).unwrap();
    std::fs::copy(
        trace("two_turns").with_file_name("small_2.png"),
        dir.path().join("small_2.png"),
    )
    .unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes");
    let rep = dir.path().join("rep");
    let o = run(&[
        "verify",
        "--src",
        s(&src),
        "--trace",
        s(&copy),
        "--report",
        s(&rep),
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("gate prompt.ids"))
        .unwrap();
    assert!(line.contains("FAIL") || line.contains("fail"), "{line}");
}
