//! Encrypted tunnel between nodes: a userspace data plane over a TUN device and one UDP
//! socket, sealed with AES-256-GCM (for kernels without WireGuard or ESP).
//!
//! A [`Tunnel`] owns the TUN device `cfg.ifname` (plain `IFF_TUN | IFF_NO_PI`, no offloads) and
//! a UDP socket on `cfg.listen`, both made inside the namespace of the given [`Net`]. Two
//! blocking threads move packets: TUN → seal → UDP to the peer that owns the destination,
//! and UDP → open → checks → TUN. [`Tunnel::set_peers`] routes each peer's blocks
//! `dev <ifname> metric` [`ROUTE_METRIC`] (below the VXLAN overlay's, above a connected
//! route's), so an encrypted block never falls back to the plain overlay.
//!
//! **Wire format** (one UDP datagram per IPv4 packet, [`OVERHEAD`] bytes more than the
//! packet on the underlay):
//!
//! ```text
//! version (1, = 1) | key id (4, BE) | salt (16) | counter (8, BE) | AES-256-GCM(packet) | tag (16)
//! ```
//!
//! The 29-byte header is the AAD; the nonce is 4 zero bytes and the counter. Each sender
//! draws a salt when it starts, when its sealing key changes and after 2^32 packets, and
//! seals with `HKDF-SHA256(ikm = key secret, salt, info = "flotilla tunnel v1")`, so a
//! (subkey, nonce) pair is never used twice. The salt is the sender's wall clock in
//! nanoseconds (8 bytes, BE) and 8 random bytes: the clock orders a sender's salts for the
//! replay defence below, the random half keeps two senders apart.
//!
//! **Receiving**, in order, each failure counted in [`TunnelStats`]: the UDP source must be a
//! peer's `underlay` (address and port; before any crypto); length and version; the key id
//! must be one of the current keys; per (peer, key id) the receiver keeps up to
//! [`SALTS_PER_KEY`] salts with their derived subkey and a 64-packet sliding replay window;
//! when that list is full, a new salt older than all of them is refused (an evicted salt
//! cannot come back), otherwise the oldest goes once the new one authenticates; then the
//! tag; then the inner packet must be IPv4 of the datagram's length, at most `mtu`, and its
//! source must lie in one of the sending peer's `routes` (a node injects only its own
//! tasks' traffic). A key leaving the key set drops its salts and windows.
//!
//! Limits: one UDP datagram per packet (no batching, no GSO); a sender whose clock stepped
//! back below its 8 newest salts for a key is refused until the next key rotation; the
//! destination of an opened packet is left to the kernel's routing and `FORWARD` chain.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ipnet::Ipv4Net;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use rtnetlink::packet_route::route::{RouteMessage, RouteScope};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use crate::error::errno;
use crate::link::{self, validate_ifname};
use crate::route::{main_routes, route_dst, route_oif};
use crate::{Error, Net, Result};

/// Wire format version.
pub const VERSION: u8 = 1;
/// Header length: version, key id, salt, counter.
pub const HEADER_LEN: usize = 1 + 4 + 16 + 8;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Bytes a tunnelled packet adds on the underlay: header, tag, UDP and IPv4 headers. The TUN
/// MTU should be at most the underlay MTU minus this (1427 for 1500).
pub const OVERHEAD: u32 = (HEADER_LEN + TAG_LEN) as u32 + 8 + 20;
/// Metric of the routes through the tunnel: below the VXLAN overlay's
/// ([`crate::overlay::ROUTE_METRIC`]) so an encrypted block never takes the plain path, above a
/// connected route's (0) so a block that becomes local goes to its bridge.
pub const ROUTE_METRIC: u32 = 90;
/// HKDF info of the per-sender subkey.
pub const HKDF_INFO: &[u8] = b"flotilla tunnel v1";
/// Salts (with subkey and replay window) kept per peer and key id.
pub const SALTS_PER_KEY: usize = 8;
/// Packets a sender seals under one salt before drawing a new one.
const SALT_PACKETS: u64 = 1 << 32;
/// Packets the TUN device queues for the sealing worker (the kernel's default of 500 drops
/// bursts of a single TCP stream, and every drop halves its window).
pub const TX_QUEUE_LEN: u32 = 1024;
/// Read buffer: the largest IPv4 packet.
const BUF_LEN: usize = 65536;
/// Replay window width (bits of the bitmap).
const WINDOW: u64 = 64;
/// Smallest IPv4 header.
const IPV4_MIN: usize = 20;

/// A cluster-wide tunnel key, rotated by the leader.
#[derive(Clone, PartialEq, Eq)]
pub struct TunnelKey {
    /// Carried in every packet; picks the key on the receiving side.
    pub id: u32,
    /// The secret the per-sender subkeys are derived from.
    pub secret: [u8; 32],
}

impl std::fmt::Debug for TunnelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Where a tunnel lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    /// TUN device name (at most 15 bytes), e.g. `fltet<tag>`.
    pub ifname: String,
    /// UDP address to bind: the node's underlay address and the tunnel port.
    pub listen: SocketAddrV4,
    /// MTU of the TUN device: at most the underlay MTU minus [`OVERHEAD`].
    pub mtu: u32,
}

/// Another node's end of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPeer {
    /// Its tunnel socket (underlay address and port); the only source accepted for it.
    pub underlay: SocketAddrV4,
    /// The task blocks behind that node: routed to it, and the only inner sources accepted
    /// from it.
    pub routes: Vec<Ipv4Net>,
}

/// Counters of one tunnel since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// Packets sealed and sent.
    pub tx_packets: u64,
    /// Bytes of inner packets sealed and sent.
    pub tx_bytes: u64,
    /// Packets opened and delivered to the TUN device.
    pub rx_packets: u64,
    /// Bytes of inner packets delivered.
    pub rx_bytes: u64,
    /// Outgoing packets to a destination no peer owns (or not IPv4).
    pub dropped_no_route: u64,
    /// Outgoing packets while the key set is empty.
    pub dropped_no_key: u64,
    /// Outgoing datagrams the socket refused.
    pub send_errors: u64,
    /// Incoming datagrams from a source that is no peer (before any crypto).
    pub dropped_unknown_peer: u64,
    /// Incoming datagrams too short, too long, of another version or with a bad inner packet.
    pub dropped_malformed: u64,
    /// Incoming datagrams under a key id that is not in the key set.
    pub dropped_unknown_key: u64,
    /// Incoming datagrams whose tag did not verify (tampered, or a key with that id but
    /// another secret).
    pub dropped_auth: u64,
    /// Incoming datagrams already seen, too old for the window, or of a retired salt.
    pub dropped_replay: u64,
    /// Incoming packets whose inner source is outside the sending peer's routes.
    pub dropped_source: u64,
    /// Opened packets the TUN device refused.
    pub write_errors: u64,
}

impl TunnelStats {
    /// Every incoming datagram refused, whatever the reason.
    pub fn rx_dropped(&self) -> u64 {
        self.dropped_unknown_peer
            + self.dropped_malformed
            + self.dropped_unknown_key
            + self.dropped_auth
            + self.dropped_replay
            + self.dropped_source
    }
}

/// Why an incoming datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    UnknownPeer,
    Malformed,
    UnknownKey,
    Auth,
    Replay,
    Source,
}

// ---------------------------------------------------------------------------------------
// Pure part: keys, sealing, opening.

/// Keys and peers as the workers see them; replaced whole on every change.
#[derive(Debug, Default)]
struct Table {
    keys: Vec<TunnelKey>,
    peers: Vec<TunnelPeer>,
    /// (block, index in `peers`), longest prefix first; the first peer naming a block wins.
    routes: Vec<(Ipv4Net, usize)>,
}

impl Table {
    fn new(keys: Vec<TunnelKey>, peers: Vec<TunnelPeer>) -> Self {
        let mut routes: Vec<(Ipv4Net, usize)> = Vec::new();
        for (i, p) in peers.iter().enumerate() {
            for r in &p.routes {
                if !routes.iter().any(|(n, _)| n == r) {
                    routes.push((*r, i));
                }
            }
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.prefix_len()));
        Self {
            keys,
            peers,
            routes,
        }
    }

    fn peer_for(&self, dst: Ipv4Addr) -> Option<&TunnelPeer> {
        self.routes
            .iter()
            .find(|(n, _)| n.contains(&dst))
            .and_then(|(_, i)| self.peers.get(*i))
    }

    fn peer_at(&self, from: SocketAddrV4) -> Option<&TunnelPeer> {
        self.peers.iter().find(|p| p.underlay == from)
    }

    fn key(&self, id: u32) -> Option<&TunnelKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// The subkey of (`secret`, `salt`).
fn derive(secret: &[u8; 32], salt: &[u8; 16]) -> Option<LessSafeKey> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(secret);
    let okm = prk.expand(&[HKDF_INFO], &AES_256_GCM).ok()?;
    Some(LessSafeKey::new(UnboundKey::from(okm)))
}

/// A fresh salt: wall clock nanoseconds (BE) and 8 random bytes.
pub fn new_salt() -> Result<[u8; 16]> {
    salt_from(&SystemRandom::new())
}

fn salt_from(rng: &SystemRandom) -> Result<[u8; 16]> {
    let mut salt = [0u8; 16];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    salt[..8].copy_from_slice(&now.to_be_bytes());
    rng.fill(&mut salt[8..])
        .map_err(|_| Error::Crypto("no random bytes for a tunnel salt".into()))?;
    Ok(salt)
}

fn salt_time(salt: &[u8; 16]) -> u64 {
    let mut t = [0u8; 8];
    t.copy_from_slice(&salt[..8]);
    u64::from_be_bytes(t)
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// One sender's sealing state under one key and salt.
struct Sealer {
    key_id: u32,
    secret: [u8; 32],
    salt: [u8; 16],
    counter: u64,
    key: LessSafeKey,
}

impl Sealer {
    fn new(key: &TunnelKey, salt: [u8; 16]) -> Result<Self> {
        Ok(Self {
            key_id: key.id,
            secret: key.secret,
            salt,
            counter: 0,
            key: derive(&key.secret, &salt)
                .ok_or_else(|| Error::Crypto("hkdf expand failed".into()))?,
        })
    }

    fn is_for(&self, key: &TunnelKey) -> bool {
        self.key_id == key.id && self.secret == key.secret
    }

    fn exhausted(&self) -> bool {
        self.counter >= SALT_PACKETS
    }

    /// Seals the `len` bytes at `buf[HEADER_LEN..]` in place: writes the header before and
    /// the tag after them; returns the datagram length, or `None` if `buf` is too short.
    fn seal(&mut self, buf: &mut [u8], len: usize) -> Option<usize> {
        let total = HEADER_LEN + len + TAG_LEN;
        if buf.len() < total || self.exhausted() {
            return None;
        }
        let counter = self.counter;
        self.counter += 1;
        let (hdr, rest) = buf.split_at_mut(HEADER_LEN);
        hdr[0] = VERSION;
        hdr[1..5].copy_from_slice(&self.key_id.to_be_bytes());
        hdr[5..21].copy_from_slice(&self.salt);
        hdr[21..29].copy_from_slice(&counter.to_be_bytes());
        let (body, tail) = rest.split_at_mut(len);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&*hdr), body)
            .ok()?;
        tail[..TAG_LEN].copy_from_slice(tag.as_ref());
        Some(total)
    }
}

/// Seals one inner packet as a tunnel with `key`, `salt` and `counter` would (tests and
/// diagnostics). Never seal two packets with the same key, salt and counter.
pub fn seal_packet(key: &TunnelKey, salt: [u8; 16], counter: u64, inner: &[u8]) -> Result<Vec<u8>> {
    let mut s = Sealer::new(key, salt)?;
    s.counter = counter;
    let mut buf = vec![0u8; HEADER_LEN + inner.len() + TAG_LEN];
    buf[HEADER_LEN..HEADER_LEN + inner.len()].copy_from_slice(inner);
    let n = s
        .seal(&mut buf, inner.len())
        .ok_or_else(|| Error::Invalid(format!("counter {counter} beyond 2^32")))?;
    buf.truncate(n);
    Ok(buf)
}

/// 64-packet sliding replay window.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    /// Highest counter seen plus one; 0 when nothing was seen.
    top: u64,
    /// Bit i: counter `top - 1 - i` was seen.
    bits: u64,
}

impl Window {
    fn fresh(&self, c: u64) -> bool {
        if c >= self.top {
            return true;
        }
        let d = self.top - 1 - c;
        d < WINDOW && self.bits & (1 << d) == 0
    }

    fn mark(&mut self, c: u64) {
        if c >= self.top {
            let shift = c + 1 - self.top;
            self.bits = if shift >= WINDOW {
                0
            } else {
                self.bits << shift
            };
            self.bits |= 1;
            self.top = c + 1;
        } else {
            self.bits |= 1 << (self.top - 1 - c);
        }
    }
}

/// What a receiver keeps per salt of a peer: the derived subkey and the replay window.
struct SaltRx {
    key_id: u32,
    salt: [u8; 16],
    key: LessSafeKey,
    window: Window,
}

/// The receiving side's state, kept across table changes.
#[derive(Default)]
struct Opener {
    peers: HashMap<SocketAddrV4, Vec<SaltRx>>,
}

impl Opener {
    /// Forgets the salts of keys no longer in `table`.
    fn retain_keys(&mut self, table: &Table) {
        for salts in self.peers.values_mut() {
            salts.retain(|s| table.key(s.key_id).is_some());
        }
        self.peers.retain(|_, s| !s.is_empty());
    }

    /// Opens the datagram `pkt` received from `from` in place; returns the inner packet's
    /// range in `pkt`.
    fn open(
        &mut self,
        table: &Table,
        from: SocketAddrV4,
        pkt: &mut [u8],
        mtu: usize,
    ) -> std::result::Result<Range<usize>, Refused> {
        let peer = table.peer_at(from).ok_or(Refused::UnknownPeer)?;
        if pkt.len() < HEADER_LEN + IPV4_MIN + TAG_LEN || pkt.len() > HEADER_LEN + mtu + TAG_LEN {
            return Err(Refused::Malformed);
        }
        if pkt[0] != VERSION {
            return Err(Refused::Malformed);
        }
        let mut b4 = [0u8; 4];
        b4.copy_from_slice(&pkt[1..5]);
        let key_id = u32::from_be_bytes(b4);
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&pkt[5..21]);
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(&pkt[21..29]);
        let counter = u64::from_be_bytes(b8);
        if counter >= SALT_PACKETS {
            return Err(Refused::Malformed);
        }
        let secret = table.key(key_id).ok_or(Refused::UnknownKey)?.secret;
        let salts = self.peers.entry(from).or_default();
        let known = salts
            .iter()
            .position(|s| s.key_id == key_id && s.salt == salt);
        let (hdr, body) = pkt.split_at_mut(HEADER_LEN);
        let plain_len = match known {
            Some(i) => {
                let s = &mut salts[i];
                if !s.window.fresh(counter) {
                    return Err(Refused::Replay);
                }
                let plain = s
                    .key
                    .open_in_place(nonce(counter), Aad::from(&*hdr), body)
                    .map_err(|_| Refused::Auth)?;
                let n = plain.len();
                s.window.mark(counter);
                n
            }
            None => {
                let same_key = || salts.iter().filter(|s| s.key_id == key_id);
                let full = same_key().count() >= SALTS_PER_KEY;
                let t = salt_time(&salt);
                if full && same_key().all(|s| salt_time(&s.salt) >= t) {
                    // older than every salt kept: possibly one evicted before
                    return Err(Refused::Replay);
                }
                let key = derive(&secret, &salt).ok_or(Refused::Auth)?;
                let n = key
                    .open_in_place(nonce(counter), Aad::from(&*hdr), body)
                    .map_err(|_| Refused::Auth)?
                    .len();
                if full {
                    if let Some(oldest) = salts
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.key_id == key_id)
                        .min_by_key(|(_, s)| salt_time(&s.salt))
                        .map(|(i, _)| i)
                    {
                        salts.swap_remove(oldest);
                    }
                }
                let mut window = Window::default();
                window.mark(counter);
                salts.push(SaltRx {
                    key_id,
                    salt,
                    key,
                    window,
                });
                n
            }
        };
        let inner = HEADER_LEN..HEADER_LEN + plain_len;
        check_inner(&pkt[inner.clone()], peer, mtu)?;
        Ok(inner)
    }
}

/// The opened packet must be IPv4 of its stated length, at most `mtu`, from the peer's
/// blocks.
fn check_inner(p: &[u8], peer: &TunnelPeer, mtu: usize) -> std::result::Result<(), Refused> {
    if p.len() < IPV4_MIN
        || p.len() > mtu
        || p[0] >> 4 != 4
        || usize::from(p[0] & 0xf) * 4 < IPV4_MIN
    {
        return Err(Refused::Malformed);
    }
    if usize::from(u16::from_be_bytes([p[2], p[3]])) != p.len() {
        return Err(Refused::Malformed);
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    if !peer.routes.iter().any(|r| r.contains(&src)) {
        return Err(Refused::Source);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// I/O: the TUN device, the workers, routes.

#[allow(unsafe_code)]
mod tun {
    use std::fs::{File, OpenOptions};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    use crate::{Error, Result};

    /// `struct ifreq` as TUNSETIFF reads it: the name, the flags, the rest of the union.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }

    /// Opens `/dev/net/tun` (non-blocking) and attaches it to TUN device `name` in the
    /// calling thread's network namespace, creating it if needed; the device is not
    /// persistent, so it goes when the file is closed. `name` must be validated (1-15 bytes).
    pub(super) fn open(name: &str) -> Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| Error::io("open /dev/net/tun", e))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        // SAFETY: `f` is an open /dev/net/tun file; TUNSETIFF reads and writes back a
        // `struct ifreq`, whose 40 bytes `IfReq` covers with the same layout (16-byte
        // NUL-terminated name, short flags, union padding); `req` lives across the call.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF as _, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(Error::io(
                format!("TUNSETIFF {name}"),
                std::io::Error::last_os_error(),
            ));
        }
        // A device left persistent (by `ip tuntap add`) would outlive the tunnel.
        // SAFETY: TUNSETPERSIST takes an integer argument, no memory is passed.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETPERSIST as _, 0 as libc::c_ulong) };
        if r < 0 {
            return Err(Error::io(
                format!("TUNSETPERSIST {name}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(f)
    }
}

/// Counters written by one worker, on their own cache line.
#[derive(Default)]
#[repr(align(64))]
struct Counters([AtomicU64; 8]);

impl Counters {
    fn add(&self, i: usize, n: u64) {
        self.0[i].fetch_add(n, Ordering::Relaxed);
    }
    fn get(&self, i: usize) -> u64 {
        self.0[i].load(Ordering::Relaxed)
    }
}

// tx counters
const TX_PACKETS: usize = 0;
const TX_BYTES: usize = 1;
const TX_NO_ROUTE: usize = 2;
const TX_NO_KEY: usize = 3;
const TX_SEND_ERR: usize = 4;
// rx counters
const RX_PACKETS: usize = 0;
const RX_BYTES: usize = 1;
const RX_WRITE_ERR: usize = 2;

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    generation: AtomicU64,
    table: Mutex<Arc<Table>>,
    tx: Counters,
    rx: Counters,
    refused: Counters,
}

impl Shared {
    fn table(&self) -> Arc<Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&Table) -> Table) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        *t = Arc::new(f(&t));
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn refuse(&self, r: Refused) {
        self.refused.add(r as usize, 1);
    }
}

/// A running tunnel. Dropping it stops the workers and removes the TUN device (and with it
/// its routes).
pub struct Tunnel {
    ifname: String,
    shared: Arc<Shared>,
    sock: Arc<UdpSocket>,
    wake: std::io::PipeWriter,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("ifname", &self.ifname)
            .field("listen", &self.sock.local_addr().ok())
            .finish()
    }
}

impl Tunnel {
    /// Creates (or re-uses) the TUN device `cfg.ifname` in the namespace of `net`, sets its
    /// MTU and brings it up, binds the UDP socket there and starts the two workers. The
    /// first key seals; `keys` must not be empty.
    pub async fn start(net: &Net, cfg: TunnelConfig, keys: Vec<TunnelKey>) -> Result<Tunnel> {
        validate_ifname(&cfg.ifname)?;
        if !(576..=65535 - OVERHEAD).contains(&cfg.mtu) {
            return Err(Error::Invalid(format!(
                "tunnel mtu {} (576 to {})",
                cfg.mtu,
                65535 - OVERHEAD
            )));
        }
        if keys.is_empty() {
            return Err(Error::Invalid("a tunnel needs at least one key".into()));
        }
        let name = cfg.ifname.clone();
        let listen = cfg.listen;
        let (tun, sock) = net
            .run(move || -> Result<(File, UdpSocket)> {
                let tun = tun::open(&name)?;
                let sock = UdpSocket::bind(listen)
                    .map_err(|e| Error::io(format!("bind tunnel socket {listen}"), e))?;
                Ok((tun, sock))
            })
            .await??;
        // Room for bursts (best effort: the force options need CAP_NET_ADMIN).
        let _ =
            nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &(4 << 20));
        let _ =
            nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SndBufForce, &(4 << 20));
        // Backstop for the stop signal (a datagram to itself, see Drop).
        sock.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| Error::io("set tunnel socket timeout", e))?;
        let idx = link::index(net, &cfg.ifname)
            .await?
            .ok_or_else(|| Error::LinkNotFound(cfg.ifname.clone()))?;
        net.handle()
            .link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .mtu(cfg.mtu)
                    .txqueuelen(TX_QUEUE_LEN)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("set {} mtu {} up", cfg.ifname, cfg.mtu), e))?;

        let (wake_rx, wake_tx) =
            std::io::pipe().map_err(|e| Error::io("create tunnel wake pipe", e))?;
        let shared = Arc::new(Shared::default());
        shared.update(|_| Table::new(keys, Vec::new()));
        let tun = Arc::new(tun);
        let sock = Arc::new(sock);
        let mtu = cfg.mtu as usize;
        let mut workers = Vec::new();
        {
            let (shared, tun, sock) = (shared.clone(), tun.clone(), sock.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("{}-tx", cfg.ifname))
                    .spawn(move || tx_loop(&shared, &tun, &sock, &wake_rx))
                    .map_err(|e| Error::io("spawn tunnel worker", e))?,
            );
        }
        {
            let (sh, tun, so) = (shared.clone(), tun.clone(), sock.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("{}-rx", cfg.ifname))
                .spawn(move || rx_loop(&sh, &tun, &so, mtu));
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    let _ = Tunnel {
                        ifname: cfg.ifname.clone(),
                        shared,
                        sock,
                        wake: wake_tx,
                        workers,
                    };
                    return Err(Error::io("spawn tunnel worker", e));
                }
            }
        }
        tracing::debug!(tunnel = %cfg.ifname, listen = %cfg.listen, mtu = cfg.mtu, "tunnel started");
        Ok(Tunnel {
            ifname: cfg.ifname,
            shared,
            sock,
            wake: wake_tx,
            workers,
        })
    }

    /// The TUN device's name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Replaces the peer table, then converges the kernel routes `<block> dev <ifname>
    /// metric` [`ROUTE_METRIC`] to every peer's routes: adds the missing ones, removes the
    /// device's others, leaves the rest alone. A packet to a destination no peer owns is
    /// dropped; a block named by two peers goes to the first.
    pub async fn set_peers(&self, net: &Net, peers: &[TunnelPeer]) -> Result<()> {
        let peers: Vec<TunnelPeer> = peers
            .iter()
            .map(|p| TunnelPeer {
                underlay: p.underlay,
                routes: p.routes.iter().map(|r| r.trunc()).collect(),
            })
            .collect();
        let want: Vec<Ipv4Net> = {
            let mut w: Vec<Ipv4Net> = peers.iter().flat_map(|p| p.routes.clone()).collect();
            w.sort();
            w.dedup();
            w
        };
        self.shared
            .update(|t| Table::new(t.keys.clone(), peers.clone()));

        let idx = link::index(net, &self.ifname)
            .await?
            .ok_or_else(|| Error::LinkNotFound(self.ifname.clone()))?;
        let h = net.handle();
        let have: Vec<RouteMessage> = main_routes(net)
            .await?
            .into_iter()
            .filter(|r| route_oif(r) == Some(idx))
            .collect();
        for dst in &want {
            if have.iter().any(|r| route_dst(r) == Some(*dst)) {
                continue;
            }
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .output_interface(idx)
                .scope(RouteScope::Link)
                .priority(ROUTE_METRIC)
                .build();
            h.route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(|e| Error::netlink(format!("route {dst} dev {}", self.ifname), e))?;
        }
        for r in have {
            let Some(dst) = route_dst(&r) else { continue };
            if want.contains(&dst) {
                continue;
            }
            match h.route().del(r).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::ESRCH) => {}
                Err(e) => {
                    return Err(Error::netlink(
                        format!("delete route {dst} dev {}", self.ifname),
                        e,
                    ))
                }
            }
        }
        tracing::debug!(tunnel = %self.ifname, peers = peers.len(), routes = want.len(), "tunnel peers set");
        Ok(())
    }

    /// Replaces the keys: the first seals new packets (a new salt is drawn when it changes),
    /// any of them opens incoming ones. With no key, nothing is sent or accepted.
    pub fn set_keys(&self, keys: Vec<TunnelKey>) {
        self.shared.update(|t| Table::new(keys, t.peers.clone()));
    }

    /// The counters so far.
    pub fn stats(&self) -> TunnelStats {
        let (tx, rx, rf) = (&self.shared.tx, &self.shared.rx, &self.shared.refused);
        TunnelStats {
            tx_packets: tx.get(TX_PACKETS),
            tx_bytes: tx.get(TX_BYTES),
            rx_packets: rx.get(RX_PACKETS),
            rx_bytes: rx.get(RX_BYTES),
            dropped_no_route: tx.get(TX_NO_ROUTE),
            dropped_no_key: tx.get(TX_NO_KEY),
            send_errors: tx.get(TX_SEND_ERR),
            dropped_unknown_peer: rf.get(Refused::UnknownPeer as usize),
            dropped_malformed: rf.get(Refused::Malformed as usize),
            dropped_unknown_key: rf.get(Refused::UnknownKey as usize),
            dropped_auth: rf.get(Refused::Auth as usize),
            dropped_replay: rf.get(Refused::Replay as usize),
            dropped_source: rf.get(Refused::Source as usize),
            write_errors: rx.get(RX_WRITE_ERR),
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The TUN reader polls this pipe; the UDP reader gets a datagram from itself (its
        // read timeout is the backstop).
        let _ = self.wake.write_all(&[1]);
        if let Ok(SocketAddr::V4(mut me)) = self.sock.local_addr() {
            if me.ip().is_unspecified() {
                me.set_ip(Ipv4Addr::LOCALHOST);
            }
            let _ = self.sock.send_to(&[], me);
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        tracing::debug!(tunnel = %self.ifname, "tunnel stopped");
        // The TUN file closes with the last Arc (the workers' are gone): the device goes.
    }
}

/// TUN → seal → UDP.
fn tx_loop(shared: &Shared, tun: &File, sock: &UdpSocket, wake: &std::io::PipeReader) {
    let rng = SystemRandom::new();
    let mut buf = vec![0u8; BUF_LEN];
    let mut generation = shared.generation.load(Ordering::Acquire);
    let mut table = shared.table();
    let mut sealer: Option<Sealer> = None;
    let mut reader = tun;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let n = match reader.read(&mut buf[HEADER_LEN..BUF_LEN - TAG_LEN]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                let mut fds = [
                    PollFd::new(tun.as_fd(), PollFlags::POLLIN),
                    PollFd::new(wake.as_fd(), PollFlags::POLLIN),
                ];
                let _ = poll(&mut fds, PollTimeout::NONE);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "tunnel: reading the tun device failed, stopping");
                return;
            }
        };
        let g = shared.generation.load(Ordering::Acquire);
        if g != generation {
            generation = g;
            table = shared.table();
        }
        let pkt = &buf[HEADER_LEN..HEADER_LEN + n];
        if n < IPV4_MIN || pkt[0] >> 4 != 4 {
            shared.tx.add(TX_NO_ROUTE, 1);
            continue;
        }
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        let Some(to) = table.peer_for(dst).map(|p| p.underlay) else {
            shared.tx.add(TX_NO_ROUTE, 1);
            continue;
        };
        let Some(first) = table.keys.first() else {
            shared.tx.add(TX_NO_KEY, 1);
            continue;
        };
        let s = match &mut sealer {
            Some(s) if s.is_for(first) && !s.exhausted() => s,
            _ => {
                let made = salt_from(&rng).and_then(|salt| Sealer::new(first, salt));
                match made {
                    Ok(s) => sealer.insert(s),
                    Err(e) => {
                        tracing::error!(error = %e, "tunnel: cannot make a sealing key");
                        shared.tx.add(TX_NO_KEY, 1);
                        continue;
                    }
                }
            }
        };
        let Some(total) = s.seal(&mut buf, n) else {
            shared.tx.add(TX_NO_KEY, 1);
            continue;
        };
        match sock.send_to(&buf[..total], to) {
            Ok(_) => {
                shared.tx.add(TX_PACKETS, 1);
                shared.tx.add(TX_BYTES, n as u64);
            }
            Err(_) => shared.tx.add(TX_SEND_ERR, 1),
        }
    }
}

/// UDP → open → TUN.
fn rx_loop(shared: &Shared, tun: &File, sock: &UdpSocket, mtu: usize) {
    let mut buf = vec![0u8; BUF_LEN];
    let mut generation = shared.generation.load(Ordering::Acquire);
    let mut table = shared.table();
    let mut opener = Opener::default();
    let mut writer = tun;
    loop {
        let got = sock.recv_from(&mut buf);
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let (n, from) = match got {
            Ok((n, SocketAddr::V4(from))) => (n, from),
            Ok(_) => {
                shared.refuse(Refused::UnknownPeer);
                continue;
            }
            // timeouts (the stop backstop), ICMP errors, interrupts
            Err(_) => continue,
        };
        let g = shared.generation.load(Ordering::Acquire);
        if g != generation {
            generation = g;
            table = shared.table();
            opener.retain_keys(&table);
        }
        match opener.open(&table, from, &mut buf[..n], mtu) {
            Ok(r) => {
                let len = r.len();
                // one write is one packet: all or nothing
                match writer.write(&buf[r]) {
                    Ok(n) if n == len => {
                        shared.rx.add(RX_PACKETS, 1);
                        shared.rx.add(RX_BYTES, len as u64);
                    }
                    Ok(_) | Err(_) => shared.rx.add(RX_WRITE_ERR, 1),
                }
            }
            Err(why) => shared.refuse(why),
        }
    }
}

/// The blocks routed through device `ifname` (main table), sorted (diagnostics, tests).
pub async fn routes(net: &Net, ifname: &str) -> Result<Vec<Ipv4Net>> {
    let Some(idx) = link::index(net, ifname).await? else {
        return Ok(Vec::new());
    };
    let mut out: Vec<Ipv4Net> = main_routes(net)
        .await?
        .iter()
        .filter(|r| route_oif(r) == Some(idx))
        .filter_map(route_dst)
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: usize = 1420;

    fn key(id: u32, b: u8) -> TunnelKey {
        TunnelKey {
            id,
            secret: [b; 32],
        }
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().expect("addr")
    }

    fn peer_a() -> TunnelPeer {
        TunnelPeer {
            underlay: addr("192.0.2.1:5000"),
            routes: vec!["10.1.0.0/24".parse().expect("net")],
        }
    }

    fn table(keys: Vec<TunnelKey>) -> Table {
        Table::new(keys, vec![peer_a()])
    }

    /// An IPv4 packet (UDP, no checksum care) from `src` to `dst` with `payload`.
    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let len = 20 + payload.len();
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p.extend_from_slice(payload);
        p
    }

    fn inner() -> Vec<u8> {
        ipv4([10, 1, 0, 2], [10, 2, 0, 2], b"SECRET-BODY")
    }

    fn salt(t: u64) -> [u8; 16] {
        let mut s = [7u8; 16];
        s[..8].copy_from_slice(&t.to_be_bytes());
        s
    }

    fn open(
        o: &mut Opener,
        t: &Table,
        from: &str,
        pkt: &[u8],
    ) -> std::result::Result<Vec<u8>, Refused> {
        let mut b = pkt.to_vec();
        let r = o.open(t, addr(from), &mut b, MTU)?;
        Ok(b[r].to_vec())
    }

    #[test]
    fn seal_then_open() {
        let k = key(1, 1);
        let t = table(vec![k.clone()]);
        let mut o = Opener::default();
        let p = seal_packet(&k, salt(1), 0, &inner()).expect("seal");
        assert_eq!(p.len(), inner().len() + HEADER_LEN + TAG_LEN);
        assert_eq!(p[0], VERSION);
        assert!(!p.windows(11).any(|w| w == b"SECRET-BODY"), "ciphertext");
        assert_eq!(open(&mut o, &t, "192.0.2.1:5000", &p), Ok(inner()));
        // the sealer's own path: header in front, tag behind, counter advancing
        let mut s = Sealer::new(&k, salt(2)).expect("sealer");
        for c in 0..3u64 {
            let mut buf = vec![0u8; 200];
            let n = inner().len();
            buf[HEADER_LEN..HEADER_LEN + n].copy_from_slice(&inner());
            let total = s.seal(&mut buf, n).expect("seal");
            assert_eq!(&buf[21..29], &c.to_be_bytes());
            assert_eq!(
                open(&mut o, &t, "192.0.2.1:5000", &buf[..total]),
                Ok(inner())
            );
        }
    }

    #[test]
    fn unknown_source_refused_before_crypto() {
        let k = key(1, 1);
        let t = table(vec![k.clone()]);
        let mut o = Opener::default();
        let p = seal_packet(&k, salt(1), 0, &inner()).expect("seal");
        // same address, other port
        assert_eq!(
            open(&mut o, &t, "192.0.2.1:5001", &p),
            Err(Refused::UnknownPeer)
        );
        assert_eq!(
            open(&mut o, &t, "192.0.2.9:5000", &[0u8; 3]),
            Err(Refused::UnknownPeer)
        );
        assert!(o.peers.is_empty(), "no state for strangers");
    }

    #[test]
    fn short_long_and_wrong_version() {
        let k = key(1, 1);
        let t = table(vec![k.clone()]);
        let mut o = Opener::default();
        let from = "192.0.2.1:5000";
        for n in [
            0,
            1,
            HEADER_LEN,
            HEADER_LEN + TAG_LEN,
            HEADER_LEN + TAG_LEN + 19,
        ] {
            assert_eq!(
                open(&mut o, &t, from, &vec![VERSION; n]),
                Err(Refused::Malformed),
                "{n}"
            );
        }
        let big = ipv4([10, 1, 0, 2], [10, 2, 0, 2], &vec![0u8; MTU]);
        let p = seal_packet(&k, salt(1), 0, &big).expect("seal");
        assert_eq!(
            open(&mut o, &t, from, &p),
            Err(Refused::Malformed),
            "over mtu"
        );
        let mut p = seal_packet(&k, salt(1), 1, &inner()).expect("seal");
        p[0] = 2;
        assert_eq!(
            open(&mut o, &t, from, &p),
            Err(Refused::Malformed),
            "version"
        );
        // a counter past 2^32 is never sent
        let p = seal_packet(&k, salt(1), 1 << 33, &inner());
        assert!(p.is_err());
    }

    #[test]
    fn unknown_key_and_wrong_secret() {
        let t = table(vec![key(1, 1)]);
        let mut o = Opener::default();
        let from = "192.0.2.1:5000";
        let p = seal_packet(&key(2, 1), salt(1), 0, &inner()).expect("seal");
        assert_eq!(open(&mut o, &t, from, &p), Err(Refused::UnknownKey));
        let p = seal_packet(&key(1, 9), salt(1), 0, &inner()).expect("seal");
        assert_eq!(open(&mut o, &t, from, &p), Err(Refused::Auth));
        assert!(
            o.peers.get(&addr(from)).is_none_or(|s| s.is_empty()),
            "nothing kept"
        );
    }

    #[test]
    fn tampering_anywhere_fails() {
        let k = key(1, 1);
        let t = table(vec![k.clone()]);
        let from = "192.0.2.1:5000";
        let good = seal_packet(&k, salt(1), 5, &inner()).expect("seal");
        for i in 0..good.len() {
            if i == 0 || (1..5).contains(&i) {
                continue; // version and key id: refused earlier, as tested above
            }
            let mut o = Opener::default();
            let mut p = good.clone();
            p[i] ^= 0x01;
            let r = open(&mut o, &t, from, &p);
            assert!(
                matches!(r, Err(Refused::Auth) | Err(Refused::Malformed)),
                "byte {i}: {r:?}"
            );
        }
        // and the key id: another id that exists with the same secret still fails
        let t2 = table(vec![k.clone(), key(0x0100_0001, 1)]);
        let mut p = good.clone();
        p[1] ^= 0x01;
        assert_eq!(
            open(&mut Opener::default(), &t2, from, &p),
            Err(Refused::Auth)
        );
        assert_eq!(open(&mut Opener::default(), &t, from, &good), Ok(inner()));
    }

    #[test]
    fn replays_refused() {
        let k = key(1, 1);
        let t = table(vec![k.clone()]);
        let mut o = Opener::default();
        let from = "192.0.2.1:5000";
        let pk = |c| seal_packet(&k, salt(1), c, &inner()).expect("seal");
        assert!(open(&mut o, &t, from, &pk(10)).is_ok());
        assert_eq!(open(&mut o, &t, from, &pk(10)), Err(Refused::Replay));
        // out of order inside the window is fine, once
        assert!(open(&mut o, &t, from, &pk(3)).is_ok());
        assert_eq!(open(&mut o, &t, from, &pk(3)), Err(Refused::Replay));
        assert!(open(&mut o, &t, from, &pk(100)).is_ok());
        // 100 - 36 = 64: just outside the window
        assert_eq!(open(&mut o, &t, from, &pk(36)), Err(Refused::Replay));
        assert!(open(&mut o, &t, from, &pk(37)).is_ok());
        assert_eq!(open(&mut o, &t, from, &pk(37)), Err(Refused::Replay));
    }

    #[test]
    fn evicted_salts_do_not_come_back() {
        let k = key(1, 1);
        let t = table(vec![k.clone()]);
        let mut o = Opener::default();
        let from = "192.0.2.1:5000";
        let old = seal_packet(&k, salt(1), 0, &inner()).expect("seal");
        assert!(open(&mut o, &t, from, &old).is_ok());
        for s in 2..=(SALTS_PER_KEY as u64 + 1) {
            let p = seal_packet(&k, salt(s), 0, &inner()).expect("seal");
            assert!(open(&mut o, &t, from, &p).is_ok(), "salt {s}");
        }
        assert_eq!(o.peers[&addr(from)].len(), SALTS_PER_KEY);
        // salt 1 was evicted: its packets are not fresh again
        assert_eq!(open(&mut o, &t, from, &old), Err(Refused::Replay));
        let older = seal_packet(&k, salt(0), 1, &inner()).expect("seal");
        assert_eq!(open(&mut o, &t, from, &older), Err(Refused::Replay));
        // a newer salt (a restarted sender) is fine
        let newer = seal_packet(&k, salt(1000), 0, &inner()).expect("seal");
        assert!(open(&mut o, &t, from, &newer).is_ok());
        // a key leaving the set drops its salts
        o.retain_keys(&table(vec![key(2, 2)]));
        assert!(o.peers.is_empty());
    }

    #[test]
    fn inner_source_must_be_the_peers() {
        let k = key(1, 1);
        let t = table(vec![k.clone()]);
        let mut o = Opener::default();
        let from = "192.0.2.1:5000";
        let spoofed = ipv4([10, 2, 0, 7], [10, 2, 0, 2], b"x");
        let p = seal_packet(&k, salt(1), 0, &spoofed).expect("seal");
        assert_eq!(open(&mut o, &t, from, &p), Err(Refused::Source));
        // not IPv4, or a length that does not match
        let mut v6 = inner();
        v6[0] = 0x60;
        let p = seal_packet(&k, salt(1), 1, &v6).expect("seal");
        assert_eq!(open(&mut o, &t, from, &p), Err(Refused::Malformed));
        let mut bad_len = inner();
        bad_len[3] = bad_len[3].wrapping_add(1);
        let p = seal_packet(&k, salt(1), 2, &bad_len).expect("seal");
        assert_eq!(open(&mut o, &t, from, &p), Err(Refused::Malformed));
    }

    #[test]
    fn table_longest_prefix_first_peer_wins() {
        let p1 = TunnelPeer {
            underlay: addr("192.0.2.1:1"),
            routes: vec!["10.0.0.0/16".parse().expect("net")],
        };
        let p2 = TunnelPeer {
            underlay: addr("192.0.2.2:1"),
            routes: vec![
                "10.0.5.0/24".parse().expect("net"),
                "10.0.0.0/16".parse().expect("net"),
            ],
        };
        let t = Table::new(vec![], vec![p1.clone(), p2.clone()]);
        assert_eq!(t.peer_for(Ipv4Addr::new(10, 0, 5, 1)), Some(&p2));
        assert_eq!(t.peer_for(Ipv4Addr::new(10, 0, 6, 1)), Some(&p1));
        assert_eq!(t.peer_for(Ipv4Addr::new(10, 1, 0, 1)), None);
    }

    #[test]
    fn window_edges() {
        let mut w = Window::default();
        assert!(w.fresh(0));
        w.mark(0);
        assert!(!w.fresh(0));
        w.mark(200);
        assert!(!w.fresh(136));
        assert!(w.fresh(137));
        assert!(!w.fresh(200));
        assert!(w.fresh(201));
    }

    #[test]
    fn key_debug_hides_the_secret() {
        let s = format!("{:?}", key(3, 0xab));
        assert!(!s.contains("171") && s.contains("redacted"), "{s}");
    }
}
