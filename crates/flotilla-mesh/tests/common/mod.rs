//! Test backends on 127.0.0.1 and small client helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `f` until it holds, failing the test after [`DEADLINE`].
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A line server: every line `x` is answered `<id>:x`; counts accepted connections.
pub struct LineServer {
    pub id: String,
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl LineServer {
    pub async fn start(id: &str) -> LineServer {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (id2, acc) = (id.to_string(), accepted.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let id = id2.clone();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if w.write_all(format!("{id}:{line}\n").as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        LineServer {
            id: id.to_string(),
            addr,
            accepted,
            accept,
        }
    }

    pub fn backend(&self) -> flotilla_mesh::Backend {
        flotilla_mesh::Backend::new(self.id.clone(), self.addr)
    }

    /// Closes the listener (established connections go on). Waits until the port refuses.
    pub async fn stop_listening(&self) {
        self.accept.abort();
        while TcpStream::connect(self.addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A client connection speaking lines.
pub struct LineClient {
    r: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl LineClient {
    pub async fn connect(addr: SocketAddr) -> LineClient {
        let s = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        let (r, w) = s.into_split();
        LineClient {
            r: BufReader::new(r).lines(),
            w,
        }
    }

    /// Sends `line`, returns the backend id that answered (None if the connection closed).
    pub async fn ask(&mut self, line: &str) -> Option<String> {
        self.w
            .write_all(format!("{line}\n").as_bytes())
            .await
            .ok()?;
        let answer = within("answer", self.r.next_line()).await.ok()??;
        let (id, echoed) = answer.split_once(':')?;
        assert_eq!(echoed, line);
        Some(id.to_string())
    }
}

/// One request on a fresh connection: the id of the backend that served it.
pub async fn one_request(addr: SocketAddr) -> Option<String> {
    LineClient::connect(addr).await.ask("ping").await
}

pub fn count(ids: &[String]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for i in ids {
        *m.entry(i.clone()).or_insert(0) += 1;
    }
    m
}

/// A UDP backend answering each datagram `x` with `<id>:x`.
pub struct UdpEcho {
    pub id: String,
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl UdpEcho {
    pub async fn start(id: &str) -> UdpEcho {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = s.local_addr().expect("addr");
        let id2 = id.to_string();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                let Ok((n, peer)) = s.recv_from(&mut buf).await else {
                    continue;
                };
                let mut out = format!("{id2}:").into_bytes();
                out.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&out, peer).await;
            }
        });
        UdpEcho {
            id: id.to_string(),
            addr,
            task,
        }
    }

    pub fn backend(&self) -> flotilla_mesh::Backend {
        flotilla_mesh::Backend::new(self.id.clone(), self.addr)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads until EOF (for half-close checks).
pub async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    within("read to end", s.read_to_end(&mut v))
        .await
        .expect("read");
    v
}
