//! A bundle's tensor table: every tensor its weights files store, with what
//! `metadata.json` says of it (`q3vl inspect` prints it).

use crate::error::BundleError;
use crate::metadata::Scheme;
use crate::names::SCALES_SUFFIX;
use crate::{Bundle, Dtype};

/// What `metadata.json` says a stored tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// A listed tensor, stored in this scheme.
    Tensor(Scheme),
    /// The `NAME.scales` of a listed quantized weight `NAME`.
    Scales,
    /// A tensor `metadata.json` does not list.
    Unlisted,
}

impl std::fmt::Display for Listing {
    /// The scheme's name, `scales`, or nothing for an unlisted tensor.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listing::Tensor(s) => s.fmt(f),
            Listing::Scales => f.write_str("scales"),
            Listing::Unlisted => Ok(()),
        }
    }
}

/// One stored tensor of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    /// Its name in the weights files.
    pub name: String,
    /// Its stored dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its size in bytes.
    pub bytes: usize,
    /// What `metadata.json` says it is.
    pub listing: Listing,
    /// Its role (a scales tensor has its weight's; empty when unlisted).
    pub class: String,
}

impl Bundle {
    /// Every tensor the weights files store, `.scales` included, sorted by name.
    pub fn stored_tensors(&self) -> Result<Vec<StoredTensor>, BundleError> {
        let listed = &self.metadata().tensors;
        let mut names: Vec<&str> = self.checkpoint().names().collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let (dtype, shape, bytes) = self.raw(name)?;
                let weight = name
                    .strip_suffix(SCALES_SUFFIX)
                    .and_then(|w| listed.get(w))
                    .filter(|w| w.scheme.is_quantized());
                let (listing, class) = match (weight, listed.get(name)) {
                    (Some(w), _) => (Listing::Scales, w.class.clone()),
                    (None, Some(t)) => (Listing::Tensor(t.scheme), t.class.clone()),
                    (None, None) => (Listing::Unlisted, String::new()),
                };
                Ok(StoredTensor {
                    name: name.into(),
                    dtype,
                    shape: shape.to_vec(),
                    bytes: bytes.len(),
                    listing,
                    class,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::tests::make;

    #[test]
    fn the_table_lists_every_stored_tensor_with_its_listing() {
        let tmp = tempfile::tempdir().unwrap();
        let b = Bundle::open(&make(tmp.path())).unwrap();
        let rows: Vec<_> = b
            .stored_tensors()
            .unwrap()
            .into_iter()
            .map(|r| {
                (
                    r.name,
                    r.dtype,
                    r.shape,
                    r.bytes,
                    r.listing.to_string(),
                    r.class,
                )
            })
            .collect();
        let row = |n: &str, d, s: &[usize], b, l: &str, c: &str| {
            (
                n.to_string(),
                d,
                s.to_vec(),
                b,
                l.to_string(),
                c.to_string(),
            )
        };
        assert_eq!(
            rows,
            [
                row("n", Dtype::F32, &[2], 8, "f32", "vector"),
                row(
                    "w",
                    Dtype::I8,
                    &[2, 64],
                    128,
                    "int8-block32-clip",
                    "text_linear"
                ),
                row("w.scales", Dtype::F16, &[2, 2], 8, "scales", "text_linear"),
            ]
        );
    }

    #[test]
    fn a_file_check_says_why_a_file_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = make(tmp.path());
        let b = Bundle::open(&dir).unwrap();
        assert!(b.check_files().iter().all(|c| c.problem().is_none()));
        let problems = |b: &Bundle| -> Vec<String> {
            b.check_files().iter().filter_map(|c| c.problem()).collect()
        };
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let bad = problems(&b);
        assert_eq!(bad.len(), 1, "{bad:?}");
        let want = b.metadata().files["config.json"].sha256.clone();
        assert!(bad[0].starts_with("sha256 "), "{}", bad[0]);
        assert!(
            bad[0].ends_with(&format!(", metadata.json says {want}")),
            "{}",
            bad[0]
        );
        std::fs::remove_file(dir.join("config.json")).unwrap();
        let bad = problems(&b);
        assert!(bad[0].contains("config.json"), "{}", bad[0]);
    }
}
