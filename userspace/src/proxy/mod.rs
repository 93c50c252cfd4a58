//! The node proxy: accepts the connections sk_lookup steers into its listeners and relays
//! them to their original destination.
//!
//! The accepted socket's local address *is* the original destination (sk_lookup assigns
//! the connection to our socket without rewriting it), and its peer is the real client.
//! Upstream connections carry the proxy mark so the datapath never captures them again.

pub mod access_log;
pub mod socket;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use meshpath_common::Listener;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::workloads::WorkloadFile;
use access_log::{AccessLog, ConnectionRecord};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("listening on {what} port {port}: {source} (is another meshpath running in this network namespace?)")]
    Listen { what: &'static str, port: u16, source: std::io::Error },
    #[error(transparent)]
    AccessLog(#[from] access_log::AccessLogError),
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
}

/// What the proxy knows about workloads: `namespace/name` by IP, on any node.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    by_ip: BTreeMap<IpAddr, String>,
}

impl WorkloadIndex {
    pub fn from_file(f: &WorkloadFile) -> Self {
        Self {
            by_ip: f
                .by_ip()
                .into_iter()
                .map(|(ip, w)| (ip, w.id()))
                .collect(),
        }
    }

    fn get(&self, ip: IpAddr) -> Option<String> {
        self.by_ip.get(&ip).cloned()
    }
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
                    tracing::warn!(listener = role.name(), "no IPv6 loopback: IPv6 traffic of enrolled pods will be refused");
                }
                Err(source) => return Err(ProxyError::Listen { what: role.name(), port: role.port(), source }),
            }
        }
    }
    Ok(out)
}

pub struct Proxy {
    cfg: ProxyConfig,
    index: RwLock<Arc<WorkloadIndex>>,
    log: AccessLog,
}

impl Proxy {
    pub fn new(cfg: ProxyConfig, log: AccessLog) -> Arc<Self> {
        Arc::new(Self { cfg, index: RwLock::new(Arc::default()), log })
    }

    pub fn set_workloads(&self, index: WorkloadIndex) {
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(index);
    }

    fn index(&self) -> Arc<WorkloadIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Accepts on every listener until `shutdown` changes; then the listeners are
    /// closed, which also removes them from the SOCKMAP.
    pub async fn serve(self: Arc<Self>, listeners: Vec<BoundListener>, shutdown: watch::Receiver<bool>) {
        let tasks: Vec<_> = listeners
            .into_iter()
            .map(|l| tokio::spawn(self.clone().accept_loop(l, shutdown.clone())))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn accept_loop(self: Arc<Self>, l: BoundListener, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                r = l.socket.accept() => match r {
                    Ok((stream, peer)) => {
                        tokio::spawn(self.clone().handle(l.role, stream, peer));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(listener = l.role.name(), error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    async fn handle(self: Arc<Self>, role: Listener, mut client: TcpStream, peer: SocketAddr) {
        let started = Instant::now();
        let start_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let src = canonical(peer);
        let orig_dst = match client.local_addr() {
            Ok(a) => canonical(a),
            Err(e) => {
                tracing::debug!(error = %e, "accepted socket vanished");
                return;
            }
        };
        let index = self.index();
        let mut rec = ConnectionRecord {
            start_ms,
            duration_ms: 0,
            node: self.cfg.node.clone(),
            listener: role.name().into(),
            src,
            orig_dst,
            src_workload: index.get(src.ip()),
            dst_workload: index.get(orig_dst.ip()),
            upstream_src: None,
            bytes_sent: 0,
            bytes_received: 0,
            outcome: String::new(),
        };
        let _ = client.set_nodelay(true);
        rec.outcome = match self.relay(role, &mut client, &mut rec).await {
            Ok(()) => "ok".into(),
            Err(e) => {
                socket::reset_on_close(&client);
                e
            }
        };
        rec.duration_ms = started.elapsed().as_millis() as u64;
        self.log.record(&rec);
    }

    async fn relay(&self, role: Listener, client: &mut TcpStream, rec: &mut ConnectionRecord) -> Result<(), String> {
        // Only a connection made straight to our loopback address gets here without
        // sk_lookup: that is a call to the proxy itself, never a workload's traffic.
        if rec.orig_dst.ip().is_loopback() {
            return Err("refused: direct connection to a proxy port".into());
        }
        let source = match role {
            Listener::Outbound if !self.is_pod_ip(rec.orig_dst.ip()) => None,
            _ => Some(rec.src.ip()),
        };
        let mut upstream = socket::connect_upstream(rec.orig_dst, source, self.cfg.connect_timeout)
            .await
            .map_err(|e| format!("upstream connect failed: {e}"))?;
        rec.upstream_src = upstream.local_addr().ok().map(canonical);
        match tokio::io::copy_bidirectional(client, &mut upstream).await {
            Ok((sent, received)) => {
                rec.bytes_sent = sent;
                rec.bytes_received = received;
                Ok(())
            }
            Err(e) => {
                socket::reset_on_close(&upstream);
                Err(format!("reset: {e}"))
            }
        }
    }

    fn is_pod_ip(&self, ip: IpAddr) -> bool {
        self.cfg.pod_cidrs.iter().any(|n| n.contains(&ip)) || self.index().by_ip.contains_key(&ip)
    }
}

/// IPv4-mapped IPv6 socket addresses as plain IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}
