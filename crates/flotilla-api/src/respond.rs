//! Response helpers shared by every handler: JSON bodies, newline-delimited JSON streams, and
//! the middleware that turns any non-JSON error response into `{"message": ...}`.

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Set on a read answered from a manager's local state without a quorum.
pub const STALE_HEADER: &str = "x-flotilla-stale";

/// Every API error is `{"message": ...}`: rejections from extractors (bad JSON, bad query,
/// body too large, wrong method) come out of axum as plain text and are wrapped here; a body
/// that does not parse is a 400, like any other bad input.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if is_json {
        return resp;
    }
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    let text = match axum::body::to_bytes(resp.into_body(), 64 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase()
    } else {
        text
    };
    ApiError::new(status, message).into_response()
}

/// `?version=N` for optimistic concurrency.
#[derive(Debug, Default, serde::Deserialize)]
pub struct VersionQuery {
    pub version: Option<u64>,
}

pub fn json_ok<T: serde::Serialize>(v: &T) -> Response {
    axum::Json(v).into_response()
}

/// One newline-terminated JSON document.
pub fn ndjson<T: serde::Serialize>(v: &T) -> bytes::Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    b.into()
}

/// A streaming `application/x-ndjson` response fed by `rx` (ends when the sender is dropped).
pub fn stream_response(
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> Result<Response, ApiError> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|item| (Ok::<_, std::io::Error>(item), rx))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}
