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
        let g = |a: &AtomicU64| a.load(Relaxed).to_string();
        let u = |a: &AtomicUsize| a.load(Relaxed).to_string();
        let mut s = String::new();
        let outcomes = [
            ("ok", &self.ok),
            ("client_error", &self.client_errors),
            ("busy", &self.busy),
            ("server_error", &self.server_errors),
            ("cancelled", &self.cancelled),
        ];
        let _ = writeln!(s, "# HELP q3vl_requests_total Chat requests by outcome.");
        let _ = writeln!(s, "# TYPE q3vl_requests_total counter");
        for (label, c) in outcomes {
            let _ = writeln!(s, "q3vl_requests_total{{outcome=\"{label}\"}} {}", g(c));
        }
        let rate = f64::from_bits(self.decode_tok_s.load(Relaxed));
        let ttft = self.ttft_us.load(Relaxed) as f64 / 1e6;
        let one: [(&str, &str, &str, String); 10] = [
            (
                "prompt_tokens_total",
                "counter",
                "Prompt tokens of admitted requests.",
                g(&self.prompt_tokens),
            ),
            (
                "prompt_tokens_cached_total",
                "counter",
                "Prompt tokens taken from the prompt cache.",
                g(&self.cached_prompt_tokens),
            ),
            (
                "generated_tokens_total",
                "counter",
                "Tokens generated.",
                g(&self.generated_tokens),
            ),
            (
                "decode_steps_total",
                "counter",
                "Batched decode steps.",
                g(&self.decode_steps),
            ),
            (
                "queue_length",
                "gauge",
                "Requests waiting for a slot.",
                u(&self.queued),
            ),
            (
                "active_requests",
                "gauge",
                "Requests holding a slot.",
                u(&self.active),
            ),
            (
                "prompt_cache_bytes",
                "gauge",
                "Bytes held by cached prompts.",
                u(&self.cache_bytes),
            ),
            (
                "decode_tokens_per_second",
                "gauge",
                "Tokens per second of the last decode step, over every request in it.",
                format!("{rate:.3}"),
            ),
            (
                "time_to_first_token_seconds_sum",
                "counter",
                "Total time from queueing to first token.",
                format!("{ttft:.6}"),
            ),
            (
                "time_to_first_token_seconds_count",
                "counter",
                "Requests that got a first token.",
                g(&self.ttft_count),
            ),
        ];
        for (name, kind, help, v) in one {
            let _ = writeln!(
                s,
                "# HELP q3vl_{name} {help}\n# TYPE q3vl_{name} {kind}\nq3vl_{name} {v}"
            );
        }
        s
    }
}
