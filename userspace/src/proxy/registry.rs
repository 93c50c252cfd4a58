//! The connections open now, each with what it is, its bytes so far and a way to close it:
//! `meshpath status` lists them, `meshpath close` and (later) policy close them. An entry is
//! added when a connection opens (its path and identities known) and removed when it ends,
//! so there are never more entries than connection slots.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::metrics::ConnCounters;
use crate::record::Outcome;
use crate::sync::lock;

/// What an open connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Inside HBONE: an outbound stream to another node, or an inbound one from a peer.
    HboneStream,
    /// Plain TCP: to a destination outside the mesh, or plaintext into an enrolled pod.
    PlainRelay,
    /// Between two enrolled pods of this node.
    SameNode,
    /// A plain relay a predecessor daemon handed over in a takeover.
    Adopted,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::HboneStream, Kind::PlainRelay, Kind::SameNode, Kind::Adopted];

    /// The stable code (what `status` shows).
    pub const fn code(self) -> &'static str {
        match self {
            Kind::HboneStream => "hbone_stream",
            Kind::PlainRelay => "plain_relay",
            Kind::SameNode => "same_node",
            Kind::Adopted => "adopted",
        }
    }
}

/// Why a connection was closed from outside: the outcome its record gets, and the words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub outcome: Outcome,
    pub reason: String,
}

impl Closed {
    /// Ended by the daemon's stop (the drain's deadline, or the process ending).
    pub fn cut() -> Self {
        Self { outcome: Outcome::Cut, reason: "cut: the daemon stopped before the connection ended".into() }
    }
}

/// What an open connection is, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenConnection {
    /// Unique within its daemon.
    pub id: u64,
    pub kind: Kind,
    /// The listener that accepted it (`outbound`, `inbound_plain`, `hbone`).
    pub listener: String,
    pub src: SocketAddr,
    /// The client's identity: proven by its certificate (HBONE) or vouched for by the kernel
    /// (enrolled pods of this node); `None` for plaintext from elsewhere.
    pub src_identity: Option<String>,
    /// `namespace/name` of the destination, when it is a known workload.
    pub dst_workload: Option<String>,
    /// Where the proxy connects (a service address resolved to its endpoint).
    pub target: SocketAddr,
    /// Unix time in milliseconds when the connection was accepted.
    pub start_ms: u64,
    /// So far: client to server, and back.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// One open connection. Its byte counts are atomics the relays add to as bytes move.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    info: OpenConnection,
    sent: AtomicU64,
    received: AtomicU64,
    counters: ConnCounters,
    close: watch::Sender<Option<Closed>>,
}

/// One direction of a connection, as a relay counts it.
#[derive(Clone, Copy, Debug)]
pub struct Meter<'a> {
    entry: &'a Entry,
    request: bool,
}

impl Meter<'_> {
    /// Counts `n` bytes moved: in the entry (what `status` and the record show) and in the
    /// connection's metric series.
    pub fn add(self, n: u64) {
        if self.request {
            self.entry.sent.fetch_add(n, Ordering::Relaxed);
            self.entry.counters.request(n);
        } else {
            self.entry.received.fetch_add(n, Ordering::Relaxed);
            self.entry.counters.response(n);
        }
    }
}

impl Entry {
    fn new(info: OpenConnection, counters: ConnCounters, close: watch::Sender<Option<Closed>>) -> Self {
        Self {
            id: info.id,
            sent: AtomicU64::new(info.bytes_sent),
            received: AtomicU64::new(info.bytes_received),
            info,
            counters,
            close,
        }
    }

    /// Client to server.
    pub fn request(&self) -> Meter<'_> {
        Meter { entry: self, request: true }
    }

    /// Server to client.
    pub fn response(&self) -> Meter<'_> {
        Meter { entry: self, request: false }
    }

    /// Bytes so far: client to server, and back.
    pub fn bytes(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed))
    }

    pub fn counters(&self) -> &ConnCounters {
        &self.counters
    }

    /// The connection now.
    pub fn info(&self) -> OpenConnection {
        let (bytes_sent, bytes_received) = self.bytes();
        OpenConnection { bytes_sent, bytes_received, ..self.info.clone() }
    }

    /// Asks the connection to end with `closed` in its record (the first close wins).
    pub fn close(&self, closed: Closed) {
        self.close.send_if_modified(|c| {
            let first = c.is_none();
            if first {
                *c = Some(closed);
            }
            first
        });
    }
}

/// The open connections of one proxy.
#[derive(Debug, Default)]
pub struct Registry {
    entries: Mutex<BTreeMap<u64, std::sync::Arc<Entry>>>,
    next_id: AtomicU64,
}

impl Registry {
    /// Adds an opened connection; `info.id` is assigned here. `close` is the sending end of
    /// what the connection watches for a close.
    pub(super) fn add(
        &self,
        mut info: OpenConnection,
        counters: ConnCounters,
        close: watch::Sender<Option<Closed>>,
    ) -> std::sync::Arc<Entry> {
        info.id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = std::sync::Arc::new(Entry::new(info, counters, close));
        lock(&self.entries).insert(entry.id, entry.clone());
        entry
    }

    pub(super) fn remove(&self, id: u64) {
        lock(&self.entries).remove(&id);
    }

    /// Every open connection, oldest first.
    pub fn list(&self) -> Vec<OpenConnection> {
        let entries: Vec<_> = lock(&self.entries).values().cloned().collect();
        entries.iter().map(|e| e.info()).collect()
    }

    /// Closes connection `id`: it ends at once (both sides reset) and its record carries
    /// `closed`. `false` when no such connection is open.
    pub fn close(&self, id: u64, closed: Closed) -> bool {
        let entry = lock(&self.entries).get(&id).cloned();
        entry.map(|e| e.close(closed)).is_some()
    }
}

/// Entries for the tests of the modules that use them.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::metrics::Metrics;

    pub fn info(kind: Kind) -> OpenConnection {
        OpenConnection {
            id: 0,
            kind,
            listener: "outbound".into(),
            src: "10.0.0.1:1000".parse().expect("an address"),
            src_identity: None,
            dst_workload: Some("ns/b".into()),
            target: "10.0.0.2:80".parse().expect("an address"),
            start_ms: 1,
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    pub fn counters() -> ConnCounters {
        let rec: crate::record::ConnectionRecord = serde_json::from_str(
            r#"{"start_ms":0,"duration_ms":0,"node":"n","listener":"outbound","src":"10.0.0.1:1","orig_dst":"10.0.0.2:80",
                "src_workload":null,"dst_workload":null,"src_identity":null,"dst_identity":null,"mtls":false,
                "upstream_src":null,"bytes_sent":0,"bytes_received":0,"outcome":"ok"}"#,
        )
        .expect("a record");
        Metrics::new().open(&crate::metrics::TcpLabels::of(&rec))
    }

    /// An entry in no registry, for the relays' own tests.
    pub fn entry() -> Entry {
        Entry::new(info(Kind::PlainRelay), counters(), watch::channel(None).0)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{counters, info};
    use super::*;

    #[test]
    fn entries_count_bytes_from_their_start_and_close_once() {
        let r = Registry::default();
        let (tx, mut rx) = watch::channel(None);
        let carried = OpenConnection { bytes_sent: 5, ..info(Kind::Adopted) };
        let e = r.add(carried, counters(), tx);
        let other = r.add(info(Kind::PlainRelay), counters(), watch::channel(None).0);
        assert_ne!(e.id, other.id, "ids are unique");
        e.request().add(10);
        e.response().add(3);
        assert_eq!(r.list().iter().find(|c| c.id == e.id).map(|c| (c.bytes_sent, c.bytes_received)), Some((15, 3)));
        assert!(r.close(e.id, Closed { outcome: Outcome::SelfCall, reason: "first".into() }));
        assert!(r.close(e.id, Closed::cut()));
        assert_eq!(rx.borrow_and_update().as_ref().map(|c| c.outcome), Some(Outcome::SelfCall), "the first close wins");
        r.remove(e.id);
        assert!(!r.close(e.id, Closed::cut()), "a connection that ended cannot be closed");
        assert_eq!(r.list().len(), 1);
    }

    #[test]
    fn kind_codes_are_the_serialized_names_and_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for k in Kind::ALL {
            assert_eq!(serde_json::to_string(&k).expect("serializes"), format!("\"{}\"", k.code()));
            assert!(seen.insert(k.code()));
        }
    }
}
