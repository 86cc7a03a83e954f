//! Reading request bodies that peers send, bounded in size and in time. axum's body limits
//! only bound its extractors (`Json`, `Bytes`); code that reads a body itself (the
//! follower's proxy to the leader, image uploads) goes through here.

use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::io::AsyncWriteExt;

use crate::error::ApiError;

/// The largest JSON request body (axum's default, stated here so that a follower proxying a
/// request applies the limit the leader's `Json` extractor will).
pub const JSON_BODY_LIMIT: usize = 2 << 20;

/// Time to receive a whole JSON request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body too large: the limit is {limit} bytes"),
    )
}

fn too_slow(what: &str, after: Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        format!("{what} took longer than {after:?}: send it faster or on a better connection"),
    )
}

fn read_error(e: Box<dyn std::error::Error + Send + Sync>, limit: u64) -> ApiError {
    if e.is::<LengthLimitError>() {
        too_large(limit)
    } else {
        ApiError::bad_request(format!("reading the request body: {e}"))
    }
}

/// After a body turned out too large, how long the rest is read and thrown away before the
/// 413 goes out. Without this, an HTTP/1 client still sending finds the connection reset
/// (unread data at close) and often loses the answer; nginx's `lingering_close` does the
/// same. Memory stays bounded: nothing is kept.
const LINGER: Duration = Duration::from_secs(2);

/// Reads and discards what is left of `body`, for at most [`LINGER`].
async fn linger<B>(body: &mut B)
where
    B: hyper::body::Body<Error = Box<dyn std::error::Error + Send + Sync>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + LINGER;
    let drain = async {
        while let Some(frame) = body.frame().await {
            // A body that is always ready never lets the timeout below fire on its own.
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::task::consume_budget().await;
            // A `Limited` past its limit reports each further data frame as an error after
            // taking it from the connection; any other error ends the body.
            if let Err(e) = frame {
                if !e.is::<LengthLimitError>() {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout_at(deadline, drain).await;
}

/// Answers `err` to a request whose body was not read. A client that waits for
/// `100 Continue` has sent nothing and gets the answer at once; what any other client is still
/// sending is read and discarded first, for at most [`LINGER`] (see there), so that it gets
/// the answer rather than a connection closed under its upload.
pub async fn refuse_unread(req: axum::extract::Request, err: ApiError) -> ApiError {
    let (parts, body) = req.into_parts();
    if expects_continue(&parts.headers) {
        return err;
    }
    let mut body = body.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) });
    linger(&mut body).await;
    err
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(hyper::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// The length the client declared, refused (413) when over `limit`. A client that waits for
/// `100 Continue` has sent nothing and gets the answer at once; one that is already sending
/// is read (and its bytes discarded) for a moment first, see [`LINGER`].
async fn check_declared<B>(headers: &HeaderMap, body: &mut B, limit: u64) -> Result<(), ApiError>
where
    B: hyper::body::Body<Error = Box<dyn std::error::Error + Send + Sync>> + Unpin,
{
    let declared = headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => {
            if !expects_continue(headers) {
                linger(body).await;
            }
            Err(too_large(limit))
        }
        _ => Ok(()),
    }
}

/// The whole body, at most `limit` bytes (413 beyond, also for a declared length over it)
/// and within `timeout` (408 beyond).
pub async fn read_limited(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let mut body = Limited::new(body, limit);
    check_declared(headers, &mut body, limit as u64).await?;
    let mut out = bytes::BytesMut::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        out.extend_from_slice(&data);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => Ok(out.freeze()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            linger(&mut body).await;
            Err(too_large(limit as u64))
        }
        Ok(Err(e)) => Err(read_error(e, limit as u64)),
        Err(_) => Err(too_slow("the request body", timeout)),
    }
}

/// Streams the body into a new file `dest`: at most `limit` bytes (413 beyond, also for a
/// declared length over it); 408 when no data arrives for `stall`. Returns the size. `dest`
/// is left for the caller to remove.
pub async fn spool(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    stall: Duration,
    dest: &Path,
) -> Result<u64, ApiError> {
    let mut body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    check_declared(headers, &mut body, limit).await?;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .await
        .map_err(|e| ApiError::internal(format!("saving the upload: {e}")))?;
    let mut size = 0u64;
    loop {
        let frame = match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => return Err(too_slow("the upload stalled: a pause", stall)),
            Ok(None) => break,
            Ok(Some(Err(e))) if e.is::<LengthLimitError>() => {
                linger(&mut body).await;
                return Err(too_large(limit));
            }
            Ok(Some(Err(e))) => return Err(read_error(e, limit)),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            file.write_all(&data)
                .await
                .map_err(|e| ApiError::internal(format!("saving the upload: {e}")))?;
            size += data.len() as u64;
        }
    }
    file.flush()
        .await
        .map_err(|e| ApiError::internal(format!("saving the upload: {e}")))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A body that sends `head` and then nothing, forever.
    fn stalled(head: &'static [u8]) -> Body {
        let s = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) })
            .chain(futures::stream::pending());
        Body::from_stream(s)
    }

    use futures::StreamExt;

    #[tokio::test]
    async fn a_body_over_the_limit_is_413() {
        let h = HeaderMap::new();
        let e = read_limited(&h, Body::from(vec![b'a'; 101]), 100, BODY_READ_TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("100 bytes"), "{}", e.message);
        let ok = read_limited(&h, Body::from(vec![b'a'; 100]), 100, BODY_READ_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(ok.len(), 100);
    }

    #[tokio::test]
    async fn an_endless_body_is_cut_at_the_limit() {
        let s =
            futures::stream::repeat_with(|| Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 4096])));
        let e = read_limited(
            &HeaderMap::new(),
            Body::from_stream(s),
            JSON_BODY_LIMIT,
            BODY_READ_TIMEOUT,
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn a_body_that_never_ends_is_408() {
        let e = read_limited(
            &HeaderMap::new(),
            stalled(b"{\"a\":"),
            JSON_BODY_LIMIT,
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::REQUEST_TIMEOUT);
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading() {
        let mut h = HeaderMap::new();
        h.insert(hyper::header::CONTENT_LENGTH, "3000000".parse().unwrap());
        h.insert(hyper::header::EXPECT, "100-continue".parse().unwrap());
        // Never polled: a client waiting for `100 Continue` is answered at once.
        let e = read_limited(&h, stalled(b""), JSON_BODY_LIMIT, BODY_READ_TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        h.insert(hyper::header::CONTENT_LENGTH, "10".parse().unwrap());
        let ok = read_limited(
            &h,
            Body::from(vec![1u8; 10]),
            JSON_BODY_LIMIT,
            BODY_READ_TIMEOUT,
        )
        .await
        .unwrap();
        assert_eq!(ok.len(), 10);
    }

    #[tokio::test]
    async fn an_upload_is_spooled_to_disk_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let h = HeaderMap::new();
        let n = spool(
            &h,
            Body::from(vec![7u8; 5000]),
            5000,
            Duration::from_secs(60),
            &p,
        )
        .await
        .unwrap();
        assert_eq!(n, 5000);
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 5000]);
        let p = dir.path().join("b");
        let e = spool(
            &h,
            Body::from(vec![7u8; 5001]),
            5000,
            Duration::from_secs(60),
            &p,
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        let p = dir.path().join("c");
        let e = spool(&h, stalled(b"tar"), 5000, Duration::from_millis(200), &p)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::REQUEST_TIMEOUT);
    }
}
