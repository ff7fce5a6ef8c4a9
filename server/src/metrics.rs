//! [`Metrics`]: what `GET /metrics` reports, in the Prometheus text format. Counters
//! only grow; rates are Prometheus' `rate()` of them, plus the last decode step's
//! tokens per second as a gauge.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// The server's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered 2xx.
    pub ok: AtomicU64,
    /// Requests refused 4xx.
    pub client_errors: AtomicU64,
    /// Requests refused because the queue was full (503).
    pub busy: AtomicU64,
    /// Requests failed 5xx.
    pub server_errors: AtomicU64,
    /// Requests whose client went away before the answer ended.
    pub cancelled: AtomicU64,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens taken from the prompt cache instead of run again.
    pub cached_prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Decode steps run (each for every decoding request at once).
    pub decode_steps: AtomicU64,
    /// Requests waiting for a slot.
    pub queued: AtomicUsize,
    /// Requests holding a slot.
    pub active: AtomicUsize,
    /// Bytes held by cached prompts.
    pub cache_bytes: AtomicUsize,
    /// The last decode step's tokens per second (f64 bits).
    pub decode_tok_s: AtomicU64,
    /// Sum of time to first token, microseconds, and its count.
    pub ttft_us: AtomicU64,
    /// Requests that got a first token.
    pub ttft_count: AtomicU64,
}

impl Metrics {
    /// Counts a finished HTTP request by its status.
    pub fn count_status(&self, status: u16) {
        let c = match status {
            200..=299 => &self.ok,
            503 => &self.busy,
            400..=499 => &self.client_errors,
            _ => &self.server_errors,
        };
        c.fetch_add(1, Relaxed);
    }

    /// Records a decode step of `tokens` tokens that took `secs`.
    pub fn record_step(&self, tokens: usize, secs: f64) {
        self.decode_steps.fetch_add(1, Relaxed);
        self.generated_tokens.fetch_add(tokens as u64, Relaxed);
        let rate = tokens as f64 / secs.max(1e-9);
        self.decode_tok_s.store(rate.to_bits(), Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, String)]| {
            let _ = writeln!(s, "# HELP q3vl_{name} {help}\n# TYPE q3vl_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(s, "q3vl_{name}{labels} {v}");
            }
        };
        let g = |a: &AtomicU64| a.load(Relaxed).to_string();
        metric(
            "requests_total",
            "counter",
            "Chat requests by outcome.",
            &[
                ("{outcome=\"ok\"}", g(&self.ok)),
                ("{outcome=\"client_error\"}", g(&self.client_errors)),
                ("{outcome=\"busy\"}", g(&self.busy)),
                ("{outcome=\"server_error\"}", g(&self.server_errors)),
                ("{outcome=\"cancelled\"}", g(&self.cancelled)),
            ],
        );
        let one = |v: String| [("", v)];
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests.",
            &one(g(&self.prompt_tokens)),
        );
        metric(
            "prompt_tokens_cached_total",
            "counter",
            "Prompt tokens taken from the prompt cache.",
            &one(g(&self.cached_prompt_tokens)),
        );
        metric(
            "generated_tokens_total",
            "counter",
            "Tokens generated.",
            &one(g(&self.generated_tokens)),
        );
        metric(
            "decode_steps_total",
            "counter",
            "Batched decode steps.",
            &one(g(&self.decode_steps)),
        );
        metric(
            "queue_length",
            "gauge",
            "Requests waiting for a slot.",
            &one(self.queued.load(Relaxed).to_string()),
        );
        metric(
            "active_requests",
            "gauge",
            "Requests holding a slot.",
            &one(self.active.load(Relaxed).to_string()),
        );
        metric(
            "prompt_cache_bytes",
            "gauge",
            "Bytes held by cached prompts.",
            &one(self.cache_bytes.load(Relaxed).to_string()),
        );
        let rate = f64::from_bits(self.decode_tok_s.load(Relaxed));
        metric(
            "decode_tokens_per_second",
            "gauge",
            "Tokens per second of the last decode step, over every request in it.",
            &one(format!("{rate:.3}")),
        );
        metric(
            "time_to_first_token_seconds_sum",
            "counter",
            "Total time from admission to first token.",
            &one(format!("{:.6}", self.ttft_us.load(Relaxed) as f64 / 1e6)),
        );
        metric(
            "time_to_first_token_seconds_count",
            "counter",
            "Requests that got a first token.",
            &one(g(&self.ttft_count)),
        );
        s
    }
}
