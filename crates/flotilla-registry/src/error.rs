//! Errors: OCI distribution error codes (wire form) and the crate's error type.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flotilla_runtime::RuntimeError;
use serde::{Deserialize, Serialize};

/// An error code of the OCI distribution spec, as sent in `{"errors":[{"code": …}]}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    RangeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// Anything else (including codes this crate does not know).
    Unknown,
}

impl ErrorCode {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }

    /// Parses a wire string (unknown codes map to [`ErrorCode::Unknown`]).
    pub fn parse(s: &str) -> ErrorCode {
        [
            ErrorCode::BlobUnknown,
            ErrorCode::BlobUploadInvalid,
            ErrorCode::BlobUploadUnknown,
            ErrorCode::DigestInvalid,
            ErrorCode::ManifestBlobUnknown,
            ErrorCode::ManifestInvalid,
            ErrorCode::ManifestUnknown,
            ErrorCode::NameInvalid,
            ErrorCode::NameUnknown,
            ErrorCode::SizeInvalid,
            ErrorCode::RangeInvalid,
            ErrorCode::Unauthorized,
            ErrorCode::Denied,
            ErrorCode::Unsupported,
            ErrorCode::TooManyRequests,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
        .unwrap_or(ErrorCode::Unknown)
    }

    /// The HTTP status a server answers with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => StatusCode::NOT_FOUND,
            ErrorCode::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything this crate fails with. Messages are lower-case and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A distribution-protocol error, raised locally or answered by a remote registry.
    #[error("{code}: {message}")]
    Distribution {
        code: ErrorCode,
        message: String,
        detail: Option<serde_json::Value>,
    },
    #[error("invalid reference {0}: use name[:tag][@sha256:<64 lower-case hex>]")]
    InvalidReference(String),
    #[error("image store: {0}")]
    Store(#[from] RuntimeError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("registry request {method} {url} failed: {message} (check the registry address and that it is reachable)")]
    Http {
        method: String,
        url: String,
        message: String,
    },
    #[error("registry answered {status} to {method} {url}: {body}")]
    UnexpectedStatus {
        method: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("invalid registry url {0}: use http://host:port or https://host:port")]
    InvalidUrl(String),
    #[error("signing key: {0}")]
    Key(String),
    /// The trust policy refused the image (see [`crate::TrustPolicy`]).
    #[error(transparent)]
    NotTrusted(#[from] crate::sign::TrustError),
    #[error("{0}")]
    Invalid(String),
}

impl RegistryError {
    /// Shorthand for a distribution error.
    pub fn dist(code: ErrorCode, message: impl Into<String>) -> RegistryError {
        RegistryError::Distribution {
            code,
            message: message.into(),
            detail: None,
        }
    }

    /// The distribution error code, when this is (or maps to) one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            RegistryError::Distribution { code, .. } => Some(*code),
            RegistryError::Store(RuntimeError::DigestMismatch { .. }) => {
                Some(ErrorCode::DigestInvalid)
            }
            _ => None,
        }
    }
}

/// Adds a context string to I/O errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| RegistryError::Io {
            context: context(),
            source,
        })
    }
}

/// Shorthand result.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// The OCI error body.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub errors: Vec<ErrorEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorEntry {
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let code = self.code().unwrap_or(ErrorCode::Unknown);
        let status = match &self {
            RegistryError::Store(RuntimeError::ImageNotFound(_)) => StatusCode::NOT_FOUND,
            _ => code.status(),
        };
        if status.is_server_error() {
            tracing::warn!(error = %self, "registry request failed");
        } else {
            tracing::debug!(error = %self, "registry request refused");
        }
        let (message, detail) = match self {
            RegistryError::Distribution {
                message, detail, ..
            } => (message, detail),
            other => (other.to_string(), None),
        };
        let body = ErrorBody {
            errors: vec![ErrorEntry {
                code: code.as_str().to_string(),
                message,
                detail,
            }],
        };
        (status, axum::Json(body)).into_response()
    }
}
