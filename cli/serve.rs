//! `q3vl serve`: the OpenAI-compatible chat-completions server over a bundle pair.

use crate::Outcome;
use q3vl_server::{BatchOptions, ServerOptions};
use std::path::PathBuf;

/// Arguments of `q3vl serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// A conversion's output folder (or its language bundle folder).
    #[arg(long)]
    pub bundle: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The model id clients send (default: the language bundle's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Requests generating at once (continuous batching).
    #[arg(long, default_value_t = 4, value_parser = crate::common::count_up_to(64))]
    pub parallel: usize,
    /// Requests waiting for a slot at most; more get 503.
    #[arg(long, default_value_t = 64, value_parser = crate::common::count_up_to(100_000))]
    pub queue: usize,
    /// Largest conversation in tokens (prompt + answer).
    #[arg(long, default_value_t = 8192, value_parser = crate::common::count_up_to(1 << 20))]
    pub context: usize,
    /// Tokens generated when a request gives no max_tokens.
    #[arg(long, default_value_t = 1024, value_parser = crate::common::count_up_to(1 << 20))]
    pub default_max_tokens: usize,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = 20, value_parser = crate::common::count_up_to(4096))]
    pub body_limit_mib: usize,
    /// MiB of finished prompts kept for conversations' next turns.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub prompt_cache_mib: u64,
    /// Prompt tokens per prefill chunk (other requests decode between chunks).
    #[arg(long, default_value_t = 256, value_parser = crate::common::count_up_to(1 << 20))]
    pub prefill_chunk: usize,
    /// Worker threads (default: all cores; at most 4 per core).
    #[arg(long, value_parser = crate::common::threads())]
    pub threads: Option<usize>,
    /// Accept image URLs naming local files (file:// or an absolute path).
    #[arg(long)]
    pub allow_local_files: bool,
    /// Serve a bundle without a valid verification stamp.
    #[arg(long)]
    pub allow_unverified: bool,
    /// Resize images with smart_resize instead of the bundle's fixed grid.
    #[arg(long)]
    pub dynamic_resolution: bool,
}

/// Runs `q3vl serve` until Ctrl-C or SIGTERM.
pub fn run(a: ServeArgs) -> anyhow::Result<Outcome> {
    let (engine, stamp_line) = crate::run::open_engine(
        &a.bundle,
        a.threads,
        false,
        Some(a.context),
        (!a.allow_unverified)
            .then_some("q3vl serve serves verified bundles; --allow-unverified serves it anyway"),
    )?;
    let (engine, _claim) = engine.into_parts();
    let model = a
        .model_name
        .clone()
        .unwrap_or_else(|| engine.language().metadata().name.clone());
    eprintln!("{stamp_line}");
    let opts = ServerOptions {
        listen: listen_address(&a.host, a.port),
        model: model.clone(),
        body_limit: a.body_limit_mib << 20,
        queue: a.queue,
        default_max_tokens: a.default_max_tokens,
        allow_local_files: a.allow_local_files,
        dynamic_resolution: a.dynamic_resolution,
        batch: BatchOptions {
            parallel: a.parallel,
            prefill_chunk: a.prefill_chunk,
            prompt_cache_bytes: (a.prompt_cache_mib << 20) as usize,
            image_cache_bytes: 512 << 20,
        },
    };
    let (parallel, threads) = (a.parallel, engine.threads());
    let kv = engine.kv_bytes(a.context) as f64 * parallel as f64 / (1u64 << 30) as f64;
    eprintln!(
        "KV cache: up to {kv:.1} GiB ({parallel} requests × {} tokens)",
        a.context
    );
    return_freed_memory();
    q3vl_server::serve(engine, opts, |addr| {
        // The one line scripts wait for; stderr is unbuffered.
        eprintln!(
            "serving {model} on http://{addr} ({parallel} requests at once, {threads} threads)"
        );
    })?;
    Ok(Outcome::Success)
}

/// `host:port`, with an IPv6 host in brackets (`[::1]:8080`).
fn listen_address(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A long-lived server returns freed memory to the system: `open_engine` set the
/// allocator up for one run (buffers kept for reuse, no trimming); KV caches come
/// and go with requests here.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's trim threshold.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
    }
}
