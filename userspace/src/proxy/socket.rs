//! Socket set-up for the proxy: transparent listeners, and upstream connections behind the
//! [`SocketFactory`] seam (the kernel's transparent sockets in production; plain loopback
//! connections in the unit tests, which need neither root nor a datapath).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use futures::future::BoxFuture;
use meshpath_common::names::PROXY_MARK;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How the proxy makes its upstream connections, and learns a connection's destination
/// before NAT.
pub trait SocketFactory: Send + Sync + 'static {
    /// Connects to `dst`, from `source` when given (the original client's address, which is
    /// not one of this host's), within `timeout`; a timeout is `ErrorKind::TimedOut`.
    fn connect(
        &self,
        dst: SocketAddr,
        source: Option<IpAddr>,
        timeout: Duration,
    ) -> BoxFuture<'_, io::Result<TcpStream>>;

    /// The destination the client dialed before a NAT rewrote it to `local`, when one did.
    fn pre_nat_destination(&self, stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr>;
}

/// The production sockets: marked so the datapath never captures them again, and bound to
/// the client's address (IP_TRANSPARENT) when the connection keeps it.
#[derive(Clone, Copy, Debug, Default)]
pub struct TransparentSockets;

impl SocketFactory for TransparentSockets {
    fn connect(
        &self,
        dst: SocketAddr,
        source: Option<IpAddr>,
        timeout: Duration,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(connect_upstream(dst, source, timeout))
    }

    fn pre_nat_destination(&self, stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
        pre_nat_destination(stream, local)
    }
}

/// A listening socket for `port` on the loopback address of the family. sk_lookup hands it
/// connections for any address, so it never needs to be reachable on its own address;
/// binding loopback keeps it off the network.
///
/// SO_REUSEPORT lets a successor bind the same ports while this daemon still serves (a
/// takeover); which of the two gets connections is decided by the SOCKMAP slot alone (the
/// program assigns with `BPF_SK_LOOKUP_F_NO_REUSEPORT`). IP_TRANSPARENT lets it accept
/// connections whose destination is not a local address.
pub fn transparent_listener(ipv6: bool, port: u16) -> io::Result<TcpListener> {
    let (domain, ip) = if ipv6 {
        (Domain::IPV6, IpAddr::V6(Ipv6Addr::LOCALHOST))
    } else {
        (Domain::IPV4, IpAddr::V4(Ipv4Addr::LOCALHOST))
    };
    let s = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if ipv6 {
        s.set_only_v6(true)?;
    }
    // IP_TRANSPARENT and IPV6_TRANSPARENT set the same socket flag; Linux accepts the
    // SOL_IP option on IPv6 sockets.
    s.set_ip_transparent_v4(true)?;
    s.bind(&SocketAddr::new(ip, port).into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Connects to `dst` with the proxy's mark, optionally from `source` (a non-local address:
/// the original client), within `timeout`.
async fn connect_upstream(dst: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> io::Result<TcpStream> {
    let sock = if dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    let s = SockRef::from(&sock);
    s.set_mark(PROXY_MARK)?;
    s.set_tcp_nodelay(true)?;
    if let Some(src) = source {
        s.set_ip_transparent_v4(true)?;
        // The port is then chosen at connect, for the whole 4-tuple, where TIME_WAIT
        // sockets of earlier connections can be reused; chosen at bind (port 0 for the
        // address alone) every TIME_WAIT from this client IP blocks its port, and under
        // churn binds crawl through tens of thousands of them.
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .map_err(io::Error::from)?;
        sock.bind(SocketAddr::new(src, 0))?;
    }
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {dst} timed out after {timeout:?}"))),
    }
}

/// The destination the client dialed before a NAT rewrote it, when one did: kube-proxy
/// DNATs service addresses in PREROUTING, before the packet reaches our local delivery, so
/// the accepted socket's own address is then the endpoint kube-proxy chose. Reading
/// kube-proxy's conntrack entry (meshpath creates none) gives the service address back.
fn pre_nat_destination(stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let s = SockRef::from(stream);
    let orig = if local.is_ipv4() { s.original_dst_v4() } else { s.original_dst_v6() };
    orig.ok()?.as_socket().map(|a| SocketAddr::new(a.ip().to_canonical(), a.port())).filter(|a| *a != local)
}

/// Makes the next close of `stream` send a RST instead of a FIN, so a reset on one side of
/// a relay reaches the other side as a reset.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
