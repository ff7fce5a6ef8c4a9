//! The batch: one thread owns the engine's compute and runs every admitted request
//! together (continuous batching).
//!
//! Each turn it admits waiting requests into free slots (encoding their images, each
//! image once while it stays in the [`ImageCache`], and starting from the longest
//! cached prompt they share, [`PromptCaches`]), runs one prefill chunk of the oldest
//! request still in its prompt (a long prompt holds the others back by one chunk per
//! turn, not by its whole prefill), then one decode step of every request past its
//! prompt, which reads each weight once for all of them
//! ([`q3vl_engine::Engine::decode_step`]). New requests join at these step
//! boundaries. A new image runs through the vision tower when its request is
//! admitted, on this thread: the others wait for it (the tower would take the same
//! cores anyway). A request whose handler is gone (its client left) leaves at the
//! next turn, freeing its slot. A request's tokens do not depend on what else is in
//! the batch (`tests/engine_batching.rs`).

use crate::caches::{ImageCache, PromptCaches};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::queue::{Event, Job, Queue};
use q3vl_engine::{Engine, EngineError, Sequence};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// How the batch runs.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Requests generating at once.
    pub parallel: usize,
    /// Prompt tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Bytes of finished prompts kept for later turns.
    pub prompt_cache_bytes: usize,
    /// Bytes of encoded images kept.
    pub image_cache_bytes: usize,
}

/// A request holding a slot.
struct Active {
    seq: Sequence,
    events: UnboundedSender<Event>,
    queued_at: Instant,
    first_sent: bool,
    failed: bool,
}

impl Active {
    /// Sends a token (a closed channel is noticed at the next turn).
    fn send(&mut self, id: u32, metrics: &Metrics) {
        if !self.first_sent {
            self.first_sent = true;
            let us = self.queued_at.elapsed().as_micros() as u64;
            metrics.ttft_us.fetch_add(us, Relaxed);
            metrics.ttft_count.fetch_add(1, Relaxed);
        }
        let _ = self.events.send(Event::Token(id));
    }

    fn fail(&mut self, e: ApiError) {
        self.failed = true;
        let _ = self.events.send(Event::Failed(e));
    }
}

/// An engine error as the request sees it.
fn api_error(e: EngineError) -> ApiError {
    match e {
        e @ EngineError::ContextOverflow { .. } => {
            ApiError::invalid_code("messages", "context_length_exceeded", e.to_string())
        }
        e @ (EngineError::Model(_) | EngineError::ImageTokenCount { .. }) => {
            ApiError::invalid("messages", e.to_string())
        }
        e => ApiError::internal(e.to_string()),
    }
}

/// The batch's state.
pub struct Batch {
    engine: Arc<Engine>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    opts: BatchOptions,
    active: Vec<Active>,
    prompts: PromptCaches,
    images: ImageCache,
}

impl Batch {
    /// A batch over `engine`, fed by `queue`.
    pub fn new(
        engine: Arc<Engine>,
        queue: Arc<Queue>,
        metrics: Arc<Metrics>,
        opts: BatchOptions,
    ) -> Batch {
        Batch {
            prompts: PromptCaches::new(opts.prompt_cache_bytes),
            images: ImageCache::new(opts.image_cache_bytes),
            engine,
            queue,
            metrics,
            opts,
            active: vec![],
        }
    }

    /// Runs turns until `stop` is set; then closes the queue (failing what waits in it)
    /// and fails what is generating. A turn that panics (a bug: the hook reports it)
    /// fails the requests it held; the batch goes on.
    pub fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Relaxed) {
            if catch_unwind(AssertUnwindSafe(|| self.turn())).is_err() {
                for a in self.active.drain(..) {
                    let _ = a.events.send(Event::Failed(ApiError::internal(
                        "internal error in the engine (reported in the server's log)",
                    )));
                }
                self.metrics.active.store(0, Relaxed);
            }
        }
        self.queue.close();
        for a in &mut self.active {
            a.fail(ApiError::shutting_down());
        }
    }

    /// One turn: admit, drop the cancelled, one prefill chunk, one decode step, retire.
    fn turn(&mut self) {
        self.admit();
        self.drop_cancelled();
        self.metrics.active.store(self.active.len(), Relaxed);
        if self.active.is_empty() {
            if let Some(job) = self.queue.take(Some(Duration::from_millis(100))) {
                self.start(job);
            }
            return;
        }
        self.prefill_one();
        self.decode_all();
        self.retire();
        self.metrics.active.store(self.active.len(), Relaxed);
        self.metrics
            .cache_bytes
            .store(self.prompts.bytes(), Relaxed);
    }

    /// Fills free slots from the queue.
    fn admit(&mut self) {
        while self.active.len() < self.opts.parallel {
            match self.queue.take(None) {
                Some(job) => self.start(job),
                None => break,
            }
        }
    }

    /// Starts `job`: its images through the tower (or from the cache), its cached
    /// prefix (copied: the entry stays for others), its sequence.
    fn start(&mut self, job: Job) {
        let started = self.begin(&job);
        let seq = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = job.events.send(Event::Failed(api_error(e)));
                return;
            }
        };
        let t = seq.generation().timings;
        let m = &self.metrics;
        m.prompt_tokens.fetch_add(t.prompt_tokens as u64, Relaxed);
        m.cached_prompt_tokens
            .fetch_add(t.cached_tokens as u64, Relaxed);
        self.active.push(Active {
            seq,
            events: job.events,
            queued_at: job.queued_at,
            first_sent: false,
            failed: false,
        });
    }

    /// The sequence of `job`, from its encoded images and the best cached prefix.
    fn begin(&mut self, job: &Job) -> Result<Sequence, EngineError> {
        let engine = &self.engine;
        let mut images = Vec::with_capacity(job.images.len());
        for img in &job.images {
            let p = &img.patched;
            images.push(
                self.images
                    .get_or_encode(img.key, || engine.encode_image(&p.pixel_values, p.grid_thw))?,
            );
        }
        let pad = engine.config().image_token_id;
        let reuse = self.prompts.best(|e| e.reusable(&job.ids, &images, pad));
        engine.begin(&job.ids, &images, &job.params, reuse)
    }

    /// Frees the slots of requests whose handler is gone (its client left, or a stop
    /// string ended the answer); a prompt run to its end is kept for a next turn.
    fn drop_cancelled(&mut self) {
        let mut kept = Vec::with_capacity(self.active.len());
        for a in self.active.drain(..) {
            if a.events.is_closed() && !a.failed {
                self.metrics.cancelled.fetch_add(1, Relaxed);
                if a.seq.prompt_left() == 0 {
                    self.prompts.put(a.seq.into_prompt_cache());
                }
            } else {
                kept.push(a);
            }
        }
        self.active = kept;
    }

    /// One prefill chunk of the oldest request still in its prompt.
    fn prefill_one(&mut self) {
        let chunk = self.opts.prefill_chunk;
        let Some(a) = self
            .active
            .iter_mut()
            .find(|a| !a.failed && a.seq.finish().is_none() && a.seq.prompt_left() > 0)
        else {
            return;
        };
        match self.engine.prefill(&mut a.seq, chunk) {
            Ok(Some(id)) => {
                self.metrics.generated_tokens.fetch_add(1, Relaxed);
                a.send(id, &self.metrics);
            }
            Ok(None) => {}
            Err(e) => a.fail(api_error(e)),
        }
    }

    /// One decode step of every request past its prompt.
    fn decode_all(&mut self) {
        let decoding = |a: &Active| !a.failed && a.seq.decoding();
        let who: Vec<usize> = (0..self.active.len())
            .filter(|&i| decoding(&self.active[i]))
            .collect();
        if who.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let mut batch: Vec<&mut Sequence> = self
            .active
            .iter_mut()
            .filter(|a| decoding(a))
            .map(|a| &mut a.seq)
            .collect();
        let stepped = self.engine.decode_step(&mut batch);
        drop(batch);
        match stepped {
            Ok(ids) => {
                self.metrics
                    .record_step(ids.len(), t0.elapsed().as_secs_f64());
                for (&i, id) in who.iter().zip(ids) {
                    self.active[i].send(id, &self.metrics);
                }
            }
            Err(e) => {
                let e = api_error(e);
                for &i in &who {
                    self.active[i].fail(e.clone());
                }
            }
        }
    }

    /// Ends finished and failed requests; a finished one's prompt is kept for the
    /// conversation's next turn.
    fn retire(&mut self) {
        let mut kept = Vec::with_capacity(self.active.len());
        for a in self.active.drain(..) {
            if a.failed {
                continue;
            }
            let Some(finish) = a.seq.finish() else {
                kept.push(a);
                continue;
            };
            let generation = Box::new(a.seq.generation());
            let _ = a.events.send(Event::Finished { finish, generation });
            self.prompts.put(a.seq.into_prompt_cache());
        }
        self.active = kept;
    }
}
