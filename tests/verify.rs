//! `q3vl verify` end to end: the fp32 ladder and the quantized gates on the committed
//! fixtures, each gate failing for the right reason, reports, JUnit and the stamp.

mod common;

use common::damage::{reseal, scale_f16};
use common::{fails, ok, run, s};
use q3vl_model::Checkpoint;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn trace(fx: &str, t: &str) -> PathBuf {
    fixture(fx).join("traces").join(format!("{t}.safetensors"))
}

/// `verify SIDE SUBJECT --trace T… --report REPORT EXTRA…` as an argument list (`SIDE`
/// is `--src` or `--bundle`).
fn verify_args<'a>(
    side: &'a str,
    subject: &'a Path,
    traces: &[&'a Path],
    report: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec!["verify", side, s(subject)];
    for t in traces {
        a.extend(["--trace", s(t)]);
    }
    a.extend(["--report", s(report)]);
    a.extend_from_slice(extra);
    a
}

/// Converts a fixture into `out` and returns `out`.
fn convert(fx: &str, out: &Path, mode: &str) {
    ok(&[
        "convert",
        "--src",
        s(&fixture(fx)),
        "--out",
        s(out),
        "--mode",
        mode,
    ]);
}

/// `tied` converted (int8hu) into `dir/b`; returns that folder and the language
/// bundle's weights file.
fn tied_int8hu(dir: &Path) -> (PathBuf, PathBuf) {
    let out = dir.join("b");
    convert("tied", &out, "int8hu");
    let w = out.join("tied_decode_int8hu").join("model.safetensors");
    (out, w)
}

/// Asserts the last line `o` printed on stdout names `gate`.
fn last_line_names(o: &std::process::Output, gate: &str) {
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.trim_end().lines().last().unwrap().contains(gate),
        "{stdout}"
    );
}

/// Rewrites the bytes of one tensor of a safetensors file in place.
fn edit_tensor(file: &Path, name: &str, f: impl Fn(&mut [u8])) {
    let range = {
        let ck = Checkpoint::open_files(file.parent().unwrap(), &[file.to_path_buf()]).unwrap();
        ck.info(name)
            .unwrap_or_else(|| panic!("{name} in {}", file.display()))
            .range
            .clone()
    };
    let mut bytes = std::fs::read(file).unwrap();
    f(&mut bytes[range]);
    std::fs::write(file, bytes).unwrap();
}

/// Runs `f` on a copy of `file`'s bytes, then puts the original back.
fn with_edited(file: &Path, f: impl Fn(&mut Vec<u8>), check: impl FnOnce()) {
    let original = std::fs::read(file).unwrap();
    let mut b = original.clone();
    f(&mut b);
    assert_eq!(b.len(), original.len(), "a same-size edit");
    std::fs::write(file, &b).unwrap();
    check();
    std::fs::write(file, &original).unwrap();
}

#[test]
fn fp32_ladder_passes_on_the_fixtures_and_writes_reports() {
    let dir = tempfile::tempdir().unwrap();
    let rep = dir.path().join("rep");
    let junit = dir.path().join("junit.xml");
    let out = ok(&verify_args(
        "--src",
        &fixture("tied"),
        &[&trace("tied", "image"), &trace("tied", "text")],
        &rep,
        &["--junit", s(&junit)],
    ));
    assert!(
        out.trim_end().lines().last().unwrap().starts_with("PASS"),
        "{out}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rep.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["traces"].as_array().unwrap().len(), 2);
    let html = std::fs::read_to_string(rep.join("report.html")).unwrap();
    assert!(html.contains("<svg") && !html.contains("http://") && !html.contains("https://"));
    let x = std::fs::read_to_string(junit).unwrap();
    assert!(
        x.contains("<testsuites") && x.contains("failures=\"0\""),
        "{x}"
    );
}

#[test]
fn json_output_is_one_document() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&verify_args(
        "--src",
        &fixture("tied"),
        &[&trace("tied", "text")],
        dir.path(),
        &["--json"],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is one JSON document");
    assert_eq!(v["format"], "q3vl-verify-report/1");
}

#[test]
fn a_trace_of_another_format_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.safetensors");
    let bytes = std::fs::read(trace("tied", "text")).unwrap();
    let text = String::from_utf8_lossy(&bytes[..4096.min(bytes.len())]).to_string();
    assert!(text.contains("qwen3vl-oracle-trace/1"));
    let pos = bytes
        .windows(22)
        .position(|w| w == b"qwen3vl-oracle-trace/1")
        .unwrap();
    let mut b2 = bytes.clone();
    b2[pos + 21] = b'9';
    std::fs::write(&bad, b2).unwrap();
    let o = run(&verify_args(
        "--src",
        &fixture("tied"),
        &[&bad],
        dir.path(),
        &[],
    ));
    fails(&o, &["bad.safetensors", "qwen3vl-oracle-trace/9"]);
}

#[test]
fn a_trace_of_another_model_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&verify_args(
        "--src",
        &fixture("tied"),
        &[&trace("odd", "text")],
        dir.path(),
        &[],
    ));
    fails(&o, &["does not fit"]);
}

#[test]
fn int8_bundles_pass_every_gate_and_get_stamped() {
    // The trained fixture: its int8hu and int8lin bundles pass every quantized gate.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    convert("shapes", &out, "int8hu");
    let rep = dir.path().join("rep");
    ok(&verify_args(
        "--bundle",
        &out,
        &[&trace("shapes", "image"), &trace("shapes", "text")],
        &rep,
        &["--stamp"],
    ));
    let lang = out.join("shapes_decode_int8hu");
    assert!(lang.join("verification.json").exists());
    assert!(out.join("shapes_vision").join("verification.json").exists());
    let info = ok(&["inspect", s(&lang)]);
    assert!(info.contains("verified"), "{info}");
    let run_verified = || {
        let args = [
            "run",
            "--bundle",
            s(&out),
            "--prompt",
            "x",
            "--max-new-tokens",
            "1",
        ];
        run(&[&args[..], &["--require-verified"]].concat())
    };
    let o = run_verified();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Any changed byte of any file of either bundle is refused, naming the file: the
    // head zeroed in place, one character of the chat template, one vision weight.
    let weights = lang.join("model.safetensors");
    let zero_head = |b: &mut Vec<u8>| {
        let ck = Checkpoint::open_files(&lang, std::slice::from_ref(&weights)).unwrap();
        let r = ck.info("lm_head.weight").unwrap().range.clone();
        b[r].fill(0);
    };
    with_edited(&weights, zero_head, || {
        fails(
            &run_verified(),
            &["model.safetensors", "--require-verified"],
        );
    });
    let template = lang.join("tokenizer/tokenizer_config.json");
    let swap_case = |b: &mut Vec<u8>| {
        let at = b.windows(7).position(|w| w == b"im_star").unwrap();
        b[at] = b'I';
    };
    with_edited(&template, swap_case, || {
        fails(&run_verified(), &["tokenizer/tokenizer_config.json"]);
    });
    let vision = out.join("shapes_vision/model.safetensors");
    let flip_last = |b: &mut Vec<u8>| {
        let last = b.len() - 1;
        b[last] ^= 1;
    };
    with_edited(&vision, flip_last, || {
        fails(&run_verified(), &["shapes_vision", "model.safetensors"]);
        // The language bundle's own stamp vouches for its pair.
        let info = ok(&["inspect", s(&lang)]);
        assert!(
            info.contains("INVALID") && info.contains("shapes_vision"),
            "{info}"
        );
    });
    assert!(
        run_verified().status.success(),
        "restored bytes verify again"
    );
    // A same-size edit of a verified file (only a hash can see it) invalidates the stamp.
    let cfg = lang.join("config.json");
    let c = std::fs::read_to_string(&cfg)
        .unwrap()
        .replacen(' ', "\t", 1);
    std::fs::write(&cfg, c).unwrap();
    let info = run(&["inspect", s(&lang)]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&info.stdout),
        String::from_utf8_lossy(&info.stderr)
    );
    assert!(all.contains("INVALID"), "{all}");
}

/// A bundle whose bytes no longer match its own checksums is refused before any gate
/// runs, and never stamped.
#[test]
fn a_bundle_failing_its_checksums_is_never_stamped() {
    let dir = tempfile::tempdir().unwrap();
    let (out, w) = tied_int8hu(dir.path());
    let flip_up = || {
        edit_tensor(
            &w,
            "model.language_model.layers.0.mlp.up_proj.weight",
            |b| b[5] ^= 0x40,
        )
    };
    flip_up();
    let rep = dir.path().join("rep");
    let tr = trace("tied", "text");
    let verify_stamp = || run(&verify_args("--bundle", &out, &[&tr], &rep, &["--stamp"]));
    fails(
        &verify_stamp(),
        &["tied_decode_int8hu/model.safetensors", "sha256"],
    );
    assert!(!out.join("tied_decode_int8hu/verification.json").exists());
    assert!(!out.join("tied_vision/verification.json").exists());
    // A file the bundle's metadata does not list would be stamped unchecked: refused.
    flip_up();
    std::fs::write(out.join("tied_vision/extra.bin"), b"x").unwrap();
    fails(&verify_stamp(), &["tied_vision", "extra.bin", "not listed"]);
    assert!(!out.join("tied_vision/verification.json").exists());
}

#[test]
fn one_layer_with_scales_times_1_5_fails_the_ladder_at_that_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (out, w) = tied_int8hu(dir.path());
    edit_tensor(
        &w,
        "model.language_model.layers.3.mlp.down_proj.weight.scales",
        |b| scale_f16(b, 1.5),
    );
    reseal(&out.join("tied_decode_int8hu"));
    let rep = dir.path().join("rep");
    let o = run(&verify_args(
        "--bundle",
        &out,
        &[&trace("tied", "text")],
        &rep,
        &["--stamp"],
    ));
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rep.join("report.json")).unwrap()).unwrap();
    let rows = r["traces"][0]["rows"].as_array().unwrap();
    let first_bad = rows.iter().find(|row| row["passed"] == false).unwrap();
    assert_eq!(first_bad["name"], "text.layer.3");
    last_line_names(&o, "text.ladder");
    assert!(!out
        .join("tied_decode_int8hu")
        .join("verification.json")
        .exists());
}

#[test]
fn a_wrong_image_fails_the_vision_gate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    convert("tied", &out, "int8hu");
    // The oracle's trace with another picture in it: every pixel inverted.
    let t = dir.path().join("traces");
    std::fs::create_dir_all(&t).unwrap();
    for f in std::fs::read_dir(fixture("tied").join("traces")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, t.join(f.file_name().unwrap())).unwrap();
    }
    let img = t.join("image.safetensors");
    edit_tensor(&img, "pixel_values", |b| {
        for v in b.chunks_exact_mut(4) {
            let x = -f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            v.copy_from_slice(&x.to_le_bytes());
        }
    });
    let rep = dir.path().join("rep");
    let o = run(&verify_args("--bundle", &out, &[&img], &rep, &[]));
    assert_eq!(o.status.code(), Some(1));
    last_line_names(&o, "vision.ladder");
}

/// Copies trace `t` of fixture `fx` to `dir`, keeping only the first row of tensor
/// `name` (a damaged or foreign trace whose tap covers fewer tokens than the prompt).
fn with_short_tap(fx: &str, t: &str, name: &str, dir: &Path) -> PathBuf {
    use safetensors::tensor::TensorView;
    let src = trace(fx, t);
    let bytes = std::fs::read(&src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = vec![];
    for (n, v) in st.tensors() {
        let (mut shape, mut data) = (v.shape().to_vec(), v.data().to_vec());
        if n == name {
            let row = data.len() / shape[0];
            shape[0] = 1;
            data.truncate(row);
        }
        owned.push((n, v.dtype(), shape, data));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = dir.join(src.file_name().unwrap());
    safetensors::serialize_to_file(views, meta.metadata().clone(), &out).unwrap();
    if let Some(img) = src
        .parent()
        .map(|p| p.join("image.png"))
        .filter(|p| p.exists())
    {
        std::fs::copy(img, dir.join("image.png")).unwrap();
    }
    out
}

#[test]
fn a_trace_whose_tap_covers_fewer_rows_is_bad_input() {
    // Comparisons zip rows: a short tap would be compared on its rows only and pass.
    let dir = tempfile::tempdir().unwrap();
    for (t, name) in [("text", "text.layer.1"), ("image", "vision.deepstack.0")] {
        let bad = with_short_tap("tied", t, name, dir.path());
        for side in ["--src", "--bundle"] {
            let subject = match side {
                "--src" => fixture("tied"),
                _ => common::converted_fixture("tied"),
            };
            let o = run(&verify_args(side, &subject, &[&bad], dir.path(), &[]));
            fails(&o, &[name, "does not fit"]);
        }
    }
}
