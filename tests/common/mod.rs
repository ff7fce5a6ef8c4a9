//! Helpers shared by the end-to-end tests: running the `q3vl` binary, small
//! checkpoints made on the fly, and checks on what a run leaves behind.

#![allow(dead_code)]

pub mod damage;
pub mod self_trace;
pub mod server;

use q3vl_model::layout;
use q3vl_model::Qwen3VlConfig;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The binary under test.
pub fn q3vl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_q3vl"))
}

/// Runs `q3vl ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    q3vl().args(args).output().expect("q3vl runs")
}

/// Runs and asserts success, returning stdout.
pub fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "q3vl {args:?} failed ({:?}):\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Asserts a run failed the way `docs/cli.md` asks for bad input: exit 2, one line on
/// stderr that contains every `needles`, no panic. Returns the line.
pub fn fails(o: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "expected exit 2, stderr:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr:\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
    lines[0].to_string()
}

/// A path as a `&str` for argument lists.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `q3vl convert --src SRC --out OUT EXTRA…` as an argument list.
pub fn convert_args<'a>(src: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["convert", "--src", s(src), "--out", s(out)];
    args.extend_from_slice(extra);
    args
}

/// Runs `q3vl convert --src SRC --out OUT EXTRA…` to completion.
pub fn convert(src: &Path, out: &Path, extra: &[&str]) -> Output {
    run(&convert_args(src, out, extra))
}

/// A fresh mini checkpoint ([`write_checkpoint`] of [`mini_config`]) to damage, and an
/// output folder.
pub fn mini() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("mini");
    write_checkpoint(&src, &mini_config());
    let out = d.path().join("out");
    (d, src, out)
}

/// Asserts `out` holds nothing that looks like a bundle (no folder with a
/// `metadata.json`) and no staging leftovers (lock files, which are never removed,
/// aside).
pub fn no_bundle_left(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        assert!(
            !p.join("metadata.json").exists(),
            "a bundle was left: {}",
            p.display()
        );
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            !name.starts_with(".q3vl-") || is_lock_file(&name),
            "a staging folder was left: {}",
            p.display()
        );
    }
}

/// Whether a folder entry is a q3vl lock file (`.q3vl-lock`, `.q3vl-lock-LEAF`).
pub fn is_lock_file(name: &str) -> bool {
    name == ".q3vl-lock" || name.starts_with(".q3vl-lock-")
}

/// The names in `dir` but lock files, sorted.
pub fn names_but_locks(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !is_lock_file(n))
        .collect();
    v.sort();
    v
}

/// Every file under `dir` with its bytes, by relative path.
pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Copies a folder (files only, one level of sub-folders deep is enough here).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// A scratch folder under cargo's per-target temporary directory, emptied first
/// (kept after the run, so nothing large piles up in /tmp).
pub fn scratch(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.file_stem().unwrap().to_string_lossy().into_owned();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{bin}-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `q3vl synth --size tiny` (real vocab, real tokenizer), made once per test binary;
/// tests copy it before changing anything.
pub fn tiny_source() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("src").join("tiny");
        ok(&["synth", "--size", "tiny", "--out", s(&dir), "--seed", "1"]);
        dir
    })
}

/// The small config of the hand-made checkpoints: tiny's shape with a 512-token vocab.
pub fn mini_config() -> Qwen3VlConfig {
    let mut c = q3vl_convert::synth::tiny_config();
    c.text.vocab_size = 512;
    c
}

/// Deterministic small bf16 values.
fn values(n: usize, salt: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let x = (((i * 7919 + salt * 104_729) % 2001) as f32 - 1000.0) * 2e-5;
            half::bf16::from_f32(x).to_le_bytes()
        })
        .collect()
}

/// Writes a checkpoint of `cfg` in HF layout (bf16, one `model.safetensors`, stub
/// tokenizer files) — fast, for bad-input tests that only need a well-formed source.
pub fn write_checkpoint(dir: &Path, cfg: &Qwen3VlConfig) {
    std::fs::create_dir_all(dir).unwrap();
    let specs = layout::checkpoint_tensors(cfg);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .iter()
        .enumerate()
        .map(|(k, t)| {
            (
                t.name.clone(),
                t.shape.clone(),
                values(t.shape.iter().product(), k),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, sh, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::BF16, sh.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    write_json(&dir.join("config.json"), &cfg.to_hf_json());
    write_json(&dir.join("tokenizer.json"), &stub_tokenizer(cfg));
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({"chat_template": STUB_TEMPLATE}),
    );
}

/// A small chat template of the Qwen shape: enough for convert's test conversation
/// (text and one image) and for `run`.
pub const STUB_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A tiny `tokenizer.json` that the `tokenizers` crate loads: whitespace-separated
/// words, each unknown one `<unk>`, and the chat's special tokens at the ids `cfg`
/// gives them (a stand-in for the 11 MB real one, for tests of bad input).
pub fn stub_tokenizer(cfg: &Qwen3VlConfig) -> serde_json::Value {
    let specials = [
        ("<|im_start|>", 151644),
        ("<|im_end|>", 151645),
        ("<|vision_start|>", cfg.vision_start_token_id),
        ("<|vision_end|>", cfg.vision_end_token_id),
        ("<|image_pad|>", cfg.image_token_id),
        ("<|video_pad|>", cfg.video_token_id),
    ];
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    let mut added = vec![];
    for (tok, id) in specials {
        vocab.insert(tok.into(), id.into());
        added.push(
            serde_json::json!({"id": id, "content": tok, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
        );
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// Writes pretty JSON.
pub fn write_json(p: &Path, v: &serde_json::Value) {
    std::fs::write(p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// One tensor as `rewrite_weights` hands it around: name, dtype, shape, bytes.
pub type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Rewrites `dir/model.safetensors` through `edit`, which sees every tensor and returns
/// what to store instead (nothing to drop it, two to add one).
pub fn rewrite_weights(dir: &Path, mut edit: impl FnMut(Tensor) -> Vec<Tensor>) {
    let p = dir.join("model.safetensors");
    let buf = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
    let mut kept = Vec::new();
    for (name, v) in st.tensors() {
        kept.extend(edit((
            name,
            v.dtype(),
            v.shape().to_vec(),
            v.data().to_vec(),
        )));
    }
    let views: Vec<(String, TensorView)> = kept
        .iter()
        .map(|(n, d, sh, b)| (n.clone(), TensorView::new(*d, sh.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &p).unwrap();
}

/// A committed fixture (`fixtures/<name>`) converted once per test binary in the
/// default mode (int8hu); returns the output folder. Tests that damage a bundle copy
/// it first.
pub fn converted_fixture(name: &str) -> PathBuf {
    use std::sync::Mutex;
    static DONE: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = done.get(name) {
        return p.clone();
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    let out = scratch(&format!("converted-{name}"));
    ok(&["convert", "--src", s(&src), "--out", s(&out)]);
    done.insert(name.to_string(), out.clone());
    out
}

/// Fixture `fx` (`fixtures/<fx>`) converted in `mode`, and verified with `--stamp` on its
/// two traces when `stamp`, once per test binary; returns the output folder. Tests that
/// damage it copy it first.
pub fn converted_mode(fx: &str, mode: &str, stamp: bool) -> PathBuf {
    use std::sync::Mutex;
    static DONE: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let key = format!("{fx}-{mode}-{stamp}");
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = done.get(&key) {
        return p.clone();
    }
    let out = scratch(&format!("bundles-{key}"));
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(fx);
    // `odd`'s o_proj has 48 in-features: an int8 mode keeps it f16 only when asked.
    let fallback: &[&str] = if fx == "odd" && mode != "fp16" {
        &["--fallback-f16"]
    } else {
        &[]
    };
    let args = [
        "convert",
        "--src",
        s(&src),
        "--out",
        s(&out),
        "--mode",
        mode,
    ];
    ok(&[&args[..], fallback].concat());
    if stamp {
        let traces = src.join("traces");
        let (text, image) = (
            traces.join("text.safetensors"),
            traces.join("image.safetensors"),
        );
        let report = out.join(".report");
        let args = [
            "verify",
            "--bundle",
            s(&out),
            "--trace",
            s(&text),
            "--trace",
            s(&image),
        ];
        ok(&[&args[..], &["--stamp", "--report", s(&report)]].concat());
        std::fs::remove_dir_all(&report).unwrap();
    }
    done.insert(key, out.clone());
    out
}

/// The oracle's pinned Python (`make oracle`), or None when it is not installed. `make
/// test-interop` sets Q3VL_REQUIRE_ORACLE=1: there a missing environment fails instead of
/// letting the test skip its Python half.
pub fn oracle_python() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = repo.join("oracle/.venv/bin/python");
    let found = repo.join("oracle/.venv/.q3vl-installed").exists() && py.exists();
    let required = std::env::var_os("Q3VL_REQUIRE_ORACLE").is_some_and(|v| v == "1");
    assert!(
        found || !required,
        "Q3VL_REQUIRE_ORACLE=1 but the oracle environment is not installed"
    );
    found.then_some(py)
}

/// The full-vocabulary random fixture `fixtures/fullvocab/<name>` (random weights with
/// the real tokenizer, made by `q3vl synth` as its README says) converted to int8hu,
/// once per test binary; returns (checkpoint, output folder).
pub fn fullvocab_bundles(name: &str) -> (PathBuf, PathBuf) {
    use std::sync::Mutex;
    static DONE: Mutex<BTreeMap<String, (PathBuf, PathBuf)>> = Mutex::new(BTreeMap::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = done.get(name) {
        return p.clone();
    }
    let fx = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/fullvocab")
        .join(name);
    let ckpt = scratch(&format!("fullvocab-{name}-src"));
    let read = |n: &str| {
        std::fs::read_to_string(fx.join(n))
            .unwrap()
            .trim()
            .to_string()
    };
    let (seed, scale) = (read("SEED"), read("LOGIT_SCALE"));
    let (cfg, pre) = (fx.join("synth.json"), fx.join("preprocessor.json"));
    let args = [
        "--config",
        s(&cfg),
        "--preprocessor",
        s(&pre),
        "--seed",
        &seed,
    ];
    ok(&[
        &["synth"][..],
        &args,
        &["--logit-scale", &scale, "--out", s(&ckpt)],
    ]
    .concat());
    let out = scratch(&format!("fullvocab-{name}-bundles"));
    ok(&["convert", "--src", s(&ckpt), "--out", s(&out)]);
    done.insert(name.to_string(), (ckpt.clone(), out.clone()));
    (ckpt, out)
}

/// The `.q3vl-tmp-*` staging folders in `dir` (none when `dir` is absent).
pub fn staging_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".q3vl-tmp-"))
        })
        .collect()
}

/// Waits (at most a minute) until `path` exists or `child` has exited; returns whether
/// `path` exists.
pub fn wait_for(path: &Path, child: &mut std::process::Child) -> bool {
    for _ in 0..6000 {
        if path.exists() || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    path.exists()
}
