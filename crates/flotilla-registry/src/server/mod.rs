//! The `/v2/` OCI distribution API: routing, shared state and I/O helpers. One file per
//! resource: [`blobs`], [`uploads`], [`manifests`], [`tags`] (tags list and referrers).

mod blobs;
mod manifests;
mod tags;
mod uploads;

use crate::digest::check_name;
use crate::error::{ErrorCode, IoContext, RegistryError, Result};
use crate::meta::Meta;
use crate::source::{BlobSource, BlobStream};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use flotilla_runtime::ImageStore;
use futures::StreamExt;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Header a peer fetch carries so the answering registry does not, in turn, ask its peers.
pub(crate) const NO_PEER_HEADER: &str = "flotilla-no-peer-fetch";

/// What the registry serves from.
#[derive(Clone)]
pub struct RegistryState {
    store: Arc<ImageStore>,
    meta: Meta,
    uploads: Arc<PathBuf>,
    peer: Option<Arc<dyn BlobSource>>,
}

impl RegistryState {
    /// A registry over `store`; in-progress uploads go to `<store-root>/registry/uploads`.
    pub fn new(store: Arc<ImageStore>) -> Result<RegistryState> {
        let meta = Meta::open(&store)?;
        meta.clean_tmp();
        let uploads = store.root().join("registry/uploads");
        std::fs::create_dir_all(&uploads).ctx(|| format!("create {}", uploads.display()))?;
        Ok(RegistryState {
            store,
            meta,
            uploads: Arc::new(uploads),
            peer: None,
        })
    }

    /// Keeps in-progress uploads in `dir` instead (best on the store's file system).
    pub fn with_uploads_dir(mut self, dir: impl Into<PathBuf>) -> Result<RegistryState> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
        self.uploads = Arc::new(dir);
        Ok(self)
    }

    /// Fetches missing blobs and manifests (by digest) from `peer`.
    pub fn with_peer(mut self, peer: Arc<dyn BlobSource>) -> RegistryState {
        self.peer = Some(peer);
        self
    }

    /// The store served.
    pub fn store(&self) -> &Arc<ImageStore> {
        &self.store
    }

    /// Deletes upload sessions untouched for `max_age` (abandoned pushes). Call it now and
    /// then (e.g. hourly with 24 h). Returns how many were removed.
    pub fn purge_stale_uploads(&self, max_age: std::time::Duration) -> Result<usize> {
        let now = std::time::SystemTime::now();
        let mut n = 0;
        let rd = std::fs::read_dir(self.uploads.as_path())
            .ctx(|| format!("list {}", self.uploads.display()))?;
        for e in rd.flatten() {
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() >= max_age)
                .unwrap_or(false);
            if stale && std::fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(removed = n, "stale uploads purged");
        }
        Ok(n)
    }

    /// Fetches a missing blob from the peer, verifies and stores it. Returns whether it is
    /// now present.
    async fn fetch_from_peer(&self, digest: &str, allowed: bool) -> Result<bool> {
        let Some(peer) = self.peer.as_ref().filter(|_| allowed) else {
            return Ok(false);
        };
        let Some(stream) = peer.fetch(digest).await? else {
            return Ok(false);
        };
        tracing::info!(%digest, "fetching missing blob from a peer");
        let tmp = self.meta.tmp_path("peer");
        let res = async {
            write_stream(stream, &tmp).await?;
            let store = self.store.clone();
            let (d, t) = (digest.to_string(), tmp.clone());
            blocking(move || {
                let f = std::fs::File::open(&t).ctx(|| format!("open {}", t.display()))?;
                store.put_blob(Some(&d), f)?;
                Ok(())
            })
            .await
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        res.map(|()| true)
    }

    /// Whether a blob is present, fetching it from the peer when missing.
    /// The digest a peer's `name:tag` points at (None without a peer, or when asked by a
    /// peer, or on failure).
    async fn peer_tag(&self, name: &str, tag: &str, allow_peer: bool) -> Option<String> {
        let peer = self.peer.as_ref().filter(|_| allow_peer)?;
        match peer.resolve_tag(name, tag).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(%name, %tag, error = %e, "peer tag lookup failed");
                None
            }
        }
    }

    async fn ensure_blob(&self, digest: &str, allow_peer: bool) -> Result<bool> {
        if self.meta.has_blob(&self.store, digest) {
            return Ok(true);
        }
        match self.fetch_from_peer(digest, allow_peer).await {
            Ok(b) => Ok(b),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "peer fetch failed");
                Ok(false)
            }
        }
    }
}

/// The `/v2/` router. Merge it at the root of the node's mTLS listener
/// (`app.merge(router(state))`): Location headers are absolute paths under `/v2/`.
pub fn router(state: RegistryState) -> Router {
    Router::new()
        .route("/v2", get(base))
        .route("/v2/", get(base))
        .route("/v2/{*rest}", any(dispatch))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn base() -> Response {
    (
        [("docker-distribution-api-version", "registry/2.0")],
        axum::Json(serde_json::json!({})),
    )
        .into_response()
}

/// A parsed `/v2/<rest>` path.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Tags(&'a str),
    Manifest(&'a str, &'a str),
    Referrers(&'a str, &'a str),
    UploadStart(&'a str),
    Upload(&'a str, &'a str),
    Blob(&'a str, &'a str),
}

impl<'a> Route<'a> {
    fn parse(rest: &'a str) -> Option<Route<'a>> {
        if let Some(n) = rest.strip_suffix("/tags/list") {
            return Some(Route::Tags(n));
        }
        if let Some((n, r)) = rest.rsplit_once("/manifests/") {
            return Some(Route::Manifest(n, r));
        }
        if let Some((n, d)) = rest.rsplit_once("/referrers/") {
            return Some(Route::Referrers(n, d));
        }
        if let Some(n) = rest
            .strip_suffix("/blobs/uploads/")
            .or_else(|| rest.strip_suffix("/blobs/uploads"))
        {
            return Some(Route::UploadStart(n));
        }
        if let Some((n, id)) = rest.rsplit_once("/blobs/uploads/") {
            return Some(Route::Upload(n, id));
        }
        if let Some((n, d)) = rest.rsplit_once("/blobs/") {
            return Some(Route::Blob(n, d));
        }
        None
    }

    fn name(&self) -> &'a str {
        match self {
            Route::Tags(n)
            | Route::Manifest(n, _)
            | Route::Referrers(n, _)
            | Route::UploadStart(n)
            | Route::Upload(n, _)
            | Route::Blob(n, _) => n,
        }
    }
}

/// One request, parsed.
pub(crate) struct Req {
    pub method: Method,
    pub headers: axum::http::HeaderMap,
    pub query: HashMap<String, String>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn allow_peer(&self) -> bool {
        !self.headers.contains_key(NO_PEER_HEADER)
    }
}

async fn dispatch(
    State(st): State<RegistryState>,
    Path(rest): Path<String>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let req = Req {
        method: parts.method,
        headers: parts.headers,
        query: parse_query(parts.uri.query().unwrap_or("")),
    };
    let method = req.method.clone();
    let res = match Route::parse(&rest) {
        None => Err(RegistryError::dist(
            ErrorCode::NameUnknown,
            format!("no such endpoint /v2/{rest}"),
        )),
        Some(route) => match check_name(route.name()) {
            Err(e) => Err(e),
            Ok(()) => handle(&st, route, req, body).await,
        },
    };
    match res {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%method, path = %rest, error = %e, "registry error");
            e.into_response()
        }
    }
}

async fn handle(st: &RegistryState, route: Route<'_>, req: Req, body: Body) -> Result<Response> {
    let m = req.method.clone();
    match route {
        Route::Blob(n, d) if m == Method::GET || m == Method::HEAD => {
            blobs::get(st, n, d, &req).await
        }
        Route::UploadStart(n) if m == Method::POST => uploads::start(st, n, req, body).await,
        Route::Upload(n, id) if m == Method::PATCH => uploads::patch(st, n, id, req, body).await,
        Route::Upload(n, id) if m == Method::PUT => uploads::finish(st, n, id, req, body).await,
        Route::Upload(n, id) if m == Method::GET => uploads::status(st, n, id).await,
        Route::Upload(_, id) if m == Method::DELETE => uploads::cancel(st, id).await,
        Route::Manifest(n, r) if m == Method::GET || m == Method::HEAD => {
            manifests::get(st, n, r, &req).await
        }
        Route::Manifest(n, r) if m == Method::PUT => manifests::put(st, n, r, req, body).await,
        Route::Manifest(n, r) if m == Method::DELETE => manifests::delete(st, n, r).await,
        Route::Tags(n) if m == Method::GET => tags::list(st, n, &req).await,
        Route::Referrers(n, d) if m == Method::GET => tags::referrers(st, n, d, &req).await,
        _ => Err(RegistryError::dist(
            ErrorCode::Unsupported,
            format!("method {m} is not supported here"),
        )),
    }
}

/// Runs blocking store I/O off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RegistryError::Invalid(format!("blocking task failed: {e}")))?
}

/// Streams a file as a response body.
pub(crate) fn file_body(file: tokio::fs::File) -> Body {
    let s = futures::stream::try_unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 64 * 1024];
        let n = f.read(&mut buf).await?;
        if n == 0 {
            Ok::<_, std::io::Error>(None)
        } else {
            buf.truncate(n);
            Ok(Some((Bytes::from(buf), f)))
        }
    });
    Body::from_stream(s)
}

/// Appends a request body to a file. Returns the bytes written.
pub(crate) async fn append_body(body: Body, path: &std::path::Path) -> Result<u64> {
    let stream = body
        .into_data_stream()
        .map(|r| r.map_err(std::io::Error::other))
        .boxed();
    append_stream(stream, path, true).await
}

async fn write_stream(stream: BlobStream, path: &std::path::Path) -> Result<u64> {
    append_stream(stream, path, false).await
}

async fn append_stream(mut s: BlobStream, path: &std::path::Path, append: bool) -> Result<u64> {
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(path)
        .await
        .ctx(|| format!("open {}", path.display()))?;
    let mut n = 0u64;
    while let Some(chunk) = s.next().await {
        let c = chunk.map_err(|e| {
            RegistryError::dist(
                ErrorCode::BlobUploadInvalid,
                format!("reading the body failed: {e}"),
            )
        })?;
        f.write_all(&c)
            .await
            .ctx(|| format!("write {}", path.display()))?;
        n += c.len() as u64;
    }
    f.flush()
        .await
        .ctx(|| format!("write {}", path.display()))?;
    Ok(n)
}

/// Decodes `a=b&c=d` (percent-encoded).
fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hexval = |c: u8| (c as char).to_digit(16);
                match (hexval(b[i + 1]), hexval(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response with headers and an optional body.
pub(crate) fn respond(
    status: StatusCode,
    headers: &[(&str, String)],
    body: Body,
) -> Result<Response> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    for (k, v) in headers {
        let v = HeaderValue::from_str(v)
            .map_err(|e| RegistryError::Invalid(format!("bad header value {v}: {e}")))?;
        r.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| RegistryError::Invalid(format!("bad header {k}: {e}")))?,
            v,
        );
    }
    Ok(r)
}

#[cfg(test)]
mod tests;
