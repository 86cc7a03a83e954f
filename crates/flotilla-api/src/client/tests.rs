//! `stream_lines` against a misbehaving server (a fake one on a unix socket).
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use super::*;

const MB: usize = 1 << 20;

/// 10 MB in 64 KiB chunks, never a newline; counts what the server managed to send.
fn endless(sent: Arc<AtomicUsize>) -> axum::body::Body {
    let s = futures::stream::unfold(0usize, move |n| {
        let sent = sent.clone();
        async move {
            if n >= 10 * MB {
                return None;
            }
            sent.fetch_add(64 * 1024, Ordering::SeqCst);
            Some((
                Ok::<_, Infallible>(Bytes::from(vec![b'x'; 64 * 1024])),
                n + 64 * 1024,
            ))
        }
    });
    axum::body::Body::from_stream(s)
}

struct Fake {
    client: Client,
    sent: Arc<AtomicUsize>,
    dir: PathBuf,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn fake() -> Fake {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "flotilla-api-lines-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let sent = Arc::new(AtomicUsize::new(0));
    let (s1, s2) = (sent.clone(), sent.clone());
    let router = Router::new()
        .route("/endless", get(move || async move { endless(s1.clone()) }))
        .route(
            "/endless-error",
            get(move || async move { (StatusCode::INTERNAL_SERVER_ERROR, endless(s2.clone())) }),
        )
        .route(
            "/lines",
            get(|| async {
                // Lines split across chunks, an empty line, and a line of exactly 16 KiB.
                let mut chunks: Vec<Vec<u8>> = vec![b"{\"a\":".to_vec(), b"1}\n\n{\"b\"".to_vec()];
                chunks.push(b":2}\n".to_vec());
                chunks.push(vec![b'y'; 16 * 1024]);
                chunks.push(b"\n".to_vec());
                let s = futures::stream::iter(
                    chunks
                        .into_iter()
                        .map(|c| Ok::<_, Infallible>(Bytes::from(c))),
                );
                axum::body::Body::from_stream(s)
            }),
        );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let path = sock.clone();
    tokio::spawn(async move { crate::serve_unix(&path, router, stop_rx).await });
    let client = Client::new(Endpoint::Unix(sock.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fake server did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Fake {
        client,
        sent,
        dir,
        _stop: stop_tx,
    }
}

#[tokio::test]
async fn a_line_without_end_fails_the_stream_once_it_passes_the_cap() {
    let f = fake().await;
    let mut delivered = 0;
    let res = tokio::time::timeout(
        Duration::from_secs(30),
        f.client.stream_lines_max("/endless", 16 * 1024, |l| {
            assert!(l.len() <= 16 * 1024);
            delivered += 1;
            true
        }),
    )
    .await
    .expect("stream_lines never returned");
    match res {
        Err(ClientError::Decode { detail, .. }) => {
            assert!(detail.contains("longer than 16384 bytes"), "{detail}")
        }
        other => panic!("expected a clear error, got {other:?}"),
    }
    assert_eq!(delivered, 0);
    // The client gave up long before the 10 MB were sent (what is in flight is the socket's
    // and hyper's buffers, not the client's line buffer).
    let sent = f.sent.load(Ordering::SeqCst);
    assert!(sent < 10 * MB, "the client read all {sent} bytes");
}

#[tokio::test]
async fn an_endless_error_body_is_read_only_up_to_its_cap() {
    let f = fake().await;
    let res = tokio::time::timeout(
        Duration::from_secs(30),
        f.client.stream_lines("/endless-error", |_| true),
    )
    .await
    .expect("stream_lines never returned");
    match res {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 500);
            assert!(message.contains("500"), "{message}");
        }
        other => panic!("expected the status, got {other:?}"),
    }
    assert!(f.sent.load(Ordering::SeqCst) < 10 * MB);
}

#[tokio::test]
async fn lines_split_across_chunks_are_joined_and_a_line_at_the_cap_passes() {
    let f = fake().await;
    let mut got: Vec<Vec<u8>> = Vec::new();
    f.client
        .stream_lines_max("/lines", 16 * 1024, |l| {
            got.push(l.to_vec());
            true
        })
        .await
        .unwrap();
    assert_eq!(
        got.len(),
        3,
        "{:?}",
        got.iter().map(|l| l.len()).collect::<Vec<_>>()
    );
    assert_eq!(got[0], b"{\"a\":1}");
    assert_eq!(got[1], b"{\"b\":2}");
    assert_eq!(got[2].len(), 16 * 1024);
}
