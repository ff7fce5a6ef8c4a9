//! The bundle pair an export reads, and what the export records about it.
//!
//! An export hands q3vl's weights to another runtime, so it must say what those weights
//! were checked against: it reads only a pair whose verification stamps hold for every
//! byte (`q3vl verify --stamp`), unless the user says `--allow-unverified`, and the
//! export's provenance names the source checkpoint, both bundles and the stamp's
//! results. The pair is read under a [`ReadClaim`], so a conversion cannot replace it
//! while the export reads it.

use crate::error::{ExportError, Result};
use q3vl_bundle::{
    pair_status, Bundle, Bundles, FileEntry, Producer, ReadClaim, Source, StampStatus,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// A bundle pair opened for export.
pub struct ExportSource {
    /// The language and vision bundles.
    pub bundles: Bundles,
    /// The verification the pair carries; `None` when exported with
    /// `--allow-unverified` from a pair without a valid stamp.
    pub verification: Option<Verification>,
    _claim: ReadClaim,
}

/// What a pair's verification stamps say, in short.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// The verifier that stamped the pair (`q3vl 0.1.0 (commit)`).
    pub tool: String,
    /// Every trace the gates ran on: file name → sha256.
    pub traces: BTreeMap<String, String>,
    /// Gates that passed, over every trace.
    pub gates_passed: usize,
    /// Gates that ran, over every trace.
    pub gates_total: usize,
    /// BLAKE3 of each bundle's `verification.json` (the full results).
    pub stamp_blake3: BTreeMap<String, String>,
}

/// Opens the pair in `bundle` (an output folder or a language bundle folder) for
/// export. Without `allow_unverified` a pair whose stamps are missing or no longer
/// hold is refused; with it, every file is still checked against its bundle's
/// `metadata.json`, so a damaged bundle is never exported.
pub fn open(bundle: &Path, allow_unverified: bool) -> Result<ExportSource> {
    let claim = ReadClaim::for_bundles(bundle)?;
    let bundles = Bundles::open(bundle)?;
    let (lang, vision) = (bundles.language.dir(), bundles.vision.dir());
    let verification = match pair_status(lang, vision) {
        StampStatus::Valid => Some(Verification::read(&bundles)?),
        _ if allow_unverified => {
            bundles.language.verify_checksums()?;
            bundles.vision.verify_checksums()?;
            None
        }
        StampStatus::Missing => {
            return Err(ExportError::Unverified {
                path: lang.to_path_buf(),
                why: "the pair carries no verification stamp".into(),
            })
        }
        StampStatus::Invalid(why) => {
            return Err(ExportError::Unverified {
                path: lang.to_path_buf(),
                why: format!("the verification stamp does not hold ({why})"),
            })
        }
    };
    Ok(ExportSource {
        bundles,
        verification,
        _claim: claim,
    })
}

impl Verification {
    /// Summarizes the language bundle's stamp (both stamps hold the same results).
    fn read(bundles: &Bundles) -> Result<Verification> {
        let dir = bundles.language.dir();
        let stamp =
            q3vl_bundle::stamp::read_stamp(dir)?.ok_or_else(|| ExportError::Unverified {
                path: dir.to_path_buf(),
                why: "the verification stamp vanished while it was read".into(),
            })?;
        let gates: Vec<&serde_json::Value> = stamp
            .results
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|per_trace| per_trace.get(1)?.as_array())
            .flatten()
            .collect();
        let mut stamp_blake3 = BTreeMap::new();
        for b in [&bundles.language, &bundles.vision] {
            let f = q3vl_bundle::stamp::blake3_file(&b.dir().join(q3vl_bundle::STAMP_FILE))?;
            stamp_blake3.insert(b.metadata().name.clone(), f.blake3);
        }
        Ok(Verification {
            tool: stamp.tool,
            traces: stamp.traces,
            gates_passed: gates.iter().filter(|g| g["passed"] == true).count(),
            gates_total: gates.len(),
            stamp_blake3,
        })
    }
}

/// What an export records about where its weights came from (`q3vl_export.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    /// Always [`PROVENANCE_FORMAT`].
    pub format: &'static str,
    /// The export format (`compressed-tensors`).
    pub export: &'static str,
    /// The q3vl build that wrote the export.
    pub producer: Producer,
    /// The checkpoint the bundles were converted from (HF id, revision, every file's
    /// sha256).
    pub source: Source,
    /// The bundles exported: name → (mode, sha256 of its `metadata.json`, which lists
    /// the sha256 of every file, and the q3vl build that converted it).
    pub bundles: BTreeMap<String, BundleRef>,
    /// The pair's verification; `null` for an export made with `--allow-unverified`.
    pub verification: Option<Verification>,
    /// Where the export is not a byte-for-byte repack of the bundles, and why.
    pub notes: Vec<String>,
    /// Size and sha256 of every other file of the export.
    pub files: BTreeMap<String, FileEntry>,
}

/// One exported bundle, by digest.
#[derive(Debug, Clone, Serialize)]
pub struct BundleRef {
    /// `language` or `vision`.
    pub kind: String,
    /// The conversion mode (language bundles).
    pub mode: Option<String>,
    /// sha256 of the bundle's `metadata.json`.
    pub metadata_sha256: String,
    /// The q3vl build that converted it.
    pub producer: Producer,
}

/// The format tag of `q3vl_export.json`.
pub const PROVENANCE_FORMAT: &str = "q3vl-export/1";
/// The provenance file every q3vl export holds (also how `--force` knows a folder is
/// one q3vl wrote).
pub const PROVENANCE_FILE: &str = "q3vl_export.json";

impl Provenance {
    /// The provenance of an export of `src` in format `export`, written by `producer`.
    pub fn new(
        export: &'static str,
        src: &ExportSource,
        producer: Producer,
        notes: Vec<String>,
    ) -> Result<Provenance> {
        let mut bundles = BTreeMap::new();
        for b in [&src.bundles.language, &src.bundles.vision] {
            bundles.insert(b.metadata().name.clone(), bundle_ref(b)?);
        }
        Ok(Provenance {
            format: PROVENANCE_FORMAT,
            export,
            producer,
            source: src.bundles.language.metadata().source.clone(),
            bundles,
            verification: src.verification.clone(),
            notes,
            files: BTreeMap::new(),
        })
    }
}

fn bundle_ref(b: &Bundle) -> Result<BundleRef> {
    let meta = b.dir().join("metadata.json");
    let m = b.metadata();
    Ok(BundleRef {
        kind: serde_json::to_value(m.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        mode: m.mode.map(|x| x.as_str().to_owned()),
        metadata_sha256: q3vl_bundle::sha256_file(&meta)?.sha256,
        producer: m.producer.clone(),
    })
}
