//! The service-discovery DNS responder: answers A queries for service and task names from a table
//! the agent keeps current, over UDP and TCP, and forwards other names to an optional upstream.
//!
//! The decision for one message is the pure [`respond`] function; the server around it only moves
//! bytes.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::seq::SliceRandom;
use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, OPCODE, QCLASS, QTYPE, RCODE, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::sock::ListenOptions;
use crate::MeshError;

/// Largest UDP answer we send (no EDNS): larger answers are truncated (TC) so clients use TCP.
pub const UDP_MAX: usize = 512;

/// Options of the DNS responder.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// Search domain also answered: with `flotilla`, `web.flotilla` is `web` (default `flotilla`).
    /// Unknown names inside it are NXDOMAIN, never forwarded.
    pub domain: Option<String>,
    /// TTL of answers, in seconds (default 2: task sets change often).
    pub ttl: u32,
    /// Resolver to forward unknown names to; without one they are NXDOMAIN (default none).
    pub upstream: Option<SocketAddr>,
    /// How long to wait for the upstream before answering SERVFAIL (default 2 s).
    pub upstream_timeout: Duration,
    /// A TCP client that sends nothing for this long is disconnected (default 10 s).
    pub tcp_idle_timeout: Duration,
    /// At most this many queries are being forwarded upstream at once; more get SERVFAIL
    /// (default 256).
    pub max_forwards: usize,
    /// At most this many TCP clients are served at once; more are closed at accept (default 128).
    pub max_tcp_clients: usize,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            domain: Some("flotilla".to_string()),
            ttl: 2,
            upstream: None,
            upstream_timeout: Duration::from_secs(2),
            tcp_idle_timeout: Duration::from_secs(10),
            max_forwards: 256,
            max_tcp_clients: 128,
        }
    }
}

/// The name table, with normalized keys.
#[derive(Debug, Default, Clone)]
pub struct Records {
    map: HashMap<String, Vec<Ipv4Addr>>,
    domain: Option<String>,
}

impl Records {
    /// Builds the table; names are case-insensitive, a trailing dot and the search domain suffix
    /// are optional. Records for the same normalized name are merged.
    pub fn new(records: HashMap<String, Vec<Ipv4Addr>>, domain: Option<&str>) -> Self {
        let domain = domain.map(|d| d.trim_end_matches('.').to_ascii_lowercase());
        let mut map: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
        for (name, addrs) in records {
            let key = normalize(&name, domain.as_deref());
            let entry = map.entry(key.name).or_default();
            for a in addrs {
                if !entry.contains(&a) {
                    entry.push(a);
                }
            }
        }
        Records { map, domain }
    }

    fn lookup(&self, name: &str) -> (Option<&[Ipv4Addr]>, bool) {
        let n = normalize(name, self.domain.as_deref());
        (self.map.get(&n.name).map(|v| v.as_slice()), n.in_domain)
    }
}

struct Normalized {
    name: String,
    /// The name was inside the search domain (or is the domain itself).
    in_domain: bool,
}

fn normalize(name: &str, domain: Option<&str>) -> Normalized {
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    if let Some(d) = domain {
        if lower == d {
            return Normalized {
                name: lower,
                in_domain: true,
            };
        }
        if let Some(stripped) = lower.strip_suffix(d) {
            if let Some(base) = stripped.strip_suffix('.') {
                return Normalized {
                    name: base.to_string(),
                    in_domain: true,
                };
            }
        }
    }
    Normalized {
        name: lower,
        in_domain: false,
    }
}

/// What to do with one incoming message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Unknown name and an upstream is configured: forward the message as it is.
    Forward,
    /// Not a query (too short, or a response): drop it.
    Ignore,
}

/// A header-only answer (used when the query cannot be parsed).
fn header_only(query: &[u8], rcode: RCODE) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out[0] = query[0];
    out[1] = query[1];
    // QR, same opcode, same RD.
    out[2] = 0x80 | (query[2] & 0x79);
    out[3] = rcode as u8;
    out
}

/// Decides the answer to `query` (one DNS message) from `records`. `max_len` is the largest answer
/// the transport allows (see [`UDP_MAX`]); bigger answers are sent empty with the TC flag.
pub fn respond(
    query: &[u8],
    records: &Records,
    opts: &DnsOptions,
    max_len: usize,
    shuffle: impl FnOnce(&mut [Ipv4Addr]),
) -> Outcome {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return Outcome::Ignore;
    }
    let Ok(packet) = Packet::parse(query) else {
        return Outcome::Reply(header_only(query, RCODE::FormatError));
    };
    if packet.opcode() != OPCODE::StandardQuery {
        return Outcome::Reply(header_only(query, RCODE::NotImplemented));
    }
    let [question] = packet.questions.as_slice() else {
        return Outcome::Reply(header_only(query, RCODE::FormatError));
    };
    let name = question.qname.to_string();
    let (found, in_domain) = records.lookup(&name);
    if found.is_none() && !in_domain && opts.upstream.is_some() {
        return Outcome::Forward;
    }

    let mut reply = Packet::new_reply(packet.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    if opts.upstream.is_some() {
        reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    }
    reply.questions.push(question.clone());
    match found {
        None => *reply.rcode_mut() = RCODE::NameError,
        Some(addrs) => {
            let wants_a = matches!(question.qtype, QTYPE::TYPE(TYPE::A) | QTYPE::ANY);
            let in_class = matches!(question.qclass, QCLASS::CLASS(CLASS::IN) | QCLASS::ANY);
            if wants_a && in_class {
                let mut addrs = addrs.to_vec();
                shuffle(&mut addrs);
                for a in addrs {
                    reply.answers.push(ResourceRecord::new(
                        question.qname.clone(),
                        CLASS::IN,
                        opts.ttl,
                        RData::A(A::from(a)),
                    ));
                }
            }
            // Other types (AAAA, MX, ...) of a known name: NOERROR with no answer.
        }
    }
    let Ok(mut bytes) = reply.build_bytes_vec_compressed() else {
        return Outcome::Reply(header_only(query, RCODE::ServerFailure));
    };
    if bytes.len() > max_len {
        reply.answers.clear();
        reply.set_flags(PacketFlag::TRUNCATION);
        bytes = match reply.build_bytes_vec_compressed() {
            Ok(b) => b,
            Err(_) => header_only(query, RCODE::ServerFailure),
        };
    }
    Outcome::Reply(bytes)
}

struct Shared {
    records: RwLock<Arc<Records>>,
    opts: DnsOptions,
    forwards: Arc<Semaphore>,
    tcp_clients: Arc<Semaphore>,
}

impl Shared {
    fn records(&self) -> Arc<Records> {
        match self.records.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn respond(&self, query: &[u8], max_len: usize) -> Outcome {
        respond(query, &self.records(), &self.opts, max_len, |a| {
            a.shuffle(&mut rand::rng())
        })
    }
}

/// A DNS responder listening on one address over UDP and TCP. Dropping it stops both.
pub struct DnsServer {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("udp_addr", &self.udp_addr)
            .field("tcp_addr", &self.tcp_addr)
            .finish()
    }
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` (with port 0, both get the same ephemeral port).
    pub async fn bind(addr: SocketAddr, opts: DnsOptions) -> Result<DnsServer, MeshError> {
        let (udp, tcp) = bind_pair(addr).await?;
        let udp_addr = udp.local_addr()?;
        let tcp_addr = tcp.local_addr()?;
        let shared = Arc::new(Shared {
            records: RwLock::new(Arc::new(Records::new(
                HashMap::new(),
                opts.domain.as_deref(),
            ))),
            forwards: Arc::new(Semaphore::new(opts.max_forwards)),
            tcp_clients: Arc::new(Semaphore::new(opts.max_tcp_clients)),
            opts,
        });
        let tasks = vec![
            tokio::spawn(udp_loop(Arc::new(udp), shared.clone())),
            tokio::spawn(tcp_loop(tcp, shared.clone())),
        ];
        Ok(DnsServer {
            udp_addr,
            tcp_addr,
            shared,
            tasks,
        })
    }

    /// The UDP address (the one to put in a container's resolv.conf).
    pub fn local_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The TCP address (same as the UDP one).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Replaces the name table: `name → addresses` (service names to VIPs, or to task IPs for
    /// DNS round-robin services; task names to task IPs).
    pub fn set_records(&self, records: HashMap<String, Vec<Ipv4Addr>>) {
        let r = Arc::new(Records::new(records, self.shared.opts.domain.as_deref()));
        match self.shared.records.write() {
            Ok(mut g) => *g = r,
            Err(p) => *p.into_inner() = r,
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), MeshError> {
    let bind_err = |source| MeshError::Bind { addr, source };
    // With port 0 the TCP port matching the UDP one may be taken: try a few.
    let tries = if addr.port() == 0 { 10 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        // No SO_REUSEPORT: a second responder on the same address is an error, not a share.
        let o = ListenOptions {
            reuse_port: false,
            freebind: false,
        };
        let udp = crate::sock::udp_socket(addr, o)?;
        let port = udp.local_addr()?.port();
        match crate::sock::tcp_listener(SocketAddr::new(addr.ip(), port), 128, o) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        bind_err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no port free for both udp and tcp",
        ))
    }))
}

async fn udp_loop(sock: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) => {
                debug!(error = %e, "dns udp recv failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let query = &buf[..n];
        match shared.respond(query, UDP_MAX) {
            Outcome::Reply(bytes) => {
                if let Err(e) = sock.send_to(&bytes, peer).await {
                    debug!(%peer, error = %e, "dns udp send failed");
                }
            }
            Outcome::Forward => {
                if let Some(upstream) = shared.opts.upstream {
                    let Ok(permit) = shared.forwards.clone().try_acquire_owned() else {
                        let _ = sock
                            .send_to(&header_only(query, RCODE::ServerFailure), peer)
                            .await;
                        continue;
                    };
                    let query = query.to_vec();
                    let sock = sock.clone();
                    let timeout = shared.opts.upstream_timeout;
                    tokio::spawn(async move {
                        let answer = match forward_udp(&query, upstream, timeout).await {
                            Ok(a) => a,
                            Err(e) => {
                                debug!(%upstream, error = %e, "dns forward failed");
                                header_only(&query, RCODE::ServerFailure)
                            }
                        };
                        let _ = sock.send_to(&answer, peer).await;
                        drop(permit);
                    });
                }
            }
            Outcome::Ignore => {}
        }
    }
}

async fn forward_udp(
    query: &[u8],
    upstream: SocketAddr,
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 4096];
    let wait = async {
        loop {
            let n = sock.recv(&mut buf).await?;
            // Only the answer to this query (same id, a response) counts.
            if n >= 12 && buf[..2] == query[..2] && buf[2] & 0x80 != 0 {
                return Ok::<_, std::io::Error>(buf[..n].to_vec());
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream timed out"))?
}

async fn forward_tcp(
    query: &[u8],
    upstream: SocketAddr,
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut s = TcpStream::connect(upstream).await?;
        let len = u16::try_from(query.len())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too long"))?;
        let mut msg = len.to_be_bytes().to_vec();
        msg.extend_from_slice(query);
        s.write_all(&msg).await?;
        let n = s.read_u16().await? as usize;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream timed out"))?
}

async fn tcp_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((s, peer)) => {
                let Ok(permit) = shared.tcp_clients.clone().try_acquire_owned() else {
                    debug!(%peer, "dns tcp client limit reached, connection closed");
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    serve_tcp(s, peer, shared).await;
                    drop(permit);
                });
            }
            Err(e) => {
                debug!(error = %e, "dns tcp accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn serve_tcp(mut s: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let idle = shared.opts.tcp_idle_timeout;
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(idle, s.read_u16()).await else {
            return;
        };
        let mut query = vec![0u8; len as usize];
        if !matches!(
            tokio::time::timeout(idle, s.read_exact(&mut query)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let answer = match shared.respond(&query, u16::MAX as usize) {
            Outcome::Reply(b) => b,
            Outcome::Forward => match shared.opts.upstream {
                Some(up) => match forward_tcp(&query, up, shared.opts.upstream_timeout).await {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(upstream = %up, error = %e, "dns tcp forward failed");
                        header_only(&query, RCODE::ServerFailure)
                    }
                },
                None => continue,
            },
            // Not a query: a stream cannot resynchronize meaningfully, drop the connection.
            Outcome::Ignore => return,
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        let mut msg = len.to_be_bytes().to_vec();
        msg.extend_from_slice(&answer);
        if let Err(e) = s.write_all(&msg).await {
            debug!(%peer, error = %e, "dns tcp write failed");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized() {
        let n = |s: &str| normalize(s, Some("flotilla"));
        assert_eq!(n("Web.").name, "web");
        assert!(!n("web").in_domain);
        let w = n("WEB.Flotilla.");
        assert_eq!((w.name.as_str(), w.in_domain), ("web", true));
        assert!(n("flotilla").in_domain);
        // A suffix that is not a whole label does not count.
        let x = n("webflotilla");
        assert_eq!((x.name.as_str(), x.in_domain), ("webflotilla", false));
        assert_eq!(normalize("a.b.flotilla", Some("flotilla")).name, "a.b");
        assert_eq!(normalize("web.flotilla", None).name, "web.flotilla");
    }

    #[test]
    fn records_merge_names_that_normalize_alike() {
        let r = Records::new(
            HashMap::from([
                ("web".to_string(), vec![Ipv4Addr::new(10, 0, 0, 1)]),
                (
                    "WEB.flotilla.".to_string(),
                    vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
                ),
            ]),
            Some("flotilla"),
        );
        let (found, _) = r.lookup("web");
        let mut got = found.expect("found").to_vec();
        got.sort();
        assert_eq!(
            got,
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
        );
    }
}
