//! The HBONE connection pool: captured connections with the same source identity,
//! destination identity, destination and source IP share HTTP/2 connections, up to
//! [`MAX_STREAMS_PER_CONNECTION`](super::h2::MAX_STREAMS_PER_CONNECTION) streams each.
//! Connections unused for the idle timeout are closed.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::h2::client::H2Client;
use super::outbound::HboneConnectError;
use crate::drain::Watcher;
use crate::identity::Identity;
use crate::metrics::PoolStats;
use crate::sync::lock;

/// What makes two captured connections able to share an HBONE connection (ztunnel's key).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_id: Identity,
    pub dst_id: Identity,
    /// The peer's HBONE address, `podIP:15008`.
    pub dst: SocketAddr,
    /// The client pod's IP: the outer connection's source.
    pub src_ip: IpAddr,
}

pub struct PooledConnection {
    pub client: H2Client,
    /// Sequence number, for logs and tests.
    pub id: u64,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

/// A stream's claim on a pooled connection; released on drop.
pub struct Lease {
    pub conn: Arc<PooledConnection>,
    /// Whether the connection already existed.
    pub reused: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.conn.idle_since) = Instant::now();
        }
    }
}

/// A pool whose connects fail with `E` (shared by everyone queued behind the failure).
pub struct Pool<E = HboneConnectError> {
    idle_timeout: Duration,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<PooledConnection>>>>,
    /// One connect at a time per key, so a burst of new streams opens one connection. The
    /// gate keeps the last failure, so those who queued behind a failed connect fail at
    /// once with its error instead of each trying (and timing out) in turn.
    connecting: Mutex<HashMap<PoolKey, Gate<E>>>,
    next_id: AtomicU64,
    /// Wakes the evictions, which sleep while the pool is empty.
    filled: tokio::sync::Notify,
}

/// One connect at a time per key; it holds the last failure.
type Gate<E> = Arc<tokio::sync::Mutex<Option<Failure<E>>>>;

struct Failure<E> {
    at: Instant,
    error: Arc<E>,
}

impl<E> Pool<E> {
    pub fn new(idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            idle_timeout,
            conns: Mutex::default(),
            connecting: Mutex::default(),
            next_id: AtomicU64::new(1),
            filled: tokio::sync::Notify::new(),
        })
    }

    /// A stream slot on a connection for `key`: an existing one with room, or a new one
    /// made by `connect`. The error is the connect's (shared with those queued behind it).
    pub async fn checkout<F, Fut>(&self, key: &PoolKey, connect: F) -> Result<Lease, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<H2Client, E>>,
    {
        if let Some(lease) = self.reserve(key) {
            return Ok(lease);
        }
        let gate = {
            let mut c = lock(&self.connecting);
            c.entry(key.clone()).or_default().clone()
        };
        // A permit is kept if the evictions are not waiting yet, so none is lost.
        self.filled.notify_one();
        let queued = Instant::now();
        let mut last_failure = gate.lock().await;
        // Whoever held the gate before us may have made a connection with room, or failed
        // to while we waited.
        if let Some(lease) = self.reserve(key) {
            return Ok(lease);
        }
        if let Some(f) = last_failure.as_ref().filter(|f| f.at >= queued) {
            return Err(f.error.clone());
        }
        let client = match connect().await {
            Ok(c) => c,
            Err(e) => {
                let error = Arc::new(e);
                *last_failure = Some(Failure { at: Instant::now(), error: error.clone() });
                return Err(error);
            }
        };
        *last_failure = None;
        let conn = Arc::new(PooledConnection {
            client,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
        });
        lock(&self.conns).entry(key.clone()).or_default().push(conn.clone());
        Ok(Lease { conn, reused: false })
    }

    fn reserve(&self, key: &PoolKey) -> Option<Lease> {
        let conns = lock(&self.conns);
        // Counts only grow under this lock, so check-then-add cannot overshoot.
        let conn = conns
            .get(key)?
            .iter()
            .find(|c| !c.client.is_closed() && c.active.load(Ordering::Acquire) < c.client.stream_limit())?
            .clone();
        conn.active.fetch_add(1, Ordering::AcqRel);
        Some(Lease { conn, reused: true })
    }

    pub fn stats(&self) -> PoolStats {
        let conns = lock(&self.conns);
        conns.values().flatten().fold(PoolStats::default(), |s, c| PoolStats {
            connections: s.connections + 1,
            streams: s.streams + c.active.load(Ordering::Acquire),
        })
    }

    /// Drops closed connections and those idle for longer than the timeout. Dropping the
    /// last handle makes h2 send GOAWAY and close the connection.
    pub fn evict(&self) -> usize {
        let now = Instant::now();
        let mut evicted = 0;
        let mut conns = lock(&self.conns);
        conns.retain(|_, list| {
            list.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.duration_since(*lock(&c.idle_since)) >= self.idle_timeout;
                let keep = !(idle || c.client.is_closed());
                evicted += usize::from(!keep);
                keep
            });
            !list.is_empty()
        });
        let mut connecting = lock(&self.connecting);
        connecting.retain(|k, gate| conns.contains_key(k) || Arc::strong_count(gate) > 1);
        evicted
    }

    fn is_empty(&self) -> bool {
        lock(&self.conns).is_empty() && lock(&self.connecting).is_empty()
    }

    /// Evicts periodically until a drain starts (the connections still in use end with
    /// their streams, the idle ones with the process); an empty pool sleeps until used.
    pub async fn run_evictions(self: Arc<Self>, mut stop: Watcher) {
        let period = (self.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            if self.is_empty() {
                tokio::select! {
                    _ = stop.signalled() => return,
                    () = self.filled.notified() => {}
                }
            }
            tokio::select! {
                _ = stop.signalled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let n = self.evict();
            if n > 0 {
                tracing::debug!(evicted = n, "closed idle HBONE connections");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn key() -> PoolKey {
        let id = Identity::new("td", "ns", "sa");
        PoolKey {
            src_id: id.clone(),
            dst_id: id,
            dst: "10.0.0.2:15008".parse().unwrap(),
            src_ip: "10.0.0.1".parse().unwrap(),
        }
    }

    /// An HTTP/2 client over an in-memory pipe to a server that only keeps the connection up.
    async fn client() -> Result<H2Client, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            if let Ok(mut conn) = ::h2::server::handshake(b).await {
                while conn.accept().await.is_some() {}
            }
        });
        H2Client::handshake(a, "127.0.0.1:1".parse().unwrap(), "test".into()).await.map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_burst_shares_one_connection_up_to_the_stream_limit() {
        let pool = Pool::<String>::new(Duration::from_secs(60));
        let connects = AtomicU32::new(0);
        let connect = || async {
            connects.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            client().await
        };
        let leases = {
            let k = key();
            futures::future::join_all((0..150).map(|_| pool.checkout(&k, connect))).await
        };
        let leases: Vec<Lease> = leases.into_iter().map(Result::unwrap).collect();
        assert_eq!(connects.load(Ordering::SeqCst), 2, "150 streams need two connections of 100");
        assert_eq!(pool.stats(), PoolStats { connections: 2, streams: 150 });
        assert_eq!(leases.iter().filter(|l| !l.reused).count(), 2);
        drop(leases);
        assert_eq!(pool.stats(), PoolStats { connections: 2, streams: 0 });
        // Idle ones stay until the timeout.
        assert_eq!(pool.evict(), 0);
    }

    #[tokio::test]
    async fn waiters_behind_a_failed_connect_fail_with_its_error_at_once() {
        let pool = Pool::<&str>::new(Duration::from_secs(60));
        let connects = AtomicU32::new(0);
        let failing = || async {
            connects.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err::<H2Client, _>("connection refused")
        };
        let results = {
            let k = key();
            futures::future::join_all((0..10).map(|_| pool.checkout(&k, failing))).await
        };
        assert!(results.iter().all(|r| r.as_ref().err().map(|e| **e) == Some("connection refused")));
        assert_eq!(connects.load(Ordering::SeqCst), 1, "the queued callers must not retry one by one");
        // A later caller tries again.
        assert!(pool.checkout(&key(), || async { client().await.map_err(|_| "handshake") }).await.is_ok());
    }

    #[tokio::test]
    async fn idle_and_closed_connections_are_evicted() {
        let pool = Pool::<String>::new(Duration::ZERO);
        let lease = pool.checkout(&key(), client).await.unwrap();
        assert_eq!(pool.evict(), 0, "a connection with a stream is never idle");
        drop(lease);
        assert_eq!(pool.evict(), 1);
        assert_eq!(pool.stats(), PoolStats::default());
    }

    #[tokio::test(start_paused = true)]
    async fn evictions_sleep_while_empty_and_wake_when_the_pool_is_used() {
        let pool = Pool::<String>::new(Duration::ZERO);
        let (_trigger, watcher) = crate::drain::new();
        tokio::spawn(pool.clone().run_evictions(watcher));
        for round in 0..2 {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(pool.checkout(&key(), client).await.unwrap());
            assert_eq!(pool.stats().connections, 1, "round {round}");
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert_eq!(pool.stats(), PoolStats::default(), "round {round}: the idle connection is evicted");
            assert!(pool.is_empty(), "round {round}: nor is its gate kept");
        }
    }
}
