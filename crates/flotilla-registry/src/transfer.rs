//! Pull and push: moving images (and their signatures) between a registry and an
//! [`ImageStore`], verifying every byte against its digest and moving only missing blobs.
//!
//! Store I/O is synchronous (the store is `std::fs` based) and runs inline: a pull or push is
//! the only work of the task that calls it.

use crate::client::RegistryClient;
use crate::digest::{signature_tag, ImageRef};
use crate::error::{ErrorCode, IoContext, RegistryError, Result};
use crate::manifest::{Manifest, ManifestKind};
use crate::meta::Meta;
use crate::sign::{TrustCheck, TrustPolicy, SIGNATURE_ARTIFACT_TYPE};
use bytes::Bytes;
use flotilla_runtime::{ImageStore, RuntimeError};
use std::fs::File;

/// What a pull or push is doing, for progress display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The reference resolved to this manifest.
    Resolved { reference: String, digest: String },
    /// The other side already has this blob; nothing moves.
    BlobPresent { digest: String, size: u64 },
    /// A blob transfer starts.
    BlobStarted { digest: String, size: u64 },
    /// A blob arrived (verified) or was accepted by the registry.
    BlobDone { digest: String, size: u64 },
    /// A signature artifact for the image was copied.
    Signature { digest: String },
    /// The manifest is in place.
    Done { digest: String },
}

fn manifest_unknown(r: &ImageRef) -> RegistryError {
    RegistryError::dist(
        ErrorCode::ManifestUnknown,
        format!("image {r} is not in the registry (push it or check the name and tag)"),
    )
}

/// Pulls `name[:tag][@sha256:…]` into `store`: the manifest (verified against the digest
/// asked for), then the config and every layer the store lacks, each verified on write,
/// then the image's signatures. Records `name:tag` (or the bare digest) in the store index.
/// Returns the manifest digest.
pub async fn pull(
    client: &RegistryClient,
    store: &ImageStore,
    reference: &str,
    progress: impl FnMut(Progress),
) -> Result<String> {
    pull_trusted(client, store, reference, None, progress).await
}

/// [`pull`], refusing an image that `policy` does not trust before any of its blobs (config
/// or layers) is fetched: the manifest and its signatures come first, and only a verified
/// manifest digest brings the rest. An image refused here leaves its signatures in the store
/// and nothing else. `None` checks nothing (as [`pull`]).
pub async fn pull_trusted(
    client: &RegistryClient,
    store: &ImageStore,
    reference: &str,
    policy: Option<&TrustPolicy>,
    mut progress: impl FnMut(Progress),
) -> Result<String> {
    let r = ImageRef::parse(reference)?;
    let meta = Meta::open(store)?;
    let fetched = client
        .get_manifest(&r.name, r.remote_reference())
        .await?
        .ok_or_else(|| manifest_unknown(&r))?;
    let mut m = Manifest::parse(&fetched.bytes, fetched.content_type.as_deref())?;
    let (mut bytes, mut digest) = (fetched.bytes, fetched.digest);
    let mut index_digest = None;
    if m.kind() == ManifestKind::Index {
        let child = pick_platform(&m).ok_or_else(|| {
            RegistryError::dist(
                ErrorCode::ManifestInvalid,
                format!("image index {digest} lists no manifest"),
            )
        })?;
        let f = client
            .get_manifest(&r.name, &child)
            .await?
            .ok_or_else(|| manifest_unknown(&r))?;
        m = Manifest::parse(&f.bytes, f.content_type.as_deref())?;
        bytes = f.bytes;
        index_digest = Some(std::mem::replace(&mut digest, f.digest));
    }
    progress(Progress::Resolved {
        reference: r.to_string(),
        digest: digest.clone(),
    });
    tracing::info!(reference = %r, %digest, "pulling image");
    pull_signatures(client, store, &meta, &r.name, &digest, &mut progress).await?;
    if let Some(policy) = policy {
        // A signature on the index the reference named covers the manifest picked from it.
        let signed_index = match &index_digest {
            Some(top) => {
                pull_signatures(client, store, &meta, &r.name, top, &mut progress).await?;
                policy.verify(store, reference, top).is_ok()
            }
            None => false,
        };
        if !signed_index {
            policy.verify(store, reference, &digest)?;
        }
    }
    fetch_blobs(client, store, &meta, &r.name, &m, &mut progress).await?;
    store.put_blob(Some(&digest), &bytes[..])?;
    match m.kind() {
        ManifestKind::Image => meta.tag_image(store, r.tagged().as_deref(), &digest)?,
        _ => meta.record_artifact(store, &digest, &m, bytes.len() as u64, None)?,
    }
    progress(Progress::Done {
        digest: digest.clone(),
    });
    Ok(digest)
}

/// The linux/amd64 entry of an index, else the first.
pub(crate) fn pick_platform(m: &Manifest) -> Option<String> {
    let amd64 = m.children().find(|d| {
        d.platform.as_ref().is_some_and(|p| {
            p.get("os").and_then(|v| v.as_str()) == Some("linux")
                && p.get("architecture").and_then(|v| v.as_str()) == Some("amd64")
        })
    });
    amd64
        .or_else(|| m.children().next())
        .map(|d| d.digest.clone())
}

async fn fetch_blobs(
    client: &RegistryClient,
    store: &ImageStore,
    meta: &Meta,
    name: &str,
    m: &Manifest,
    progress: &mut impl FnMut(Progress),
) -> Result<()> {
    for b in m.blobs() {
        if store.has_blob(&b.digest) {
            progress(Progress::BlobPresent {
                digest: b.digest.clone(),
                size: b.size,
            });
            continue;
        }
        progress(Progress::BlobStarted {
            digest: b.digest.clone(),
            size: b.size,
        });
        let tmp = meta.tmp_path("pull");
        let res = async {
            let n = client.download_blob(name, &b.digest, &tmp).await?;
            if n != b.size {
                return Err(RegistryError::dist(
                    ErrorCode::SizeInvalid,
                    format!(
                        "blob {} has {n} bytes, the manifest says {}",
                        b.digest, b.size
                    ),
                ));
            }
            let f = File::open(&tmp).ctx(|| format!("open {}", tmp.display()))?;
            store.put_blob(Some(&b.digest), f)?;
            Ok(n)
        }
        .await;
        let _ = std::fs::remove_file(&tmp);
        let n = res?;
        tracing::debug!(digest = %b.digest, size = n, "blob pulled");
        progress(Progress::BlobDone {
            digest: b.digest.clone(),
            size: n,
        });
    }
    Ok(())
}

/// Copies the signature artifacts of the manifest `digest` of repository `name` from a
/// registry into `store` (e.g. from another manager when the one an image came from lacks
/// them). The manifest must already be in the store.
pub async fn fetch_signatures(
    client: &RegistryClient,
    store: &ImageStore,
    name: &str,
    digest: &str,
) -> Result<()> {
    let meta = Meta::open(store)?;
    pull_signatures(client, store, &meta, name, digest, &mut |_| {}).await
}

/// Copies the signature artifacts of `digest` (referrers API, else the `.sig` tag).
async fn pull_signatures(
    client: &RegistryClient,
    store: &ImageStore,
    meta: &Meta,
    name: &str,
    digest: &str,
    progress: &mut impl FnMut(Progress),
) -> Result<()> {
    let tag = signature_tag(digest);
    let mut found = Vec::new();
    if let Some(refs) = client
        .referrers(name, digest, Some(SIGNATURE_ARTIFACT_TYPE))
        .await?
    {
        for d in refs {
            if let Some(f) = client.get_manifest(name, &d.digest).await? {
                found.push((f, None));
            }
        }
    }
    if found.is_empty() {
        if let Some(f) = client.get_manifest(name, &tag).await? {
            found.push((f, Some(tag.as_str())));
        }
    }
    for (f, tagged) in found {
        let m = Manifest::parse(&f.bytes, f.content_type.as_deref())?;
        if m.subject.as_ref().map(|s| s.digest.as_str()) != Some(digest) {
            tracing::warn!(signature = %f.digest, %digest, "ignoring a signature artifact for another image");
            continue;
        }
        fetch_blobs(client, store, meta, name, &m, progress).await?;
        store.put_blob(Some(&f.digest), &f.bytes[..])?;
        meta.record_artifact(
            store,
            &f.digest,
            &m,
            f.bytes.len() as u64,
            tagged.map(|t| (name, t)),
        )?;
        progress(Progress::Signature {
            digest: f.digest.clone(),
        });
    }
    Ok(())
}

/// Pushes a local image `name[:tag][@sha256:…]` (looked up in `store` under the same name):
/// every blob the registry lacks (HEAD first; chunked above the client's chunk size), then the
/// manifest under the tag (or digest), then its signatures under `sha256-<hex>.sig`.
/// Returns the manifest digest.
pub async fn push(
    client: &RegistryClient,
    store: &ImageStore,
    reference: &str,
    mut progress: impl FnMut(Progress),
) -> Result<String> {
    let r = ImageRef::parse(reference)?;
    let meta = Meta::open(store)?;
    let digest = match (&r.digest, &r.tag) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => meta
            .resolve_tag(store, &r.name, t)?
            .ok_or_else(|| RuntimeError::ImageNotFound(r.to_string()))?,
        (None, None) => return Err(RegistryError::InvalidReference(reference.into())),
    };
    progress(Progress::Resolved {
        reference: r.to_string(),
        digest: digest.clone(),
    });
    tracing::info!(reference = %r, %digest, "pushing image");
    let target = r.tag.clone().unwrap_or_else(|| digest.clone());
    let src = StoreSource { store, meta: &meta };
    push_tree(client, &src, &r.name, &digest, &target, &mut progress).await?;
    for (sig, a) in meta.referrers(&digest)? {
        if a.artifact_type.as_deref() == Some(SIGNATURE_ARTIFACT_TYPE) {
            push_tree(
                client,
                &src,
                &r.name,
                &sig,
                &signature_tag(&digest),
                &mut progress,
            )
            .await?;
            progress(Progress::Signature { digest: sig });
        }
    }
    progress(Progress::Done {
        digest: digest.clone(),
    });
    Ok(digest)
}

/// Where a push reads manifests and blobs: the node's content store, or an OCI layout dir.
pub(crate) trait PushSource: Sync {
    /// The manifest (or index) bytes, verified against `digest`.
    fn manifest(&self, digest: &str) -> Result<Vec<u8>>;
    /// The file holding blob `digest`; an error that says what is incomplete when missing.
    fn blob_file(&self, digest: &str) -> Result<std::path::PathBuf>;
}

struct StoreSource<'a> {
    store: &'a ImageStore,
    meta: &'a Meta,
}

impl PushSource for StoreSource<'_> {
    fn manifest(&self, digest: &str) -> Result<Vec<u8>> {
        Ok(self
            .meta
            .read_blob(self.store, digest)?
            .ok_or_else(|| RuntimeError::ImageNotFound(format!("manifest {digest}")))?)
    }

    fn blob_file(&self, digest: &str) -> Result<std::path::PathBuf> {
        Ok(self.meta.blob_file(self.store, digest).ok_or_else(|| {
            RuntimeError::ImageNotFound(format!(
                "blob {digest} (the local image is incomplete; pull it again)"
            ))
        })?)
    }
}

/// Pushes the manifest `digest` from `src` as `name:target`: its children (an index's
/// images) first, then every blob the registry lacks, then the manifest itself.
pub(crate) async fn push_tree(
    client: &RegistryClient,
    src: &dyn PushSource,
    name: &str,
    digest: &str,
    target: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let bytes = src.manifest(digest)?;
    let m = Manifest::parse(&bytes, None)?;
    for child in m.children() {
        Box::pin(push_tree(
            client,
            src,
            name,
            &child.digest,
            &child.digest,
            progress,
        ))
        .await?;
    }
    for b in m.blobs() {
        if client.blob_size(name, &b.digest).await?.is_some() {
            progress(Progress::BlobPresent {
                digest: b.digest.clone(),
                size: b.size,
            });
            continue;
        }
        let path = src.blob_file(&b.digest)?;
        progress(Progress::BlobStarted {
            digest: b.digest.clone(),
            size: b.size,
        });
        client.upload_blob(name, &b.digest, &path).await?;
        progress(Progress::BlobDone {
            digest: b.digest.clone(),
            size: b.size,
        });
    }
    client
        .put_manifest(name, target, m.content_type(), Bytes::from(bytes))
        .await?;
    Ok(())
}
