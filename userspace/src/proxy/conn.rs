//! One connection's account: its record, written exactly once whichever way the connection
//! ends (finished, refused, closed on request, cut by a drain, or its task dropped as the
//! process exits), its registry entry while it is open, its connection slot, and what tells
//! it to stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::Error;
use super::access_log::AccessLog;
use super::limits::Slot;
use super::registry::{Closed, Entry, Kind, OpenConnection, Registry};
use crate::drain::{Mode, Watcher};
use crate::metrics::{Metrics, TcpLabels};
use crate::record::ConnectionRecord;

/// Where connections are accounted for.
pub struct Ledger {
    pub metrics: Arc<Metrics>,
    pub log: AccessLog,
    pub registry: Arc<Registry>,
}

/// `$work` (a future), or `Err` with why the connection's `$stop` ended it first. The stop is
/// looked at first, so a connection cut by the daemon says so even when the cut also fails
/// its sockets. A macro rather than a function: the work's future is built in place, where a
/// future handed to a function is held twice by a debug build's task (the relays' futures
/// are most of a connection's memory).
macro_rules! unless_stopped {
    ($stop:expr, $work:expr) => {
        tokio::select! {
            biased;
            c = $stop.wait() => Err(c),
            r = $work => Ok(r),
        }
    };
}
pub(super) use unless_stopped;

/// What a connection watches to end early: the proxy's drain ([`Mode::Immediate`] cuts it)
/// and its own close handle.
#[derive(Clone, Debug)]
pub struct Stop {
    drain: Watcher,
    close: watch::Receiver<Option<Closed>>,
}

impl Stop {
    /// Resolves with why the connection must end now.
    pub async fn wait(&mut self) -> Closed {
        let Stop { drain, close } = self;
        let closed = async {
            let asked = close.wait_for(Option::is_some).await.map(|c| c.clone());
            match asked {
                Ok(c) => c,
                // The handle is gone with the connection: only the drain can end it.
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = drain.at_least(Mode::Immediate) => Closed::cut(),
            c = closed => c.unwrap_or_else(Closed::cut),
        }
    }

    /// The drain watcher alone (an HBONE connection sends GOAWAY on a graceful drain).
    pub fn drain(&self) -> Watcher {
        self.drain.clone()
    }
}

/// One connection (or HBONE stream) being served. Dropped, it writes its record: with the
/// outcome [`Conn::finish`] gave, or `cut` when it never got that far.
pub struct Conn {
    pub rec: ConnectionRecord,
    started: Instant,
    ledger: Arc<Ledger>,
    stop: Stop,
    /// The close handle's sending end, until the entry takes it at open.
    closer: Option<watch::Sender<Option<Closed>>>,
    entry: Option<Arc<Entry>>,
    _slot: Option<Slot>,
    ended: bool,
    /// Stands for nothing of its own (an HBONE connection whose streams have records).
    dismissed: bool,
}

impl Conn {
    pub fn new(ledger: Arc<Ledger>, rec: ConnectionRecord, drain: Watcher, slot: Option<Slot>) -> Self {
        let (closer, close) = watch::channel(None);
        Self {
            rec,
            started: Instant::now(),
            ledger,
            stop: Stop { drain, close },
            closer: Some(closer),
            entry: None,
            _slot: slot,
            ended: false,
            dismissed: false,
        }
    }

    /// Takes `slot` for as long as the connection lives.
    pub fn hold(&mut self, slot: Slot) {
        self._slot = Some(slot);
    }

    /// The connection started `before` ago (a relay a predecessor began).
    pub fn started_before(&mut self, before: std::time::Duration) {
        self.started = Instant::now().checked_sub(before).unwrap_or(self.started);
    }

    pub fn stop(&self) -> Stop {
        self.stop.clone()
    }

    /// Counts the connection as opened, once its path (so its labels) is known, and lists it
    /// in the registry: the entry is what its relay counts bytes in.
    pub fn open(&mut self, kind: Kind, target: SocketAddr) -> Arc<Entry> {
        if let Some(e) = &self.entry {
            return e.clone();
        }
        let counters = self.ledger.metrics.open(&TcpLabels::of(&self.rec));
        let r = &self.rec;
        let info = OpenConnection {
            id: 0,
            kind,
            listener: r.listener.clone(),
            src: r.src,
            src_identity: r.src_identity.clone(),
            dst_workload: r.dst_workload.clone(),
            target,
            start_ms: r.start_ms,
            // A handed-over relay carries its bytes from the predecessor.
            bytes_sent: r.bytes_sent,
            bytes_received: r.bytes_received,
        };
        let closer = self.closer.take().unwrap_or_else(|| watch::channel(None).0);
        let entry = self.ledger.registry.add(info, counters, closer);
        self.entry = Some(entry.clone());
        entry
    }

    /// The record as it stands, its bytes counted so far.
    pub fn snapshot(&self) -> ConnectionRecord {
        let mut rec = self.rec.clone();
        if let Some(e) = &self.entry {
            (rec.bytes_sent, rec.bytes_received) = e.bytes();
        }
        rec
    }

    /// No record for this one: what it carried has records of its own.
    pub fn dismiss(&mut self) {
        self.dismissed = true;
    }

    /// Ends the connection with `result`; the record is written now.
    pub fn finish(mut self, result: Result<(), Error>) {
        if let Err(e) = result {
            self.rec.outcome = e.outcome();
            self.rec.error = Some(e.message());
        }
        self.ended = true;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.dismissed {
            return;
        }
        if !self.ended {
            // The task was dropped before the connection ended: the runtime is going away.
            let cut = Closed::cut();
            self.rec.outcome = cut.outcome;
            self.rec.error = Some(cut.reason);
        }
        self.rec.duration_ms = self.started.elapsed().as_millis() as u64;
        if let Some(e) = self.entry.take() {
            (self.rec.bytes_sent, self.rec.bytes_received) = e.bytes();
            e.counters().closed();
            self.ledger.registry.remove(e.id);
        }
        self.ledger.metrics.finished(&self.rec);
        self.ledger.log.record(&self.rec);
    }
}
