//! Finding the language + vision pair a conversion wrote into one output folder.

use crate::error::BundleError;
use crate::metadata::{Kind, Metadata, Mode};
use crate::names::METADATA_FILE;
use crate::reader::Bundle;
use std::path::Path;

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
        let (lang_dir, out_dir) = if dir.join(METADATA_FILE).exists() {
            let m = Metadata::read(dir)?;
            if m.kind != Kind::Language {
                return Err(BundleError::Format {
                    path: dir.to_path_buf(),
                    msg: "is a vision bundle; pass the output folder or the language bundle".into(),
                });
            }
            let parent = dir.parent().unwrap_or(Path::new(".")).to_path_buf();
            (dir.to_path_buf(), parent)
        } else {
            let mut found = Vec::new();
            let entries = std::fs::read_dir(dir).map_err(|e| BundleError::io(dir, e))?;
            for e in entries {
                let p = e.map_err(|e| BundleError::io(dir, e))?.path();
                let hidden = p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                if hidden || !p.join(METADATA_FILE).is_file() {
                    continue;
                }
                if let Ok(m) = Metadata::read(&p) {
                    if m.kind == Kind::Language && mode.is_none_or(|want| m.mode == Some(want)) {
                        found.push(p);
                    }
                }
            }
            found.sort();
            match found.len() {
                1 => (found.remove(0), dir.to_path_buf()),
                0 => {
                    return Err(BundleError::Format {
                        path: dir.to_path_buf(),
                        msg: match mode {
                            Some(m) => format!("holds no {m} language bundle"),
                            None => "holds no language bundle (run q3vl convert first)".into(),
                        },
                    })
                }
                _ => {
                    let names: Vec<String> = found
                        .iter()
                        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .collect();
                    return Err(BundleError::Format {
                        path: dir.to_path_buf(),
                        msg: format!(
                            "holds several language bundles ({}); pass one of them",
                            names.join(", ")
                        ),
                    });
                }
            }
        };
        let language = Bundle::open(&lang_dir)?;
        let companion =
            language
                .metadata()
                .companion
                .clone()
                .ok_or_else(|| BundleError::Format {
                    path: lang_dir.join(METADATA_FILE),
                    msg: "names no companion vision bundle".into(),
                })?;
        let vision = Bundle::open(&out_dir.join(&companion))?;
        if vision.kind() != Kind::Vision {
            return Err(BundleError::Format {
                path: vision.dir().to_path_buf(),
                msg: "is not a vision bundle".into(),
            });
        }
        Ok(Bundles { language, vision })
    }
}
