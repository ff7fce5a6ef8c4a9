//! Claiming (part of) an output folder, staging into it, and installing what was
//! staged; and the shared claim of the runs that read what was installed.
//!
//! Every q3vl run that writes into a folder `D` goes through one [`Staging`], with a
//! scope ([`Scope`]): `convert` claims the whole of its `--out` ([`Staging::begin`]);
//! `synth --out D/LEAF` claims only the entry `LEAF` of `D` ([`Staging::begin_entry`]),
//! so two synths into sibling folders run side by side and neither touches `D`'s other
//! entries.
//!
//! 1. It takes an exclusive lock on a regular file of `D`, created if missing (mode
//!    0666 whatever the umask, so one user's lock file never locks out another; one
//!    that may not be written is locked read-only): `.q3vl-lock` for the whole folder,
//!    never removed (readers lock it too), `.q3vl-lock-LEAF` for one entry, removed
//!    when the claim ends (a claim re-checks after locking that the name still names
//!    the file it locked). Where the file system has no locks, it warns and goes on. A
//!    file, not the folder itself: NFS emulates `flock` with byte-range locks, and an
//!    exclusive one needs a file open for writing, which a folder cannot be. The kernel
//!    releases the lock when the process ends, however it ends. A second claim of the
//!    same scope fails at once with [`BundleError::Locked`], naming the folder it was
//!    given and what holds it: failing fast is simpler to reason about (and to test)
//!    than queueing, and two conversions into one folder are a mistake to report, not
//!    to serialize.
//! 2. Under the lock it removes what killed runs of the same scope left in `D` (the
//!    names tell the scope, see [`Leftover`]). A staging folder only exists while its
//!    creator holds its lock, so every one the lock holder sees is stale. An old folder
//!    is an item moved aside by an interrupted replace: it is put back when the item is
//!    missing (the replace never happened), removed otherwise (it did). A leftover this
//!    user may not remove is left: silently when another user's (in a shared folder
//!    such as `/tmp`), with a warning naming it when this user's.
//! 3. It stages into a run-unique folder in `D` ([`staging_dir`]), removed when the last
//!    clone of the [`Staging`] is dropped (an error, Ctrl-C, SIGTERM).
//! 4. [`Staging::install`] renames a finished item from the staging folder into `D`;
//!    an old item it replaces is removed after (made writable first if it is this
//!    user's), and one that cannot be is a warning, not a failed install.
//!
//! Readers (`run`, `verify`, `bench`) hold a [`ReadClaim`] for as long as they use the
//! bundles: a shared lock on the output folder's `.q3vl-lock`, which a conversion's
//! exclusive one excludes, so the bundles a reader checked (stamp, pair) are the bytes
//! it loads, and a conversion never replaces bundles a reader is using.

use crate::error::{BundleError, LockHolder};
use crate::names::{
    lock_file, old_dir, staging_dir, Leftover, Scope, ENTRY_END, LOCK_FILE, METADATA_FILE,
};
use q3vl_model::error::printable;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A run's claim on an output folder, or on one entry of it: its exclusive lock and a
/// run-unique staging folder inside the folder. Clones share the claim; the staging
/// folder is removed and the lock released when the last clone is dropped.
#[derive(Clone)]
pub struct Staging(Arc<Claim>);

struct Claim {
    out: PathBuf,
    entry: Option<String>,
    dir: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Still under the lock: `_lock` is closed only after this body.
        let _ = std::fs::remove_dir_all(&self.dir);
        // An entry's lock file would otherwise stay behind in a shared parent (/tmp)
        // after the entry is gone, owned by this user. Removing it under the lock is
        // safe: a claim that opened it re-checks after locking that the name still
        // names the file it locked ([`lock_exclusive`]).
        if self.entry.is_some() {
            let _ = std::fs::remove_file(&self.lock_path);
        }
    }
}

impl Staging {
    /// Creates `out` if needed, claims all of it (failing at once with
    /// [`BundleError::Locked`] when another run holds it), cleans what killed runs of
    /// that scope left in it and creates this run's staging folder.
    /// A folder holding a `metadata.json` (a bundle folder given by mistake) is
    /// refused before anything is created in it: a lock file inside a bundle would
    /// break its stamp.
    pub fn begin(out: &Path) -> Result<Staging, BundleError> {
        if out.join(METADATA_FILE).symlink_metadata().is_ok() {
            return Err(BundleError::Format {
                path: out.to_path_buf(),
                msg: format!(
                    "is a bundle folder (it holds {METADATA_FILE}), not an output folder; \
                     pass the folder the bundles go into"
                ),
            });
        }
        std::fs::create_dir_all(out).map_err(|e| BundleError::io(out, e))?;
        claim(out, out, None)
    }

    /// Claims only `target` within its parent folder (created if needed), like
    /// [`Staging::begin`] otherwise: the one item it installs is `target`'s name.
    pub fn begin_entry(target: &Path) -> Result<Staging, BundleError> {
        let bad = |msg: &str| BundleError::Format {
            path: target.to_path_buf(),
            msg: msg.into(),
        };
        let leaf = target
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| bad("is not a UTF-8 folder name"))?;
        if leaf.starts_with(".q3vl-") {
            return Err(bad("is a name q3vl reserves for its own files"));
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent).map_err(|e| BundleError::io(parent, e))?;
        claim(parent, target, Some(leaf.to_owned()))
    }

    /// The folder items are installed into.
    pub fn out(&self) -> &Path {
        &self.0.out
    }

    /// This run's staging folder (inside [`Staging::out`]).
    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    fn scope(&self) -> Scope<'_> {
        match &self.0.entry {
            Some(leaf) => Scope::Entry(leaf),
            None => Scope::Folder,
        }
    }

    /// Renames `dir()/name` to `out()/name` and returns the latter. An existing
    /// `out()/name` is moved aside to an old folder first and removed after (put back
    /// if the rename fails; should the process die in between, the next run that
    /// claims the same scope does it). Whether it may be replaced is the caller's call.
    /// An entry claim installs only its entry; a whole-folder claim, no name with `~`
    /// (its old folder would read as an entry claim's).
    ///
    /// Once the new item is in place the install has succeeded: an old item that
    /// cannot be removed then is a warning on stderr naming it, not an error (which
    /// would stop a conversion between its two installs).
    pub fn install(&self, name: &str) -> Result<PathBuf, BundleError> {
        let mut warnings = Vec::new();
        let done = self.install_with(name, &remove_tree, &mut warnings);
        warnings.iter().for_each(|w| warn(w));
        done
    }

    /// [`Staging::install`], removing the old item with `remove` and collecting
    /// warnings into `warnings` (injected by the tests).
    fn install_with(
        &self,
        name: &str,
        remove: &dyn Fn(&Path) -> std::io::Result<()>,
        warnings: &mut Vec<String>,
    ) -> Result<PathBuf, BundleError> {
        let scope = self.scope();
        let fits = match scope {
            Scope::Entry(leaf) => name == leaf,
            Scope::Folder => !name.contains(ENTRY_END),
        };
        if !fits {
            return Err(BundleError::Format {
                path: self.out().join(name),
                msg: "is not a name this run claimed".into(),
            });
        }
        let from = self.dir().join(name);
        let to = self.out().join(name);
        let old = self.out().join(old_dir(scope, name));
        let replacing = to.symlink_metadata().is_ok();
        if replacing {
            std::fs::rename(&to, &old).map_err(|e| BundleError::io(&to, e))?;
        }
        if let Err(e) = std::fs::rename(&from, &to) {
            if replacing {
                let _ = std::fs::rename(&old, &to);
            }
            return Err(BundleError::io(&to, e));
        }
        // The new entry is durable before the old one goes.
        sync_dir(self.out())?;
        if replacing {
            if let Err(e) = remove(&old) {
                warnings.push(format!(
                    "{}: {e}; the item it replaced is in place, remove this old copy by hand",
                    printable(old.display())
                ));
            }
        }
        Ok(to)
    }
}

/// Locks `folder` for a claim of `entry` (the whole folder when `None`), cleans that
/// scope's leftovers and creates the staging folder. `named` is the folder the user
/// gave, for errors.
fn claim(folder: &Path, named: &Path, entry: Option<String>) -> Result<Staging, BundleError> {
    let scope = match &entry {
        Some(leaf) => Scope::Entry(leaf),
        None => Scope::Folder,
    };
    let lock_path = folder.join(lock_file(scope));
    let mut warnings = Vec::new();
    let lock = lock_exclusive(&lock_path, scope, named, &|f| f.try_lock(), &mut warnings);
    let cleaned = match &lock {
        Ok(_) => clean_leftovers(folder, scope, &remove_tree, &another_users, &mut warnings),
        Err(_) => Ok(()),
    };
    warnings.iter().for_each(|w| warn(w));
    let lock = lock?;
    cleaned?;
    let dir = folder.join(staging_dir(scope));
    std::fs::create_dir(&dir).map_err(|e| BundleError::io(&dir, e))?;
    Ok(Staging(Arc::new(Claim {
        out: folder.to_path_buf(),
        entry,
        dir,
        lock_path,
        _lock: lock,
    })))
}

/// A reader's claim on an output folder: a shared lock on its `.q3vl-lock`, held while
/// the reader uses the folder's bundles (see the module docs). Dropping it releases
/// the lock.
pub struct ReadClaim {
    out: PathBuf,
    lock: Option<File>,
}

impl ReadClaim {
    /// Takes a shared lock on output folder `out`, failing at once with
    /// [`BundleError::Locked`] while a conversion writes into it: a reader must not load
    /// a pair that is being replaced, and says so rather than waiting minutes.
    ///
    /// A folder where the lock file cannot be created (a read-only install) or locked
    /// (no lock support), or that does not exist, gets a claim without a lock: no
    /// conversion can lock it to write there either, and the reader reports a missing
    /// folder better than the lock could.
    pub fn acquire(out: &Path) -> Result<ReadClaim, BundleError> {
        let path = out.join(LOCK_FILE);
        let file = match open_lock(&path, &open_file) {
            Ok(f) => Some(f),
            Err(e) if unopenable(&e) => None,
            Err(e) => return Err(BundleError::io(&path, e)),
        };
        let lock = match file.map(|f| (f.try_lock_shared(), f)) {
            Some((Ok(()), f)) => Some(f),
            Some((Err(TryLockError::WouldBlock), _)) => {
                return Err(BundleError::Locked {
                    path: out.to_path_buf(),
                    lock: path,
                    holder: LockHolder::Conversion,
                })
            }
            Some((Err(TryLockError::Error(_)), _)) | None => None,
        };
        Ok(ReadClaim {
            out: out.to_path_buf(),
            lock,
        })
    }

    /// Claims the output folder of `bundles`, a `--bundle` argument as
    /// [`crate::Bundles::open`] reads it: an output folder, or a bundle folder (whose
    /// output folder is its parent).
    pub fn for_bundles(bundles: &Path) -> Result<ReadClaim, BundleError> {
        // `--force` moves a language bundle aside for a moment, so which of the two
        // `bundles` is can change until the lock is held: it is checked again under it.
        // The real folder, as [`crate::Bundles::open`] sees it: through a link or `.`,
        // the output folder is not the parent of the name given.
        let bundles = &real_path(bundles);
        for _ in 0..3 {
            let out = out_dir_of(bundles);
            let claim = ReadClaim::acquire(&out)?;
            if out_dir_of(bundles) == out {
                return Ok(claim);
            }
        }
        Err(BundleError::Format {
            path: bundles.to_path_buf(),
            msg: "kept changing while it was opened (a conversion replacing it?); try again".into(),
        })
    }

    /// The output folder claimed.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Whether the claim holds a lock (see [`ReadClaim::acquire`] for when it cannot).
    pub fn is_locked(&self) -> bool {
        self.lock.is_some()
    }
}

/// `path` with links, `.` and `..` resolved (as given when it does not exist: whoever
/// opens it reports that).
pub(crate) fn real_path(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The output folder of a `--bundle` argument (see [`ReadClaim::for_bundles`]).
fn out_dir_of(bundles: &Path) -> PathBuf {
    if !bundles.join(METADATA_FILE).exists() {
        return bundles.to_path_buf();
    }
    match bundles.parent() {
        Some(p) if !p.as_os_str().is_empty() && bundles.file_name().is_some() => p.to_path_buf(),
        _ => bundles.join(".."),
    }
}

/// Errors that mean "no lock file to be had here": no such folder, not a folder, not
/// allowed to read it, or none and a read-only file system to create it on.
fn unopenable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::NotFound
            | ErrorKind::NotADirectory
            | ErrorKind::PermissionDenied
            | ErrorKind::ReadOnlyFilesystem
    )
}

/// How [`open_lock`] opens a lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Read-write, creating it; fails if it exists.
    Create,
    /// Read-write, as it is.
    ReadWrite,
    /// Read-only (another user's file that this one may not write).
    ReadOnly,
}

/// Opens `path` for [`open_lock`], never through a link planted under the name, and
/// never waiting on a FIFO.
fn open_file(path: &Path, access: Access) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    match access {
        Access::Create => o.write(true).create_new(true).mode(0o666),
        Access::ReadWrite => o.write(true),
        Access::ReadOnly => &mut o,
    };
    o.open(path)
}

/// Opens lock file `path` with `open` ([`open_file`]; injected by the tests), creating
/// it if missing, read-write (NFS needs write access for an exclusive lock) or, when
/// that is denied, read-only (local file systems lock that too), refusing anything but
/// a regular file. A new one is made readable and writable by every user whatever the
/// umask, so that one user's lock file in a shared folder never locks out another.
fn open_lock(
    path: &Path,
    open: &dyn Fn(&Path, Access) -> std::io::Result<File>,
) -> std::io::Result<File> {
    use std::os::unix::fs::PermissionsExt;
    let denied = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem
        )
    };
    let mut tries = 0;
    let f = loop {
        tries += 1;
        // Why it could not be created, when not because it exists: the error to give
        // if it does not exist either.
        let refused = match open(path, Access::Create) {
            Ok(f) => {
                f.set_permissions(std::fs::Permissions::from_mode(0o666))?;
                break f;
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => None,
            Err(e) if denied(&e) => Some(e),
            Err(e) => return Err(e),
        };
        match open(path, Access::ReadWrite) {
            Ok(f) => break f,
            Err(e) if denied(&e) => break open(path, Access::ReadOnly)?,
            Err(e) if e.kind() == ErrorKind::NotFound => match refused {
                Some(refused) => return Err(refused),
                // Removed in between (an entry's lock file, by its holder): again.
                None if tries < 3 => {}
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    };
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other(
            "is not a regular file (q3vl's lock file)",
        ));
    }
    Ok(f)
}

/// Opens lock file `path` of `scope` and takes an exclusive, non-blocking lock on it
/// with `try_lock` (injected by the tests); `named` is the folder the user gave, for
/// the error. Where the file system cannot lock at all, it warns and goes on unlocked.
fn lock_exclusive(
    path: &Path,
    scope: Scope,
    named: &Path,
    try_lock: &dyn Fn(&File) -> Result<(), TryLockError>,
    warnings: &mut Vec<String>,
) -> Result<File, BundleError> {
    // An entry's lock file is removed by its holder when done: a run that opened it
    // before that locked a file no longer under the name, and opens the name again.
    for _ in 0..3 {
        let f = open_lock(path, &open_file).map_err(|e| BundleError::io(path, e))?;
        match try_lock(&f) {
            Ok(()) if names_file(path, &f) => return Ok(f),
            Ok(()) => continue,
            Err(TryLockError::WouldBlock) => return Err(held(path, scope, named, &f)),
            Err(TryLockError::Error(e)) if cannot_lock(&e) => {
                // The run-unique staging folder still keeps most clashes apart.
                warnings.push(format!(
                    "{} cannot be locked ({e}); concurrent conversions into it are not excluded",
                    printable(path.display())
                ));
                return Ok(f);
            }
            Err(TryLockError::Error(e)) => return Err(BundleError::io(path, e)),
        }
    }
    Err(BundleError::Format {
        path: path.to_path_buf(),
        msg: "kept being replaced while it was locked; try again".into(),
    })
}

/// The error of a claim on lock file `path` that another run holds (`f` is open on it).
fn held(path: &Path, scope: Scope, named: &Path, f: &File) -> BundleError {
    let holder = match scope {
        Scope::Entry(_) => LockHolder::Synth,
        // Only readers hold it shared; a conversion holds it exclusively.
        Scope::Folder => match f.try_lock_shared() {
            Ok(()) => LockHolder::Readers,
            Err(_) => LockHolder::Conversion,
        },
    };
    BundleError::Locked {
        path: named.to_path_buf(),
        lock: path.to_path_buf(),
        holder,
    }
}

/// Whether `path` still names the file `f` is open on.
fn names_file(path: &Path, f: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (path.symlink_metadata(), f.metadata()) {
        (Ok(p), Ok(f)) => (p.dev(), p.ino()) == (f.dev(), f.ino()),
        _ => false,
    }
}

/// Errors of a file system that has no locks (NFSv3 without lockd, some FUSE, 9p and
/// SMB mounts), as opposed to a lock that failed.
fn cannot_lock(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// Removes what killed runs of `scope` left in `folder`, with `remove`; the caller holds
/// that scope's lock, so no live run owns any of it (see the module docs). A leftover
/// this user may not remove or put back is skipped: silently when `foreign` says it is
/// another user's (in a shared folder; refusing to run would not make it ours), with a
/// warning naming it otherwise (it may hold a whole old bundle).
fn clean_leftovers(
    folder: &Path,
    scope: Scope,
    remove: &dyn Fn(&Path) -> std::io::Result<()>,
    foreign: &dyn Fn(&Path) -> bool,
    warnings: &mut Vec<String>,
) -> Result<(), BundleError> {
    let entries = std::fs::read_dir(folder).map_err(|e| BundleError::io(folder, e))?;
    let mut changed = false;
    for entry in entries {
        let entry = entry.map_err(|e| BundleError::io(folder, e))?;
        let file_name = entry.file_name();
        // q3vl writes UTF-8 names only.
        let Some(left) = file_name.to_str().and_then(Leftover::parse) else {
            continue;
        };
        if left.scope() != scope {
            continue;
        }
        let path = entry.path();
        let done = match left {
            Leftover::Old(_, orig) if !orig.is_empty() && !exists(&folder.join(orig)) => {
                std::fs::rename(&path, folder.join(orig))
            }
            _ => remove(&path),
        };
        match done {
            Ok(()) => changed = true,
            Err(e) if e.kind() == ErrorKind::PermissionDenied && foreign(&path) => {}
            Err(e) if e.kind() == ErrorKind::PermissionDenied => warnings.push(format!(
                "{}: {e}; a leftover of an interrupted q3vl run, remove it by hand",
                printable(path.display())
            )),
            Err(e) => return Err(BundleError::io(&path, e)),
        }
    }
    if changed {
        sync_dir(folder)?;
    }
    Ok(())
}

fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// Whether `path` belongs to another user than the one running.
fn another_users(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    path.symlink_metadata()
        .is_ok_and(|m| m.uid() != effective_uid())
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Prints a warning line on stderr: the run goes on.
fn warn(msg: &str) {
    eprintln!("warning: {msg}");
}

/// [`remove_any`], after giving this user's folders in `path` back their owner's
/// permissions: a bundle made read-only (`chmod -R a-w`) is still its owner's to
/// remove.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    make_owned_dirs_writable(path);
    remove_any(path)
}

/// Adds `u+rwx` to `dir` and every folder under it that this user owns. Best effort:
/// what stays unremovable makes the removal fail, naming it.
fn make_owned_dirs_writable(dir: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(m) = dir.symlink_metadata() else {
        return;
    };
    if !m.is_dir() {
        return;
    }
    if m.uid() == effective_uid() && m.mode() & 0o700 != 0o700 {
        let mode = (m.mode() & 0o7777) | 0o700;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            make_owned_dirs_writable(&entry.path());
        }
    }
}

/// Removes a folder with its contents, or a file or link; already gone is fine.
fn remove_any(path: &Path) -> std::io::Result<()> {
    let result = match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return Ok(()),
    };
    match result {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Syncs a folder's entries (after a rename or a new file in it).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), BundleError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| BundleError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn sorted(v: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    fn locked(e: BundleError) -> (PathBuf, PathBuf, LockHolder) {
        match e {
            BundleError::Locked { path, lock, holder } => (path, lock, holder),
            e => panic!("not Locked: {e}"),
        }
    }

    #[test]
    fn a_second_claim_on_a_locked_folder_fails_naming_it() {
        let out = tempfile::tempdir().unwrap();
        let first = Staging::begin(out.path()).unwrap();
        let e = Staging::begin(out.path())
            .err()
            .expect("the folder is locked");
        let msg = e.to_string();
        assert!(msg.contains(&out.path().display().to_string()), "{msg}");
        assert!(msg.contains("another q3vl conversion"), "{msg}");
        let (path, lock, holder) = locked(e);
        assert_eq!(path, out.path());
        assert_eq!(lock, out.path().join(LOCK_FILE));
        assert_eq!(holder, LockHolder::Conversion);
        // The lock is a regular file (NFS cannot lock a folder exclusively).
        assert!(std::fs::symlink_metadata(&lock).unwrap().is_file());
        // The live run's staging folder survived the failed claim.
        assert!(first.dir().is_dir());
        let dir = first.dir().to_path_buf();
        drop(first);
        assert!(
            !dir.exists(),
            "dropping the claim removes its staging folder"
        );
        let again = Staging::begin(out.path()).unwrap();
        assert_ne!(
            again.dir(),
            dir,
            "every claim stages in a folder of its own"
        );
        assert!(lock.is_file(), "the lock file is never removed");
    }

    #[test]
    fn a_lock_file_that_is_a_link_is_refused() {
        let out = tempfile::tempdir().unwrap();
        let elsewhere = out.path().join("elsewhere");
        std::fs::write(&elsewhere, b"x").unwrap();
        std::os::unix::fs::symlink(&elsewhere, out.path().join(LOCK_FILE)).unwrap();
        let e = Staging::begin(out.path()).err().unwrap().to_string();
        assert!(e.contains(".q3vl-lock"), "{e}");
        assert!(ReadClaim::acquire(out.path()).is_err());
    }

    #[test]
    fn leftovers_of_killed_runs_are_cleaned_under_the_lock() {
        let out = tempfile::tempdir().unwrap();
        let o = out.path();
        // A killed run's staging folder (old fixed-name style and new style).
        std::fs::create_dir_all(o.join(".q3vl-tmp-b/sub")).unwrap();
        std::fs::create_dir_all(o.join(".q3vl-tmp-123-456-0")).unwrap();
        // An interrupted replace of `kept`: it was moved aside, the new one never came.
        std::fs::create_dir_all(o.join(".q3vl-old-kept")).unwrap();
        std::fs::write(o.join(".q3vl-old-kept/f"), b"old").unwrap();
        // An interrupted replace of `new`: the new one is in place, the old one stayed.
        std::fs::create_dir_all(o.join("new")).unwrap();
        std::fs::create_dir_all(o.join(".q3vl-old-new")).unwrap();
        std::fs::write(o.join(".q3vl-old-file"), b"x").unwrap();
        std::fs::write(o.join("user.txt"), b"mine").unwrap();
        // Entry claims' leftovers are theirs to clean, not a whole-folder claim's.
        std::fs::create_dir_all(o.join(".q3vl-tmp-ck~1-2-0")).unwrap();
        std::fs::create_dir_all(o.join(".q3vl-old-ck~")).unwrap();
        let st = Staging::begin(o).unwrap();
        let staging = st.dir().file_name().unwrap().to_string_lossy().into_owned();
        let mut want = sorted(&[
            ".q3vl-lock",
            ".q3vl-old-ck~",
            ".q3vl-tmp-ck~1-2-0",
            "file",
            "kept",
            "new",
            "user.txt",
        ]);
        want.push(staging);
        want.sort();
        assert_eq!(names(o), want);
        assert_eq!(std::fs::read(o.join("kept/f")).unwrap(), b"old");
    }

    #[test]
    fn an_entry_claim_covers_its_entry_only() {
        let parent = tempfile::tempdir().unwrap();
        let p = parent.path();
        for d in [
            ".q3vl-tmp-a~1-2-0/a",
            ".q3vl-tmp-a-b~1-2-0",
            ".q3vl-tmp-a~1~1-2-0",
            ".q3vl-tmp-1-2-0",
            ".q3vl-old-a-b~",
            ".q3vl-old-x",
        ] {
            std::fs::create_dir_all(p.join(d)).unwrap();
        }
        // An interrupted replace of `a`: the new one never came.
        std::fs::create_dir_all(p.join(".q3vl-old-a~")).unwrap();
        std::fs::write(p.join(".q3vl-old-a~/f"), b"old").unwrap();
        let a = Staging::begin_entry(&p.join("a")).unwrap();
        let mut want = sorted(&[
            ".q3vl-lock-a",
            ".q3vl-tmp-a-b~1-2-0",
            ".q3vl-tmp-a~1~1-2-0",
            ".q3vl-tmp-1-2-0",
            ".q3vl-old-a-b~",
            ".q3vl-old-x",
            "a",
        ]);
        want.push(a.dir().file_name().unwrap().to_string_lossy().into_owned());
        want.sort();
        assert_eq!(names(p), want, "only a's leftovers are cleaned");
        assert_eq!(std::fs::read(p.join("a/f")).unwrap(), b"old");
        // Siblings and the whole folder are claimed independently.
        let ab = Staging::begin_entry(&p.join("a-b")).unwrap();
        let whole = Staging::begin(p).unwrap();
        let e = Staging::begin_entry(&p.join("a")).err().unwrap();
        assert!(e.to_string().contains("another q3vl synth"), "{e}");
        let (path, lock, holder) = locked(e);
        assert_eq!((path, holder), (p.join("a"), LockHolder::Synth));
        assert_eq!(lock, p.join(".q3vl-lock-a"));
        let mut want = sorted(&[
            ".q3vl-lock",
            ".q3vl-lock-a",
            ".q3vl-lock-a-b",
            ".q3vl-tmp-a~1~1-2-0",
            "a",
            "a-b",
            "x",
        ]);
        for st in [&a, &ab, &whole] {
            want.push(st.dir().file_name().unwrap().to_string_lossy().into_owned());
        }
        want.sort();
        assert_eq!(names(p), want, "each claim cleaned its own");
        // An entry claim installs its entry, replacing it, and nothing else.
        std::fs::create_dir(a.dir().join("a")).unwrap();
        assert_eq!(a.install("a").unwrap(), p.join("a"));
        assert!(!p.join("a/f").exists());
        std::fs::create_dir(a.dir().join("b")).unwrap();
        assert!(a.install("b").is_err());
        assert!(whole.install("x~").is_err(), "would read as an entry's");
        let e = Staging::begin_entry(&p.join(".q3vl-lock")).err().unwrap();
        assert!(e.to_string().contains("reserves"), "{e}");
    }

    #[test]
    fn a_leftover_this_user_may_not_remove_is_skipped() {
        let out = tempfile::tempdir().unwrap();
        let o = out.path();
        for d in [".q3vl-tmp-1-1-0", ".q3vl-tmp-2-2-0", ".q3vl-old-b"] {
            std::fs::create_dir_all(o.join(d)).unwrap();
        }
        std::fs::create_dir_all(o.join("b")).unwrap();
        // Stale folders in a sticky folder that we may not remove: EPERM for us.
        let remove = |p: &Path| {
            if p.ends_with(".q3vl-tmp-2-2-0") {
                remove_any(p)
            } else {
                Err(std::io::Error::from_raw_os_error(libc::EPERM))
            }
        };
        // Another user's is skipped silently; ours is named.
        let foreign = |p: &Path| p.ends_with(".q3vl-tmp-1-1-0");
        let mut warnings = Vec::new();
        clean_leftovers(o, Scope::Folder, &remove, &foreign, &mut warnings).unwrap();
        assert_eq!(names(o), [".q3vl-old-b", ".q3vl-tmp-1-1-0", "b"]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains(".q3vl-old-b"), "{warnings:?}");
        assert!(warnings[0].contains("remove it by hand"), "{warnings:?}");
        // Any other failure is still reported, naming the leftover.
        let broken = |_: &Path| Err(std::io::Error::from_raw_os_error(libc::EIO));
        let e = clean_leftovers(o, Scope::Folder, &broken, &foreign, &mut warnings).unwrap_err();
        assert!(e.to_string().contains(".q3vl-"), "{e}");
        // Our own folders are ours: only another uid's are foreign.
        assert!(!another_users(o));
    }

    #[test]
    fn an_old_item_that_cannot_be_removed_is_a_warning_once_the_new_is_in() {
        let out = tempfile::tempdir().unwrap();
        let st = Staging::begin(out.path()).unwrap();
        std::fs::create_dir(st.dir().join("b")).unwrap();
        std::fs::write(st.dir().join("b/v"), b"1").unwrap();
        st.install("b").unwrap();
        std::fs::create_dir(st.dir().join("b")).unwrap();
        std::fs::write(st.dir().join("b/v"), b"2").unwrap();
        // An old bundle this user may not delete (EACCES).
        let denied = |_: &Path| Err(std::io::Error::from_raw_os_error(libc::EACCES));
        let mut warnings = Vec::new();
        st.install_with("b", &denied, &mut warnings).unwrap();
        assert_eq!(std::fs::read(out.path().join("b/v")).unwrap(), b"2");
        let old = out.path().join(".q3vl-old-b");
        assert_eq!(std::fs::read(old.join("v")).unwrap(), b"1");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains(&old.display().to_string()),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_read_only_old_item_is_made_writable_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let out = tempfile::tempdir().unwrap();
        let st = Staging::begin(out.path()).unwrap();
        std::fs::create_dir_all(st.dir().join("b/sub")).unwrap();
        std::fs::write(st.dir().join("b/sub/v"), b"1").unwrap();
        st.install("b").unwrap();
        let ro = std::fs::Permissions::from_mode(0o555);
        for d in ["b/sub", "b"] {
            std::fs::set_permissions(out.path().join(d), ro.clone()).unwrap();
        }
        std::fs::create_dir(st.dir().join("b")).unwrap();
        st.install("b").unwrap();
        assert!(!out.path().join("b/sub").exists());
        drop(st);
        assert_eq!(names(out.path()), [".q3vl-lock", "b"]);
        // Root ignores the mode bits, so check the helper restores them.
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        for d in ["a/b", "a"] {
            std::fs::set_permissions(t.path().join(d), ro.clone()).unwrap();
        }
        make_owned_dirs_writable(&t.path().join("a"));
        for d in ["a", "a/b"] {
            let mode = std::fs::metadata(t.path().join(d))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755, "{d}");
        }
    }

    #[test]
    fn a_new_lock_file_is_every_users_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: umask cannot fail; 022 is the common default and only narrows modes.
        unsafe { libc::umask(0o022) };
        let out = tempfile::tempdir().unwrap();
        let _st = Staging::begin(out.path()).unwrap();
        let mode = std::fs::metadata(out.path().join(LOCK_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o666);
    }

    #[test]
    fn a_lock_file_this_user_may_not_write_is_locked_read_only() {
        let out = tempfile::tempdir().unwrap();
        let path = out.path().join(LOCK_FILE);
        std::fs::write(&path, b"").unwrap();
        let opened = std::cell::RefCell::new(Vec::new());
        // Another user's 0644 lock file: read-write is denied.
        let open = |p: &Path, access: Access| {
            opened.borrow_mut().push(access);
            match access {
                Access::ReadWrite => Err(std::io::Error::from_raw_os_error(libc::EACCES)),
                _ => open_file(p, access),
            }
        };
        let f = open_lock(&path, &open).unwrap();
        assert_eq!(
            *opened.borrow(),
            [Access::Create, Access::ReadWrite, Access::ReadOnly]
        );
        f.try_lock().unwrap();
        // Any other failure is reported.
        let broken = |_: &Path, _| Err(std::io::Error::from_raw_os_error(libc::EIO));
        assert!(open_lock(&path, &broken).is_err());
    }

    #[test]
    fn an_entry_lock_file_goes_with_its_claim_and_a_stale_one_is_not_trusted() {
        let parent = tempfile::tempdir().unwrap();
        let p = parent.path();
        let path = p.join(".q3vl-lock-a");
        let a = Staging::begin_entry(&p.join("a")).unwrap();
        assert!(path.is_file());
        drop(a);
        assert!(
            !path.exists(),
            "the entry's lock file is removed with the claim"
        );
        // A run that opened the lock file just before its holder removed it locks a
        // file no longer under the name: it must open the name again.
        let removed = std::cell::Cell::new(false);
        let try_lock = |f: &File| {
            if !removed.replace(true) {
                std::fs::remove_file(&path).unwrap();
            }
            f.try_lock()
        };
        let scope = Scope::Entry("a");
        let named = p.join("a");
        let f = lock_exclusive(&path, scope, &named, &try_lock, &mut Vec::new()).unwrap();
        assert!(names_file(&path, &f));
    }

    #[test]
    fn a_file_system_without_locks_is_a_warning() {
        let out = tempfile::tempdir().unwrap();
        let path = out.path().join(LOCK_FILE);
        for errno in [libc::ENOLCK, libc::EOPNOTSUPP, libc::ENOSYS] {
            let no_locks = |_: &File| {
                Err(TryLockError::Error(std::io::Error::from_raw_os_error(
                    errno,
                )))
            };
            let mut warnings = Vec::new();
            lock_exclusive(&path, Scope::Folder, out.path(), &no_locks, &mut warnings).unwrap();
            assert_eq!(warnings.len(), 1);
            assert!(warnings[0].contains("cannot be locked"), "{warnings:?}");
            assert!(warnings[0].contains(".q3vl-lock"), "{warnings:?}");
        }
        let broken = |_: &File| {
            Err(TryLockError::Error(std::io::Error::from_raw_os_error(
                libc::EIO,
            )))
        };
        assert!(
            lock_exclusive(&path, Scope::Folder, out.path(), &broken, &mut Vec::new()).is_err()
        );
    }

    #[test]
    fn a_bundle_folder_is_refused_as_an_output_folder() {
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join(METADATA_FILE), b"{}").unwrap();
        let e = Staging::begin(out.path()).err().unwrap().to_string();
        assert!(e.contains("is a bundle folder"), "{e}");
        assert!(e.contains(&out.path().display().to_string()), "{e}");
        assert_eq!(names(out.path()), [METADATA_FILE]);
    }

    #[test]
    fn readers_share_the_folder_and_exclude_conversions() {
        let out = tempfile::tempdir().unwrap();
        let o = out.path();
        let r1 = ReadClaim::acquire(o).unwrap();
        let r2 = ReadClaim::acquire(o).unwrap();
        assert!(r1.is_locked() && r2.is_locked());
        let e = Staging::begin(o).err().unwrap();
        assert!(
            e.to_string()
                .contains("a q3vl run, verify, bench or export"),
            "{e}"
        );
        assert_eq!(locked(e).2, LockHolder::Readers);
        drop((r1, r2));
        let st = Staging::begin(o).unwrap();
        let e = ReadClaim::acquire(o).err().unwrap();
        assert!(e.to_string().contains("another q3vl conversion"), "{e}");
        let (path, _, holder) = locked(e);
        assert_eq!((path.as_path(), holder), (o, LockHolder::Conversion));
        // A bundle folder's output folder is its parent.
        std::fs::create_dir(o.join("b")).unwrap();
        std::fs::write(o.join("b").join(METADATA_FILE), b"{}").unwrap();
        assert!(ReadClaim::for_bundles(&o.join("b")).is_err());
        drop(st);
        let r = ReadClaim::for_bundles(&o.join("b")).unwrap();
        assert_eq!(r.out(), o);
        assert!(!o.join("b").join(LOCK_FILE).exists());
        // Nothing to lock where there is no folder: the reader reports it.
        let r = ReadClaim::acquire(&o.join("missing")).unwrap();
        assert!(!r.is_locked());
    }

    #[test]
    fn install_replaces_and_leaves_no_old_folder() {
        let out = tempfile::tempdir().unwrap();
        let st = Staging::begin(out.path()).unwrap();
        std::fs::create_dir(st.dir().join("b")).unwrap();
        std::fs::write(st.dir().join("b/v"), b"1").unwrap();
        let p = st.install("b").unwrap();
        assert_eq!(std::fs::read(p.join("v")).unwrap(), b"1");
        std::fs::create_dir(st.dir().join("b")).unwrap();
        std::fs::write(st.dir().join("b/v"), b"2").unwrap();
        st.install("b").unwrap();
        assert_eq!(std::fs::read(out.path().join("b/v")).unwrap(), b"2");
        drop(st);
        assert_eq!(names(out.path()), [".q3vl-lock", "b"]);
        // A failed install puts the old item back.
        let st = Staging::begin(out.path()).unwrap();
        assert!(st.install("missing").is_err());
        assert!(st.install("b").is_err(), "nothing staged under that name");
        assert_eq!(std::fs::read(out.path().join("b/v")).unwrap(), b"2");
    }
}
