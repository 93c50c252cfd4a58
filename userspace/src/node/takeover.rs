//! The takeover of a node by a successor daemon (a rolling update, or an operator starting a
//! second daemon), with no failed connection:
//!
//! 1. The successor connects to the serving daemon's handover socket
//!    (`/run/meshpath/<node>/handover.sock`) and says hello. The old daemon answers its
//!    readiness probe 503 from then on: both processes share the probe port, and kubelet must
//!    not see the new pod ready before it serves.
//! 2. The successor loads onto the pinned maps, attaches its programs ahead of the old ones,
//!    reconciles, and writes its listeners into the SOCKMAP slots: from that instant every new
//!    connection is its own.
//! 3. The old daemon sees foreign sockets in its slots (it looks every [`WATCH`]), stops
//!    reconciling, accepts what its listeners still queue for [`LINGER`], closes them and its
//!    links, hands its plain relays over this channel (sockets attached) and drains the rest.

use std::io::{IoSlice, IoSliceMut};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshpath_common::names::{HANDOVER_SOCKET, STATE_DIR};
use serde::{Deserialize, Serialize};
use std::os::fd::AsFd;

use tokio::sync::{mpsc, oneshot};
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

use super::lifecycle::Readiness;
use crate::proxy::Proxy;
use crate::proxy::handover::HandedRelay;
use crate::record::{ConnectionRecord, DrainCounts};
use crate::state_dir;
use crate::sync::lock;

/// How often a serving daemon looks whether a successor took its SOCKMAP slots.
pub const WATCH: Duration = Duration::from_millis(100);
/// How long a taken-over daemon keeps accepting: connections whose handshake began on its
/// listeners before the swap complete there (a lost SYN-ACK is sent again after 1 s).
pub const LINGER: Duration = Duration::from_secs(2);
/// A message is a record of a few hundred bytes; anything longer is not meshpath's.
const MAX_MESSAGE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("handover channel: {0}")]
    Channel(std::io::Error),
    #[error("handover channel: {0}")]
    Protocol(&'static str),
}

/// What the two daemons say to each other.
#[derive(Debug, Serialize, Deserialize)]
enum Message {
    /// Successor → serving daemon, first: a successor is starting.
    Hello { pid: u32 },
    /// Old → new: one plain relay; its client and upstream sockets are attached, in order.
    Relay { record: Box<ConnectionRecord> },
    /// Old → new, last: what became of its connections; no more relays follow.
    Done { handed_over: u64, finished: u64, cut: u64 },
}

fn socket_path(node: &str) -> PathBuf {
    PathBuf::from(STATE_DIR).join(node).join(HANDOVER_SOCKET)
}

async fn send(sock: &UnixSeqpacket, msg: &Message, fds: &[std::os::fd::BorrowedFd<'_>]) -> Result<(), TakeoverError> {
    let body = serde_json::to_vec(msg).map_err(|e| TakeoverError::Channel(e.into()))?;
    let mut cmsg = [0u8; 64];
    let mut ancillary = AncillaryMessageWriter::new(&mut cmsg);
    if !fds.is_empty() {
        ancillary.add_fds(fds).map_err(|_| TakeoverError::Protocol("no room for the sockets"))?;
    }
    sock.send_vectored_with_ancillary(&[IoSlice::new(&body)], &mut ancillary).await.map_err(TakeoverError::Channel)?;
    Ok(())
}

/// The next message and the sockets attached to it; `None` when the peer closed.
async fn recv(sock: &UnixSeqpacket) -> Result<Option<(Message, Vec<std::os::fd::OwnedFd>)>, TakeoverError> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut cmsg = [0u8; 64];
    let (n, ancillary) = sock
        .recv_vectored_with_ancillary(&mut [IoSliceMut::new(&mut body)], &mut cmsg)
        .await
        .map_err(TakeoverError::Channel)?;
    if n == 0 {
        return Ok(None);
    }
    let truncated = ancillary.is_truncated();
    let mut fds = Vec::new();
    for m in ancillary.into_messages() {
        if let OwnedAncillaryMessage::FileDescriptors(f) = m {
            fds.extend(f);
        }
    }
    if truncated || n == MAX_MESSAGE {
        return Err(TakeoverError::Protocol("a message did not fit"));
    }
    let msg =
        serde_json::from_slice(&body[..n]).map_err(|_| TakeoverError::Protocol("a message meshpath does not know"))?;
    Ok(Some((msg, fds)))
}

/// Removes the handover socket a stopped or killed daemon left (for uninstall).
pub fn remove_stale_socket(node: &str) -> std::io::Result<()> {
    match std::fs::remove_file(socket_path(node)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The serving daemon's side: successors announce themselves here; the latest one is kept
/// for the takeover.
pub struct Successors {
    current: Arc<Mutex<Option<UnixSeqpacket>>>,
    /// Told of each hello, so the serving daemon starts watching its slots at once.
    hello: Arc<tokio::sync::Notify>,
    path: PathBuf,
    accept: tokio::task::JoinHandle<()>,
    ready: Readiness,
}

impl Successors {
    /// Listens on the node's handover socket (in place of a predecessor's or a dead
    /// daemon's) and keeps the successor that says hello; `ready` answers 503 from then on.
    pub fn listen(node: &str, ready: Readiness) -> Result<Self, TakeoverError> {
        let path = socket_path(node);
        let io = |source| TakeoverError::Io { path: path.display().to_string(), source };
        if let Some(dir) = path.parent() {
            state_dir::private_dir(dir).map_err(io)?;
        }
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let mut listener = UnixSeqpacketListener::bind(&path).map_err(io)?;
        // Only root may announce a successor (or receive this daemon's connections).
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(io)?;
        let current: Arc<Mutex<Option<UnixSeqpacket>>> = Arc::default();
        let slot = current.clone();
        let hello = Arc::new(tokio::sync::Notify::new());
        let said_hello = hello.clone();
        let handing_over = ready.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok(sock) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                match tokio::time::timeout(Duration::from_secs(2), recv(&sock)).await {
                    Ok(Ok(Some((Message::Hello { pid }, _)))) => {
                        tracing::info!(
                            successor_pid = pid,
                            "a successor is starting; it takes over once ready (readiness answers 503 meanwhile)"
                        );
                        handing_over.set_handing_over(true);
                        *lock(&slot) = Some(sock);
                        said_hello.notify_one();
                    }
                    _ => tracing::warn!("a connection to the handover socket said no hello; closed"),
                }
            }
        });
        Ok(Self { current, hello, path, accept, ready })
    }

    /// A daemon stopping with no successor removes its socket: no one listens there anymore.
    pub fn close(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Whether the announced successor went away before taking over (readiness is then
    /// answered as before).
    pub fn went_away(&self) -> bool {
        let mut current = lock(&self.current);
        let Some(sock) = current.as_ref() else { return false };
        // The successor sends nothing after its hello: a readable socket means it closed.
        let mut buf = [0u8; 1];
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        if sock.poll_recv(&mut cx, &mut buf).is_pending() {
            return false;
        }
        tracing::warn!("the successor went away before it took over; this daemon serves on");
        *current = None;
        self.ready.set_handing_over(false);
        true
    }

    /// Resolves at the next hello (or at once, for one not waited for yet).
    pub async fn hello(&self) {
        self.hello.notified().await
    }

    /// Whether a successor said hello and has not taken over yet.
    pub fn pending(&self) -> bool {
        lock(&self.current).is_some()
    }

    /// The successor that said hello, for the takeover (`None`: none did; its relays then
    /// carry on here).
    pub fn take(&self) -> Option<Successor> {
        lock(&self.current).take().map(|sock| Successor { sock })
    }
}

impl Drop for Successors {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The successor that took over, as the old daemon sees it.
pub struct Successor {
    sock: UnixSeqpacket,
}

impl Successor {
    /// Hands the plain relays the proxy pauses over, until `relays` closes; the number
    /// handed over. After a failed send the rest are refused and carry on here.
    pub async fn hand_over(&self, mut relays: mpsc::Receiver<(HandedRelay, oneshot::Sender<bool>)>) -> u64 {
        let mut handed_over = 0u64;
        while let Some((relay, ack)) = relays.recv().await {
            let fds = [relay.client.as_fd(), relay.upstream.as_fd()];
            let msg = Message::Relay { record: Box::new(relay.record.clone()) };
            match send(&self.sock, &msg, &fds).await {
                Ok(()) => {
                    handed_over += 1;
                    let _ = ack.send(true);
                }
                Err(e) => {
                    tracing::warn!("handing a relay over failed; the rest carry on here: {e}");
                    let _ = ack.send(false);
                    relays.close();
                    while let Some((_, ack)) = relays.recv().await {
                        let _ = ack.send(false);
                    }
                    break;
                }
            }
        }
        handed_over
    }

    /// Tells the successor what became of this daemon's connections (its metrics count
    /// them), and that no relay follows.
    pub async fn report(&self, drained: &DrainCounts) {
        let msg = Message::Done { handed_over: drained.handed_over, finished: drained.finished, cut: drained.cut };
        if let Err(e) = send(&self.sock, &msg, &[]).await {
            tracing::debug!("telling the successor the drain's outcome: {e}");
        }
    }
}

/// The successor's side: the daemon that serves the node now, if one does.
pub struct Predecessor {
    sock: UnixSeqpacket,
}

impl Predecessor {
    /// Says hello to the daemon serving `node`; `None` when none listens (a fresh node, or
    /// one whose daemon stopped or crashed).
    pub async fn announce(node: &str) -> Option<Self> {
        let sock = UnixSeqpacket::connect(socket_path(node)).await.ok()?;
        send(&sock, &Message::Hello { pid: std::process::id() }, &[]).await.ok()?;
        tracing::info!("a meshpath daemon serves this node; this one takes over from it once ready");
        Some(Self { sock })
    }

    /// Carries on every relay the predecessor hands over, until it says it is done or goes.
    pub async fn adopt_relays(self, proxy: Arc<Proxy>) {
        let mut adopted = 0u64;
        loop {
            match recv(&self.sock).await {
                Ok(Some((Message::Relay { record }, fds))) => {
                    let mut fds = fds.into_iter();
                    let (Some(client), Some(upstream), None) = (fds.next(), fds.next(), fds.next()) else {
                        tracing::warn!(src = %record.src, "a handed-over relay came without its two sockets; dropped");
                        continue;
                    };
                    adopted += 1;
                    proxy.adopt(HandedRelay { client, upstream, record: *record });
                }
                Ok(Some((Message::Done { handed_over, finished, cut }, _))) => {
                    tracing::info!(
                        handed_over,
                        adopted,
                        finished,
                        cut,
                        "the predecessor stepped down: its plain relays carry on here, its other connections finished or were cut"
                    );
                    proxy.count_drained(&DrainCounts { handed_over, finished, cut });
                    return;
                }
                Ok(Some((Message::Hello { .. }, _))) => tracing::warn!("a hello from the predecessor; ignored"),
                Ok(None) => {
                    tracing::info!(adopted, "the predecessor closed the handover channel");
                    return;
                }
                Err(e) => {
                    tracing::warn!(adopted, "{e}; no more relays are taken over");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn record(src: SocketAddr, dst: SocketAddr) -> ConnectionRecord {
        ConnectionRecord {
            start_ms: 1,
            duration_ms: 0,
            node: "n1".into(),
            listener: "outbound".into(),
            src,
            orig_dst: dst,
            frontend: None,
            src_workload: Some("lab/pod-a".into()),
            dst_workload: None,
            dst_service: None,
            src_identity: None,
            dst_identity: None,
            mtls: false,
            upstream_src: None,
            bytes_sent: 7,
            bytes_received: 9,
            outcome: crate::record::Outcome::Ok,
            error: None,
        }
    }

    #[tokio::test]
    async fn a_relay_crosses_with_both_sockets_and_its_record() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        let (old, new) = UnixSeqpacket::pair().unwrap();
        let rec = record(client.local_addr().unwrap(), l.local_addr().unwrap());
        let msg = Message::Relay { record: Box::new(rec.clone()) };
        send(&old, &msg, &[accepted.as_fd(), client.as_fd()]).await.unwrap();
        let (msg, fds) = recv(&new).await.unwrap().unwrap();
        let Message::Relay { record } = msg else { panic!("not a relay: {msg:?}") };
        assert_eq!(*record, rec);
        assert_eq!(fds.len(), 2);
        // The same sockets, not copies of their addresses.
        let got = std::net::TcpStream::from(fds.into_iter().next().unwrap());
        assert_eq!(got.peer_addr().unwrap(), client.local_addr().unwrap());
        drop(old);
        assert!(recv(&new).await.unwrap().is_none(), "a closed channel ends the relays");
    }

    #[tokio::test]
    async fn what_meshpath_did_not_send_is_refused() {
        let (a, b) = UnixSeqpacket::pair().unwrap();
        a.send(b"{\"Launch\":{}}").await.unwrap();
        assert!(matches!(recv(&b).await, Err(TakeoverError::Protocol(_))));
        a.send(&vec![b'x'; MAX_MESSAGE + 10]).await.unwrap();
        assert!(matches!(recv(&b).await, Err(TakeoverError::Protocol(_))));
    }
}
