//! A small `/v2/` client over hyper (one HTTP/1.1 connection per request), plain HTTP or TLS
//! through a caller-provided `rustls::ClientConfig` (the node's mTLS identity).

use crate::digest::{check_digest, sha256_digest};
use crate::error::{ErrorBody, ErrorCode, IoContext, RegistryError, Result};
use crate::manifest::{Descriptor, ACCEPT, MAX_MANIFEST};
use crate::server::NO_PEER_HEADER;
use crate::source::{BlobSource, BlobStream};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use sha2::{Digest as _, Sha256};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Blobs larger than this are uploaded in chunks of this size.
pub const DEFAULT_CHUNK_SIZE: usize = 8 << 20;

/// A registry endpoint.
#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    host: String,
    port: u16,
    authority: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    chunk_size: usize,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .finish()
    }
}

/// A manifest as fetched, verified against its digest.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub content_type: Option<String>,
    /// sha256 of `bytes`.
    pub digest: String,
}

impl RegistryClient {
    /// A plain-HTTP client for `http://host:port` (tests, loopback).
    pub fn new(base_url: &str) -> Result<RegistryClient> {
        Self::build(base_url, None)
    }

    /// A TLS client for `https://host:port`; `config` carries the trust roots and, for
    /// mTLS, the node's client certificate.
    pub fn with_tls(base_url: &str, config: Arc<rustls::ClientConfig>) -> Result<RegistryClient> {
        Self::build(base_url, Some(config))
    }

    /// A client for the registry of the cluster node at `addr` (`host:port`), over mutual TLS
    /// with `config`, checking the server's certificate against `server_name`.
    pub fn for_node(
        addr: &str,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<RegistryClient> {
        Self::with_tls(&format!("https://{addr}"), config)?.with_server_name(server_name)
    }

    /// Verifies the server's certificate against `name` instead of the URL's host (Flotilla's
    /// node certificates all carry one DNS name, whatever their address).
    pub fn with_server_name(mut self, name: &str) -> Result<RegistryClient> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|_| RegistryError::InvalidUrl(name.to_string()))?;
        if let Some((_, n)) = self.tls.as_mut() {
            *n = name;
        }
        Ok(self)
    }

    fn build(base_url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<RegistryClient> {
        let bad = || RegistryError::InvalidUrl(base_url.to_string());
        let uri: Uri = base_url.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad()),
        };
        if https != tls.is_some() {
            return Err(RegistryError::InvalidUrl(format!(
                "{base_url} (use https:// with a TLS config and http:// without)"
            )));
        }
        if !matches!(uri.path(), "" | "/") {
            return Err(bad());
        }
        let host = uri
            .host()
            .ok_or_else(bad)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri.authority().ok_or_else(bad)?.to_string();
        let tls = match tls {
            Some(cfg) => {
                let name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
                Some((tokio_rustls::TlsConnector::from(cfg), name))
            }
            None => None,
        };
        Ok(RegistryClient {
            base: base_url.trim_end_matches('/').to_string(),
            host,
            port,
            authority,
            tls,
            chunk_size: DEFAULT_CHUNK_SIZE,
        })
    }

    /// Uploads blobs larger than `bytes` in chunks of `bytes`.
    pub fn with_chunk_size(mut self, bytes: usize) -> RegistryClient {
        self.chunk_size = bytes.max(1);
        self
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn http_err(&self, method: &Method, path: &str, e: impl std::fmt::Display) -> RegistryError {
        RegistryError::Http {
            method: method.to_string(),
            url: format!("{}{path}", self.base),
            message: e.to_string(),
        }
    }

    /// Sends one request on a fresh connection.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Response<Incoming>> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", &self.authority)
            .header("user-agent", "flotilla-registry")
            .header("content-length", body.len().to_string());
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(body))
            .map_err(|e| self.http_err(&method, path, e))?;
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| self.http_err(&method, path, "connect timed out"))?
        .map_err(|e| self.http_err(&method, path, e))?;
        let _ = tcp.set_nodelay(true);
        let res = match &self.tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| self.http_err(&method, path, format!("tls: {e}")))?;
                exchange(tls, req).await
            }
            None => exchange(tcp, req).await,
        };
        res.map_err(|e| self.http_err(&method, path, e))
    }

    /// Sends and reads the whole (bounded) answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes)> {
        let resp = self.send(method.clone(), path, headers, body).await?;
        let (parts, body) = resp.into_parts();
        let bytes = Limited::new(body, MAX_MANIFEST)
            .collect()
            .await
            .map_err(|e| self.http_err(&method, path, e))?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    fn status_err(
        &self,
        method: &Method,
        path: &str,
        status: StatusCode,
        body: &[u8],
    ) -> RegistryError {
        if let Ok(b) = serde_json::from_slice::<ErrorBody>(body) {
            if let Some(e) = b.errors.into_iter().next() {
                return RegistryError::Distribution {
                    code: ErrorCode::parse(&e.code),
                    message: e.message,
                    detail: e.detail,
                };
            }
        }
        RegistryError::UnexpectedStatus {
            method: method.to_string(),
            url: format!("{}{path}", self.base),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        }
    }

    /// Checks the endpoint speaks the distribution API.
    pub async fn ping(&self) -> Result<()> {
        let (s, _, b) = self.call(Method::GET, "/v2/", &[], Bytes::new()).await?;
        if s != StatusCode::OK {
            return Err(self.status_err(&Method::GET, "/v2/", s, &b));
        }
        Ok(())
    }

    /// The size of a blob in a repository, `None` when absent.
    pub async fn blob_size(&self, name: &str, digest: &str) -> Result<Option<u64>> {
        let path = format!("/v2/{name}/blobs/{digest}");
        let (s, h, b) = self.call(Method::HEAD, &path, &[], Bytes::new()).await?;
        match s {
            StatusCode::OK => Ok(Some(
                h.get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.status_err(&Method::HEAD, &path, s, &b)),
        }
    }

    /// Fetches a manifest by tag or digest, verified: against the digest asked for, and
    /// against `Docker-Content-Digest` when the registry sends it. `None` when unknown.
    pub async fn get_manifest(
        &self,
        name: &str,
        reference: &str,
    ) -> Result<Option<FetchedManifest>> {
        let path = format!("/v2/{name}/manifests/{reference}");
        let (s, h, b) = self
            .call(Method::GET, &path, &[("accept", ACCEPT)], Bytes::new())
            .await?;
        match s {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(self.status_err(&Method::GET, &path, s, &b)),
        }
        let digest = sha256_digest(&b);
        let announced = h
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        for want in [
            reference
                .starts_with("sha256:")
                .then(|| reference.to_string()),
            announced,
        ]
        .into_iter()
        .flatten()
        {
            if want != digest {
                return Err(RegistryError::Distribution {
                    code: ErrorCode::DigestInvalid,
                    message: format!(
                        "manifest {name}:{reference} has digest {digest}, expected {want} (the registry served corrupt content)"
                    ),
                    detail: None,
                });
            }
        }
        Ok(Some(FetchedManifest {
            bytes: b,
            content_type: h
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            digest,
        }))
    }

    /// Pushes a manifest under a tag or digest. Returns the digest the registry computed.
    pub async fn put_manifest(
        &self,
        name: &str,
        reference: &str,
        content_type: &str,
        bytes: Bytes,
    ) -> Result<String> {
        let path = format!("/v2/{name}/manifests/{reference}");
        let want = sha256_digest(&bytes);
        let (s, h, b) = self
            .call(Method::PUT, &path, &[("content-type", content_type)], bytes)
            .await?;
        if s != StatusCode::CREATED {
            return Err(self.status_err(&Method::PUT, &path, s, &b));
        }
        let got = h
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(&want)
            .to_string();
        if got != want {
            return Err(RegistryError::dist(
                ErrorCode::DigestInvalid,
                format!("registry stored the manifest as {got}, expected {want}"),
            ));
        }
        Ok(got)
    }

    /// Downloads a blob into `dest`, verifying its digest (the file is removed on mismatch).
    /// Returns its size.
    pub async fn download_blob(&self, name: &str, digest: &str, dest: &Path) -> Result<u64> {
        check_digest(digest)?;
        let path = format!("/v2/{name}/blobs/{digest}");
        let resp = self.send(Method::GET, &path, &[], Bytes::new()).await?;
        if resp.status() != StatusCode::OK {
            let s = resp.status();
            let b = Limited::new(resp.into_body(), 64 << 10)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(self.status_err(&Method::GET, &path, s, &b));
        }
        let mut f = tokio::fs::File::create(dest)
            .await
            .ctx(|| format!("create {}", dest.display()))?;
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.http_err(&Method::GET, &path, e))?;
            if let Ok(data) = frame.into_data() {
                hasher.update(&data);
                f.write_all(&data)
                    .await
                    .ctx(|| format!("write {}", dest.display()))?;
                n += data.len() as u64;
            }
        }
        f.flush()
            .await
            .ctx(|| format!("write {}", dest.display()))?;
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got != digest {
            let _ = tokio::fs::remove_file(dest).await;
            return Err(RegistryError::Distribution {
                code: ErrorCode::DigestInvalid,
                message: format!(
                    "blob {digest} arrived with digest {got} (the registry served corrupt content)"
                ),
                detail: None,
            });
        }
        Ok(n)
    }

    /// Starts a chunked upload. Returns its location.
    pub async fn start_upload(&self, name: &str) -> Result<String> {
        let path = format!("/v2/{name}/blobs/uploads/");
        let (s, h, b) = self.call(Method::POST, &path, &[], Bytes::new()).await?;
        if s != StatusCode::ACCEPTED {
            return Err(self.status_err(&Method::POST, &path, s, &b));
        }
        location_header(&h).ok_or_else(|| self.http_err(&Method::POST, &path, "no Location header"))
    }

    /// Sends one chunk at `offset`. Returns the next location.
    pub async fn upload_chunk(&self, location: &str, offset: u64, data: Bytes) -> Result<String> {
        let path = self.path_of(location);
        let range = format!("{offset}-{}", offset + (data.len() as u64).max(1) - 1);
        let (s, h, b) = self
            .call(
                Method::PATCH,
                &path,
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-range", &range),
                ],
                data,
            )
            .await?;
        if s != StatusCode::ACCEPTED {
            return Err(self.status_err(&Method::PATCH, &path, s, &b));
        }
        Ok(location_header(&h).unwrap_or(path))
    }

    /// Where an upload stands: `(location, bytes received)`, for resuming.
    pub async fn upload_status(&self, location: &str) -> Result<(String, u64)> {
        let path = self.path_of(location);
        let (s, h, b) = self.call(Method::GET, &path, &[], Bytes::new()).await?;
        if s != StatusCode::NO_CONTENT && s != StatusCode::OK {
            return Err(self.status_err(&Method::GET, &path, s, &b));
        }
        let end = h
            .get("range")
            .and_then(|v| v.to_str().ok())
            .and_then(|r| r.split_once('-'))
            .and_then(|(_, e)| e.parse::<u64>().ok());
        // "0-0" is both "nothing yet" and "one byte"; resuming from 0 is the safe reading.
        let received = match end {
            Some(0) | None => 0,
            Some(e) => e + 1,
        };
        Ok((location_header(&h).unwrap_or(path), received))
    }

    /// Completes an upload with an optional last chunk.
    pub async fn finish_upload(&self, location: &str, digest: &str, last: Bytes) -> Result<()> {
        let base = self.path_of(location);
        let sep = if base.contains('?') { '&' } else { '?' };
        let path = format!("{base}{sep}digest={digest}");
        let (s, _, b) = self
            .call(
                Method::PUT,
                &path,
                &[("content-type", "application/octet-stream")],
                last,
            )
            .await?;
        if s != StatusCode::CREATED {
            return Err(self.status_err(&Method::PUT, &path, s, &b));
        }
        Ok(())
    }

    /// Asks the registry to mount a blob from another repository. Returns whether it did.
    pub async fn mount_blob(&self, name: &str, digest: &str, from: &str) -> Result<bool> {
        let path = format!("/v2/{name}/blobs/uploads/?mount={digest}&from={from}");
        let (s, h, b) = self.call(Method::POST, &path, &[], Bytes::new()).await?;
        match s {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                // Not mountable: cancel the upload the registry started instead.
                if let Some(l) = location_header(&h) {
                    let _ = self
                        .call(Method::DELETE, &self.path_of(&l), &[], Bytes::new())
                        .await;
                }
                Ok(false)
            }
            _ => Err(self.status_err(&Method::POST, &path, s, &b)),
        }
    }

    /// Uploads a blob from a file: monolithic up to the chunk size, else chunked (resuming
    /// from the registry's offset when a chunk fails).
    pub async fn upload_blob(&self, name: &str, digest: &str, file: &Path) -> Result<()> {
        check_digest(digest)?;
        let mut f = tokio::fs::File::open(file)
            .await
            .ctx(|| format!("open {}", file.display()))?;
        let size = f
            .metadata()
            .await
            .ctx(|| format!("stat {}", file.display()))?
            .len();
        if size <= self.chunk_size as u64 {
            let mut data = Vec::with_capacity(size as usize);
            f.read_to_end(&mut data)
                .await
                .ctx(|| format!("read {}", file.display()))?;
            let path = format!("/v2/{name}/blobs/uploads/?digest={digest}");
            let (s, _, b) = self
                .call(
                    Method::POST,
                    &path,
                    &[("content-type", "application/octet-stream")],
                    Bytes::from(data),
                )
                .await?;
            if s != StatusCode::CREATED {
                return Err(self.status_err(&Method::POST, &path, s, &b));
            }
            return Ok(());
        }
        let mut loc = self.start_upload(name).await?;
        let mut offset = 0u64;
        let mut retries = 0;
        while offset < size {
            let len = (self.chunk_size as u64).min(size - offset) as usize;
            let mut buf = vec![0u8; len];
            f.seek(std::io::SeekFrom::Start(offset))
                .await
                .ctx(|| format!("seek {}", file.display()))?;
            f.read_exact(&mut buf)
                .await
                .ctx(|| format!("read {}", file.display()))?;
            match self.upload_chunk(&loc, offset, Bytes::from(buf)).await {
                Ok(next) => {
                    loc = next;
                    offset += len as u64;
                }
                Err(e) if retries < 3 => {
                    retries += 1;
                    tracing::warn!(%digest, offset, error = %e, "chunk failed; resuming");
                    let (l, received) = self.upload_status(&loc).await?;
                    loc = l;
                    offset = received;
                }
                Err(e) => return Err(e),
            }
        }
        self.finish_upload(&loc, digest, Bytes::new()).await
    }

    /// The OCI 1.1 referrers of a manifest; `None` when the registry lacks the API.
    pub async fn referrers(
        &self,
        name: &str,
        digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<Option<Vec<Descriptor>>> {
        let mut path = format!("/v2/{name}/referrers/{digest}");
        if let Some(t) = artifact_type {
            path.push_str(&format!("?artifactType={t}"));
        }
        let (s, _, b) = self.call(Method::GET, &path, &[], Bytes::new()).await?;
        match s {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => return Ok(None),
            _ => return Err(self.status_err(&Method::GET, &path, s, &b)),
        }
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<Descriptor>,
        }
        let idx: Index = serde_json::from_slice(&b)
            .map_err(|e| self.http_err(&Method::GET, &path, format!("bad referrers index: {e}")))?;
        Ok(Some(idx.manifests))
    }

    /// The tags of a repository (empty when unknown).
    pub async fn tags(&self, name: &str) -> Result<Vec<String>> {
        let path = format!("/v2/{name}/tags/list");
        let (s, _, b) = self.call(Method::GET, &path, &[], Bytes::new()).await?;
        match s {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(Vec::new()),
            _ => return Err(self.status_err(&Method::GET, &path, s, &b)),
        }
        #[derive(serde::Deserialize)]
        struct Tags {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let t: Tags = serde_json::from_slice(&b)
            .map_err(|e| self.http_err(&Method::GET, &path, format!("bad tag list: {e}")))?;
        Ok(t.tags.unwrap_or_default())
    }

    /// A Location (absolute URL or path) as a request path.
    fn path_of(&self, location: &str) -> String {
        match location.find("://") {
            Some(i) => {
                let rest = &location[i + 3..];
                rest.find('/')
                    .map(|j| rest[j..].to_string())
                    .unwrap_or_else(|| "/".into())
            }
            None => location.to_string(),
        }
    }
}

fn location_header(h: &hyper::HeaderMap) -> Option<String> {
    h.get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn exchange<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> std::result::Result<Response<Incoming>, hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "registry connection closed with an error");
        }
    });
    sender.send_request(req).await
}

/// A peer registry as a [`BlobSource`]: blobs are fetched through any repository name, and
/// the request asks the peer not to forward it to its own peers.
impl BlobSource for RegistryClient {
    fn fetch<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Result<Option<BlobStream>>> {
        Box::pin(async move {
            check_digest(digest)?;
            let path = format!("/v2/flotilla/peer/blobs/{digest}");
            let resp = self
                .send(Method::GET, &path, &[(NO_PEER_HEADER, "1")], Bytes::new())
                .await?;
            match resp.status() {
                StatusCode::OK => {
                    let s = http_body_util::BodyDataStream::new(resp.into_body())
                        .map_err(std::io::Error::other)
                        .boxed();
                    Ok(Some(s))
                }
                StatusCode::NOT_FOUND => Ok(None),
                s => Err(self.status_err(&Method::GET, &path, s, b"")),
            }
        })
    }

    fn resolve_tag<'a>(
        &'a self,
        name: &'a str,
        tag: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            let path = format!("/v2/{name}/manifests/{tag}");
            let (s, h, b) = self
                .call(
                    Method::HEAD,
                    &path,
                    &[("accept", ACCEPT), (NO_PEER_HEADER, "1")],
                    Bytes::new(),
                )
                .await?;
            match s {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Ok(None),
                _ => return Err(self.status_err(&Method::HEAD, &path, s, &b)),
            }
            let d = h
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or_else(|| self.http_err(&Method::HEAD, &path, "no Docker-Content-Digest"))?;
            check_digest(&d)?;
            Ok(Some(d))
        })
    }
}
