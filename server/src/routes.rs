//! The HTTP side: the routes, and a chat request's way from body to answer: read
//! (bounded), checked ([`ChatRequest::parse`]), its images decoded and its
//! conversation tokenised off the async threads, queued for the batch, then its
//! tokens turned into one JSON answer or a stream of `chat.completion.chunk` events.

use crate::answer::Answer;
use crate::api::{ChatRequest, ImageRef, ImageSource};
use crate::error::{ApiError, ServerError};
use crate::metrics::Metrics;
use crate::queue::{Event, Job, PreparedImage, Queue};
use crate::ServerOptions;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use q3vl_engine::{Engine, Finish, GenerateParams};
use q3vl_model::prompt::PromptBuilder;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Images one conversation may hold (each costs a pass of the vision tower and its
/// tokens of context).
pub const MAX_IMAGES: usize = 8;

/// What every handler shares.
pub struct App {
    engine: Arc<Engine>,
    prompts: Arc<PromptBuilder>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    opts: ServerOptions,
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
        Ok(App {
            prompts: Arc::new(engine.prompt_builder()?),
            engine,
            queue,
            metrics,
            opts,
            created: unix_time(),
            next_id: AtomicU64::new(0),
        })
    }
}

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

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let ct = [(
        header::CONTENT_TYPE,
        "text/plain; version=0.0.4; charset=utf-8",
    )];
    (ct, app.metrics.render()).into_response()
}

fn model_card(app: &App) -> Value {
    json!({"id": app.opts.model, "object": "model", "created": app.created, "owned_by": "q3vl"})
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&app)]}))
}

async fn model(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id != app.opts.model {
        return Err(ApiError::unknown_model(&id, &app.opts.model));
    }
    Ok(Json(model_card(&app)))
}

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

/// A request made ready for the batch, and what its answer needs.
struct Prepared {
    job: Job,
    prompt_tokens: usize,
    stream: bool,
    include_usage: bool,
    stop: Vec<String>,
}

async fn chat_response(app: Arc<App>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, app.opts.body_limit).await?;
    let req = ChatRequest::parse(&bytes)?;
    drop(bytes);
    if req.model != app.opts.model {
        return Err(ApiError::unknown_model(&req.model, &app.opts.model));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let a = app.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&a, req, tx))
        .await
        .map_err(|_| ApiError::internal("internal error preparing the request"))??;
    let meta = Meta {
        id: format!("chatcmpl-{:016x}", app.next_id.fetch_add(1, Relaxed)),
        created: unix_time(),
        model: app.opts.model.clone(),
        prompt_tokens: prepared.prompt_tokens,
        include_usage: prepared.include_usage,
    };
    // With ignore_eos an eos is an ordinary token of the answer.
    let eos = if prepared.job.params.ignore_eos {
        vec![]
    } else {
        app.engine.eos_ids().to_vec()
    };
    let answer = Answer::new(app.prompts.clone(), prepared.stop, eos);
    let stream = prepared.stream;
    app.queue.submit(prepared.job)?;
    if stream {
        Ok(stream_answer(meta, answer, rx))
    } else {
        whole_answer(meta, answer, rx).await
    }
}

/// Bytes of an over-limit body read and dropped before the 413 is sent, so that a
/// client still sending its body reads the answer instead of a broken pipe; past
/// this the connection is closed.
const DRAIN_LIMIT: usize = 128 << 20;

/// The request body, at most `limit` bytes (413 beyond).
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::invalid("", format!("could not read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > limit {
            if seen > DRAIN_LIMIT {
                break;
            }
            bytes = Vec::new();
            continue;
        }
        bytes.extend_from_slice(&data);
    }
    if seen > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(bytes)
}

/// Decodes and preprocesses the images, tokenises the conversation, and sizes the
/// generation to the context (blocking work, run off the async threads).
fn prepare(
    app: &App,
    req: ChatRequest,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Prepared, ApiError> {
    let context = app.engine.context();
    // Every message costs at least its role marker: refused before any work.
    if req.messages.len() > context {
        return Err(ApiError::invalid_code(
            "messages",
            "context_length_exceeded",
            format!(
                "the conversation has {} messages; the context holds {context} tokens",
                req.messages.len()
            ),
        ));
    }
    if let Some(extra) = req.images.get(MAX_IMAGES) {
        return Err(ApiError::invalid(
            &extra.param,
            format!("a conversation may hold at most {MAX_IMAGES} images"),
        ));
    }
    let images = req
        .images
        .iter()
        .map(|img| prepare_image(app, img))
        .collect::<Result<Vec<_>, _>>()?;
    let grids: Vec<[usize; 3]> = images.iter().map(|i| i.patched.grid_thw).collect();
    let prompt = app
        .prompts
        .conversation_within(&req.messages, &grids, context)
        .map_err(|e| match e {
            q3vl_model::Error::PromptTooLong { .. } => ApiError::invalid_code(
                "messages",
                "context_length_exceeded",
                format!("the conversation is longer than the context of {context} tokens"),
            ),
            e => ApiError::invalid("messages", e.to_string()),
        })?;
    let n = prompt.ids.len();
    let room = context.saturating_sub(n);
    let max_new_tokens = match req.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::invalid_code(
                "max_tokens",
                "context_length_exceeded",
                format!("the conversation ({n} tokens) plus max_tokens {m} exceeds the context of {context} tokens"),
            ))
        }
        Some(m) => m,
        None if room == 0 => {
            return Err(ApiError::invalid_code(
                "messages",
                "context_length_exceeded",
                format!("the conversation ({n} tokens) fills the context of {context} tokens"),
            ))
        }
        None => app.opts.default_max_tokens.min(room),
    };
    Ok(Prepared {
        job: Job {
            ids: prompt.ids,
            images,
            params: GenerateParams {
                max_new_tokens,
                temperature: req.temperature,
                top_p: req.top_p,
                seed: req.seed,
                ignore_eos: req.ignore_eos,
                keep_logits: false,
            },
            events,
            queued_at: Instant::now(),
        },
        prompt_tokens: n,
        stream: req.stream,
        include_usage: req.include_usage,
        stop: req.stop,
    })
}

/// One image decoded, resized and patched; its key hashes the patch rows.
fn prepare_image(app: &App, img: &ImageRef) -> Result<PreparedImage, ApiError> {
    let bad = |msg: String| ApiError::invalid(&img.param, format!("{}: {msg}", img.param));
    let rgb = match &img.source {
        ImageSource::Data(bytes) => q3vl_model::image::decode_rgb(bytes, Path::new(&img.param)),
        ImageSource::File(path) if app.opts.allow_local_files => q3vl_model::image::load_rgb(path),
        ImageSource::File(_) => {
            return Err(bad(
                "local files are not read unless the server runs with --allow-local-files".into(),
            ))
        }
    }
    .map_err(|e| bad(e.to_string()))?;
    let patched = app
        .engine
        .preprocess(&rgb, app.opts.dynamic_resolution)
        .map_err(|e| bad(e.to_string()))?;
    let mut h = Sha256::new();
    for v in &patched.pixel_values {
        h.update(v.to_le_bytes());
    }
    for g in patched.grid_thw {
        h.update((g as u64).to_le_bytes());
    }
    Ok(PreparedImage {
        patched,
        key: h.finalize().into(),
    })
}

/// The answer's fixed fields.
struct Meta {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    include_usage: bool,
}

impl Meta {
    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }
}

/// OpenAI's finish reason.
fn finish_reason(finish: Finish, answer: &Answer) -> &'static str {
    match finish {
        _ if answer.stopped() => "stop",
        Finish::Eos => "stop",
        Finish::Length => "length",
    }
}

/// Waits for the whole answer and sends it as one `chat.completion`.
async fn whole_answer(
    meta: Meta,
    mut answer: Answer,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let finish = loop {
        match rx.recv().await {
            Some(Event::Token(id)) => {
                text.push_str(&answer.push(id));
                if answer.stopped() {
                    break Finish::Eos;
                }
            }
            Some(Event::Finished { finish, .. }) => break finish,
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("the batch dropped the request")),
        }
    };
    // Dropping the receiver frees the slot at once when a stop string ended it.
    drop(rx);
    text.push_str(&answer.finish());
    let body = json!({
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason(finish, &answer),
        }],
        "usage": meta.usage(answer.tokens()),
    });
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// Streams the answer as server-sent events: a role chunk, content chunks, a last
/// chunk with the finish reason, the usage chunk when asked, then `[DONE]`. A
/// client that goes away drops the stream, which drops the receiver, which frees
/// the request's slot at the batch's next turn.
fn stream_answer(meta: Meta, answer: Answer, rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let (tx, sse_rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(pump(meta, answer, rx, tx));
    let events = futures_util::stream::unfold(sse_rx, |mut r| async move {
        r.recv()
            .await
            .map(|e| (Ok::<_, std::convert::Infallible>(e), r))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Turns the batch's events into SSE events until the answer ends or the client
/// leaves.
async fn pump(
    meta: Meta,
    mut answer: Answer,
    mut rx: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::Sender<SseEvent>,
) {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let role = meta.chunk(json!({"role": "assistant", "content": ""}), None);
    if tx.send(data(role)).await.is_err() {
        return;
    }
    let finish = loop {
        match rx.recv().await {
            Some(Event::Token(id)) => {
                let piece = answer.push(id);
                if !piece.is_empty() {
                    let c = meta.chunk(json!({"content": piece}), None);
                    if tx.send(data(c)).await.is_err() {
                        return;
                    }
                }
                if answer.stopped() {
                    break Finish::Eos;
                }
            }
            Some(Event::Finished { finish, .. }) => break finish,
            Some(Event::Failed(e)) => {
                let _ = tx.send(data(e.body())).await;
                return;
            }
            None => return,
        }
    };
    drop(rx);
    let rest = answer.finish();
    let mut last = vec![];
    if !rest.is_empty() {
        last.push(meta.chunk(json!({"content": rest}), None));
    }
    last.push(meta.chunk(json!({}), Some(finish_reason(finish, &answer))));
    if meta.include_usage {
        last.push(json!({
            "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
            "model": meta.model, "choices": [], "usage": meta.usage(answer.tokens()),
        }));
    }
    for c in last {
        if tx.send(data(c)).await.is_err() {
            return;
        }
    }
    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
}
