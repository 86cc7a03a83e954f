//! The HTTP plumbing shared by the node daemon, the CLI and node-to-node calls:
//! - [`server`]: serve an axum `Router` on a unix socket (local, trusted: the socket is
//!   root-only) or on a TCP listener with TLS, attaching the caller's verified [`Peer`]
//!   identity to every request;
//! - [`client`]: a small client over the same two transports, with one pooled HTTP/2
//!   connection per remote endpoint, JSON helpers, and errors that keep the server's
//!   `{"message": ...}`;
//! - [`tls`]: the node's live certificates, swapped in place on renewal;
//! - [`caller`], [`error`], [`respond`], [`body`]: what every handler of the node's API
//!   shares — who calls, the `{"message"}` error, JSON and NDJSON responses, bounded bodies;
//! - [`policy`], [`authz`]: who may call which route (the typed table of every route a node
//!   serves), and the middleware that enforces it.
#![forbid(unsafe_code)]

pub mod authz;
pub mod body;
pub mod caller;
pub mod client;
pub mod error;
pub mod policy;
pub mod respond;
pub mod server;
pub mod tls;
pub mod upload;

pub use caller::{Caller, CALLER_HEADER};
pub use client::{Client, ClientError, Endpoint, Response};
pub use error::ApiError;
pub use respond::{json_ok, ndjson, stream_response, STALE_HEADER};
pub use server::{serve_tls, serve_unix, Peer};
pub use tls::{TlsError, TlsState};
