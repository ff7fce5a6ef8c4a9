//! `q3vl export compressed-tensors` (`docs/export.md`): the export carries every value
//! of the bundles exactly, in the layout compressed-tensors defines; it is refused for
//! bad input without writing anything; and, where the oracle's Python environment is
//! installed (`make oracle`), HF transformers loads it with the reference's logits.
//!
//! The Rust-side reading here decodes the format from its definition (`pack.rs`'s
//! module docs) independently of the writer's code; `oracle/check_export.py` does it
//! again with the compressed-tensors library itself.

mod common;

use common::{fails, run, s, scratch, self_trace};
use q3vl_bundle::{Bundle, Bundles, Dtype, Scheme};
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn bundles(fx: &str, mode: &str, stamp: bool) -> PathBuf {
    common::converted_mode(fx, mode, stamp)
}

fn export(bundle: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let args = [
        "export",
        "compressed-tensors",
        "--bundle",
        s(bundle),
        "--out",
        s(out),
    ];
    run(&[&args[..], extra].concat())
}

/// Every tensor of an export folder: name → (safetensors dtype, shape, bytes).
type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn read_export(dir: &Path) -> Tensors {
    let mut out = Tensors::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, v) in st.tensors() {
                let dtype = format!("{:?}", v.dtype());
                out.insert(name, (dtype, v.shape().to_vec(), v.data().to_vec()));
            }
        }
    }
    out
}

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// What the export should hold for one language tensor, by the format's definition.
fn expect_language(
    b: &Bundle,
    name: &str,
    scheme: Scheme,
    class: &str,
) -> Vec<(String, &'static str, Vec<usize>, Vec<u8>)> {
    let (_, shape, bytes) = b.raw(name).unwrap();
    let shape = shape.to_vec();
    match (scheme, class) {
        (Scheme::Int8Clip, "text_linear") => {
            let (q, sc, [o, i]) = b.q8(name).unwrap();
            let m = name.strip_suffix(".weight").unwrap();
            // Byte k of int32 word w is column 4w + k, holding q + 128.
            let packed: Vec<u8> = q.iter().map(|&v| (v as i16 + 128) as u8).collect();
            let shape_bytes: Vec<u8> = [o as i64, i as i64]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            vec![
                (format!("{m}.weight_packed"), "I32", vec![o, i / 4], packed),
                (
                    format!("{m}.weight_scale"),
                    "F32",
                    vec![o, i / 32],
                    f32_bytes(sc.iter().map(|x| x.to_f32())),
                ),
                (format!("{m}.weight_shape"), "I64", vec![2], shape_bytes),
            ]
        }
        (Scheme::Int8AbsMax, "head") => vec![(
            name.into(),
            "F32",
            shape,
            f32_bytes(b.dequantized(name).unwrap()),
        )],
        (Scheme::F16, _) => vec![(name.into(), "F16", shape, bytes.to_vec())],
        (Scheme::F32, _) => vec![(name.into(), "F32", shape, bytes.to_vec())],
        other => panic!("{name}: unexpected {other:?}"),
    }
}

/// Every difference between an export and the bundles it came from (empty: exact).
fn faults(export_dir: &Path, out: &Path) -> Vec<String> {
    let pair = Bundles::open(out).unwrap();
    let got = read_export(export_dir);
    let mut want = Vec::new();
    for (name, m) in &pair.language.metadata().tensors {
        want.extend(expect_language(&pair.language, name, m.scheme, &m.class));
    }
    for name in pair.vision.metadata().tensors.keys() {
        let (dtype, shape, bytes) = pair.vision.raw(name).unwrap();
        let dtype = if dtype == Dtype::F16 { "F16" } else { "F32" };
        want.push((name.clone(), dtype, shape.to_vec(), bytes.to_vec()));
    }
    let mut faults = Vec::new();
    for (name, dtype, shape, bytes) in &want {
        match got.get(name) {
            None => faults.push(format!("{name}: missing")),
            Some((d, sh, b)) if d != dtype || sh != shape => {
                faults.push(format!("{name}: {d} {sh:?}, want {dtype} {shape:?}"))
            }
            Some((_, _, b)) if b != bytes => faults.push(format!("{name}: other bytes")),
            Some(_) => {}
        }
    }
    if got.len() != want.len() {
        faults.push(format!("{} tensors, want {}", got.len(), want.len()));
    }
    faults
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn an_export_carries_every_value_of_the_bundles_exactly() {
    for (fx, mode, stamp) in [
        ("tied", "int8hu", true),
        ("shapes", "int8hu", false),
        ("tied", "int8lin", false),
    ] {
        let out = bundles(fx, mode, stamp);
        let dir = scratch(&format!("exact-{fx}-{mode}"));
        let extra: &[&str] = if stamp { &[] } else { &["--allow-unverified"] };
        let o = export(&out, &dir, extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(faults(&dir, &out), Vec::<String>::new(), "{fx} {mode}");

        let cfg = read_json(&dir.join("config.json"));
        let qc = &cfg["quantization_config"];
        assert_eq!(qc["quant_method"], "compressed-tensors");
        assert_eq!(qc["format"], "pack-quantized");
        let w = &qc["config_groups"]["group_0"]["weights"];
        assert_eq!(
            (w["num_bits"].as_u64(), w["group_size"].as_u64()),
            (Some(8), Some(32))
        );
        assert_eq!(
            (w["type"].as_str(), w["strategy"].as_str()),
            (Some("int"), Some("group"))
        );
        assert_eq!(w["symmetric"], true);
        let ignore: Vec<&str> = qc["ignore"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let layers = cfg["text_config"]["num_hidden_layers"].as_u64().unwrap() as usize;
        let packed = read_export(&dir)
            .keys()
            .filter(|n| n.ends_with(".weight_packed"))
            .count();
        assert_eq!(packed, 7 * layers, "every decoder linear is packed");
        // Exactly the linear modules left dense: the head and every vision linear (the
        // layout's 2-D vision weights but the position table), none of the decoder's.
        let q3vl_cfg = q3vl_model::Qwen3VlConfig::from_json(&cfg).unwrap();
        let mut want: Vec<String> = q3vl_model::layout::vision_tensors(&q3vl_cfg)
            .into_iter()
            .filter(|t| t.shape.len() == 2 && !t.name.contains("pos_embed"))
            .map(|t| t.name.strip_suffix(".weight").unwrap().to_string())
            .chain(["lm_head".to_string()])
            .collect();
        want.sort();
        assert_eq!(ignore, want, "{fx} {mode}");
        assert_eq!(cfg["dtype"], "float16");
        // int8hu of a tied source stores its own head: the export must not tie it back.
        let tied_source = fx == "tied";
        assert_eq!(
            cfg["tie_word_embeddings"],
            Value::Bool(tied_source && mode == "int8lin"),
            "{fx} {mode}"
        );

        let prov = read_json(&dir.join("q3vl_export.json"));
        assert_eq!(prov["format"], "q3vl-export/1");
        assert_eq!(prov["export"], "compressed-tensors");
        assert_eq!(prov["source"]["folder"], fx);
        if stamp {
            let v = &prov["verification"];
            let (passed, total) = (
                v["gates_passed"].as_u64().unwrap(),
                v["gates_total"].as_u64().unwrap(),
            );
            assert!(total > 0 && passed == total, "{v}");
            assert_eq!(v["traces"].as_object().unwrap().len(), 2);
        } else {
            assert!(prov["verification"].is_null());
        }
        for (file, entry) in prov["files"].as_object().unwrap() {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            assert_eq!(entry["size"].as_u64(), Some(bytes.len() as u64), "{file}");
            assert_eq!(
                entry["sha256"].as_str().unwrap(),
                sha256_hex(&bytes),
                "{file}"
            );
        }
        let files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            files.len(),
            prov["files"].as_object().unwrap().len() + 1,
            "{files:?}"
        );
    }
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn exports_are_deterministic_and_shard_like_hf_checkpoints() {
    let out = bundles("tied", "int8hu", false);
    let (a, b) = (scratch("det-a"), scratch("det-b"));
    for d in [&a, &b] {
        let o = export(&out, d, &["--allow-unverified", "--shard-size", "300000"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(common::tree(&a), common::tree(&b));
    let index = read_json(&a.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let shards: std::collections::BTreeSet<&str> =
        map.values().map(|f| f.as_str().unwrap()).collect();
    assert!(shards.len() > 1, "{shards:?}");
    assert!(
        shards
            .iter()
            .all(|f| f.starts_with("model-0000") && f.ends_with(".safetensors")),
        "{shards:?}"
    );
    assert_eq!(map.len(), read_export(&a).len());
    assert_eq!(faults(&a, &out), Vec::<String>::new());
}

/// Changes the bytes of tensor `name` in an export's single safetensors file.
fn damage(dir: &Path, name: &str, edit: impl Fn(&mut [u8])) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &header[name]["data_offsets"];
    let (a, b) = (
        off[0].as_u64().unwrap() as usize,
        off[1].as_u64().unwrap() as usize,
    );
    edit(&mut bytes[8 + n + a..8 + n + b]);
    std::fs::write(&path, bytes).unwrap();
}

const MODULE: &str = "model.language_model.layers.1.mlp.down_proj";

/// One group's scale doubled; one packed tensor's words with their byte order reversed.
fn damaged_exports(clean: &Path, tag: &str) -> Vec<(&'static str, PathBuf)> {
    let scale = scratch(&format!("damaged-scale-{tag}"));
    common::copy_dir(clean, &scale);
    damage(&scale, &format!("{MODULE}.weight_scale"), |b| {
        let v = f32::from_le_bytes(b[..4].try_into().unwrap()) * 2.0;
        b[..4].copy_from_slice(&v.to_le_bytes());
    });
    let order = scratch(&format!("damaged-order-{tag}"));
    common::copy_dir(clean, &order);
    damage(&order, &format!("{MODULE}.weight_packed"), |b| {
        b.chunks_exact_mut(4).for_each(|w| w.reverse())
    });
    vec![("weight_scale", scale), ("weight_packed", order)]
}

#[test]
fn a_damaged_export_differs_from_its_bundles() {
    let out = bundles("tied", "int8hu", false);
    let clean = scratch("damage-clean");
    assert!(export(&out, &clean, &["--allow-unverified"])
        .status
        .success());
    for (tensor, dir) in damaged_exports(&clean, "rust") {
        let f = faults(&dir, &out);
        assert_eq!(f, vec![format!("{MODULE}.{tensor}: other bytes")]);
    }
}

#[test]
fn bad_input_is_one_line_and_leaves_nothing() {
    let parent = scratch("bad");
    std::fs::create_dir_all(&parent).unwrap();
    let dest = parent.join("export");
    let unstamped = bundles("tied", "int8hu", false);
    let line = fails(
        &export(&unstamped, &dest, &[]),
        &[
            "tied_decode_int8hu",
            "no verification stamp",
            "--allow-unverified",
        ],
    );
    assert!(line.starts_with("error: "), "{line}");
    let fp16 = bundles("tied", "fp16", false);
    fails(
        &export(&fp16, &dest, &["--allow-unverified"]),
        &["tied_decode_fp16", "nothing to compress"],
    );
    // A bundle whose bytes no longer match its metadata is not exported, flag or not.
    let damaged = scratch("bad-damaged");
    common::copy_dir(&unstamped, &damaged);
    let tok = damaged.join("tied_decode_int8hu/tokenizer/tokenizer.json");
    let mut t = std::fs::read(&tok).unwrap();
    t[10] ^= 1;
    std::fs::write(&tok, t).unwrap();
    fails(
        &export(&damaged, &dest, &["--allow-unverified"]),
        &["tokenizer.json", "sha256"],
    );
    // A stamp that no longer holds is refused like a missing one.
    let stale = scratch("bad-stale");
    common::copy_dir(&bundles("tied", "int8hu", true), &stale);
    std::fs::write(stale.join("tied_vision/extra.txt"), "x").unwrap();
    fails(
        &export(&stale, &dest, &[]),
        &["stamp does not hold", "extra.txt"],
    );
    // Into a bundle folder: refused before anything is created there.
    let inside = unstamped.join("tied_vision/export");
    fails(
        &export(&unstamped, &inside, &["--allow-unverified"]),
        &["inside bundle"],
    );
    assert!(!inside.exists());
    assert!(
        std::fs::read_dir(parent.as_path())
            .unwrap()
            .next()
            .is_none(),
        "nothing was written"
    );
    // A `..` past a folder that does not exist yet cannot hide a bundle; neither can the
    // output folder of the bundles, which holds them.
    let sneaky = unstamped.join("nope/../tied_vision/new/x");
    fails(
        &export(&unstamped, &sneaky, &["--allow-unverified"]),
        &["inside bundle"],
    );
    assert!(!unstamped.join("tied_vision/new").exists());
    std::fs::remove_dir(unstamped.join("nope")).unwrap();
    for force in [&[][..], &["--force"][..]] {
        let args = [&["--allow-unverified"][..], force].concat();
        fails(&export(&unstamped, &unstamped, &args), &["holds it"]);
    }
    // An existing folder: --force is needed, and replaces only an export.
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("notes.txt"), "mine").unwrap();
    fails(
        &export(&unstamped, &dest, &["--allow-unverified"]),
        &["exists", "--force"],
    );
    fails(
        &export(&unstamped, &dest, &["--allow-unverified", "--force"]),
        &["not a q3vl compressed-tensors export"],
    );
    assert_eq!(std::fs::read(dest.join("notes.txt")).unwrap(), b"mine");
    std::fs::remove_dir_all(&dest).unwrap();
    assert!(export(&unstamped, &dest, &["--allow-unverified"])
        .status
        .success());
    assert!(
        export(&unstamped, &dest, &["--allow-unverified", "--force"])
            .status
            .success()
    );
    // A relative --out lands in the working folder.
    let o = common::q3vl()
        .args([
            "export",
            "compressed-tensors",
            "--bundle",
            s(&unstamped),
            "--out",
            "rel",
        ])
        .arg("--allow-unverified")
        .current_dir(&parent)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(parent.join("rel/q3vl_export.json").is_file());
    std::fs::remove_dir_all(parent.join("rel")).unwrap();
    assert_eq!(
        common::names_but_locks(&parent),
        vec!["export".to_string()],
        "no staging left"
    );
}

/// q3vl's fp32 reference on the bundles in `out`, for the fixture's two trace prompts
/// (full logits).
fn reference_traces(ckpt: &Path, traces: &Path, out: &Path, dir: &Path) -> Vec<PathBuf> {
    self_trace::write_on_bundles(ckpt, traces, out, dir, &["text", "image"])
}

/// Runs `oracle/check_export.py`; returns (success, its JSON summary, stderr).
fn check_export(
    py: &Path,
    export_dir: &Path,
    out: &Path,
    traces: &[PathBuf],
) -> (bool, Value, String) {
    let pair = Bundles::open(out).unwrap();
    let mut cmd = Command::new(py);
    cmd.arg(repo("oracle/check_export.py"))
        .args([
            "--export",
            s(export_dir),
            "--bundle",
            s(pair.language.dir()),
            "--vision",
            s(pair.vision.dir()),
        ])
        .env("OMP_NUM_THREADS", "2");
    for t in traces {
        cmd.args(["--trace", s(t)]);
    }
    let o = cmd.output().expect("the oracle's python runs");
    let summary = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    (
        o.status.success(),
        summary,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Exports `out` into `name`, writes the reference traces and runs the check: it must
/// pass with every position's logits cosine at least 0.999999 and some firm position in
/// every trace. Returns the export folder.
fn passes_in_transformers(
    py: &Path,
    what: &str,
    ckpt: &Path,
    traces: &Path,
    out: &Path,
    extra: &[&str],
) -> PathBuf {
    let dir = scratch(&format!("hf-{what}"));
    assert!(export(out, &dir, extra).status.success());
    let refs = reference_traces(ckpt, traces, out, &scratch(&format!("hf-traces-{what}")));
    let (passed, summary, err) = check_export(py, &dir, out, &refs);
    assert!(passed, "{what}: {err}\n{summary}");
    eprintln!("export in transformers: {what}: {summary}");
    assert!(summary["tensors_compared"].as_u64().unwrap() > 100);
    for t in summary["traces"].as_object().unwrap().values() {
        let (firm, cos) = (t["firm"].as_u64().unwrap(), t["min_cos"].as_f64().unwrap());
        assert!(firm > 0 && cos >= 0.999999, "{what}: {t}");
    }
    dir
}

#[test]
fn transformers_loads_the_export_with_the_references_weights_and_logits() {
    let Some(py) = common::oracle_python() else {
        eprintln!(
            "export in transformers: NOT RUN: the oracle environment is not installed (make oracle)"
        );
        return;
    };
    for (fx, mode, stamp) in [
        ("tied", "int8hu", true),
        ("shapes", "int8hu", false),
        ("tied", "int8lin", false),
    ] {
        let out = bundles(fx, mode, stamp);
        let extra: &[&str] = if stamp { &[] } else { &["--allow-unverified"] };
        let src = repo(&format!("fixtures/{fx}"));
        let dir = passes_in_transformers(
            &py,
            &format!("{fx}-{mode}"),
            &src,
            &src.join("traces"),
            &out,
            extra,
        );
        if (fx, mode) == ("tied", "int8hu") {
            for (tensor, bad) in damaged_exports(&dir, "hf") {
                let (passed, summary, err) = check_export(&py, &bad, &out, &[]);
                assert!(!passed, "damaged {tensor} passed: {summary}");
                assert!(
                    err.contains(&format!("{MODULE}.{tensor}")),
                    "{tensor}: {err}"
                );
            }
        }
    }
    // Random weights with the real vocabulary: logits near 25, small margins.
    let (ckpt, out) = common::fullvocab_bundles("untied");
    let traces = repo("fixtures/fullvocab/untied/traces");
    passes_in_transformers(
        &py,
        "fullvocab-int8hu",
        &ckpt,
        &traces,
        &out,
        &["--allow-unverified"],
    );
}

/// The decode tokens and top-1 margins of a trace.
fn trace_decode(path: &Path) -> (Vec<i64>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tokens = st.tensor("decode.tokens").unwrap();
    let tokens: Vec<i64> = tokens
        .data()
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let top = st.tensor("decode.top_values").unwrap();
    let k = top.shape()[1];
    let v: Vec<f32> = top
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (tokens, v.chunks(k).map(|r| r[0] - r[1]).collect())
}

/// An OpenAI chat-completions endpoint that answers one request with `reply` (given the
/// request's JSON body) and returns that body.
fn fake_endpoint(
    reply: impl FnOnce(&Value) -> Value + Send + 'static,
) -> (String, std::thread::JoinHandle<Value>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).unwrap();
        let request: Value = serde_json::from_slice(&body).unwrap();
        let out = reply(&request).to_string();
        let mut stream = stream;
        write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}", out.len()).unwrap();
        request
    });
    (url, handle)
}

#[test]
fn the_deployment_check_compares_an_endpoints_tokens_with_the_trace() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("deployment check: NOT RUN: no python3 on PATH");
        return;
    }
    let trace = repo("fixtures/shapes/traces/image.safetensors");
    let (tokens, margins) = trace_decode(&trace);
    let firm = margins.iter().position(|&m| m >= 0.1).expect("a firm step");
    let check = |url: &str, extra: &[&str]| {
        let script = repo("scripts/check-deployment.py");
        let args = ["--url", url, "--model", "m", "--trace", s(&trace)];
        Command::new("python3")
            .arg(&script)
            .args(args)
            .args(extra)
            .output()
            .unwrap()
    };
    let with_ids =
        |ids: Vec<i64>| move |_: &Value| serde_json::json!({"choices": [{"token_ids": ids}]});

    // The reference's own tokens pass; the request is the trace's conversation, greedy.
    let (url, server) = fake_endpoint(with_ids(tokens.clone()));
    let o = check(&url, &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let req = server.join().unwrap();
    assert_eq!(req["max_tokens"].as_u64(), Some(tokens.len() as u64));
    assert_eq!(req["temperature"], 0);
    let content = &req["messages"][0]["content"];
    assert!(content[0]["image_url"]["url"]
        .as_str()
        .unwrap()
        .starts_with("data:image/png;base64,"));
    let prompt = q3vl_verify::OracleTrace::open(&trace)
        .unwrap()
        .meta("prompt")
        .to_string();
    assert_eq!(content[1]["text"].as_str(), Some(prompt.as_str()));

    // vLLM's older spelling: logprobs whose tokens read "token_id:N".
    let spelled: Vec<Value> = tokens
        .iter()
        .map(|t| serde_json::json!({"token": format!("token_id:{t}")}))
        .collect();
    let (url, server) = fake_endpoint(
        move |_| serde_json::json!({"choices": [{"logprobs": {"content": spelled}}]}),
    );
    assert_eq!(check(&url, &[]).status.code(), Some(0));
    server.join().unwrap();

    // Another token at a firm step fails, naming it; as a close call it passes.
    let mut wrong = tokens.clone();
    wrong[firm] += 1;
    let (url, server) = fake_endpoint(with_ids(wrong.clone()));
    let o = check(&url, &[]);
    assert_eq!(o.status.code(), Some(1));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &summary["traces"]["image.safetensors"];
    assert_eq!(r["agreed"].as_u64(), Some(firm as u64));
    assert!(
        r["why"].as_str().unwrap().contains(&format!("step {firm}")),
        "{r}"
    );
    server.join().unwrap();
    let wrong_again = wrong.clone();
    let (url, server) = fake_endpoint(with_ids(wrong));
    assert_eq!(
        check(&url, &["--firm-margin", "1e9"]).status.code(),
        Some(0)
    );
    server.join().unwrap();

    // With verify's report.json, the trace's calibrated firm margin decides (matched by
    // the trace's sha256): above that difference, the same token is a close call.
    let report = scratch("deploy-report.json");
    let sha = sha256_hex(&std::fs::read(&trace).unwrap());
    let firm_there = f64::from(margins[firm]) + 1.0;
    let doc = serde_json::json!({"traces": [{"trace_sha256": sha, "firm_margin": firm_there}]});
    std::fs::write(&report, doc.to_string()).unwrap();
    let (url, server) = fake_endpoint(with_ids(wrong_again));
    let o = check(&url, &["--report", s(&report)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    server.join().unwrap();

    // An answer without choices, an endpoint that cannot be reached, and a file that is
    // not a trace: bad input.
    let (url, server) = fake_endpoint(|_| serde_json::json!({"choices": null}));
    assert_eq!(check(&url, &[]).status.code(), Some(2));
    server.join().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(
        check(&format!("http://{closed}/v1"), &[]).status.code(),
        Some(2)
    );
    let not_trace = repo("fixtures/shapes/config.json");
    let o = Command::new("python3")
        .arg(repo("scripts/check-deployment.py"))
        .args([
            "--url",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
            "--trace",
            s(&not_trace),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("config.json"));
}

#[test]
fn a_second_export_into_a_held_folder_fails_at_once_naming_it() {
    let out = bundles("tied", "int8hu", false);
    let parent = scratch("held");
    std::fs::create_dir_all(&parent).unwrap();
    // What a running export holds: the exclusive lock on its entry's lock file.
    let lock = std::fs::File::create(parent.join(".q3vl-lock-export")).unwrap();
    lock.try_lock().unwrap();
    let o = export(&out, &parent.join("export"), &["--allow-unverified"]);
    fails(&o, &["export", "another q3vl synth or export is writing"]);
    drop(lock);
    assert!(!parent.join("export").exists());
    assert!(
        export(&out, &parent.join("export"), &["--allow-unverified"])
            .status
            .success()
    );
}
