//! Helpers every subcommand shares: version string, one-line errors, progress bars.

/// `q3vl --version`: the crate version and the git commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("Q3VL_GIT_COMMIT"),
    ")"
);

/// The clap parser of a count that must be at least 1 (`--threads`,
/// `--decode-tokens`, …): zero is refused at parse time, on one line naming the
/// option, before any work.
pub fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

/// The error and its causes on one line, `outer: inner: root`.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for (i, c) in e.chain().enumerate() {
        let part = c.to_string().replace('\n', " ");
        if i > 0 {
            // Skip causes already spelled out in the outer message.
            if s.contains(&part) {
                continue;
            }
            s.push_str(": ");
        }
        s.push_str(&part);
    }
    s
}

/// A panic is a bug, not a user error: report it on one line, without a backtrace.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error (please report): {msg}{loc}");
    }));
}

/// A spinner on a terminal, nothing otherwise (stderr not a TTY, or `--json`).
pub fn spinner(msg: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

/// Keeps freed large buffers in the heap for reuse (Linux glibc; elsewhere nothing).
///
/// The engine allocates the same activation buffers layer after layer, tens of MB per
/// vision block. glibc maps each block above its mmap threshold afresh and unmaps it
/// on free, so every layer page-faulted and zeroed its buffers anew: on the 8B vision
/// encode, 199k minor faults and 0.7–0.8 s of system time, against 65–70k and 0.3 s
/// with the threshold at its 32 MiB maximum and no heap trimming. Called by the
/// commands that run the engine, before it allocates.
pub fn reuse_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds; it is called before the
    // engine's threads start allocating.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
