//! An in-process network for the proxy's unit tests (no root, no datapath): the addresses a
//! proxy dials (pods, service endpoints, peers' HBONE ports) lead to loopback listeners,
//! and each connection keeps the source address it was made from, so the proxy or server
//! at the other end sees the client it would see on a real node.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use meshpath_common::Listener;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::Proxy;
use super::socket::SocketFactory;
use crate::state::canonical;
use crate::sync::lock;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// One upstream connection a proxy asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dial {
    pub dst: SocketAddr,
    /// The client address it was to be made from; `None`: the node's own.
    pub source: Option<IpAddr>,
}

#[derive(Clone, Copy, Debug)]
enum Route {
    To(SocketAddr),
    /// Never answers: a connect times out.
    Blackhole,
}

#[derive(Default)]
pub struct TestNet {
    routes: Mutex<HashMap<SocketAddr, Route>>,
    /// Connections made, by their real local address: the source they stand for and the
    /// address they dialed.
    made: Mutex<HashMap<SocketAddr, (Option<IpAddr>, SocketAddr)>>,
    dials: Mutex<Vec<Dial>>,
    /// Accepted connections a NAT turned, by their real peer address: what was dialed.
    natted: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl TestNet {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Every upstream connection asked for so far.
    pub fn dials(&self) -> Vec<Dial> {
        lock(&self.dials).clone()
    }

    /// Connects to `dst` never complete.
    pub fn blackhole(&self, dst: SocketAddr) {
        lock(&self.routes).insert(dst, Route::Blackhole);
    }

    /// An echo server at `dst`: it first says who it sees (`peer=<ip>\n`, `peer=node\n` for
    /// the node's own address), then echoes everything until the client's end of data.
    pub async fn echo(self: &Arc<Self>, dst: SocketAddr) {
        let l = TcpListener::bind((LOOPBACK, 0)).await.expect("a loopback listener");
        lock(&self.routes).insert(dst, Route::To(l.local_addr().expect("an address")));
        let net = self.clone();
        tokio::spawn(async move {
            while let Ok((mut s, peer)) = l.accept().await {
                let seen = match lock(&net.made).remove(&peer) {
                    Some((Some(ip), _)) => ip.to_string(),
                    _ => "node".into(),
                };
                tokio::spawn(async move {
                    let _ = s.write_all(format!("peer={seen}\n").as_bytes()).await;
                    let (mut rd, mut wr) = s.split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                    let _ = wr.shutdown().await;
                });
            }
        });
    }

    /// `proxy`'s `role` listener, reached at every address of `dsts` (as sk_lookup steers
    /// them): it sees each connection from the address it was made from, to the one dialed.
    pub async fn listen(self: &Arc<Self>, proxy: &Arc<Proxy>, role: Listener, dsts: &[SocketAddr]) {
        let l = TcpListener::bind((LOOPBACK, 0)).await.expect("a loopback listener");
        let at = l.local_addr().expect("an address");
        for d in dsts {
            lock(&self.routes).insert(*d, Route::To(at));
        }
        let (net, proxy) = (self.clone(), proxy.clone());
        tokio::spawn(async move {
            while let Ok((s, peer)) = l.accept().await {
                let Some((source, dialed)) = lock(&net.made).remove(&peer) else { continue };
                proxy.accepted(role, s, SocketAddr::new(source.unwrap_or(LOOPBACK), peer.port()), dialed);
            }
        });
    }

    /// A client at `from` connecting to `dst`, captured into `proxy`'s `role` listener.
    pub async fn capture(proxy: &Arc<Proxy>, role: Listener, from: SocketAddr, dst: SocketAddr) -> TcpStream {
        let (client, accepted) = loopback_pair().await;
        proxy.accepted(role, accepted, from, dst);
        client
    }

    /// As [`Self::capture`], dialed to `frontend`, which a NAT on the node turned toward
    /// `dst` (the proxy finds `frontend` as the connection's pre-NAT destination).
    pub async fn capture_via(
        &self,
        proxy: &Arc<Proxy>,
        role: Listener,
        from: SocketAddr,
        frontend: SocketAddr,
        dst: SocketAddr,
    ) -> TcpStream {
        let (client, accepted) = loopback_pair().await;
        lock(&self.natted).insert(accepted.peer_addr().expect("a peer"), frontend);
        proxy.accepted(role, accepted, from, dst);
        client
    }
}

/// Both ends of a loopback connection: the client's, and the accepted one.
async fn loopback_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind((LOOPBACK, 0)).await.expect("a loopback listener");
    let client = TcpStream::connect(l.local_addr().expect("an address")).await.expect("connects");
    let (accepted, _) = l.accept().await.expect("accepts");
    (client, accepted)
}

impl SocketFactory for TestNet {
    fn connect(
        &self,
        dst: SocketAddr,
        source: Option<IpAddr>,
        timeout: Duration,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        let dst = canonical(dst);
        lock(&self.dials).push(Dial { dst, source });
        let route = lock(&self.routes).get(&dst).copied();
        Box::pin(async move {
            match route {
                None => Err(io::ErrorKind::ConnectionRefused.into()),
                Some(Route::Blackhole) => {
                    tokio::time::sleep(timeout).await;
                    Err(io::ErrorKind::TimedOut.into())
                }
                Some(Route::To(real)) => {
                    // Bound first, so the other end finds what this connection stands for as
                    // soon as it accepts it.
                    let sock = TcpSocket::new_v4()?;
                    sock.bind((LOOPBACK, 0).into())?;
                    lock(&self.made).insert(sock.local_addr()?, (source, dst));
                    sock.connect(real).await
                }
            }
        })
    }

    fn pre_nat_destination(&self, stream: &TcpStream, _: SocketAddr) -> Option<SocketAddr> {
        lock(&self.natted).get(&stream.peer_addr().ok()?).copied()
    }
}

/// Reads the echo server's greeting: whom it saw.
pub async fn greeting(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).await.expect("reads the greeting") == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Sends `data` and reads the same number of bytes back.
pub async fn echo_back(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).await.expect("writes");
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).await.expect("reads the echo");
    back
}
