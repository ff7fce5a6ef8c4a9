//! `fixtures/fullvocab/`: random checkpoints with the real Qwen3 tokenizer and the full
//! 151 936-token vocabulary, regenerated here by `q3vl synth` (no weights are
//! committed), checked byte for byte against `checkpoint.sha256`, then verified
//! against the committed HF traces: the fp32 ladder on the checkpoint, and every gate
//! on its int8hu, int8lin and fp16 bundles.

mod common;

use common::{ok, run, s, scratch};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The bundle modes every fixture is converted to.
const MODES: [&str; 3] = ["int8hu", "int8lin", "fp16"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/fullvocab")
        .join(name)
}

/// The `q3vl synth` arguments that make the fixture's checkpoint (its README says
/// the same).
fn synth_args(fx: &Path, out: &Path) -> Vec<String> {
    let seed = std::fs::read_to_string(fx.join("SEED")).expect("SEED");
    let seed = seed.trim().to_string();
    let scale = std::fs::read_to_string(fx.join("LOGIT_SCALE")).expect("LOGIT_SCALE");
    let scale = scale.trim().to_string();
    let file = |n: &str| s(&fx.join(n)).to_string();
    [
        "synth",
        "--config",
        &file("synth.json"),
        "--preprocessor",
        &file("preprocessor.json"),
        "--seed",
        &seed,
        "--logit-scale",
        &scale,
        "--out",
        s(out),
    ]
    .map(str::to_string)
    .to_vec()
}

/// sha256 of every file in `dir`, by name.
fn digests(dir: &Path) -> BTreeMap<String, String> {
    common::tree(dir)
        .into_iter()
        .map(|(name, bytes)| (name, hex::encode(Sha256::digest(&bytes))))
        .collect()
}

/// `checkpoint.sha256` (`sha256sum` lines: digest, two spaces, file name).
fn recorded_digests(fx: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(fx.join("checkpoint.sha256")).expect("checkpoint.sha256");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (d, n) = l.split_once("  ").expect("`DIGEST  NAME` lines");
            (n.to_string(), d.to_string())
        })
        .collect()
}

/// Synthesizes the fixture's checkpoint into `out` and checks it is the one the traces
/// were made on.
fn synth_checkpoint(name: &str, out: &Path) {
    let fx = fixture(name);
    let args = synth_args(&fx, out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&args);
    let (got, want) = (digests(out), recorded_digests(&fx));
    let changed: Vec<String> = want
        .keys()
        .chain(got.keys())
        .filter(|f| got.get(*f) != want.get(*f))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(
        changed.is_empty(),
        "synth output changed ({}); regenerate fixtures/fullvocab with the commands in \
         fixtures/fullvocab/{name}/README.md (checkpoint.sha256 and every trace)",
        changed.join(", ")
    );
}

/// The fixture's committed traces.
fn traces(name: &str) -> Vec<PathBuf> {
    let dir = fixture(name).join("traces");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    v.sort();
    assert_eq!(v.len(), 3, "three traces in {}", dir.display());
    v
}

/// `q3vl verify WHAT DIR --trace ... --json`; panics naming every failed gate.
fn verify_passes(what: &str, dir: &Path, traces: &[PathBuf], report: &Path) {
    let mut args = vec!["verify", what, s(dir), "--report", s(report), "--json"];
    for t in traces {
        args.extend(["--trace", s(t)]);
    }
    let o = run(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("q3vl {args:?}: no JSON report ({e}):\n{stderr}"));
    let text = |x: &serde_json::Value| x.as_str().unwrap_or_default().to_string();
    let mut failed = vec![];
    for t in v["traces"].as_array().expect("traces") {
        let trace = text(&t["trace"]);
        let trace = Path::new(&trace).file_name().unwrap_or_default();
        for g in t["gates"].as_array().expect("gates") {
            if g["passed"] != true {
                let [name, value, threshold, detail] =
                    ["name", "value", "threshold", "detail"].map(|k| text(&g[k]));
                failed.push(format!(
                    "  {}: {name} = {value} [{threshold}] {detail}",
                    trace.to_string_lossy()
                ));
            }
        }
    }
    assert!(
        o.status.success() && failed.is_empty(),
        "q3vl verify {what} {} exited {:?}; failed gates:\n{}\n{stderr}",
        dir.display(),
        o.status.code(),
        failed.join("\n")
    );
}

/// The whole check of one fixture: synth, digests, fp32 ladder, three bundles.
fn check_fixture(name: &str) {
    let work = scratch(&format!("fullvocab-{name}"));
    let ckpt = work.join("checkpoint");
    synth_checkpoint(name, &ckpt);
    let traces = traces(name);
    verify_passes("--src", &ckpt, &traces, &work.join("report-fp32"));
    for mode in MODES {
        let out = work.join(mode);
        ok(&[
            "convert",
            "--src",
            s(&ckpt),
            "--out",
            s(&out),
            "--mode",
            mode,
        ]);
        verify_passes(
            "--bundle",
            &out,
            &traces,
            &work.join(format!("report-{mode}")),
        );
        // Bundles are 20-40 MB each: keep at most one at a time.
        std::fs::remove_dir_all(&out).unwrap();
    }
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn untied_full_vocab_passes_every_gate() {
    check_fixture("untied");
}

#[test]
fn tied_full_vocab_passes_every_gate() {
    check_fixture("tied");
}

#[test]
fn synth_config_and_preprocessor_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ck");
    let fx = fixture("untied");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"model_type\": \"qwen3_vl\"").unwrap();
    let cfg = fx.join("synth.json");
    common::fails(
        &run(&["synth", "--config", s(&bad), "--out", s(&out)]),
        &[s(&bad), "not valid JSON"],
    );
    std::fs::write(&bad, "{\"model_type\": \"qwen3_vl\"}").unwrap();
    common::fails(
        &run(&["synth", "--config", s(&bad), "--out", s(&out)]),
        &[s(&bad), "text_config"],
    );
    common::fails(
        &run(&[
            "synth",
            "--config",
            s(&cfg),
            "--size",
            "tiny",
            "--out",
            s(&out),
        ]),
        &["--size", "--config"],
    );
    let pre = std::fs::read_to_string(fx.join("preprocessor.json")).unwrap();
    std::fs::write(
        &bad,
        pre.replace("\"patch_size\": 16", "\"patch_size\": 14"),
    )
    .unwrap();
    let args = ["synth", "--config", s(&cfg), "--preprocessor", s(&bad)];
    common::fails(
        &run(&[&args[..], &["--out", s(&out)]].concat()),
        &[s(&bad), "patch_size is 14"],
    );
    assert!(!out.exists());
}
