//! The node proxy: accepts the connections sk_lookup steers into its listeners.
//!
//! - [`outbound`] (15001): a captured connection of an enrolled pod. To an enrolled pod on
//!   another node it goes inside HBONE; to one on this node it is handed over locally; to
//!   anything else it is passed through as plain TCP.
//! - [`inbound`] (15008 and 15006): HBONE tunnels from other nodes, and plaintext
//!   connections to enrolled pods (permitted or refused by the plaintext policy).
//!
//! The accepted socket's local address *is* the original destination (sk_lookup assigns
//! the connection to our socket without rewriting it), and its peer is the real client.
//! Upstream connections carry the proxy mark so the datapath never captures them again.

pub mod access_log;
pub mod error;
pub mod h2;
pub mod handover;
pub mod inbound;
pub mod limits;
pub mod outbound;
pub mod pool;
pub mod relay;
pub mod socket;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use meshpath_common::Listener;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::identity::Identity;
use crate::identity::manager::CertificateManager;
use crate::metrics::{Metrics, TcpLabels};
use crate::record::{ConnectionRecord, Outcome};
use crate::state::{WorkloadIndex, canonical};
use crate::sync::lock;
use access_log::AccessLog;
pub use error::Error;
use pool::Pool;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("listening on {what} port {port}: {source} (is another meshpath running in this network namespace?)")]
    Listen { what: &'static str, port: u16, source: std::io::Error },
    #[error(transparent)]
    AccessLog(#[from] access_log::AccessLogError),
}

/// What happens to plaintext connections to enrolled pods (the 15006 listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PlaintextPolicy {
    /// Deliver them, recorded as not mTLS (Istio's default, PeerAuthentication PERMISSIVE).
    Permissive,
    /// Refuse them: enrolled pods accept only mTLS (PeerAuthentication STRICT).
    Strict,
}

/// How upstream connections are made.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub node: String,
    /// Pod networks of the cluster. Outbound connections to these keep the client pod's IP
    /// as their source (the return path comes back through this node's datapath); other
    /// destinations are reached from the node's own address so NAT on the way out works.
    pub pod_cidrs: Vec<IpNet>,
    pub connect_timeout: Duration,
    pub plaintext: PlaintextPolicy,
    /// HBONE connections without streams for this long are closed.
    pub hbone_idle_timeout: Duration,
    /// Connections (and HBONE streams) held at once.
    pub limits: Arc<limits::Limits>,
}

/// A bound listener of one role and family.
pub struct BoundListener {
    pub role: Listener,
    pub ipv6: bool,
    pub socket: TcpListener,
}

/// Binds the proxy's six listeners. IPv6 ones are skipped (with a warning) when the node
/// has no IPv6 loopback; IPv6 traffic of enrolled pods then fails closed.
pub fn bind_listeners() -> Result<Vec<BoundListener>, ProxyError> {
    let mut out = Vec::new();
    for role in Listener::ALL {
        for ipv6 in [false, true] {
            match socket::transparent_listener(ipv6, role.port()) {
                Ok(socket) => out.push(BoundListener { role, ipv6, socket }),
                Err(e) if ipv6 && matches!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)) => {
                    tracing::warn!(
                        listener = role.name(),
                        "no IPv6 loopback: IPv6 traffic of enrolled pods will be refused"
                    );
                }
                Err(source) => return Err(ProxyError::Listen { what: role.name(), port: role.port(), source }),
            }
        }
    }
    Ok(out)
}

pub struct Proxy {
    cfg: ProxyConfig,
    limits: Arc<limits::Limits>,
    index: RwLock<Arc<WorkloadIndex>>,
    log: AccessLog,
    metrics: Arc<Metrics>,
    certs: Arc<CertificateManager>,
    pool: Arc<Pool>,
    /// TLS server configurations of local workloads, rebuilt when their certificate changes.
    server_tls: Mutex<HashMap<Identity, inbound::ServerTls>>,
    /// Set when the daemon drains: HBONE connections from peers are asked to go away.
    drain: watch::Sender<bool>,
    /// Plain relays moving to a successor during a takeover.
    handover: handover::Handover,
}

impl Proxy {
    pub fn new(cfg: ProxyConfig, log: AccessLog, certs: Arc<CertificateManager>, metrics: Arc<Metrics>) -> Arc<Self> {
        let pool = Pool::new(cfg.hbone_idle_timeout);
        Arc::new(Self {
            limits: cfg.limits.clone(),
            cfg,
            index: RwLock::new(Arc::default()),
            log,
            metrics,
            certs,
            pool,
            server_tls: Mutex::default(),
            drain: watch::Sender::new(false),
            handover: handover::Handover::default(),
        })
    }

    /// Drains: peers' HBONE connections get a GOAWAY (their open streams finish, new ones go
    /// elsewhere). New connections are already refused: the listeners are closed.
    pub fn start_drain(&self) {
        self.drain.send_replace(true);
    }

    /// A takeover: plain relays pause and go to `outbox`, to carry on in the successor.
    pub fn hand_over_relays(&self, outbox: handover::Outbox) {
        self.handover.start(outbox);
    }

    /// Ends a takeover's handover: relays that pause after the drain deadline stay here.
    pub fn stop_handing_over(&self) {
        self.handover.stop();
    }

    /// Counts what became of the connections of a daemon that stopped serving (this one's,
    /// or its predecessor's as it reported them).
    pub fn count_drained(&self, d: &crate::node::Drained) {
        use crate::record::DrainOutcome;
        for (outcome, n) in [
            (DrainOutcome::HandedOver, d.handed_over),
            (DrainOutcome::Finished, d.finished),
            (DrainOutcome::Cut, d.cut),
        ] {
            if n > 0 {
                self.metrics.drained(outcome, n);
            }
        }
    }

    /// Connections and HBONE streams open now (what a drain waits for).
    pub fn open_connections(&self) -> usize {
        self.limits.open()
    }

    /// Replaces the workload index. Certificates of workloads that left this node are
    /// forgotten; those of new ones are fetched now, so their first connection does not wait
    /// and a provider problem shows in the log at once.
    pub fn set_workloads(self: &Arc<Self>, index: WorkloadIndex) {
        let local = index.identities_on(&self.cfg.node);
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(index);
        self.certs.retain(|id| local.contains(id));
        lock(&self.server_tls).retain(|id, _| local.contains(id));
        let certs = self.certs.clone();
        tokio::spawn(async move {
            for id in local {
                if let Err(e) = certs.get(&id).await {
                    tracing::error!(identity = %id, "no certificate for a local workload; its mTLS connections will fail: {e}");
                }
            }
        });
    }

    fn index(&self) -> Arc<WorkloadIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Connections (and HBONE streams) held, and the limit.
    pub fn connections(&self) -> (usize, usize) {
        (self.limits.open(), self.limits.max_total())
    }

    /// HBONE pool occupancy.
    pub fn pool_stats(&self) -> crate::metrics::PoolStats {
        self.pool.stats()
    }

    /// Accepts on every listener until `shutdown` changes; then the listeners are
    /// closed, which also removes them from the SOCKMAP.
    pub async fn serve(self: Arc<Self>, listeners: Vec<BoundListener>, shutdown: watch::Receiver<bool>) {
        tokio::spawn(self.pool.clone().run_evictions(shutdown.clone()));
        tokio::spawn(self.certs.clone().run_renewals(shutdown.clone()));
        let tasks: Vec<_> =
            listeners.into_iter().map(|l| tokio::spawn(self.clone().accept_loop(l, shutdown.clone()))).collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn accept_loop(self: Arc<Self>, l: BoundListener, mut shutdown: watch::Receiver<bool>) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                r = l.socket.accept() => match r {
                    Ok((stream, peer)) => {
                        failing = false;
                        match self.limits.admit(peer.ip()) {
                            Ok(slot) => {
                                tokio::spawn(self.clone().handle(l.role, stream, peer, slot));
                            }
                            Err(_) => {
                                // Refused at the door, counted, no record: a flood must not
                                // cost a log line each (the limiter logs a summary).
                                socket::reset_on_close(&stream);
                                self.metrics.failed_at(l.role.name(), Outcome::OverLimit);
                            }
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning, one line a streak.
                        if !failing {
                            tracing::warn!(listener = l.role.name(), error = %e, "accept failed; backing off");
                            failing = true;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    async fn handle(self: Arc<Self>, role: Listener, mut client: TcpStream, peer: SocketAddr, _slot: limits::Slot) {
        let orig_dst = match client.local_addr() {
            Ok(a) => canonical(a),
            Err(e) => {
                tracing::debug!(error = %e, "accepted socket vanished");
                return;
            }
        };
        // One snapshot of what the proxy knows serves the whole connection.
        let index = self.index();
        // Outbound to a service address under kube-proxy: its DNAT came first. Only a known
        // service address replaces the endpoint (other DNATs, e.g. a NodePort, lead to pods
        // the proxy should reach as such); without services there is nothing to look up.
        let orig_dst = match role {
            Listener::Outbound if index.has_services() => {
                socket::pre_nat_destination(&client, orig_dst).filter(|pre| index.is_service(*pre)).unwrap_or(orig_dst)
            }
            _ => orig_dst,
        };
        let _ = client.set_nodelay(true);
        let mut rec = self.record(&index, role, canonical(peer), orig_dst);
        let started = Instant::now();
        // Only a connection made straight to our loopback address gets here without
        // sk_lookup: that is a call to the proxy itself, never a workload's traffic.
        let result = if orig_dst.ip().is_loopback() {
            Err(Error::SelfCall(orig_dst.port()))
        } else {
            match role {
                Listener::Outbound => outbound::handle(&self, &index, &mut client, &mut rec).await,
                Listener::InboundPlain => inbound::plaintext(&self, &index, &mut client, &mut rec).await,
                // HBONE connections carry many streams, each with its own record.
                Listener::Hbone => return inbound::hbone(self, index, client, rec).await,
            }
        };
        if result.is_err() {
            socket::reset_on_close(&client);
        }
        self.finish(rec, started, result);
    }

    /// A record for a connection from `src` to `orig_dst`, with the workloads filled in.
    fn record(&self, index: &WorkloadIndex, role: Listener, src: SocketAddr, orig_dst: SocketAddr) -> ConnectionRecord {
        // A source IP proves a workload only where the kernel vouches for it: an enrolled
        // pod of this node (outbound; the classifier binds its IPs to its veth). Plaintext
        // from elsewhere carries no identity, whatever address it claims; HBONE proves its
        // own with a certificate.
        let s = if role == Listener::Outbound { index.get(src.ip()) } else { None };
        let d = index.get(orig_dst.ip());
        ConnectionRecord {
            start_ms: unix_ms(),
            duration_ms: 0,
            node: self.cfg.node.clone(),
            listener: role.name().into(),
            src,
            orig_dst,
            src_workload: s.map(|w| w.id.clone()),
            dst_workload: d.map(|w| w.id.clone()),
            dst_service: None,
            src_identity: None,
            dst_identity: None,
            mtls: false,
            upstream_src: None,
            bytes_sent: 0,
            bytes_received: 0,
            outcome: Outcome::Ok,
            error: None,
            opened: false,
        }
    }

    /// Counts the connection as opened, once its path (and so its labels) is known.
    fn open(&self, rec: &mut ConnectionRecord) {
        self.metrics.opened(&TcpLabels::of(rec));
        rec.opened = true;
    }

    fn finish(&self, mut rec: ConnectionRecord, started: Instant, result: Result<(), Error>) {
        rec.duration_ms = started.elapsed().as_millis() as u64;
        if let Err(e) = result {
            rec.outcome = e.outcome();
            rec.error = Some(e.message());
        }
        if rec.opened {
            self.metrics.closed(&TcpLabels::of(&rec), &rec);
        }
        self.metrics.finished(&rec);
        self.log.record(&rec);
    }

    /// Plain TCP to `dst`, from `source` (a client's IP, transparently) or from the node.
    async fn relay_plain(
        &self,
        client: &mut TcpStream,
        dst: SocketAddr,
        source: Option<IpAddr>,
        rec: &mut ConnectionRecord,
    ) -> Result<(), Error> {
        let timeout = self.cfg.connect_timeout;
        let mut upstream =
            socket::connect_upstream(dst, source, timeout).await.map_err(|e| Error::upstream(dst, e, timeout))?;
        rec.upstream_src = upstream.local_addr().ok().map(canonical);
        self.relay_or_hand_over(client, &mut upstream, rec).await.map_err(|e| {
            socket::reset_on_close(&upstream);
            Error::Reset(e)
        })
    }

    fn is_pod_ip(&self, index: &WorkloadIndex, ip: IpAddr) -> bool {
        self.cfg.pod_cidrs.iter().any(|n| n.contains(&ip)) || index.get(ip).is_some()
    }
}

/// Now, in milliseconds since the Unix epoch (a record's `start_ms`).
fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Ports of the proxy itself: a tunnel or hand-over to one of them would loop.
pub fn is_proxy_port(port: u16) -> bool {
    Listener::ALL.iter().any(|l| l.port() == port)
}
