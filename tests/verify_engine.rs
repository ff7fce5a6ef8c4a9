//! The engine ≡ reference gate of `q3vl verify --bundle`: the engine's greedy tokens
//! on each trace's inputs equal the reference's on the same bundle, in every mode and
//! on every fixture; a deliberately wrong engine fails it (named, and nothing else).

mod common;

use common::damage::{edit_tensor, pair, reseal_pair, scale_f16};
use common::{ok, s};
use q3vl_engine::{Engine, EngineOptions};
use q3vl_verify::session::{EngineGate, EngineOpener, Quiet, Request, Verified};
use q3vl_verify::Gates;
use serde_json::Value;
use std::path::{Path, PathBuf};

const GATE: &str = "engine.reference";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn traces(fx: &str) -> Vec<PathBuf> {
    ["image", "text"]
        .iter()
        .map(|t| fixture(fx).join("traces").join(format!("{t}.safetensors")))
        .collect()
}

/// Converts a fixture in `mode` (int8 modes of `odd` need the f16 fallback: its
/// `o_proj` has 48 in-features).
fn convert(fx: &str, mode: &str, out: &Path) {
    let src = fixture(fx);
    let mut args = vec!["convert", "--src", s(&src), "--out", s(out), "--mode", mode];
    if fx == "odd" && mode != "fp16" {
        args.push("--fallback-f16");
    }
    ok(&args);
}

/// `q3vl verify --bundle OUT` on both traces of `fx` (plus `extra`): exit code,
/// stdout, report.json and the JUnit XML.
fn verify(
    fx: &str,
    out: &Path,
    dir: &Path,
    extra: &[&str],
) -> (Option<i32>, String, Value, String) {
    let rep = dir.join("rep");
    let junit = dir.join("junit.xml");
    let mut args = vec!["verify", "--bundle", s(out)];
    let ts = traces(fx);
    for t in &ts {
        args.extend(["--trace", s(t)]);
    }
    args.extend(["--report", s(&rep), "--junit", s(&junit)]);
    args.extend(extra);
    let o = common::q3vl().args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "q3vl {args:?} ({:?}):\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(rep.join("report.json")).unwrap())
        .expect("report.json");
    (
        o.status.code(),
        stdout,
        report,
        std::fs::read_to_string(junit).unwrap(),
    )
}

/// `q3vl verify --bundle OUT --trace <shapes text trace> EXTRA...`, for the runs
/// expected to stop at bad input (exit 2) before any gate.
fn verify_shapes_text(out: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = common::q3vl();
    let ts = traces("shapes");
    cmd.args(["verify", "--bundle", s(out), "--trace", s(&ts[1])])
        .args(extra);
    cmd
}

/// Each trace's engine gate result and its `engine` section.
fn engine_gates(report: &Value) -> Vec<(String, Value, Value)> {
    report["traces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let g = t["gates"]
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["name"] == GATE)
                .unwrap_or_else(|| panic!("no {GATE} gate in {}", t["trace"]))
                .clone();
            (
                t["trace"].as_str().unwrap().to_string(),
                g,
                t["engine"].clone(),
            )
        })
        .collect()
}

#[test]
fn the_engine_gate_passes_on_shapes_int8hu_for_24_of_24_steps() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    convert("shapes", "int8hu", &out);
    let (code, stdout, report, junit) = verify("shapes", &out, dir.path(), &["--stamp"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.trim_end().ends_with("gates passed"), "{stdout}");
    let gates = engine_gates(&report);
    assert_eq!(gates.len(), 2);
    for (trace, g, e) in gates {
        assert_eq!(g["passed"], true, "{trace}: {g}");
        // The trained fixture is never ambiguous: all 24 steps count.
        assert_eq!(g["value"], "24/24", "{trace}: {g}");
        assert_eq!(e["steps"], 24);
        assert_eq!(e["engine_tokens"], e["reference_tokens"], "{trace}");
        let cos: Vec<f64> = e["logits_cos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_f64().unwrap())
            .collect();
        assert_eq!(cos.len(), 24);
        assert!(
            cos.iter().all(|&c| c > 0.999 && c <= 1.0 + 1e-12),
            "{cos:?}"
        );
        assert_eq!(
            e["min_logits_cos"].as_f64().unwrap(),
            cos.iter().copied().fold(1.0, f64::min)
        );
    }
    assert!(stdout.contains(&format!("gate {GATE} pass")), "{stdout}");
    assert!(
        stdout.contains("note engine vs reference: 24 steps"),
        "{stdout}"
    );
    assert_eq!(
        junit.matches(&format!("name=\"{GATE}\"")).count(),
        2,
        "{junit}"
    );
    let html = std::fs::read_to_string(dir.path().join("rep/report.html")).unwrap();
    assert!(html.contains("engine ≡ reference") && html.contains("logits cos"));
    assert!(out
        .join("shapes_decode_int8hu")
        .join("verification.json")
        .exists());
}

/// The scales of layer 0's down_proj.
const DOWN_PROJ_SCALES: &str = "model.language_model.layers.0.mlp.down_proj.weight.scales";

/// `verified` ran another engine: stamping is refused, and `out` holds no stamp.
fn refuses_to_stamp(verified: &Verified, out: &Path) {
    let refused = verified.stamp().unwrap_err().to_string();
    assert!(
        refused.contains("not opened from these bundles"),
        "{refused}"
    );
    assert!(!out
        .join("shapes_decode_int8hu")
        .join("verification.json")
        .exists());
}

/// The library's verify run on the bundles in `out` against the shapes traces, asking
/// to stamp, with the engine ≡ reference gate on the engine `open` gives.
fn verify_with_engine(out: &Path, open: EngineOpener<'_>) -> Verified {
    let (gates, ts) = (Gates::builtin(), traces("shapes"));
    let request = Request {
        gguf: None,
        src: None,
        fp32_ladder: true,
        bundle: Some(out),
        traces: &ts,
        gates: &gates,
        engine: EngineGate::Other(open),
        stamp: true,
        tool: "q3vl test".into(),
    };
    q3vl_verify::verify(&request, &mut Quiet).unwrap()
}

#[test]
fn a_wrong_engine_kernel_fails_the_engine_gate_and_nothing_else() {
    // The engine runs on a damaged copy of the bundles (one scale of layer 0's
    // down_proj × 1000, resealed so it opens), as a wrong kernel would compute; the
    // reference, and so every other gate, still sees the good bundles.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    convert("shapes", "int8hu", &out);
    let bad = dir.path().join("bad");
    common::copy_dir(&out, &bad);
    edit_tensor(&pair(&bad).language, DOWN_PROJ_SCALES, |b, _| {
        scale_f16(&mut b[..2], 1000.0)
    });
    reseal_pair(&bad);
    let open_bad = |_: &Path| Engine::open(&bad, &EngineOptions::default());

    let verified = verify_with_engine(&out, &open_bad);
    let report: Value = serde_json::from_str(&verified.report().to_json()).unwrap();
    assert!(!verified.report().passed(), "{report}");
    let text = verified.report().to_text();
    let last = text.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("FAIL") && last.contains(&format!("image:{GATE}")),
        "{last}"
    );
    let min_cos = Gates::builtin().bundle.engine_logits_cos;
    for (trace, g, e) in engine_gates(&report) {
        assert_eq!(g["passed"], false, "{trace}: {g}");
        assert!(g["detail"].as_str().unwrap().starts_with("step "), "{g}");
        assert!(e["count"]["first_mismatch"].is_u64(), "{e}");
        // The damage is real: the engine's logits are not the reference's.
        assert!(e["min_logits_cos"].as_f64().unwrap() < min_cos, "{e}");
    }
    let failed: Vec<&str> = report["traces"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["gates"].as_array().unwrap())
        .filter(|g| g["passed"] == false)
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert!(failed.iter().all(|&n| n == GATE), "{failed:?}");
    let junit = verified.report().to_junit();
    assert!(
        junit.contains(&format!("name=\"{GATE}\"><failure")),
        "{junit}"
    );
    // Neither stamped nor unstamped: the gate did not run the bundles' own engine.
    refuses_to_stamp(&verified, &out);
}

#[test]
fn a_run_whose_engine_came_from_elsewhere_never_stamps() {
    // The right engine, but handed in by the caller: every gate passes, and still the
    // run cannot stamp, since nothing ties that engine to the verified bundles.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    convert("shapes", "int8hu", &out);
    let open_same = |p: &Path| Engine::open(p, &EngineOptions::default());
    let verified = verify_with_engine(&out, &open_same);
    assert!(
        verified.report().passed(),
        "{}",
        verified.report().to_text()
    );
    refuses_to_stamp(&verified, &out);
}

#[test]
fn every_fixture_bundle_passes_every_gate_in_every_mode() {
    // Issue 4's bar: int8hu, int8lin and fp16 of every fixture pass every gate, the
    // engine ≡ reference gate included. The untrained fixtures were seeded so their
    // first 16 decode steps are firm (oracle/build_fixtures.py), so the engine's count
    // reaches at least 16 everywhere.
    let mut lines = Vec::new();
    for fx in ["shapes", "tied", "odd"] {
        for mode in ["int8hu", "int8lin", "fp16"] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("b");
            convert(fx, mode, &out);
            let (code, stdout, report, _) = verify(fx, &out, dir.path(), &[]);
            assert_eq!(code, Some(0), "{fx} {mode}:\n{stdout}");
            for (trace, g, e) in engine_gates(&report) {
                assert_eq!(g["passed"], true, "{fx} {mode} {trace}: {g}\n{stdout}");
                let c = &e["count"];
                assert!(c["counted"].as_u64().unwrap() >= 16, "{fx} {mode}: {c}");
                assert_eq!(e["steps"], 24);
                // Every prompt position was scored, and the firm ones all agree.
                let p = &e["prompt"];
                assert!(p["firm"].as_u64().unwrap() > 0, "{fx} {mode}: {p}");
                assert_eq!(p["firm"], p["agree"], "{fx} {mode}: {p}");
                assert_eq!(
                    e["prompt_logits_cos"].as_array().unwrap().len(),
                    p["firm"].as_u64().unwrap() as usize + p["ambiguous"].as_array().unwrap().len()
                );
                lines.push(format!(
                    "{fx} {mode} {}: {} min logits cos {:.9}, stop {}; prompt {}/{}, min cos {:.9}",
                    Path::new(&trace).file_stem().unwrap().to_string_lossy(),
                    g["value"].as_str().unwrap(),
                    e["min_logits_cos"].as_f64().unwrap(),
                    c["first_ambiguous"],
                    p["agree"],
                    p["firm"],
                    e["min_prompt_logits_cos"].as_f64().unwrap()
                ));
            }
        }
    }
    eprintln!("{}", lines.join("\n"));
}

#[test]
fn without_the_engine_gate_the_report_says_it_did_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    convert("shapes", "int8hu", &out);
    let (code, stdout, report, junit) = verify("shapes", &out, dir.path(), &["--no-engine-gate"]);
    assert_eq!(code, Some(0), "{stdout}");
    let last = stdout.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("PASS") && last.ends_with("not run: engine.reference (--no-engine-gate)"),
        "{last}"
    );
    for t in report["traces"].as_array().unwrap() {
        assert!(t["gates"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["name"] != GATE));
    }
    assert_eq!(report["not_run"][0]["gate"], GATE);
    assert!(
        junit.contains("<skipped message=\"--no-engine-gate\"/>"),
        "{junit}"
    );
    // A run that skipped a gate cannot stamp.
    let mut cmd = verify_shapes_text(&out, &["--no-engine-gate", "--stamp"]);
    common::fails(&cmd.output().unwrap(), &["--no-engine-gate"]);
}
