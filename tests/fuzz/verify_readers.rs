//! Cases for the verifier's readers (oracle traces, gates files) and for the
//! converter, which reads a whole checkpoint folder and must either write a pair that
//! opens and prompts, or nothing.

use super::bundle_readers::OUT;
use super::harness::{ensure, Case, Fail, Refuse};
use super::mutate::{bytes_n, json_file, safetensors_file, Rng};
use super::seeds::{fixture, put, TRACES};
use q3vl_bundle::Bundles;
use q3vl_model::prompt::PromptBuilder;
use q3vl_verify::{Gates, OracleTrace};
use std::path::{Component, Path};

/// An oracle trace (header, `__metadata__`, offsets, data), opened and read through
/// every accessor the ladder uses. Its image path stays beside the trace.
pub fn trace(rng: &mut Rng, dir: &Path) -> Case {
    // The 6.7 MB trace one time in eight; the small ones otherwise.
    let rel = if rng.one_in(8) {
        TRACES[TRACES.len() - 1]
    } else {
        TRACES[rng.below(TRACES.len() - 1)]
    };
    let name = Path::new(rel)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a name");
    put(dir, name, &safetensors_file(rng, &fixture(rel)));
    let t = OracleTrace::open(&dir.join(name)).refused()?;
    for img in t.image_paths() {
        let inside = img
            .strip_prefix(dir)
            .is_ok_and(|r| r.components().all(|c| matches!(c, Component::Normal(_))));
        ensure(inside, || {
            format!("image path {} leaves the trace's folder", img.display())
        })?;
    }
    t.input_ids().refused()?;
    t.positions().refused()?;
    t.grids().refused()?;
    t.images().refused()?;
    t.messages().refused()?;
    t.top_k("logits").refused()?;
    t.lse("logits").refused()?;
    t.full_logits("logits").refused()?;
    if t.int("decode.tokens").is_ok() {
        t.decode_tokens().refused()?;
        t.top_k("decode").refused()?;
        t.lse("decode").refused()?;
    }
    let names: Vec<String> = t.float_names().map(str::to_owned).collect();
    for n in names {
        t.float(&n).refused()?;
    }
    Ok(())
}

/// A GGUF pair (`verify --gguf`): one of the two files mutated, mostly in its header
/// (keys, tensor infos), then opened as a model and, when accepted, every weight read
/// and dequantized by its HF name.
pub fn gguf(rng: &mut Rng, dir: &Path) -> Case {
    let (text, mmproj) = super::seeds::gguf_pair();
    let (mut t, mut m) = (text.clone(), mmproj.clone());
    let target = if rng.one_in(3) { &mut m } else { &mut t };
    // The header (keys and tensor infos) is the first ~12 KB of either file.
    let span = if rng.one_in(4) { target.len() } else { 12_288 };
    bytes_n(rng, target, span);
    put(dir, "model.gguf", &t);
    put(dir, "mmproj.gguf", &m);
    let model = q3vl_gguf::GgufModel::open(&dir.join("model.gguf"), Some(&dir.join("mmproj.gguf")))
        .refused()?;
    let cfg = &model.cfg;
    let names = q3vl_gguf::names::text_pairs(cfg, !cfg.tie_word_embeddings)
        .into_iter()
        .chain(q3vl_gguf::names::mmproj_pairs(cfg))
        .map(|(hf, _)| hf)
        .chain([q3vl_gguf::names::patch_embed()]);
    for hf in names {
        model.weight(&hf).refused()?;
    }
    model.mode();
    Ok(())
}

/// A `--gates` file.
pub fn gates(rng: &mut Rng, dir: &Path) -> Case {
    let seed =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("verify/gates/default.json"))
            .expect("the default gates");
    put(dir, "gates.json", &json_file(rng, &seed));
    Gates::from_file(&dir.join("gates.json"))
        .refused()
        .map(drop)
}

/// The files of `fixtures/tied` a conversion reads.
const SOURCE_FILES: [&str; 7] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",
];

/// Whether `out` holds anything that looks like a bundle.
fn holds_a_bundle(out: &Path) -> bool {
    std::fs::read_dir(out).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.path().join("metadata.json").exists())
    })
}

/// A conversion of `fixtures/tied` with one source file mutated. A refusal leaves no
/// bundle; a success leaves a pair that opens, whose tokenizer and chat template
/// render and encode a conversation.
pub fn convert(rng: &mut Rng, dir: &Path) -> Case {
    let src = dir.join("tied");
    let victim = *rng.pick(&SOURCE_FILES);
    for f in SOURCE_FILES {
        let seed = fixture(&format!("tied/{f}"));
        let bytes = match (f == victim, f) {
            (false, _) => seed,
            (true, "model.safetensors") => safetensors_file(rng, &seed),
            (true, "chat_template.jinja") => {
                let mut t = seed;
                bytes_n(rng, &mut t, usize::MAX);
                t
            }
            (true, _) => json_file(rng, &seed),
        };
        put(&src, f, &bytes);
    }
    let out = dir.join(OUT);
    let mut o = q3vl_convert::ConvertOptions::new(&src, &out);
    o.threads = Some(1);
    if let Err(e) = q3vl_convert::convert(&o, &q3vl_convert::Quiet, &q3vl_convert::Cancel::new()) {
        ensure(!holds_a_bundle(&out), || {
            format!("refused ({e}) but left a bundle")
        })?;
        return Err(Fail::Refused(e.to_string()));
    }
    let broken = |what: &str, e: &dyn std::fmt::Display| {
        Fail::Broken(format!("converted with {victim} mutated, but {what}: {e}"))
    };
    let b = Bundles::open(&out).map_err(|e| broken("the pair does not open", &e))?;
    let pb = PromptBuilder::from_dir(&b.language.dir().join("tokenizer"), b.language.config())
        .map_err(|e| broken("its tokenizer does not load", &e))?;
    pb.chat("What is in the image?", Some([1, 4, 4]))
        .map_err(|e| broken("its chat template does not render", &e))?;
    Ok(())
}
