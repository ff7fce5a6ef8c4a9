//! `q3vl synth` + `q3vl convert` + `q3vl inspect` end to end: every mode, byte
//! reproducibility, tied heads, sharding, and every kind of bad input failing with one
//! clear line, exit 2 and nothing left that looks like a bundle.

mod common;

use common::*;
use q3vl_bundle::{Bundle, Bundles, Mode, Scheme};
use q3vl_model::layout::{text_layer, EMBED, LM_HEAD};
use q3vl_model::Checkpoint;
use safetensors::tensor::Dtype;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `q3vl convert --src SRC --out OUT EXTRA…`, asserted to succeed; returns stdout.
fn convert_ok(src: &Path, out: &Path, extra: &[&str]) -> String {
    ok(&convert_args(src, out, extra))
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).expect("one JSON document on stdout")
}

/// tiny, re-synthesized in ~8 MB shards (a sharded source), made once.
fn tiny_sharded() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("sharded").join("tiny-sharded");
        ok(&[
            "synth",
            "--size",
            "tiny",
            "--out",
            s(&dir),
            "--seed",
            "1",
            "--shard-size",
            "8000000",
        ]);
        dir
    })
}

/// Checks that int8 values reproduce the source within half a quantization step.
fn check_int8_close(b: &Bundle, src: &Checkpoint, name: &str, source: &str) {
    let (q, scales, [rows, cols]) = b.q8(name).unwrap_or_else(|| panic!("{name} is int8"));
    assert_eq!(q.len(), rows * cols);
    let w = src.f32(source).unwrap();
    let dq = b.dequantized(name).unwrap();
    for (i, (&x, &y)) in w.iter().zip(&dq).enumerate() {
        let s = scales[(i / cols) * (cols / 32) + (i % cols) / 32].to_f32();
        // absmax: +amax maps to 127.5 and clamps to 127 (half a step, plus the f16
        // rounding of the scale over 127.5 steps).
        assert!(
            (x - y).abs() <= s * 0.57,
            "{name}[{i}]: {x} vs {y} (scale {s})"
        );
    }
}

#[test]
fn every_mode_converts_and_is_byte_reproducible() {
    let src = tiny_source();
    let ck = Checkpoint::open(src).unwrap();
    for mode in Mode::ALL {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let summary = json(&convert_ok(
            src,
            a.path(),
            &["--mode", mode.as_str(), "--json"],
        ));
        convert_ok(src, b.path(), &["--mode", mode.as_str()]);
        assert_eq!(tree(a.path()), tree(b.path()), "{mode}: two runs differ");

        let lang_dir = a.path().join(format!("tiny_decode_{mode}"));
        assert_eq!(summary["language"]["path"], s(&lang_dir));
        assert_eq!(summary["vision"]["path"], s(&a.path().join("tiny_vision")));
        assert!(summary["peak_rss_bytes"].as_u64().unwrap() > 0);
        assert_eq!(summary["tensor_classes"]["text_linear"]["count"], 14);

        let pair = Bundles::open(a.path()).unwrap();
        let (l, v) = (&pair.language, &pair.vision);
        l.verify_checksums().unwrap();
        v.verify_checksums().unwrap();
        assert_eq!(l.metadata().mode, Some(mode));
        assert_eq!(l.config(), &ck_config(src));
        let q = text_layer(1, "self_attn.q_proj.weight");
        match mode {
            Mode::Fp16 => {
                assert!(l.q8(&q).is_none());
                assert_eq!(l.scheme(LM_HEAD), Some(Scheme::F16));
            }
            _ => {
                check_int8_close(l, &ck, &q, &q);
                assert_eq!(l.metadata().schemes["text_linear"], Scheme::Int8Clip);
            }
        }
        if mode == Mode::Int8hu {
            check_int8_close(l, &ck, LM_HEAD, LM_HEAD);
            assert_eq!(l.scheme(LM_HEAD), Some(Scheme::Int8AbsMax));
        }
        // The embedding is the f16 rounding of the source; vectors are exact f32.
        let e = l.dequantized(EMBED).unwrap();
        let se = ck.f32(EMBED).unwrap();
        assert!(e
            .iter()
            .zip(&se)
            .all(|(x, y)| *x == half::f16::from_f32(*y).to_f32()));
        let n = text_layer(0, "input_layernorm.weight");
        assert_eq!(l.dequantized(&n).unwrap(), ck.f32(&n).unwrap());
        assert_eq!(l.head_tensor(), Some(LM_HEAD));
        for f in [
            "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/generation_config.json",
            "config.json",
        ] {
            assert!(l.metadata().files.contains_key(f), "{f}");
        }
        let tok: serde_json::Value = serde_json::from_slice(
            &std::fs::read(lang_dir.join("tokenizer/tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert!(tok["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|vision_start|>"));

        let pre = v.metadata().preprocessing.as_ref().unwrap();
        assert_eq!((pre.fixed_grid.tokens, pre.fixed_grid.patches), (196, 784));
        assert_eq!(v.metadata().schemes["vision"], Scheme::F16);
        assert_eq!(v.metadata().schemes["vision_pos_embed"], Scheme::F32);
        assert!(v.metadata().files.contains_key("preprocessor_config.json"));
        assert_eq!(
            v.metadata().source.files.len(),
            l.metadata().source.files.len()
        );

        let inspect = json(&ok(&["inspect", s(&lang_dir), "--json"]));
        assert_eq!(inspect["checksums_ok"], true);
        let text = ok(&["inspect", s(&a.path().join("tiny_vision"))]);
        assert!(text.contains("all") && text.contains("match"), "{text}");
    }
}

fn ck_config(src: &Path) -> q3vl_model::Qwen3VlConfig {
    q3vl_model::Qwen3VlConfig::from_dir(src).unwrap()
}

#[test]
fn a_second_mode_shares_the_vision_bundle() {
    let out = tempfile::tempdir().unwrap();
    let src = tiny_source();
    convert_ok(src, out.path(), &[]);
    let before = tree(&out.path().join("tiny_vision"));
    let sum = json(&convert_ok(src, out.path(), &["--mode", "fp16", "--json"]));
    assert_eq!(sum["vision"]["kept_existing"], true);
    assert_eq!(tree(&out.path().join("tiny_vision")), before);
    let e = fails(&run(&["inspect", s(out.path())]), &["metadata.json"]);
    assert!(e.contains(s(out.path())), "{e}");
    assert!(
        Bundles::open(out.path()).is_err(),
        "two language bundles: ambiguous"
    );
    let fp = Bundles::open_mode(out.path(), Some(Mode::Fp16)).unwrap();
    assert_eq!(fp.language.metadata().mode, Some(Mode::Fp16));
}

#[test]
fn tied_checkpoints_untie_only_in_int8hu() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = mini_config();
    cfg.tie_word_embeddings = true;
    let src = dir.path().join("mini-tied");
    write_checkpoint(&src, &cfg);
    let ck = Checkpoint::open(&src).unwrap();
    assert!(!ck.contains(LM_HEAD));
    let out = dir.path().join("out");
    convert_ok(&src, &out, &[]);
    let b = Bundles::open_mode(&out, Some(Mode::Int8hu))
        .unwrap()
        .language;
    assert_eq!(b.head_tensor(), Some(LM_HEAD));
    assert_eq!(b.metadata().tensors[LM_HEAD].source.as_deref(), Some(EMBED));
    assert!(b.metadata().head.as_ref().unwrap().tied_in_source);
    check_int8_close(&b, &ck, LM_HEAD, EMBED);
    for mode in ["int8lin", "fp16"] {
        convert_ok(&src, &out, &["--mode", mode]);
        let b = Bundles::open_mode(&out, Mode::parse(mode))
            .unwrap()
            .language;
        assert_eq!(b.head_tensor(), Some(EMBED));
        assert!(b.raw(LM_HEAD).is_err(), "{mode}: no separate head");
    }
}

#[test]
fn sharded_sources_give_sharded_bundles_with_the_same_values() {
    let src = tiny_sharded();
    assert!(src.join("model.safetensors.index.json").exists());
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    convert_ok(src, a.path(), &["--shard-size", "6000000"]);
    convert_ok(tiny_source(), b.path(), &[]);
    let sharded = Bundle::open(&a.path().join("tiny_sharded_decode_int8hu")).unwrap();
    let single = Bundle::open(&b.path().join("tiny_decode_int8hu")).unwrap();
    assert!(sharded
        .metadata()
        .files
        .contains_key("model.safetensors.index.json"));
    let shards = sharded
        .metadata()
        .files
        .keys()
        .filter(|f| f.starts_with("model-0000"))
        .count();
    assert!(shards >= 3, "{shards} shards");
    assert!(single.metadata().files.contains_key("model.safetensors"));
    assert_eq!(sharded.tensor_names(), single.tensor_names());
    for name in sharded.tensor_names() {
        assert_eq!(
            sharded.raw(name).unwrap(),
            single.raw(name).unwrap(),
            "{name}"
        );
    }
}

// ---- bad input -------------------------------------------------------------------

fn fails_cleanly(src: &Path, out: &Path, extra: &[&str], needles: &[&str]) -> String {
    let line = fails(&convert(src, out, extra), needles);
    no_bundle_left(out);
    line
}

#[test]
fn a_missing_shard_is_named() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    copy_dir(tiny_sharded(), &src);
    std::fs::remove_file(src.join("model-00002-of-00004.safetensors")).unwrap();
    fails_cleanly(
        &src,
        &d.path().join("out"),
        &[],
        &["model-00002-of-00004.safetensors"],
    );
}

#[test]
fn a_truncated_shard_is_named() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    copy_dir(tiny_sharded(), &src);
    let p = src.join("model-00003-of-00004.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    fails_cleanly(
        &src,
        &d.path().join("out"),
        &[],
        &["model-00003-of-00004.safetensors", "truncated"],
    );
}

#[test]
fn a_header_length_past_the_end_is_named() {
    let (_d, src, out) = mini();
    let p = src.join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, b).unwrap();
    fails_cleanly(&src, &out, &[], &["model.safetensors", "past the end"]);
}

#[test]
fn a_header_that_is_not_json_is_named() {
    let (_d, src, out) = mini();
    let p = src.join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    b[8] = b'!';
    std::fs::write(&p, b).unwrap();
    fails_cleanly(&src, &out, &[], &["model.safetensors", "not valid JSON"]);
}

#[test]
fn a_missing_tensor_is_named() {
    let (_d, src, out) = mini();
    let gone = text_layer(1, "mlp.up_proj.weight");
    rewrite_weights(&src, |t| if t.0 == gone { vec![] } else { vec![t] });
    fails_cleanly(&src, &out, &[], &[&gone, "missing"]);
}

#[test]
fn a_wrong_shape_is_named() {
    let (_d, src, out) = mini();
    let t = text_layer(0, "self_attn.o_proj.weight");
    rewrite_weights(&src, |(n, d, sh, b)| {
        let sh = if n == t { vec![32, 128] } else { sh };
        vec![(n, d, sh, b)]
    });
    fails_cleanly(
        &src,
        &out,
        &[],
        &[&t, "shape [32, 128]", "expected [64, 64]"],
    );
}

#[test]
fn an_unexpected_dtype_is_named() {
    let (_d, src, out) = mini();
    let t = text_layer(0, "post_attention_layernorm.weight");
    rewrite_weights(&src, |(n, d, sh, b)| {
        let d = if n == t { Dtype::I16 } else { d };
        vec![(n, d, sh, b)]
    });
    fails_cleanly(&src, &out, &[], &[&t, "dtype"]);
}

#[test]
fn a_tensor_outside_the_layout_is_named() {
    let (_d, src, out) = mini();
    rewrite_weights(&src, |t| {
        if t.0 == EMBED {
            let extra = (
                "model.language_model.mtp.weight".to_string(),
                t.1,
                vec![2],
                vec![0; 4],
            );
            vec![t, extra]
        } else {
            vec![t]
        }
    });
    fails_cleanly(
        &src,
        &out,
        &[],
        &[
            "model.language_model.mtp.weight",
            "model.safetensors",
            "not part of",
        ],
    );
}

fn poison(src: &Path, name: &str, index: usize, bits: u16) {
    rewrite_weights(src, |(n, d, sh, mut b)| {
        if n == name {
            b[index * 2..index * 2 + 2].copy_from_slice(&bits.to_le_bytes());
        }
        vec![(n, d, sh, b)]
    });
}

#[test]
fn nan_and_inf_are_located() {
    let (_d, src, out) = mini();
    let t = text_layer(1, "mlp.gate_proj.weight");
    poison(&src, &t, 1234, 0x7fc0);
    fails_cleanly(&src, &out, &[], &[&t, "non-finite", "index 1234"]);
    let (_d, src, out) = mini();
    let t = "model.visual.blocks.1.attn.qkv.weight";
    poison(&src, t, 77, 0xff80);
    fails_cleanly(&src, &out, &[], &[t, "-inf", "index 77"]);
    let (_d, src, out) = mini();
    let t = text_layer(0, "self_attn.k_norm.weight");
    poison(&src, &t, 3, 0x7f80);
    fails_cleanly(&src, &out, &[], &[&t, "inf", "index 3"]);
}

#[test]
fn values_beyond_f16_are_refused() {
    let (_d, src, out) = mini();
    poison(&src, EMBED, 10, half::bf16::from_f32(1e6).to_bits());
    fails_cleanly(&src, &out, &[], &[EMBED, "overflows f16", "index 10"]);
}

#[test]
fn in_features_not_a_multiple_of_32_need_the_fallback() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = mini_config();
    cfg.text.intermediate_size = 100;
    let src = d.path().join("odd");
    write_checkpoint(&src, &cfg);
    let out = d.path().join("out");
    let down = text_layer(0, "mlp.down_proj.weight");
    fails_cleanly(&src, &out, &[], &[&down, "100", "--fallback-f16"]);
    convert_ok(&src, &out, &["--fallback-f16"]);
    let b = Bundles::open(&out).unwrap().language;
    assert_eq!(b.scheme(&down), Some(Scheme::F16));
    assert!(b.metadata().fallbacks[&down].contains("100"));
    assert_eq!(
        b.scheme(&text_layer(0, "mlp.up_proj.weight")),
        Some(Scheme::Int8Clip)
    );
    // fp16 quantizes nothing, so it needs no fallback.
    convert_ok(&src, &out, &["--mode", "fp16"]);
}

#[test]
fn bad_configs_are_named() {
    let (_d, src, out) = mini();
    let mut v = mini_config().to_hf_json();
    v["text_config"]
        .as_object_mut()
        .unwrap()
        .remove("num_hidden_layers");
    write_json(&src.join("config.json"), &v);
    fails_cleanly(
        &src,
        &out,
        &[],
        &["config.json", "text_config.num_hidden_layers"],
    );
    v = mini_config().to_hf_json();
    v["model_type"] = "llava".into();
    write_json(&src.join("config.json"), &v);
    fails_cleanly(&src, &out, &[], &["config.json", "llava"]);
    std::fs::write(src.join("config.json"), "{not json").unwrap();
    fails_cleanly(&src, &out, &[], &["config.json", "not valid JSON"]);
    std::fs::remove_file(src.join("config.json")).unwrap();
    fails_cleanly(&src, &out, &[], &["config.json"]);
}

#[test]
fn a_missing_chat_template_is_named() {
    let (_d, src, out) = mini();
    std::fs::write(src.join("tokenizer_config.json"), "{}").unwrap();
    fails_cleanly(&src, &out, &[], &["tokenizer_config.json", "chat_template"]);
    std::fs::write(src.join("chat_template.jinja"), STUB_TEMPLATE).unwrap();
    convert_ok(&src, &out, &[]);
}

#[test]
fn an_existing_bundle_needs_force() {
    let (_d, src, out) = mini();
    convert_ok(&src, &out, &[]);
    let before = tree(&out);
    let line = fails(
        &convert(&src, &out, &[]),
        &["mini_decode_int8hu", "--force"],
    );
    assert!(line.contains("already exists"), "{line}");
    assert_eq!(tree(&out), before, "the existing bundles are untouched");
    convert_ok(&src, &out, &["--force"]);
    assert_eq!(tree(&out), before, "--force rewrites the same bytes");
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, opts: &str) -> Option<Mount> {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs", s(dir)])
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        st.success().then(|| Mount(dir.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Runs `q3vl convert` with the child's file-size limit at `limit` bytes and SIGXFSZ
/// ignored, so a write past it fails with EFBIG ("File too large"): a full disk for
/// anyone, root or not.
fn convert_with_file_size_limit(src: &Path, out: &Path, limit: u64) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = q3vl();
    cmd.args(convert_args(src, out, &[]));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("q3vl runs")
}

#[test]
fn a_full_disk_mid_way_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("small");
    // A 1 MiB tmpfs where this user may mount one; else a 1 MiB file-size limit.
    let mount = Mount::tmpfs(&out, "size=1m");
    let o = match &mount {
        Some(_) => convert(tiny_source(), &out, &[]),
        None => convert_with_file_size_limit(tiny_source(), &out, 1 << 20),
    };
    let line = fails(&o, &["tiny_decode_int8hu"]);
    assert!(
        line.contains("No space left on device") || line.contains("File too large"),
        "{line}"
    );
    assert!(
        line.contains(".q3vl-tmp-"),
        "names the staging file: {line}"
    );
    no_bundle_left(&out);
}

#[test]
fn a_read_only_output_folder_is_named() {
    let d = tempfile::tempdir().unwrap();
    let (_d2, src, _) = mini();
    let out = d.path().join("ro");
    let mount = Mount::tmpfs(&out, "ro,size=1m");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if mount.is_none() {
        // Root ignores permission bits, so only a read-only mount can refuse root.
        assert!(
            !root,
            "root could not mount a read-only tmpfs at {}",
            out.display()
        );
        std::fs::create_dir_all(&out).unwrap();
        let mut p = std::fs::metadata(&out).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o555);
        std::fs::set_permissions(&out, p).unwrap();
    }
    let line = fails(&convert(&src, &out, &[]), &[s(&out)]);
    assert!(
        line.contains("Read-only file system") || line.contains("Permission denied"),
        "{line}"
    );
    no_bundle_left(&out);
}

#[test]
fn ctrl_c_mid_conversion_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let hold = d.path().join("hold");
    let mut child = q3vl()
        .args(["convert", "--src", s(tiny_source()), "--out", s(&out)])
        .env("Q3VL_TEST_HOLD_FILE", &hold)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..3000 {
        if hold.exists() || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(hold.exists(), "the converter reached its first tensor");
    assert_eq!(staging_dirs(&out).len(), 1, "mid-conversion");
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let o = child.wait_with_output().unwrap();
    fails(&o, &["interrupted"]);
    no_bundle_left(&out);
}

#[test]
fn inspect_reports_damaged_bundles() {
    let (_d, src, out) = mini();
    convert_ok(&src, &out, &[]);
    let b = out.join("mini_decode_int8hu");
    let tok = b.join("tokenizer/tokenizer.json");
    let mut bytes = std::fs::read(&tok).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&tok, &bytes).unwrap();
    let o = run(&["inspect", s(&b)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("tokenizer/tokenizer.json") && err.contains("sha256"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("MISMATCH"));
    bytes.push(b' ');
    std::fs::write(&tok, &bytes).unwrap();
    fails(
        &run(&["inspect", s(&b)]),
        &["tokenizer/tokenizer.json", "size"],
    );
    fails(&run(&["inspect", s(&out)]), &["metadata.json"]);
}
