//! A small HTTP client over the node's two transports (the local unix socket, mutual TLS to a
//! node): one pooled HTTP/2 connection per endpoint, JSON and NDJSON helpers, and errors that
//! keep the server's `{"message": ...}`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, BodyStream};

use crate::upload::{Progress, ReqBody};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use flotilla_types::ErrorBody;

/// Where a client talks to.
#[derive(Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port` with the TLS client configuration to use (CA + optional client cert).
    Https {
        addr: String,
        tls: Arc<rustls::ClientConfig>,
    },
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Https { addr, .. } => write!(f, "https://{addr}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {endpoint}: {detail}")]
    Connect { endpoint: String, detail: String },
    #[error("request to {endpoint} failed: {detail}")]
    Transport { endpoint: String, detail: String },
    #[error("request to {endpoint} timed out after {after:?}")]
    Timeout { endpoint: String, after: Duration },
    /// The server answered with an error status and `{"message": ...}`.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("unexpected response from {endpoint}: {detail}")]
    Decode { endpoint: String, detail: String },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
    /// True when the peer could not be reached at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::Timeout { .. }
                | ClientError::Transport { .. }
        )
    }
}

/// A complete response.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// A small HTTP client. Cheap to clone; clones share the pooled HTTP/2 connection.
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    h2: Arc<Mutex<Option<hyper::client::conn::http2::SendRequest<ReqBody>>>>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({:?})", self.endpoint)
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest line [`Client::stream_lines`] accepts (64 MiB).
pub const MAX_STREAM_LINE: usize = 64 << 20;

/// How much of an error response's body is read for its message (64 KiB).
pub const MAX_ERROR_BODY: usize = 64 * 1024;

impl Client {
    pub fn new(endpoint: Endpoint) -> Client {
        Client {
            endpoint,
            h2: Arc::new(Mutex::new(None)),
            timeout: Duration::from_secs(30),
        }
    }

    /// Deadline for whole non-streaming requests (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn ep(&self) -> String {
        format!("{:?}", self.endpoint)
    }

    fn connect_err(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Connect {
            endpoint: self.ep(),
            detail: e.to_string(),
        }
    }

    async fn sender(&self) -> Result<Sender, ClientError> {
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
                    .await
                    .map_err(|_| self.connect_err("connect timed out"))?
                    .map_err(|e| self.connect_err(e))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| self.connect_err(e))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(Sender::H1(sender))
            }
            Endpoint::Https { addr, tls } => {
                let mut guard = self.h2.lock().await;
                if let Some(s) = guard.as_ref() {
                    if !s.is_closed() {
                        return Ok(Sender::H2(s.clone()));
                    }
                }
                let connect = async {
                    let tcp = TcpStream::connect(addr.as_str())
                        .await
                        .map_err(|e| self.connect_err(e))?;
                    let _ = tcp.set_nodelay(true);
                    let name = rustls_pki_types::ServerName::try_from(flotilla_pki::SERVER_NAME)
                        .map_err(|e| self.connect_err(e))?;
                    let stream = TlsConnector::from(tls.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| self.connect_err(format!("tls: {e}")))?;
                    let (sender, conn) =
                        hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                            .timer(hyper_util::rt::TokioTimer::new())
                            .keep_alive_interval(Duration::from_secs(5))
                            .keep_alive_timeout(Duration::from_secs(5))
                            .handshake(TokioIo::new(stream))
                            .await
                            .map_err(|e| self.connect_err(e))?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    Ok::<_, ClientError>(sender)
                };
                let sender = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                    .await
                    .map_err(|_| self.connect_err("connect timed out"))??;
                *guard = Some(sender.clone());
                Ok(Sender::H2(sender))
            }
        }
    }

    /// Sends a streamed body (e.g. a file, or a request being forwarded) and returns the
    /// response head with its body still streaming. No deadline: the caller bounds it.
    pub async fn send_stream(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: crate::upload::StreamBody,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        self.send_body(
            method,
            path,
            Some(content_type),
            &[],
            ReqBody::streaming(body),
        )
        .await
    }

    /// A streamed response's whole body, with error statuses as [`ClientError::Api`].
    pub async fn finish(&self, resp: hyper::Response<Incoming>) -> Result<Response, ClientError> {
        Self::check(self.collect(resp).await?)
    }

    /// A streamed response's whole body, any status.
    async fn collect(&self, resp: hyper::Response<Incoming>) -> Result<Response, ClientError> {
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| ClientError::Transport {
                endpoint: self.ep(),
                detail: e.to_string(),
            })?
            .to_bytes();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// Sends a request and returns the response head with its body still streaming.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        self.send_raw(method, path, body, &[], None).await
    }

    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, String)],
        progress: Option<Progress>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let content_type = body.is_some().then_some("application/json");
        let body = ReqBody::new(Bytes::from(body.unwrap_or_default()), progress);
        self.send_body(method, path, content_type, headers, body)
            .await
    }

    /// One request on the pooled connection (or a new unix one).
    async fn send_body(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        headers: &[(&str, String)],
        body: ReqBody,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let uri = match &self.endpoint {
            Endpoint::Unix(_) => format!("http://localhost{path}"),
            Endpoint::Https { .. } => format!("https://{}{path}", flotilla_pki::SERVER_NAME),
        };
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            builder = builder.header(hyper::header::CONTENT_TYPE, ct);
        }
        if matches!(self.endpoint, Endpoint::Unix(_)) {
            builder = builder.header(hyper::header::HOST, "localhost");
        }
        for (k, v) in headers {
            builder = builder.header(*k, v.as_str());
        }
        let req = builder.body(body).map_err(|e| ClientError::Transport {
            endpoint: self.ep(),
            detail: e.to_string(),
        })?;
        let res = match self.sender().await? {
            Sender::H1(mut s) => s.send_request(req).await,
            Sender::H2(mut s) => s.send_request(req).await,
        };
        res.map_err(|e| ClientError::Transport {
            endpoint: self.ep(),
            detail: e.to_string(),
        })
    }

    /// A whole request with extra headers and the client's deadline; any status is returned
    /// as is (for proxies).
    pub async fn send_with_headers(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, String)],
    ) -> Result<Response, ClientError> {
        self.send_collect(method, path, body, headers, None).await
    }

    /// Like [`Client::request`], calling `progress` with the bytes of the body as they go out.
    pub async fn request_with_progress(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        progress: Progress,
    ) -> Result<Response, ClientError> {
        let resp = self
            .send_collect(method, path, Some(body), &[], Some(progress))
            .await?;
        Self::check(resp)
    }

    async fn send_collect(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, String)],
        progress: Option<Progress>,
    ) -> Result<Response, ClientError> {
        let fut = async {
            let resp = self.send_raw(method, path, body, headers, progress).await?;
            self.collect(resp).await
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout {
                endpoint: self.ep(),
                after: self.timeout,
            })?
    }

    /// A whole request with the client's deadline; error statuses become [`ClientError::Api`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let resp = self.send_with_headers(method, path, body, &[]).await?;
        Self::check(resp)
    }

    /// Error statuses become [`ClientError::Api`] with the body's message.
    fn check(resp: Response) -> Result<Response, ClientError> {
        if !resp.status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&resp.body)
                .map(|e| e.message)
                .unwrap_or_else(|_| {
                    format!(
                        "{} {}",
                        resp.status,
                        String::from_utf8_lossy(&resp.body).trim()
                    )
                });
            return Err(ClientError::Api {
                status: resp.status.as_u16(),
                message,
            });
        }
        Ok(resp)
    }

    fn decode<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|e| ClientError::Decode {
            endpoint: self.ep(),
            detail: e.to_string(),
        })
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.request(Method::GET, path, None).await?;
        self.decode(&resp.body)
    }

    pub async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode {
            endpoint: self.ep(),
            detail: e.to_string(),
        })?;
        let resp = self.request(method, path, Some(bytes)).await?;
        if resp.body.is_empty() {
            return self.decode(b"null");
        }
        self.decode(&resp.body)
    }

    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send_json(Method::POST, path, body).await
    }

    /// A streaming GET whose body is newline-delimited JSON; calls `on_line` for each line
    /// until the stream ends or `on_line` returns false. Lines may be up to
    /// [`MAX_STREAM_LINE`] long (an agent's whole assignment set is one line); see
    /// [`Client::stream_lines_max`].
    pub async fn stream_lines<F>(&self, path: &str, on_line: F) -> Result<(), ClientError>
    where
        F: FnMut(&[u8]) -> bool,
    {
        self.stream_lines_max(path, MAX_STREAM_LINE, on_line).await
    }

    /// [`Client::stream_lines`] for peers that may misbehave: a line longer than `max_line`
    /// bytes (newline excluded) is not delivered in pieces, it ends the stream with
    /// [`ClientError::Decode`] ("a line of the stream is longer than …"), so the client never
    /// holds more than about `max_line` bytes of a line. An error status reads at most
    /// [`MAX_ERROR_BODY`] of the body for its message. Each byte is scanned for a newline
    /// once.
    pub async fn stream_lines_max<F>(
        &self,
        path: &str,
        max_line: usize,
        mut on_line: F,
    ) -> Result<(), ClientError>
    where
        F: FnMut(&[u8]) -> bool,
    {
        let resp = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        if !status.is_success() {
            let limited = http_body_util::Limited::new(resp.into_body(), MAX_ERROR_BODY);
            let body = tokio::time::timeout(self.timeout, limited.collect())
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.message)
                .unwrap_or_else(|_| status.to_string());
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        let too_long = || ClientError::Decode {
            endpoint: self.ep(),
            detail: format!("a line of the stream is longer than {max_line} bytes"),
        };
        let mut stream = BodyStream::new(resp.into_body());
        // `buf` holds the start of a line whose newline has not arrived; it was scanned.
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = stream.next().await {
            let frame = frame.map_err(|e| ClientError::Transport {
                endpoint: self.ep(),
                detail: e.to_string(),
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let mut rest: &[u8] = &data;
            while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
                let (head, tail) = (&rest[..pos], &rest[pos + 1..]);
                rest = tail;
                let line: &[u8] = if buf.is_empty() {
                    head
                } else {
                    buf.extend_from_slice(head);
                    &buf
                };
                if line.len() > max_line {
                    return Err(too_long());
                }
                if !line.is_empty() && !on_line(line) {
                    return Ok(());
                }
                buf.clear();
            }
            if buf.len() + rest.len() > max_line {
                return Err(too_long());
            }
            buf.extend_from_slice(rest);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
