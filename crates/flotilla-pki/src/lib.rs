//! Flotilla's public-key infrastructure: the cluster root CA, node and admin certificates with
//! SPIFFE-style identities, join tokens that pin the CA, and the rustls configurations every
//! node-to-node and client connection uses.
//!
//! Identity model (in the spirit of swarmkit's): a certificate's URI SAN is
//! `spiffe://<cluster-id>/node/<node-id>` (or `/admin/<id>` for operator bundles), its subject
//! O is the cluster id, its OU the role (`flotilla-manager`, `flotilla-worker`,
//! `flotilla-admin`) and its CN the node id. Every node certificate also carries the DNS SAN
//! [`SERVER_NAME`]; clients always connect with that server name and trust only the cluster CA,
//! so addresses can change without reissuing certificates.
#![forbid(unsafe_code)]

mod ca;
mod tls;
mod token;

pub use ca::{
    fingerprint_pem, needs_renewal, new_key_and_csr, parse_identity, parse_identity_pem, Ca,
    Identity, Role,
};
pub use tls::{client_config, client_config_for, pinning_probe_config, server_config};
pub use token::JoinToken;

/// The DNS name every node certificate carries and every client verifies.
pub const SERVER_NAME: &str = "flotilla-node";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("invalid PEM data for {what}: {detail}")]
    BadPem { what: &'static str, detail: String },
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    #[error("certificate carries no flotilla identity: {0}")]
    NoIdentity(String),
    #[error("malformed join token: {0}; a token looks like FLT1-<64 hex chars of the CA's sha256>-<secret>, as printed by `flotilla cluster join-token worker`")]
    MalformedToken(String),
    #[error("tls configuration failed: {0}")]
    Tls(String),
}
