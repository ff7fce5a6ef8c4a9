//! Finding the language + vision pair a conversion wrote into one output folder, and
//! refusing a pair that no conversion completed.
//!
//! The two bundles are two folders, and two folders cannot appear by one atomic
//! rename. So the pair is bound instead: the language bundle records the sha256 of
//! its vision bundle's `metadata.json` (`companion_sha256`; that file lists the sha256
//! of every vision file), and the converter commits the vision bundle first and the
//! language bundle, the pair's entry point, last. Whatever a kill interrupts, the
//! reader sees a complete pair or refuses it with one line: no language bundle yet,
//! its vision bundle missing, or a vision bundle from another conversion. A plain
//! re-run of `q3vl convert` repairs such a pair (see [`Bundles::companion_of`]).

use crate::checksum::sha256_file;
use crate::error::BundleError;
use crate::metadata::{Kind, Metadata, Mode};
use crate::names::METADATA_FILE;
use crate::reader::Bundle;
use std::path::{Path, PathBuf};

/// The two bundles of one model: what `q3vl run --bundle` and `q3vl verify --bundle` load.
pub struct Bundles {
    /// The decoder bundle (`<short>_decode_<mode>`).
    pub language: Bundle,
    /// The vision bundle (`<short>_vision`), named by the language bundle's `companion`.
    pub vision: Bundle,
}

impl Bundles {
    /// Opens the pair from `dir`, which is either a conversion's output folder holding
    /// exactly one language bundle, or a language bundle folder itself (its vision
    /// bundle is then a sibling).
    pub fn open(dir: &Path) -> Result<Bundles, BundleError> {
        Self::open_mode(dir, None)
    }

    /// Like [`Bundles::open`], choosing the language bundle of `mode` when the output
    /// folder holds several.
    pub fn open_mode(dir: &Path, mode: Option<Mode>) -> Result<Bundles, BundleError> {
        // The vision bundle is a sibling of the real folder, not of a link to it or of
        // `.`; and this is the folder [`crate::ReadClaim::for_bundles`] locked.
        let dir = &crate::staging::real_path(dir);
        let lang_dir = if dir.join(METADATA_FILE).exists() {
            let m = Metadata::read(dir)?;
            if m.kind != Kind::Language {
                return Err(BundleError::Format {
                    path: dir.to_path_buf(),
                    msg: "is a vision bundle; pass the output folder or the language bundle".into(),
                });
            }
            dir.to_path_buf()
        } else {
            the_language_bundle(dir, mode)?
        };
        let language = Bundle::open(&lang_dir)?;
        let vision_dir = Self::companion_of(&lang_dir, language.metadata())?;
        let vision = Bundle::open(&vision_dir)?;
        if vision.kind() != Kind::Vision {
            return Err(BundleError::Format {
                path: vision.dir().to_path_buf(),
                msg: "is not a vision bundle".into(),
            });
        }
        Ok(Bundles { language, vision })
    }

    /// The language bundles in output folder `out` (visible folders whose
    /// `metadata.json` reads as a language bundle, of `mode` when given), sorted.
    pub fn language_bundles(out: &Path, mode: Option<Mode>) -> Result<Vec<PathBuf>, BundleError> {
        let mut found = Vec::new();
        let entries = std::fs::read_dir(out).map_err(|e| BundleError::io(out, e))?;
        for e in entries {
            let p = e.map_err(|e| BundleError::io(out, e))?.path();
            let hidden = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden || !p.join(METADATA_FILE).is_file() {
                continue;
            }
            // A damaged metadata.json is reported, not taken for "no bundle here"; a
            // folder whose metadata.json is another tool's is not a bundle.
            let m = match Metadata::read(&p) {
                Ok(m) => m,
                Err(_) if foreign_metadata(&p) => continue,
                Err(e) => return Err(e),
            };
            if m.kind == Kind::Language && mode.is_none_or(|want| m.mode == Some(want)) {
                found.push(p);
            }
        }
        found.sort();
        Ok(found)
    }

    /// The vision bundle that the language bundle in `lang_dir` (with metadata `lang`)
    /// was converted with: its `companion`, a sibling folder, whose `metadata.json` has
    /// the sha256 the language bundle recorded. Anything else is a pair no conversion
    /// completed (a run killed between its two commits, or another conversion's
    /// vision bundle under the same name) and is refused, naming the culprit.
    pub fn companion_of(lang_dir: &Path, lang: &Metadata) -> Result<PathBuf, BundleError> {
        let lang_meta = lang_dir.join(METADATA_FILE);
        let format = |path: PathBuf, msg: String| BundleError::Format { path, msg };
        let companion = lang
            .companion
            .as_deref()
            .ok_or_else(|| format(lang_meta.clone(), "names no companion vision bundle".into()))?;
        let expected = lang.companion_sha256.as_deref().ok_or_else(|| {
            format(
                lang_meta.clone(),
                "records no companion_sha256 (written by an older q3vl); convert again with --force".into(),
            )
        })?;
        let parent = lang_dir.parent().unwrap_or(Path::new("."));
        let vision_dir = parent.join(companion);
        let repair = "run the same q3vl convert again to repair the pair";
        let found = match sha256_file(&vision_dir.join(METADATA_FILE)) {
            Ok(f) => f.sha256,
            Err(_) => {
                return Err(format(
                    vision_dir,
                    format!(
                        "missing: the vision bundle of {} is not there (an interrupted conversion?); {repair}",
                        lang.name
                    ),
                ))
            }
        };
        if found != expected {
            return Err(format(
                vision_dir.join(METADATA_FILE),
                format!(
                    "not the vision bundle {} was converted with (sha256 {found}, its companion_sha256 is {expected}); {repair}",
                    lang.name
                ),
            ));
        }
        Ok(vision_dir)
    }
}

/// Whether `dir/metadata.json` is another tool's: valid JSON with no q3vl format tag
/// at all. A q3vl tag of another version, a mangled one (a `format` that starts with
/// "q3vl") or a file that does not parse is a damaged bundle, not someone else's file.
fn foreign_metadata(dir: &Path) -> bool {
    let Ok(bytes) = q3vl_model::input::read_regular(&dir.join(METADATA_FILE)) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return false;
    };
    let tag = v.get("format").and_then(|f| f.as_str()).unwrap_or_default();
    !tag.to_ascii_lowercase().starts_with("q3vl")
}

/// The one language bundle (of `mode`, when given) in output folder `dir`.
fn the_language_bundle(dir: &Path, mode: Option<Mode>) -> Result<PathBuf, BundleError> {
    let mut found = Bundles::language_bundles(dir, mode)?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(BundleError::Format {
            path: dir.to_path_buf(),
            msg: match mode {
                Some(m) => format!("holds no {m} language bundle"),
                None => "holds no language bundle (run q3vl convert first)".into(),
            },
        }),
        _ => {
            let names: Vec<String> = found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            Err(BundleError::Format {
                path: dir.to_path_buf(),
                msg: format!(
                    "holds several language bundles ({}); pass one of them",
                    names.join(", ")
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::BundleWriter;
    use crate::{Dtype, ShardPolicy, TensorPlan, WeightsWriter};

    /// A bundle writer `name` in `out` holding a config and one f32 tensor.
    fn writer(out: &Path, name: &str) -> BundleWriter {
        let mut w = BundleWriter::create(out, name).unwrap();
        let plan = [TensorPlan::new("n", Dtype::F32, vec![2])];
        let mut ww =
            WeightsWriter::create(w.dir(), &plan, ShardPolicy::default(), &Default::default())
                .unwrap();
        ww.write("n", vec![0; 8]).unwrap();
        w.record(ww.finish().unwrap());
        let cfg = q3vl_model::Qwen3VlConfig::preset(q3vl_model::Size::B2).to_hf_json();
        w.add_file("config.json", &serde_json::to_vec_pretty(&cfg).unwrap())
            .unwrap();
        w
    }

    /// Metadata of `kind` listing the tensor [`writer`] stores.
    fn meta(kind: Kind, name: &str) -> Metadata {
        let mut m = Metadata::new(kind, name);
        let t = crate::TensorMeta {
            class: "vector".into(),
            scheme: crate::Scheme::F32,
            source: None,
        };
        m.tensors.insert("n".into(), t);
        m
    }

    /// Commits a vision bundle `v` and a language bundle `l` bound to it; `salt` makes
    /// another conversion's vision bundle.
    fn pair(out: &Path, salt: &str) {
        let mut w = writer(out, "v");
        w.add_file("salt", salt.as_bytes()).unwrap();
        let v = w.finish(meta(Kind::Vision, "v")).unwrap();
        let digest = v.metadata_sha256().to_string();
        v.commit(true).unwrap();
        let w = writer(out, "l");
        let mut m = meta(Kind::Language, "l");
        m.companion = Some("v".into());
        m.companion_sha256 = Some(digest);
        w.finish(m).unwrap().commit(true).unwrap();
    }

    #[test]
    fn a_complete_pair_opens() {
        let out = tempfile::tempdir().unwrap();
        pair(out.path(), "a");
        let b = Bundles::open(out.path()).unwrap();
        assert_eq!(b.vision.dir(), out.path().join("v"));
        Bundles::open(&out.path().join("l")).unwrap();
    }

    #[test]
    fn a_damaged_metadata_is_reported_and_another_tools_is_skipped() {
        let out = tempfile::tempdir().unwrap();
        pair(out.path(), "a");
        let other = out.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(
            other.join(METADATA_FILE),
            br#"{"format": "not-ours", "kind": "x"}"#,
        )
        .unwrap();
        Bundles::open(out.path()).expect("another tool's metadata.json is not a bundle");
        let lang = out.path().join("l").join(METADATA_FILE);
        let text = std::fs::read_to_string(&lang).unwrap();
        for (bad, why) in [
            (
                text.replace("\"q3vl-bundle\"", "\"q3vl-bundlX\""),
                "format is",
            ),
            (
                text.replace("\"format_version\": 1", "\"format_version\": 9"),
                "format_version",
            ),
            (text[..text.len() / 2].to_string(), "not valid JSON"),
        ] {
            assert_ne!(bad, text);
            std::fs::write(&lang, &bad).unwrap();
            let e = Bundles::open(out.path()).err().unwrap().to_string();
            assert!(e.contains("l/metadata.json") && e.contains(why), "{e}");
            assert!(!e.contains("holds no language bundle"), "{e}");
        }
    }

    #[test]
    fn a_pair_no_conversion_completed_is_refused() {
        let out = tempfile::tempdir().unwrap();
        pair(out.path(), "a");
        // Another conversion's vision bundle under the same name.
        let other = tempfile::tempdir().unwrap();
        pair(other.path(), "b");
        std::fs::remove_dir_all(out.path().join("v")).unwrap();
        std::fs::rename(other.path().join("v"), out.path().join("v")).unwrap();
        let e = Bundles::open(out.path()).err().unwrap().to_string();
        assert!(
            e.contains("not the vision bundle l was converted with"),
            "{e}"
        );
        assert!(
            e.contains("v/metadata.json") && e.contains("convert again"),
            "{e}"
        );
        // No vision bundle at all.
        std::fs::remove_dir_all(out.path().join("v")).unwrap();
        let e = Bundles::open(out.path()).err().unwrap().to_string();
        assert!(e.contains("missing") && e.contains("/v:"), "{e}");
        // A language bundle that does not bind its companion.
        let mut m = Metadata::read(&out.path().join("l")).unwrap();
        m.companion_sha256 = None;
        std::fs::write(out.path().join("l").join(METADATA_FILE), m.to_bytes()).unwrap();
        let e = Bundles::open(out.path()).err().unwrap().to_string();
        assert!(e.contains("companion_sha256"), "{e}");
    }
}
