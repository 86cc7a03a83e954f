//! Encrypted tunnel (`crypt::Tunnel`): two "hosts" (namespaces joined by a veth underlay), each
//! with a bridge, a task and a tunnel. An HTTP-ish exchange between the tasks goes through
//! both tunnels; a raw capture of the underlay sees tunnel datagrams and never the body; a
//! datagram from a non-peer source is dropped; keys rotate without interrupting traffic and a
//! retired key is refused; dropping a tunnel removes its device and routes.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{net, Sandbox};
use flotilla_net::crypt::{self, Tunnel, TunnelConfig, TunnelKey, TunnelPeer, TunnelStats};
use flotilla_net::task::{self, TaskLink};
use flotilla_net::{bridge, link, netns, Net};

const WAIT: Duration = Duration::from_secs(5);
const PORT: u16 = 51820;
const MTU: u32 = 1500 - crypt::OVERHEAD;

struct Host {
    net: Net,
    ns: PathBuf,
    task: PathBuf,
    underlay: SocketAddrV4,
}

async fn host(sb: &Sandbox, ns: &Path, name: &str, n: u8) -> Host {
    let h = Net::open(ns).expect("open host");
    bridge::ensure_bridge(&h, "fltbr0", net(&format!("10.200.{n}.1/24")), MTU)
        .await
        .expect("bridge");
    let task_ns = sb.netns(&format!("{name}-task"));
    task::attach(
        &h,
        &TaskLink {
            netns: task_ns.clone(),
            host_ifname: "fltv0".into(),
            bridge: "fltbr0".into(),
            addr: net(&format!("10.200.{n}.2/24")),
            gateway: Ipv4Addr::new(10, 200, n, 1),
            mtu: MTU,
        },
    )
    .await
    .expect("attach");
    Host {
        net: h,
        ns: ns.to_path_buf(),
        task: task_ns,
        underlay: SocketAddrV4::new(Ipv4Addr::new(192, 168, 80, n), PORT),
    }
}

fn key(id: u32, b: u8) -> TunnelKey {
    TunnelKey {
        id,
        secret: [b; 32],
    }
}

fn random_hex() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An HTTP-ish server in `ns`: reads `POST` with a `Content-Length` body; answers `200` with
/// `reply` when the body is `expect`, `400` otherwise. Serves until the test ends.
fn http_server(ns: &Path, addr: SocketAddr, expect: Vec<u8>, reply: Vec<u8>) {
    let listener = netns::run_in(ns, move || TcpListener::bind(addr))
        .expect("run_in")
        .expect("bind");
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            let _ = serve_one(c, &expect, &reply);
        }
    });
}

fn serve_one(mut c: TcpStream, expect: &[u8], reply: &[u8]) -> std::io::Result<()> {
    c.set_read_timeout(Some(WAIT))?;
    let body = read_message(&mut c)?;
    if body == expect {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", reply.len());
        c.write_all(head.as_bytes())?;
        c.write_all(reply)?;
    } else {
        c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")?;
    }
    Ok(())
}

/// Reads one message (head and `Content-Length` body); returns the body.
fn read_message(c: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = c.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no length in {head:?}")))?;
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = c.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(body)
}

/// One POST from `ns`; the answer's body, or an error on a non-200 answer.
fn post(ns: &Path, addr: SocketAddr, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = netns::run_in(ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(500))
    })
    .map_err(std::io::Error::other)??;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    let head = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
    c.write_all(head.as_bytes())?;
    c.write_all(body)?;
    let mut status = [0u8; 12];
    c.peek(&mut status)?;
    if &status != b"HTTP/1.1 200" {
        return Err(std::io::Error::other("not 200"));
    }
    read_message(&mut c)
}

fn post_until(ns: &Path, addr: SocketAddr, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let end = Instant::now() + WAIT;
    loop {
        match post(ns, addr, body) {
            Ok(b) => return Ok(b),
            Err(e) if Instant::now() >= end => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Waits until `cond` holds on the tunnel's counters.
fn wait_stats(t: &Tunnel, what: &str, cond: impl Fn(&TunnelStats) -> bool) -> TunnelStats {
    let end = Instant::now() + WAIT;
    loop {
        let s = t.stats();
        if cond(&s) {
            return s;
        }
        assert!(Instant::now() < end, "{what}: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What an AF_PACKET socket in one namespace saw on one interface.
#[derive(Debug, Default, Clone)]
struct Seen {
    frames: usize,
    /// IPv4 UDP frames from or to the tunnel port.
    tunnel_datagrams: usize,
    /// Frames containing each needle.
    hits: Vec<usize>,
    /// Frames the kernel dropped for a full socket buffer (a frame not seen could hold
    /// plaintext): read when the capture stops.
    drops: u32,
}

/// A raw capture of every frame on interface `ifindex` of namespace `ns`, counting frames
/// that contain one of `needles`, until stopped.
struct Capture {
    stop: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<Seen>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    fn start(ns: &Path, ifindex: u32, needles: Vec<Vec<u8>>) -> Self {
        use nix::sys::socket::{
            recvfrom, setsockopt, socket, sockopt, AddressFamily, LinkAddr, SockFlag, SockProtocol,
            SockType,
        };
        let fd = netns::run_in(ns, || {
            socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )
        })
        .expect("run_in")
        .expect("AF_PACKET socket");
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 50_000),
        )
        .expect("timeout");
        // Frames of UDP segmentation offload sends are up to 64 KiB: room for many.
        setsockopt(&fd, sockopt::RcvBufForce, &(64 << 20)).expect("receive buffer");
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let seen = Arc::new(std::sync::Mutex::new(Seen {
            hits: vec![0; needles.len()],
            ..Seen::default()
        }));
        let seen2 = seen.clone();
        let thread = std::thread::spawn(move || {
            // a UDP segmentation offload send crosses the veth as one frame of up to 64 KiB
            let mut buf = vec![0u8; 1 << 17];
            while !s2.load(Ordering::Relaxed) {
                let Ok((n, Some(from))) = recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf) else {
                    continue;
                };
                if from.ifindex() != ifindex as usize {
                    continue;
                }
                let f = &buf[..n];
                let mut seen = seen2.lock().expect("seen");
                seen.frames += 1;
                // Ethernet, IPv4, UDP, port
                if f.len() >= 14 + 20 + 8 && f[12..14] == [0x08, 0x00] && f[14 + 9] == 17 {
                    let l4 = 14 + usize::from(f[14] & 0xf) * 4;
                    if f.len() >= l4 + 4 {
                        let sport = u16::from_be_bytes([f[l4], f[l4 + 1]]);
                        let dport = u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]);
                        if sport == PORT || dport == PORT {
                            seen.tunnel_datagrams += 1;
                        }
                    }
                }
                for (i, needle) in needles.iter().enumerate() {
                    if f.windows(needle.len()).any(|w| w == needle.as_slice()) {
                        seen.hits[i] += 1;
                    }
                }
            }
            seen2.lock().expect("seen").drops = packet_drops(&fd);
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Seen {
        self.seen.lock().expect("seen").clone()
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("capture thread");
        }
        self.seen()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Frames an AF_PACKET socket dropped since the last ask (`PACKET_STATISTICS`).
#[allow(unsafe_code)]
fn packet_drops(fd: &std::os::fd::OwnedFd) -> u32 {
    let mut st = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: `fd` is an open AF_PACKET socket; PACKET_STATISTICS writes at most `len` bytes
    // (a `struct tpacket_stats`, which `st` is) and updates `len`; both outlive the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut st as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    assert_eq!(
        r,
        0,
        "PACKET_STATISTICS: {}",
        std::io::Error::last_os_error()
    );
    st.tp_drops
}

/// A UDP datagram from `src` to `dst` as an IPv4 packet (header checksum set, UDP checksum
/// off).
fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let len = 28 + payload.len();
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let mut sum: u32 = 0;
    for i in (0..20).step_by(2) {
        sum += u32::from(u16::from_be_bytes([p[i], p[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&src.port().to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A UDP socket bound to `addr` in `ns`.
fn udp_in(ns: &Path, addr: SocketAddrV4) -> UdpSocket {
    let s = netns::run_in(ns, move || UdpSocket::bind(addr))
        .expect("run_in")
        .expect("bind udp");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    s
}

/// Whether `sock` receives `want` before the timeout (other datagrams are skipped).
fn receives(sock: &UdpSocket, want: &[u8]) -> bool {
    let mut buf = [0u8; 256];
    while let Ok(n) = sock.recv(&mut buf) {
        if &buf[..n] == want {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_tunnel_between_two_hosts() {
    let sb = Sandbox::new();
    let a_ns = sb.netns("t80-a");
    let b_ns = sb.netns("t80-b");
    {
        let a = Net::open(&a_ns).expect("a");
        let b = Net::open(&b_ns).expect("b");
        link::create_veth(&a, "fltu0", "fltu0", &b_ns, 1500)
            .await
            .expect("underlay");
        for (n, addr) in [(&a, "192.168.80.1/24"), (&b, "192.168.80.2/24")] {
            let idx = link::index(n, "fltu0").await.expect("idx").expect("exists");
            link::ensure_address(n, idx, net(addr)).await.expect("addr");
            link::set_up(n, "fltu0").await.expect("up");
        }
    }
    let a = host(&sb, &a_ns, "t80-a", 1).await;
    let b = host(&sb, &b_ns, "t80-b", 2).await;
    let (k1, k2) = (key(1, 0x11), key(2, 0x22));
    let cfg = |h: &Host| TunnelConfig {
        ifname: "fltet0".into(),
        listen: h.underlay,
        mtu: MTU,
    };
    let ta = Tunnel::start(&a.net, cfg(&a), vec![k1.clone()])
        .await
        .expect("tunnel a");
    let tb = Tunnel::start(&b.net, cfg(&b), vec![k1.clone()])
        .await
        .expect("tunnel b");
    // starting again on the same name while the first holds it fails cleanly
    assert!(Tunnel::start(&a.net, cfg(&a), vec![k1.clone()])
        .await
        .is_err());
    let peer_a = TunnelPeer {
        underlay: a.underlay,
        routes: vec![net("10.200.1.0/24")],
    };
    let peer_b = TunnelPeer {
        underlay: b.underlay,
        routes: vec![net("10.200.2.0/24")],
    };
    // B also accepts a test injector at A's underlay address, port 40001
    let injector_addr = SocketAddrV4::new(*a.underlay.ip(), 40001);
    let injector_peer = TunnelPeer {
        underlay: injector_addr,
        routes: vec![net("10.200.1.0/24")],
    };
    ta.set_peers(&a.net, std::slice::from_ref(&peer_b))
        .await
        .expect("peers a");
    tb.set_peers(&b.net, &[peer_a.clone(), injector_peer.clone()])
        .await
        .expect("peers b");
    // idempotent, and the routes are the peers' blocks through the device
    ta.set_peers(&a.net, std::slice::from_ref(&peer_b))
        .await
        .expect("peers a again");
    assert_eq!(
        crypt::routes(&a.net, "fltet0").await.expect("routes"),
        vec![net("10.200.2.0/24")]
    );
    assert_eq!(
        crypt::routes(&b.net, "fltet0").await.expect("routes"),
        vec![net("10.200.1.0/24")]
    );

    // (1) + (2): an HTTP-ish exchange both ways, captured on A's underlay veth
    let token = format!("SECRET-BODY-{}", random_hex());
    let request = format!("{token}-REQ ").repeat(600).into_bytes(); // ~20 KB, many packets
    let response = format!("{token}-RESP ").repeat(600).into_bytes();
    let control = format!("CONTROL-{}", random_hex());
    let fltu0 = link::index(&a.net, "fltu0")
        .await
        .expect("idx")
        .expect("underlay");
    let cap = Capture::start(
        &a.ns,
        fltu0,
        vec![token.clone().into_bytes(), control.clone().into_bytes()],
    );
    let srv = SocketAddr::from(([10, 200, 2, 2], 8080));
    http_server(&b.task, srv, request.clone(), response.clone());
    for _ in 0..3 {
        let got = post_until(&a.task, srv, &request).expect("a task -> b task through the tunnel");
        assert!(got == response, "the response body came back intact");
    }
    let sa = wait_stats(&ta, "a sent and received", |s| {
        s.tx_packets > 5 && s.rx_packets > 5
    });
    let sb_ = tb.stats();
    // TCP segments of many packets crossed whole: sealed as one message, sent as several
    // datagrams
    assert!(
        sa.tx_datagrams > sa.tx_packets && sb_.tx_datagrams > sb_.tx_packets,
        "segmentation offload in use: {sa:?} {sb_:?}"
    );
    // the capture does see plaintext sent over the underlay: a control datagram, sent last
    let ctl = udp_in(&a.ns, SocketAddrV4::new(*a.underlay.ip(), 0));
    ctl.send_to(
        control.as_bytes(),
        SocketAddrV4::new(*b.underlay.ip(), 9999),
    )
    .expect("control datagram");
    let end = Instant::now() + WAIT;
    while cap.seen().hits[1] == 0 {
        assert!(
            Instant::now() < end,
            "control datagram not captured: {:?}",
            cap.seen()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let seen = cap.finish();
    assert!(seen.hits[1] >= 1, "the capture works: {seen:?}");
    assert!(
        seen.tunnel_datagrams as u64 >= sa.tx_packets.min(sb_.tx_packets),
        "tunnel datagrams on the underlay: {seen:?} {sa:?}"
    );
    assert_eq!(
        (seen.hits[0], seen.drops),
        (0, 0),
        "no plaintext body on the underlay, every frame looked at: {seen:?}"
    );
    assert_eq!(sa.rx_dropped(), 0, "{sa:?}");
    assert_eq!(sb_.rx_dropped(), 0, "{sb_:?}");

    // (3) a well-formed datagram from a source that is no peer is dropped before crypto
    let task_b_udp = udp_in(
        &b.task,
        SocketAddrV4::new(Ipv4Addr::new(10, 200, 2, 2), 7000),
    );
    let inner = |payload: &[u8]| {
        udp_packet(
            SocketAddrV4::new(Ipv4Addr::new(10, 200, 1, 2), 7001),
            SocketAddrV4::new(Ipv4Addr::new(10, 200, 2, 2), 7000),
            payload,
        )
    };
    let before = tb.stats();
    let stranger = udp_in(&a.ns, SocketAddrV4::new(*a.underlay.ip(), 40002));
    let sealed = crypt::seal_packet(
        &k1,
        crypt::new_salt().expect("salt"),
        0,
        &inner(b"from-a-stranger"),
    )
    .expect("seal");
    stranger.send_to(&sealed, b.underlay).expect("send");
    wait_stats(&tb, "stranger dropped", |s| {
        s.dropped_unknown_peer == before.dropped_unknown_peer + 1
    });
    assert!(!receives(&task_b_udp, b"from-a-stranger"));

    // the injector is a peer: its packet arrives, its replay does not
    let injector = udp_in(&a.ns, injector_addr);
    let salt = crypt::new_salt().expect("salt");
    let p = crypt::seal_packet(&k1, salt, 0, &inner(b"k1-0")).expect("seal");
    injector.send_to(&p, b.underlay).expect("send");
    assert!(
        receives(&task_b_udp, b"k1-0"),
        "a peer's sealed datagram arrives"
    );
    let before = tb.stats();
    injector.send_to(&p, b.underlay).expect("send");
    wait_stats(&tb, "replay dropped", |s| {
        s.dropped_replay == before.dropped_replay + 1
    });
    // a tampered one fails the tag
    let mut bad = crypt::seal_packet(&k1, salt, 1, &inner(b"k1-1")).expect("seal");
    let last = bad.len() - 1;
    bad[last] ^= 1;
    injector.send_to(&bad, b.underlay).expect("send");
    wait_stats(&tb, "tampered dropped", |s| {
        s.dropped_auth == before.dropped_auth + 1
    });
    // an inner source outside the injector's routes is refused
    let spoof = udp_packet(
        SocketAddrV4::new(Ipv4Addr::new(10, 200, 9, 9), 7001),
        SocketAddrV4::new(Ipv4Addr::new(10, 200, 2, 2), 7000),
        b"spoofed",
    );
    let p = crypt::seal_packet(&k1, salt, 2, &spoof).expect("seal");
    injector.send_to(&p, b.underlay).expect("send");
    wait_stats(&tb, "spoofed source dropped", |s| {
        s.dropped_source == before.dropped_source + 1
    });

    // (4) rotation: the new key is added second everywhere, promoted on A then B, then the old
    // one retired; traffic flows at every step
    let steps: [(&Tunnel, Vec<TunnelKey>); 6] = [
        (&ta, vec![k1.clone(), k2.clone()]),
        (&tb, vec![k1.clone(), k2.clone()]),
        (&ta, vec![k2.clone(), k1.clone()]),
        (&tb, vec![k2.clone(), k1.clone()]),
        (&ta, vec![k2.clone()]),
        (&tb, vec![k2.clone()]),
    ];
    for (i, (t, keys)) in steps.into_iter().enumerate() {
        t.set_keys(keys);
        let got = post(&a.task, srv, &request).unwrap_or_else(|e| panic!("step {i}: {e}"));
        assert!(got == response, "step {i}");
    }
    let sa = ta.stats();
    assert_eq!(
        (sa.dropped_unknown_key, sa.dropped_auth),
        (0, 0),
        "no packet lost to the rotation: {sa:?}"
    );
    let before = tb.stats();
    let p =
        crypt::seal_packet(&k1, crypt::new_salt().expect("salt"), 0, &inner(b"old")).expect("seal");
    injector.send_to(&p, b.underlay).expect("send");
    wait_stats(&tb, "retired key refused", |s| {
        s.dropped_unknown_key == before.dropped_unknown_key + 1
    });
    assert!(!receives(&task_b_udp, b"old"));
    let p =
        crypt::seal_packet(&k2, crypt::new_salt().expect("salt"), 0, &inner(b"new")).expect("seal");
    injector.send_to(&p, b.underlay).expect("send");
    assert!(receives(&task_b_udp, b"new"), "the current key is accepted");

    // peers withdrawn: routes gone, nothing delivered
    ta.set_peers(&a.net, &[]).await.expect("no peers");
    assert!(crypt::routes(&a.net, "fltet0")
        .await
        .expect("routes")
        .is_empty());
    assert!(post(&a.task, srv, &request).is_err());

    // (5) drop removes the device (and its routes)
    drop(ta);
    drop(tb);
    for h in [&a, &b] {
        let end = Instant::now() + WAIT;
        while link::index(&h.net, "fltet0").await.expect("idx").is_some() {
            assert!(Instant::now() < end, "tun device left behind");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(crypt::routes(&h.net, "fltet0")
            .await
            .expect("routes")
            .is_empty());
    }
    // and the name can be used again
    let again = Tunnel::start(&a.net, cfg(&a), vec![k2])
        .await
        .expect("restart");
    assert_eq!(again.ifname(), "fltet0");
}
