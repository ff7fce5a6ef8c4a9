//! [`Queue`]: requests waiting for a slot in the batch, bounded so that a flood of
//! requests is refused (503) instead of growing memory without end.

use crate::error::ApiError;
use crate::metrics::Metrics;
use q3vl_engine::{Finish, GenerateParams, Generation};
use q3vl_model::image::PatchedImage;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// An image ready for the vision tower, and the key it is cached under (a hash of
/// its patch rows and grid).
pub struct PreparedImage {
    /// The preprocessed image.
    pub patched: PatchedImage,
    /// sha256 of the patch rows and grid.
    pub key: [u8; 32],
}

/// What the batch sends a request's handler.
#[derive(Debug)]
pub enum Event {
    /// A token was chosen (a stopping eos included).
    Token(u32),
    /// Generation ended.
    Finished {
        /// Why.
        finish: Finish,
        /// Tokens and timings.
        generation: Box<Generation>,
    },
    /// Generation failed.
    Failed(ApiError),
}

/// One request for the batch.
pub struct Job {
    /// Prompt ids (HF ids, pads expanded).
    pub ids: Vec<u32>,
    /// Its images, in order.
    pub images: Vec<PreparedImage>,
    /// How to generate.
    pub params: GenerateParams,
    /// Where its events go; closed when the client went away.
    pub events: UnboundedSender<Event>,
    /// When it was queued (for the time to first token).
    pub queued_at: Instant,
}

/// The waiting requests.
pub struct Queue {
    jobs: Mutex<Waiting>,
    ready: Condvar,
    capacity: usize,
    metrics: Arc<Metrics>,
}

/// The queue's state under its lock.
#[derive(Default)]
struct Waiting {
    jobs: VecDeque<Job>,
    /// Set at shutdown: nothing more is taken in.
    closed: bool,
}

impl Queue {
    /// A queue holding at most `capacity` waiting requests.
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Queue {
        Queue {
            jobs: Mutex::new(Waiting::default()),
            ready: Condvar::new(),
            capacity,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // A panic while holding the lock leaves the queue consistent (push and pop
        // are single calls), so a poisoned lock is still usable.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`, or refuses it (503) when the queue is full or closed.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let mut w = self.lock();
        if w.closed {
            return Err(ApiError::shutting_down());
        }
        if w.jobs.len() >= self.capacity {
            return Err(ApiError::overloaded(w.jobs.len()));
        }
        w.jobs.push_back(job);
        self.metrics.queued.store(w.jobs.len(), Relaxed);
        self.ready.notify_one();
        Ok(())
    }

    /// Refuses every later job and fails the waiting ones (shutdown): no handler is
    /// left waiting for an answer that will not come.
    pub fn close(&self) {
        let mut w = self.lock();
        w.closed = true;
        for job in w.jobs.drain(..) {
            let _ = job.events.send(Event::Failed(ApiError::shutting_down()));
        }
        self.metrics.queued.store(0, Relaxed);
    }

    /// The next waiting job whose client is still there; with `wait`, blocks up to
    /// `wait` for one.
    pub fn take(&self, wait: Option<Duration>) -> Option<Job> {
        let mut w = self.lock();
        loop {
            while let Some(job) = w.jobs.pop_front() {
                self.metrics.queued.store(w.jobs.len(), Relaxed);
                if !job.events.is_closed() {
                    return Some(job);
                }
                self.metrics.cancelled.fetch_add(1, Relaxed);
            }
            let limit = wait?;
            let (guard, timeout) = self
                .ready
                .wait_timeout(w, limit)
                .unwrap_or_else(|e| e.into_inner());
            w = guard;
            if timeout.timed_out() && w.jobs.is_empty() {
                return None;
            }
        }
    }
}
