//! Whether the bundles carry a valid verification stamp (`verification.json`, written
//! by `q3vl verify --stamp`). The stamp format and its check live in the bundle crate
//! ([`q3vl_bundle::check_stamp`]); this is the engine's view of a language + vision pair.

use std::path::Path;

pub use q3vl_bundle::StampStatus;

/// The stamp status of one bundle folder: present, and every file of the folder
/// hashes as stamped (no file added, removed or changed).
pub fn stamp_status(dir: &Path) -> StampStatus {
    q3vl_bundle::check_stamp(dir)
}

pub use q3vl_bundle::pair_status;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_and_bad_stamps() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(stamp_status(d.path()), StampStatus::Missing);
        std::fs::write(d.path().join(q3vl_bundle::STAMP_FILE), "{").unwrap();
        assert!(matches!(stamp_status(d.path()), StampStatus::Invalid(_)));
        assert!(matches!(
            pair_status(d.path(), d.path()),
            StampStatus::Invalid(_)
        ));
    }
}
