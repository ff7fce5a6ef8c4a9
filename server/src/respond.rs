//! A request's tokens turned into its answer: one `chat.completion`, or a stream of
//! `chat.completion.chunk` events.

use crate::answer::Answer;
use crate::error::ApiError;
use crate::queue::Event;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use q3vl_engine::Finish;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// The answer's fixed fields.
pub struct Meta {
    /// `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model id.
    pub model: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Whether the stream ends with a usage chunk.
    pub include_usage: bool,
}

impl Meta {
    /// The `usage` object for `completion` generated tokens.
    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    /// One `chat.completion.chunk` with `delta`.
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
pub async fn whole_answer(
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
/// client that goes away drops the event stream; the pump sees it at once (also while
/// the request waits or is prefilled) and drops the batch's receiver, which frees
/// the request's slot at the batch's next turn. `permit` (the request's admission)
/// is held until the stream ends.
pub fn stream_answer(
    meta: Meta,
    answer: Answer,
    rx: mpsc::UnboundedReceiver<Event>,
    permit: OwnedSemaphorePermit,
) -> Response {
    let (tx, sse_rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        pump(meta, answer, rx, tx).await;
        drop(permit);
    });
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
        let event = tokio::select! {
            e = rx.recv() => e,
            // The client left: stop waiting for tokens it will not read.
            _ = tx.closed() => return,
        };
        match event {
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
