//! `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<tag|digest>`.

use super::{blocking, respond, RegistryState, Req};
use crate::digest::{check_digest, check_tag, is_digest_ref, sha256_digest};
use crate::error::{ErrorCode, RegistryError, Result};
use crate::manifest::{Manifest, ManifestKind, MAX_MANIFEST};
use axum::body::Body;
use axum::http::{Method, StatusCode};
use axum::response::Response;

fn unknown(name: &str, reference: &str) -> RegistryError {
    RegistryError::dist(
        ErrorCode::ManifestUnknown,
        format!("manifest {name}:{reference} is unknown (push it or check the tag)"),
    )
}

/// Reads a stored manifest by digest (fetching it from the peer when missing).
pub(super) async fn load(
    st: &RegistryState,
    digest: &str,
    allow_peer: bool,
) -> Result<Option<(Vec<u8>, Manifest)>> {
    if !st.ensure_blob(digest, allow_peer).await? {
        return Ok(None);
    }
    let (meta, store, d) = (st.meta.clone(), st.store.clone(), digest.to_string());
    let bytes = blocking(move || meta.read_blob(&store, &d)).await?;
    Ok(bytes.and_then(|b| {
        if b.len() > MAX_MANIFEST {
            return None;
        }
        Manifest::parse(&b, None).ok().map(|m| (b, m))
    }))
}

pub(super) async fn get(
    st: &RegistryState,
    name: &str,
    reference: &str,
    req: &Req,
) -> Result<Response> {
    let digest = if is_digest_ref(reference) {
        check_digest(reference)?;
        reference.to_string()
    } else {
        check_tag(reference)?;
        let (meta, store, n, r) = (
            st.meta.clone(),
            st.store.clone(),
            name.to_string(),
            reference.to_string(),
        );
        match blocking(move || meta.resolve_tag(&store, &n, &r)).await? {
            Some(d) => d,
            // Pushed to another manager: serve it through its digest (fetched and verified
            // by `load`), without recording the tag here.
            None => st
                .peer_tag(name, reference, req.allow_peer())
                .await
                .ok_or_else(|| unknown(name, reference))?,
        }
    };
    let (bytes, m) = load(st, &digest, req.allow_peer())
        .await?
        .ok_or_else(|| unknown(name, reference))?;
    let headers = [
        ("content-type", m.content_type().to_string()),
        ("content-length", bytes.len().to_string()),
        ("docker-content-digest", digest.clone()),
        ("etag", format!("\"{digest}\"")),
    ];
    let body = if req.method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    respond(StatusCode::OK, &headers, body)
}

pub(super) async fn put(
    st: &RegistryState,
    name: &str,
    reference: &str,
    req: Req,
    body: Body,
) -> Result<Response> {
    let by_digest = is_digest_ref(reference);
    if by_digest {
        check_digest(reference)?;
    } else {
        check_tag(reference)?;
    }
    let allow_peer = req.allow_peer();
    let ct = req.header("content-type").map(str::to_string);
    let bytes = axum::body::to_bytes(body, MAX_MANIFEST)
        .await
        .map_err(|e| {
            RegistryError::dist(
                ErrorCode::ManifestInvalid,
                format!("manifest unreadable or larger than {MAX_MANIFEST} bytes: {e}"),
            )
        })?;
    let m = Manifest::parse(&bytes, ct.as_deref())?;
    let digest = sha256_digest(&bytes);
    if by_digest && reference != digest {
        return Err(RegistryError::Distribution {
            code: ErrorCode::DigestInvalid,
            message: format!("manifest digest is {digest}, not {reference}"),
            detail: Some(serde_json::json!({ "expected": reference, "actual": digest })),
        });
    }
    for d in m.blobs() {
        if !st.ensure_blob(&d.digest, allow_peer).await? {
            return Err(RegistryError::Distribution {
                code: ErrorCode::ManifestBlobUnknown,
                message: format!("blob {} is unknown: push it before the manifest", d.digest),
                detail: Some(serde_json::json!({ "digest": d.digest })),
            });
        }
    }
    for d in m.children() {
        if load(st, &d.digest, allow_peer).await?.is_none() {
            return Err(RegistryError::Distribution {
                code: ErrorCode::ManifestBlobUnknown,
                message: format!("manifest {} is unknown: push it before the index", d.digest),
                detail: Some(serde_json::json!({ "digest": d.digest })),
            });
        }
    }
    let kind = m.kind();
    let subject = m.subject.as_ref().map(|s| s.digest.clone());
    let (meta, store, n, r, d) = (
        st.meta.clone(),
        st.store.clone(),
        name.to_string(),
        reference.to_string(),
        digest.clone(),
    );
    blocking(move || {
        let (stored, size) = store.put_blob(Some(&d), &bytes[..])?;
        debug_assert_eq!(stored, d);
        let tag = (!by_digest).then_some(r.as_str());
        match kind {
            ManifestKind::Image => {
                let reference = tag.map(|t| format!("{n}:{t}"));
                meta.tag_image(&store, reference.as_deref(), &d)
            }
            ManifestKind::Artifact | ManifestKind::Index => {
                meta.record_artifact(&store, &d, &m, size, tag.map(|t| (n.as_str(), t)))
            }
        }
    })
    .await?;
    tracing::info!(repo = name, %reference, %digest, ?kind, "manifest pushed");
    let mut headers = vec![
        ("location", format!("/v2/{name}/manifests/{digest}")),
        ("docker-content-digest", digest),
        ("content-length", "0".to_string()),
    ];
    if let Some(s) = subject {
        headers.push(("oci-subject", s));
    }
    respond(StatusCode::CREATED, &headers, Body::empty())
}

pub(super) async fn delete(st: &RegistryState, name: &str, reference: &str) -> Result<Response> {
    let by_digest = is_digest_ref(reference);
    if by_digest {
        check_digest(reference)?;
    } else {
        check_tag(reference)?;
    }
    let (meta, store, n, r) = (
        st.meta.clone(),
        st.store.clone(),
        name.to_string(),
        reference.to_string(),
    );
    let found = blocking(move || {
        if by_digest {
            meta.delete_manifest(&store, &r)
        } else {
            meta.delete_tag(&store, &n, &r)
        }
    })
    .await?;
    if !found {
        return Err(unknown(name, reference));
    }
    tracing::info!(repo = name, %reference, "manifest deleted");
    respond(
        StatusCode::ACCEPTED,
        &[("content-length", "0".into())],
        Body::empty(),
    )
}
