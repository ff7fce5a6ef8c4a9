//! A request body read under its limit.

use crate::error::ApiError;
use axum::body::Body;

/// Bytes of an over-limit body read and dropped before the 413 is sent, so that a
/// client still sending its body reads the answer instead of a broken pipe; past
/// this the connection is closed.
const DRAIN_LIMIT: usize = 128 << 20;

/// The request body, at most `limit` bytes (413 beyond).
pub async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
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
