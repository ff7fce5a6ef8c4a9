//! A large output file written around the page cache.
//!
//! Bundles are written once and read much later, so routing gigabytes of them
//! through the page cache only costs CPU: the kernel copies every byte into freshly
//! allocated cache pages, tracks them dirty and writes them back (about a quarter of
//! the converter's CPU time on the 8B shape). Here whole aligned buffers go straight
//! to the disk with `O_DIRECT`, on a thread of their own so the caller keeps
//! producing while the disk writes; only the last partial block goes through a
//! normal descriptor. Where `O_DIRECT` is refused (tmpfs, some network file systems,
//! non-Linux systems) the same buffers are written through the page cache instead,
//! with writeback started every few buffers so the final fsync has little left.

use std::alloc::{alloc, dealloc, Layout};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Alignment of buffer addresses, lengths and file offsets for `O_DIRECT` (the
/// largest logical block size in common use).
const ALIGN: usize = 4096;
/// Bytes per buffer handed to the disk.
const BUF_BYTES: usize = 8 << 20;
/// Buffers in the ring: one filling, one being written, one spare.
const BUFFERS: usize = 3;

/// A heap buffer whose address is [`ALIGN`]-aligned.
struct AlignedBuf {
    ptr: *mut u8,
    /// Bytes to write (≤ `BUF_BYTES`).
    len: usize,
}

// SAFETY: the buffer is uniquely owned and only moved between threads whole.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout() -> Layout {
        Layout::from_size_align(BUF_BYTES, ALIGN).expect("valid layout")
    }

    fn new() -> AlignedBuf {
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { alloc(Self::layout()) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(Self::layout());
        }
        AlignedBuf { ptr, len: 0 }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len ≤ BUF_BYTES` bytes of the allocation, all written by `append`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Copies as much of `src` as fits; returns how much.
    fn append(&mut self, src: &[u8]) -> usize {
        let n = src.len().min(BUF_BYTES - self.len);
        // SAFETY: `len + n ≤ BUF_BYTES`; `src` cannot overlap a buffer we own.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(self.len), n) };
        self.len += n;
        n
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, Self::layout()) }
    }
}

/// A file being written sequentially, mostly with `O_DIRECT`.
pub struct DirectFile {
    /// The normal descriptor: the tail, the fallback, and the final fsync.
    file: std::sync::Arc<File>,
    cur: AlignedBuf,
    /// Bytes handed to the disk thread so far (always a multiple of `BUF_BYTES`).
    sent: u64,
    to_disk: Option<SyncSender<(u64, AlignedBuf)>>,
    free: Receiver<AlignedBuf>,
    disk: Option<JoinHandle<io::Result<()>>>,
}

impl DirectFile {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> io::Result<DirectFile> {
        Self::create_with(path, true)
    }

    /// Creates `path`, bypassing the page cache only if `allow_direct`.
    fn create_with(path: &Path, allow_direct: bool) -> io::Result<DirectFile> {
        let file = std::sync::Arc::new(File::create(path)?);
        let direct = if allow_direct {
            open_direct(path)
        } else {
            None
        };
        let (to_disk, jobs) = sync_channel::<(u64, AlignedBuf)>(BUFFERS);
        let (give_back, free) = sync_channel::<AlignedBuf>(BUFFERS);
        for _ in 1..BUFFERS {
            give_back.send(AlignedBuf::new()).expect("receiver alive");
        }
        let buffered = file.clone();
        let disk = std::thread::Builder::new()
            .name("q3vl-disk".into())
            .spawn(move || disk_loop(direct, &buffered, jobs, give_back))?;
        Ok(DirectFile {
            file,
            cur: AlignedBuf::new(),
            sent: 0,
            to_disk: Some(to_disk),
            free,
            disk: Some(disk),
        })
    }

    /// Appends `bytes`.
    pub fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = self.cur.append(bytes);
            bytes = &bytes[n..];
            if self.cur.len == BUF_BYTES {
                self.hand_off()?;
            }
        }
        Ok(())
    }

    /// Sends the current (full) buffer to the disk thread and takes a free one.
    fn hand_off(&mut self) -> io::Result<()> {
        let next = match self.free.recv() {
            Ok(b) => b,
            Err(_) => return Err(self.disk_error()),
        };
        let full = std::mem::replace(&mut self.cur, next);
        let at = self.sent;
        self.sent += full.len as u64;
        let tx = self.to_disk.as_ref().expect("open");
        if tx.send((at, full)).is_err() {
            return Err(self.disk_error());
        }
        Ok(())
    }

    /// The disk thread stopped: its result says why.
    fn disk_error(&mut self) -> io::Error {
        self.to_disk = None;
        match self.disk.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => io::Error::other("disk writer thread panicked"),
            _ => io::Error::other("disk writer thread stopped early"),
        }
    }

    /// Writes what is left, waits for the disk thread, and fsyncs unless `sync` is
    /// false (a file being thrown away).
    pub fn finish(mut self, sync: bool) -> io::Result<u64> {
        // The aligned part of the last buffer still goes direct; the rest is written
        // through the normal descriptor once every direct write has landed.
        let tail_at = self.cur.len - self.cur.len % ALIGN;
        let tail = self.cur.bytes()[tail_at..].to_vec();
        if tail_at > 0 {
            self.cur.len = tail_at;
            let last = std::mem::replace(&mut self.cur, AlignedBuf::new());
            let at = self.sent;
            self.sent += last.len as u64;
            let tx = self.to_disk.as_ref().expect("open");
            if tx.send((at, last)).is_err() {
                return Err(self.disk_error());
            }
        }
        self.to_disk = None;
        match self.disk.take().map(|h| h.join()) {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => return Err(e),
            _ => return Err(io::Error::other("disk writer thread panicked")),
        }
        self.file.write_all_at(&tail, self.sent)?;
        let size = self.sent + tail.len() as u64;
        if sync {
            self.file.sync_all()?;
        }
        Ok(size)
    }
}

impl Drop for DirectFile {
    fn drop(&mut self) {
        self.to_disk = None;
        if let Some(h) = self.disk.take() {
            let _ = h.join();
        }
    }
}

/// Opens `path` for writing with `O_DIRECT`, if the system and file system allow it.
fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Writes each buffer at its offset, direct while the file system accepts it, and
/// returns the buffer to the ring.
fn disk_loop(
    mut direct: Option<File>,
    buffered: &File,
    jobs: Receiver<(u64, AlignedBuf)>,
    give_back: SyncSender<AlignedBuf>,
) -> io::Result<()> {
    let mut kicked = 0u64;
    for (at, mut buf) in jobs {
        let bytes = buf.bytes();
        let mut done = false;
        if let Some(f) = &direct {
            match f.write_all_at(bytes, at) {
                Ok(()) => done = true,
                // Accepted at open but not for writes (some file systems): fall back.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => direct = None,
                Err(e) => return Err(e),
            }
        }
        if !done {
            buffered.write_all_at(bytes, at)?;
            let end = at + bytes.len() as u64;
            if end - kicked >= (BUFFERS * BUF_BYTES) as u64 {
                start_writeback(buffered, kicked, end - kicked);
                kicked = end;
            }
        }
        buf.len = 0;
        // The owner may already be gone (an error elsewhere): then so is the ring.
        let _ = give_back.try_send(buf);
    }
    Ok(())
}

/// Starts writing `len` bytes at `offset` of `f` back to disk without waiting, so the
/// disk is busy from the first buffer on instead of idling until the kernel's dirty
/// threshold. Best effort (Linux only).
fn start_writeback(f: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; failure is harmless.
        unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, offset, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 13) as u8)
            .collect()
    }

    /// Sizes around the buffer and block boundaries, written in uneven pieces, both
    /// direct (where the file system allows) and through the page cache.
    #[test]
    fn files_hold_exactly_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        for (k, (&n, allow_direct)) in [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            BUF_BYTES - 1,
            BUF_BYTES,
            BUF_BYTES + 7,
            3 * BUF_BYTES + ALIGN + 5,
        ]
        .iter()
        .flat_map(|n| [(n, true), (n, false)])
        .enumerate()
        {
            let want = pattern(n, k as u8);
            let path = dir.path().join(format!("f{k}"));
            let mut f = DirectFile::create_with(&path, allow_direct).unwrap();
            for piece in want.chunks(1_000_003) {
                f.write_all(piece).unwrap();
            }
            assert_eq!(f.finish(true).unwrap(), n as u64);
            assert_eq!(
                std::fs::read(&path).unwrap(),
                want,
                "size {n}, direct {allow_direct}"
            );
        }
    }

    #[test]
    fn an_unwritable_file_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = DirectFile::create(&dir.path().join("missing/x"))
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
