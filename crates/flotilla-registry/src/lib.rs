//! flotilla-registry: how images move between nodes, and whether a node may run them.
//!
//! - **Server** ([`router`], [`RegistryState`]): the OCI distribution API under `/v2/` over a
//!   node's [`ImageStore`]: blobs by digest, monolithic / chunked / resumable uploads,
//!   cross-repository mounts, manifests by tag or digest (OCI and docker schema2, every
//!   referenced blob checked), tag lists, OCI 1.1 referrers. Errors use the OCI JSON form.
//!   Blobs are the store's own content-addressed files, so what a manager serves is what the
//!   runtime unpacks. A missing blob or manifest is fetched from a peer ([`BlobSource`]),
//!   verified and stored before it is served.
//! - **Client** ([`RegistryClient`], [`pull`], [`push`]): hyper over plain TCP or rustls;
//!   every manifest and blob is verified against its digest, blobs the other side already
//!   has do not move, and an image's signatures travel with it.
//! - **Trust** ([`SigningKey`], [`TrustPolicy`], [`attach_signature`], [`signatures_for`]):
//!   ed25519 / P-256 signatures over a payload naming the manifest digest, stored as an OCI
//!   artifact tagged `sha256-<hex>.sig`; agents call [`TrustPolicy::verify`] before running.
//! - **GC** ([`collect_garbage`]): deletes blobs no tagged image, kept manifest or retained
//!   signature references.
//!
//! Runnable images are recorded in the store's `name:tag` index (one truth for the runtime,
//! the CLI and the registry). Signatures and other artifacts are recorded beside it under
//! `<store-root>/registry/` (see the `meta` module): artifact tags, the referrers index and
//! hard-link pins that keep artifact blobs safe from the store's own clean-up.

#![forbid(unsafe_code)]

mod client;
mod digest;
mod error;
mod gc;
mod layout;
mod manifest;
mod meta;
mod server;
mod sign;
mod source;
mod transfer;

pub use client::{FetchedManifest, RegistryClient, DEFAULT_CHUNK_SIZE};
pub use digest::{
    check_digest, check_name, digest_of, sha256_digest, signature_tag, task_images, ImageRef,
};
pub use error::{ErrorCode, RegistryError, Result};
pub use gc::{collect_garbage, collect_garbage_with, GcOptions, GcReport};
pub use layout::{layout_manifest, pull_layout, push_layout, REF_NAME};
pub use manifest::{
    Descriptor, Manifest, ManifestKind, DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST,
};
pub use server::{router, RegistryState};
pub use sign::{
    attach_signature, signatures_for, Algorithm, Signature, SigningKey, TrustCheck, TrustError,
    TrustPolicy, TrustedKey, TrustedKeyExt, SIGNATURE_ARTIFACT_TYPE, SIGNING_KEY_FILE,
    SIGNING_PUB_FILE,
};
pub use source::{BlobSource, BlobStream, FirstOf};
pub use transfer::{fetch_signatures, pull, pull_trusted, push, Progress};

#[doc(no_inline)]
pub use flotilla_runtime::ImageStore;
