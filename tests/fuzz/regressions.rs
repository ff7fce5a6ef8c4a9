//! The minimized inputs of the fuzzers' findings, each a test that failed before its
//! fix (RELIABILITY.md, "Fuzzing", lists them).

use q3vl_bundle::Metadata;
use q3vl_verify::OracleTrace;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Asserts `e` is one line that names `culprit`.
fn one_line_naming(e: &str, culprit: &str) {
    assert!(!e.contains('\n'), "error on several lines: {e:?}");
    assert!(e.contains(culprit), "error does not name {culprit}: {e}");
}

/// A `qwen3vl-oracle-trace/1` file with T = 2 tokens, H = 4 and the given extra
/// integer and float tensors (name, shape).
fn write_trace(path: &Path, ints: &[(&str, Vec<usize>)], floats: &[(&str, Vec<usize>)]) {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let base_ints = [
        ("input_ids", vec![2]),
        ("position_ids", vec![3, 2]),
        ("logits.top_ids", vec![2, 2]),
    ];
    for (name, shape) in base_ints.iter().cloned().chain(ints.iter().cloned()) {
        let n: usize = shape.iter().product();
        owned.push((name.into(), Dtype::I64, shape, vec![0u8; n * 8]));
    }
    let base_floats = [("text.embed", vec![2, 4]), ("text.norm", vec![2, 4])];
    for (name, shape) in base_floats.iter().cloned().chain(floats.iter().cloned()) {
        let n: usize = shape.iter().product();
        owned.push((name.into(), Dtype::F32, shape, vec![0u8; n * 4]));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("a view"),
            )
        })
        .collect();
    let meta = HashMap::from([(
        "format".to_string(),
        q3vl_verify::trace::FORMAT_V1.to_string(),
    )]);
    safetensors::serialize_to_file(views, Some(meta), path).expect("a trace writes");
}

/// Found by `trace`: top values of another rank than their ids reached candle's
/// `to_vec2`, whose error named no file (and, with RUST_BACKTRACE set, spanned lines).
#[test]
fn trace_top_values_of_another_rank_name_the_trace() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.safetensors");
    write_trace(&p, &[], &[("logits.top_values", vec![2, 2, 1])]);
    let t = OracleTrace::open(&p).unwrap();
    let e = t.top_k("logits").unwrap_err().to_string();
    one_line_naming(&e, "t.safetensors");
    assert!(e.contains("logits.top_values"), "{e}");
}

/// Found by `trace`: one-dimensional `decode.top_ids` made `top_k` index past the
/// shape (a panic), and K = 0 would have divided the ids into chunks of zero.
#[test]
fn trace_decode_top_ids_without_k_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.safetensors");
    for (ids, vals) in [(vec![3], vec![3]), (vec![3, 0], vec![3, 0])] {
        write_trace(
            &p,
            &[("decode.top_ids", ids)],
            &[
                ("logits.top_values", vec![2, 2]),
                ("decode.top_values", vals),
            ],
        );
        let t = OracleTrace::open(&p).unwrap();
        let e = t.top_k("decode").unwrap_err().to_string();
        one_line_naming(&e, "decode.top_ids");
    }
}

/// Found by `trace`: the safetensors crate quotes an unknown dtype verbatim, so a
/// dtype holding a newline split the error.
#[test]
fn trace_with_a_newline_in_a_dtype_is_refused_on_one_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.safetensors");
    let header = br#"{"__metadata__":{"format":"qwen3vl-oracle-trace/1"},"x":{"dtype":"x\ny","shape":[1],"data_offsets":[0,4]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0; 4]);
    std::fs::write(&p, file).unwrap();
    let e = OracleTrace::open(&p).err().unwrap().to_string();
    one_line_naming(&e, "t.safetensors");
}

/// Found by `metadata_json`: serde quotes an unknown enum value verbatim.
#[test]
fn metadata_with_a_newline_in_a_scheme_is_refused_on_one_line() {
    let d = tempfile::tempdir().unwrap();
    let mut m = Metadata::new(q3vl_bundle::Kind::Vision, "v");
    m.tensors.insert(
        "w".into(),
        q3vl_bundle::TensorMeta {
            class: "vision".into(),
            scheme: q3vl_bundle::Scheme::F16,
            source: None,
        },
    );
    let text = String::from_utf8(m.to_bytes())
        .unwrap()
        .replace("\"f16\"", "\"x\\ny\"");
    std::fs::write(d.path().join("metadata.json"), text).unwrap();
    let e = Metadata::read(d.path()).unwrap_err().to_string();
    one_line_naming(&e, "metadata.json");
}

/// Found by `checkpoint`: a tensor name holding a newline is quoted by every later
/// error about that tensor (here, that it is not part of the layout).
#[test]
fn checkpoint_tensor_named_with_a_newline_is_refused_on_one_line() {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        super::seeds::fixtures().join("tied/config.json"),
        d.path().join("config.json"),
    )
    .unwrap();
    let src = super::seeds::fixture("tied/model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&src).unwrap();
    let mut tensors: Vec<(String, TensorView)> = st.tensors().into_iter().collect();
    let extra = [0u8; 4];
    tensors.push((
        "stray\nname".into(),
        TensorView::new(Dtype::F32, vec![1], &extra).unwrap(),
    ));
    safetensors::serialize_to_file(tensors, None, &d.path().join("model.safetensors")).unwrap();
    let e = q3vl_convert::source::SourceCheckpoint::open(d.path())
        .err()
        .unwrap()
        .to_string();
    one_line_naming(&e, "stray\\nname");
}

/// Found by `preprocessor_config`: the engine read the vision bundle's
/// `preprocessor_config.json` without checking it against the tower, so another
/// patch size failed later naming no file ("fixed image side 448 is not a multiple
/// of 64") or cut rows the tower refused ("pixel_values has … values").
#[test]
fn engine_refuses_a_preprocessor_that_disagrees_with_the_tower() {
    let p = super::seeds::pair();
    let img = q3vl_model::image::Rgb8 {
        width: 32,
        height: 32,
        data: vec![128; 32 * 32 * 3],
    };
    // Same byte count, so the bundle's recorded sizes still hold.
    for patch in ["32", " 8"] {
        let d = tempfile::tempdir().unwrap();
        p.write(d.path());
        let pre = d.path().join(&p.vision).join("preprocessor_config.json");
        let text = std::fs::read_to_string(&pre).unwrap();
        std::fs::write(
            &pre,
            text.replace("\"patch_size\": 16", &format!("\"patch_size\": {patch}")),
        )
        .unwrap();
        let opts = q3vl_engine::EngineOptions {
            threads: Some(1),
            verify_checksums: false,
            context: None,
        };
        let engine = q3vl_engine::Engine::open(d.path(), &opts).unwrap();
        for dynamic in [false, true] {
            let e = engine.preprocess(&img, dynamic).err().unwrap().to_string();
            one_line_naming(&e, "preprocessor_config.json");
        }
    }
}

/// `fixtures/shapes`' tokenizer files in `dir`, `tokenizer.json` edited by `edit`.
fn tokenizer_dir(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let shapes = super::seeds::fixtures().join("shapes");
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shapes.join("tokenizer.json")).unwrap()).unwrap();
    edit(&mut tok);
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::copy(
        shapes.join("tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
}

fn shapes_config() -> q3vl_model::Qwen3VlConfig {
    q3vl_model::Qwen3VlConfig::from_dir(&super::seeds::fixtures().join("shapes")).unwrap()
}

/// Found by `prompt`: tokenizers 0.22 panics (`expect("Helper")`) on a decoder that
/// matches none of its kinds, and slices a merge past its end when
/// `continuing_subword_prefix` is longer than the merge: both are now errors naming
/// the file.
#[test]
fn tokenizer_files_that_make_tokenizers_panic_are_refused() {
    let edits: [fn(&mut serde_json::Value); 2] = [
        |t| t["decoder"] = 5.into(),
        |t| t["model"]["continuing_subword_prefix"] = "##########".into(),
    ];
    for edit in edits {
        let d = tempfile::tempdir().unwrap();
        tokenizer_dir(d.path(), edit);
        let e = q3vl_model::prompt::PromptBuilder::from_dir(d.path(), &shapes_config())
            .err()
            .expect("refused")
            .to_string();
        one_line_naming(&e, "tokenizer.json");
    }
}

/// Found by `prompt`: a chat template that renders no image placeholder failed with
/// "1 image(s) given but the prompt has 0 <|image_pad|> placeholder(s)", naming
/// neither the template nor the tokenizer.
#[test]
fn a_template_without_the_image_placeholder_is_named() {
    let d = tempfile::tempdir().unwrap();
    tokenizer_dir(d.path(), |_| {});
    let cfg_path = d.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = "{% for m in messages %}{{ m.role }}{% endfor %}".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let pb = q3vl_model::prompt::PromptBuilder::from_dir(d.path(), &shapes_config()).unwrap();
    let e = pb
        .chat("What is in the image?", Some([1, 4, 4]))
        .unwrap_err()
        .to_string();
    one_line_naming(&e, "chat template");
}

/// Found by `stamp`: a stamp listing a file whose name holds a newline made the
/// "was removed since it was verified" reason span two lines.
#[test]
fn a_stamped_name_with_a_newline_is_reported_on_one_line() {
    use q3vl_bundle::stamp;
    let p = super::seeds::pair();
    let d = tempfile::tempdir().unwrap();
    p.write(d.path());
    let lang = d.path().join(&p.language);
    let mut files = stamp::hash_bundle(&lang).unwrap();
    let any = files.values().next().unwrap().clone();
    files.insert("x\ny".into(), any);
    let s = stamp::Stamp {
        format: stamp::STAMP_FORMAT.into(),
        tool: "test".into(),
        gates: serde_json::Value::Null,
        results: serde_json::Value::Null,
        traces: Default::default(),
        files,
    };
    stamp::write_stamp(&lang, &s).unwrap();
    match stamp::check_stamp(&lang) {
        stamp::StampStatus::Invalid(why) => one_line_naming(&why, "x\\ny"),
        other => panic!("{other:?}"),
    }
}
