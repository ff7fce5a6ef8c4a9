//! `q3vl run` end to end on the committed fixtures: answers, JSON output, thread
//! independence, and every kind of bad input failing with one line and exit 2.

mod common;

use common::{converted_fixture, copy_dir, fails, ok, q3vl, run, s, scratch};
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(p)
}

fn run_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).expect("--json prints one JSON document")
}

/// `run --bundle OUT --image IMG --prompt "What is in the image?" --max-new-tokens N
/// EXTRA…` as an argument list.
fn image_question<'a>(out: &'a Path, img: &'a Path, n: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "run",
        "--bundle",
        s(out),
        "--image",
        s(img),
        "--prompt",
        "What is in the image?",
        "--max-new-tokens",
        n,
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn shapes_answers_what_is_in_the_image() {
    let out = converted_fixture("shapes");
    let answers: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("shapes/images/answers.json")).unwrap(),
    )
    .unwrap();
    // The fixture model answers 99.2% of fresh renders (ACCURACY.md) and every demo
    // image in fp32 HF, so the int8 engine must answer all six.
    let mut right = 0;
    for k in 0..6 {
        let name = format!("demo_{k}.png");
        let img = fixture(&format!("shapes/images/{name}"));
        let text = ok(&image_question(&out, &img, "16", &[]));
        println!("{name}: {:?} (true: {})", text.trim(), answers[&name]);
        if text.trim() == answers[&name].as_str().unwrap() {
            right += 1;
        }
    }
    assert_eq!(right, 6, "only {right}/6 right");
}

#[test]
fn json_output_and_thread_independence() {
    let out = converted_fixture("shapes");
    let img = fixture("shapes/images/demo_2.png");
    let mut docs = Vec::new();
    for threads in ["1", "2"] {
        docs.push(run_json(&image_question(
            &out,
            &img,
            "10",
            &["--ignore-eos", "--json", "--threads", threads],
        )));
    }
    let d = &docs[0];
    assert_eq!(
        d["tokens"].as_array().unwrap().len(),
        10,
        "--ignore-eos gives exactly N tokens"
    );
    assert!(d["prompt_tokens"].as_u64().unwrap() > 196);
    for k in [
        "vision_ms",
        "prefill_ms",
        "decode_ms",
        "prefill_tok_s",
        "decode_tok_s",
    ] {
        assert!(d["timings"][k].is_number(), "timings.{k}");
    }
    // The first token's clock starts with the image encode's and stops at the token,
    // so it covers the encode and the prefill (timed inside it).
    let t = |k: &str| d["timings"][k].as_f64().unwrap();
    assert!(
        t("first_token_ms") >= t("vision_ms") + t("prefill_ms") - 1e-6,
        "{d}"
    );
    assert_eq!(docs[0]["tokens"], docs[1]["tokens"]);
    assert_eq!(docs[0]["text"], docs[1]["text"]);
    // Text-only: the same decoder with no image rows.
    let t = run_json(&[
        "run",
        "--bundle",
        s(&out),
        "--prompt",
        "Which colour comes after blue?",
        "--json",
    ]);
    assert_eq!(t["text"].as_str().unwrap().trim(), "yellow");
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let out = converted_fixture("tied");
    let args = |seed: &'static str| -> Vec<&'static str> {
        vec![
            "run",
            "--prompt",
            "hello",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--json",
            "--temperature",
            "1.5",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ]
    };
    let go = |seed| {
        let mut a = args(seed);
        a.extend(["--bundle", s(&out)]);
        run_json(&a)["tokens"].clone()
    };
    assert_eq!(go("1"), go("1"));
}

/// `q3vl run --bundle OUT --prompt PROMPT EXTRA…`.
fn ask(out: &Path, prompt: &str, extra: &[&str]) -> std::process::Output {
    let mut a = vec!["run", "--bundle", s(out), "--prompt", prompt];
    a.extend_from_slice(extra);
    run(&a)
}

fn bad_image(name: &str, bytes: &[u8], needles: &[&str]) {
    let out = converted_fixture("tied");
    let dir = scratch(&format!("bad-image-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let o = ask(&out, "x", &["--image", s(&p)]);
    fails(&o, needles);
}

/// A PNG chunk with its CRC (for hand-made headers).
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in kind.iter().chain(data) {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    let mut v = (data.len() as u32).to_be_bytes().to_vec();
    v.extend(kind);
    v.extend(data);
    v.extend((!crc).to_be_bytes());
    v
}

#[test]
fn bad_images_fail_cleanly() {
    let out = converted_fixture("tied");
    let missing = scratch("missing").join("nope.png");
    fails(&ask(&out, "x", &["--image", s(&missing)]), &["nope.png"]);
    bad_image(
        "corrupt.png",
        b"\x89PNG\r\n\x1a\n this is not a png body at all",
        &["corrupt.png"],
    );
    let png = std::fs::read(fixture("shapes/images/demo_0.png")).unwrap();
    bad_image("truncated.png", &png[..png.len() / 2], &["truncated.png"]);
    bad_image("notes.txt", b"just some text, not an image", &["notes.txt"]);
    // A folder where a file belongs: labelled as the image, not as a bare I/O error.
    let folder = scratch("image-folder");
    std::fs::create_dir_all(&folder).unwrap();
    fails(
        &ask(&out, "x", &["--image", s(&folder)]),
        &["image ", "image-folder"],
    );
    bad_image(
        "anim.gif",
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
        &["anim.gif"],
    );
    // A valid header claiming 100000 × 100000 pixels: refused before any allocation.
    let mut huge = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = 100_000u32.to_be_bytes().to_vec();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    huge.extend(chunk(b"IHDR", &ihdr));
    huge.extend(chunk(b"IEND", &[]));
    bad_image("huge.png", &huge, &["huge.png"]);
}

#[test]
fn sampling_options_out_of_range_name_the_option() {
    let out = converted_fixture("tied");
    // Negative values reach the range check (not clap's "unexpected argument").
    for (opt, value) in [
        ("--temperature", "-1"),
        ("--temperature", "inf"),
        ("--top-p", "-0.5"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
    ] {
        let o = ask(&out, "x", &[opt, value]);
        let line = fails(&o, &[opt]);
        assert!(line.contains("must be"), "{opt} {value}: {line}");
    }
    // Zero threads is refused by the same parser as bench's counts.
    fails(&ask(&out, "x", &["--threads", "0"]), &["--threads"]);
}

#[test]
fn zero_new_tokens_runs_nothing_and_says_so() {
    let out = converted_fixture("tied");
    let o = ask(&out, "x", &["--max-new-tokens", "0"]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("0 generated"), "{err}");
    assert!(
        !err.contains("tok/s"),
        "no rates for a run that did nothing: {err}"
    );
}

#[test]
fn a_prompt_longer_than_the_context_fails() {
    let out = converted_fixture("tied");
    let o = ask(&out, "a long enough prompt", &["--context", "8"]);
    fails(&o, &["context"]);
}

#[test]
fn mismatched_vision_bundle_fails() {
    let shapes = converted_fixture("shapes");
    let tied = converted_fixture("tied");
    let out = scratch("mismatch");
    copy_dir(&shapes, &out);
    // Swap in the tied fixture's vision bundle (out_hidden_size 96 ≠ hidden 64).
    let vis = out.join("shapes_vision");
    std::fs::remove_dir_all(&vis).unwrap();
    copy_dir(&tied.join("tied_vision"), &vis);
    // The pair check sees the vision bundle is not the one converted with this one.
    fails(&ask(&out, "x", &[]), &["shapes_vision"]);
    // Recorded as its companion (a converter that paired the wrong tower), the engine
    // still refuses it by shape.
    use sha2::{Digest, Sha256};
    let vis_meta = std::fs::read(vis.join("metadata.json")).unwrap();
    let lang_meta = out.join("shapes_decode_int8hu/metadata.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&lang_meta).unwrap()).unwrap();
    m["companion_sha256"] = hex::encode(Sha256::digest(&vis_meta)).into();
    std::fs::write(&lang_meta, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    fails(&ask(&out, "x", &[]), &["out_hidden_size", "shapes_vision"]);
}

#[test]
fn damaged_bundle_fails_the_checksum_check() {
    let tied = converted_fixture("tied");
    let out = scratch("damaged");
    copy_dir(&tied, &out);
    let lang = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains("_decode_")
        })
        .unwrap();
    let weights = lang.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&weights, &bytes).unwrap();
    let o = ask(&out, "x", &["--verify-checksums", "--max-new-tokens", "1"]);
    fails(&o, &["model.safetensors"]);
    // A truncated file is caught at open even without --verify-checksums.
    std::fs::write(&weights, &bytes[..n - 100]).unwrap();
    fails(&ask(&out, "x", &[]), &["model.safetensors"]);
}

#[test]
fn require_verified_refuses_an_unstamped_bundle() {
    let out = converted_fixture("tied");
    let o = ask(&out, "x", &["--require-verified"]);
    fails(&o, &["not verified"]);
    let o = ask(&out, "x", &["--max-new-tokens", "2"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not verified"));
}

/// `q3vl bench` on the fixture bundle, with tiny kernel shapes: every figure is
/// present and positive, repetitions are counted, and the bound uses the better of the
/// two bandwidth passes.
#[test]
fn bench_reports_every_figure_and_its_bound() {
    const EMBED: &str = "model.language_model.embed_tokens.weight";
    let out = converted_fixture("shapes");
    let doc = run_json(&[
        "bench",
        "--bundle",
        s(&out),
        "--json",
        "--reps",
        "2",
        "--decode-tokens",
        "3",
        "--bandwidth-mib",
        "16",
        "--q8-shape",
        "64x64x4",
        "--gemm-shape",
        "8x32x16",
    ]);
    let f = |k: &str| {
        doc[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing: {doc}"))
    };
    assert_eq!(doc["reps"], 2);
    assert_eq!(doc["decode_steps"], 3);
    for k in [
        "vision_ms",
        "prefill_tok_s",
        "decode_tok_s",
        "decode_bound_tok_s",
        "decode_bytes_per_token",
        "peak_rss_bytes",
    ] {
        assert!(f(k) > 0.0, "{k} = {}", f(k));
    }
    for k in ["vision_ms_sd", "prefill_tok_s_sd", "decode_tok_s_sd"] {
        assert!(f(k) >= 0.0, "{k} = {}", f(k));
    }
    let best = f("bandwidth_before_gb_s").max(f("bandwidth_after_gb_s"));
    assert_eq!(f("bandwidth_gb_s"), best);
    // The bound is the fastest reader's; every reader was timed.
    let readers = doc["bandwidth_by_reader_gb_s"].as_object().unwrap();
    assert!(readers.contains_key("plain"), "{doc}");
    let fastest = readers
        .values()
        .map(|v| v.as_f64().unwrap())
        .fold(0.0, f64::max);
    assert_eq!(fastest, best);
    bench_reports_the_machine(&doc);
    bench_reports_the_compute_figures(&doc);
    let bound = f("bandwidth_gb_s") * 1e9 / f("decode_bytes_per_token");
    assert!((f("decode_bound_tok_s") / bound - 1.0).abs() < 1e-9);
    assert!((f("decode_fraction_of_bound") * bound / f("decode_tok_s") - 1.0).abs() < 1e-9);
    assert!(doc["image_tokens"].as_u64().unwrap() > 0);
    assert!(f("weights_read_gb_s") > 0.0 && f("decode_sweep_gb_s") > 0.0);
    // The language bundle's maps are resident after the warm-up, and a fraction of them
    // (none, on a fixture far under 2 MiB per tensor) is on 2 MiB pages.
    assert!(doc["weights_resident_bytes"].as_u64().unwrap() > 0);
    let huge = f("weights_huge_page_fraction");
    assert!((0.0..=1.0).contains(&huge), "{huge}");
    // The untimed warm-up pages in every tensor of both bundles but the token
    // embedding, which has a separate head here: the sum of the safetensors headers'
    // tensor extents.
    let mut data = 0u64;
    for bundle in std::fs::read_dir(&out).unwrap() {
        let bundle = bundle.unwrap().path();
        if !bundle.is_dir() {
            continue; // the folder's lock file
        }
        for f in std::fs::read_dir(bundle).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "safetensors") {
                let bytes = std::fs::read(&p).unwrap();
                let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
                let tensors = header.as_object().unwrap();
                assert!(!tensors.contains_key(EMBED) || tensors.contains_key("lm_head.weight"));
                for (name, t) in tensors {
                    if name != "__metadata__" && name != EMBED {
                        let o = &t["data_offsets"];
                        data += o[1].as_u64().unwrap() - o[0].as_u64().unwrap();
                    }
                }
            }
        }
    }
    assert!(data > 0);
    assert_eq!(doc["warmup_bytes"].as_u64(), Some(data));
    assert!(f("warmup_ms") >= 0.0);
    // The stamp check's cost is measured over every byte of both bundles.
    let every_byte: usize = common::tree(&out)
        .iter()
        .filter(|(rel, _)| !rel.ends_with("verification.json"))
        .map(|(_, b)| b.len())
        .sum();
    assert_eq!(doc["stamp_check_bytes"].as_u64(), Some(every_byte as u64));
    assert!(f("stamp_check_ms") >= 0.0);
}

#[test]
fn bench_rejects_zero_repetitions() {
    let out = converted_fixture("shapes");
    let line = fails(
        &run(&["bench", "--bundle", s(&out), "--reps", "0"]),
        &["--reps"],
    );
    assert!(!line.contains('\n'), "{line}");
    // Zero of these would make a figure 0/0 or time an empty bandwidth buffer (a tiny
    // bound that flatters decode): each is refused, naming the option, in both modes.
    for opt in ["--decode-tokens", "--bandwidth-mib", "--threads"] {
        fails(&run(&["bench", "--bundle", s(&out), opt, "0"]), &[opt]);
    }
    fails(
        &run(&["bench", "--kernels-only", "--threads", "0"]),
        &["--threads"],
    );
}

/// The machine of `q3vl bench --json`: the CPU, its features, the decode prefetch
/// and the decode sweep with each prefetch.
fn bench_reports_the_machine(doc: &serde_json::Value) {
    let cpu = &doc["cpu"];
    let features = cpu["features"].as_array().unwrap();
    if cfg!(target_arch = "x86_64") {
        assert!(!cpu["vendor"].as_str().unwrap().is_empty(), "{cpu}");
        assert!(cpu["family"].as_u64().unwrap() > 0, "{cpu}");
        assert!(cpu["model"].is_u64() && cpu["stepping"].is_u64(), "{cpu}");
        // The path that ran is one the listed extensions allow.
        let has = |f: &str| features.iter().any(|x| x == f);
        match doc["kernel_path"].as_str().unwrap() {
            "avx512vnni" => assert!(has("avx512vnni") && has("avx2"), "{doc}"),
            "avx2" => assert!(has("avx2") && has("fma") && has("f16c"), "{doc}"),
            p => assert_eq!(p, "portable"),
        }
    }
    let prefetch = doc["decode_prefetch"].as_str().unwrap();
    let sweeps = doc["decode_sweep_by_prefetch_gb_s"].as_object().unwrap();
    if cfg!(target_arch = "x86_64") {
        assert!(["l2", "nta"].contains(&prefetch), "{prefetch}");
        assert_eq!(sweeps.len(), 2, "{doc}");
        assert_eq!(sweeps[prefetch], doc["decode_sweep_gb_s"]);
    } else {
        assert_eq!(prefetch, "none");
    }
}

/// The compute figures of `q3vl bench --json`: the time to the first token, the
/// prefill's and the vision encode's arithmetic and their share of the instruction
/// peaks measured in the same run.
fn bench_reports_the_compute_figures(doc: &serde_json::Value) {
    let f = |k: &str| {
        doc[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing: {doc}"))
    };
    // Vision, then prefill, then the first token: the time to it covers both.
    assert!(
        f("ttft_ms") >= f("vision_ms") + f("prefill_ms") - 1e-6,
        "{doc}"
    );
    assert!(f("ttft_ms_sd") >= 0.0);
    assert!(f("prefill_ops") > 0.0 && f("vision_ops") > 0.0);
    let rate = f("prefill_ops") / (f("prefill_ms") * 1e-3) / 1e9;
    assert!((f("prefill_g_per_s") / rate - 1.0).abs() < 1e-9);
    let peaks = doc["peaks"].as_object().unwrap();
    match peaks.get("int16_dot") {
        Some(p) => {
            let peak = p["g_per_s"].as_f64().unwrap();
            assert!(peak > 0.0 && p["form"].is_string(), "{p}");
            let share = f("prefill_fraction_of_peak");
            assert!((share * peak / f("prefill_g_per_s") - 1.0).abs() < 1e-9);
            let fma = peaks["f32_fma"]["g_per_s"].as_f64().unwrap();
            let vshare = f("vision_fraction_of_peak");
            assert!((vshare * fma / f("vision_g_per_s") - 1.0).abs() < 1e-9);
        }
        // No SIMD path: no peak, and no share of one.
        None => {
            assert_eq!(doc["kernel_path"], "portable");
            assert!(doc["prefill_fraction_of_peak"].is_null());
        }
    }
}

/// `q3vl ARGS` with `var=value` in its environment.
fn run_with_env<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    var: &str,
    value: &str,
) -> std::process::Output {
    q3vl().args(args).env(var, value).output().unwrap()
}

/// [`run_with_env`]'s JSON document; the run must succeed.
fn json_with_env<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    var: &str,
    value: &str,
) -> serde_json::Value {
    let o = run_with_env(args, var, value);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{var}={value}: {err}");
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `Q3VL_DECODE_PREFETCH` forces the decode prefetch (the same tokens: the bits do
/// not depend on it; `bench` reports the one forced); a value that names none is one
/// line naming the variable, exit 2.
#[test]
fn the_decode_prefetch_can_be_forced() {
    let out = converted_fixture("shapes");
    let args = [
        "run",
        "--bundle",
        s(&out),
        "--prompt",
        "Which colour comes after blue?",
        "--json",
    ];
    const VAR: &str = "Q3VL_DECODE_PREFETCH";
    let json_with = |args: &[&str], pf: &str| json_with_env(args, VAR, pf);
    let best = run_json(&args);
    for pf in ["l2", "NTA"] {
        assert_eq!(json_with(&args, pf)["tokens"], best["tokens"], "{pf}");
    }
    let kernels = [
        "bench",
        "--kernels-only",
        "--json",
        "--q8-shape",
        "64x64x4",
        "--gemm-shape",
        "8x32x16",
    ];
    for (pf, want) in [("nta", "nta"), ("L2", "l2")] {
        let want = if cfg!(target_arch = "x86_64") {
            want
        } else {
            "none"
        };
        assert_eq!(json_with(&kernels, pf)["decode_prefetch"], want, "{pf}");
    }
    fails(&run_with_env(&args, VAR, "t0"), &[VAR, "t0", "l2 or nta"]);
}

/// `Q3VL_KERNEL_PATH` runs every kernel on a lower path: on each path this CPU has,
/// the engine gives the same tokens (the int8 kernels give the same bits on every
/// path; the f32 ones agree to rounding) and reports the path; a path the CPU lacks,
/// or no path at all, is one line naming the variable, exit 2.
#[test]
fn every_kernel_path_gives_the_same_tokens() {
    let out = converted_fixture("shapes");
    let img = fixture("shapes/images/demo_4.png");
    let args = image_question(&out, &img, "8", &["--ignore-eos", "--json"]);
    let with_path = |p: &str| json_with_env(&args, "Q3VL_KERNEL_PATH", p);
    let best = run_json(&args);
    let best_path = best["timings"]["kernel_path"].as_str().unwrap().to_owned();
    let mut paths = vec!["portable"];
    if cfg!(target_arch = "x86_64") && best_path != "portable" {
        paths.push("avx2");
    }
    for p in paths {
        let d = with_path(p);
        assert_eq!(d["timings"]["kernel_path"], p);
        assert_eq!(d["tokens"], best["tokens"], "{p} vs {best_path}");
    }
    let bogus = run_with_env(&args, "Q3VL_KERNEL_PATH", "sse9");
    fails(&bogus, &["Q3VL_KERNEL_PATH", "sse9", "portable"]);
    let foreign = if cfg!(target_arch = "x86_64") {
        "neon"
    } else {
        "avx2"
    };
    let o = run_with_env(&args, "Q3VL_KERNEL_PATH", foreign);
    fails(&o, &["Q3VL_KERNEL_PATH", foreign]);
}
