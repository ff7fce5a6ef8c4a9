//! Hostile input through the binary: every case a hostile tester tried (issue 18 §4)
//! gets one line on stderr naming the file, tensor or option, exit 2, and no hang, no
//! panic and nothing half-written.

mod common;

use common::*;
use q3vl_model::layout::text_layer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

/// `q3vl ARGS`, killed if it has not ended within ten minutes (a hang is the bug some
/// of these cases had; the bound is only there so a regression fails instead of
/// blocking the suite, and is far above any run's duration).
fn run_bounded(args: &[&str]) -> Output {
    run_fed(args, None)
}

/// `q3vl run --bundle OUT --prompt hi EXTRA…`, bounded like [`run_bounded`].
fn ask(out: &Path, extra: &[&str]) -> Output {
    run_bounded(&[&["run", "--bundle", s(out), "--prompt", "hi"], extra].concat())
}

/// [`ask`] for two new tokens.
fn ask_hi(out: &Path) -> Output {
    ask(out, &["--max-new-tokens", "2"])
}

/// [`run_bounded`] with `stdin` written to q3vl's standard input (a pipe) by a thread;
/// `None` gives it no input at all.
fn run_fed(args: &[&str], stdin: Option<Vec<u8>>) -> Output {
    let mut child = q3vl()
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Ignored: q3vl may fail before reading it all, which the caller then sees.
        std::thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut pipe, &data);
        });
    }
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("q3vl {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// `convert --src SRC --out OUT` must fail as bad input naming every needle, and leave
/// no bundle.
fn convert_fails(src: &Path, out: &Path, needles: &[&str]) -> String {
    let o = run_bounded(&convert_args(src, out, &[]));
    let line = fails(&o, needles);
    no_bundle_left(out);
    line
}

/// Edits the mini checkpoint's config.json.
fn edit_config(src: &Path, edit: impl FnOnce(&mut Value)) {
    let p = src.join("config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    write_json(&p, &v);
}

/// A private copy of the converted `shapes` fixture (output folder, language bundle).
fn shapes_copy() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    copy_dir(&converted_fixture("shapes"), &out);
    let lang = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("_decode_"))
        .unwrap();
    (d, out, lang)
}

/// A safetensors file's header and data section.
fn read_st(p: &Path) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let b = std::fs::read(p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    (h.as_object().unwrap().clone(), b[8 + n..].to_vec())
}

/// Writes a safetensors file from a header and data section (header padded to 8).
fn write_st(p: &Path, header: &serde_json::Map<String, Value>, data: &[u8]) {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h);
    b.extend(data);
    std::fs::write(p, b).unwrap();
}

/// The byte range of tensor `name` inside a file's data section.
fn data_range(header: &serde_json::Map<String, Value>, name: &str) -> std::ops::Range<usize> {
    let o = &header[name]["data_offsets"];
    o[0].as_u64().unwrap() as usize..o[1].as_u64().unwrap() as usize
}

#[cfg(unix)]
fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

// ---- 1. config sizes -------------------------------------------------------------

#[test]
fn absurd_config_sizes_are_refused_before_any_work() {
    let (_d, src, out) = mini();
    let cases: [(&str, &str, Value); 6] = [
        ("text_config", "num_hidden_layers", json!(10_000_000_000u64)),
        ("vision_config", "depth", json!(1u64 << 40)),
        ("text_config", "num_attention_heads", json!(0)),
        ("vision_config", "num_heads", json!(0)),
        ("text_config", "num_key_value_heads", json!(0)),
        ("text_config", "vocab_size", json!(1u64 << 40)),
    ];
    for (part, key, val) in cases {
        let saved = std::fs::read(src.join("config.json")).unwrap();
        edit_config(&src, |v| v[part][key] = val);
        convert_fails(&src, &out, &["config.json", &format!("{part}.{key}")]);
        std::fs::write(src.join("config.json"), saved).unwrap();
    }
}

#[test]
fn a_config_naming_more_layers_than_the_checkpoint_holds_names_the_missing_tensor() {
    let (_d, src, out) = mini();
    edit_config(&src, |v| v["text_config"]["num_hidden_layers"] = json!(300));
    let missing = text_layer(2, "");
    convert_fails(&src, &out, &[&missing]);
}

// ---- 2. safetensors tiling -------------------------------------------------------

#[test]
fn overlapping_or_gapped_tensors_are_refused() {
    let (_d, src, out) = mini();
    let p = src.join("model.safetensors");
    let (header, data) = read_st(&p);
    // Two tensors of one size: the second made to share the first's bytes.
    let a = text_layer(0, "input_layernorm.weight");
    let b = text_layer(0, "post_attention_layernorm.weight");
    let mut h = header.clone();
    h[&b]["data_offsets"] = header[&a]["data_offsets"].clone();
    write_st(&p, &h, &data);
    convert_fails(&src, &out, &["model.safetensors", &b, "overlaps"]);
    // A gap: 64 unused bytes before every tensor after `a`.
    let ra = data_range(&header, &a);
    let mut h = header.clone();
    for (_, t) in h.iter_mut().filter(|(n, _)| *n != "__metadata__") {
        let o = &mut t["data_offsets"];
        let (s, e) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
        if s >= ra.end as u64 {
            *o = json!([s + 64, e + 64]);
        }
    }
    let mut gapped = data[..ra.end].to_vec();
    gapped.extend([0u8; 64]);
    gapped.extend(&data[ra.end..]);
    write_st(&p, &h, &gapped);
    convert_fails(
        &src,
        &out,
        &["model.safetensors", "unused bytes before tensor"],
    );
}

// ---- 3. non-finite values ----------------------------------------------------------

#[test]
fn a_negative_rms_norm_eps_is_refused_by_convert_and_run() {
    let (_d, src, out) = mini();
    edit_config(&src, |v| v["text_config"]["rms_norm_eps"] = json!(-1e-6));
    convert_fails(&src, &out, &["config.json", "text_config.rms_norm_eps"]);
    // The same value edited into a bundle (same length, so the size check passes).
    let (_d, out, lang) = shapes_copy();
    let p = lang.join("config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains("\"rms_norm_eps\": 1e-06"));
    std::fs::write(
        &p,
        text.replace("\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": -1e-6"),
    )
    .unwrap();
    let o = ask_hi(&out);
    fails(&o, &["config.json", "rms_norm_eps"]);
}

#[test]
fn a_nan_scale_in_a_bundle_is_refused_at_load() {
    let (_d, out, lang) = shapes_copy();
    let p = lang.join("model.safetensors");
    let (header, mut data) = read_st(&p);
    let name = header
        .keys()
        .find(|n| n.ends_with(".scales"))
        .unwrap()
        .clone();
    let r = data_range(&header, &name);
    data[r.start..r.start + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    write_st(&p, &header, &data);
    let o = ask_hi(&out);
    fails(&o, &[&format!("tensor {name}"), "not a finite number"]);
}

#[test]
fn non_finite_logits_stop_the_engine() {
    let (_d, out, lang) = shapes_copy();
    let p = lang.join("model.safetensors");
    let (header, mut data) = read_st(&p);
    let norm = format!("{}.norm.weight", q3vl_model::layout::TEXT);
    assert_eq!(header[&norm]["dtype"], "F32");
    let r = data_range(&header, &norm);
    data[r.start..r.start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    write_st(&p, &header, &data);
    let o = ask_hi(&out);
    fails(&o, &["logits are not finite", "damaged"]);
}

// ---- 4. context arithmetic ---------------------------------------------------------

#[test]
fn a_huge_max_new_tokens_fails_the_context_check() {
    let out = converted_fixture("shapes");
    let o = ask(
        &out,
        &[
            "--max-new-tokens",
            "18446744073709551615",
            "--context",
            "100",
        ],
    );
    fails(
        &o,
        &["--max-new-tokens 18446744073709551615", "context of 100"],
    );
}

// ---- 5. and 6. options -------------------------------------------------------------

#[test]
fn a_missing_required_option_is_named() {
    let o = run_bounded(&["run", "--prompt", "hi"]);
    let line = fails(&o, &["--bundle"]);
    assert_eq!(line, "error: missing required option --bundle");
    let o = run_bounded(&["convert", "--src", "x"]);
    fails(&o, &["missing required option --out"]);
    let o = run_bounded(&["inspect"]);
    fails(&o, &["missing required argument <BUNDLE_DIR>"]);
}

#[test]
fn every_threads_option_has_the_same_bounds() {
    let out = converted_fixture("shapes");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("x");
    for n in ["0", "100000"] {
        for args in [
            vec!["convert", "--src", s(&src), "--out", s(&dst)],
            vec!["synth", "--size", "tiny", "--out", s(&dst)],
            vec!["run", "--bundle", s(&out), "--prompt", "hi"],
            vec!["bench", "--bundle", s(&out)],
        ] {
            let mut args = args.clone();
            args.extend(["--threads", n]);
            let line = fails(&run_bounded(&args), &["--threads", n]);
            assert!(line.contains("1.."), "{args:?}: {line}");
        }
    }
    assert!(!dst.exists());
}

#[test]
fn bench_options_have_upper_bounds() {
    let out = converted_fixture("shapes");
    let cases: [(&[&str], &[&str]); 9] = [
        (
            &["--decode-tokens", "18446744073709551615"],
            &["--decode-tokens", "1..=1000000"],
        ),
        (
            &["--bandwidth-mib", "100000000"],
            &["--bandwidth-mib", "100000000"],
        ),
        (
            &["--bandwidth-mib", "17592186044416"],
            &["--bandwidth-mib", "17592186044416"],
        ),
        (&["--reps", "101"], &["--reps", "101"]),
        (
            &["--gemm-shape", "1000000x1000000x1000000"],
            &["--gemm-shape", "8 GiB limit"],
        ),
        (
            &["--q8-shape", "4000000000x4000000000x1"],
            &["--q8-shape", "1..=1048576"],
        ),
        (
            &["--q8-shape", "1048576x1048576x1"],
            &["--q8-shape", "8 GiB limit"],
        ),
        (
            &["--gemm-shape", "4096x4096x65536"],
            &["--gemm-shape", "multiply-adds"],
        ),
        // Parses, but the model's context (262144 tokens) cannot hold it.
        (
            &["--decode-tokens", "1000000"],
            &["--decode-tokens 1000000", "context of 262144"],
        ),
    ];
    for (extra, needles) in cases {
        let mut args = vec!["bench", "--bundle", s(&out)];
        args.extend(extra);
        fails(&run_bounded(&args), needles);
        // The kernel shapes are bounded without a bundle too.
        if extra[0].ends_with("-shape") {
            let mut args = vec!["bench", "--kernels-only"];
            args.extend(extra);
            fails(&run_bounded(&args), needles);
        }
    }
}

// ---- 7. special files ----------------------------------------------------------------

#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_not_read() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("fifo");
    mkfifo(&fifo);
    let out = converted_fixture("shapes");
    // An image may come through a pipe, but one with no writer reads as empty at
    // once (it used to hang), and a device is refused, not read for ever.
    for (image, why) in [(s(&fifo), "is empty"), ("/dev/zero", "is a device")] {
        let o = ask(&out, &["--image", image]);
        fails(&o, &["image", image, why]);
    }
    let shapes = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes");
    let o = run_bounded(&["verify", "--src", s(&shapes), "--trace", s(&fifo)]);
    fails(&o, &[s(&fifo), "a FIFO"]);
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        let (_d, src, out) = mini();
        std::fs::remove_file(src.join(file)).unwrap();
        mkfifo(&src.join(file));
        convert_fails(&src, &out, &[file, "a FIFO"]);
    }
}

/// `run` on the shapes fixture asking about `image`, with `stdin` as q3vl's input.
fn ask_about(image: &str, stdin: Option<Vec<u8>>) -> Output {
    let out = converted_fixture("shapes");
    let args = [
        "run",
        "--bundle",
        s(&out),
        "--image",
        image,
        "--prompt",
        "What is in the image?",
        "--max-new-tokens",
        "16",
    ];
    run_fed(&args, stdin)
}

/// The answer of a run that must succeed.
fn answer(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "exit {:?}:\n{err}", o.status.code());
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[cfg(unix)]
#[test]
fn an_image_may_come_through_a_pipe() {
    use std::os::unix::fs::OpenOptionsExt;
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes/images/demo_3.png");
    let png = std::fs::read(&img).unwrap();
    let from_file = answer(&ask_about(s(&img), None));
    assert!(!from_file.trim().is_empty());
    // `--image /dev/stdin` on a pipe (what `<(cat demo.png)` gives as /dev/fd/N).
    assert_eq!(
        answer(&ask_about("/dev/stdin", Some(png.clone()))),
        from_file
    );
    // A named FIFO a thread writes into. A reader of the test's own holds it open
    // first, so the write end opens at once and q3vl finds a writer; it is dropped
    // once q3vl has ended, so the writer cannot wait for ever if q3vl failed.
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("image.png");
    mkfifo(&fifo);
    let keep = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut w, &png));
    let o = ask_about(s(&fifo), None);
    drop(keep);
    let _ = writer.join().unwrap();
    assert_eq!(answer(&o), from_file);
}

// ---- 8. names inside files -------------------------------------------------------------

#[test]
fn index_entries_and_trace_images_stay_in_their_folder() {
    let (d, src, out) = mini();
    let (header, _) = read_st(&src.join("model.safetensors"));
    // Every tensor "in" ../mini/model.safetensors: the very file, reached from outside.
    let map: serde_json::Map<String, Value> = header
        .keys()
        .filter(|n| *n != "__metadata__")
        .map(|n| (n.clone(), json!("../mini/model.safetensors")))
        .collect();
    write_json(
        &src.join("model.safetensors.index.json"),
        &json!({"weight_map": map}),
    );
    convert_fails(
        &src,
        &out,
        &["model.safetensors.index.json", "../mini/model.safetensors"],
    );
    // A trace whose image is outside its folder.
    let trace = d.path().join("trace.safetensors");
    let view =
        safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, vec![1], &[0u8; 4])
            .unwrap();
    let meta = [
        ("format".to_string(), "qwen3vl-oracle-trace/1".to_string()),
        ("image".to_string(), "../../../etc/passwd".to_string()),
    ];
    safetensors::serialize_to_file([("x", view)], Some(meta.into_iter().collect()), &trace)
        .unwrap();
    let shapes = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes");
    let o = run_bounded(&["verify", "--src", s(&shapes), "--trace", s(&trace)]);
    fails(&o, &["trace.safetensors", "../../../etc/passwd"]);
}

// ---- 9. images -----------------------------------------------------------------------

#[test]
fn a_truncated_jpeg_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let img = image::RgbImage::from_fn(96, 64, |x, y| image::Rgb([x as u8 * 2, y as u8 * 3, 40]));
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&img)
        .unwrap();
    let p = d.path().join("cut.jpg");
    std::fs::write(&p, &jpeg[..jpeg.len() * 2 / 3]).unwrap();
    let out = converted_fixture("shapes");
    let o = ask(&out, &["--image", s(&p)]);
    fails(&o, &["cut.jpg", "truncated JPEG"]);
}

// ---- 10. bundle metadata and tokenizer files ------------------------------------------

#[test]
fn a_corrupt_metadata_json_is_reported_as_such() {
    let (_d, out, lang) = shapes_copy();
    std::fs::write(lang.join("metadata.json"), "{\"format\": \"q3vl-bun").unwrap();
    let o = run_bounded(&["run", "--bundle", s(&out), "--prompt", "hi"]);
    let line = fails(&o, &["metadata.json", "not valid JSON"]);
    assert!(!line.contains("holds no language bundle"), "{line}");
}

#[test]
fn an_unusable_tokenizer_or_chat_template_is_refused_by_convert() {
    let (_d, src, out) = mini();
    std::fs::write(src.join("tokenizer.json"), "{\"model\": 42}").unwrap();
    convert_fails(&src, &out, &["tokenizer.json"]);
    let (_d, src, out) = mini();
    write_json(
        &src.join("tokenizer_config.json"),
        &json!({"chat_template": "{% for m in messages %}{{ m.role }"}),
    );
    convert_fails(&src, &out, &["tokenizer_config.json", "chat template"]);
    let (_d, src, out) = mini();
    write_json(
        &src.join("tokenizer_config.json"),
        &json!({"chat_template": "{{ raise_exception('no') }}"}),
    );
    convert_fails(&src, &out, &["tokenizer_config.json", "test conversation"]);
}

// ---- 11. oracle traces ---------------------------------------------------------------

#[test]
fn a_trace_holding_nan_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let odd = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/odd");
    let trace = d.path().join("text.safetensors");
    std::fs::copy(odd.join("traces/text.safetensors"), &trace).unwrap();
    let (header, mut data) = read_st(&trace);
    assert_eq!(header["text.norm"]["dtype"], "F32");
    let r = data_range(&header, "text.norm");
    data[r.start..r.start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    write_st(&trace, &header, &data);
    let report = d.path().join("report");
    let o = run_bounded(&[
        "verify",
        "--src",
        s(&odd),
        "--trace",
        s(&trace),
        "--report",
        s(&report),
    ]);
    fails(&o, &["text.safetensors", "tensor text.norm", "non-finite"]);
}

// ---- 12. bundle names ------------------------------------------------------------------

#[test]
fn bundle_names_never_carry_control_characters() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("Mini \u{7}\u{1b}[31m\nModel");
    write_checkpoint(&src, &mini_config());
    let out = d.path().join("out");
    ok(&["convert", "--src", s(&src), "--out", s(&out)]);
    // The bundles only: convert's own hidden files (its lock) are not named after
    // the source.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".q3vl-"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "mini____31m_model_decode_int8hu",
            "mini____31m_model_vision"
        ]
    );
}

// ---- 13. internal errors ---------------------------------------------------------------

#[test]
fn a_panic_exits_101_on_one_line() {
    let o = q3vl()
        .args(["inspect", "x"])
        .env("Q3VL_TEST_PANIC", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(101), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("a bug in q3vl"), "{err}");
    let help = ok(&["--help"]);
    assert!(
        help.contains("101") && help.contains("Exit codes"),
        "{help}"
    );
}
