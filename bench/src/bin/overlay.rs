//! Task network benchmark, on the kernel's data path as a node programs it (`flotilla-net`):
//! two "hosts" (network namespaces joined by a veth underlay, 1500 MTU), each with the node's
//! bridge, VXLAN device, NAT chains and VIP chain, and tasks in namespaces of their own.
//!
//! * **Throughput and round trips between hosts**: a task on host A to a task on host B over
//!   the VXLAN overlay, and over the encrypted tunnel (`flotilla_net::crypt`, AES-256-GCM in
//!   userspace over TUN + UDP; its routes win over the VXLAN ones while that kind runs),
//!   against host A to host B over the underlay (the anchor, same run): one TCP stream of
//!   `--mib` MiB, and `--pings` one-byte round trips on one connection (p50, p99).
//! * **New connections through a VIP**: connect, one byte each way, close; from a task to a
//!   task on the same host and on the other host, directly and through the VIP (destination
//!   NAT), alternating in rounds. Reports connections/s and p50/p99 per connection.
//!
//! Run: `cargo build --release -p flotilla-bench --bin overlay && target/release/overlay`
//! Options: `--rounds 5`, `--conns 2000` (per round and kind), `--mib 1024`, `--pings 5000`.
//! Needs root (namespaces, iptables). Sends nothing outside the namespaces it creates.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::Ipv4Net;

use flotilla_bench::machine;
use flotilla_net::crypt::{self, Tunnel, TunnelConfig, TunnelKey, TunnelPeer};
use flotilla_net::nat::{self, VipBalance};
use flotilla_net::overlay::{self, OverlayPeer, Vxlan};
use flotilla_net::task::{self, TaskLink};
use flotilla_net::{bridge, link, netns, route, Net};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 2);
const VIP_FAR: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 3);
/// The encrypted tunnel's device and UDP port.
const TUN: &str = "fltet0";
const TUN_PORT: u16 = 51820;

struct Args {
    rounds: usize,
    conns: usize,
    mib: usize,
    pings: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        rounds: 5,
        conns: 2000,
        mib: 1024,
        pings: 5000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let n: usize = value
            .parse()
            .with_context(|| format!("{flag} {value}: not a number"))?;
        match flag.as_str() {
            "--rounds" => a.rounds = n.max(1),
            "--conns" => a.conns = n.max(10),
            "--mib" => a.mib = n.max(1),
            "--pings" => a.pings = n.max(10),
            other => bail!("unknown option {other} (--rounds, --conns, --mib, --pings)"),
        }
    }
    Ok(a)
}

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("a literal network")
}

/// Namespaces under a temporary directory, removed on drop.
struct Namespaces {
    dir: tempfile::TempDir,
}

impl Namespaces {
    fn create(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(netns::create(self.dir.path(), name)?)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        if let Ok(list) = netns::list(self.dir.path()) {
            for p in list {
                let _ = netns::remove(&p);
            }
        }
    }
}

/// A host: bridge `fltbr0` with 10.200.<n>.1/24, VXLAN over `underlay`, the node's chains.
async fn host(ns: &Path, n: u8, underlay: Ipv4Addr) -> anyhow::Result<Net> {
    let h = Net::open(ns)?;
    bridge::ensure_bridge(&h, "fltbr0", net(&format!("10.200.{n}.1/24")), 1450).await?;
    overlay::ensure_vxlan(
        &h,
        &Vxlan {
            name: "fltvx0".into(),
            vni: 1,
            port: overlay::DEFAULT_PORT,
            local: underlay,
            subnet: net(&format!("10.200.{n}.0/24")),
            mtu: 1450,
        },
    )
    .await?;
    route::ensure_local(&h, net("10.199.0.0/16"), 100).await?;
    nat::ensure(
        &h,
        &nat::NatRules {
            tag: format!("bench{n}"),
            subnet: net(&format!("10.200.{n}.0/24")),
            bridge: "fltbr0".into(),
            overlay: Some("fltvx0".into()),
            cluster_pool: Some(net("10.200.0.0/16")),
            outbound_nat: true,
            // the encrypted tunnel's device, like the overlay's
            trusted_ifaces: vec![TUN.into()],
            vxlan_port: Some(overlay::DEFAULT_PORT),
            dns: None,
            vip_pool: Some(net("10.199.0.0/16")),
        },
    )
    .await?;
    Ok(h)
}

async fn task_on(
    spaces: &Namespaces,
    host: &Net,
    name: &str,
    addr: &str,
    veth: &str,
) -> anyhow::Result<PathBuf> {
    task_on_mtu(spaces, host, name, addr, veth, 1450).await
}

/// A task namespace on `host` whose interface has MTU `mtu`.
async fn task_on_mtu(
    spaces: &Namespaces,
    host: &Net,
    name: &str,
    addr: &str,
    veth: &str,
    mtu: u32,
) -> anyhow::Result<PathBuf> {
    let ns = spaces.create(name)?;
    let a: Ipv4Net = addr.parse()?;
    let o = a.network().octets();
    task::attach(
        host,
        &TaskLink {
            netns: ns.clone(),
            host_ifname: veth.into(),
            bridge: "fltbr0".into(),
            addr: a,
            gateway: Ipv4Addr::new(o[0], o[1], o[2], 1),
            mtu,
        },
    )
    .await?;
    Ok(ns)
}

/// Binds a listener inside `ns`.
fn listen(ns: &Path, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    Ok(netns::run_in(ns, move || TcpListener::bind(addr))??)
}

/// Serves forever: echo each byte back (round trips and new connections), or swallow a
/// stream when the first byte is `S`.
fn serve(listener: TcpListener) {
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = c.set_nodelay(true);
                let mut c = c;
                let mut first = [0u8; 1];
                if c.read_exact(&mut first).is_err() {
                    return;
                }
                if first[0] == b'S' {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut total = 0u64;
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = c.write_all(&total.to_be_bytes());
                    return;
                }
                if c.write_all(&first).is_err() {
                    return;
                }
                let mut b = [0u8; 1];
                while c.read_exact(&mut b).is_ok() {
                    if c.write_all(&b).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn connect(ns: &Path, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = netns::run_in(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(2))
    })??;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// MiB/s of one stream of `mib` MiB from `ns` to `to`.
fn stream(ns: &Path, to: SocketAddr, mib: usize) -> anyhow::Result<f64> {
    let mut s = connect(ns, to)?;
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    s.write_all(b"S")?;
    for _ in 0..mib {
        s.write_all(&chunk)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut total = [0u8; 8];
    s.read_exact(&mut total)?;
    let secs = start.elapsed().as_secs_f64();
    let got = u64::from_be_bytes(total);
    if got != (mib as u64) << 20 {
        bail!("the server counted {got} bytes of {}", (mib as u64) << 20);
    }
    Ok(mib as f64 / secs)
}

/// `n` one-byte round trips on one connection; their durations.
fn pings(ns: &Path, to: SocketAddr, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut s = connect(ns, to)?;
    let mut out = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(b"p")?;
        s.read_exact(&mut b)?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// `n` new connections (connect, one byte each way, close); their durations.
fn conns(ns: &Path, to: SocketAddr, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for _ in 0..n {
        let t = Instant::now();
        let mut s = connect(ns, to)?;
        s.write_all(b"c")?;
        s.read_exact(&mut b)?;
        drop(s);
        out.push(t.elapsed());
    }
    Ok(out)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p / 100.0).round() as usize;
    v[i.min(v.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let spaces = Namespaces {
        dir: tempfile::Builder::new()
            .prefix("flt-bench-net-")
            .tempdir()?,
    };
    let (ua, ub) = (
        Ipv4Addr::new(192, 168, 79, 1),
        Ipv4Addr::new(192, 168, 79, 2),
    );
    let a_ns = spaces.create("bench-a")?;
    let b_ns = spaces.create("bench-b")?;
    {
        let ha = Net::open(&a_ns)?;
        let hb = Net::open(&b_ns)?;
        link::create_veth(&ha, "fltu0", "fltu0", &b_ns, 1500).await?;
        for (h, addr) in [(&ha, "192.168.79.1/24"), (&hb, "192.168.79.2/24")] {
            let idx = link::index(h, "fltu0").await?.context("underlay veth")?;
            link::ensure_address(h, idx, net(addr)).await?;
            link::set_up(h, "fltu0").await?;
        }
    }
    let ha = host(&a_ns, 1, ua).await?;
    let hb = host(&b_ns, 2, ub).await?;
    let peers = [
        OverlayPeer {
            underlay: ua,
            subnet: net("10.200.1.0/24"),
            extra: Vec::new(),
        },
        OverlayPeer {
            underlay: ub,
            subnet: net("10.200.2.0/24"),
            extra: Vec::new(),
        },
    ];
    for (h, tag) in [(&ha, "bench1"), (&hb, "bench2")] {
        overlay::set_peers(h, "fltvx0", &peers).await?;
        nat::set_nodes(h, tag, &[ua, ub]).await?;
    }
    let client = task_on(&spaces, &ha, "bench-client", "10.200.1.2/24", "fltv0").await?;
    let near = task_on(&spaces, &ha, "bench-near", "10.200.1.3/24", "fltv1").await?;
    let far = task_on(&spaces, &hb, "bench-far", "10.200.2.2/24", "fltv0").await?;
    let near_ip = Ipv4Addr::new(10, 200, 1, 3);
    let far_ip = Ipv4Addr::new(10, 200, 2, 2);
    nat::set_vips(
        &ha,
        "bench1",
        &[
            VipBalance {
                vip: VIP,
                mesh_ports: vec![],
                backends: vec![near_ip],
                source: None,
            },
            VipBalance {
                vip: VIP_FAR,
                mesh_ports: vec![],
                backends: vec![far_ip],
                source: None,
            },
        ],
    )
    .await?;
    const PORT: u16 = 5001;
    serve(listen(&near, SocketAddr::from((near_ip, PORT)))?);
    serve(listen(&far, SocketAddr::from((far_ip, PORT)))?);
    serve(listen(&b_ns, SocketAddr::from((ub, PORT)))?);
    // Tasks of an encrypted network, with its MTU (as the agent gives them), so that no path
    // MTU learnt through the tunnel lowers the overlay kind's.
    let tun_mtu = 1500 - crypt::OVERHEAD;
    let e_client = task_on_mtu(
        &spaces,
        &ha,
        "bench-eclient",
        "10.200.1.4/24",
        "fltv2",
        tun_mtu,
    )
    .await?;
    let e_far = task_on_mtu(
        &spaces,
        &hb,
        "bench-efar",
        "10.200.2.4/24",
        "fltv1",
        tun_mtu,
    )
    .await?;
    let e_far_ip = Ipv4Addr::new(10, 200, 2, 4);
    serve(listen(&e_far, SocketAddr::from((e_far_ip, PORT)))?);

    // The encrypted tunnel on both hosts; its routes are installed only while its kind runs.
    let key = TunnelKey {
        id: 1,
        secret: *b"flotilla-bench-tunnel-key-000001",
    };
    let tun_cfg = |ip: Ipv4Addr| TunnelConfig {
        ifname: TUN.into(),
        listen: SocketAddrV4::new(ip, TUN_PORT),
        mtu: tun_mtu,
    };
    let ta = Tunnel::start(&ha, tun_cfg(ua), vec![key.clone()]).await?;
    let tb = Tunnel::start(&hb, tun_cfg(ub), vec![key]).await?;
    let tunnels = [
        (
            &ha,
            &ta,
            TunnelPeer {
                underlay: SocketAddrV4::new(ub, TUN_PORT),
                routes: vec![net("10.200.2.0/24")],
            },
        ),
        (
            &hb,
            &tb,
            TunnelPeer {
                underlay: SocketAddrV4::new(ua, TUN_PORT),
                routes: vec![net("10.200.1.0/24")],
            },
        ),
    ];
    let encrypted = |on: bool| {
        let tunnels = &tunnels;
        async move {
            for (h, t, peer) in tunnels {
                let peers = if on { vec![peer.clone()] } else { vec![] };
                t.set_peers(h, &peers).await?;
            }
            anyhow::Ok(())
        }
    };

    println!("machine: {}", machine());
    println!(
        "{} rounds; per round: a {} MiB stream, {} one-byte round trips, {} new connections per kind",
        a.rounds, a.mib, a.pings, a.conns
    );

    const ENCRYPTED: usize = 2;
    let kinds_stream: [(&str, &Path, SocketAddr); 3] = [
        (
            "host A -> host B (underlay)",
            &a_ns,
            SocketAddr::from((ub, PORT)),
        ),
        (
            "task A -> task B (overlay)",
            &client,
            SocketAddr::from((far_ip, PORT)),
        ),
        (
            "task A -> task B (encrypted)",
            &e_client,
            SocketAddr::from((e_far_ip, PORT)),
        ),
    ];
    let kinds_conn: [(&str, SocketAddr); 4] = [
        ("same host, direct", SocketAddr::from((near_ip, PORT))),
        ("same host, VIP", SocketAddr::from((VIP, PORT))),
        ("other host, direct", SocketAddr::from((far_ip, PORT))),
        ("other host, VIP", SocketAddr::from((VIP_FAR, PORT))),
    ];
    // Warm up (ARP, routes, conntrack, path MTU of the tunnel).
    for (i, (_, ns, to)) in kinds_stream.iter().enumerate() {
        encrypted(i == ENCRYPTED).await?;
        pings(ns, *to, 50)?;
        stream(ns, *to, 8)?;
    }
    encrypted(false).await?;
    for (_, to) in &kinds_conn {
        conns(&client, *to, 50)?;
    }

    let mut tput: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut rtt: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    let mut rate: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut per_conn: Vec<Vec<Duration>> = vec![Vec::new(); 4];
    for r in 0..a.rounds {
        // Alternate the order in each round.
        let order: Vec<usize> = if r % 2 == 0 {
            vec![0, 1, 2]
        } else {
            vec![2, 1, 0]
        };
        for &i in &order {
            let (_, ns, to) = kinds_stream[i];
            encrypted(i == ENCRYPTED).await?;
            tput[i].push(stream(ns, to, a.mib)?);
            rtt[i].extend(pings(ns, to, a.pings)?);
        }
        encrypted(false).await?;
        let order: Vec<usize> = if r % 2 == 0 {
            vec![0, 1, 2, 3]
        } else {
            vec![1, 0, 3, 2]
        };
        for &i in &order {
            let (_, to) = kinds_conn[i];
            let t = Instant::now();
            let d = conns(&client, to, a.conns)?;
            rate[i].push(a.conns as f64 / t.elapsed().as_secs_f64());
            per_conn[i].extend(d);
        }
        println!("round {} of {} done", r + 1, a.rounds);
    }

    println!();
    println!("| path | stream, median MiB/s | round trip p50 / p99 |");
    println!("|---|---:|---:|");
    let mut medians = Vec::new();
    for (i, (name, _, _)) in kinds_stream.iter().enumerate() {
        let m = median(&mut tput[i]);
        medians.push(m);
        let (p50, p99) = (pct(&mut rtt[i], 50.0), pct(&mut rtt[i], 99.0));
        println!("| {name} | {m:.0} | {:.1} / {:.1} µs |", us(p50), us(p99));
    }
    println!(
        "overlay / underlay throughput: {:.2}x (goal >= 0.9x)",
        medians[1] / medians[0]
    );
    println!(
        "encrypted / underlay throughput: {:.2}x (goal >= 0.5x); encrypted / overlay: {:.2}x",
        medians[2] / medians[0],
        medians[2] / medians[1]
    );
    let (sa, sb) = (ta.stats(), tb.stats());
    println!(
        "tunnel A: {} packets sent, {} received, {} dropped; B: {} sent, {} received, {} dropped",
        sa.tx_packets,
        sa.rx_packets,
        sa.rx_dropped() + sa.dropped_no_route + sa.send_errors,
        sb.tx_packets,
        sb.rx_packets,
        sb.rx_dropped() + sb.dropped_no_route + sb.send_errors
    );
    println!("tunnel A counters: {sa:?}");
    println!("tunnel B counters: {sb:?}");
    println!();
    println!("| new connections from a task | median conn/s | per connection p50 / p99 |");
    println!("|---|---:|---:|");
    let mut p99s = Vec::new();
    for (i, (name, _)) in kinds_conn.iter().enumerate() {
        let m = median(&mut rate[i]);
        let (p50, p99) = (pct(&mut per_conn[i], 50.0), pct(&mut per_conn[i], 99.0));
        p99s.push(p99);
        println!("| {name} | {m:.0} | {:.1} / {:.1} µs |", us(p50), us(p99));
    }
    for (label, direct, vip) in [("same host", 0, 1), ("other host", 2, 3)] {
        println!(
            "VIP adds at p99, {label}: {:+.1} µs per connection (goal <= 50 µs)",
            us(p99s[vip]) - us(p99s[direct])
        );
    }
    nat::teardown(&ha, "bench1").await?;
    nat::teardown(&hb, "bench2").await?;
    Ok(())
}
