//! PROXY protocol headers (HAProxy's spec, versions 1 and 2) that carry the real client address to
//! a backend that opted in.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Which PROXY protocol header to prepend to backend connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// Text header: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
    V1,
    /// Binary header (12-byte signature, version/command, family, addresses).
    V2,
}

/// Signature that starts every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Both addresses in the same family (an IPv4 address meeting an IPv6 one is written mapped).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V6(_)) => (
            SocketAddr::new(IpAddr::V6(s.to_ipv6_mapped()), src.port()),
            dst,
        ),
        (IpAddr::V6(_), IpAddr::V4(d)) => (
            src,
            SocketAddr::new(IpAddr::V6(d.to_ipv6_mapped()), dst.port()),
        ),
        _ => (src, dst),
    }
}

/// The header for a TCP connection from `src` (the client) to `dst` (the address it connected to).
pub fn encode(version: ProxyProtocol, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    match version {
        ProxyProtocol::V1 => {
            let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {fam} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        ProxyProtocol::V2 => {
            let mut out = Vec::with_capacity(16 + 36);
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x21); // version 2, command PROXY
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11); // AF_INET, STREAM
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    let v6 = |ip: IpAddr| match ip {
                        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                        IpAddr::V6(v6) => v6.octets(),
                    };
                    out.push(0x21); // AF_INET6, STREAM
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&v6(s));
                    out.extend_from_slice(&v6(d));
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_text() {
        let h = encode(
            ProxyProtocol::V1,
            "10.0.0.1:4242".parse().expect("addr"),
            "10.0.0.2:80".parse().expect("addr"),
        );
        assert_eq!(h, b"PROXY TCP4 10.0.0.1 10.0.0.2 4242 80\r\n");
        let h = encode(
            ProxyProtocol::V1,
            "[::1]:1".parse().expect("addr"),
            "10.0.0.2:80".parse().expect("addr"),
        );
        assert_eq!(h, b"PROXY TCP6 ::1 ::ffff:10.0.0.2 1 80\r\n");
    }

    #[test]
    fn v2_binary() {
        let h = encode(
            ProxyProtocol::V2,
            "10.0.0.1:4242".parse().expect("addr"),
            "10.0.0.2:80".parse().expect("addr"),
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[10, 0, 0, 1]);
        assert_eq!(&h[20..24], &[10, 0, 0, 2]);
        assert_eq!(&h[24..], &[0x10, 0x92, 0, 80]);
        let h6 = encode(
            ProxyProtocol::V2,
            "[::1]:1".parse().expect("addr"),
            "[::2]:2".parse().expect("addr"),
        );
        assert_eq!(h6.len(), 16 + 36);
        assert_eq!(h6[13], 0x21);
    }
}
