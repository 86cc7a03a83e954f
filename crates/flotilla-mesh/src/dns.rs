//! The service-discovery DNS responder: answers A queries for service and task names from a table
//! the agent keeps current, over UDP and TCP.
//!
//! Names outside the cluster domain that are not in the table go to the configured upstream
//! resolvers ([`DnsOptions::upstreams`]), tried in order: one that times out
//! ([`DnsOptions::upstream_timeout`]) or fails is skipped for the next, and the client gets
//! SERVFAIL only when all failed. UDP queries are forwarded over UDP, TCP queries over TCP. Without
//! upstreams such names are NXDOMAIN.
//!
//! Forwarded answers are kept in a [`DnsCache`] (at most [`DnsOptions::cache_entries`] entries):
//! positive answers only, for the smallest TTL of their answer records and at most 5 minutes,
//! served with their TTLs counted down.
//!
//! The decision for one message is the pure [`respond`] function, the cache is a pure structure
//! taking the time as an argument; the server around them only moves bytes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

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

/// Largest answer the cache keeps (4096 entries of at most this size: 16 MiB).
pub const MAX_CACHED_ANSWER: usize = 4096;

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
    /// Resolvers to forward unknown names to, tried in this order; without any they are NXDOMAIN
    /// (default none).
    pub upstreams: Vec<SocketAddr>,
    /// How long to wait for one upstream before trying the next one, or answering SERVFAIL after
    /// the last one (default 2 s).
    pub upstream_timeout: Duration,
    /// Forwarded answers kept in the cache at most; 0 disables the cache (default 4096).
    pub cache_entries: usize,
    /// A TCP client that sends nothing for this long is disconnected (default 10 s).
    pub tcp_idle_timeout: Duration,
    /// At most this many queries are being forwarded upstream at once; more get SERVFAIL
    /// (default 256).
    pub max_forwards: usize,
    /// At most this many TCP clients are served at once; more are closed at accept (default 128).
    pub max_tcp_clients: usize,
    /// Resolvers of particular clients (a task's `--dns`), by the client's address: names
    /// outside the cluster from that address go to these instead of [`DnsOptions::upstreams`],
    /// and their answers are not cached (default empty; shared with whoever updates it).
    pub source_upstreams: SourceUpstreams,
    /// The user-defined networks of particular clients: a query from such a client is answered
    /// from those networks' tables only (set with [`DnsServer::set_network_records`]), any
    /// other from the default table (default empty; shared with whoever updates it).
    pub source_networks: SourceNetworks,
}

/// Client address → its own resolvers (see [`DnsOptions::source_upstreams`]).
#[derive(Debug, Clone, Default)]
pub struct SourceUpstreams(Arc<RwLock<HashMap<IpAddr, Vec<SocketAddr>>>>);

impl SourceUpstreams {
    /// Sets (or, with an empty list, clears) the resolvers of `client`.
    pub fn set(&self, client: IpAddr, upstreams: Vec<SocketAddr>) {
        let mut m = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if upstreams.is_empty() {
            m.remove(&client);
        } else {
            m.insert(client, upstreams);
        }
    }

    /// The resolvers of `client`, if it has its own.
    pub fn get(&self, client: IpAddr) -> Option<Vec<SocketAddr>> {
        let m = match self.0.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        m.get(&client).cloned()
    }
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            domain: Some("flotilla".to_string()),
            ttl: 2,
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            cache_entries: 4096,
            tcp_idle_timeout: Duration::from_secs(10),
            max_forwards: 256,
            max_tcp_clients: 128,
            source_upstreams: SourceUpstreams::default(),
            source_networks: SourceNetworks::default(),
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
}

/// A name table [`respond`] answers from: `(addresses, whether the name is inside the search
/// domain)`.
pub trait Lookup {
    fn lookup(&self, name: &str) -> (Option<&[Ipv4Addr]>, bool);
}

impl Lookup for Records {
    fn lookup(&self, name: &str) -> (Option<&[Ipv4Addr]>, bool) {
        let n = normalize(name, self.domain.as_deref());
        (self.map.get(&n.name).map(|v| v.as_slice()), n.in_domain)
    }
}

/// The tables of several networks, in order: the first that knows a name answers it.
impl Lookup for [Arc<Records>] {
    fn lookup(&self, name: &str) -> (Option<&[Ipv4Addr]>, bool) {
        let mut in_domain = false;
        for r in self {
            let (found, d) = r.lookup(name);
            if found.is_some() {
                return (found, d);
            }
            in_domain |= d;
        }
        (None, in_domain)
    }
}

/// Client address → the networks it is on (a task of user-defined networks, see
/// [`DnsServer::set_network_records`]); shared with whoever updates it.
#[derive(Debug, Clone, Default)]
pub struct SourceNetworks(Arc<RwLock<HashMap<IpAddr, Vec<String>>>>);

impl SourceNetworks {
    /// Sets (or, with an empty list, clears) the networks of `client`.
    pub fn set(&self, client: IpAddr, networks: Vec<String>) {
        let mut m = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if networks.is_empty() {
            m.remove(&client);
        } else {
            m.insert(client, networks);
        }
    }

    /// The networks of `client`, if it is on any.
    pub fn get(&self, client: IpAddr) -> Option<Vec<String>> {
        let m = match self.0.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        m.get(&client).cloned()
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
    /// Unknown name and upstreams are configured: forward the message as it is.
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
pub fn respond<L: Lookup + ?Sized>(
    query: &[u8],
    records: &L,
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
    if found.is_none() && !in_domain && !opts.upstreams.is_empty() {
        return Outcome::Forward;
    }

    let mut reply = Packet::new_reply(packet.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    if !opts.upstreams.is_empty() {
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

/// Longest time an answer stays in the [`DnsCache`], whatever its TTLs, in seconds.
const CACHE_MAX_SECS: u32 = 300;

/// The question an answer is cached under: the name's labels lowercased, qtype and qclass.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    name: Vec<Vec<u8>>,
    qtype: u16,
    qclass: u16,
}

/// The key of a message with exactly one question.
fn cache_key(p: &Packet<'_>) -> Option<CacheKey> {
    let [q] = p.questions.as_slice() else {
        return None;
    };
    Some(CacheKey {
        name: q.qname.as_bytes().map(|l| l.to_ascii_lowercase()).collect(),
        qtype: q.qtype.into(),
        qclass: q.qclass.into(),
    })
}

#[derive(Debug)]
struct CacheEntry {
    answer: Vec<u8>,
    stored: Instant,
    expires: Instant,
}

/// A cache of forwarded answers, keyed by question (case-insensitive name, qtype, qclass).
///
/// Only answers with RCODE NOERROR, at least one answer record and no TC flag are kept, for the
/// smallest TTL of their answer records and at most 5 minutes; a TTL of 0 is not kept. When full,
/// expired entries are dropped first, then the one expiring first. Messages that do not parse are
/// never kept. The time is an argument of every call.
#[derive(Debug)]
pub struct DnsCache {
    capacity: usize,
    entries: HashMap<CacheKey, CacheEntry>,
}

impl DnsCache {
    /// An empty cache holding at most `capacity` answers (0: nothing is ever kept).
    pub fn new(capacity: usize) -> Self {
        DnsCache {
            capacity,
            entries: HashMap::new(),
        }
    }

    /// Number of entries, expired ones included until they are dropped.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached answer to `query` if one is fresh at `now`: with the query's ID, question and RD
    /// flag, and every record's TTL reduced by the seconds elapsed since it was stored. An expired
    /// entry is dropped.
    pub fn get(&mut self, query: &[u8], now: Instant) -> Option<Vec<u8>> {
        if self.capacity == 0 {
            return None;
        }
        let q = Packet::parse(query).ok()?;
        let key = cache_key(&q)?;
        let entry = self.entries.get(&key)?;
        if now >= entry.expires {
            self.entries.remove(&key);
            return None;
        }
        let elapsed = now.saturating_duration_since(entry.stored).as_secs();
        let elapsed = u32::try_from(elapsed).unwrap_or(u32::MAX);
        let out = rewrite_cached(&entry.answer, &q, elapsed);
        if out.is_none() {
            self.entries.remove(&key);
        }
        out
    }

    /// Keeps `answer`, the upstream's response to `query`, if it is cacheable (see the type's
    /// documentation) and answers that very question.
    pub fn put(&mut self, query: &[u8], answer: &[u8], now: Instant) {
        // Larger answers (rare, from TCP) are not kept: the cache stays under 16 MiB.
        if self.capacity == 0 || answer.len() > MAX_CACHED_ANSWER {
            return;
        }
        let Ok(q) = Packet::parse(query) else {
            return;
        };
        let Some(key) = cache_key(&q) else {
            return;
        };
        let Ok(a) = Packet::parse(answer) else {
            return;
        };
        if !a.has_flags(PacketFlag::RESPONSE)
            || a.has_flags(PacketFlag::TRUNCATION)
            || a.opcode() != OPCODE::StandardQuery
            || a.rcode() != RCODE::NoError
            || a.id() != q.id()
            || cache_key(&a).as_ref() != Some(&key)
        {
            return;
        }
        // TTLs with the top bit set count as 0 (RFC 2181 §8).
        let Some(min_ttl) = a
            .answers
            .iter()
            .map(|rr| if rr.ttl > i32::MAX as u32 { 0 } else { rr.ttl })
            .min()
        else {
            return;
        };
        let life = min_ttl.min(CACHE_MAX_SECS);
        if life == 0 {
            return;
        }
        // What cannot be rebuilt could not be served.
        if rewrite_cached(answer, &q, 0).is_none() {
            return;
        }
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.entries.retain(|_, e| now < e.expires);
            while self.entries.len() >= self.capacity {
                let Some(first) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                self.entries.remove(&first);
            }
        }
        self.entries.insert(
            key,
            CacheEntry {
                answer: answer.to_vec(),
                stored: now,
                expires: now + Duration::from_secs(u64::from(life)),
            },
        );
    }
}

/// A stored answer made the answer to `query`: its ID, question and RD flag, no OPT record if the
/// query had none, every TTL reduced by `elapsed` seconds.
fn rewrite_cached(answer: &[u8], query: &Packet<'_>, elapsed: u32) -> Option<Vec<u8>> {
    let mut p = Packet::parse(answer).ok()?;
    p.set_id(query.id());
    p.questions = query
        .questions
        .iter()
        .map(|q| q.clone().into_owned())
        .collect();
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        p.set_flags(PacketFlag::RECURSION_DESIRED);
    } else {
        p.remove_flags(PacketFlag::RECURSION_DESIRED);
    }
    if query.opt().is_none() {
        *p.opt_mut() = None;
    }
    for rr in p
        .answers
        .iter_mut()
        .chain(p.name_servers.iter_mut())
        .chain(p.additional_records.iter_mut())
    {
        rr.ttl = rr.ttl.saturating_sub(elapsed);
    }
    p.build_bytes_vec_compressed().ok()
}

/// The largest UDP answer `query` accepts: its EDNS payload size, at least [`UDP_MAX`].
fn udp_limit(query: &[u8]) -> usize {
    Packet::parse(query)
        .ok()
        .and_then(|p| p.opt().map(|o| usize::from(o.udp_packet_size)))
        .map_or(UDP_MAX, |n| n.max(UDP_MAX))
}

struct Shared {
    records: RwLock<Arc<Records>>,
    /// Each user-defined network's table, by network name.
    networks: RwLock<Arc<HashMap<String, Arc<Records>>>>,
    opts: DnsOptions,
    forwards: Arc<Semaphore>,
    tcp_clients: Arc<Semaphore>,
    cache: Mutex<DnsCache>,
}

impl Shared {
    fn records(&self) -> Arc<Records> {
        match self.records.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The resolvers for a query from `client`: its own, else the node's (`own` tells which).
    fn upstreams_of(&self, client: IpAddr) -> (Vec<SocketAddr>, bool) {
        match self.opts.source_upstreams.get(client) {
            Some(u) => (u, true),
            None => (self.opts.upstreams.clone(), false),
        }
    }

    fn respond(&self, query: &[u8], max_len: usize, client: IpAddr) -> Outcome {
        let own = self.opts.source_upstreams.get(client);
        let with_own;
        let opts = match own {
            Some(u) => {
                with_own = DnsOptions {
                    upstreams: u,
                    ..self.opts.clone()
                };
                &with_own
            }
            None => &self.opts,
        };
        let shuffle = |a: &mut [Ipv4Addr]| a.shuffle(&mut rand::rng());
        match self.opts.source_networks.get(client) {
            None => respond(query, &*self.records(), opts, max_len, shuffle),
            Some(nets) => {
                let tables = match self.networks.read() {
                    Ok(g) => g.clone(),
                    Err(p) => p.into_inner().clone(),
                };
                let scoped: Vec<Arc<Records>> =
                    nets.iter().filter_map(|n| tables.get(n).cloned()).collect();
                respond(query, scoped.as_slice(), opts, max_len, shuffle)
            }
        }
    }

    fn cache(&self) -> MutexGuard<'_, DnsCache> {
        match self.cache.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The cached answer to `query`, if any.
    fn cached(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.cache().get(query, Instant::now())
    }

    /// Forwards `query` from `client` to its upstreams in order until one answers (over TCP or
    /// UDP), and caches the answer of the node's upstreams; `None` when all failed.
    async fn forward(&self, query: &[u8], tcp: bool, client: IpAddr) -> Option<Vec<u8>> {
        let timeout = self.opts.upstream_timeout;
        let (upstreams, own) = self.upstreams_of(client);
        for upstream in upstreams {
            let result = if tcp {
                forward_tcp(query, upstream, timeout).await
            } else {
                forward_udp(query, upstream, timeout).await
            };
            match result {
                Ok(answer) => {
                    if !own {
                        self.cache().put(query, &answer, Instant::now());
                    }
                    return Some(answer);
                }
                Err(e) => debug!(%upstream, tcp, error = %e, "dns forward failed"),
            }
        }
        None
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
            networks: RwLock::new(Arc::new(HashMap::new())),
            forwards: Arc::new(Semaphore::new(opts.max_forwards)),
            tcp_clients: Arc::new(Semaphore::new(opts.max_tcp_clients)),
            cache: Mutex::new(DnsCache::new(opts.cache_entries)),
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

    /// Replaces the tables of the user-defined networks (network name → its names). A client
    /// listed in [`DnsOptions::source_networks`] is answered from its networks' tables only, in
    /// its order; names of other networks and of the default network are unknown to it.
    pub fn set_network_records(&self, networks: HashMap<String, HashMap<String, Vec<Ipv4Addr>>>) {
        let domain = self.shared.opts.domain.as_deref();
        let tables: HashMap<String, Arc<Records>> = networks
            .into_iter()
            .map(|(n, r)| (n, Arc::new(Records::new(r, domain))))
            .collect();
        let tables = Arc::new(tables);
        match self.shared.networks.write() {
            Ok(mut g) => *g = tables,
            Err(p) => *p.into_inner() = tables,
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
        let client = peer.ip();
        let own = shared.opts.source_upstreams.get(client).is_some();
        match shared.respond(query, UDP_MAX, client) {
            Outcome::Reply(bytes) => {
                if let Err(e) = sock.send_to(&bytes, peer).await {
                    debug!(%peer, error = %e, "dns udp send failed");
                }
            }
            Outcome::Forward => {
                // An answer cached from a TCP exchange may be too big for this client.
                let cached = if own { None } else { shared.cached(query) };
                if let Some(answer) = cached.filter(|a| a.len() <= udp_limit(query)) {
                    if let Err(e) = sock.send_to(&answer, peer).await {
                        debug!(%peer, error = %e, "dns udp send failed");
                    }
                    continue;
                }
                let Ok(permit) = shared.forwards.clone().try_acquire_owned() else {
                    let _ = sock
                        .send_to(&header_only(query, RCODE::ServerFailure), peer)
                        .await;
                    continue;
                };
                let query = query.to_vec();
                let sock = sock.clone();
                let shared = shared.clone();
                tokio::spawn(async move {
                    let answer = match shared.forward(&query, false, client).await {
                        Some(a) => a,
                        None => header_only(&query, RCODE::ServerFailure),
                    };
                    let _ = sock.send_to(&answer, peer).await;
                    drop(permit);
                });
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
        let client = peer.ip();
        let own = shared.opts.source_upstreams.get(client).is_some();
        let answer = match shared.respond(&query, u16::MAX as usize, client) {
            Outcome::Reply(b) => b,
            Outcome::Forward => match if own { None } else { shared.cached(&query) } {
                Some(a) => a,
                None => match shared.forward(&query, true, client).await {
                    Some(a) => a,
                    None => header_only(&query, RCODE::ServerFailure),
                },
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

    fn query_for(id: u16, name: &str, t: TYPE) -> Vec<u8> {
        let mut p = Packet::new_query(id);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(simple_dns::Question::new(
            simple_dns::Name::new_unchecked(name),
            QTYPE::TYPE(t),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().expect("build query")
    }

    fn q(id: u16, name: &str) -> Vec<u8> {
        query_for(id, name, TYPE::A)
    }

    /// An upstream answer to an A query for `name`: one A record per TTL.
    fn answer(id: u16, name: &str, rcode: RCODE, ttls: &[u32], tc: bool) -> Vec<u8> {
        let mut p = Packet::new_reply(id);
        p.set_flags(PacketFlag::RECURSION_DESIRED | PacketFlag::RECURSION_AVAILABLE);
        if tc {
            p.set_flags(PacketFlag::TRUNCATION);
        }
        *p.rcode_mut() = rcode;
        let qname = simple_dns::Name::new_unchecked(name);
        p.questions.push(simple_dns::Question::new(
            qname.clone(),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        for (i, ttl) in ttls.iter().enumerate() {
            p.answers.push(ResourceRecord::new(
                qname.clone(),
                CLASS::IN,
                *ttl,
                RData::A(A::from(Ipv4Addr::new(192, 0, 2, (i % 250) as u8 + 1))),
            ));
        }
        p.build_bytes_vec_compressed().expect("build answer")
    }

    fn ok(id: u16, name: &str, ttls: &[u32]) -> Vec<u8> {
        answer(id, name, RCODE::NoError, ttls, false)
    }

    /// (id, question name, answer TTLs) of a cached answer.
    fn summary(bytes: &[u8]) -> (u16, String, Vec<u32>) {
        let p = Packet::parse(bytes).expect("parse cached answer");
        (
            p.id(),
            p.questions[0].qname.to_string(),
            p.answers.iter().map(|rr| rr.ttl).collect(),
        )
    }

    fn at(base: Instant, millis: u64) -> Instant {
        base + Duration::from_millis(millis)
    }

    #[test]
    fn cache_hit_has_query_id_and_counted_down_ttls() {
        let base = Instant::now();
        let mut c = DnsCache::new(16);
        c.put(&q(1, "example.com"), &ok(1, "example.com", &[60, 90]), base);
        assert_eq!(c.len(), 1);

        let hit = c.get(&q(2, "example.com"), base).expect("hit");
        assert_eq!(summary(&hit), (2, "example.com".into(), vec![60, 90]));
        let p = Packet::parse(&hit).expect("parse");
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.has_flags(PacketFlag::RESPONSE | PacketFlag::RECURSION_DESIRED));

        // Whole seconds elapsed are subtracted.
        let hit = c.get(&q(3, "example.com"), at(base, 10_500)).expect("hit");
        assert_eq!(summary(&hit), (3, "example.com".into(), vec![50, 80]));

        // Names are case-insensitive; the question comes back as asked.
        let hit = c.get(&q(4, "EXAMPLE.Com"), at(base, 20_000)).expect("hit");
        assert_eq!(summary(&hit), (4, "EXAMPLE.Com".into(), vec![40, 70]));

        // Another type or name is another question.
        assert_eq!(c.get(&query_for(5, "example.com", TYPE::AAAA), base), None);
        assert_eq!(c.get(&q(6, "example.org"), base), None);

        // The RD flag follows the query.
        let mut no_rd = q(7, "example.com");
        no_rd[2] &= !0x01;
        let hit = c.get(&no_rd, base).expect("hit");
        let p = Packet::parse(&hit).expect("parse");
        assert!(!p.has_flags(PacketFlag::RECURSION_DESIRED));
    }

    #[test]
    fn cache_entries_expire_with_their_smallest_ttl_capped_at_5_minutes() {
        let base = Instant::now();
        let mut c = DnsCache::new(16);
        c.put(&q(1, "a.example"), &ok(1, "a.example", &[60, 30]), base);
        let hit = c.get(&q(2, "a.example"), at(base, 29_999)).expect("hit");
        assert_eq!(summary(&hit).2, vec![31, 1]);
        assert_eq!(c.get(&q(3, "a.example"), at(base, 30_000)), None);
        assert!(c.is_empty(), "expired entries are dropped when met");

        c.put(&q(1, "b.example"), &ok(1, "b.example", &[86_400]), base);
        let hit = c.get(&q(2, "b.example"), at(base, 299_000)).expect("hit");
        assert_eq!(summary(&hit).2, vec![86_400 - 299]);
        assert_eq!(c.get(&q(3, "b.example"), at(base, 300_000)), None);

        // A clock going backwards does not underflow.
        c.put(
            &q(1, "c.example"),
            &ok(1, "c.example", &[60]),
            at(base, 5_000),
        );
        let hit = c.get(&q(2, "c.example"), base).expect("hit");
        assert_eq!(summary(&hit).2, vec![60]);

        // A newer answer replaces the entry.
        c.put(
            &q(1, "c.example"),
            &ok(1, "c.example", &[10]),
            at(base, 5_000),
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(&q(2, "c.example"), at(base, 15_000)), None);
    }

    #[test]
    fn cache_keeps_only_positive_complete_answers() {
        let base = Instant::now();
        let mut c = DnsCache::new(16);
        let name = "x.example";
        let query = q(1, name);
        for (what, bad) in [
            ("nxdomain", answer(1, name, RCODE::NameError, &[60], false)),
            (
                "servfail",
                answer(1, name, RCODE::ServerFailure, &[60], false),
            ),
            ("refused", answer(1, name, RCODE::Refused, &[60], false)),
            ("truncated", answer(1, name, RCODE::NoError, &[60], true)),
            ("no answer", ok(1, name, &[])),
            ("ttl 0", ok(1, name, &[60, 0])),
            ("negative ttl", ok(1, name, &[0x8000_0000])),
            ("other id", ok(2, name, &[60])),
            ("other question", ok(1, "y.example", &[60])),
            ("a query, not a response", query.clone()),
        ] {
            c.put(&query, &bad, base);
            assert!(c.is_empty(), "{what} was cached");
            assert_eq!(c.get(&q(3, name), base), None, "{what}");
        }

        // An answer over the size cap (many records) is not kept.
        let many: Vec<u32> = vec![60; 400];
        let big = ok(1, name, &many);
        assert!(big.len() > MAX_CACHED_ANSWER);
        c.put(&query, &big, base);
        assert!(c.is_empty(), "an answer of {} bytes was cached", big.len());

        // Capacity 0 disables the cache.
        let mut off = DnsCache::new(0);
        off.put(&query, &ok(1, name, &[60]), base);
        assert!(off.is_empty());
        assert_eq!(off.get(&query, base), None);
    }

    #[test]
    fn full_cache_drops_expired_then_first_to_expire() {
        let base = Instant::now();
        let mut c = DnsCache::new(2);
        c.put(&q(1, "a"), &ok(1, "a", &[100]), base);
        c.put(&q(1, "b"), &ok(1, "b", &[50]), base);
        // Replacing an entry evicts nothing.
        c.put(&q(1, "b"), &ok(1, "b", &[50]), base);
        assert!(c.get(&q(1, "a"), base).is_some());
        // Full: "b" expires first and goes.
        c.put(&q(1, "c"), &ok(1, "c", &[200]), base);
        assert_eq!(c.len(), 2);
        assert!(c.get(&q(1, "a"), base).is_some());
        assert_eq!(c.get(&q(1, "b"), base), None);
        assert!(c.get(&q(1, "c"), base).is_some());
        // Full again, later: the expired "a" goes, even if "c" were to expire before "d".
        let later = at(base, 150_000);
        c.put(&q(1, "d"), &ok(1, "d", &[10]), later);
        assert_eq!(c.len(), 2);
        assert!(c.get(&q(1, "c"), later).is_some());
        assert!(c.get(&q(1, "d"), later).is_some());
        assert_eq!(c.get(&q(1, "a"), later), None);
    }

    #[test]
    fn cache_never_panics_on_hostile_bytes_and_keeps_none_of_them() {
        let base = Instant::now();
        let mut c = DnsCache::new(64);
        let query = q(7, "h.example");
        let good = ok(7, "h.example", &[60]);

        let mut hostile: Vec<Vec<u8>> = vec![Vec::new(), vec![0], vec![0xff; 11]];
        // Random bytes of many lengths.
        let mut seed = 0x9e37_79b9u32;
        for len in 0..300usize {
            hostile.push(
                (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        (seed & 0xff) as u8
                    })
                    .collect(),
            );
        }
        // Every truncation of a valid query and answer.
        hostile.extend((0..query.len()).map(|n| query[..n].to_vec()));
        hostile.extend((0..good.len()).map(|n| good[..n].to_vec()));
        // Huge section counts with nothing behind them, alone and on a valid message.
        let mut huge = vec![
            0, 7, 0x81, 0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        hostile.push(huge.clone());
        huge.extend_from_slice(&good[12..]);
        hostile.push(huge);
        let mut many_answers = good.clone();
        many_answers[6] = 0xff;
        many_answers[7] = 0xff;
        hostile.push(many_answers);
        // A name that is a compression pointer to itself.
        let mut looped = good[..12].to_vec();
        looped[4..6].copy_from_slice(&[0, 1]);
        looped[6..12].fill(0);
        looped.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        hostile.push(looped);

        for bytes in &hostile {
            c.put(bytes, &good, base);
            c.put(&query, bytes, base);
            c.put(bytes, bytes, base);
            assert_eq!(c.get(bytes, base), None);
        }
        assert!(c.is_empty(), "{} hostile entries cached", c.len());
        assert_eq!(c.get(&query, base), None);

        // And the cache still works.
        c.put(&query, &good, base);
        assert!(c.get(&query, base).is_some());
    }
}
