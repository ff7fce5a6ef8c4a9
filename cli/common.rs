//! Helpers every subcommand shares: version string, one-line errors, progress bars.

/// `q3vl --version`: the crate version and the git commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("Q3VL_GIT_COMMIT"),
    ")"
);

/// Exit code of a caught internal error (a panic: a bug in q3vl, not bad input), the
/// code Rust itself gives an uncaught panic, so every panic path exits the same way.
pub const EXIT_BUG: u8 = 101;

/// The clap parser of a count from 1 to `max` (`bench --decode-tokens`; `--threads`
/// has [`threads`]): zero and anything above `max` are refused at parse time, on one
/// line naming the option, before any work.
pub fn count_up_to(max: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=max)
}

/// Most decode steps `bench --decode-tokens` accepts (the bundle's context bounds it
/// further once open): far more than a rate needs, and the step count plus a prompt
/// stays far from overflowing.
pub const MAX_DECODE_TOKENS: u64 = 1_000_000;

/// This machine's physical memory in bytes, where the OS says.
fn physical_memory() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads system constants.
        let (pages, page) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && page > 0 {
            return (pages as u64).checked_mul(page as u64);
        }
    }
    None
}

/// Largest `bench --bandwidth-mib` buffer: 64 GiB, and at most half this machine's
/// memory, since the test writes every page of it (a buffer near the machine's
/// memory would get q3vl killed, and one past it aborts on allocation). At least 1.
pub fn max_bandwidth_mib() -> u64 {
    let cap = 64 << 10;
    physical_memory().map_or(cap, |b| cap.min((b / 2) >> 20).max(1))
}

/// The parser of `bench --bandwidth-mib`: 1 to [`max_bandwidth_mib`] MiB, refused at
/// parse time on one line naming the option.
pub fn bandwidth_mib() -> clap::builder::RangedU64ValueParser<usize> {
    count_up_to(max_bandwidth_mib())
}

/// Largest size of one dimension of a `bench` kernel shape (2^20).
pub const MAX_SHAPE_DIM: u64 = 1 << 20;
/// Most bytes the buffers of one kernel micro-benchmark may take (8 GiB).
pub const MAX_SHAPE_BYTES: u64 = 8 << 30;
/// Most multiply-adds of one kernel call (2^38, 78 times the default 8B q_proj
/// shape's), so a timing of seven calls ends in minutes, not hours.
pub const MAX_SHAPE_MACS: u64 = 1 << 38;

/// `AxBxC` within the bounds above: all positive and at most [`MAX_SHAPE_DIM`], the
/// middle one (the reduction length) a multiple of 32, `bytes(a, b, c)` (the
/// kernel's buffers, `None` on overflow) at most [`MAX_SHAPE_BYTES`].
fn bounded_shape(
    s: &str,
    bytes: fn(u64, u64, u64) -> Option<u64>,
) -> Result<(usize, usize, usize), String> {
    let v: Vec<u64> = s
        .split('x')
        .map(|p| p.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{s}: {e}"))?;
    let [a, b, c] = v[..] else {
        return Err(format!("{s}: expected three sizes AxBxC"));
    };
    if [a, b, c].iter().any(|&d| d == 0 || d > MAX_SHAPE_DIM) || b % 32 != 0 {
        return Err(format!(
            "{s}: every size must be in 1..={MAX_SHAPE_DIM}, the middle a multiple of 32"
        ));
    }
    let gib = |n: u64| n as f64 / (1u64 << 30) as f64;
    match bytes(a, b, c) {
        Some(n) if n <= MAX_SHAPE_BYTES => {}
        n => {
            let need = n.map_or("more than 16 EiB".into(), |n| format!("{:.0} GiB", gib(n)));
            return Err(format!(
                "{s}: its buffers would take {need}, more than the {:.0} GiB limit",
                gib(MAX_SHAPE_BYTES)
            ));
        }
    }
    if a.checked_mul(b)
        .and_then(|x| x.checked_mul(c))
        .is_none_or(|m| m > MAX_SHAPE_MACS)
    {
        return Err(format!(
            "{s}: more than {MAX_SHAPE_MACS} multiply-adds per call"
        ));
    }
    Ok((a as usize, b as usize, c as usize))
}

/// `bench --q8-shape ROWSxCOLSxTOKENS`: its buffers are the int8 weight with its f16
/// scales (under 2 bytes a weight), the f32 activations with their quantized copies
/// (under 8 bytes a value) and the f32 output.
pub fn q8_shape(s: &str) -> Result<(usize, usize, usize), String> {
    bounded_shape(s, |rows, cols, tokens| {
        let weights = rows.checked_mul(cols)?.checked_mul(2)?;
        let acts = tokens.checked_mul(cols)?.checked_mul(8)?;
        let out = tokens.checked_mul(rows)?.checked_mul(4)?;
        weights.checked_add(acts)?.checked_add(out)
    })
}

/// `bench --gemm-shape MxKxN`: its buffers are the f16 `N × K` weight, the f32
/// `M × K` activations and `M × N` output, and the bias.
pub fn gemm_shape(s: &str) -> Result<(usize, usize, usize), String> {
    bounded_shape(s, |m, k, n| {
        let weights = n.checked_mul(k)?.checked_mul(2)?;
        let acts = m.checked_mul(k)?.checked_mul(4)?;
        let out = m.checked_mul(n)?.checked_add(n)?.checked_mul(4)?;
        weights.checked_add(acts)?.checked_add(out)
    })
}

/// Most worker threads `--threads` accepts: four per core the process may use (at
/// least 4). Results never depend on the thread count, and past the cores more
/// threads only add scheduling: 3000 threads once took over a minute for a 50 ms job.
pub fn max_threads() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The one parser of every subcommand's `--threads`: at least 1 and at most
/// [`max_threads`], refused at parse time on one line naming the option.
pub fn threads() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=max_threads() as u64)
}

/// The options of every command that writes safetensors (`convert`, `synth`).
#[derive(clap::Args)]
pub struct WriteArgs {
    /// Worker threads (default: all cores; at most 4 per core).
    #[arg(long, value_parser = threads())]
    pub threads: Option<usize>,
    /// Shard size in bytes (default ~4 GiB).
    #[arg(long, hide = true)]
    pub shard_size: Option<u64>,
}

impl WriteArgs {
    /// The shard policy `--shard-size` asks for (the default without it).
    pub fn shard(&self) -> q3vl_bundle::ShardPolicy {
        self.shard_size
            .map(|n| q3vl_bundle::ShardPolicy { max_shard_bytes: n })
            .unwrap_or_default()
    }
}

/// The one line a command-line error becomes: clap's first line, except that a
/// missing required option is named (clap lists the options on the lines below the
/// first, which the one-line rule would cut).
pub fn clap_error_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() == ErrorKind::MissingRequiredArgument {
        if let Some(ContextValue::Strings(args)) = e.get(ContextKind::InvalidArg) {
            // "--bundle <BUNDLE>" → "--bundle"; a positional stays "<BUNDLE_DIR>".
            let names: Vec<&str> = args
                .iter()
                .map(|a| a.split_whitespace().next().unwrap_or(a))
                .collect();
            let what = if names.iter().all(|n| n.starts_with('-')) {
                "option"
            } else {
                "argument"
            };
            let s = if names.len() > 1 { "s" } else { "" };
            return format!("error: missing required {what}{s} {}", names.join(", "));
        }
    }
    let text = e.render().to_string();
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("error")
        .to_string()
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

/// A panic is a bug, not a user error: report it on one line, without a backtrace
/// (`main` then exits with [`EXIT_BUG`]).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        // One line, however the message was written.
        let msg = q3vl_model::error::panic_summary(info).replace('\n', " ");
        eprintln!("error: internal error, a bug in q3vl (please report it): {msg}");
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
