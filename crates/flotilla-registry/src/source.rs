//! Where a registry gets blobs it lacks: a peer (another manager) that has them.

use crate::error::Result;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// The bytes of a blob, as they arrive.
pub type BlobStream = BoxStream<'static, std::io::Result<Bytes>>;

/// A source of blobs (and manifests, which are blobs too) by digest.
///
/// The registry asks it when a requested blob or manifest is missing locally ("a manager that
/// lacks a blob fetches it from a peer that has it"), verifies what arrives against the digest,
/// stores it, then serves it. The node daemon implements it over its mTLS client (e.g. by
/// trying each peer manager's [`RegistryClient`](crate::RegistryClient), which implements it).
pub trait BlobSource: Send + Sync {
    /// The blob's content, `Ok(None)` when the source does not have it.
    fn fetch<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Result<Option<BlobStream>>>;

    /// The manifest digest `name:tag` points at on the source, `Ok(None)` when unknown there
    /// (default: tags are not resolved). Lets a registry serve a tag pushed to a peer (an
    /// image, or a `sha256-<hex>.sig` signature) without recording it locally, so a tag moved
    /// on the peer is never served stale.
    fn resolve_tag<'a>(
        &'a self,
        name: &'a str,
        tag: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>>> {
        let _ = (name, tag);
        Box::pin(async { Ok(None) })
    }
}

/// Tries several sources in order (e.g. one client per peer manager).
pub struct FirstOf(pub Vec<std::sync::Arc<dyn BlobSource>>);

impl BlobSource for FirstOf {
    fn fetch<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Result<Option<BlobStream>>> {
        Box::pin(async move {
            for s in &self.0 {
                match s.fetch(digest).await {
                    Ok(Some(b)) => return Ok(Some(b)),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(%digest, error = %e, "peer fetch failed; trying the next")
                    }
                }
            }
            Ok(None)
        })
    }

    fn resolve_tag<'a>(
        &'a self,
        name: &'a str,
        tag: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            for s in &self.0 {
                match s.resolve_tag(name, tag).await {
                    Ok(Some(d)) => return Ok(Some(d)),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(%name, %tag, error = %e, "peer tag lookup failed; trying the next")
                    }
                }
            }
            Ok(None)
        })
    }
}
