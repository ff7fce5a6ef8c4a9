//! `verification.json`: the stamp `q3vl verify --stamp` writes beside a bundle's
//! `metadata.json` when, and only when, every gate passed on these exact bytes.
//!
//! The stamp binds the gate results to every file of the bundle folder (sub-folders
//! included, the stamp itself excepted): each one's size and BLAKE3 digest. A stamp
//! is valid only while the folder holds exactly those files with exactly those bytes,
//! so an edited weight, an edited chat template, a removed file or an added one (a
//! file the loader would read, such as a `chat_template.jinja`) all invalidate it.
//!
//! BLAKE3, not the sha256 that `metadata.json` records, because the stamp is checked
//! on every `q3vl run --require-verified`: BLAKE3 hashes one file on all cores with
//! SIMD, several times faster than sha256 (BENCHMARKS.md gives the 8B's cost), and most
//! of the pages it reads are the ones the engine has just paged in, still in the cache.

use crate::error::BundleError;
use q3vl_model::error::printable;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The stamp's file name inside a bundle folder.
pub const STAMP_FILE: &str = "verification.json";
/// The stamp's format tag. Version 1 bound `metadata.json` only and is refused.
pub const STAMP_FORMAT: &str = "q3vl-verification/2";

/// One stamped file: its size and BLAKE3 digest (hex).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StampedFile {
    /// Bytes.
    pub size: u64,
    /// BLAKE3 of the whole file, lowercase hex.
    pub blake3: String,
}

/// The contents of `verification.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stamp {
    /// Always [`STAMP_FORMAT`].
    pub format: String,
    /// The verifier that wrote it (`q3vl 0.1.0 (commit)`).
    pub tool: String,
    /// The gates file used, verbatim.
    pub gates: serde_json::Value,
    /// Every gate result, per trace.
    pub results: serde_json::Value,
    /// Trace file name → sha256 of the trace.
    pub traces: BTreeMap<String, String>,
    /// Every file of the bundle folder (relative `/`-separated path → size and BLAKE3),
    /// `metadata.json` included, the stamp excluded.
    pub files: BTreeMap<String, StampedFile>,
}

/// Whether a bundle carries a stamp that still matches its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StampStatus {
    /// No `verification.json`.
    Missing,
    /// Present, and the folder holds exactly the stamped files, byte for byte.
    Valid,
    /// Present but something changed (the reason names the file).
    Invalid(String),
}

impl std::fmt::Display for StampStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StampStatus::Missing => write!(f, "not verified (no {STAMP_FILE})"),
            StampStatus::Valid => write!(f, "verified (every byte matches {STAMP_FILE})"),
            StampStatus::Invalid(why) => write!(f, "verification stamp INVALID: {why}"),
        }
    }
}

/// The prefix of the temporary names a stamp is written under before its rename (no
/// loader reads them, so they are not part of what a stamp covers).
fn stamp_tmp_prefix() -> String {
    format!(".{STAMP_FILE}.tmp")
}

/// Every regular file below `dir` (relative, `/`-separated, sorted), the stamp and its
/// temporary file excepted. Anything that is neither a folder nor a regular file (a
/// symlink, a FIFO, a device) is an error: a stamp cannot vouch for it.
pub fn bundle_files(dir: &Path) -> Result<Vec<String>, BundleError> {
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), BundleError> {
    let entries = std::fs::read_dir(dir).map_err(|e| BundleError::io(dir, e))?;
    for e in entries {
        let e = e.map_err(|e| BundleError::io(dir, e))?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        if rel == STAMP_FILE || rel.starts_with(&stamp_tmp_prefix()) {
            continue;
        }
        let kind = e.file_type().map_err(|err| BundleError::io(&path, err))?;
        if kind.is_dir() {
            walk(&path, &format!("{rel}/"), out)?;
        } else if kind.is_file() {
            out.push(rel);
        } else {
            return Err(BundleError::Format {
                path,
                msg: "is not a regular file (a bundle holds only files and folders)".into(),
            });
        }
    }
    Ok(())
}

/// Bytes per read while hashing.
const PIECE: usize = 16 << 20;

/// Size and BLAKE3 of one regular file, hashed on all the rayon pool's threads while
/// one thread reads the next 16 MiB piece. Reads rather than a mapping: a file another
/// program truncates meanwhile is an error, not a SIGBUS, and the pages stay in the page
/// cache for the engine without counting in this process's resident set.
pub fn blake3_file(path: &Path) -> Result<StampedFile, BundleError> {
    let mut f = q3vl_model::input::open_regular(path).map_err(|e| BundleError::Format {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let mut h = blake3::Hasher::new();
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<std::io::Result<(Vec<u8>, usize)>>(1);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        s.spawn(move || loop {
            let mut buf = empty_rx.try_recv().unwrap_or_else(|_| vec![0u8; PIECE]);
            let got = fill(&mut f, &mut buf).map(|n| (buf, n));
            let done = !matches!(got, Ok((_, n)) if n > 0);
            if full_tx.send(got).is_err() || done {
                break;
            }
        });
        for piece in full_rx {
            let (buf, n) = piece.map_err(|e| BundleError::io(path, e))?;
            h.update_rayon(&buf[..n]);
            // The reader may be gone (end of file): the buffer is simply dropped.
            let _ = empty_tx.send(buf);
        }
        Ok::<(), BundleError>(())
    })?;
    Ok(StampedFile {
        size: h.count(),
        blake3: h.finalize().to_hex().to_string(),
    })
}

/// Reads until `buf` is full or the file ends; the bytes read.
fn fill(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Hashes every file of a bundle folder ([`bundle_files`]).
pub fn hash_bundle(dir: &Path) -> Result<BTreeMap<String, StampedFile>, BundleError> {
    bundle_files(dir)?
        .into_iter()
        .map(|f| Ok((f.clone(), blake3_file(&dir.join(&f))?)))
        .collect()
}

/// Writes `stamp` into `dir` atomically (a temporary file renamed into place).
///
/// The temporary name is unique to the call and created exclusively (two verifiers at
/// once cannot rename each other's file, and a planted link at that name is refused,
/// not written through); file and folder are synced around the rename.
pub fn write_stamp(dir: &Path, stamp: &Stamp) -> Result<(), BundleError> {
    use std::io::Write;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(
        "{}-{}-{nanos}",
        stamp_tmp_prefix(),
        std::process::id()
    ));
    let text = serde_json::to_string_pretty(stamp).expect("stamp serialises");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(BundleError::io(&tmp, e));
    }
    let dst = dir.join(STAMP_FILE);
    if let Err(e) = std::fs::rename(&tmp, &dst) {
        let _ = std::fs::remove_file(&tmp);
        return Err(BundleError::io(&dst, e));
    }
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| BundleError::io(dir, e))
}

/// Removes a stamp (a failed verification must not leave an old one standing).
pub fn remove_stamp(dir: &Path) -> Result<(), BundleError> {
    let p = dir.join(STAMP_FILE);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BundleError::io(&p, e)),
    }
}

/// Reads the stamp, if any. A stamp of another format (version 1 included) is an
/// error that says to verify again.
pub fn read_stamp(dir: &Path) -> Result<Option<Stamp>, BundleError> {
    let p = dir.join(STAMP_FILE);
    if std::fs::symlink_metadata(&p).is_err() {
        return Ok(None);
    }
    let bad = |msg: String| BundleError::Format {
        path: p.clone(),
        msg,
    };
    if !std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
        return Err(bad("is not a regular file".into()));
    }
    let text = std::fs::read_to_string(&p).map_err(|e| BundleError::io(&p, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a valid stamp: {e}")))?;
    let format = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
    if format != STAMP_FORMAT {
        return Err(bad(format!(
            "format {format:?} is not {STAMP_FORMAT:?} (verify again with --stamp)"
        )));
    }
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| bad(format!("not a valid stamp: {e}")))
}

/// Checks a bundle's stamp against every byte of the folder: the same files, each
/// with its stamped size and BLAKE3 digest. The first difference is named.
pub fn check_stamp(dir: &Path) -> StampStatus {
    let stamp = match read_stamp(dir) {
        Ok(None) => return StampStatus::Missing,
        Ok(Some(s)) => s,
        Err(e) => return StampStatus::Invalid(e.to_string()),
    };
    match compare(dir, &stamp.files) {
        Ok(None) => StampStatus::Valid,
        Ok(Some(why)) => StampStatus::Invalid(why),
        Err(e) => StampStatus::Invalid(e.to_string()),
    }
}

/// The combined stamp status of a language and a vision bundle: valid only if both
/// are; otherwise the first problem, naming its folder. (The pair itself is bound by
/// the language bundle's `companion_sha256`, which [`crate::Bundles::open`] checks.)
pub fn pair_status(language: &Path, vision: &Path) -> StampStatus {
    for dir in [language, vision] {
        match check_stamp(dir) {
            StampStatus::Valid => {}
            StampStatus::Missing => return StampStatus::Missing,
            StampStatus::Invalid(why) => {
                return StampStatus::Invalid(format!("{}: {why}", printable(dir.display())))
            }
        }
    }
    StampStatus::Valid
}

/// The first difference between the folder and `want`, or `None` when there is none.
pub fn compare(
    dir: &Path,
    want: &BTreeMap<String, StampedFile>,
) -> Result<Option<String>, BundleError> {
    let found = bundle_files(dir)?;
    if let Some(f) = want.keys().find(|f| !found.contains(f)) {
        return Ok(Some(format!(
            "{} was removed since it was verified",
            printable(f)
        )));
    }
    if let Some(f) = found.iter().find(|f| !want.contains_key(*f)) {
        return Ok(Some(format!(
            "{} was added since it was verified",
            printable(f)
        )));
    }
    for (rel, stamped) in want {
        let path = dir.join(rel);
        let size = std::fs::symlink_metadata(&path)
            .map_err(|e| BundleError::io(&path, e))?
            .len();
        if size != stamped.size {
            return Ok(Some(format!(
                "{} changed size since it was verified",
                printable(rel)
            )));
        }
    }
    for (rel, stamped) in want {
        if blake3_file(&dir.join(rel))?.blake3 != stamped.blake3 {
            return Ok(Some(format!(
                "{} changed since it was verified",
                printable(rel)
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp_of(dir: &Path) -> Stamp {
        Stamp {
            format: STAMP_FORMAT.into(),
            tool: "test".into(),
            gates: serde_json::Value::Null,
            results: serde_json::Value::Null,
            traces: BTreeMap::new(),
            files: hash_bundle(dir).unwrap(),
        }
    }

    /// A small stamped folder: a weights file, metadata and a tokenizer sub-folder.
    fn stamped() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("model.safetensors"), vec![7u8; 100_000]).unwrap();
        std::fs::write(d.path().join("metadata.json"), "{}").unwrap();
        std::fs::create_dir(d.path().join("tokenizer")).unwrap();
        std::fs::write(d.path().join("tokenizer/tokenizer_config.json"), "{}").unwrap();
        write_stamp(d.path(), &stamp_of(d.path())).unwrap();
        d
    }

    fn invalid_naming(d: &Path, file: &str) {
        match check_stamp(d) {
            StampStatus::Invalid(why) => assert!(why.contains(file), "{why}"),
            s => panic!("expected an invalid stamp naming {file}, got {s}"),
        }
    }

    #[test]
    fn a_fresh_stamp_is_valid_and_covers_sub_folders() {
        let d = stamped();
        assert_eq!(check_stamp(d.path()), StampStatus::Valid);
        let s = read_stamp(d.path()).unwrap().unwrap();
        assert!(s.files.contains_key("tokenizer/tokenizer_config.json"));
        assert!(!s.files.contains_key(STAMP_FILE));
    }

    #[test]
    fn a_same_size_edit_of_any_byte_is_refused() {
        let d = stamped();
        let p = d.path().join("model.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        b[77_777] = 0;
        std::fs::write(&p, b).unwrap();
        invalid_naming(d.path(), "model.safetensors");
    }

    #[test]
    fn an_edit_in_a_sub_folder_is_refused() {
        let d = stamped();
        std::fs::write(d.path().join("tokenizer/tokenizer_config.json"), "{ }").unwrap();
        invalid_naming(d.path(), "tokenizer/tokenizer_config.json");
    }

    #[test]
    fn added_and_removed_files_are_refused() {
        let d = stamped();
        std::fs::write(d.path().join("tokenizer/chat_template.jinja"), "x").unwrap();
        invalid_naming(d.path(), "tokenizer/chat_template.jinja");
        std::fs::remove_file(d.path().join("tokenizer/chat_template.jinja")).unwrap();
        assert_eq!(check_stamp(d.path()), StampStatus::Valid);
        std::fs::remove_file(d.path().join("metadata.json")).unwrap();
        invalid_naming(d.path(), "metadata.json");
    }

    #[test]
    fn stamps_are_written_under_unique_names_never_through_links() {
        let d = stamped();
        let s = read_stamp(d.path()).unwrap().unwrap();
        // A leftover temporary file and a planted link at the old fixed name change
        // nothing: neither is covered, and the write does not go through the link.
        let victim = d.path().join("tokenizer/victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join(".verification.json.tmp")).unwrap();
        write_stamp(d.path(), &s).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        std::fs::remove_file(&victim).unwrap();
        assert_eq!(check_stamp(d.path()), StampStatus::Valid);
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".verification.json.tmp-")
            })
            .collect();
        assert!(left.is_empty(), "no temporary file is left");
    }

    #[test]
    fn a_symlink_in_the_folder_is_refused() {
        let d = stamped();
        std::os::unix::fs::symlink("/dev/null", d.path().join("extra")).unwrap();
        invalid_naming(d.path(), "extra");
    }

    #[test]
    fn old_and_broken_stamps_are_invalid_and_absent_ones_missing() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(check_stamp(d.path()), StampStatus::Missing);
        std::fs::write(d.path().join(STAMP_FILE), "{").unwrap();
        assert!(matches!(check_stamp(d.path()), StampStatus::Invalid(_)));
        let v1 = r#"{"format": "q3vl-verification/1", "files": {}}"#;
        std::fs::write(d.path().join(STAMP_FILE), v1).unwrap();
        invalid_naming(d.path(), "verify again");
    }
}
