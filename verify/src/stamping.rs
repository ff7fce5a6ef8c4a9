//! The bundles' side of a verification: their checksums checked before any gate runs,
//! and `verification.json` written into both when every gate passed, provided their
//! bytes are still the ones checked.

use crate::error::{Result, VerifyError};
use crate::report::Report;
use q3vl_bundle::stamp::{
    bundle_files, compare, hash_bundle, remove_stamp, write_stamp, StampedFile, STAMP_FORMAT,
};
use q3vl_bundle::{Bundle, Bundles, Stamp};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Each bundle folder's files as they were verified (language, then vision).
pub(crate) type Digests = Vec<BTreeMap<String, StampedFile>>;

/// What a stamp attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stamping {
    /// Both bundles stamped: the `verification.json` files written.
    Stamped(Vec<PathBuf>),
    /// A gate failed: no stamp, and any old one removed.
    GateFailed,
}

/// Checks both bundles against their `metadata.json` checksums before any gate runs:
/// gates on a damaged bundle mean nothing, and it must never be stamped. With `hash`,
/// also returns each folder's digests as they were verified, which must still hold
/// when the stamp is written.
pub(crate) fn check(b: &Bundles, hash: bool) -> Result<Digests> {
    let dirs = [&b.language, &b.vision];
    for bundle in dirs {
        bundle.verify_checksums()?;
        only_listed_files(bundle)?;
    }
    Ok(match hash {
        true => dirs
            .iter()
            .map(|d| hash_bundle(d.dir()))
            .collect::<std::result::Result<_, _>>()?,
        false => Vec::new(),
    })
}

/// A bundle folder holds only `metadata.json` and the files it lists: anything else
/// would be stamped without a checksum or a gate having looked at it.
fn only_listed_files(bundle: &Bundle) -> Result<()> {
    let listed = |f: &String| {
        f == q3vl_bundle::names::METADATA_FILE || bundle.metadata().files.contains_key(f)
    };
    match bundle_files(bundle.dir())?.into_iter().find(|f| !listed(f)) {
        Some(file) => Err(VerifyError::Unlisted {
            dir: bundle.dir().to_path_buf(),
            file,
        }),
        None => Ok(()),
    }
}

/// Stamps both bundles when every gate of `report` passed and their bytes are still
/// the ones checked before the gates (`digests`); otherwise removes any old stamp.
/// `traces` are the verified traces' file names and sha256s.
pub(crate) fn stamp(
    b: &Bundles,
    digests: &Digests,
    report: &Report,
    traces: &[(String, String)],
) -> Result<Stamping> {
    let dirs = [b.language.dir(), b.vision.dir()];
    for (d, before) in dirs.iter().zip(digests) {
        if let Some(why) = compare(d, before)? {
            for d in dirs {
                remove_stamp(d)?;
            }
            return Err(VerifyError::Changed {
                dir: d.to_path_buf(),
                why,
            });
        }
    }
    if !report.passed() {
        for d in dirs {
            remove_stamp(d)?;
        }
        return Ok(Stamping::GateFailed);
    }
    // Plain data: serialising it cannot fail.
    let results = serde_json::to_value(
        report
            .traces
            .iter()
            .map(|t| (t.trace.display().to_string(), &t.gates))
            .collect::<Vec<_>>(),
    )
    .expect("gate results serialise");
    let gates = serde_json::to_value(&report.gates).expect("gates serialise");
    let mut written = Vec::new();
    for (d, files) in dirs.into_iter().zip(digests) {
        let s = Stamp {
            format: STAMP_FORMAT.into(),
            tool: report.tool.clone(),
            gates: gates.clone(),
            results: results.clone(),
            traces: traces.iter().cloned().collect(),
            files: files.clone(),
        };
        write_stamp(d, &s)?;
        written.push(d.join(q3vl_bundle::STAMP_FILE));
    }
    Ok(Stamping::Stamped(written))
}
