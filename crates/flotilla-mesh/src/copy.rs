//! Bidirectional copy between two TCP sockets, tuned for request/response traffic.
//!
//! Same semantics as `tokio::io::copy_bidirectional` (each direction copies until EOF, then
//! half-closes the other side's write; done when both directions are), with one saving borrowed
//! from nginx's `ngx_unix_recv`: a read that returns fewer bytes than the buffer holds means the
//! socket is drained, so readiness is cleared right away instead of being confirmed by one more
//! `recv` that fails with `EAGAIN`. That is one syscall less per read, per direction, per
//! request. Clearing is safe: tokio only clears readiness if no new event arrived since it was
//! observed.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes copied in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Copied {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// When a connection last moved a byte, for idle timeouts.
#[derive(Debug)]
pub(crate) struct LastActivity {
    epoch: tokio::time::Instant,
    /// Milliseconds since `epoch`.
    at: AtomicU64,
}

impl LastActivity {
    pub(crate) fn new() -> LastActivity {
        LastActivity {
            epoch: tokio::time::Instant::now(),
            at: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.at
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long nothing has been copied.
    pub(crate) fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.at.load(Ordering::Relaxed)))
    }
}

/// Copies `a → b` and `b → a` concurrently until both directions have seen EOF; every read
/// touches `activity`.
pub(crate) async fn copy_bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    buf_size: usize,
    activity: &LastActivity,
) -> io::Result<Copied> {
    let (a_to_b, b_to_a) = tokio::try_join!(
        one_way(a, b, buf_size, activity),
        one_way(b, a, buf_size, activity)
    )?;
    Ok(Copied { a_to_b, b_to_a })
}

async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    buf_size: usize,
    activity: &LastActivity,
) -> io::Result<u64> {
    let mut buf = vec![0u8; buf_size];
    let mut total = 0u64;
    loop {
        let n = read(from, &mut buf).await?;
        activity.touch();
        if n == 0 {
            // EOF: pass the half-close on. The peer may already be gone; that is not an error
            // for this direction.
            match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(e),
            }
            return Ok(total);
        }
        write_all(to, &buf[..n]).await?;
        total += n as u64;
    }
}

/// One read; clears read readiness when the read was short (see the module docs).
async fn read(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let cap = buf.len();
    loop {
        s.readable().await?;
        let mut got = None;
        let r = s.try_io(Interest::READABLE, || {
            let n = s.try_read(buf)?;
            got = Some(n);
            if n > 0 && n < cap {
                // Drained: report "would block" so that readiness is cleared; `got` has the data.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (r, got) {
            (Ok(n), _) => return Ok(n),
            (Err(_), Some(n)) => return Ok(n),
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (Err(e), None) => return Err(e),
        }
    }
}

async fn write_all(s: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match s.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
