//! The HTTP side: the routes, and a chat request's way from body to answer: admitted
//! (at most queue + parallel requests are read, prepared, waiting or generating at
//! once; more get 503), read under the body limit, checked and prepared off the async
//! threads ([`crate::prepare`]), queued for the batch, then answered whole or streamed
//! ([`crate::respond`]).

use crate::answer::Answer;
use crate::body::read_body;
use crate::error::{ApiError, ServerError};
use crate::metrics::Metrics;
use crate::prepare::prepare;
use crate::queue::Queue;
use crate::respond::{stream_answer, whole_answer, Meta};
use crate::ServerOptions;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use q3vl_engine::Engine;
use q3vl_model::prompt::PromptBuilder;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Semaphore};

/// What every handler shares.
pub struct App {
    pub(crate) engine: Arc<Engine>,
    pub(crate) prompts: Arc<PromptBuilder>,
    pub(crate) queue: Arc<Queue>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) opts: ServerOptions,
    /// One permit per request in the server (being read, prepared, waiting or
    /// generating): what bounds the memory requests hold before the queue.
    admission: Arc<Semaphore>,
    created: u64,
    next_id: AtomicU64,
}

impl App {
    /// The state over `engine`, its queue and metrics.
    pub fn new(
        engine: Arc<Engine>,
        queue: Arc<Queue>,
        metrics: Arc<Metrics>,
        opts: ServerOptions,
    ) -> Result<App, ServerError> {
        let permits = opts.queue + opts.batch.parallel;
        Ok(App {
            prompts: Arc::new(engine.prompt_builder()?),
            engine,
            queue,
            metrics,
            opts,
            admission: Arc::new(Semaphore::new(permits)),
            created: unix_time(),
            next_id: AtomicU64::new(0),
        })
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The routes; unknown paths and methods get OpenAI-shaped 404 and 405 errors.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()) })
        .method_not_allowed_fallback(|uri: Uri| async move { ApiError::bad_method(uri.path()) })
        .with_state(app)
}

/// `GET /health`: the server is up (it listens only once the engine is loaded).
async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /metrics`: the Prometheus text exposition.
async fn metrics(State(app): State<Arc<App>>) -> Response {
    let ct = [(
        header::CONTENT_TYPE,
        "text/plain; version=0.0.4; charset=utf-8",
    )];
    (ct, app.metrics.render()).into_response()
}

/// The one model's card.
fn model_card(app: &App) -> Value {
    json!({"id": app.opts.model, "object": "model", "created": app.created, "owned_by": "q3vl"})
}

/// `GET /v1/models`.
async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&app)]}))
}

/// `GET /v1/models/{id}`.
async fn model(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id != app.opts.model {
        return Err(ApiError::unknown_model(&id, &app.opts.model));
    }
    Ok(Json(model_card(&app)))
}

/// `POST /v1/chat/completions`, counted by its status.
async fn chat(State(app): State<Arc<App>>, body: Body) -> Response {
    match chat_response(app.clone(), body).await {
        Ok(r) => {
            app.metrics.count_status(200);
            r
        }
        Err(e) => {
            app.metrics.count_status(e.status.as_u16());
            e.into_response()
        }
    }
}

/// Admits, reads, prepares and queues a chat request; answers it.
async fn chat_response(app: Arc<App>, body: Body) -> Result<Response, ApiError> {
    let permit = app
        .admission
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::overloaded(app.opts.queue))?;
    let bytes = read_body(body, app.opts.body_limit).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let a = app.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&a, &bytes, tx))
        .await
        .map_err(|_| ApiError::internal("internal error preparing the request"))??;
    let req = &prepared.req;
    let meta = Meta {
        id: format!("chatcmpl-{:016x}", app.next_id.fetch_add(1, Relaxed)),
        created: unix_time(),
        model: app.opts.model.clone(),
        prompt_tokens: prepared.prompt_tokens,
        include_usage: req.include_usage,
    };
    // With ignore_eos an eos is an ordinary token of the answer.
    let eos = match req.ignore_eos {
        true => vec![],
        false => app.engine.eos_ids().to_vec(),
    };
    let answer = Answer::new(app.prompts.clone(), req.stop.clone(), eos);
    let stream = req.stream;
    app.queue.submit(prepared.job)?;
    if stream {
        Ok(stream_answer(meta, answer, rx, permit))
    } else {
        let r = whole_answer(meta, answer, rx).await;
        drop(permit);
        r
    }
}
