//! The small files of an export (JSON configs, provenance, copied tokenizer files):
//! read whole, written whole and synced (the rename that installs the export must not
//! land before their contents), each returned with its size and sha256.

use crate::error::{ExportError, Result};
use q3vl_bundle::FileEntry;
use std::path::Path;

/// Reads a JSON file; a file that does not parse is named.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = q3vl_model::input::read_regular(path).map_err(|e| ExportError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| ExportError::Unsupported {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}

/// Writes `v` as pretty JSON (with a final newline) to `dir/name`.
pub fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<FileEntry> {
    let mut bytes = serde_json::to_vec_pretty(v).expect("JSON serializes");
    bytes.push(b'\n');
    write_file(dir, name, &bytes)
}

/// Writes and syncs `dir/name`; returns its size and sha256.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| ExportError::io(&path, e))?;
    Ok(FileEntry {
        sha256: hex::encode(Sha256::digest(bytes)),
        size: bytes.len() as u64,
    })
}
