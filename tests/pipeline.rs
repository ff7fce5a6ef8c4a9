//! `make pipeline` on a fixture: convert → verify (fp32 + quantized) with --stamp →
//! a release folder holding both stamped bundles and the report.

use std::path::Path;
use std::process::Command;

#[test]
fn pipeline_on_the_shapes_fixture_ships_stamped_bundles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let o = Command::new("bash")
        .arg(root.join("scripts/pipeline.sh"))
        .current_dir(root)
        .env("Q3VL", env!("CARGO_BIN_EXE_q3vl"))
        .env("SRC", "fixtures/shapes")
        .env("OUT", out.path())
        .env_remove("HF_ID")
        .env_remove("TRACE_PROMPT")
        .env_remove("TRACES")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rel = out.path().join("release");
    for b in ["shapes_decode_int8hu", "shapes_vision"] {
        assert!(
            rel.join(b).join("verification.json").exists(),
            "{b} is stamped"
        );
        assert!(rel.join(b).join("metadata.json").exists());
    }
    assert!(rel.join("report").join("report.html").exists());
    assert!(rel.join("report").join("junit.xml").exists());
    // q3vl's own files of the output folder (its lock file) are not shipped.
    let internal: Vec<_> = std::fs::read_dir(&rel)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".q3vl-"))
        .collect();
    assert!(internal.is_empty(), "{internal:?}");
}

#[test]
fn pipeline_without_a_source_is_bad_usage() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new("bash")
        .arg(root.join("scripts/pipeline.sh"))
        .current_dir(root)
        .env("Q3VL", env!("CARGO_BIN_EXE_q3vl"))
        .env_remove("HF_ID")
        .env_remove("SRC")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("HF_ID"));
}
