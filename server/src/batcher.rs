//! The batch: one thread owns the engine's compute and runs every admitted request
//! together (continuous batching).
//!
//! Each turn it admits waiting requests into free slots (encoding their images, once
//! per image thanks to [`ImageCache`], and starting from the longest cached prompt
//! they share, [`PromptCaches`]), runs one prefill chunk of the oldest request still
//! in its prompt (so a long prompt never stalls the others for more than a chunk),
//! then one decode step of every request past its prompt, which reads each weight
//! once for all of them ([`q3vl_engine::Engine::decode_step`]). New requests join at
//! these step boundaries. A request whose client went away leaves at the next turn,
//! freeing its slot. A request's tokens do not depend on what else is in the batch
//! (`tests/engine_batching.rs`).

use crate::caches::{ImageCache, PromptCaches};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::queue::{Event, Job, Queue};
use q3vl_engine::{Engine, EngineError, PromptCache, Sequence};
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
    /// Encoded images kept.
    pub image_cache: usize,
}

/// A request holding a slot.
struct Active {
    seq: Sequence,
    events: UnboundedSender<Event>,
    queued_at: Instant,
    /// The cached prompt it started from, returned to the store if it is cancelled.
    reused: Option<PromptCache>,
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
            images: ImageCache::new(opts.image_cache),
            engine,
            queue,
            metrics,
            opts,
            active: vec![],
        }
    }

    /// Runs turns until `stop` is set; then fails what is left.
    pub fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Relaxed) {
            self.turn();
        }
        for a in &mut self.active {
            a.fail(ApiError::internal("the server is shutting down"));
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
        let compute = catch_unwind(AssertUnwindSafe(|| {
            self.prefill_one();
            self.decode_all();
        }));
        if compute.is_err() {
            // The panic hook reported it; the requests in flight cannot go on.
            for a in &mut self.active {
                a.fail(ApiError::internal(
                    "internal error in the engine (reported in the server's log)",
                ));
            }
        }
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

    /// Starts `job`: its image through the tower (or from the cache), its cached
    /// prefix, its sequence.
    fn start(&mut self, job: Job) {
        let engine = self.engine.clone();
        let started = catch_unwind(AssertUnwindSafe(|| {
            let mut images = Vec::with_capacity(job.images.len());
            for img in &job.images {
                images.push(self.images.get_or_encode(img.key, || {
                    engine.encode_image(&img.patched.pixel_values, img.patched.grid_thw)
                })?);
            }
            let pad = engine.config().image_token_id;
            let reused = self
                .prompts
                .take_best(|e| e.reusable(&job.ids, &images, pad));
            let seq = engine.begin(&job.ids, &images, &job.params, reused.as_ref())?;
            Ok((seq, reused))
        }));
        let (seq, reused) = match started {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return fail_job(&job.events, api_error(e)),
            Err(_) => {
                return fail_job(
                    &job.events,
                    ApiError::internal("internal error starting the request"),
                )
            }
        };
        let t = seq.generation().timings;
        self.metrics
            .prompt_tokens
            .fetch_add(t.prompt_tokens as u64, Relaxed);
        self.metrics
            .cached_prompt_tokens
            .fetch_add(t.cached_tokens as u64, Relaxed);
        self.active.push(Active {
            seq,
            events: job.events,
            queued_at: job.queued_at,
            reused,
            first_sent: false,
            failed: false,
        });
    }

    /// Frees the slots of requests whose client went away.
    fn drop_cancelled(&mut self) {
        let mut kept = Vec::with_capacity(self.active.len());
        for a in self.active.drain(..) {
            if a.events.is_closed() && !a.failed {
                self.metrics.cancelled.fetch_add(1, Relaxed);
                // A prompt run to its end is kept (a stop string ends a request this
                // way too); otherwise the prefix it started from goes back.
                if a.seq.prompt_left() == 0 {
                    self.prompts.put(a.seq.into_prompt_cache());
                } else if let Some(r) = a.reused {
                    self.prompts.put(r);
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

fn fail_job(events: &UnboundedSender<Event>, e: ApiError) {
    let _ = events.send(Event::Failed(e));
}
