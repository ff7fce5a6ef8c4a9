//! Claiming (part of) an output folder, staging into it, and installing what was
//! staged; and the shared claim of the runs that read what was installed.
//!
//! Every q3vl run that writes into a folder `D` goes through one [`Staging`], with a
//! scope ([`Scope`]): `convert` claims the whole of its `--out` ([`Staging::begin`]);
//! `synth --out D/LEAF` claims only the entry `LEAF` of `D` ([`Staging::begin_entry`]),
//! so two synths into sibling folders run side by side and neither touches `D`'s other
//! entries.
//!
//! 1. It takes an exclusive lock on a regular file of `D`, created if missing and never
//!    removed: `.q3vl-lock` for the whole folder, `.q3vl-lock-LEAF` for one entry. A
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
//!    user may not remove (another user's, in a shared folder such as `/tmp`) is left.
//! 3. It stages into a run-unique folder in `D` ([`staging_dir`]), removed when the last
//!    clone of the [`Staging`] is dropped (an error, Ctrl-C, SIGTERM).
//! 4. [`Staging::install`] renames a finished item from the staging folder into `D`.
//!
//! Readers (`run`, `verify`, `bench`) hold a [`ReadClaim`] for as long as they use the
//! bundles: a shared lock on the output folder's `.q3vl-lock`, which a conversion's
//! exclusive one excludes, so the bundles a reader checked (stamp, pair) are the bytes
//! it loads, and a conversion never replaces bundles a reader is using.

use crate::error::{BundleError, LockHolder};
use crate::names::{
    lock_file, old_dir, staging_dir, Leftover, Scope, ENTRY_END, LOCK_FILE, METADATA_FILE,
};
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
    _lock: File,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Still under the lock: `_lock` is closed only after this body.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Staging {
    /// Creates `out` if needed, claims all of it (failing at once with
    /// [`BundleError::Locked`] when another run holds it), cleans what killed runs of
    /// that scope left in it and creates this run's staging folder.
    pub fn begin(out: &Path) -> Result<Staging, BundleError> {
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
    pub fn install(&self, name: &str) -> Result<PathBuf, BundleError> {
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
            remove_any(&old).map_err(|e| BundleError::io(&old, e))?;
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
    let lock = lock_exclusive(folder, scope, named)?;
    clean_leftovers(folder, scope, &remove_any)?;
    let dir = folder.join(staging_dir(scope));
    std::fs::create_dir(&dir).map_err(|e| BundleError::io(&dir, e))?;
    Ok(Staging(Arc::new(Claim {
        out: folder.to_path_buf(),
        entry,
        dir,
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
        let io = |e| BundleError::io(&path, e);
        let file = match open_lock(&path, true) {
            Ok(f) => Some(f),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                match open_lock(&path, false) {
                    Ok(f) => Some(f),
                    Err(e) if unopenable(&e) => None,
                    Err(e) => return Err(io(e)),
                }
            }
            Err(e) if unopenable(&e) => None,
            Err(e) => return Err(io(e)),
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

/// Errors that mean "no lock file to be had here": no such folder, not a folder, or
/// not allowed to read it.
fn unopenable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::NotFound | ErrorKind::NotADirectory | ErrorKind::PermissionDenied
    )
}

/// Opens lock file `path` (read-write and created if missing when `write`; NFS needs
/// write access for an exclusive lock), refusing a link or anything but a regular file.
fn open_lock(path: &Path, write: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .create(write)
        // Not through a link planted under the name, and never waiting on a FIFO.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other(
            "is not a regular file (q3vl's lock file)",
        ));
    }
    Ok(f)
}

/// Opens `folder`'s lock file of `scope` and takes an exclusive, non-blocking lock on
/// it; `named` is the folder the user gave, for the error.
fn lock_exclusive(folder: &Path, scope: Scope, named: &Path) -> Result<File, BundleError> {
    let path = folder.join(lock_file(scope));
    let f = open_lock(&path, true).map_err(|e| BundleError::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(TryLockError::WouldBlock) => {
            let holder = match scope {
                Scope::Entry(_) => LockHolder::Synth,
                // Only readers hold it shared; a conversion holds it exclusively.
                Scope::Folder => match f.try_lock_shared() {
                    Ok(()) => LockHolder::Readers,
                    Err(_) => LockHolder::Conversion,
                },
            };
            Err(BundleError::Locked {
                path: named.to_path_buf(),
                lock: path,
                holder,
            })
        }
        Err(TryLockError::Error(e)) => Err(BundleError::io(&path, e)),
    }
}

/// Removes what killed runs of `scope` left in `folder`, with `remove`; the caller holds
/// that scope's lock, so no live run owns any of it (see the module docs). A leftover
/// this user may not remove or put back is skipped: it is not ours (another user's, in
/// a shared folder), and refusing to run would not make it ours.
fn clean_leftovers(
    folder: &Path,
    scope: Scope,
    remove: &dyn Fn(&Path) -> std::io::Result<()>,
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
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {}
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
        std::fs::create_dir_all(o.join(".q3vl-tmp-1-1-0")).unwrap();
        std::fs::create_dir_all(o.join(".q3vl-tmp-2-2-0")).unwrap();
        // Another user's stale staging folder in a sticky folder: EPERM for us.
        let remove = |p: &Path| {
            if p.ends_with(".q3vl-tmp-1-1-0") {
                Err(std::io::Error::from_raw_os_error(libc::EPERM))
            } else {
                remove_any(p)
            }
        };
        clean_leftovers(o, Scope::Folder, &remove).unwrap();
        assert_eq!(names(o), [".q3vl-tmp-1-1-0"]);
        // Any other failure is still reported, naming the leftover.
        let broken = |_: &Path| Err(std::io::Error::from_raw_os_error(libc::EIO));
        let e = clean_leftovers(o, Scope::Folder, &broken).unwrap_err();
        assert!(e.to_string().contains(".q3vl-tmp-1-1-0"), "{e}");
    }

    #[test]
    fn readers_share_the_folder_and_exclude_conversions() {
        let out = tempfile::tempdir().unwrap();
        let o = out.path();
        let r1 = ReadClaim::acquire(o).unwrap();
        let r2 = ReadClaim::acquire(o).unwrap();
        assert!(r1.is_locked() && r2.is_locked());
        let e = Staging::begin(o).err().unwrap();
        assert!(e.to_string().contains("a q3vl run, verify or bench"), "{e}");
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
