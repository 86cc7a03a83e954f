//! The node's upstream resolvers, for the DNS responder to forward names outside the cluster to.
//!
//! They come from `--dns` on `node run`, else from the host's `/etc/resolv.conf`. When that file
//! names only systemd-resolved's stub (`127.0.0.53`), the resolvers behind it are read from
//! `/run/systemd/resolve/resolv.conf`, as Docker does: the stub works from the host (where the
//! responder forwards from) but adds a hop and a second cache.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

/// systemd-resolved's stub listener.
pub const RESOLVED_STUB: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53));
/// At most this many upstreams are used (glibc's MAXNS is 3).
pub const MAX_UPSTREAMS: usize = 3;
/// A resolv.conf longer than this is not read (the file is tiny in practice).
const MAX_FILE: u64 = 64 << 10;

/// The `nameserver` addresses of resolv.conf text, on port 53, at most [`MAX_UPSTREAMS`].
/// Lines that do not parse (IPv6 zone ids, garbage) are skipped.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let sa = SocketAddr::new(ip, 53);
        if !out.contains(&sa) && !ip.is_unspecified() {
            out.push(sa);
        }
        if out.len() == MAX_UPSTREAMS {
            break;
        }
    }
    out
}

fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let mut s = String::new();
    f.take(MAX_FILE).read_to_string(&mut s).ok()?;
    Some(s)
}

/// The host's upstream resolvers: `/etc/resolv.conf`'s, or the ones behind systemd-resolved's
/// stub. Empty when none are configured (the responder then answers only cluster names).
pub fn host_upstreams() -> Vec<SocketAddr> {
    upstreams_from(
        Path::new("/etc/resolv.conf"),
        Path::new("/run/systemd/resolve/resolv.conf"),
    )
}

/// [`host_upstreams`] with the two files given.
pub fn upstreams_from(resolv_conf: &Path, resolved_conf: &Path) -> Vec<SocketAddr> {
    let main = read_small(resolv_conf)
        .map(|t| nameservers(&t))
        .unwrap_or_default();
    if !main.is_empty() && main.iter().all(|s| s.ip() == RESOLVED_STUB) {
        let behind = read_small(resolved_conf)
            .map(|t| nameservers(&t))
            .unwrap_or_default();
        if !behind.is_empty() {
            return behind;
        }
    }
    main
}

/// Parses one `--dns` value: `IP` or `IP:PORT` (`[V6]:PORT` for IPv6).
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    t.parse::<SocketAddr>()
        .or_else(|_| t.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| {
            format!("--dns {s:?}: give an address, e.g. 192.0.2.53 or 192.0.2.53:5353, or none")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn nameserver_lines_give_the_upstreams() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver\t2001:db8::1\n\
                    nameserver 10.0.0.2\noptions ndots:2\nnameserver 10.0.0.3\nnameserver 10.0.0.4\n";
        assert_eq!(
            nameservers(text),
            [sa("10.0.0.2:53"), sa("[2001:db8::1]:53"), sa("10.0.0.3:53")]
        );
    }

    #[test]
    fn hostile_resolv_conf_lines_are_skipped() {
        let long = format!("nameserver {}\n", "1".repeat(100_000));
        for text in [
            "nameserver\n",
            "nameserver fe80::1%eth0\n",
            "nameserver 0.0.0.0\n",
            "nameserver 999.1.1.1\n",
            "nameserver 10.0.0.1:53\n",
            "nameservers 10.0.0.1\n",
            "\0\0\0",
            long.as_str(),
            "nameserver ＡＢＣ\n",
        ] {
            assert!(nameservers(text).is_empty(), "{text:.40}");
        }
    }

    #[test]
    fn the_systemd_resolved_stub_is_looked_behind() {
        let d = tempfile::tempdir().expect("tempdir");
        let (main, behind) = (d.path().join("resolv.conf"), d.path().join("resolved.conf"));
        std::fs::write(&main, "nameserver 127.0.0.53\noptions edns0\n").expect("write");
        std::fs::write(&behind, "nameserver 192.0.2.1\nnameserver 192.0.2.2\n").expect("write");
        assert_eq!(
            upstreams_from(&main, &behind),
            [sa("192.0.2.1:53"), sa("192.0.2.2:53")]
        );
        // Without the file behind it, the stub itself (reachable from the host).
        assert_eq!(
            upstreams_from(&main, &d.path().join("none")),
            [sa("127.0.0.53:53")]
        );
        // A stub beside a real server: kept as written.
        std::fs::write(&main, "nameserver 127.0.0.53\nnameserver 192.0.2.9\n").expect("write");
        assert_eq!(upstreams_from(&main, &behind).len(), 2);
        assert!(upstreams_from(&d.path().join("missing"), &behind).is_empty());
    }

    #[test]
    fn dns_flags_parse() {
        assert_eq!(parse_upstream("192.0.2.53"), Ok(sa("192.0.2.53:53")));
        assert_eq!(parse_upstream("192.0.2.53:5353"), Ok(sa("192.0.2.53:5353")));
        assert_eq!(
            parse_upstream("[2001:db8::1]:53"),
            Ok(sa("[2001:db8::1]:53"))
        );
        assert_eq!(parse_upstream("2001:db8::1"), Ok(sa("[2001:db8::1]:53")));
        for bad in ["", "dns.example", "192.0.2.53:99999", "1.2.3", "none "] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }
}
