//! `GET /v2/<name>/tags/list` and `GET /v2/<name>/referrers/<digest>` (OCI 1.1).

use super::{blocking, respond, RegistryState, Req};
use crate::digest::check_digest;
use crate::error::{ErrorCode, RegistryError, Result};
use crate::manifest::{Descriptor, OCI_INDEX};
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;

pub(super) async fn list(st: &RegistryState, name: &str, req: &Req) -> Result<Response> {
    let (meta, store, n) = (st.meta.clone(), st.store.clone(), name.to_string());
    let mut tags = blocking(move || meta.tags(&store, &n)).await?;
    if tags.is_empty() {
        return Err(RegistryError::dist(
            ErrorCode::NameUnknown,
            format!("repository {name} is unknown (push an image to it first)"),
        ));
    }
    if let Some(last) = req.query.get("last") {
        tags.retain(|t| t > last);
    }
    let mut headers = vec![("content-type", "application/json".to_string())];
    if let Some(n) = req.query.get("n").and_then(|n| n.parse::<usize>().ok()) {
        if tags.len() > n {
            tags.truncate(n);
            if let Some(l) = tags.last() {
                headers.push((
                    "link",
                    format!("</v2/{name}/tags/list?n={n}&last={l}>; rel=\"next\""),
                ));
            }
        }
    }
    let body = serde_json::json!({ "name": name, "tags": tags });
    respond(StatusCode::OK, &headers, Body::from(body.to_string()))
}

pub(super) async fn referrers(
    st: &RegistryState,
    _name: &str,
    digest: &str,
    req: &Req,
) -> Result<Response> {
    check_digest(digest)?;
    let meta = st.meta.clone();
    let d = digest.to_string();
    let found = blocking(move || meta.referrers(&d)).await?;
    let filter = req.query.get("artifactType");
    let manifests: Vec<Descriptor> = found
        .into_iter()
        .filter(|(_, a)| filter.is_none() || a.artifact_type.as_ref() == filter)
        .map(|(d, a)| Descriptor {
            media_type: a.media_type,
            digest: d,
            size: a.size,
            artifact_type: a.artifact_type,
            annotations: a.annotations,
            platform: None,
        })
        .collect();
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    });
    let mut headers = vec![("content-type", OCI_INDEX.to_string())];
    if filter.is_some() {
        headers.push(("oci-filters-applied", "artifactType".to_string()));
    }
    respond(StatusCode::OK, &headers, Body::from(body.to_string()))
}
