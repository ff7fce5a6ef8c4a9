//! Running one reader on mutated inputs: how many cases, replaying one, catching
//! panics, checking every refusal is one line naming the culprit, and refusing
//! allocations no input of this size can justify.

use super::mutate::Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::fmt::{Display, Write as _};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Cases per reader in `cargo test` when `Q3VL_FUZZ_CASES` is not set. A reader whose
/// case costs more (a whole conversion, a bundle opened and read) runs a fraction.
pub const DEFAULT_CASES: usize = 1500;

/// Why a case failed: the reader refused the input (fine, if said well), or an
/// invariant the reader promises does not hold (a finding).
pub enum Fail {
    /// The reader's error, as its `Display` prints it.
    Refused(String),
    /// A broken promise (say, a path outside the folder accepted).
    Broken(String),
}

/// The result of one case.
pub type Case = Result<(), Fail>;

/// Turns a reader's error into a refusal.
pub trait Refuse<T> {
    /// `Err(e)` becomes `Fail::Refused(e.to_string())`.
    fn refused(self) -> Result<T, Fail>;
}

impl<T, E: Display> Refuse<T> for Result<T, E> {
    fn refused(self) -> Result<T, Fail> {
        self.map_err(|e| Fail::Refused(e.to_string()))
    }
}

/// A broken promise unless `ok`.
pub fn ensure(ok: bool, what: impl FnOnce() -> String) -> Case {
    if ok {
        Ok(())
    } else {
        Err(Fail::Broken(what()))
    }
}

/// `Q3VL_FUZZ_CASES`, or the default.
fn base_cases() -> usize {
    std::env::var("Q3VL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// `Q3VL_FUZZ_VERBOSE=1` prints every refusal (to see how deep the mutations reach).
fn verbose() -> bool {
    std::env::var_os("Q3VL_FUZZ_VERBOSE").is_some()
}

/// FNV-1a of the reader's name: each reader gets its own stream of seeds.
fn reader_seed(reader: &str) -> u64 {
    let base: u64 = std::env::var("Q3VL_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    reader.bytes().fold(0xcbf2_9ce4_8422_2325 ^ base, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// `Q3VL_FUZZ_REPLAY=reader:seed` (seed in hex, as findings print it): that case only,
/// with its files kept.
fn replay(reader: &str) -> Option<Option<u64>> {
    let v = std::env::var("Q3VL_FUZZ_REPLAY").ok()?;
    let (r, s) = v.split_once(':')?;
    let s = u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()?;
    Some((r == reader).then_some(s))
}

/// The seeds to run: `base / divisor` (at least one) from the reader's own stream, or
/// the one being replayed (none when another reader is).
fn seeds(reader: &str, divisor: usize) -> Vec<u64> {
    match replay(reader) {
        Some(None) => vec![],
        Some(Some(s)) => vec![s],
        None => {
            let first = reader_seed(reader);
            let n = (base_cases() / divisor).max(1);
            (0..n as u64).map(|i| first.wrapping_add(i)).collect()
        }
    }
}

/// What one case came to: accepted, refused, and the finding if any.
struct Verdict {
    refused: bool,
    finding: Option<String>,
}

/// Runs one case in a fresh scratch folder (kept when `keep`), catching a panic.
fn run_case(
    reader: &'static str,
    seed: u64,
    names: &[&str],
    keep: bool,
    case: &mut impl FnMut(&mut Rng, &Path) -> Case,
) -> Verdict {
    let scratch = tempfile::Builder::new()
        .prefix("q3vl-fuzz-")
        .tempdir()
        .expect("a temp dir");
    CASE.with(|c| c.set((reader, seed)));
    let got = std::panic::catch_unwind(AssertUnwindSafe(|| {
        case(&mut Rng::new(seed), scratch.path())
    }));
    CASE.with(|c| c.set(("", 0)));
    if keep {
        let kept = scratch.keep();
        println!("fuzz {reader}: case files kept in {}", kept.display());
    }
    let (refused, finding) = match got {
        Err(_) => {
            let msg = LAST_PANIC.with(|p| p.take()).unwrap_or_default();
            (false, Some(format!("panic: {msg}")))
        }
        Ok(Ok(())) => (false, None),
        Ok(Err(Fail::Refused(msg))) => {
            if verbose() {
                println!("fuzz {reader} case {seed:#x}: refused: {msg}");
            }
            (true, badly_said(&msg, names))
        }
        Ok(Err(Fail::Broken(what))) => (false, Some(what)),
    };
    Verdict { refused, finding }
}

/// Runs `case` on `base / divisor` fresh seeds (at least one), each in an empty scratch
/// folder, and fails the test listing every finding: a panic, a refusal on more than one
/// line or naming none of `names`, or a broken promise. Prints the counts.
pub fn fuzz(
    reader: &'static str,
    divisor: usize,
    names: &[&str],
    mut case: impl FnMut(&mut Rng, &Path) -> Case,
) {
    install_quiet_panic_hook();
    let seeds = seeds(reader, divisor);
    if seeds.is_empty() {
        return;
    }
    let keep = replay(reader).is_some();
    let t0 = Instant::now();
    let (mut accepted, mut refused) = (0usize, 0usize);
    let mut findings = Vec::new();
    for &seed in &seeds {
        let v = run_case(reader, seed, names, keep, &mut case);
        match (&v.finding, v.refused) {
            (Some(f), _) => findings.push(format!("{reader} case {seed:#x}: {f}")),
            (None, true) => refused += 1,
            (None, false) => accepted += 1,
        }
    }
    println!(
        "fuzz {reader:<20} {:>7} cases: {accepted} accepted, {refused} refused, {} findings, {:.1} s",
        seeds.len(),
        findings.len(),
        t0.elapsed().as_secs_f64()
    );
    let shown: Vec<&str> = findings.iter().take(20).map(String::as_str).collect();
    assert!(
        findings.is_empty(),
        "{} finding(s) (replay one with Q3VL_FUZZ_REPLAY=reader:seed):\n{}",
        findings.len(),
        shown.join("\n")
    );
}

/// Why a refusal is not good enough, if it is not: more than one line, or no name of
/// the file, tensor or option at fault.
fn badly_said(msg: &str, names: &[&str]) -> Option<String> {
    if msg.contains('\n') {
        return Some(format!("error on several lines: {msg:?}"));
    }
    if !names.iter().any(|n| msg.contains(n)) {
        return Some(format!("error names none of {names:?}: {msg}"));
    }
    None
}

thread_local! {
    /// The reader and seed of the case running on this thread ("" outside a case).
    static CASE: Cell<(&'static str, u64)> = const { Cell::new(("", 0)) };
    /// The last panic's message and place, taken by the harness.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Panics inside a case are recorded, not printed (they are reported as findings);
/// panics elsewhere (a failing assertion) print as usual.
fn install_quiet_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CASE.with(|c| c.get().0.is_empty()) {
                return default(info);
            }
            let summary = q3vl_model::error::panic_summary(info);
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(summary));
        }));
    });
}

/// Largest single allocation a case may make: the seeds are a few MB, so anything
/// near this is a size taken from the input without a bound.
pub const MAX_ALLOCATION: usize = 1 << 30;
/// Largest total of live allocations in the process (every reader test at once).
pub const MAX_LIVE: usize = 6 << 30;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, refusing allocations past [`MAX_ALLOCATION`] or [`MAX_LIVE`]:
/// the process then aborts ("memory allocation of N bytes failed") after one line
/// naming the reader and the case, instead of swapping or being killed.
pub struct CappedAllocator;

impl CappedAllocator {
    /// Whether a block of `size` bytes, `growth` of them new, stays within the caps.
    fn admit(&self, size: usize, growth: usize) -> bool {
        let live = LIVE.load(Ordering::Relaxed);
        if size <= MAX_ALLOCATION && live.saturating_add(growth) <= MAX_LIVE {
            return true;
        }
        // No allocation here: format into the stack and write(2) directly.
        let (reader, seed) = CASE.try_with(Cell::get).unwrap_or(("", 0));
        let mut line = StackLine::default();
        let _ = writeln!(
            line,
            "fuzz: {reader} case {seed:#x} asked for {size} bytes with {live} live (caps {MAX_ALLOCATION}, {MAX_LIVE}): replay with Q3VL_FUZZ_REPLAY={reader}:{seed:x}"
        );
        // SAFETY: writes initialised bytes of a live buffer to stderr.
        unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
        false
    }
}

// SAFETY: defers to `System`, only refusing (returning null) some requests, and keeps
// the live count with atomics.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.admit(layout.size(), layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !self.admit(layout.size(), layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && !self.admit(new_size, new_size - layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

/// One line of text in a fixed buffer (the allocator cannot allocate to report).
struct StackLine {
    buf: [u8; 512],
    len: usize,
}

impl Default for StackLine {
    fn default() -> Self {
        StackLine {
            buf: [0; 512],
            len: 0,
        }
    }
}

impl std::fmt::Write for StackLine {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
