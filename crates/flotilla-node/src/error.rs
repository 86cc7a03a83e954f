use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flotilla_store::{FailureKind, StoreError};
use flotilla_types::ErrorBody;

/// Errors of the node daemon outside request handling (start-up, joining, renewals).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Join(String),
    #[error("{0}")]
    Api(#[from] flotilla_api::ClientError),
}

/// An API error: an HTTP status plus `{"message": ...}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, m)
    }
    pub fn unavailable(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, m)
    }
    pub fn unauthorized(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "api error");
        }
        (
            self.status,
            Json(ErrorBody {
                message: self.message,
            }),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::ForwardToLeader { .. } | StoreError::MembershipInProgress => {
                ApiError::unavailable(format!("{e}; retry"))
            }
            StoreError::Timeout => ApiError::unavailable(
                "quorum lost: the write was not committed in time; check `flotilla cluster info`",
            ),
            StoreError::InvalidArgument(m) => ApiError::bad_request(m),
            other => ApiError::internal(other.to_string()),
        }
    }
}

/// Turns a failed precondition of a batch into 404 / 409.
pub fn op_failure(f: &flotilla_store::OpFailure, what: &str) -> ApiError {
    match &f.kind {
        FailureKind::NotFound => ApiError::not_found(format!("{what} {} not found", f.id)),
        FailureKind::AlreadyExists => {
            ApiError::conflict(format!("{what} {} already exists", f.id))
        }
        FailureKind::VersionConflict { current, expected } => ApiError::conflict(format!(
            "{what} {} was changed concurrently (version {current}, you sent {expected}); re-read it and retry",
            f.id
        )),
    }
}
