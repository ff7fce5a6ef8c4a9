//! Cooperative cancellation: the CLI's Ctrl-C handler sets the flag, long loops poll it
//! between chunks and unwind with [`ConvertError::Interrupted`], and the staging
//! folders are removed on the way out.

use crate::error::ConvertError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A shared "stop now" flag.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A flag that is not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag (callable from a signal-handling thread).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the flag is set.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Interrupted)` once the flag is set.
    pub fn check(&self) -> Result<(), ConvertError> {
        if self.is_cancelled() {
            Err(ConvertError::Interrupted)
        } else {
            Ok(())
        }
    }
}
