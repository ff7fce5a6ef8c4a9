//! Progress reporting: a bar on a terminal, silence otherwise (`docs/cli.md`).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// Receives progress of a long job, in bytes.
pub trait Progress: Sync {
    /// A new phase of `total` bytes starts.
    fn begin(&self, what: &str, total: u64);
    /// `n` more bytes are done.
    fn advance(&self, n: u64);
    /// The phase is over.
    fn end(&self);
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

/// An indicatif bar on stderr.
pub struct Bar(ProgressBar);

impl Progress for Bar {
    fn begin(&self, what: &str, total: u64) {
        self.0.reset();
        self.0.set_length(total);
        self.0.set_position(0);
        self.0.set_message(what.to_string());
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn end(&self) {
        self.0.finish_and_clear();
    }
}

/// A bar when stderr is a terminal, [`Quiet`] otherwise.
pub fn terminal() -> Box<dyn Progress> {
    if !std::io::stderr().is_terminal() {
        return Box::new(Quiet);
    }
    let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:12} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    Box::new(Bar(pb))
}
