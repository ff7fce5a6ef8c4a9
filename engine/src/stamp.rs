//! Whether a bundle carries a verification stamp (`verification.json`, written by
//! `q3vl verify --stamp` beside `metadata.json`).

use std::path::Path;

/// The stamp file's name.
pub const STAMP_FILE: &str = "verification.json";

/// What [`stamp_status`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StampStatus {
    /// A stamp is present and says every gate passed.
    Verified(String),
    /// No stamp.
    NotVerified,
    /// A stamp is present but unreadable, or it does not say the gates passed.
    Invalid(String),
}

impl StampStatus {
    /// Whether `--require-verified` accepts it.
    pub fn is_verified(&self) -> bool {
        matches!(self, StampStatus::Verified(_))
    }

    /// One line for stderr.
    pub fn describe(&self, dir: &Path) -> String {
        match self {
            StampStatus::Verified(s) => format!("{}: verified ({s})", dir.display()),
            StampStatus::NotVerified => format!("{}: not verified (no {STAMP_FILE})", dir.display()),
            StampStatus::Invalid(why) => format!("{}: verification stamp invalid: {why}", dir.display()),
        }
    }
}

/// The stamp status of one bundle folder.
///
/// For now this checks that `verification.json` parses and has `"passed": true`.
/// The verifier owns the stamp's format and is to complete this (e.g. check that the
/// stamp names this bundle's metadata checksum).
pub fn stamp_status(dir: &Path) -> StampStatus {
    let path = dir.join(STAMP_FILE);
    if !path.exists() {
        return StampStatus::NotVerified;
    }
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return StampStatus::Invalid(format!("{}: {e}", path.display())),
    };
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return StampStatus::Invalid(format!("{}: not JSON: {e}", path.display())),
    };
    if v.get("passed").and_then(serde_json::Value::as_bool) == Some(true) {
        StampStatus::Verified(format!("{STAMP_FILE} present"))
    } else {
        StampStatus::Invalid(format!("{} does not record all gates passed", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_present_and_bad_stamps() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(stamp_status(d.path()), StampStatus::NotVerified);
        std::fs::write(d.path().join(STAMP_FILE), "{").unwrap();
        assert!(matches!(stamp_status(d.path()), StampStatus::Invalid(_)));
        std::fs::write(d.path().join(STAMP_FILE), r#"{"passed": true}"#).unwrap();
        assert!(stamp_status(d.path()).is_verified());
    }
}
