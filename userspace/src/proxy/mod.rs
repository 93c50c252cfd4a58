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
//! Upstream connections are made through a [`socket::SocketFactory`]: in production they
//! carry the proxy mark so the datapath never captures them again.
//!
//! Every connection is a [`conn::Conn`]: listed in the [`registry`] while open, and its
//! record written whichever way it ends (a drain that cuts it at exit included).

pub mod access_log;
mod authorize;
pub mod conn;
pub mod control;
pub mod error;
pub mod h2;
pub mod handover;
pub mod inbound;
pub mod inspect;
pub mod limits;
pub mod outbound;
pub mod pool;
pub mod registry;
pub mod relay;
pub mod socket;
#[cfg(test)]
mod testnet;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use meshpath_common::Listener;
use tokio::net::{TcpListener, TcpStream};

use crate::drain::{self, Mode, Watcher};
use crate::identity::Identity;
use crate::identity::manager::CertificateManager;
use crate::metrics::Metrics;
use crate::record::{ConnectionRecord, DrainCounts, Outcome};
use crate::state::{WorkloadIndex, canonical};
use crate::sync::lock;
use access_log::AccessLog;
use conn::{Conn, Ledger};
pub use error::Error;
use pool::Pool;
use registry::{Kind, Registry};
use socket::{SocketFactory, TransparentSockets};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("listening on {what} port {port}: {source} (is another meshpath running in this network namespace?)")]
    Listen { what: &'static str, port: u16, source: std::io::Error },
    #[error(transparent)]
    AccessLog(#[from] access_log::AccessLogError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
}

/// How upstream connections are made.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub node: String,
    /// Pod networks of the cluster. Outbound connections to these keep the client pod's IP
    /// as their source (the return path comes back through this node's datapath); other
    /// destinations are reached from the node's own address so NAT on the way out works.
    pub pod_cidrs: Vec<IpNet>,
    pub flags: ProxyFlags,
    /// Connections (and HBONE streams) held at once (from `flags` and the open-files limit).
    pub limits: Arc<limits::Limits>,
    /// How long a captured connection whose source the index does not know yet waits for it
    /// (under istiod, a pod captured before its workload came by xDS); zero: not at all.
    pub source_wait: Duration,
}

/// The proxy's part of `meshpath node`'s flags.
#[derive(Clone, Debug, clap::Args)]
pub struct ProxyFlags {
    /// Timeout for upstream connects.
    #[arg(long = "connect-timeout-secs", value_name = "SECS", env = "MESHPATH_CONNECT_TIMEOUT_SECS", default_value = "10", value_parser = crate::flags::secs(1..=300))]
    pub connect_timeout: Duration,
    /// Close HBONE connections that carried no stream for this long.
    #[arg(long = "hbone-idle-timeout-secs", value_name = "SECS", env = "MESHPATH_HBONE_IDLE_TIMEOUT_SECS", default_value = "300", value_parser = crate::flags::secs(1..=86_400))]
    pub hbone_idle_timeout: Duration,
    /// Connections (and HBONE streams) the proxy holds at once; more are refused and counted
    /// (`meshpath_connections_failed_total{reason="over_limit"}`). Default: what the open-files
    /// limit (raised to its hard limit) holds, two per connection, after 512 for the daemon.
    #[arg(long, env = "MESHPATH_MAX_CONNECTIONS", value_parser = crate::flags::count())]
    pub max_connections: Option<usize>,
    /// Of those, how many one client address may hold. Default: an eighth of --max-connections.
    #[arg(long, env = "MESHPATH_MAX_CONNECTIONS_PER_SOURCE", value_parser = crate::flags::count())]
    pub max_connections_per_source: Option<usize>,
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
    index: tokio::sync::watch::Sender<Arc<WorkloadIndex>>,
    ledger: Arc<Ledger>,
    certs: Arc<CertificateManager>,
    pool: Arc<Pool>,
    sockets: Arc<dyn SocketFactory>,
    /// TLS server configurations of local workloads, rebuilt when their certificate changes.
    server_tls: Mutex<HashMap<Identity, inbound::ServerTls>>,
    /// Every connection watches this; [`Proxy::serve`] passes the node's drain on to it.
    conns: drain::Trigger,
    /// Plain relays moving to a successor during a takeover.
    handover: handover::Handover,
}

impl Proxy {
    /// A proxy with the production sockets (transparent, marked).
    pub fn new(cfg: ProxyConfig, log: AccessLog, certs: Arc<CertificateManager>, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::with_sockets(cfg, log, certs, metrics, Arc::new(TransparentSockets))
    }

    /// A proxy that makes its upstream connections with `sockets`.
    pub fn with_sockets(
        cfg: ProxyConfig,
        log: AccessLog,
        certs: Arc<CertificateManager>,
        metrics: Arc<Metrics>,
        sockets: Arc<dyn SocketFactory>,
    ) -> Arc<Self> {
        let pool = Pool::new(cfg.flags.hbone_idle_timeout);
        let (conns, _) = drain::new();
        Arc::new(Self {
            limits: cfg.limits.clone(),
            cfg,
            index: tokio::sync::watch::channel(Arc::default()).0,
            ledger: Arc::new(Ledger { metrics, log, registry: Arc::default() }),
            certs,
            pool,
            sockets,
            server_tls: Mutex::default(),
            conns,
            handover: handover::Handover::default(),
        })
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
    pub fn count_drained(&self, d: &DrainCounts) {
        for (outcome, n) in d.by_outcome() {
            if n > 0 {
                self.ledger.metrics.drained(outcome, n);
            }
        }
    }

    /// Connections and HBONE streams open now (what a drain waits for).
    pub fn open_connections(&self) -> usize {
        self.limits.open()
    }

    /// The connections open now: listed, and closed one by one.
    pub fn registry(&self) -> &Registry {
        &self.ledger.registry
    }

    /// Serves the registry on a unix socket at `path`, root's only, for `meshpath status`
    /// and `meshpath close`; it goes (socket file and all) when the handle is dropped.
    pub fn listen_control(&self, path: &Path) -> Result<control::ControlSocket, ProxyError> {
        let view = control::View { index: self.index.subscribe(), node: self.cfg.node.clone() };
        Ok(control::ControlSocket::listen(path, self.ledger.registry.clone(), view)?)
    }

    /// Replaces the workload index; certificates of identities no longer in `local` (the
    /// node's workloads) are forgotten, and open connections its policies deny are closed.
    pub fn set_workloads(&self, index: WorkloadIndex, local: &BTreeSet<Identity>) {
        let index = Arc::new(index);
        let old = self.index.send_replace(index.clone());
        self.certs.retain(|id| local.contains(id));
        lock(&self.server_tls).retain(|id, _| local.contains(id));
        authorize::revoke_denied(&self.ledger.registry, &old, &index, &self.cfg.node);
    }

    fn index(&self) -> Arc<WorkloadIndex> {
        self.index.borrow().clone()
    }

    /// The first index that knows `ip`, waiting up to [`ProxyConfig::source_wait`].
    async fn index_knowing(&self, ip: IpAddr) -> Result<Arc<WorkloadIndex>, Error> {
        let waited = self.cfg.source_wait;
        let mut rx = self.index.subscribe();
        match tokio::time::timeout(waited, rx.wait_for(|i| i.get(ip).is_some())).await {
            Ok(Ok(index)) => Ok(index.clone()),
            _ => Err(Error::SourcePending { ip, waited }),
        }
    }

    /// Connections (and HBONE streams) held, and the limit.
    pub fn connections(&self) -> (usize, usize) {
        (self.limits.open(), self.limits.max_total())
    }

    /// Workload and service addresses of the index the proxy reads.
    pub fn mesh_size(&self) -> (usize, usize) {
        self.index.borrow().len()
    }

    /// HBONE pool occupancy.
    pub fn pool_stats(&self) -> crate::metrics::PoolStats {
        self.pool.stats()
    }

    /// Accepts on every listener until `drain` signals; then the listeners are closed (which
    /// also removes them from the SOCKMAP) and this returns. The open connections drain with
    /// `drain`, which is held until the last of them has ended: a graceful drain lets them
    /// finish (peers' HBONE connections get a GOAWAY), an immediate one cuts them, each
    /// writing its record.
    pub async fn serve(self: Arc<Self>, listeners: Vec<BoundListener>, drain: Watcher) {
        tokio::spawn(self.pool.clone().run_evictions(drain.clone()));
        tokio::spawn(self.certs.clone().run_renewals(drain.clone()));
        let tasks: Vec<_> =
            listeners.into_iter().map(|l| tokio::spawn(self.clone().accept_loop(l, drain.clone()))).collect();
        for t in tasks {
            let _ = t.await;
        }
        tokio::spawn(self.drain_connections(drain));
    }

    /// Passes the node's drain on to every connection, and holds `drain` until they ended.
    async fn drain_connections(self: Arc<Self>, mut drain: Watcher) {
        let mode = drain.signalled().await;
        self.conns.start(mode);
        if mode == Mode::Graceful {
            tokio::select! {
                () = self.conns.released() => return,
                () = drain.at_least(Mode::Immediate) => self.conns.start(Mode::Immediate),
            }
        }
        self.conns.released().await;
    }

    async fn accept_loop(self: Arc<Self>, l: BoundListener, mut drain: Watcher) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = drain.signalled() => return,
                r = l.socket.accept() => match r {
                    Ok((stream, peer)) => {
                        failing = false;
                        match stream.local_addr() {
                            Ok(orig_dst) => self.accepted(l.role, stream, peer, orig_dst),
                            Err(e) => tracing::debug!(error = %e, "accepted socket vanished"),
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

    /// Takes on a connection `role`'s listener accepted from `peer`, to `orig_dst` (the
    /// accepted socket's own address in production: sk_lookup does not rewrite it).
    pub fn accepted(self: &Arc<Self>, role: Listener, stream: TcpStream, peer: SocketAddr, orig_dst: SocketAddr) {
        let slot = match self.limits.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(_) => {
                // Refused at the door, counted, no record: a flood must not cost a log line
                // each (the limiter logs a summary).
                socket::reset_on_close(&stream);
                self.ledger.metrics.failed_at(role.name(), Outcome::OverLimit);
                return;
            }
        };
        // One snapshot of what the proxy knows serves the whole connection.
        let index = self.index();
        let (orig_dst, frontend) = self.destination(&index, role, &stream, canonical(orig_dst));
        let mut rec = self.record(&index, role, canonical(peer), orig_dst);
        rec.frontend = frontend;
        // The account is opened here, not in the task: a task the runtime drops before it
        // ever runs still writes its record.
        let conn = self.conn(rec, Some(slot));
        tokio::spawn(self.clone().handle(role, stream, index, conn));
    }

    /// Where the client was going, and the address it dialed when a NAT on this node
    /// rewrote that (kube-proxy's DNAT comes before local delivery). Outbound, a known
    /// service address replaces the endpoint (other DNATs, e.g. a NodePort, lead to pods the
    /// proxy should reach as such); otherwise the pod it was turned to stays the destination
    /// and the record names the frontend. HBONE is dialed to a pod by a peer proxy.
    fn destination(
        &self,
        index: &WorkloadIndex,
        role: Listener,
        s: &TcpStream,
        local: SocketAddr,
    ) -> (SocketAddr, Option<SocketAddr>) {
        let pre_nat = match role {
            Listener::Outbound | Listener::InboundPlain => self.sockets.pre_nat_destination(s, local),
            Listener::Hbone => None,
        };
        match pre_nat {
            Some(pre) if role == Listener::Outbound && index.is_service(pre) => (pre, None),
            frontend => (local, frontend),
        }
    }

    async fn handle(self: Arc<Self>, role: Listener, mut client: TcpStream, index: Arc<WorkloadIndex>, mut conn: Conn) {
        let _ = client.set_nodelay(true);
        let orig_dst = conn.rec.orig_dst;
        // The work first: its relays watch the same stop and reset their sockets on the way
        // out. Each future is built in place (see `conn::unless_stopped`).
        let mut stop = conn.stop();
        let result = match role {
            // Only a connection made straight to our loopback address gets here without
            // sk_lookup: that is a call to the proxy itself, never a workload's traffic.
            _ if orig_dst.ip().is_loopback() => Err(Error::SelfCall(orig_dst.port())),
            // HBONE connections carry many streams, each with its own record.
            Listener::Hbone => {
                let result = tokio::select! {
                    biased;
                    r = inbound::hbone(&self, &index, client, &mut conn) => r,
                    c = stop.wait() => Err(Error::Closed(c)),
                };
                return conn.finish(result);
            }
            _ => tokio::select! {
                biased;
                r = self.route(role, &index, &mut client, &mut conn) => r,
                c = stop.wait() => Err(Error::Closed(c)),
            },
        };
        if result.is_err() {
            socket::reset_on_close(&client);
        }
        conn.finish(result);
    }

    /// A captured connection (outbound), or plaintext to an enrolled pod.
    async fn route(
        &self,
        role: Listener,
        index: &WorkloadIndex,
        client: &mut TcpStream,
        conn: &mut Conn,
    ) -> Result<(), Error> {
        match role {
            Listener::Outbound => outbound::handle(self, index, client, conn).await,
            _ => inbound::plaintext(self, index, client, conn).await,
        }
    }

    /// A connection's account, watching this proxy's drain.
    fn conn(&self, rec: ConnectionRecord, slot: Option<limits::Slot>) -> Conn {
        Conn::new(self.ledger.clone(), rec, self.conns.watcher(), slot)
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
            frontend: None,
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
        }
    }

    /// Plain TCP to `dst`, from `source` (a client's IP, transparently) or from the node.
    async fn relay_plain(
        &self,
        client: &mut TcpStream,
        dst: SocketAddr,
        source: Option<IpAddr>,
        conn: &mut Conn,
        kind: Kind,
    ) -> Result<(), Error> {
        let entry = conn.open(kind, dst);
        let timeout = self.cfg.flags.connect_timeout;
        let mut upstream =
            self.sockets.connect(dst, source, timeout).await.map_err(|e| Error::upstream(dst, e, timeout))?;
        conn.rec.upstream_src = upstream.local_addr().ok().map(canonical);
        self.relay_or_hand_over(client, &mut upstream, conn, &entry).await
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
