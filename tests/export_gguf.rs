//! `q3vl export gguf`: the two GGUF files carry every value of the bundles under
//! llama.cpp's names, read back here by candle's GGUF reader (not the writer's code):
//! every Q8_0 tensor dequantizes to the bundle's dequantized weight bit for bit, every
//! other tensor is the bundle's bytes, and the keys hold what llama.cpp's converter
//! writes for Qwen3-VL, with the types its loaders check.

mod common;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use common::{fails, run, s, scratch};
use q3vl_bundle::{Bundle, Bundles, Scheme};
use q3vl_model::layout;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn bundles(fx: &str, mode: &str, stamp: bool) -> PathBuf {
    common::converted_mode(fx, mode, stamp)
}

fn export(bundle: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    run(&[
        &["export", "gguf", "--bundle", s(bundle), "--out", s(out)][..],
        extra,
    ]
    .concat())
}

fn read(path: &Path) -> (Content, std::fs::File) {
    let mut f = std::fs::File::open(path).unwrap();
    let c = Content::read(&mut f).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (c, f)
}

/// The bundle's values of a tensor as f32 (dequantized exactly for int8).
fn bundle_values(b: &Bundle, name: &str) -> Vec<f32> {
    b.dequantized(name).unwrap()
}

/// A GGUF tensor's values as candle dequantizes them.
fn values(c: &Content, f: &mut std::fs::File, name: &str) -> Vec<f32> {
    let q = c.tensor(f, name, &Device::Cpu).unwrap();
    let t = q.dequantize(&Device::Cpu).unwrap();
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Every difference between a GGUF file's tensors and the bundle values they stand for
/// (`want`: GGUF name → (bundle, HF name, expected ggml type)).
fn faults(path: &Path, want: &[(String, &Bundle, String, GgmlDType)]) -> Vec<String> {
    let (c, mut f) = read(path);
    let mut faults = Vec::new();
    for (name, b, hf, ty) in want {
        let Some(info) = c.tensor_infos.get(name) else {
            faults.push(format!("{name}: missing"));
            continue;
        };
        if info.ggml_dtype != *ty {
            faults.push(format!("{name}: {:?}, want {ty:?}", info.ggml_dtype));
            continue;
        }
        let got = values(&c, &mut f, name);
        let expect = bundle_values(b, hf);
        if got
            .iter()
            .map(|x| x.to_bits())
            .ne(expect.iter().map(|x| x.to_bits()))
        {
            faults.push(format!("{name}: other values than {hf}"));
        }
    }
    if c.tensor_infos.len() != want.len() {
        faults.push(format!(
            "{} tensors, want {}",
            c.tensor_infos.len(),
            want.len()
        ));
    }
    faults
}

/// What the text file should hold, by llama.cpp's names.
fn text_tensors(pair: &Bundles) -> Vec<(String, &Bundle, String, GgmlDType)> {
    let b = &pair.language;
    let ty = |hf: &str| match b.scheme(hf) {
        Some(Scheme::Int8Clip | Scheme::Int8AbsMax) => GgmlDType::Q8_0,
        Some(Scheme::F16) => GgmlDType::F16,
        _ => GgmlDType::F32,
    };
    let mut want = Vec::new();
    let mut add = |name: String, hf: String| want.push((name, b, hf.clone(), ty(&hf)));
    add("token_embd.weight".into(), layout::EMBED.into());
    add(
        "output_norm.weight".into(),
        format!("{}.norm.weight", layout::TEXT),
    );
    if b.metadata().tensors.contains_key(layout::LM_HEAD) {
        add("output.weight".into(), layout::LM_HEAD.into());
    }
    let leaves = [
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    for i in 0..b.config().text.num_hidden_layers {
        for (hf, name) in leaves {
            add(
                format!("blk.{i}.{name}.weight"),
                layout::text_layer(i, &format!("{hf}.weight")),
            );
        }
    }
    want
}

fn metadata(c: &Content) -> BTreeMap<String, String> {
    c.metadata
        .iter()
        .map(|(k, v)| (k.clone(), format!("{v:?}")))
        .collect()
}

#[test]
fn the_text_gguf_carries_the_bundles_values_under_llama_cpp_names() {
    for (fx, mode, stamp) in [
        ("tied", "int8hu", true),
        ("shapes", "int8hu", false),
        ("tied", "int8lin", false),
        ("tied", "fp16", false),
    ] {
        let out = bundles(fx, mode, stamp);
        let dir = scratch(&format!("gguf-{fx}-{mode}"));
        let extra: &[&str] = if stamp { &[] } else { &["--allow-unverified"] };
        let o = export(&out, &dir, extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let pair = Bundles::open(&out).unwrap();
        let suffix = if mode == "fp16" { "F16" } else { "Q8_0" };
        let model = dir.join(format!("{fx}-{suffix}.gguf"));
        assert_eq!(
            faults(&model, &text_tensors(&pair)),
            Vec::<String>::new(),
            "{fx} {mode}"
        );

        let (c, _) = read(&model);
        let m = metadata(&c);
        let cfg = pair.language.config();
        assert_eq!(m["general.architecture"], "String(\"qwen3vl\")");
        assert_eq!(
            m["qwen3vl.block_count"],
            format!("U32({})", cfg.text.num_hidden_layers)
        );
        assert_eq!(
            m["qwen3vl.attention.key_length"],
            format!("U32({})", cfg.text.head_dim)
        );
        let [a, b, d] = cfg.text.mrope_section;
        assert_eq!(
            m["qwen3vl.rope.dimension_sections"],
            format!("Array([I32({a}), I32({b}), I32({d}), I32(0)])")
        );
        assert_eq!(
            m["qwen3vl.n_deepstack_layers"],
            format!("U32({})", cfg.vision.deepstack_visual_indexes.len())
        );
        let file_type = if mode == "fp16" { "U32(1)" } else { "U32(7)" };
        assert_eq!(m["general.file_type"], file_type);
        assert_eq!(m["tokenizer.ggml.model"], "String(\"gpt2\")");
        assert_eq!(m["tokenizer.ggml.pre"], "String(\"qwen2\")");
        let Value::Array(tokens) = &c.metadata["tokenizer.ggml.tokens"] else {
            panic!("tokens")
        };
        assert_eq!(tokens.len(), cfg.text.vocab_size);
        assert!(
            m.contains_key("tokenizer.chat_template")
                && m.contains_key("tokenizer.ggml.eos_token_id")
        );
        let Value::String(prov) = &c.metadata["q3vl.provenance"] else {
            panic!("provenance")
        };
        let prov: serde_json::Value = serde_json::from_str(prov).unwrap();
        assert_eq!(prov["verification"].is_null(), !stamp);
    }
}

#[test]
fn the_mmproj_gguf_carries_the_vision_bundle() {
    let out = bundles("tied", "int8hu", false);
    let dir = scratch("gguf-mmproj");
    assert!(export(&out, &dir, &["--allow-unverified"]).status.success());
    let pair = Bundles::open(&out).unwrap();
    let v = &pair.vision;
    let cfg = v.config().clone();
    let (c, mut f) = read(&dir.join("mmproj-tied-F16.gguf"));
    let m = metadata(&c);
    assert_eq!(m["general.architecture"], "String(\"clip\")");
    assert_eq!(m["clip.projector_type"], "String(\"qwen3vl_merger\")");
    assert_eq!(m["clip.has_vision_encoder"], "Bool(true)");
    assert_eq!(
        m["clip.vision.projection_dim"],
        format!("U32({})", cfg.vision.out_hidden_size)
    );
    // Every key with the type clip.cpp's getters assert (a wrong one aborts it).
    let types = [
        (
            "U32",
            &[
                "general.file_type",
                "clip.vision.image_size",
                "clip.vision.patch_size",
                "clip.vision.embedding_length",
                "clip.vision.feed_forward_length",
                "clip.vision.block_count",
                "clip.vision.attention.head_count",
                "clip.vision.spatial_merge_size",
                "general.quantization_version",
            ][..],
        ),
        ("F32", &["clip.vision.attention.layer_norm_epsilon"][..]),
        ("Bool", &["clip.use_gelu", "clip.has_vision_encoder"][..]),
        (
            "Array([F32",
            &["clip.vision.image_mean", "clip.vision.image_std"][..],
        ),
        ("Array([Bool", &["clip.vision.is_deepstack_layers"][..]),
    ];
    for (ty, keys) in types {
        for k in keys {
            assert!(m[*k].starts_with(ty), "{k}: {}", m[*k]);
        }
    }
    // Every vision tensor but the Conv3d is the bundle's bytes; the Conv3d is its two halves.
    let patch = v
        .dequantized(&layout::visual("patch_embed.proj.weight"))
        .unwrap();
    let frame = cfg.vision.patch_size * cfg.vision.patch_size;
    for (k, name) in ["v.patch_embd.weight", "v.patch_embd.weight.1"]
        .iter()
        .enumerate()
    {
        let got = values(&c, &mut f, name);
        let want: Vec<f32> = patch
            .chunks(2 * frame)
            .flat_map(|two| two[k * frame..(k + 1) * frame].to_vec())
            .collect();
        assert_eq!(got, want, "{name}");
    }
    let mut want = vec![(
        "v.patch_embd.bias".to_string(),
        layout::visual("patch_embed.proj.bias"),
    )];
    want.push((
        "v.position_embd.weight".into(),
        layout::visual("pos_embed.weight"),
    ));
    for (k, &l) in cfg.vision.deepstack_visual_indexes.iter().enumerate() {
        want.push((
            format!("v.deepstack.{l}.fc2.weight"),
            layout::deepstack(k, "linear_fc2.weight"),
        ));
    }
    want.push((
        "mm.0.weight".into(),
        layout::visual("merger.linear_fc1.weight"),
    ));
    want.push((
        "v.blk.1.attn_qkv.weight".into(),
        layout::vision_block(1, "attn.qkv.weight"),
    ));
    for (name, hf) in want {
        let got = values(&c, &mut f, &name);
        assert_eq!(got, v.dequantized(&hf).unwrap(), "{name}");
    }
    let expected =
        2 + 2 + 12 * cfg.vision.depth + 6 + 6 * cfg.vision.deepstack_visual_indexes.len();
    assert_eq!(c.tensor_infos.len(), expected);
}

#[test]
fn gguf_exports_are_deterministic_and_refuse_bad_input() {
    let out = bundles("tied", "int8hu", false);
    let (a, b) = (scratch("gguf-det-a"), scratch("gguf-det-b"));
    for d in [&a, &b] {
        assert!(export(&out, d, &["--allow-unverified"]).status.success());
    }
    assert_eq!(common::tree(&a), common::tree(&b));
    let dest = scratch("gguf-bad").join("x");
    fails(
        &export(&out, &dest, &[]),
        &["no verification stamp", "--allow-unverified"],
    );
    fails(
        &export(&out, &a, &["--allow-unverified"]),
        &["exists", "--force"],
    );
    let ct = scratch("gguf-not-ct");
    assert!(run(&[
        "export",
        "compressed-tensors",
        "--bundle",
        s(&out),
        "--out",
        s(&ct),
        "--allow-unverified"
    ])
    .status
    .success());
    fails(
        &export(&out, &ct, &["--allow-unverified", "--force"]),
        &["not a q3vl gguf export"],
    );
    assert!(!dest.exists());
}

/// Swaps the data of two tensors of the same size in a GGUF file.
fn swap_tensors(path: &Path, a: &str, b: &str) {
    let (c, _) = read(path);
    let span = |n: &str| {
        let t = &c.tensor_infos[n];
        let start = (c.tensor_data_offset + t.offset) as usize;
        let len = t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
        start..start + len
    };
    let (ra, rb) = (span(a), span(b));
    assert_eq!(ra.len(), rb.len());
    let mut bytes = std::fs::read(path).unwrap();
    let tmp = bytes[ra.clone()].to_vec();
    bytes.copy_within(rb.clone(), ra.start);
    bytes[rb].copy_from_slice(&tmp);
    std::fs::write(path, bytes).unwrap();
}

/// llama.cpp as `make llama-cpp` builds it: the venv's python, the sdist holding the
/// `llama_cpp` bindings, the folder of the shared libraries.
struct Peer {
    py: PathBuf,
    lsrc: PathBuf,
    lib: PathBuf,
}

/// The built peer, or None. `make test-interop` sets Q3VL_REQUIRE_LLAMA=1, so there a
/// missing build fails.
fn llama_cpp() -> Option<Peer> {
    let peer = std::env::var_os("Q3VL_PEER_DIR").map_or("/tmp/q3vl-peer".into(), PathBuf::from);
    let lsrc = peer.join("llama-cpp-python-0.3.36");
    // The build scripts/llama-cpp.sh makes for this host (AMX off where the CPU has it).
    let amx = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" amx_int8"));
    let build = if amx {
        "build-0.3.36-noamx"
    } else {
        "build-0.3.36"
    };
    let lib = Some(peer.join(build).join("bin")).filter(|b| b.join("libllama.so").exists());
    let py = peer.join("venv/bin/python");
    let found = lib.is_some() && py.exists() && lsrc.join("llama_cpp").is_dir();
    let required = std::env::var_os("Q3VL_REQUIRE_LLAMA").is_some_and(|v| v == "1");
    assert!(
        found || !required,
        "Q3VL_REQUIRE_LLAMA=1 but llama.cpp is not built (make llama-cpp)"
    );
    let lib = lib?;
    found.then_some(Peer { py, lsrc, lib })
}

impl Peer {
    /// `python SCRIPT ARGS` with the bindings and the build's libraries.
    fn python(&self, script: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.py);
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
            .env("PYTHONPATH", &self.lsrc)
            .env("LLAMA_CPP_LIB_PATH", &self.lib);
        cmd
    }

    /// `oracle/check_gguf.py` on text model `model` (its projector beside it, as
    /// export gguf writes them) and `traces`. `min_tokens`: HF's image-token floor, the
    /// preprocessor's shortest_edge over (16 · 2)² pixels (llama.cpp's own for Qwen-VL
    /// is 8); "" leaves llama.cpp's.
    fn check_gguf(
        &self,
        model: &Path,
        traces: &[PathBuf],
        max_noise: &str,
        min_tokens: &str,
    ) -> std::process::Output {
        let mmproj = std::fs::read_dir(model.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| s(p).contains("/mmproj-"))
            .unwrap();
        let mut cmd = self.python("oracle/check_gguf.py");
        cmd.args(["--model", s(model), "--mmproj", s(&mmproj)])
            .args(["--max-noise", max_noise]);
        if !min_tokens.is_empty() {
            cmd.args(["--image-min-tokens", min_tokens]);
        }
        for t in traces {
            cmd.args(["--trace", s(t)]);
        }
        cmd.output().unwrap()
    }
}

#[test]
fn llama_cpp_runs_the_export_with_the_references_tokens() {
    let Some(peer) = llama_cpp() else {
        eprintln!("export in llama.cpp: NOT RUN: llama.cpp is not built (make llama-cpp)");
        return;
    };
    let repo = |rel: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    let run = |model: &Path, traces: &[PathBuf], max_noise: &str, min_tokens: &str| {
        peer.check_gguf(model, traces, max_noise, min_tokens)
    };
    // Each fixture's noise ceiling: twice what its healthy export measures (docs/export.md).
    let check = |model: &Path, traces: &[PathBuf], max_noise: &str, min_tokens: &str| {
        let o = run(model, traces, max_noise, min_tokens);
        let summary = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .collect::<String>();
        assert!(
            o.status.success(),
            "{}: {}\n{summary}",
            model.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        summary
    };
    // Random weights with the real vocabulary and tokenizer: logits near 25, small margins.
    let (ckpt, out) = common::fullvocab_bundles("untied");
    let dir = scratch("llama-fullvocab");
    assert!(export(&out, &dir, &["--allow-unverified"]).status.success());
    let traces = repo("fixtures/fullvocab/untied/traces");
    let refs = common::self_trace::write_on_bundles(
        &ckpt,
        &traces,
        &out,
        &scratch("llama-traces-fullvocab"),
        &["text", "image"],
    );
    let model = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| s(p).ends_with("-Q8_0.gguf"))
        .unwrap();
    eprintln!(
        "export in llama.cpp: fullvocab untied int8hu: {}",
        check(&model, &refs, "0.07", "4")
    );
    // With llama.cpp's own floor, its 64×64 image becomes 3×3 tokens where HF's
    // smart_resize keeps 2×2: the check names the grid.
    let o = run(&model, &refs[1..], "0.07", "");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("9 image tokens against 4"), "{err}");
    for (fx, mode, max_noise, min_tokens) in [
        ("shapes", "int8hu", "0.014", "64"),
        ("odd", "int8hu", "0.22", "1"),
        ("tied", "int8hu", "0.35", "4"),
        ("tied", "int8lin", "0.34", "4"),
    ] {
        // `tied`'s 150×100 image is resized to 160×96, and llama.cpp's bicubic is not
        // HF's: its prompt is given here resized as HF resizes it (a no-op for both), and
        // `llama_cpps_resize_is_not_hfs` shows the difference on the original.
        let out = bundles(fx, mode, false);
        let dir = scratch(&format!("llama-{fx}-{mode}"));
        assert!(export(&out, &dir, &["--allow-unverified"]).status.success());
        let src = repo(&format!("fixtures/{fx}"));
        let traces = scratch(&format!("llama-traces-{fx}-{mode}"));
        let oracle = match fx {
            "tied" => hf_resized_traces(&src, &scratch(&format!("hf-resized-{mode}"))),
            _ => src.join("traces"),
        };
        let refs =
            common::self_trace::write_on_bundles(&src, &oracle, &out, &traces, &["text", "image"]);
        let suffix = if mode == "fp16" { "F16" } else { "Q8_0" };
        let model = dir.join(format!("{fx}-{suffix}.gguf"));
        eprintln!(
            "export in llama.cpp: {fx} {mode}: {}",
            check(&model, &refs, max_noise, min_tokens)
        );
        if fx == "shapes" {
            // Two layers' attn_q swapped: llama.cpp loads it, and the check catches it.
            let bad_dir = scratch("llama-swapped");
            std::fs::create_dir_all(&bad_dir).unwrap();
            let bad = bad_dir.join("shapes-Q8_0.gguf");
            std::fs::copy(&model, &bad).unwrap();
            swap_tensors(&bad, "blk.0.attn_q.weight", "blk.1.attn_q.weight");
            let mmproj = "mmproj-shapes-F16.gguf";
            std::fs::copy(dir.join(mmproj), bad_dir.join(mmproj)).unwrap();
            let o = run(&bad, &refs[..1], max_noise, min_tokens);
            assert_eq!(
                o.status.code(),
                Some(1),
                "{}",
                String::from_utf8_lossy(&o.stdout)
            );
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("logit noise") || err.contains("logits cos"),
                "{err}"
            );
        }
    }
}

/// A copy of fixture `src`'s traces folder whose image trace's image is the picture HF's
/// processor would feed the model (smart_resize, then PIL bicubic, as q3vl's preprocessing
/// and the `image.pixels` gate reproduce): at that size no runtime resizes it again.
fn hf_resized_traces(src: &Path, dir: &Path) -> PathBuf {
    use q3vl_model::image::{load_rgb, resize_bicubic, smart_resize};
    std::fs::create_dir_all(dir).unwrap();
    for f in ["text.safetensors", "image.safetensors"] {
        std::fs::copy(src.join("traces").join(f), dir.join(f)).unwrap();
    }
    let pre = q3vl_model::PreprocessorConfig::from_dir(src).unwrap();
    let img = load_rgb(&src.join("traces/image.png")).unwrap();
    let factor = pre.patch_size * pre.merge_size;
    let (h, w) = smart_resize(
        img.height,
        img.width,
        factor,
        pre.min_pixels,
        pre.max_pixels,
    )
    .unwrap();
    let out = resize_bicubic(&img, w, h);
    image::RgbImage::from_raw(w as u32, h as u32, out.data)
        .unwrap()
        .save(dir.join("image.png"))
        .unwrap();
    dir.to_path_buf()
}

#[test]
fn llama_cpps_resize_is_not_hfs() {
    let Some(peer) = llama_cpp() else {
        eprintln!("llama.cpp's resize: NOT RUN: llama.cpp is not built (make llama-cpp)");
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = repo.join("fixtures/tied");
    let out = bundles("tied", "int8hu", false);
    let dir = scratch("resize-export");
    assert!(export(&out, &dir, &["--allow-unverified"]).status.success());
    let refs = common::self_trace::write_on_bundles(
        &src,
        &src.join("traces"),
        &out,
        &scratch("resize-traces"),
        &["image"],
    );
    let model = dir.join("tied-Q8_0.gguf");
    let o = peer.check_gguf(&model, &refs, "0.35", "4");
    // The same grid (3×5 tokens), other pixels: on this random model, which amplifies its
    // input's differences, the continuation's logits leave the reference's.
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("llama.cpp's resize on tied's 150×100 image: {summary}");
    assert_eq!(o.status.code(), Some(1), "{summary}");
    let noise = summary["traces"]["image.safetensors"]["noise"]
        .as_f64()
        .unwrap();
    assert!(noise > 1.0, "{summary}");
}

#[test]
fn llama_cpps_own_conversion_differs_only_by_the_two_rounding_rules() {
    let peer = std::env::var_os("Q3VL_PEER_DIR").map_or("/tmp/q3vl-peer".into(), PathBuf::from);
    let lcpp = peer.join("llama-cpp-python-0.3.36/vendor/llama.cpp");
    let venv_py = peer.join("venv/bin/python");
    let (Some(oracle_py), true) = (
        common::oracle_python(),
        lcpp.join("convert_hf_to_gguf.py").exists() && venv_py.exists(),
    ) else {
        let required = std::env::var_os("Q3VL_REQUIRE_LLAMA").is_some_and(|v| v == "1");
        assert!(
            !required,
            "Q3VL_REQUIRE_LLAMA=1 but llama.cpp's source or the oracle is missing"
        );
        eprintln!("llama.cpp's converter: NOT RUN: needs `make oracle` and `make llama-cpp`");
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The real tokenizer (llama.cpp's converter recognizes Qwen's pre-tokenizer by hash).
    let (ckpt, out) = common::fullvocab_bundles("untied");
    let ours = scratch("cmp-ours");
    assert!(export(&out, &ours, &["--allow-unverified"])
        .status
        .success());
    let theirs = scratch("cmp-theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    // The converter needs torch (the oracle's) and sentencepiece (the llama.cpp venv's).
    let site = std::process::Command::new(&oracle_py)
        .args(["-c", "import site; print(site.getsitepackages()[0])"])
        .output()
        .unwrap();
    let site = String::from_utf8(site.stdout).unwrap().trim().to_string();
    let pypath = format!("{site}:{}", lcpp.join("gguf-py").display());
    let name = std::fs::read_dir(&ours)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap());
    let files: Vec<String> = name.filter(|n| n.ends_with(".gguf")).collect();
    for (extra, file) in [
        (&[][..], "text-q8_0.gguf"),
        (&["--mmproj"][..], "mmproj-f16.gguf"),
    ] {
        let outtype = if extra.is_empty() { "q8_0" } else { "f16" };
        let o = std::process::Command::new(&venv_py)
            .arg(lcpp.join("convert_hf_to_gguf.py"))
            .arg(&ckpt)
            .args(extra)
            .args(["--outtype", outtype, "--outfile", s(&theirs.join(file))])
            .env("PYTHONPATH", &pypath)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mine = files
            .iter()
            .find(|f| f.starts_with("mmproj") != extra.is_empty())
            .unwrap();
        let o = std::process::Command::new(&oracle_py)
            .arg(repo.join("oracle/compare_gguf.py"))
            .args([
                "--ours",
                s(&ours.join(mine)),
                "--theirs",
                s(&theirs.join(file)),
                "--source",
                s(&ckpt),
            ])
            .env("PYTHONPATH", lcpp.join("gguf-py"))
            .output()
            .unwrap();
        check_comparison(o, file, extra.is_empty());
    }
    verify_their_files(&ckpt, &theirs, &ours, &files);
}

/// Holds one file's comparison (`oracle/compare_gguf.py`'s output) to exactly the
/// differences docs/export.md lists.
fn check_comparison(o: std::process::Output, file: &str, text: bool) {
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        o.status.success(),
        "{file}: {}\n{report:#}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        report["tensors_only_ours"].as_array().unwrap().is_empty(),
        "{report:#}"
    );
    assert!(
        report["tensors_only_theirs"].as_array().unwrap().is_empty(),
        "{report:#}"
    );
    let summary: serde_json::Map<_, _> = [
        "type_or_shape_differs",
        "keys_only_ours",
        "keys_only_theirs",
        "values_differ",
    ]
    .iter()
    .map(|k| (k.to_string(), report[*k].clone()))
    .collect();
    eprintln!(
        "llama.cpp's converter, {file}: {}",
        serde_json::Value::Object(summary)
    );
    // Exactly the differences docs/export.md lists, nothing more.

    let differs: Vec<&String> = report["type_or_shape_differs"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(
        differs,
        if text {
            vec!["token_embd.weight"]
        } else {
            vec![]
        },
        "{report:#}"
    );
    assert_eq!(
        report["keys_only_ours"],
        serde_json::json!(["q3vl.provenance"])
    );
    // The converter's guesses from the folder name (which ones depend on the name).
    let guesses = ["general.basename", "general.finetune", "general.size_label"];
    let theirs_only = report["keys_only_theirs"].as_array().unwrap();
    assert!(
        theirs_only
            .iter()
            .all(|k| guesses.contains(&k.as_str().unwrap())),
        "{report:#}"
    );
    let values: Vec<&String> = report["values_differ"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(values, vec!["general.name"], "{report:#}");
    let q8 = report["q8_0"].as_object().unwrap();
    let layers = q8.keys().filter(|n| n.starts_with("blk.")).count();
    assert_eq!(
        layers,
        if text { 7 * 4 } else { 0 },
        "every decoder linear compared"
    );
    for (name, e) in q8.iter().filter(|(n, _)| n.starts_with("blk.")) {
        assert_eq!(e["unexplained"], 0, "{name}: {e}");
        assert_eq!(e["scales_differ"], 0, "{name}: {e}");
    }
}

/// `verify --gguf` on llama.cpp's conversion of `ckpt` (in `theirs`) and on q3vl's export
/// (`files` in `ours`), then on its quantizer's 4-, 5- and 6-bit requantizations.
fn verify_their_files(ckpt: &Path, theirs: &Path, ours: &Path, files: &[String]) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    // `verify --gguf` holds llama.cpp's own conversion to the HF oracle's traces, with
    // every metadata gate against the checkpoint, as it holds q3vl's export.
    let traces = repo.join("fixtures/fullvocab/untied/traces");
    let ours_pair = files.iter().map(|f| ours.join(f));
    let (our_mmproj, our_text): (Vec<PathBuf>, Vec<PathBuf>) =
        ours_pair.partition(|p| s(p).contains("mmproj-"));
    for (who, text, mmproj) in [
        (
            "llama.cpp",
            theirs.join("text-q8_0.gguf"),
            theirs.join("mmproj-f16.gguf"),
        ),
        ("q3vl", our_text[0].clone(), our_mmproj[0].clone()),
    ] {
        let report = scratch(&format!("cmp-verify-{who}"));
        let o = run(&[
            "verify",
            "--src",
            s(ckpt),
            "--gguf",
            s(&text),
            "--mmproj",
            s(&mmproj),
            "--trace",
            s(&traces.join("text.safetensors")),
            "--trace",
            s(&traces.join("image.safetensors")),
            "--report",
            s(&report),
        ]);
        let out = String::from_utf8_lossy(&o.stdout);
        let stats: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("next-token statistics") || l.contains("gates"))
            .collect();
        eprintln!("verify --gguf on {who}'s conversion: {}", stats.join(" | "));
        assert!(
            o.status.success(),
            "{who}: {out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // The 4-, 5- and 6-bit files llama.cpp's quantizer makes from its Q8_0 pass under
    // their own types' thresholds; Q4_0 with two layers' attn_q swapped does not.
    let peer = llama_cpp().expect("built: its converter ran above");
    for ty in ["q4_0", "q5_1", "q6_k", "q4_k_m"] {
        let file = theirs.join(format!("text-{ty}.gguf"));
        let o = peer
            .python("oracle/quantize_gguf.py")
            .args([s(&theirs.join("text-q8_0.gguf")), s(&file), ty])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{ty}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let verify = |text: &Path, name: &str| {
            run(&[
                "verify",
                "--src",
                s(ckpt),
                "--gguf",
                s(text),
                "--mmproj",
                s(&theirs.join("mmproj-f16.gguf")),
                "--trace",
                s(&traces.join("text.safetensors")),
                "--trace",
                s(&traces.join("image.safetensors")),
                "--report",
                s(&scratch(&format!("cmp-verify-{name}"))),
            ])
        };
        let o = verify(&file, ty);
        let out = String::from_utf8_lossy(&o.stdout);
        let last = out.lines().last().unwrap_or_default();
        eprintln!("verify --gguf on llama.cpp's {ty}: {last}");
        assert!(o.status.success(), "{ty}: {out}");
        if ty == "q4_0" {
            let bad = scratch("q4_0-swapped.gguf");
            std::fs::copy(&file, &bad).unwrap();
            swap_tensors(&bad, "blk.0.attn_q.weight", "blk.1.attn_q.weight");
            let o = verify(&bad, "q4_0-swapped");
            let out = String::from_utf8_lossy(&o.stdout);
            assert_eq!(o.status.code(), Some(1), "{out}");
            assert!(out.contains("text:text.local"), "{out}");
        }
    }
}
