//! Real traffic inside the lab's namespaces: a thread enters a pod's network namespace and
//! opens sockets there, so no helper binaries are needed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Runs `f` on a fresh thread that has joined network namespace `ns` (a name under
/// /run/netns). Only that thread changes namespace.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(move || {
            meshpath::netns::enter(ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("netns worker thread panicked"))?
    })
}

/// A TCP server in a pod that reads the whole request, then answers `peer=<addr>\n`
/// followed by the request echoed back, and closes.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `[::]:port`, dual-stack, inside `ns`.
    pub fn start(ns: &str, port: u16) -> io::Result<Self> {
        Self::start_with(ns, port, serve_one)
    }

    /// A server that echoes every byte as it arrives, until the client's end of data (for
    /// long-lived streams).
    pub fn start_streaming(ns: &str, port: u16) -> io::Result<Self> {
        Self::start_with(ns, port, |mut stream, _| {
            stream.set_nonblocking(false)?;
            let mut back = stream.try_clone()?;
            io::copy(&mut stream, &mut back)?;
            back.shutdown(std::net::Shutdown::Write)
        })
    }

    /// A tiny HTTP/1.0 server for trying the lab by hand (`cargo xtask run`): any request is
    /// answered with the server's address and the client's as the server saw it.
    pub fn start_http(ns: &str, port: u16) -> io::Result<Self> {
        Self::start_with(ns, port, serve_http)
    }

    fn start_with(ns: &str, port: u16, serve: fn(TcpStream, SocketAddr) -> io::Result<()>) -> io::Result<Self> {
        let listener = in_netns(ns, || -> io::Result<TcpListener> {
            let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
            s.set_only_v6(false)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())?;
            s.listen(128)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        std::thread::spawn(move || {
                            let _ = serve(stream, peer);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(mut stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = Vec::new();
    stream.read_to_end(&mut req)?;
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    stream.write_all(format!("peer={peer}\n").as_bytes())?;
    stream.write_all(&req)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// Reads a request's head (up to a blank line, at most 16 KiB, 5 s) and answers
/// `HTTP/1.0 200` with `<server address> saw you as <client address>`.
fn serve_http(mut stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf)? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let body = format!("{} saw you as {}\n", canonical(stream.local_addr()?), canonical(peer));
    let response = format!(
        "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// What one request/response exchange showed.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The client's own socket address.
    pub client: SocketAddr,
    /// The client address as the server saw it.
    pub server_saw: SocketAddr,
    /// Whether the payload came back byte for byte.
    pub echoed_intact: bool,
}

/// From inside `ns`, connects to `dst`, sends `payload`, half-closes and reads the answer.
/// With `source`, binds that address first (IP_TRANSPARENT: it need not be configured and
/// routing accepts it as a source), which is how the tests forge a spoofed source.
pub fn exchange(
    ns: &str,
    source: Option<IpAddr>,
    dst: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<Exchange> {
    in_netns(ns, || -> io::Result<Exchange> {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(src) = source {
            s.set_ip_transparent_v4(true)?;
            s.bind(&SocketAddr::new(src, 0).into())?;
        }
        s.connect_timeout(&SockAddr::from(dst), timeout)?;
        let mut stream: TcpStream = s.into();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let client = stream.local_addr()?;
        stream.write_all(payload)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let server_saw = line
            .trim_end()
            .strip_prefix("peer=")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unexpected greeting {line:?}")))?;
        let mut echoed = Vec::new();
        reader.read_to_end(&mut echoed)?;
        Ok(Exchange { client, server_saw, echoed_intact: echoed == payload })
    })?
}

/// A payload whose corruption would show: `len` bytes of a counter pattern.
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}
