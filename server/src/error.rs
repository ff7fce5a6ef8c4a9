//! Errors: [`ApiError`], what a request gets back in OpenAI's JSON shape with its HTTP
//! status, and [`ServerError`], why the server could not start.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A request's failure, sent as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// OpenAI's error type (`invalid_request_error`, `server_error`, ...).
    pub kind: &'static str,
    /// A machine-readable code, where one applies.
    pub code: Option<&'static str>,
    /// The request field at fault (`messages[1].content[0].image_url`), if any.
    pub param: Option<String>,
    /// One line saying what is wrong.
    pub message: String,
}

impl ApiError {
    /// 400: the request is malformed or asks for something invalid; `param` names the
    /// field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        let param = param.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param: (!param.is_empty()).then_some(param),
            message: message.into(),
        }
    }

    /// 400 with a code (`context_length_exceeded`, ...).
    pub fn invalid_code(param: &str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some(code),
            ..ApiError::invalid(param, message)
        }
    }

    /// 404: the model asked for is not the one served.
    pub fn unknown_model(asked: &str, served: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::invalid(
                "model",
                format!("the model `{asked}` does not exist; this server serves `{served}`"),
            )
        }
    }

    /// 413: the body is over the limit.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: Some("request_too_large"),
            ..ApiError::invalid(
                "",
                format!("the request body is over the {limit}-byte limit"),
            )
        }
    }

    /// 503: the queue is full; try again later.
    pub fn overloaded(queue: usize) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: Some("server_overloaded"),
            param: None,
            message: format!("the server is busy: {queue} requests are already waiting"),
        }
    }

    /// 503: the server is stopping.
    pub fn shutting_down() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: Some("shutting_down"),
            param: None,
            message: "the server is shutting down".into(),
        }
    }

    /// 500: a fault in the server, not the request.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            code: None,
            param: None,
            message: message.into(),
        }
    }

    /// 404 for a path the server does not have.
    pub fn no_route(path: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            ..ApiError::invalid("", format!("no such endpoint: {path}"))
        }
    }

    /// 405 for a method the path does not take.
    pub fn bad_method(path: &str) -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            ..ApiError::invalid("", format!("{path} does not take this method"))
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// host:port asked for.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The engine or its tokenizer failed at start-up.
    #[error(transparent)]
    Engine(#[from] q3vl_engine::EngineError),
    /// Serving failed.
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
}
