//! `q3vl verify --gguf`: the ladders and gates on a GGUF pair, read as llama.cpp reads
//! it. The round trip (`export gguf`, then `verify --gguf`) gives every number
//! `verify --bundle` gives on the source bundle; damaged GGUFs fail the gate that names
//! the fault; bad files are refused in one line with exit 2 and nothing written.

mod common;

use common::{fails, run, s, scratch};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn traces(fx: &str) -> [PathBuf; 2] {
    let t = repo(&format!("fixtures/{fx}/traces"));
    [t.join("image.safetensors"), t.join("text.safetensors")]
}

/// Fixture `fx` converted (int8hu, stamped) and exported, once per test binary:
/// (bundles, text, mmproj). Tests that damage a file copy it first.
fn exported(fx: &str) -> (PathBuf, PathBuf, PathBuf) {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    static DONE: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let out = common::converted_mode(fx, "int8hu", true);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = done.entry(fx.to_string()).or_insert_with(|| {
        let dir = scratch(&format!("gguf-{fx}"));
        common::ok(&["export", "gguf", "--bundle", s(&out), "--out", s(&dir)]);
        dir
    });
    let text = dir.join(format!("{fx}-Q8_0.gguf"));
    let mmproj = dir.join(format!("mmproj-{fx}-F16.gguf"));
    (out, text, mmproj)
}

/// `q3vl verify ARGS --trace …` with a fresh report folder; (exit code, report.json).
fn verify(args: &[&str], traces: &[PathBuf], name: &str) -> (Option<i32>, Value) {
    let report = scratch(&format!("report-{name}"));
    let mut all: Vec<&str> = args.to_vec();
    for t in traces {
        all.extend(["--trace", s(t)]);
    }
    all.extend(["--report", s(&report)]);
    let o = run(&all);
    let text = std::fs::read_to_string(report.join("report.json")).unwrap_or_else(|_| {
        panic!("no report: {}", String::from_utf8_lossy(&o.stderr));
    });
    (o.status.code(), serde_json::from_str(&text).unwrap())
}

/// Every gate of every trace: (trace file name, gate name) → (verdict, value).
fn gates(report: &Value) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for t in report["traces"].as_array().unwrap() {
        let trace = Path::new(t["trace"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        for g in t["gates"].as_array().unwrap() {
            out.push((
                trace.clone(),
                g["name"].as_str().unwrap().to_string(),
                g["verdict"].as_str().unwrap().to_string(),
                g["value"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

fn failed(report: &Value) -> Vec<String> {
    gates(report)
        .into_iter()
        .filter(|g| g.2 == "FAIL")
        .map(|g| format!("{}:{}", g.0, g.1))
        .collect()
}

#[test]
fn the_round_trip_gives_verify_bundles_numbers() {
    for fx in ["shapes", "tied"] {
        let (out, text, mmproj) = exported(fx);
        let tr = traces(fx);
        let (code, bundle) = verify(&["verify", "--bundle", s(&out)], &tr, &format!("{fx}-b"));
        assert_eq!(code, Some(0), "{fx}: {:?}", failed(&bundle));
        let src = repo(&format!("fixtures/{fx}"));
        let args = ["verify", "--gguf", s(&text), "--mmproj", s(&mmproj)];
        let (code, gguf) = verify(&args, &tr, &format!("{fx}-g"));
        assert_eq!(code, Some(0), "{fx}: {:?}", failed(&gguf));
        assert_eq!(gguf["not_run"][0]["gate"], "gguf.metadata", "{fx}");
        // Every measured number is the bundle run's: the values are the same, only
        // stored as llama.cpp stores them.
        let (b, g) = (
            bundle["traces"].as_array().unwrap(),
            gguf["traces"].as_array().unwrap(),
        );
        assert_eq!(b.len(), g.len());
        for (x, y) in b.iter().zip(g) {
            for key in [
                "rows",
                "local",
                "stats",
                "positions",
                "noise_budget",
                "sweep",
                "decode_tokens",
            ] {
                assert_eq!(x[key], y[key], "{fx} {}: {key}", x["trace"]);
            }
            assert_eq!(y["profile"], "gguf");
            assert_eq!(y["mode"], "q8_0");
        }
        let ours: Vec<_> = gates(&bundle)
            .into_iter()
            .filter(|g| g.1 != "engine.reference")
            .collect();
        assert_eq!(ours, gates(&gguf), "{fx}");
        // With the checkpoint, every metadata gate runs and passes.
        let with_src = [&args[..], &["--src", s(&src)]].concat();
        let (code, checked) = verify(&with_src, &tr, &format!("{fx}-gs"));
        assert_eq!(code, Some(0), "{fx}: {:?}", failed(&checked));
        let names: Vec<String> = gates(&checked)
            .into_iter()
            .map(|g| g.1)
            .filter(|n| n.starts_with("gguf."))
            .collect();
        for want in [
            "gguf.rope_sections",
            "gguf.rope_base",
            "gguf.rms_eps",
            "gguf.shapes",
            "gguf.deepstack",
            "gguf.image_norm",
            "gguf.vision_eps",
            "gguf.tokenizer",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{fx}: {want} missing from {names:?}"
            );
        }
        assert!(checked["not_run"].as_array().unwrap().is_empty());
    }
}

/// Overwrites bytes at `skip` past the end of the first occurrence of `key`.
fn patch(bytes: &mut [u8], key: &str, skip: usize, new: &[u8]) {
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .unwrap_or_else(|| panic!("{key} not in the file"));
    let p = at + key.len() + skip;
    bytes[p..p + new.len()].copy_from_slice(new);
}

/// A copy of `from` at `to` with `edit` applied to its bytes.
fn damaged(from: &Path, to: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(from).unwrap();
    edit(&mut bytes);
    let path = scratch(to);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A damaged text file: its name, the edit, the projector beside it, the metadata
/// gate that names it, and the ladder gates (`trace:gate`) that catch it without one.
type Damage<'a> = (
    &'a str,
    &'a dyn Fn(&mut Vec<u8>),
    &'a Path,
    &'a [&'a str],
    &'a [&'a str],
);

/// Layers 0 and 1's attn_q swapped: the two tensor infos' names traded.
fn swap_attn_q(b: &mut [u8]) {
    let find = |b: &[u8], n: &str| b.windows(n.len()).position(|w| w == n.as_bytes()).unwrap();
    let (i, j) = (
        find(b, "blk.0.attn_q.weight\u{2}"),
        find(b, "blk.1.attn_q.weight\u{2}"),
    );
    b[i + 4] = b'1';
    b[j + 4] = b'0';
}

/// Adds a metadata entry at the head of the key list (the key count raised to match).
fn insert_kv(b: &mut Vec<u8>, key: &str, ty: u32, value: &[u8]) {
    let mut kv = (key.len() as u64).to_le_bytes().to_vec();
    kv.extend(key.as_bytes());
    kv.extend(ty.to_le_bytes());
    kv.extend(value);
    b.splice(24..24, kv);
    let n = u64::from_le_bytes(b[16..24].try_into().unwrap()) + 1;
    b[16..24].copy_from_slice(&n.to_le_bytes());
}

/// A key's value after the u32 type, an array's after its element type and count.
const ARRAY: usize = 4 + 4 + 8;

#[test]
fn damaged_ggufs_fail_the_gate_that_names_the_fault() {
    let (_, text, mmproj) = exported("shapes");
    let src = repo("fixtures/shapes");
    let tr = traces("shapes");
    let sections = |s: [i32; 4]| {
        move |b: &mut Vec<u8>| {
            let v: Vec<u8> = s.iter().flat_map(|x| x.to_le_bytes()).collect();
            patch(b, "qwen3vl.rope.dimension_sections", ARRAY, &v);
        }
    };
    // Every slot to the time axis (plain RoPE: the image's rows and columns unseen).
    let one_axis = sections([16, 0, 0, 0]);
    // Fewer slots for height and width: only the lowest frequencies move, which the
    // fixture's short positions cannot show; the metadata gate names it all the same.
    let tail = sections([8, 4, 4, 0]);
    // DeepStack dropped from both files, consistently, as a converter that lacks it does.
    let no_deepstack =
        |b: &mut Vec<u8>| patch(b, "qwen3vl.n_deepstack_layers", 4, &0u32.to_le_bytes());
    let mmproj_no_deepstack = damaged(&mmproj, "no-deepstack-mmproj.gguf", |b| {
        patch(b, "clip.vision.is_deepstack_layers", ARRAY, &[0; 4]);
    });
    let swapped = |b: &mut Vec<u8>| swap_attn_q(b);
    let cases: [Damage; 4] = [
        (
            "rope-one-axis",
            &one_axis,
            &mmproj,
            &["gguf.rope_sections"],
            &["image.safetensors:text.local"],
        ),
        ("rope-tail", &tail, &mmproj, &["gguf.rope_sections"], &[]),
        (
            "no-deepstack",
            &no_deepstack,
            &mmproj_no_deepstack,
            &["gguf.deepstack"],
            &["image.safetensors:text.ladder"],
        ),
        (
            "swapped-attn-q",
            &swapped,
            &mmproj,
            &[],
            &[
                "text.safetensors:text.local",
                "image.safetensors:text.local",
            ],
        ),
    ];
    for (name, edit, mm, metadata_gate, ladder_gates) in cases {
        let bad = damaged(&text, &format!("{name}.gguf"), |b| edit(b));
        let args = ["verify", "--gguf", s(&bad), "--mmproj", s(mm)];
        // Without the checkpoint the ladder catches what the fixture's inputs can show;
        // with it, the metadata gate names the fault.
        let (code, report) = verify(&args, &tr, &format!("{name}-g"));
        let ladder_sees_it = !ladder_gates.is_empty();
        assert_eq!(
            code,
            Some(ladder_sees_it as i32),
            "{name}: {:?}",
            failed(&report)
        );
        let fails = failed(&report);
        for g in ladder_gates {
            assert!(
                fails.iter().any(|f| f == g),
                "{name}: {g} passed; failed: {fails:?}"
            );
        }
        let (code, report) = verify(
            &[&args[..], &["--src", s(&src)]].concat(),
            &tr,
            &format!("{name}-gs"),
        );
        assert_eq!(code, Some(1), "{name}");
        let fails = failed(&report);
        let gguf_fails: Vec<&String> = fails.iter().filter(|f| f.contains(":gguf.")).collect();
        for g in metadata_gate {
            assert!(
                gguf_fails.iter().any(|f| f.ends_with(g)),
                "{name}: {g} passed; failed: {fails:?}"
            );
        }
        // Only the gate of this fault: no other metadata gate blames something else.
        assert!(
            gguf_fails
                .iter()
                .all(|f| metadata_gate.iter().any(|g| f.ends_with(g))),
            "{name}: {gguf_fails:?}"
        );
    }
    // The swapped pair is named: the first layer whose own update is wrong is layer 0.
    let bad = damaged(&text, "swapped-attn-q.gguf", |b| swapped(b));
    let (_, report) = verify(
        &["verify", "--gguf", s(&bad), "--mmproj", s(&mmproj)],
        &tr[1..],
        "swapped-detail",
    );
    let local = &report["traces"][0]["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "text.local")
        .unwrap()["detail"];
    assert!(
        local.as_str().unwrap().contains("first failing layer 0"),
        "{local}"
    );
}

/// A bad file for `--gguf` (or `--mmproj`): its case name, the text model, the
/// projector, and what the one-line refusal must say.
type Refused = (&'static str, PathBuf, PathBuf, Vec<&'static str>);

/// Every bad-input case of `bad_ggufs_are_refused_in_one_line`, made from the healthy
/// export (`text`, `mmproj`) and another model's projector.
fn refused_cases(text: &Path, mmproj: &Path, tied_mmproj: &Path) -> Vec<Refused> {
    let (text, mmproj) = (text.to_path_buf(), mmproj.to_path_buf());
    let info = |b: &[u8]| {
        let n = "blk.0.attn_q.weight";
        b.windows(n.len()).position(|w| w == n.as_bytes()).unwrap() + n.len()
    };
    vec![
        (
            "other-arch",
            damaged(&text, "llama.gguf", |b| {
                patch(b, "general.architecture", 4 + 8, b"qwen3xx")
            }),
            mmproj.clone(),
            vec!["llama.gguf", "general.architecture", "qwen3xx"],
        ),
        (
            "truncated",
            damaged(&text, "truncated.gguf", |b| b.truncate(b.len() - 100)),
            mmproj.clone(),
            vec!["truncated.gguf", "truncated"],
        ),
        (
            "count",
            // One tensor more than the infos hold: the reader takes bytes past them for a
            // tensor info, and what it finds there (so the fault it names) depends on the
            // header's length, which holds the source's path.
            damaged(&text, "count.gguf", |b| b[8] += 1),
            mmproj.clone(),
            vec!["count.gguf"],
        ),
        (
            "duplicate",
            damaged(&text, "duplicate.gguf", |b| {
                let n = "blk.1.attn_q.weight\u{2}";
                let i = b.windows(n.len()).position(|w| w == n.as_bytes()).unwrap();
                b[i + 4] = b'0';
            }),
            mmproj.clone(),
            vec!["duplicate.gguf", "distinct names"],
        ),
        (
            "misaligned",
            damaged(&text, "misaligned.gguf", |b| {
                let p = info(b) + 4 + 16 + 4;
                b[p] += 1;
            }),
            mmproj.clone(),
            vec!["misaligned.gguf", "blk.0.attn_q.weight", "not aligned"],
        ),
        (
            "type",
            damaged(&text, "type.gguf", |b| {
                let p = info(b) + 4 + 16;
                b[p..p + 4].copy_from_slice(&40u32.to_le_bytes());
            }),
            mmproj.clone(),
            vec!["type.gguf", "type id 40", "unsupported tensor type"],
        ),
        (
            "zero-alignment",
            damaged(&text, "zero-alignment.gguf", |b| {
                insert_kv(b, "general.alignment", 4, &0u32.to_le_bytes())
            }),
            mmproj.clone(),
            vec!["zero-alignment.gguf", "general.alignment"],
        ),
        (
            "duplicate-key",
            damaged(&text, "duplicate-key.gguf", |b| {
                let mut v = 5u64.to_le_bytes().to_vec();
                v.extend(b"other");
                insert_kv(b, "general.type", 8, &v)
            }),
            mmproj.clone(),
            vec!["duplicate-key.gguf", "metadata keys"],
        ),
        (
            "mismatched",
            text.clone(),
            tied_mmproj.to_path_buf(),
            vec!["mmproj-tied-F16.gguf", "does not match"],
        ),
        (
            "not-gguf",
            damaged(&repo("fixtures/shapes/config.json"), "config.gguf", |_| {}),
            mmproj.clone(),
            vec!["config.gguf", "not a readable GGUF"],
        ),
        (
            "mmproj-as-text",
            mmproj.clone(),
            mmproj.clone(),
            vec!["mmproj-shapes-F16.gguf", "general.architecture", "clip"],
        ),
        (
            "missing",
            scratch("absent.gguf"),
            mmproj.clone(),
            vec!["absent.gguf"],
        ),
    ]
}

#[test]
fn bad_ggufs_are_refused_in_one_line() {
    let (_, text, mmproj) = exported("shapes");
    let (_, _, tied_mmproj) = exported("tied");
    let tr = traces("shapes");
    let cases = refused_cases(&text, &mmproj, &tied_mmproj);
    for (name, t, m, needles) in cases {
        let report = scratch(&format!("refused-{name}"));
        let mut args = vec![
            "verify",
            "--gguf",
            s(&t),
            "--mmproj",
            s(&m),
            "--report",
            s(&report),
        ];
        for x in &tr {
            args.extend(["--trace", s(x)]);
        }
        let line = fails(&run(&args), &needles);
        assert!(!report.exists(), "{name}: a report was written ({line})");
    }
    // An image trace needs the projector.
    let o = run(&["verify", "--gguf", s(&text), "--trace", s(&tr[0])]);
    fails(&o, &["image.safetensors", "--mmproj"]);
    // With --prompt, a bad file is found before the reference runs or writes anything.
    let report = scratch("refused-prompt");
    let bad = damaged(&text, "prompt-llama.gguf", |b| {
        patch(b, "general.architecture", 4 + 8, b"qwen3xx")
    });
    let src = repo("fixtures/shapes");
    let o = run(&[
        "verify",
        "--src",
        s(&src),
        "--gguf",
        s(&bad),
        "--mmproj",
        s(&mmproj),
        "--prompt",
        "Hi",
        "--report",
        s(&report),
    ]);
    fails(&o, &["prompt-llama.gguf", "general.architecture"]);
    assert!(!report.exists(), "--prompt wrote before checking its GGUF");
    // A stamp speaks for bundles alone.
    let (out, _, _) = exported("shapes");
    let o = run(&[
        "verify",
        "--bundle",
        s(&out),
        "--gguf",
        s(&text),
        "--stamp",
        "--trace",
        s(&tr[1]),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn the_checkpoint_serves_as_oracle_for_any_prompt() {
    let (out, text, mmproj) = exported("shapes");
    let src = repo("fixtures/shapes");
    let image = repo("fixtures/shapes/traces/demo_0.png");
    let ask = |subject: &[&str], name: &str| {
        let report = scratch(&format!("prompt-{name}"));
        let args = [
            &["verify", "--src", s(&src)][..],
            subject,
            &[
                "--prompt",
                "What colour is the square?",
                "--image",
                s(&image),
            ],
            &["--report", s(&report)],
        ]
        .concat();
        let o = run(&args);
        let json = std::fs::read_to_string(report.join("report.json"))
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stderr)));
        assert!(report.join("oracle/prompt.safetensors").is_file());
        let v: Value = serde_json::from_str(&json).unwrap();
        (o.status.code(), v)
    };
    for (name, subject) in [
        ("bundle", vec!["--bundle", s(&out)]),
        ("gguf", vec!["--gguf", s(&text), "--mmproj", s(&mmproj)]),
    ] {
        let (code, report) = ask(&subject, name);
        assert_eq!(code, Some(0), "{name}: {:?}", failed(&report));
        let t = &report["traces"][0];
        assert_eq!(t["oracle"], "q3vl-reference", "{name}");
        assert_eq!(report["traces"].as_array().unwrap().len(), 1, "{name}");
        assert_eq!(report["not_run"][0]["gate"], "fp32.ladder", "{name}");
        let names: Vec<String> = gates(&report).into_iter().map(|g| g.1).collect();
        assert!(
            names.iter().any(|n| n == "vision.ladder"),
            "{name}: {names:?}"
        );
        assert_eq!(
            names.iter().any(|n| n == "gguf.rope_sections"),
            name == "gguf"
        );
    }
    // The same oracle catches a damaged file.
    let bad = damaged(&text, "prompt-swapped.gguf", |b| swap_attn_q(b));
    let (code, report) = ask(&["--gguf", s(&bad), "--mmproj", s(&mmproj)], "swapped");
    assert_eq!(code, Some(1));
    assert!(
        failed(&report).iter().any(|f| f.ends_with(":text.local")),
        "{:?}",
        failed(&report)
    );
    // Without a subject the reference would be checked against itself.
    let o = run(&[
        "verify",
        "--src",
        s(&src),
        "--prompt",
        "Hi",
        "--report",
        s(&scratch("prompt-none")),
    ]);
    fails(&o, &["--prompt needs --bundle or --gguf"]);
    // --prompt replaces --trace; a bad image is named.
    let ask = [
        "verify",
        "--src",
        s(&src),
        "--bundle",
        s(&out),
        "--prompt",
        "Hi",
    ];
    let o = run(&[&ask[..], &["--trace", s(&traces("shapes")[1])]].concat());
    assert_eq!(o.status.code(), Some(2));
    let config = src.join("config.json");
    let report = scratch("prompt-bad-image");
    let bad_image = ["--image", s(&config), "--report", s(&report)];
    let o = run(&[&ask[..], &bad_image].concat());
    fails(&o, &["config.json"]);
    assert!(!report.exists(), "nothing written for a bad image");
}
