//! The manager's errors, and the one place they become HTTP answers.
//!
//! Handlers, loops and [`crate::Manager`] return [`ManagerError`]. A store error keeps its
//! cause until `From<ManagerError> for ApiError` (used by [`IntoResponse`]) maps it: a lost
//! quorum is a 503 that says what to check, a forwarding race a 503 to retry, a bad argument a
//! 400. [`op_failure`] turns a batch's failed precondition into the 404 or 409 that names the
//! object.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use flotilla_api::ApiError;
use flotilla_store::{FailureKind, StoreError};

/// Why a manager operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The request is malformed or asks for something impossible (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such object (404).
    #[error("{0}")]
    NotFound(String),
    /// The object exists, was changed meanwhile, or is in use (409).
    #[error("{0}")]
    Conflict(String),
    /// The caller may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// No credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The caller sends too much too fast: retry later (429).
    #[error("{0}")]
    TooManyRequests(String),
    /// Part of the request is larger than allowed (413).
    #[error("{0}")]
    TooLarge(String),
    /// The cluster cannot answer now (no leader, no quorum, not replicated yet): retry (503).
    #[error("{0}")]
    Unavailable(String),
    /// The store failed; the cause decides the answer.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored object does not decode.
    #[error("corrupt {kind} {id}: {source}")]
    Corrupt {
        kind: &'static str,
        id: String,
        #[source]
        source: serde_json::Error,
    },
    /// Anything else that is this manager's fault (500).
    #[error("{0}")]
    Internal(String),
    /// An error of the shared HTTP plumbing (bounded bodies, proxying), already an answer.
    #[error("{0}")]
    Api(#[from] ApiError),
}

impl ManagerError {
    pub fn bad_request(m: impl Into<String>) -> Self {
        ManagerError::BadRequest(m.into())
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        ManagerError::NotFound(m.into())
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        ManagerError::Conflict(m.into())
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        ManagerError::Forbidden(m.into())
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        ManagerError::Unauthorized(m.into())
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        ManagerError::Unavailable(m.into())
    }
    pub fn internal(m: impl Into<String>) -> Self {
        ManagerError::Internal(m.into())
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> ApiError {
        let status = match &e {
            ManagerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ManagerError::NotFound(_) => StatusCode::NOT_FOUND,
            ManagerError::Conflict(_) => StatusCode::CONFLICT,
            ManagerError::Forbidden(_) => StatusCode::FORBIDDEN,
            ManagerError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ManagerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ManagerError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ManagerError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ManagerError::Corrupt { .. } | ManagerError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ManagerError::Api(a) => return a.clone(),
            ManagerError::Store(s) => return store_answer(s),
        };
        ApiError::new(status, e.to_string())
    }
}

fn store_answer(e: &StoreError) -> ApiError {
    match e {
        StoreError::ForwardToLeader { .. } | StoreError::MembershipInProgress => {
            ApiError::unavailable(format!("{e}; retry"))
        }
        StoreError::Timeout => ApiError::unavailable(
            "quorum lost: the write was not committed in time; check `flotilla cluster info`",
        ),
        StoreError::InvalidArgument(m) => ApiError::bad_request(m.clone()),
        other => ApiError::internal(other.to_string()),
    }
}

impl IntoResponse for ManagerError {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

/// Turns a failed precondition of a batch into 404 / 409.
pub fn op_failure(f: &flotilla_store::OpFailure, what: &str) -> ManagerError {
    match &f.kind {
        FailureKind::NotFound => ManagerError::not_found(format!("{what} {} not found", f.id)),
        FailureKind::AlreadyExists => {
            ManagerError::conflict(format!("{what} {} already exists", f.id))
        }
        FailureKind::VersionConflict { current, expected } => ManagerError::conflict(format!(
            "{what} {} was changed concurrently (version {current}, you sent {expected}); re-read it and retry",
            f.id
        )),
    }
}
