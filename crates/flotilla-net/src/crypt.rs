//! Encrypted tunnel between nodes: a userspace data plane over a TUN device and one UDP
//! socket, sealed with AES-256-GCM (for kernels without WireGuard or ESP).
//!
//! A [`Tunnel`] owns the TUN device `cfg.ifname` and a UDP socket on `cfg.listen`, both made
//! inside the namespace of the given [`Net`]. Two blocking threads move packets: TUN → seal →
//! UDP to the peer that owns the destination, and UDP → open → checks → TUN.
//! [`Tunnel::set_peers`] routes each peer's blocks `dev <ifname> metric` [`ROUTE_METRIC`]
//! (below the VXLAN overlay's, above a connected route's), so an encrypted block never falls
//! back to the plain overlay.
//!
//! **Offloads.** The TUN device is opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD` (checksum
//! and TCPv4 segmentation offload), so the kernel hands the tunnel whole TCP segments of up to
//! 64 KiB, each behind a 10-byte `virtio_net_hdr` (little endian, `TUNSETVNETLE`) that says
//! how to segment it and where its checksum goes. One such packet, header included, is sealed
//! as one message; the message is cut into fragments of one underlay datagram each and sent
//! with UDP segmentation offload (`UDP_SEGMENT`), so the whole message crosses the sending
//! node's stack as one buffer; the receiving socket asks for UDP receive offload (`UDP_GRO`)
//! and gets the fragments back in one read. The opened message is written to the TUN device
//! as it came, header and all, and the kernel segments it only where it has to (at a
//! device that cannot take it whole).
//!
//! **Wire format** (one UDP datagram per fragment):
//!
//! ```text
//! version (1, = 2) | key id (4, BE) | salt (16) | counter (8, BE) | count (1) | chunk (2, BE)
//!   | index (1) | bytes [index * chunk, index * chunk + chunk) of the sealed message
//! sealed message = AES-256-GCM(virtio_net_hdr (10) | IPv4 packet) | tag (16)
//! ```
//!
//! Every fragment but the last carries exactly `chunk` bytes. The first 32 header bytes (all
//! but the index) are the AAD; a fragment put at the wrong index garbles the message and fails
//! the tag. The nonce is 4 zero bytes and the counter, one per message. Each sender draws a
//! salt when it starts, when its sealing key changes and after 2^32 messages, and seals with
//! `HKDF-SHA256(ikm = key secret, salt, info = "flotilla tunnel v1")`, so a (subkey, nonce)
//! pair is never used twice. The salt is the sender's wall clock in nanoseconds (8 bytes, BE)
//! and 8 random bytes: the clock orders a sender's salts for the replay defence below, the
//! random half keeps two senders apart. A full-size datagram carries [`OVERHEAD`] bytes more
//! than the largest packet that fits it unfragmented, so the TUN MTU is the underlay's minus
//! that.
//!
//! **Receiving**, in order, each failure counted in [`TunnelStats`]: the UDP source must be a
//! peer's `underlay` (address and port; before any crypto); the fragment's header must be
//! well-formed (version, count at most [`MAX_FRAGMENTS`], index below count, chunk at least
//! [`MIN_CHUNK`], a length that fits the message, which is at most 64 KiB); the key id must
//! be one of the current keys; a counter the replay window already refuses is dropped before
//! reassembly. Fragments are gathered per peer in at most [`PARTIALS_PER_PEER`] messages (the
//! oldest is dropped for a new one: a lost fragment costs its message, and TCP resends it).
//! Per (peer, key id) the receiver keeps up to [`SALTS_PER_KEY`] salts with their derived
//! subkey and a 64-message sliding replay window; when that list is full, a new salt older
//! than all of them is refused (an evicted salt cannot come back), otherwise the oldest goes
//! once the new one authenticates; then the tag; then the opened message: a
//! `virtio_net_hdr` asking only for what the kernel hands out here (checksum offsets inside
//! the packet, TCPv4 segmentation with segments within `mtu`), and an IPv4 packet of its
//! stated length, at most `mtu` unless segmented, whose source lies in one of the sending
//! peer's `routes` (a node injects only its own tasks' traffic). A key leaving the key set
//! drops its salts, windows and partial messages.
//!
//! Limits: IPv4 only; a sender whose clock stepped back below its 8 newest salts for a key is
//! refused until the next key rotation; the destination of an opened packet is left to the
//! kernel's routing and `FORWARD` chain.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, AsRawFd};
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
pub const VERSION: u8 = 2;
/// Fragment header length: version, key id, salt, counter, count, chunk, index.
pub const HEADER_LEN: usize = 1 + 4 + 16 + 8 + 1 + 2 + 1;
/// The header bytes sealed as AAD: all but the index (the last byte).
const AAD_LEN: usize = HEADER_LEN - 1;
/// Length of the `virtio_net_hdr` in front of every packet on the TUN device.
pub const VNET_LEN: usize = 10;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Bytes a packet sent in one datagram adds on the underlay: header, `virtio_net_hdr`, tag,
/// UDP and IPv4 headers. The TUN MTU is the underlay MTU minus this (1413 for 1500).
pub const OVERHEAD: u32 = (HEADER_LEN + VNET_LEN + TAG_LEN) as u32 + 8 + 20;
/// Most fragments in one message.
pub const MAX_FRAGMENTS: usize = 64;
/// Smallest chunk a receiver accepts in a fragmented message.
pub const MIN_CHUNK: usize = 256;
/// Largest sealed message: the header, the largest IPv4 packet, the tag.
const MAX_MESSAGE: usize = VNET_LEN + 65535 + TAG_LEN;
/// Largest UDP payload of one send (a 65,535-byte IPv4 packet less its headers): a message
/// whose fragments add up to more goes in two sends.
const MAX_SEND: usize = 65535 - 20 - 8;
/// TUN MTUs a tunnel accepts: from IPv6's minimum (so that a 64 KiB message fits in
/// [`MAX_FRAGMENTS`] fragments) to jumbo frames.
pub const MTU_RANGE: RangeInclusive<u32> = 1280..=9000;
/// Messages gathered at once per peer.
pub const PARTIALS_PER_PEER: usize = 8;
/// Metric of the routes through the tunnel: below the VXLAN overlay's
/// ([`crate::overlay::ROUTE_METRIC`]) so an encrypted block never takes the plain path, above a
/// connected route's (0) so a block that becomes local goes to its bridge.
pub const ROUTE_METRIC: u32 = 90;
/// HKDF info of the per-sender subkey.
pub const HKDF_INFO: &[u8] = b"flotilla tunnel v1";
/// Salts (with subkey and replay window) kept per peer and key id.
pub const SALTS_PER_KEY: usize = 8;
/// Messages a sender seals under one salt before drawing a new one.
const SALT_PACKETS: u64 = 1 << 32;
/// Packets the TUN device queues for the sealing worker (the kernel's default of 500 drops
/// bursts of a single TCP stream, and every drop halves its window).
pub const TX_QUEUE_LEN: u32 = 1024;
/// Replay window width (bits of the bitmap).
const WINDOW: u64 = 64;
/// Smallest IPv4 header.
const IPV4_MIN: usize = 20;
/// Smallest IPv4 + TCP headers: what a TCP segment carries besides its payload.
const TCP_HEADERS_MIN: usize = 40;

/// `virtio_net_hdr` flags and GSO types (linux/virtio_net.h).
const VNET_F_NEEDS_CSUM: u8 = 1;
const VNET_F_DATA_VALID: u8 = 2;
const VNET_GSO_NONE: u8 = 0;
const VNET_GSO_TCPV4: u8 = 1;
const VNET_GSO_ECN: u8 = 0x80;

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
    /// MTU of the TUN device, in [`MTU_RANGE`]: the underlay MTU minus [`OVERHEAD`]. The
    /// fragments' size follows from it.
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

/// Counters of one tunnel since it started. A "packet" is what the TUN device hands over or
/// takes: a single IPv4 packet or a TCP segment of up to 64 KiB; a "datagram" is one fragment
/// on the underlay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// Packets sealed and sent.
    pub tx_packets: u64,
    /// Bytes of inner packets sealed and sent.
    pub tx_bytes: u64,
    /// Datagrams sent (fragments of the packets above).
    pub tx_datagrams: u64,
    /// Packets opened and delivered to the TUN device.
    pub rx_packets: u64,
    /// Bytes of inner packets delivered.
    pub rx_bytes: u64,
    /// Outgoing packets to a destination no peer owns (or not IPv4).
    pub dropped_no_route: u64,
    /// Outgoing packets while the key set is empty.
    pub dropped_no_key: u64,
    /// Outgoing sends the socket refused.
    pub send_errors: u64,
    /// Incoming datagrams from a source that is no peer (before any crypto).
    pub dropped_unknown_peer: u64,
    /// Incoming datagrams too short, too long, of another version, with a bad fragment
    /// header, or opened to a bad inner packet.
    pub dropped_malformed: u64,
    /// Incoming datagrams under a key id that is not in the key set.
    pub dropped_unknown_key: u64,
    /// Incoming messages whose tag did not verify (tampered, or a key with that id but
    /// another secret).
    pub dropped_auth: u64,
    /// Incoming datagrams already seen, too old for the window, or of a retired salt.
    pub dropped_replay: u64,
    /// Incoming packets whose inner source is outside the sending peer's routes.
    pub dropped_source: u64,
    /// Partial messages dropped for newer ones before all their fragments came.
    pub dropped_incomplete: u64,
    /// Opened packets the TUN device refused.
    pub write_errors: u64,
}

impl TunnelStats {
    /// Every incoming datagram or message refused, whatever the reason.
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
// Pure part: keys, sealing, fragments, opening.

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

/// The chunk (fragment payload) of a tunnel whose TUN MTU is `mtu`: a full datagram less the
/// fragment header, so that a packet of `mtu` bytes goes in one datagram.
pub fn chunk_for(mtu: u32) -> usize {
    mtu as usize + VNET_LEN + TAG_LEN
}

/// A sealed message, ready to be cut into fragments: the header they share (index 0) and the
/// sealed bytes' length.
#[derive(Debug, Clone, Copy)]
struct Sealed {
    header: [u8; HEADER_LEN],
    /// Sealed bytes (message and tag).
    len: usize,
    count: usize,
    chunk: usize,
}

impl Sealed {
    /// The header of fragment `index`.
    fn header(&self, index: usize) -> [u8; HEADER_LEN] {
        let mut h = self.header;
        h[HEADER_LEN - 1] = index as u8;
        h
    }

    /// The byte range of fragment `index` in the sealed message.
    fn range(&self, index: usize) -> std::ops::Range<usize> {
        let start = index * self.chunk;
        start..(start + self.chunk).min(self.len)
    }
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

    /// Seals the `len` bytes at the start of `buf` in place and writes the tag after them,
    /// for fragments of `chunk` bytes; `None` if `buf` has no room for the tag, the message
    /// needs more than [`MAX_FRAGMENTS`] fragments or the salt is used up.
    fn seal(&mut self, buf: &mut [u8], len: usize, chunk: usize) -> Option<Sealed> {
        let total = len + TAG_LEN;
        let count = total.div_ceil(chunk);
        if buf.len() < total
            || self.exhausted()
            || count > MAX_FRAGMENTS
            || chunk > usize::from(u16::MAX)
        {
            return None;
        }
        let counter = self.counter;
        self.counter += 1;
        let mut h = [0u8; HEADER_LEN];
        h[0] = VERSION;
        h[1..5].copy_from_slice(&self.key_id.to_be_bytes());
        h[5..21].copy_from_slice(&self.salt);
        h[21..29].copy_from_slice(&counter.to_be_bytes());
        h[29] = count as u8;
        h[30..32].copy_from_slice(&(chunk as u16).to_be_bytes());
        let (body, tail) = buf.split_at_mut(len);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&h[..AAD_LEN]), body)
            .ok()?;
        tail[..TAG_LEN].copy_from_slice(tag.as_ref());
        Some(Sealed {
            header: h,
            len: total,
            count,
            chunk,
        })
    }
}

/// Seals `message` (a `virtio_net_hdr` and an IPv4 packet) as a tunnel with `key`, `salt`
/// and `counter` would, cut into datagrams of at most `chunk` message bytes (tests and
/// diagnostics). Never seal two messages with the same key, salt and counter.
pub fn seal_message(
    key: &TunnelKey,
    salt: [u8; 16],
    counter: u64,
    message: &[u8],
    chunk: usize,
) -> Result<Vec<Vec<u8>>> {
    let mut s = Sealer::new(key, salt)?;
    s.counter = counter;
    let mut buf = message.to_vec();
    buf.resize(message.len() + TAG_LEN, 0);
    let sealed = s.seal(&mut buf, message.len(), chunk).ok_or_else(|| {
        Error::Invalid(format!(
            "counter {counter} beyond 2^32, or {} bytes in more than {MAX_FRAGMENTS} chunks of {chunk}",
            message.len()
        ))
    })?;
    Ok((0..sealed.count)
        .map(|i| {
            let mut d = sealed.header(i).to_vec();
            d.extend_from_slice(&buf[sealed.range(i)]);
            d
        })
        .collect())
}

/// Seals one plain IPv4 packet (an all-zero `virtio_net_hdr`: no offload) as one datagram.
pub fn seal_packet(key: &TunnelKey, salt: [u8; 16], counter: u64, inner: &[u8]) -> Result<Vec<u8>> {
    let mut message = vec![0u8; VNET_LEN];
    message.extend_from_slice(inner);
    let chunk = (message.len() + TAG_LEN).min(usize::from(u16::MAX));
    let mut d = seal_message(key, salt, counter, &message, chunk)?;
    d.pop()
        .ok_or_else(|| Error::Invalid("nothing sealed".into()))
}

/// 64-message sliding replay window.
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

/// A fragment's header, parsed and checked against itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fragment {
    key_id: u32,
    salt: [u8; 16],
    counter: u64,
    count: usize,
    chunk: usize,
    index: usize,
}

impl Fragment {
    /// Parses datagram `d`; its data is `d[HEADER_LEN..]`.
    fn parse(d: &[u8]) -> std::result::Result<Fragment, Refused> {
        if d.len() <= HEADER_LEN || d[0] != VERSION {
            return Err(Refused::Malformed);
        }
        let mut b4 = [0u8; 4];
        b4.copy_from_slice(&d[1..5]);
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&d[5..21]);
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(&d[21..29]);
        let f = Fragment {
            key_id: u32::from_be_bytes(b4),
            salt,
            counter: u64::from_be_bytes(b8),
            count: usize::from(d[29]),
            chunk: usize::from(u16::from_be_bytes([d[30], d[31]])),
            index: usize::from(d[32]),
        };
        let data = d.len() - HEADER_LEN;
        let last = f.index + 1 == f.count;
        let ok = f.counter < SALT_PACKETS
            && (1..=MAX_FRAGMENTS).contains(&f.count)
            && f.index < f.count
            && (f.count == 1 || f.chunk >= MIN_CHUNK)
            && (f.count - 1) * f.chunk < MAX_MESSAGE
            && if last {
                data <= f.chunk && (f.count - 1) * f.chunk + data <= MAX_MESSAGE
            } else {
                data == f.chunk
            }
            && (f.count > 1 || data >= VNET_LEN + IPV4_MIN + TAG_LEN);
        if ok {
            Ok(f)
        } else {
            Err(Refused::Malformed)
        }
    }

    fn same_message(&self, p: &Partial) -> bool {
        self.key_id == p.key_id && self.salt == p.salt && self.counter == p.counter
    }
}

/// What a receiver keeps per salt of a peer: the derived subkey and the replay window.
struct SaltRx {
    key_id: u32,
    salt: [u8; 16],
    key: LessSafeKey,
    window: Window,
}

/// A message whose fragments are still coming.
struct Partial {
    key_id: u32,
    salt: [u8; 16],
    counter: u64,
    count: usize,
    chunk: usize,
    /// Bit i: fragment i is in `buf`.
    have: u64,
    /// The message's length, known once the last fragment came.
    len: usize,
    /// When it began, in fragments received by this peer (the oldest goes first).
    began: u64,
    buf: Vec<u8>,
}

/// A peer's receiving state.
#[derive(Default)]
struct PeerRx {
    salts: Vec<SaltRx>,
    partials: Vec<Partial>,
    received: u64,
}

/// An opened message: the `virtio_net_hdr` and IPv4 packet in `buf[..len]`.
#[derive(Debug)]
struct Opened {
    buf: Vec<u8>,
    len: usize,
}

impl Opened {
    fn message(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Receiving state per peer: a short list searched from the front, the last peer first
/// (cheaper than hashing the source of every datagram; a cluster has few nodes).
#[derive(Default)]
struct Peers(Vec<(SocketAddrV4, PeerRx)>);

impl Peers {
    /// The state of `from`, made empty if there is none.
    fn entry(&mut self, from: SocketAddrV4) -> &mut PeerRx {
        let i = match self.0.iter().position(|(a, _)| *a == from) {
            Some(0) => 0,
            Some(i) => {
                self.0.swap(0, i);
                0
            }
            None => {
                self.0.insert(0, (from, PeerRx::default()));
                0
            }
        };
        &mut self.0[i].1
    }

    #[cfg(test)]
    fn get(&self, from: &SocketAddrV4) -> Option<&PeerRx> {
        self.0.iter().find(|(a, _)| a == from).map(|(_, r)| r)
    }

    fn retain(&mut self, mut keep: impl FnMut(&SocketAddrV4, &mut PeerRx) -> bool) {
        self.0.retain_mut(|(a, r)| keep(a, r));
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
impl std::ops::Index<&SocketAddrV4> for Peers {
    type Output = PeerRx;
    fn index(&self, from: &SocketAddrV4) -> &PeerRx {
        self.get(from)
            .unwrap_or_else(|| panic!("no state for {from}"))
    }
}

/// The receiving side's state, kept across table changes.
#[derive(Default)]
struct Opener {
    peers: Peers,
    /// Message buffers to reuse.
    spare: Vec<Vec<u8>>,
    /// Partial messages dropped for newer ones.
    incomplete: u64,
}

impl Opener {
    /// Forgets peers no longer in `table`, and the salts and partial messages of keys no
    /// longer in it.
    fn retain_keys(&mut self, table: &Table) {
        self.peers.retain(|from, rx| {
            rx.salts.retain(|s| table.key(s.key_id).is_some());
            rx.partials.retain(|p| table.key(p.key_id).is_some());
            table.peer_at(*from).is_some() && (!rx.salts.is_empty() || !rx.partials.is_empty())
        });
    }

    /// A buffer of `len` bytes (contents unspecified).
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    /// Gives a buffer back for reuse.
    fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < PARTIALS_PER_PEER {
            self.spare.push(buf);
        }
    }

    /// Takes datagram `d` received from `from`: `Ok(None)` while its message is incomplete,
    /// the opened message once it is whole. Hand the message's buffer back with
    /// [`Opener::recycle`].
    fn receive(
        &mut self,
        table: &Table,
        from: SocketAddrV4,
        d: &[u8],
        mtu: usize,
    ) -> std::result::Result<Option<Opened>, Refused> {
        let peer = table.peer_at(from).ok_or(Refused::UnknownPeer)?;
        let f = Fragment::parse(d)?;
        let data = &d[HEADER_LEN..];
        let secret = table.key(f.key_id).ok_or(Refused::UnknownKey)?.secret;
        let mut aad = [0u8; AAD_LEN];
        aad.copy_from_slice(&d[..AAD_LEN]);
        // refuse what the window already refuses before spending a buffer on it
        {
            let rx = self.peers.entry(from);
            let same_key = || rx.salts.iter().filter(|s| s.key_id == f.key_id);
            match same_key().find(|s| s.salt == f.salt) {
                Some(s) if !s.window.fresh(f.counter) => return Err(Refused::Replay),
                Some(_) => {}
                None => {
                    let t = salt_time(&f.salt);
                    if same_key().count() >= SALTS_PER_KEY
                        && same_key().all(|s| salt_time(&s.salt) >= t)
                    {
                        // older than every salt kept: possibly one evicted before
                        return Err(Refused::Replay);
                    }
                }
            }
        }
        let (mut buf, len) = if f.count == 1 {
            let mut b = self.buffer(data.len());
            b.copy_from_slice(data);
            (b, data.len())
        } else {
            match self.gather(from, &f, data)? {
                Some(whole) => whole,
                None => return Ok(None),
            }
        };
        let opened = self.open(from, &f, &secret, &aad, &mut buf[..len]);
        match opened.and_then(|n| check_inner(&buf[..n], peer, mtu).map(|()| n)) {
            Ok(n) => Ok(Some(Opened { buf, len: n })),
            Err(e) => {
                self.recycle(buf);
                Err(e)
            }
        }
    }

    /// Adds fragment `f` (with `data`) to its partial message; returns the message and its
    /// length once every fragment is in.
    fn gather(
        &mut self,
        from: SocketAddrV4,
        f: &Fragment,
        data: &[u8],
    ) -> std::result::Result<Option<(Vec<u8>, usize)>, Refused> {
        let Opener {
            peers,
            spare,
            incomplete,
        } = self;
        let rx = peers.entry(from);
        rx.received += 1;
        let i = match rx.partials.iter().position(|p| f.same_message(p)) {
            Some(i) if rx.partials[i].count != f.count || rx.partials[i].chunk != f.chunk => {
                let p = rx.partials.swap_remove(i);
                self.recycle(p.buf);
                return Err(Refused::Malformed);
            }
            Some(i) if rx.partials[i].have & (1 << f.index) != 0 => {
                return Err(Refused::Replay);
            }
            Some(i) => i,
            None => {
                // A full table gives its oldest message's buffer to this one.
                let oldest = (rx.partials.len() >= PARTIALS_PER_PEER)
                    .then(|| {
                        rx.partials
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, p)| p.began)
                            .map(|(i, _)| i)
                    })
                    .flatten();
                let mut buf = match oldest {
                    Some(o) => {
                        *incomplete += 1;
                        rx.partials.swap_remove(o).buf
                    }
                    None => spare.pop().unwrap_or_default(),
                };
                buf.resize(f.count * f.chunk, 0);
                rx.partials.push(Partial {
                    key_id: f.key_id,
                    salt: f.salt,
                    counter: f.counter,
                    count: f.count,
                    chunk: f.chunk,
                    have: 0,
                    len: 0,
                    began: rx.received,
                    buf,
                });
                rx.partials.len() - 1
            }
        };
        let p = &mut rx.partials[i];
        let at = f.index * f.chunk;
        p.buf[at..at + data.len()].copy_from_slice(data);
        p.have |= 1 << f.index;
        if f.index + 1 == f.count {
            p.len = at + data.len();
        }
        let all = if f.count == 64 {
            u64::MAX
        } else {
            (1u64 << f.count) - 1
        };
        if p.have != all {
            return Ok(None);
        }
        let p = rx.partials.swap_remove(i);
        Ok(Some((p.buf, p.len)))
    }

    /// Opens the sealed message `msg` in place with the subkey of (`secret`, `f.salt`),
    /// keeping or adding that salt; returns the plaintext's length.
    fn open(
        &mut self,
        from: SocketAddrV4,
        f: &Fragment,
        secret: &[u8; 32],
        aad: &[u8; AAD_LEN],
        msg: &mut [u8],
    ) -> std::result::Result<usize, Refused> {
        let rx = self.peers.entry(from);
        let salts = &mut rx.salts;
        if let Some(s) = salts
            .iter_mut()
            .find(|s| s.key_id == f.key_id && s.salt == f.salt)
        {
            // checked again: another message under this counter may have been opened since
            // this one's first fragment came
            if !s.window.fresh(f.counter) {
                return Err(Refused::Replay);
            }
            let n = s
                .key
                .open_in_place(nonce(f.counter), Aad::from(&aad[..]), msg)
                .map_err(|_| Refused::Auth)?
                .len();
            s.window.mark(f.counter);
            return Ok(n);
        }
        let key = derive(secret, &f.salt).ok_or(Refused::Auth)?;
        let n = key
            .open_in_place(nonce(f.counter), Aad::from(&aad[..]), msg)
            .map_err(|_| Refused::Auth)?
            .len();
        if salts.iter().filter(|s| s.key_id == f.key_id).count() >= SALTS_PER_KEY {
            if let Some(oldest) = salts
                .iter()
                .enumerate()
                .filter(|(_, s)| s.key_id == f.key_id)
                .min_by_key(|(_, s)| salt_time(&s.salt))
                .map(|(i, _)| i)
            {
                salts.swap_remove(oldest);
            }
        }
        let mut window = Window::default();
        window.mark(f.counter);
        salts.push(SaltRx {
            key_id: f.key_id,
            salt: f.salt,
            key,
            window,
        });
        Ok(n)
    }
}

/// The opened message `m` must be a `virtio_net_hdr` asking only for what this tunnel's
/// kernel hands out (checksum offsets inside the packet; TCPv4 segmentation into segments
/// within `mtu`) and an IPv4 packet of its stated length, at most `mtu` unless segmented,
/// from the peer's blocks.
fn check_inner(m: &[u8], peer: &TunnelPeer, mtu: usize) -> std::result::Result<(), Refused> {
    if m.len() < VNET_LEN + IPV4_MIN {
        return Err(Refused::Malformed);
    }
    let (h, p) = m.split_at(VNET_LEN);
    let le = |i: usize| usize::from(u16::from_le_bytes([h[i], h[i + 1]]));
    let (flags, gso) = (h[0], h[1]);
    let (hdr_len, gso_size, csum_start, csum_offset) = (le(2), le(4), le(6), le(8));
    if flags & !(VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID) != 0 {
        return Err(Refused::Malformed);
    }
    if p[0] >> 4 != 4 || usize::from(p[0] & 0xf) * 4 < IPV4_MIN {
        return Err(Refused::Malformed);
    }
    if usize::from(u16::from_be_bytes([p[2], p[3]])) != p.len() {
        return Err(Refused::Malformed);
    }
    match gso & !VNET_GSO_ECN {
        VNET_GSO_NONE if gso & VNET_GSO_ECN == 0 => {
            if p.len() > mtu {
                return Err(Refused::Malformed);
            }
        }
        VNET_GSO_TCPV4 => {
            if p[9] != 6 || gso_size == 0 || gso_size + TCP_HEADERS_MIN > mtu || hdr_len > p.len() {
                return Err(Refused::Malformed);
            }
        }
        _ => return Err(Refused::Malformed),
    }
    if flags & VNET_F_NEEDS_CSUM != 0
        && (csum_start < IPV4_MIN || csum_start + csum_offset + 2 > p.len())
    {
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

    /// An ioctl on the TUN file that reads one `int` through its pointer argument.
    fn set_int(
        f: &File,
        request: libc::Ioctl,
        value: libc::c_int,
        what: &str,
        name: &str,
    ) -> Result<()> {
        // SAFETY: `f` is an open TUN file; the requests passed here (TUNSETVNETLE,
        // TUNSETVNETHDRSZ) read one `int` through the pointer, and `value` lives across the
        // call.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), request, &value as *const libc::c_int) };
        if r < 0 {
            return Err(failed(format!("{what} {name}")));
        }
        Ok(())
    }

    fn failed(what: String) -> Error {
        Error::io(what, std::io::Error::last_os_error())
    }

    /// Opens `/dev/net/tun` (non-blocking) and attaches it to TUN device `name` in the
    /// calling thread's network namespace, creating it if needed, with a little-endian
    /// `virtio_net_hdr` before every packet and checksum and TCPv4 segmentation offload on;
    /// the device is not persistent, so it goes when the file is closed. `name` must be
    /// validated (1-15 bytes).
    pub(super) fn open(name: &str) -> Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| Error::io("open /dev/net/tun", e))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        // SAFETY: `f` is an open /dev/net/tun file; TUNSETIFF reads and writes back a
        // `struct ifreq`, whose 40 bytes `IfReq` covers with the same layout (16-byte
        // NUL-terminated name, short flags, union padding); `req` lives across the call.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF as _, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(failed(format!("TUNSETIFF {name}")));
        }
        // A device left persistent (by `ip tuntap add`) would outlive the tunnel.
        // SAFETY: TUNSETPERSIST takes an integer argument, no memory is passed.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETPERSIST as _, 0 as libc::c_ulong) };
        if r < 0 {
            return Err(failed(format!("TUNSETPERSIST {name}")));
        }
        // The header crosses the wire: the same byte order on every node.
        set_int(&f, libc::TUNSETVNETLE as _, 1, "TUNSETVNETLE", name)?;
        set_int(
            &f,
            libc::TUNSETVNETHDRSZ as _,
            super::VNET_LEN as libc::c_int,
            "TUNSETVNETHDRSZ",
            name,
        )?;
        let offload =
            libc::c_ulong::from(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN);
        // SAFETY: TUNSETOFFLOAD takes the flags as an integer argument, no memory is passed.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETOFFLOAD as _, offload) };
        if r < 0 {
            return Err(failed(format!("TUNSETOFFLOAD {name}")));
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
const TX_DATAGRAMS: usize = 5;
// rx counters
const RX_PACKETS: usize = 0;
const RX_BYTES: usize = 1;
const RX_WRITE_ERR: usize = 2;
const RX_INCOMPLETE: usize = 3;

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
        if !MTU_RANGE.contains(&cfg.mtu) {
            return Err(Error::Invalid(format!(
                "tunnel mtu {} ({} to {})",
                cfg.mtu,
                MTU_RANGE.start(),
                MTU_RANGE.end()
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
        // Fragments of one message in one read (best effort: without it they come one by
        // one).
        if let Err(e) =
            nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::UdpGroSegment, &true)
        {
            tracing::debug!(error = %e, "tunnel: no UDP receive offload");
        }
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
        let chunk = chunk_for(cfg.mtu);
        let mut workers = Vec::new();
        {
            let (shared, tun, sock) = (shared.clone(), tun.clone(), sock.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("{}-tx", cfg.ifname))
                    .spawn(move || tx_loop(&shared, &tun, &sock, &wake_rx, chunk))
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
            tx_datagrams: tx.get(TX_DATAGRAMS),
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
            dropped_incomplete: rx.get(RX_INCOMPLETE),
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
fn tx_loop(
    shared: &Shared,
    tun: &File,
    sock: &UdpSocket,
    wake: &std::io::PipeReader,
    chunk: usize,
) {
    let rng = SystemRandom::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut generation = shared.generation.load(Ordering::Acquire);
    let mut table = shared.table();
    let mut sealer: Option<Sealer> = None;
    let mut sender = Sender { gso: true };
    let mut reader = tun;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let n = match reader.read(&mut buf[..MAX_MESSAGE - TAG_LEN]) {
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
        if n < VNET_LEN + IPV4_MIN || buf[VNET_LEN] >> 4 != 4 {
            shared.tx.add(TX_NO_ROUTE, 1);
            continue;
        }
        let p = &buf[VNET_LEN..n];
        let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
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
        let Some(sealed) = s.seal(&mut buf, n, chunk) else {
            shared.tx.add(TX_NO_KEY, 1);
            continue;
        };
        match sender.send(sock, &sealed, &buf, to) {
            Ok(()) => {
                shared.tx.add(TX_PACKETS, 1);
                shared.tx.add(TX_BYTES, (n - VNET_LEN) as u64);
                shared.tx.add(TX_DATAGRAMS, sealed.count as u64);
            }
            Err(_) => shared.tx.add(TX_SEND_ERR, 1),
        }
    }
}

/// Sends a message's fragments.
struct Sender {
    /// Whether UDP segmentation offload works on this socket's route; off for good after the
    /// kernel refuses it (an underlay device without checksum offload, say).
    gso: bool,
}

impl Sender {
    /// Sends the fragments of `sealed` (its sealed bytes at the start of `buf`) to `to`: with
    /// `UDP_SEGMENT`, as many as one send can carry at a time; else one by one.
    fn send(
        &mut self,
        sock: &UdpSocket,
        sealed: &Sealed,
        buf: &[u8],
        to: SocketAddrV4,
    ) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn};
        let addr = SockaddrIn::from(to);
        let mut headers = [[0u8; HEADER_LEN]; MAX_FRAGMENTS];
        for (i, h) in headers.iter_mut().enumerate().take(sealed.count) {
            *h = sealed.header(i);
        }
        let seg = HEADER_LEN + sealed.chunk;
        let per_send = if self.gso {
            (MAX_SEND / seg).clamp(1, MAX_FRAGMENTS)
        } else {
            1
        };
        let gso_size = seg as u16;
        let mut i = 0;
        while i < sealed.count {
            let end = (i + per_send).min(sealed.count);
            let iov: Vec<IoSlice<'_>> = (i..end)
                .flat_map(|k| {
                    [
                        IoSlice::new(&headers[k]),
                        IoSlice::new(&buf[sealed.range(k)]),
                    ]
                })
                .collect();
            let gso = [ControlMessage::UdpGsoSegments(&gso_size)];
            let cmsgs: &[ControlMessage<'_>] = if end - i > 1 { &gso } else { &[] };
            match sendmsg(
                sock.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::empty(),
                Some(&addr),
            ) {
                Ok(_) => i = end,
                Err(e) if end - i > 1 && matches!(e, nix::Error::EIO | nix::Error::EINVAL) => {
                    tracing::info!(error = %e, "tunnel: UDP segmentation offload refused, sending fragments one by one");
                    self.gso = false;
                    return self.send_from(sock, sealed, buf, &headers, &addr, i);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Sends fragments `from..` one datagram each.
    fn send_from(
        &mut self,
        sock: &UdpSocket,
        sealed: &Sealed,
        buf: &[u8],
        headers: &[[u8; HEADER_LEN]],
        addr: &nix::sys::socket::SockaddrIn,
        from: usize,
    ) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, MsgFlags};
        for (k, h) in headers.iter().enumerate().take(sealed.count).skip(from) {
            let iov = [IoSlice::new(h), IoSlice::new(&buf[sealed.range(k)])];
            sendmsg(sock.as_raw_fd(), &iov, &[], MsgFlags::empty(), Some(addr))?;
        }
        Ok(())
    }
}

/// Read buffer of the receiving worker: a UDP receive offload batch is at most 64 KiB.
const RX_BUF_LEN: usize = 1 << 17;

/// UDP → open → TUN.
fn rx_loop(shared: &Shared, tun: &File, sock: &UdpSocket, mtu: usize) {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn};
    let mut buf = vec![0u8; RX_BUF_LEN];
    let mut cmsg = nix::cmsg_space!(i32);
    let mut generation = shared.generation.load(Ordering::Acquire);
    let mut table = shared.table();
    let mut opener = Opener::default();
    let mut incomplete = 0;
    let mut writer = tun;
    loop {
        let got = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            recvmsg::<SockaddrIn>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .map(|m| {
                let seg = m.cmsgs().ok().and_then(|mut c| {
                    c.find_map(|c| match c {
                        ControlMessageOwned::UdpGroSegments(s) => Some(s),
                        _ => None,
                    })
                });
                (
                    m.bytes,
                    m.address,
                    seg,
                    m.flags.contains(MsgFlags::MSG_TRUNC),
                )
            })
        };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let (n, from, seg) = match got {
            Ok((n, Some(from), seg, false)) => (n, SocketAddrV4::new(from.ip(), from.port()), seg),
            Ok((_, _, _, true)) => {
                shared.refuse(Refused::Malformed);
                continue;
            }
            Ok((_, None, _, _)) => {
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
        let seg = seg
            .and_then(|s| usize::try_from(s).ok())
            .filter(|s| *s > 0)
            .unwrap_or(n.max(1));
        for d in buf[..n].chunks(seg) {
            match opener.receive(&table, from, d, mtu) {
                Ok(Some(o)) => {
                    let m = o.message();
                    // one write is one packet: all or nothing
                    match writer.write(m) {
                        Ok(w) if w == m.len() => {
                            shared.rx.add(RX_PACKETS, 1);
                            shared.rx.add(RX_BYTES, (m.len() - VNET_LEN) as u64);
                        }
                        Ok(_) | Err(_) => shared.rx.add(RX_WRITE_ERR, 1),
                    }
                    opener.recycle(o.buf);
                }
                Ok(None) => {}
                Err(why) => shared.refuse(why),
            }
        }
        if opener.incomplete != incomplete {
            shared.rx.add(RX_INCOMPLETE, opener.incomplete - incomplete);
            incomplete = opener.incomplete;
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
        ipv4_proto(17, src, dst, payload)
    }

    fn ipv4_proto(proto: u8, src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let len = 20 + payload.len();
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
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

    /// Feeds one datagram; the opened message (header and packet) once whole.
    fn feed(
        o: &mut Opener,
        t: &Table,
        from: &str,
        d: &[u8],
    ) -> std::result::Result<Option<Vec<u8>>, Refused> {
        Ok(o.receive(t, addr(from), d, MTU)?.map(|m| {
            let v = m.message().to_vec();
            o.recycle(m.buf);
            v
        }))
    }

    /// Opens a one-datagram message; its IPv4 packet.
    fn open(
        o: &mut Opener,
        t: &Table,
        from: &str,
        pkt: &[u8],
    ) -> std::result::Result<Vec<u8>, Refused> {
        let m = feed(o, t, from, pkt)?.expect("a one-datagram message is whole");
        assert_eq!(&m[..VNET_LEN], &[0u8; VNET_LEN], "the header as sealed");
        Ok(m[VNET_LEN..].to_vec())
    }

    #[test]
    fn seal_then_open() {
        let k = key(1, 1);
        let t = table(vec![k.clone()]);
        let mut o = Opener::default();
        let p = seal_packet(&k, salt(1), 0, &inner()).expect("seal");
        assert_eq!(p.len(), inner().len() + HEADER_LEN + VNET_LEN + TAG_LEN);
        assert_eq!(p[0], VERSION);
        assert!(!p.windows(11).any(|w| w == b"SECRET-BODY"), "ciphertext");
        assert_eq!(open(&mut o, &t, "192.0.2.1:5000", &p), Ok(inner()));
        // the sealer's own path: header in front, tag behind, counter advancing
        let mut s = Sealer::new(&k, salt(2)).expect("sealer");
        for c in 0..3u64 {
            let mut buf = vec![0u8; 200];
            let n = VNET_LEN + inner().len();
            buf[VNET_LEN..n].copy_from_slice(&inner());
            let sealed = s.seal(&mut buf, n, chunk_for(MTU as u32)).expect("seal");
            assert_eq!(sealed.count, 1);
            let h = sealed.header(0);
            assert_eq!(&h[21..29], &c.to_be_bytes());
            let mut d = h.to_vec();
            d.extend_from_slice(&buf[sealed.range(0)]);
            assert_eq!(open(&mut o, &t, "192.0.2.1:5000", &d), Ok(inner()));
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
            HEADER_LEN + VNET_LEN + TAG_LEN + 19,
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
        p[0] = 1;
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
            o.peers.get(&addr(from)).is_none_or(|s| s.salts.is_empty()),
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
        assert_eq!(o.peers[&addr(from)].salts.len(), SALTS_PER_KEY);
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

    /// A `virtio_net_hdr` (little endian).
    fn vnet(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, start: u16, offset: u16) -> Vec<u8> {
        let mut h = vec![flags, gso];
        for v in [hdr_len, gso_size, start, offset] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    }

    /// A TCP segment of `len` payload bytes from A's block to B's, as the kernel hands it
    /// over for segmentation: header asking for TCPv4 segments of `mss` and the checksum at
    /// the TCP header's offset 16.
    fn tso_message(len: usize, mss: u16) -> Vec<u8> {
        let mut m = vnet(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 40, mss, 20, 16);
        let payload: Vec<u8> = (0..20 + len).map(|i| (i % 251) as u8).collect();
        m.extend_from_slice(&ipv4_proto(6, [10, 1, 0, 2], [10, 2, 0, 2], &payload));
        m
    }

    fn seal_tso(counter: u64, len: usize, chunk: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let m = tso_message(len, 1360);
        let d = seal_message(&key(1, 1), salt(1), counter, &m, chunk).expect("seal");
        (m, d)
    }

    #[test]
    fn the_largest_message_fits_at_the_smallest_mtu() {
        assert_eq!(OVERHEAD, 87);
        let small = chunk_for(*MTU_RANGE.start());
        assert!(MAX_MESSAGE.div_ceil(small) <= MAX_FRAGMENTS);
        // a datagram of a 1500-byte underlay is full: header + chunk + UDP + IPv4
        assert_eq!(HEADER_LEN + chunk_for(1500 - OVERHEAD) + 28, 1500);
        let (m, d) = seal_tso(0, 65535 - 40, chunk_for(1500 - OVERHEAD));
        assert_eq!(d.len(), (m.len() + TAG_LEN).div_ceil(chunk_for(1413)));
        assert!(d.iter().all(|x| x.len() <= 1472));
        // what does not fit is refused by the sealer, not cut short
        assert!(seal_message(&key(1, 1), salt(1), 0, &m, 512).is_err());
    }

    #[test]
    fn fragments_gather_in_any_order() {
        let t = table(vec![key(1, 1)]);
        let from = "192.0.2.1:5000";
        let (m, d) = seal_tso(0, 5000, 1000);
        assert_eq!(d.len(), 6);
        let mut o = Opener::default();
        for x in d[1..].iter().rev() {
            assert_eq!(feed(&mut o, &t, from, x), Ok(None));
        }
        assert_eq!(feed(&mut o, &t, from, &d[0]), Ok(Some(m.clone())));
        assert!(o.peers[&addr(from)].partials.is_empty());
        // the same message again: refused before any buffer is spent on it
        assert_eq!(feed(&mut o, &t, from, &d[3]), Err(Refused::Replay));
        assert!(o.peers[&addr(from)].partials.is_empty());
        // a fragment twice inside one message
        let (m1, d1) = seal_tso(1, 5000, 1000);
        assert_eq!(feed(&mut o, &t, from, &d1[0]), Ok(None));
        assert_eq!(feed(&mut o, &t, from, &d1[0]), Err(Refused::Replay));
        for x in &d1[1..5] {
            assert_eq!(feed(&mut o, &t, from, x), Ok(None));
        }
        assert_eq!(feed(&mut o, &t, from, &d1[5]), Ok(Some(m1)));
    }

    #[test]
    fn a_fragment_at_another_index_fails_the_tag() {
        let t = table(vec![key(1, 1)]);
        let from = "192.0.2.1:5000";
        let (_, mut d) = seal_tso(0, 5000, 1000);
        // swap the data of fragments 1 and 2 (same length), keeping their indexes
        let (a, b) = (d[1][HEADER_LEN..].to_vec(), d[2][HEADER_LEN..].to_vec());
        d[1][HEADER_LEN..].copy_from_slice(&b);
        d[2][HEADER_LEN..].copy_from_slice(&a);
        let mut o = Opener::default();
        let mut last = Ok(None);
        for x in &d {
            last = feed(&mut o, &t, from, x);
        }
        assert_eq!(last, Err(Refused::Auth));
    }

    #[test]
    fn lost_fragments_cost_their_message_and_bounded_memory() {
        let t = table(vec![key(1, 1)]);
        let from = "192.0.2.1:5000";
        let mut o = Opener::default();
        // first fragments of many messages, never completed
        for c in 0..(3 * PARTIALS_PER_PEER as u64) {
            let (_, d) = seal_tso(c, 5000, 1000);
            assert_eq!(feed(&mut o, &t, from, &d[0]), Ok(None));
            assert!(o.peers[&addr(from)].partials.len() <= PARTIALS_PER_PEER);
        }
        assert_eq!(o.incomplete, 2 * PARTIALS_PER_PEER as u64);
        assert!(o.spare.len() <= PARTIALS_PER_PEER);
        // a newer complete message still opens
        let (m, d) = seal_tso(1000, 5000, 1000);
        let mut last = Ok(None);
        for x in &d {
            last = feed(&mut o, &t, from, x);
        }
        assert_eq!(last, Ok(Some(m)));
        // a key leaving the set drops its partial messages
        o.retain_keys(&table(vec![key(2, 2)]));
        assert!(o.peers.is_empty());
    }

    #[test]
    fn hostile_fragment_headers() {
        let t = table(vec![key(1, 1)]);
        let from = "192.0.2.1:5000";
        let (_, d) = seal_tso(0, 5000, 1000);
        let with = |i: usize, f: &dyn Fn(&mut Vec<u8>)| {
            let mut x = d[i].clone();
            f(&mut x);
            feed(&mut Opener::default(), &t, from, &x)
        };
        let malformed = Err(Refused::Malformed);
        assert_eq!(with(0, &|x| x[29] = 0), malformed, "count 0");
        assert_eq!(
            with(0, &|x| x[29] = MAX_FRAGMENTS as u8 + 1),
            malformed,
            "count over the most"
        );
        assert_eq!(with(0, &|x| x[32] = 6), malformed, "index past count");
        assert_eq!(
            with(0, &|x| x[30..32].copy_from_slice(&200u16.to_be_bytes())),
            malformed,
            "chunk below the least"
        );
        assert_eq!(
            with(0, &|x| x.truncate(x.len() - 1)),
            malformed,
            "short middle"
        );
        assert_eq!(with(0, &|x| x.push(0)), malformed, "long middle");
        assert_eq!(
            with(5, &|x| x.resize(HEADER_LEN + 1001, 0)),
            malformed,
            "long last"
        );
        assert_eq!(
            with(0, &|x| {
                x[29] = 64;
                x[30..32].copy_from_slice(&u16::MAX.to_be_bytes());
            }),
            malformed,
            "a message over 64 KiB"
        );
        assert_eq!(with(0, &|x| x[1] = 9), Err(Refused::UnknownKey));
        // the same message announced with another count or chunk
        let mut o = Opener::default();
        assert_eq!(feed(&mut o, &t, from, &d[0]), Ok(None));
        let mut x = d[1].clone();
        x[29] = 7;
        assert_eq!(feed(&mut o, &t, from, &x), Err(Refused::Malformed));
        assert!(o.peers[&addr(from)].partials.is_empty(), "dropped whole");
        // a fragment from a stranger leaves no state
        let mut o = Opener::default();
        assert_eq!(
            feed(&mut o, &table(vec![key(1, 1)]), "192.0.2.7:5000", &d[0]),
            Err(Refused::UnknownPeer)
        );
        assert!(o.peers.is_empty());
    }

    #[test]
    fn hostile_offload_headers() {
        let t = table(vec![key(1, 1)]);
        let from = "192.0.2.1:5000";
        let tcp = |len: usize| ipv4_proto(6, [10, 1, 0, 2], [10, 2, 0, 2], &vec![7u8; 20 + len]);
        let try_ = |h: Vec<u8>, p: Vec<u8>| {
            let mut m = h;
            m.extend_from_slice(&p);
            let d = seal_message(&key(1, 1), salt(1), 0, &m, 1000).expect("seal");
            let mut o = Opener::default();
            let mut last = Ok(None);
            for x in &d {
                last = feed(&mut o, &t, from, x);
            }
            last.map(|m| m.is_some())
        };
        let malformed = Err(Refused::Malformed);
        // what the kernel hands out passes
        assert_eq!(try_(vnet(1, 1, 52, 1360, 20, 16), tcp(5000)), Ok(true));
        assert_eq!(
            try_(vnet(1, 0x81, 52, 1360, 20, 16), tcp(5000)),
            Ok(true),
            "ECN"
        );
        assert_eq!(
            try_(vnet(2, 0, 0, 0, 0, 0), tcp(100)),
            Ok(true),
            "data valid"
        );
        assert_eq!(
            try_(vnet(1, 0, 0, 0, 20, 16), tcp(100)),
            Ok(true),
            "csum only"
        );
        // and nothing else
        let udp = ipv4([10, 1, 0, 2], [10, 2, 0, 2], &[0u8; 5000]);
        let refused: [(Vec<u8>, Vec<u8>, &str); 13] = [
            (vnet(4, 0, 0, 0, 0, 0), tcp(100), "unknown flag"),
            (vnet(1, 4, 52, 1360, 20, 16), tcp(5000), "TCPv6"),
            (vnet(1, 5, 28, 1360, 20, 6), tcp(5000), "UDP L4"),
            (vnet(1, 3, 28, 1360, 20, 6), tcp(5000), "UFO"),
            (vnet(0, 0x80, 0, 0, 0, 0), tcp(100), "ECN alone"),
            (vnet(1, 1, 52, 0, 20, 16), tcp(5000), "gso size 0"),
            (
                vnet(1, 1, 52, MTU as u16 - 39, 20, 16),
                tcp(5000),
                "segments over the mtu",
            ),
            (
                vnet(1, 1, 52, 1360, 20, 16),
                udp,
                "segmentation of UDP as TCP",
            ),
            (vnet(1, 1, 6000, 1360, 20, 16), tcp(5000), "hdr_len"),
            (vnet(1, 0, 0, 0, 20, 200), tcp(100), "checksum past the end"),
            (
                vnet(1, 0, 0, 0, 4, 0),
                tcp(100),
                "checksum in the IPv4 header",
            ),
            (
                vnet(0, 0, 0, 0, 0, 0),
                tcp(5000),
                "unsegmented over the mtu",
            ),
            (
                vnet(0, 0, 0, 0, 0, 0)[..9].to_vec(),
                tcp(100),
                "short header",
            ),
        ];
        for (h, p, what) in refused {
            assert_eq!(try_(h, p), malformed, "{what}");
        }
        // a segmented packet from outside the peer's blocks
        let spoof = ipv4_proto(6, [10, 9, 0, 2], [10, 2, 0, 2], &vec![7u8; 5020]);
        assert_eq!(
            try_(vnet(1, 1, 52, 1360, 20, 16), spoof),
            Err(Refused::Source)
        );
    }
}
