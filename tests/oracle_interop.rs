//! The HF oracle itself (`oracle/`), when its pinned Python environment is installed
//! (`make oracle`; CI does not install it, and this test then says plainly that it did
//! not run): the layer-streamed mode writes the same trace as the whole model, bit for
//! bit, and q3vl's fp32 ladder passes on the v2 trace it writes.

mod common;

use common::{ok, s};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs an oracle script with the environment's Python; panics with its output on failure.
fn python(py: &Path, args: &[&str]) {
    let o = Command::new(py)
        .args(args)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .current_dir(repo(""))
        .output()
        .expect("the oracle's python runs");
    assert!(
        o.status.success(),
        "{args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_layer_streamed_oracle_equals_the_whole_model_and_its_v2_trace_verifies() {
    let Some(py) = common::oracle_python() else {
        eprintln!("oracle interop: NOT RUN: the oracle environment is not installed (make oracle)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let fx = repo("fixtures/tied");
    let prompt = q3vl_verify::OracleTrace::open(&fx.join("traces/text.safetensors"))
        .unwrap()
        .meta("prompt")
        .to_string();
    let out = |n: &str| dir.path().join(n).display().to_string();
    let (whole, streamed) = (out("whole.safetensors"), out("streamed.safetensors"));
    let base = [
        "oracle/trace.py",
        "--model",
        s(&fx),
        "--model-id",
        "tied",
        "--prompt",
        &prompt,
        "--decode-steps",
        "8",
    ];
    python(&py, &[&base[..], &["--out", &whole]].concat());
    python(
        &py,
        &[
            &base[..],
            &["--out", &streamed, "--stream-layers", "--cross-check"],
        ]
        .concat(),
    );
    python(
        &py,
        &["oracle/compare_traces.py", "--exact", &streamed, &whole],
    );
    let rep = out("report");
    let stdout = ok(&[
        "verify",
        "--src",
        s(&fx),
        "--trace",
        &whole,
        "--report",
        &rep,
    ]);
    assert!(stdout.contains("PASS"), "{stdout}");
    eprintln!("oracle interop: ran (whole and layer-streamed traces equal, fp32 ladder passes)");
}
