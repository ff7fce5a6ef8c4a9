//! q3vl-server: `q3vl serve`, an OpenAI-compatible chat-completions server over the
//! engine.
//!
//! - HTTP (axum on tokio): `POST /v1/chat/completions` (streamed as server-sent
//!   events or not), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus).
//!   Requests are read and checked on the HTTP side ([`api`]): errors come back in
//!   OpenAI's JSON shape with their status ([`error`]), naming the field.
//! - Compute: one thread owns the engine and runs every admitted request together
//!   ([`batcher`]): continuous batching with one weight pass per decode step for all
//!   requests, prefill in chunks, conversations resumed from their cached prompt.
//! - Limits everywhere: the requests in the server at once (queue + parallel; 503
//!   beyond), the body size, the requests generating at once, the threads preparing
//!   requests, the images per conversation and their tokens, the context, the bytes
//!   of cached prompts and of encoded images. The KV cache grows with `--parallel ×
//!   --context` (printed at start).
//! - Message text is text: a user cannot forge a turn
//!   ([`q3vl_model::conversation`]).

pub mod answer;
pub mod api;
pub mod batcher;
pub mod body;
pub mod caches;
pub mod error;
pub mod metrics;
pub mod prepare;
pub mod queue;
pub mod respond;
pub mod routes;

pub use batcher::BatchOptions;
pub use error::{ApiError, ServerError};

use metrics::Metrics;
use q3vl_engine::Engine;
use queue::Queue;
use routes::App;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Threads preparing requests (image decoding, tokenising) at once.
const BLOCKING_THREADS: usize = 4;

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Address to listen on (`127.0.0.1:8080`; port 0 picks a free one).
    pub listen: String,
    /// The model id clients name (`/v1/models`).
    pub model: String,
    /// Largest request body, bytes.
    pub body_limit: usize,
    /// Requests waiting for a slot at most; more get 503.
    pub queue: usize,
    /// Tokens generated when a request gives no `max_tokens`.
    pub default_max_tokens: usize,
    /// Accept `file://` and absolute-path image URLs.
    pub allow_local_files: bool,
    /// Resize images with smart_resize instead of the bundle's fixed grid.
    pub dynamic_resolution: bool,
    /// The batch.
    pub batch: BatchOptions,
}

/// Serves `engine` until Ctrl-C or SIGTERM (a second one exits at once, code 130);
/// `on_listen` gets the bound address once the server accepts connections.
pub fn serve(
    engine: Engine,
    opts: ServerOptions,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let engine = Arc::new(engine);
    let metrics = Arc::new(Metrics::default());
    let queue = Arc::new(Queue::new(opts.queue, metrics.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let app = Arc::new(App::new(
        engine.clone(),
        queue.clone(),
        metrics.clone(),
        opts.clone(),
    )?);
    let batch = batcher::Batch::new(engine, queue, metrics, opts.batch.clone());
    let batch_stop = stop.clone();
    let batch_thread = std::thread::Builder::new()
        .name("q3vl-batch".into())
        .spawn(move || batch.run(&batch_stop))?;
    // Few blocking threads: they decode images and tokenise conversations, work that
    // gains nothing from more threads than cores, and each would keep its own heap
    // arena of freed buffers (the peak memory under load grows with their number).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()?;
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&opts.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: opts.listen.clone(),
                source,
            })?;
        on_listen(listener.local_addr()?);
        axum::serve(listener, routes::router(app))
            .with_graceful_shutdown(shutdown(stop.clone()))
            .await?;
        Ok(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = batch_thread.join();
    served
}

/// Resolves at Ctrl-C or SIGTERM, after telling the batch to stop (its requests end
/// with an error, so open streams close and the graceful shutdown can finish).
async fn shutdown(stop: Arc<AtomicBool>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // A second Ctrl-C does not wait for the graceful end.
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
}
