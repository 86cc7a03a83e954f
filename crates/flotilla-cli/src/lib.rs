//! The `flotilla` command line: argument definitions (clap derive) for every mode, and the
//! client subcommands, which talk to a node's API over its unix socket or mTLS.
#![forbid(unsafe_code)]

mod args;
mod client;
mod image;
mod logs;
mod network;
mod output;
mod service;
mod storage;
mod trust;

pub use image::{find_signing_key, sign_image};

pub use args::*;
pub use client::run_client;

/// A CLI failure: the message says what was wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub message: String,
    /// Process exit code (1 for errors from the cluster, 2 for usage errors).
    pub code: i32,
}

impl CliError {
    pub fn new(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            code: 1,
        }
    }
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            code: 2,
        }
    }
}

impl From<flotilla_api::ClientError> for CliError {
    /// Server messages can quote what nodes reported: control characters are escaped.
    fn from(e: flotilla_api::ClientError) -> CliError {
        CliError::new(output::escape_lines(&e.to_string()))
    }
}
