//! Cases for the bundle crate's readers: `metadata.json`, a whole pair opened and read
//! tensor by tensor, and the `verification.json` stamp.

use super::harness::{ensure, Case, Fail, Refuse};
use super::mutate::{json_file, safetensors_file, Rng};
use super::seeds::{pair, put};
use q3vl_bundle::stamp::{self, Stamp, StampStatus};
use q3vl_bundle::{Bundle, Bundles, Metadata};
use std::collections::BTreeMap;
use std::path::{Component, Path};

/// The output folder cases write a pair into (named so refusals that name it are
/// recognised).
pub const OUT: &str = "fuzz-out";

/// Whether `rel` stays inside the folder it is relative to.
fn stays_inside(rel: &str) -> bool {
    !rel.is_empty()
        && Path::new(rel)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// A file mutated the way its kind calls for.
fn mutated(rng: &mut Rng, rel: &str, bytes: &[u8]) -> Vec<u8> {
    if rel.ends_with(".safetensors") {
        safetensors_file(rng, bytes)
    } else {
        json_file(rng, bytes)
    }
}

/// `metadata.json` of either bundle. Accepted metadata names only files inside the
/// bundle and a companion that is a sibling folder.
pub fn metadata_json(rng: &mut Rng, dir: &Path) -> Case {
    let p = pair();
    let bundle = if rng.one_in(2) {
        &p.language
    } else {
        &p.vision
    };
    let seed = &p.files[&format!("{bundle}/metadata.json")];
    put(dir, "metadata.json", &json_file(rng, seed));
    let m = Metadata::read(dir).refused()?;
    if let Some(f) = m.files.keys().find(|f| !stays_inside(f)) {
        return Err(Fail::Broken(format!(
            "accepted a listed file {f:?} outside the bundle"
        )));
    }
    let companion_ok = m
        .companion
        .as_deref()
        .is_none_or(|c| stays_inside(c) && Path::new(c).components().count() == 1);
    ensure(companion_ok, || {
        format!("accepted companion {:?}", m.companion)
    })
}

/// Every accessor a reader of an open bundle calls, on every tensor.
fn read_all(b: &Bundle) -> Case {
    for name in b.tensor_names() {
        let _ = b.q8(name);
        b.dequantized(name).refused()?;
    }
    let _ = b.head_tensor();
    b.verify_checksums().refused()
}

/// Records `rel`'s new size and sha256 in its bundle's `metadata.json` (and that
/// file's new sha256 in the language bundle that names it as its companion), as a
/// writer that corrupts a file and its records together would: the reader must then
/// catch the damage by parsing, not by a recorded size or digest.
pub fn rerecord(out: &Path, rel: &str) {
    let Some((bundle, inner)) = rel.split_once('/') else {
        return;
    };
    if inner != "metadata.json" {
        let entry = q3vl_bundle::sha256_file(&out.join(rel)).expect("a scratch file");
        edit_json(&out.join(bundle).join("metadata.json"), |m| {
            if let Some(files) = m.get_mut("files").and_then(|f| f.as_object_mut()) {
                files.insert(
                    inner.into(),
                    serde_json::to_value(entry).expect("serializes"),
                );
            }
        });
    }
    let meta = q3vl_bundle::sha256_file(&out.join(bundle).join("metadata.json")).expect("a file");
    for other in std::fs::read_dir(out).expect("the output folder").flatten() {
        edit_json(&other.path().join("metadata.json"), |m| {
            if m.get("companion").and_then(|c| c.as_str()) == Some(bundle) {
                m["companion_sha256"] = meta.sha256.clone().into();
            }
        });
    }
}

/// Applies `f` to a JSON file that parses (others are left alone).
fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return;
    };
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).expect("serializes"))
        .expect("a scratch file");
}

/// The pair with one file of either bundle mutated (metadata, config, weights,
/// tokenizer or preprocessor files), mostly with its size and digest re-recorded in
/// the metadata, opened as a pair and read whole.
pub fn bundle_pair(rng: &mut Rng, dir: &Path) -> Case {
    let p = pair();
    let out = dir.join(OUT);
    p.write(&out);
    let rels: Vec<&String> = p.files.keys().collect();
    let victim = *rng.pick(&rels);
    put(&out, victim, &mutated(rng, victim, &p.files[victim]));
    if !rng.one_in(4) {
        rerecord(&out, victim);
    }
    let b = Bundles::open(&out).refused()?;
    read_all(&b.language)?;
    read_all(&b.vision)
}

/// The language bundle with a stamp made of its own files, then the stamp or one
/// bundle file mutated. A changed bundle file must never leave the stamp valid.
pub fn stamp(rng: &mut Rng, dir: &Path) -> Case {
    let p = pair();
    let out = dir.join(OUT);
    p.write(&out);
    let lang = out.join(&p.language);
    let s = Stamp {
        format: stamp::STAMP_FORMAT.into(),
        tool: "q3vl fuzz".into(),
        gates: serde_json::json!({"version": 2}),
        results: serde_json::json!([]),
        traces: BTreeMap::from([("image.safetensors".into(), "00".repeat(32))]),
        files: stamp::hash_bundle(&lang).expect("the pair hashes"),
    };
    stamp::write_stamp(&lang, &s).expect("the stamp writes");
    let stamp_path = lang.join(stamp::STAMP_FILE);
    let bundle_changed = if rng.one_in(4) {
        let rels = p.files_of(&p.language);
        let victim = rng.pick(&rels).clone();
        let bytes = mutated(rng, &victim, &p.files[&victim]);
        put(&out, &victim, &bytes);
        bytes != p.files[&victim]
    } else {
        let seed = std::fs::read(&stamp_path).expect("the stamp");
        std::fs::write(&stamp_path, json_file(rng, &seed)).expect("a scratch file");
        false
    };
    stamp::read_stamp(&lang).refused()?;
    match stamp::check_stamp(&lang) {
        StampStatus::Valid => ensure(!bundle_changed, || {
            "a changed bundle file left the stamp valid".into()
        }),
        StampStatus::Invalid(why) => Err(Fail::Refused(why)),
        StampStatus::Missing => Err(Fail::Broken(
            "a stamp that is there reported missing".into(),
        )),
    }
}
