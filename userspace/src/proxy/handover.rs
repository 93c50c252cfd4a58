//! Plain relays moving from a daemon to its successor during a takeover. The old process
//! pauses each relay where it holds no byte of its own, then hands both sockets and the
//! connection's record over; the new one carries on relaying from the same sockets, so the
//! client and the server never notice. HBONE connections are not moved (their TLS and
//! HTTP/2 state lives in the process): they drain.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::conn::{Conn, unless_stopped};
use super::registry::{Entry, Kind};
use super::{Error, Proxy, relay};
use crate::record::{ConnectionRecord, DrainOutcome, Outcome};
use crate::state::canonical;
use crate::sync::lock;

/// One relay on its way to the successor: the client's and the upstream socket, and the
/// record so far (its bytes are carried on, so the successor's record covers the whole
/// connection).
#[derive(Debug)]
pub struct HandedRelay {
    pub client: OwnedFd,
    pub upstream: OwnedFd,
    pub record: ConnectionRecord,
}

/// Where paused relays go; each is answered `true` once its sockets are in the successor's
/// hands (`false`: the relay carries on here).
pub type Outbox = mpsc::Sender<(HandedRelay, oneshot::Sender<bool>)>;

/// The proxy's side of a takeover.
#[derive(Debug)]
pub struct Handover {
    pause: watch::Sender<bool>,
    outbox: Mutex<Option<Outbox>>,
}

impl Default for Handover {
    fn default() -> Self {
        Self { pause: watch::Sender::new(false), outbox: Mutex::default() }
    }
}

impl Handover {
    /// Asks every plain relay to pause and move to `outbox`.
    pub fn start(&self, outbox: Outbox) {
        *lock(&self.outbox) = Some(outbox);
        self.pause.send_replace(true);
    }

    /// Ends the handover: relays that pause later carry on here.
    pub fn stop(&self) {
        lock(&self.outbox).take();
    }

    /// What a relay watches for the request to pause.
    pub fn signal(&self) -> watch::Receiver<bool> {
        self.pause.subscribe()
    }

    /// Sends a paused relay's sockets (duplicates: this process's own close afterwards
    /// does not end the connection) and record; `false` when they could not be sent.
    async fn send(&self, client: &TcpStream, upstream: &TcpStream, record: &ConnectionRecord) -> bool {
        let Some(outbox) = lock(&self.outbox).clone() else { return false };
        let dup = |s: &TcpStream| s.as_fd().try_clone_to_owned();
        let (Ok(client), Ok(upstream)) = (dup(client), dup(upstream)) else { return false };
        let (ack, acked) = oneshot::channel();
        let relay = HandedRelay { client, upstream, record: record.clone() };
        outbox.send((relay, ack)).await.is_ok() && acked.await.unwrap_or(false)
    }
}

impl Proxy {
    /// Relays `client` and `upstream` until both directions end, or until a takeover moves
    /// them to the successor (the record then ends `handed_over` here). On a failure the
    /// upstream side is reset (the caller resets the client's).
    pub(super) async fn relay_or_hand_over(
        &self,
        client: &mut TcpStream,
        upstream: &mut TcpStream,
        conn: &mut Conn,
        entry: &Entry,
    ) -> Result<(), Error> {
        let mut pause = Some(self.handover.signal());
        let mut stop = conn.stop();
        let ended = loop {
            let relayed =
                unless_stopped!(stop, relay::relay(client, upstream, entry.request(), entry.response(), pause.take()));
            match relayed {
                Ok(Ok(relay::Relayed::Paused)) if self.handover.send(client, upstream, &conn.snapshot()).await => {
                    conn.rec.outcome = Outcome::HandedOver;
                    break Ok(());
                }
                // The successor is gone: this process carries the relay to its end.
                Ok(Ok(relay::Relayed::Paused)) => continue,
                Ok(Ok(relay::Relayed::Finished)) => break Ok(()),
                Ok(Err(e)) => break Err(Error::Reset(e)),
                Err(closed) => break Err(Error::Closed(closed)),
            }
        };
        if ended.is_err() {
            super::socket::reset_on_close(upstream);
        }
        ended
    }

    /// Carries on a relay the predecessor handed over: it holds a connection slot (even past
    /// the limits: it is established) and ends with a record of the whole connection.
    pub fn adopt(self: &Arc<Self>, relay: HandedRelay) {
        let to_stream = |fd: OwnedFd| {
            let s = std::net::TcpStream::from(fd);
            s.set_nonblocking(true)?;
            TcpStream::from_std(s)
        };
        let HandedRelay { client, upstream, mut record } = relay;
        let (mut client, mut upstream) = match (to_stream(client), to_stream(upstream)) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(src = %record.src, dst = %record.orig_dst, "a handed-over relay could not be registered, cut: {e}");
                return;
            }
        };
        self.ledger.metrics.drained(DrainOutcome::Adopted, 1);
        let slot = self.limits.carry(record.src.ip());
        let target = upstream.peer_addr().map(canonical).unwrap_or(record.orig_dst);
        // The record's duration counts from the connection's start in the predecessor.
        let before = Duration::from_millis(super::unix_ms().saturating_sub(record.start_ms));
        record.outcome = Outcome::Ok;
        record.error = None;
        let mut conn = self.conn(record, Some(slot));
        conn.started_before(before);
        let proxy = self.clone();
        tokio::spawn(async move {
            let entry = conn.open(Kind::Adopted, target);
            let result = proxy.relay_or_hand_over(&mut client, &mut upstream, &mut conn, &entry).await;
            if result.is_err() {
                super::socket::reset_on_close(&client);
            }
            conn.finish(result);
        });
    }
}
