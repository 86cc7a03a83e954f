//! The HTTP plumbing shared by the node daemon, the CLI and node-to-node calls:
//! - [`server`]: serve an axum `Router` on a unix socket (local, trusted: the socket is
//!   root-only) or on a TCP listener with TLS, attaching the caller's verified [`Peer`]
//!   identity to every request;
//! - [`client`]: a small client over the same two transports, with one pooled HTTP/2
//!   connection per remote endpoint, JSON helpers, and errors that keep the server's
//!   `{"message": ...}`.
#![forbid(unsafe_code)]

pub mod client;
pub mod server;
pub mod upload;

pub use client::{Client, ClientError, Endpoint, Response};
pub use server::{serve_tls, serve_unix, Peer};
