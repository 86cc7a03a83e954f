//! Listening sockets with the options the mesh needs.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

use crate::MeshError;

/// How listeners are bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenOptions {
    /// `SO_REUSEPORT` (default true): lets a wildcard published port (`0.0.0.0:80`) and a VIP on
    /// the same port (`10.0.9.2:80`) listen side by side, the kernel handing each connection to
    /// the most specific match. Sockets of other programs that did not set it still make the
    /// bind fail, so a taken port is reported.
    pub reuse_port: bool,
    /// `IP_FREEBIND` (default false): bind an address that is not (yet) configured on the host,
    /// e.g. a VIP whose route is set up after the mesh starts.
    pub freebind: bool,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            reuse_port: true,
            freebind: false,
        }
    }
}

fn socket(
    addr: SocketAddr,
    ty: Type,
    proto: Protocol,
    o: ListenOptions,
) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_nonblocking(true)?;
    s.set_reuse_address(true)?;
    if o.reuse_port {
        s.set_reuse_port(true)?;
    }
    if o.freebind {
        if addr.is_ipv4() {
            s.set_freebind_v4(true)?;
        } else {
            s.set_freebind_v6(true)?;
        }
    }
    s.bind(&SockAddr::from(addr))?;
    Ok(s)
}

/// A TCP listener on `addr`. Must be called within a tokio runtime.
pub(crate) fn tcp_listener(
    addr: SocketAddr,
    backlog: u32,
    o: ListenOptions,
) -> Result<TcpListener, MeshError> {
    let bind = || {
        let s = socket(addr, Type::STREAM, Protocol::TCP, o)?;
        s.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
        TcpListener::from_std(std::net::TcpListener::from(s))
    };
    bind().map_err(|source| MeshError::Bind { addr, source })
}

/// A UDP socket on `addr`. Must be called within a tokio runtime.
pub(crate) fn udp_socket(addr: SocketAddr, o: ListenOptions) -> Result<UdpSocket, MeshError> {
    let bind = || {
        let s = socket(addr, Type::DGRAM, Protocol::UDP, o)?;
        UdpSocket::from_std(std::net::UdpSocket::from(s))
    };
    bind().map_err(|source| MeshError::Bind { addr, source })
}
