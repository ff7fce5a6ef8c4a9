//! The one way q3vl opens a file it was given: only regular files are read (and,
//! for a stream-like input such as `--image`, a pipe), and names found inside other
//! files (index maps, trace metadata, bundle metadata) may only point inside their
//! own folder.
//!
//! A FIFO, a device (`/dev/zero`) or a socket given as an input would make a reader
//! block or read forever. The file is opened non-blocking (so opening a FIFO with no
//! writer returns at once), its type is checked on the open handle (no window for a
//! swap between check and open), and only then is it read.

use std::fs::{File, FileType};
use std::io::{self, Read};
use std::path::{Component, Path};

/// Opens `path` for reading without blocking on the open itself, and returns the
/// handle with its type (symlinks are followed).
fn open_nonblocking(path: &Path) -> io::Result<(File, FileType)> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // A FIFO opened for reading would otherwise wait for a writer.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let f = opts.open(path)?;
    let ft = f.metadata()?.file_type();
    Ok((f, ft))
}

/// The error for a file of the wrong kind, naming what it is instead.
fn wrong_kind(ft: &FileType, wanted: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {}, not {wanted}", kind_of(ft)),
    )
}

/// Opens `path` for reading, refusing anything but a regular file (symlinks to one
/// are followed). The error names what the path is instead.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let (f, ft) = open_nonblocking(path)?;
    // Reads of a regular file never block, so O_NONBLOCK can stay set.
    if ft.is_file() {
        return Ok(f);
    }
    Err(wrong_kind(&ft, "a regular file"))
}

/// Whether `ft` is a FIFO (a named pipe, or a pipe reached as `/dev/stdin` or
/// `/dev/fd/N`, as a shell's `<(…)` gives).
fn is_fifo(ft: &FileType) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        ft.is_fifo()
    }
    #[cfg(not(unix))]
    {
        let _ = ft;
        false
    }
}

/// Makes reads of `f` wait for data again: the FIFO was opened non-blocking only so
/// the open could not wait for a writer.
#[cfg(unix)]
fn clear_nonblocking(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function borrows open; F_GETFL and F_SETFL
    // only read and set its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The whole of a stream-like input of at most `max_bytes` bytes (`--image`): a
/// regular file or a FIFO (`run --image <(…)`, `--image /dev/stdin` on a pipe).
///
/// The open never waits: a FIFO with no writer, or whose writer is gone, reads as
/// empty at once, and one with a writer is read until the writer closes it. Devices,
/// sockets and folders are refused, and so is more than `max_bytes` (a stream that
/// never ends, a file too large), so memory stays bounded.
pub fn read_stream(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let (f, ft) = open_nonblocking(path)?;
    if is_fifo(&ft) {
        #[cfg(unix)]
        clear_nonblocking(&f)?;
    } else if !ft.is_file() {
        return Err(wrong_kind(&ft, "a regular file or a pipe"));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("is larger than the {max_bytes}-byte limit"),
        )
    };
    if ft.is_file() && f.metadata()?.len() > max_bytes {
        return Err(too_large());
    }
    let mut out = Vec::new();
    // One byte past the limit tells a stream of exactly `max_bytes` from a longer one.
    f.take(max_bytes.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > max_bytes {
        return Err(too_large());
    }
    Ok(out)
}

/// What a file of the wrong kind is, for the error.
fn kind_of(ft: &FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() || ft.is_block_device() {
            return "a device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a folder"
    } else {
        "a special file"
    }
}

/// The whole of a regular file.
pub fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = open_regular(path)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

/// The whole of a regular file, as UTF-8 text.
pub fn read_regular_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read_regular(path)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "is not valid UTF-8"))
}

/// Whether `name`, found inside a file, is a relative path that stays inside that
/// file's folder: not empty, not absolute, and made of plain names only (no `..`,
/// no `.`, no drive prefix), so `dir.join(name)` is always below `dir`.
pub fn is_inner_path(name: &str) -> bool {
    let p = Path::new(name);
    !name.is_empty()
        && !name.contains('\0')
        && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Whether `name` is one plain file or folder name (no separator at all).
pub fn is_plain_name(name: &str) -> bool {
    is_inner_path(name) && Path::new(name).components().count() == 1 && !name.contains('\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_opened() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.json");
        std::fs::write(&f, b"{}").unwrap();
        assert_eq!(read_regular(&f).unwrap(), b"{}");
        let e = open_regular(d.path()).unwrap_err().to_string();
        assert!(e.contains("a folder"), "{e}");
        #[cfg(unix)]
        {
            let e = open_regular(Path::new("/dev/zero"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("a device"), "{e}");
            // A FIFO with no writer: a plain open would block here for ever.
            let fifo = d.path().join("fifo");
            mkfifo(&fifo);
            let e = read_regular(&fifo).unwrap_err().to_string();
            assert!(e.contains("a FIFO"), "{e}");
        }
    }

    /// A FIFO at `p` (a test helper; `mkfifo` needs a NUL-terminated path).
    #[cfg(unix)]
    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// A FIFO at `p` with `data` being written into it by a thread. A reader of our
    /// own holds the FIFO open first, so the write end opens at once and the FIFO has
    /// a writer before `read_stream` opens it (its own open never waits for one).
    #[cfg(unix)]
    fn fifo_with_writer(p: &Path, data: Vec<u8>) -> (File, std::thread::JoinHandle<()>) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        mkfifo(p);
        let keep = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .unwrap();
        let mut w = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        let t = std::thread::spawn(move || w.write_all(&data).unwrap());
        (keep, t)
    }

    #[cfg(unix)]
    #[test]
    fn streams_may_be_pipes_but_not_devices() {
        let d = tempfile::tempdir().unwrap();
        // A FIFO with no writer reads as empty, at once.
        let lonely = d.path().join("lonely");
        mkfifo(&lonely);
        assert_eq!(read_stream(&lonely, 1 << 20).unwrap(), b"");
        // A FIFO with a writer is read to the writer's end, more than a pipe buffer.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let fed = d.path().join("fed");
        let (_keep, t) = fifo_with_writer(&fed, data.clone());
        assert_eq!(read_stream(&fed, 1 << 20).unwrap(), data);
        t.join().unwrap();
        // More than the limit is refused, from a FIFO and from a regular file.
        let long = d.path().join("long");
        let (_keep, t) = fifo_with_writer(&long, vec![7; 100]);
        let e = read_stream(&long, 10).unwrap_err().to_string();
        assert!(e.contains("larger than the 10-byte limit"), "{e}");
        t.join().unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, [7; 11]).unwrap();
        assert!(read_stream(&file, 10).is_err());
        std::fs::write(&file, [7; 10]).unwrap();
        assert_eq!(read_stream(&file, 10).unwrap(), [7; 10]);
        // Devices and folders stay refused.
        let e = read_stream(Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a device"), "{e}");
        let e = read_stream(d.path(), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("a folder"), "{e}");
    }

    #[test]
    fn inner_paths_stay_inside() {
        for ok in ["model.safetensors", "shards/a.safetensors", "x"] {
            assert!(is_inner_path(ok), "{ok}");
        }
        for bad in ["", "../x", "a/../../x", "/etc/passwd", "./x", "a\0b"] {
            assert!(!is_inner_path(bad), "{bad:?}");
        }
        assert!(is_plain_name("tiny_vision"));
        assert!(!is_plain_name("a/b") && !is_plain_name("..") && !is_plain_name("a\\b"));
    }
}
