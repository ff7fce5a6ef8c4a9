//! An export's output folder: claimed in its parent, staged in a run-unique hidden
//! folder beside it and renamed into place at the end, as `synth` does
//! ([`Staging::begin_entry`]). So an error, Ctrl-C or a kill leaves no half-written
//! export under the name, two exports into one folder cannot run at once (the second
//! fails at once, naming it), and `--force` replaces only an export q3vl wrote in the
//! same format, never a user's folder.

use crate::error::{ExportError, Result};
use crate::source::{PROVENANCE_FILE, PROVENANCE_FORMAT};
use q3vl_bundle::{Bundles, Staging};
use std::path::{Component, Path, PathBuf};

/// A claimed output folder being staged.
pub struct Output {
    staging: Staging,
    leaf: String,
    export: String,
    force: bool,
    bundle_dirs: Vec<PathBuf>,
    /// Where the export is staged (renamed to [`Output::target`] by [`Output::install`]).
    pub dir: PathBuf,
    /// The folder the user asked for, its parent resolved (links and `..` followed).
    pub target: PathBuf,
}

/// Claims `out` for an export of format `export` read from `bundles`.
pub fn begin(out: &Path, export: &str, force: bool, bundles: &Bundles) -> Result<Output> {
    let bad = |msg: &str| ExportError::Output {
        path: out.to_path_buf(),
        msg: msg.into(),
    };
    let leaf = out
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad("names no folder to create (give a path ending in a folder name)"))?;
    let bundle_dirs = [&bundles.language, &bundles.vision]
        .map(|b| std::fs::canonicalize(b.dir()).unwrap_or_else(|_| b.dir().to_path_buf()))
        .to_vec();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let target = resolve_parent(parent, &bundle_dirs)?.join(leaf);
    let mut output = Output {
        staging: Staging::begin_entry(&target)?,
        leaf: leaf.to_owned(),
        export: export.to_owned(),
        force,
        bundle_dirs,
        dir: PathBuf::new(),
        target,
    };
    output.check_target()?;
    output.dir = output.staging.dir().join(leaf);
    std::fs::create_dir(&output.dir).map_err(|e| ExportError::io(&output.dir, e))?;
    Ok(output)
}

/// `parent` resolved one component at a time (links followed, `..` taken on the resolved
/// path), each missing folder created only after checking that it would not be created
/// inside a bundle: a `..` past a folder that does not exist yet cannot hide one.
fn resolve_parent(parent: &Path, bundle_dirs: &[PathBuf]) -> Result<PathBuf> {
    let abs = std::path::absolute(parent).map_err(|e| ExportError::io(parent, e))?;
    let mut cur = PathBuf::new();
    for comp in abs.components() {
        match comp {
            Component::Prefix(_) | Component::RootDir => cur.push(comp.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                cur.pop();
            }
            Component::Normal(name) => {
                let next = cur.join(name);
                if next.symlink_metadata().is_err() {
                    if let Some(dir) = bundle_dirs.iter().find(|d| cur.starts_with(d)) {
                        return Err(ExportError::Output {
                            path: parent.to_path_buf(),
                            msg: format!(
                                "is inside bundle {}; write the export elsewhere",
                                q3vl_model::error::printable(dir.display())
                            ),
                        });
                    }
                    std::fs::create_dir(&next).map_err(|e| ExportError::io(&next, e))?;
                }
                cur = std::fs::canonicalize(&next).map_err(|e| ExportError::io(&next, e))?;
            }
        }
    }
    Ok(cur)
}

impl Output {
    /// Syncs the staged folder and renames it into place (an old export it replaces is
    /// removed), after checking the target again: it may have changed during the export.
    pub fn install(self) -> Result<PathBuf> {
        self.check_target()?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ExportError::io(&self.dir, e))?;
        Ok(self.staging.install(&self.leaf)?)
    }

    /// The target may be written (or replaced): it is not inside a bundle and holds no
    /// bundle (either would change or delete what the stamps bind), and it is absent, an
    /// empty folder, or (with `--force`) a q3vl export of this format and nothing else.
    fn check_target(&self) -> Result<()> {
        let bad = |msg: String| ExportError::Output {
            path: self.target.clone(),
            msg,
        };
        for dir in &self.bundle_dirs {
            if self.target.starts_with(dir) || dir.starts_with(&self.target) {
                let d = q3vl_model::error::printable(dir.display());
                return Err(bad(format!(
                    "is inside bundle {d}, is it, or holds it; write the export elsewhere"
                )));
            }
        }
        let occupied = match std::fs::read_dir(&self.target) {
            Ok(mut d) => d.next().is_some(),
            Err(_) => self.target.symlink_metadata().is_ok(),
        };
        if occupied && !self.force {
            return Err(bad(
                "exists and is not empty (pass --force to replace it)".into()
            ));
        }
        if occupied && !is_export_of(&self.target, &self.export) {
            return Err(bad(format!(
                "is not a q3vl {} export (a {PROVENANCE_FILE} of that format listing every \
                 file in it); refusing to replace it, even with --force: move it away or \
                 choose another --out",
                self.export
            )));
        }
        Ok(())
    }
}

/// Whether `dir` is an export q3vl wrote in format `export` and holds nothing else: a
/// real folder whose provenance names the format and lists every other file in it.
fn is_export_of(dir: &Path, export: &str) -> bool {
    let is_dir = dir.symlink_metadata().is_ok_and(|m| m.is_dir());
    let prov = is_dir
        .then(|| q3vl_model::input::read_regular(&dir.join(PROVENANCE_FILE)).ok())
        .flatten()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let Some(prov) = prov.filter(|v| v["format"] == PROVENANCE_FORMAT && v["export"] == export)
    else {
        return false;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.into_iter().all(|e| {
        e.ok()
            .and_then(|e| e.file_name().into_string().ok())
            .is_some_and(|n| n == PROVENANCE_FILE || prov["files"].get(&n).is_some())
    })
}
