//! `meshpath node`: the per-node daemon. It owns the datapath of the network namespace it
//! runs in, keeps the workload map in step with the workload file, and runs the proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::watch;

use crate::admin::{self, Readiness};
use crate::datapath::{self, AttachMode, Datapath, DatapathError};
use crate::identity::manager::CertificateManager;
use crate::identity::{CertificateProvider, IdentityError, ca, files};
use crate::k8s::services::ServiceTable;
use crate::k8s::{self, ClusterState, K8sError};
use crate::metrics::{self, Metrics};
use crate::proxy::{self, PlaintextPolicy, Proxy, ProxyConfig, WorkloadIndex, access_log::AccessLog};
use crate::routing::{self, Routing, RoutingError};
use crate::workloads::{WorkloadFile, WorkloadsError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Workloads(#[from] WorkloadsError),
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
    #[error(transparent)]
    AccessLog(#[from] proxy::access_log::AccessLogError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("interface {0:?} does not exist in this network namespace")]
    NoSuchInterface(String),
    #[error(transparent)]
    Kubernetes(#[from] K8sError),
    #[error("the Kubernetes watchers stopped before the first sync")]
    Sync,
    #[error("a meshpath daemon still serves this network namespace (its readiness port answers); stop it first")]
    DaemonRunning,
}

/// Settings of the node daemon.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node: String,
    pub source: Source,
    /// Interfaces to attach the classifier to; empty means every non-loopback interface,
    /// including ones that appear later.
    pub interfaces: Vec<String>,
    pub pod_cidrs: Vec<IpNet>,
    pub access_log: Option<PathBuf>,
    pub readiness_port: u16,
    pub metrics_port: u16,
    pub poll_interval: Duration,
    pub connect_timeout: Duration,
    pub attach_mode: AttachMode,
    pub trust_domain: String,
    pub certificates: CertSource,
    pub plaintext: PlaintextPolicy,
    pub hbone_idle_timeout: Duration,
    /// Run the proxy without loading the datapath (connections reach the listeners by
    /// other means, e.g. TPROXY rules: the benchmarks' baselines).
    pub proxy_only: bool,
}

/// Where workload certificates come from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// The built-in CA, with its root in `dir` (created there if absent) or in memory.
    BuiltinCa { dir: Option<PathBuf>, ttl: Duration },
    /// `<dir>/<namespace>/<service-account>/{cert-chain,key,root-cert}.pem`.
    Files { dir: PathBuf },
}

impl CertSource {
    fn provider(&self, trust_domain: &str) -> Result<Box<dyn CertificateProvider>, IdentityError> {
        Ok(match self {
            CertSource::BuiltinCa { dir, ttl } => {
                let ca = ca::BuiltinCa::open(dir.as_deref(), trust_domain, *ttl)?;
                tracing::info!(root = %ca.origin, ttl = ?ttl, "workload certificates come from the built-in CA");
                Box::new(ca::CaProvider(ca))
            }
            CertSource::Files { dir } => {
                tracing::info!(dir = %dir.display(), "workload certificates come from files");
                Box::new(files::FileProvider::new(dir)?)
            }
        })
    }
}

/// Where the desired state comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A workload file, polled for changes.
    File(PathBuf),
    /// The Kubernetes API (KUBECONFIG, ~/.kube/config or in-cluster).
    Kubernetes,
}

/// The desired-state source as the main loop follows it.
enum Desired {
    File {
        path: PathBuf,
        last_text: String,
        read_failed: bool,
        read: FileRead,
    },
    Kubernetes(watch::Receiver<Option<Arc<ClusterState>>>),
    /// The watchers ended (only on shutdown): nothing more will come.
    Ended,
}

/// Waits for the next cluster state; never resolves for a file.
async fn cluster_changed(d: &mut Desired) -> bool {
    match d {
        Desired::Kubernetes(rx) => rx.changed().await.is_ok(),
        _ => std::future::pending().await,
    }
}

/// Runs until `shutdown` resolves. On return the listeners are closed, so enrolled traffic
/// fails closed, while programs, maps and routing stay in the kernel for the next instance.
pub async fn run(cfg: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), NodeError> {
    datapath::validate_node_name(&cfg.node)?;
    // Validate everything cheap before touching the kernel. The bytes parsed here are the
    // ones later edits are compared with, so an edit made during start-up is not missed.
    // The file's stamp is taken before it is read: an edit made after the read then shows
    // as a changed stamp.
    let initial_stamp = match &cfg.source {
        Source::File(path) => FileStamp::of(path),
        Source::Kubernetes => None,
    };
    let initial_file = match &cfg.source {
        Source::File(path) => Some(WorkloadFile::load_with_text(path)?),
        Source::Kubernetes => None,
    };
    let client = match cfg.source {
        Source::Kubernetes => Some(k8s::client().await?),
        Source::File(_) => None,
    };
    let log = AccessLog::open(cfg.access_log.as_deref())?;
    let certs = CertificateManager::new(cfg.certificates.provider(&cfg.trust_domain)?);
    let admin_listener = admin::bind(cfg.readiness_port).await?;
    let metrics_listener = admin::bind(cfg.metrics_port).await?;
    let metrics = Metrics::new();
    let listeners = proxy::bind_listeners()?;

    // The capture rule and routes are installed by the first reconcile pass below. Until
    // then a restarted node keeps capturing with the pinned maps (and drops that traffic:
    // no listener is registered yet).
    let mut kernel = if cfg.proxy_only {
        tracing::info!("proxy only: no datapath is loaded; something else must deliver connections to the listeners");
        None
    } else {
        let mut routing = Routing::connect()?;
        routing.watch_routes()?;
        Some(Kernel { routing, dp: Datapath::load(&cfg.node, cfg.attach_mode)? })
    };

    let proxy = Proxy::new(
        ProxyConfig {
            node: cfg.node.clone(),
            pod_cidrs: cfg.pod_cidrs.clone(),
            connect_timeout: cfg.connect_timeout,
            plaintext: cfg.plaintext,
            hbone_idle_timeout: cfg.hbone_idle_timeout,
        },
        log,
        certs,
        metrics.clone(),
    );
    metrics.set_sources(ScrapeSources { node: cfg.node.clone(), proxy: proxy.clone() });

    // Probes get answers (503 until ready) while the first state is awaited.
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(logger) = kernel.as_mut().and_then(|k| k.dp.take_logger()) {
        spawn_ebpf_log_drain(logger, stop_rx.clone());
    }
    let ready = Readiness::default();
    let routes = admin::Routes { ready: ready.clone(), metrics };
    let admin_task = tokio::spawn(admin::serve(admin_listener, routes.clone(), stop_rx.clone()));
    let metrics_task = tokio::spawn(admin::serve(metrics_listener, routes, stop_rx.clone()));
    tokio::pin!(shutdown);

    let (mut desired, file, services) = match (initial_file, client) {
        (Some((file, last_text)), _) => {
            let Source::File(path) = cfg.source.clone() else { unreachable!("a file was read") };
            let read = FileRead { stamp: initial_stamp, at: std::time::SystemTime::now() };
            (Desired::File { path, last_text, read_failed: false, read }, file, ServiceTable::new())
        }
        (None, Some(client)) => {
            let mut rx = k8s::start(client, stop_rx.clone());
            tracing::info!("waiting for the first full list of pods, namespaces, services and endpoint slices");
            let state = loop {
                tokio::select! {
                    _ = &mut shutdown => {
                        let _ = stop_tx.send(true);
                        let _ = tokio::join!(admin_task, metrics_task);
                        tracing::info!("stopped before the first sync; the pinned datapath is unchanged");
                        return Ok(());
                    }
                    r = rx.changed() => {
                        if r.is_err() {
                            return Err(NodeError::Sync);
                        }
                        if let Some(s) = rx.borrow_and_update().clone() {
                            break s;
                        }
                    }
                }
            };
            (Desired::Kubernetes(rx), state.workloads.clone(), state.services.clone())
        }
        (None, None) => unreachable!("a source is always set up"),
    };
    proxy.set_workloads(WorkloadIndex::new(&file, services, &cfg.trust_domain));
    if let Some(k) = kernel.as_mut() {
        for l in &listeners {
            k.dp.register_listener(l.role, l.ipv6, &l.socket)?;
        }
        tracing::info!(count = listeners.len(), "proxy listeners registered in the SOCKMAP");
    }

    let mut rec = Reconciler::new(&cfg, kernel, file);
    // Stale entries of a previous run go here, before the node reports ready.
    rec.reconcile().await?;
    let proxy_task = tokio::spawn(proxy.clone().serve(listeners, stop_rx.clone()));
    ready.set(true);
    tracing::info!(node = %cfg.node, source = ?cfg.source, "node ready");

    let mut tick = tokio::time::interval(cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let cluster_event = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => false,
            alive = cluster_changed(&mut desired) => {
                if !alive {
                    tracing::error!("the Kubernetes watchers stopped; keeping the last state");
                    desired = Desired::Ended;
                }
                alive
            }
        };
        match &mut desired {
            Desired::Kubernetes(rx) if cluster_event => {
                if let Some(state) = rx.borrow_and_update().clone() {
                    proxy.set_workloads(WorkloadIndex::new(
                        &state.workloads,
                        state.services.clone(),
                        &cfg.trust_domain,
                    ));
                    rec.set_file(state.workloads.clone());
                }
            }
            Desired::File { path, last_text, read_failed, read } => {
                // Unchanged metadata (inode, size, mtime) means an unchanged file: at 10 000
                // workloads reading and comparing a megabyte every tick is not free.
                let now = FileStamp::of(path);
                let unchanged = !*read_failed && read.still_current(now);
                if !unchanged {
                    *read = FileRead { stamp: now, at: std::time::SystemTime::now() };
                }
                // A changed file is applied whole or not at all; an unreadable one changes
                // nothing (reading it as empty would unenrol every workload).
                match if unchanged { Ok(std::mem::take(last_text)) } else { std::fs::read_to_string(&*path) } {
                    Err(e) => {
                        if !*read_failed {
                            tracing::error!("cannot read {}, keeping the running state: {e}", path.display());
                            *read_failed = true;
                        }
                    }
                    Ok(text) if unchanged => *last_text = text,
                    Ok(text) => {
                        *read_failed = false;
                        if text != *last_text {
                            *last_text = text;
                            match WorkloadFile::parse(last_text, &path.display().to_string()) {
                                Ok(f) => {
                                    tracing::info!(workloads = f.workloads.len(), "workload file changed; applying");
                                    proxy.set_workloads(WorkloadIndex::new(&f, ServiceTable::new(), &cfg.trust_domain));
                                    rec.set_file(f);
                                }
                                Err(e) => tracing::error!("rejected workload file, keeping the running state: {e}"),
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        if let Err(e) = rec.reconcile().await {
            tracing::error!("reconcile failed (will retry): {e}");
        }
    }

    ready.set(false);
    let _ = stop_tx.send(true);
    let _ = proxy_task.await;
    let _ = admin_task.await;
    let _ = metrics_task.await;
    tracing::info!(
        pin_dir = %datapath::node_pin_dir(&cfg.node).map(|p| p.display().to_string()).unwrap_or_default(),
        "stopped; the datapath stays pinned and drops enrolled traffic until a daemon takes over (`meshpath uninstall` removes it)"
    );
    Ok(())
}

/// Scrape-time figures: the pinned counters (read through the pin, so a scrape needs no
/// handle on the loader) and the proxy's pool.
struct ScrapeSources {
    node: String,
    proxy: std::sync::Arc<Proxy>,
}

impl metrics::Sources for ScrapeSources {
    fn datapath_counters(&self) -> Option<Vec<(&'static str, u64)>> {
        let c = datapath::read_pinned_counters(&self.node).ok()?;
        Some(meshpath_common::Counter::ALL.iter().map(|k| (k.name(), c.get(*k))).collect())
    }

    fn pool(&self) -> proxy::pool::PoolStats {
        self.proxy.pool_stats()
    }
}

/// What identifies a version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileStamp {
    fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// When the workload file was last read, and its stamp just before.
#[derive(Clone, Copy, Debug)]
struct FileRead {
    stamp: Option<FileStamp>,
    at: std::time::SystemTime,
}

impl FileRead {
    /// Whether a file with stamp `now` is certainly what was read: the same stamp, a
    /// modification time well before that read (an edit within the same timestamp tick as
    /// the read could hide behind an equal stamp: git's "racy" rule), and a read not older
    /// than a full pass.
    fn still_current(&self, now: Option<FileStamp>) -> bool {
        let (Some(then), Some(now)) = (self.stamp, now) else { return false };
        let settled = self
            .at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX) - now.mtime_ns > 2_000_000_000)
            .unwrap_or(false);
        then == now && settled && self.at.elapsed().map(|e| e < FULL_PASS).unwrap_or(false)
    }
}

/// What the daemon drives in the kernel; absent with `--proxy-only`.
struct Kernel {
    routing: Routing,
    dp: Datapath,
}

/// How long the map's contents are trusted before they are read again (meshpath is their only
/// writer; this catches anyone else's edits).
const FULL_PASS: Duration = Duration::from_secs(10);
/// Route changes arrive as notifications; in case some were lost (a full socket buffer), every
/// cached route lookup is also redone within this period, a slice per tick: at 10 000
/// workloads that is a handful of lookups per tick instead of a burst of 10 000.
const ROUTE_RECHECK: Duration = Duration::from_secs(300);

struct Reconciler<'a> {
    cfg: &'a NodeConfig,
    kernel: Option<Kernel>,
    file: WorkloadFile,
    /// Workload IPs whose interface could not be found, with the last reason logged.
    unresolved: BTreeMap<IpAddr, String>,
    /// Route lookups of earlier passes: IP → the interface the kernel routes it to.
    routes: BTreeMap<IpAddr, Option<u32>>,
    /// The interfaces (index, name, up) those lookups were made with.
    routes_for: Vec<(u32, String, bool)>,
    /// What the workload map holds: meshpath is its only writer, so this is read from the
    /// kernel only on full passes.
    map: Option<BTreeMap<IpAddr, u32>>,
    last_full: std::time::Instant,
    /// Where the rolling re-check of cached routes stopped last tick.
    refreshed_up_to: Option<IpAddr>,
    /// The desired state changed since the last pass over the workloads.
    dirty: bool,
    /// Interfaces carrying the classifier at the last pass.
    last_attached: BTreeSet<u32>,
}

impl<'a> Reconciler<'a> {
    fn new(cfg: &'a NodeConfig, kernel: Option<Kernel>, file: WorkloadFile) -> Self {
        Self {
            cfg,
            kernel,
            file,
            unresolved: BTreeMap::new(),
            routes: BTreeMap::new(),
            routes_for: Vec::new(),
            map: None,
            last_full: std::time::Instant::now(),
            refreshed_up_to: None,
            dirty: true,
            last_attached: BTreeSet::new(),
        }
    }

    fn set_file(&mut self, file: WorkloadFile) {
        self.file = file;
        self.dirty = true;
    }

    /// Makes the kernel match the desired state: the classifier on every interface it
    /// should be on, then the workload map. The classifier goes first so an IP is never in
    /// the map while its interface lacks the program.
    async fn reconcile(&mut self) -> Result<(), NodeError> {
        let Some(k) = self.kernel.as_mut() else { return Ok(()) };
        let ifaces = k.routing.interfaces().await?;
        let names = routing::names_by_index(&ifaces);
        let wanted: Vec<_> = if self.cfg.interfaces.is_empty() {
            ifaces.iter().filter(|i| !i.loopback).collect()
        } else {
            let mut v = Vec::new();
            for name in &self.cfg.interfaces {
                v.push(
                    ifaces.iter().find(|i| &i.name == name).ok_or_else(|| NodeError::NoSuchInterface(name.clone()))?,
                );
            }
            v
        };
        // Someone may have flushed our rule or routes: put them back (idempotent).
        k.routing.install_capture().await?;
        for i in &wanted {
            // An interface can vanish between listing and attaching (pod churn): skip it,
            // the next pass sees the new state.
            if let Err(e) = k.dp.attach_tc(i.index, &i.name) {
                tracing::warn!(interface = %i.name, "attaching the classifier failed (will retry): {e}");
            }
        }
        let existing: BTreeSet<u32> = ifaces.iter().map(|i| i.index).collect();
        k.dp.prune_tc(&existing)?;
        let attached = k.dp.attached_interfaces();

        // Cached route lookups hold while the interfaces are the same and no route covering
        // them changed.
        // With each interface's up state: an interface going down takes its IPv4 routes
        // along without a route notification.
        let iface_list: Vec<(u32, String, bool)> = ifaces.iter().map(|i| (i.index, i.name.clone(), i.up)).collect();
        let relist = iface_list != self.routes_for || self.map.is_none();
        // A route the kernel announced as changed is looked up again; so, as a safety net for
        // lost notifications, is a slice of the cache each tick (all of it every ROUTE_RECHECK).
        match k.routing.route_changes() {
            routing::RouteChanges::Destinations(nets) => {
                for net in nets {
                    if forget_routes_in(&mut self.routes, &net) {
                        tracing::debug!(%net, "route changed; its workloads' interfaces are looked up again");
                        self.dirty = true;
                    }
                }
            }
            routing::RouteChanges::Lost => {
                tracing::info!("route notifications were lost; looking up every workload's interface again");
                self.routes.clear();
                self.dirty = true;
            }
        }
        if !relist {
            let slice = refresh_slice(&self.routes, &mut self.refreshed_up_to, self.cfg.poll_interval);
            for (ip, route) in k.routing.interfaces_for(slice).await? {
                if self.routes.get(&ip) != Some(&route) {
                    tracing::debug!(%ip, ?route, "route changed");
                    self.routes.remove(&ip);
                    self.dirty = true;
                }
            }
        }
        let full = relist || self.last_full.elapsed() >= FULL_PASS;
        // Nothing to redo: the same workloads over the same interfaces with the same
        // classifiers, all resolved, recently checked. Unresolved IPs are retried every tick.
        if !full && !self.dirty && attached == self.last_attached && self.unresolved.is_empty() {
            return Ok(());
        }
        if relist {
            self.routes.clear();
            self.routes_for = iface_list;
        }
        if full {
            self.last_full = std::time::Instant::now();
            self.map = Some(k.dp.workloads()?);
        }

        // Desired map: this node's workload IPs → the interface the kernel routes them to.
        let mut desired: BTreeMap<IpAddr, (u32, String)> = BTreeMap::new();
        let mut still_unresolved = BTreeMap::new();
        let unknown: BTreeSet<IpAddr> = self
            .file
            .on_node(&self.cfg.node)
            .flat_map(|w| w.ips.iter().map(|ip| ip.to_canonical()))
            .filter(|ip| !self.routes.contains_key(ip))
            .collect();
        let looked_up = k.routing.interfaces_for(unknown).await?;
        let mut routes = BTreeMap::new();
        for w in self.file.on_node(&self.cfg.node) {
            for ip in &w.ips {
                let ip = ip.to_canonical();
                let route = match self.routes.get(&ip) {
                    Some(r) => *r,
                    None => looked_up.get(&ip).copied().flatten(),
                };
                routes.insert(ip, route);
                let problem = match route {
                    Some(ifx) if attached.contains(&ifx) => {
                        desired.insert(ip, (ifx, w.id()));
                        continue;
                    }
                    Some(ifx) => format!(
                        "routed via {} which meshpath is not attached to (see --interfaces)",
                        names.get(&ifx).map(String::as_str).unwrap_or("?")
                    ),
                    None => "no device route to it on this node (is its veth up?)".to_string(),
                };
                if self.unresolved.get(&ip) != Some(&problem) {
                    tracing::warn!(workload = %w.id(), %ip, "not enrolled yet: {problem}");
                }
                still_unresolved.insert(ip, problem);
            }
        }
        self.unresolved = still_unresolved;
        // Unresolved IPs are asked again next pass: their veth may come up any moment.
        routes.retain(|_, r| r.is_some());
        self.routes = routes;

        // Interface flags go after their IPs on the way in and before them on the way out,
        // so a workload's own TCP is never dropped as coming from an unenrolled source.
        let wanted_ifs: BTreeSet<u32> = desired.values().map(|(ifx, _)| *ifx).collect();
        let keep_ifs = k.dp.workload_interfaces()?.intersection(&wanted_ifs).copied().collect();
        k.dp.set_workload_interfaces(&keep_ifs)?;
        let current = self.map.get_or_insert_with(BTreeMap::new);
        let stale: Vec<IpAddr> = current.keys().filter(|ip| !desired.contains_key(ip)).copied().collect();
        for ip in stale {
            k.dp.remove_workload(ip)?;
            current.remove(&ip);
            tracing::info!(%ip, "unenrolled");
        }
        for (ip, (ifx, id)) in &desired {
            if current.get(ip) != Some(ifx) {
                k.dp.upsert_workload(*ip, *ifx)?;
                current.insert(*ip, *ifx);
                let ifname = names.get(ifx).map(String::as_str).unwrap_or("?");
                tracing::info!(workload = %id, %ip, interface = ifname, ifindex = ifx, "enrolled");
            }
        }
        k.dp.set_workload_interfaces(&wanted_ifs)?;
        // Only a pass that went through clears the flags: a failed one is retried next tick.
        self.dirty = false;
        self.last_attached = attached;
        Ok(())
    }
}

/// Drops the cached lookups of the IPs inside `net`, which are one contiguous range of keys
/// (a burst of thousands of pod-route notifications then costs a lookup each, not a scan of
/// the cache each). Whether any was cached.
fn forget_routes_in(routes: &mut BTreeMap<IpAddr, Option<u32>>, net: &IpNet) -> bool {
    let inside: Vec<IpAddr> = routes.range(net.network()..=net.broadcast()).map(|(ip, _)| *ip).collect();
    for ip in &inside {
        routes.remove(ip);
    }
    !inside.is_empty()
}

/// The next cached IPs to look up again, after where the last slice stopped and wrapping
/// around: enough per tick that the whole cache is re-checked once per ROUTE_RECHECK.
fn refresh_slice(routes: &BTreeMap<IpAddr, Option<u32>>, cursor: &mut Option<IpAddr>, tick: Duration) -> Vec<IpAddr> {
    let ticks = (ROUTE_RECHECK.as_millis() / tick.as_millis().max(1)).max(1) as usize;
    let after = cursor.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
    let slice: Vec<IpAddr> = routes
        .range((after, std::ops::Bound::Unbounded))
        .chain(routes.iter())
        .map(|(ip, _)| *ip)
        .take(routes.len().div_ceil(ticks))
        .collect();
    *cursor = slice.last().copied();
    slice
}

/// Drains the eBPF log buffer on a thread of its own (it is a plain fd to poll).
fn spawn_ebpf_log_drain(mut logger: datapath::EbpfLogger, stop: watch::Receiver<bool>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let spawned = std::thread::Builder::new().name("ebpf-log".into()).spawn(move || {
        while !*stop.borrow() {
            let ready = {
                let mut fds = [PollFd::new(logger.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(500u16))
            };
            match ready {
                Ok(n) if n > 0 => logger.flush(),
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "polling eBPF logs failed; kernel-side log lines are no longer shown");
                    return;
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the eBPF log thread");
    }
}

/// `meshpath uninstall`: removes every rule, route, attachment and pin of `node` from the
/// current network namespace and bpffs.
pub async fn uninstall(node: &str, readiness_port: u16) -> Result<String, NodeError> {
    datapath::validate_node_name(node)?;
    if std::net::TcpStream::connect_timeout(
        &(std::net::Ipv4Addr::LOCALHOST, readiness_port).into(),
        Duration::from_millis(300),
    )
    .is_ok()
    {
        return Err(NodeError::DaemonRunning);
    }
    let routing = Routing::connect()?;
    let (rules, routes) = routing.remove_capture().await?;
    let names = routing::names_by_index(&routing.interfaces().await?);
    let (qdiscs, filters) = datapath::detach_netlink_filters(node, |i| names.get(&i).cloned())?;
    for ifindex in &qdiscs {
        routing.delete_clsact(*ifindex).await?;
    }
    let pins = datapath::unpin_all(node)?;
    Ok(format!(
        "removed {rules} routing rule(s), {routes} route(s), {} link pin(s) (detaching their programs), {filters} tc filter(s), \
         {} clsact qdisc(s) and {} map pin(s) of node {node}",
        pins.links,
        qdiscs.len(),
        pins.maps
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_route_forgets_exactly_the_ips_it_covers() {
        let ips = ["10.244.1.10", "10.244.1.11", "10.244.2.10", "fd00:244:1::10", "fd00:244:2::10"];
        let cache = || -> BTreeMap<IpAddr, Option<u32>> { ips.iter().map(|i| (i.parse().unwrap(), Some(3))).collect() };
        let left = |net: &str| {
            let mut c = cache();
            let any = forget_routes_in(&mut c, &net.parse().unwrap());
            (any, c.keys().map(|k| k.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            left("10.244.1.11/32"),
            (true, vec!["10.244.1.10".into(), "10.244.2.10".into(), "fd00:244:1::10".into(), "fd00:244:2::10".into()])
        );
        assert_eq!(
            left("10.244.1.0/24"),
            (true, vec!["10.244.2.10".into(), "fd00:244:1::10".into(), "fd00:244:2::10".into()])
        );
        assert_eq!(
            left("fd00:244:2::/48"),
            (true, vec!["10.244.1.10".into(), "10.244.1.11".into(), "10.244.2.10".into(), "fd00:244:1::10".into()])
        );
        // A default route covers its whole family, and only it.
        assert_eq!(left("0.0.0.0/0").1, vec!["fd00:244:1::10".to_string(), "fd00:244:2::10".into()]);
        assert_eq!(left("10.9.0.0/16"), (false, ips.iter().map(|s| s.to_string()).collect()));
    }

    #[test]
    fn rolling_refresh_covers_every_route_once_per_recheck_period_and_wraps() {
        let routes: BTreeMap<IpAddr, Option<u32>> =
            (0..1000u32).map(|i| (IpAddr::from((0x0a00_0000 + i).to_be_bytes()), Some(3))).collect();
        let tick = Duration::from_millis(250);
        let ticks = (ROUTE_RECHECK.as_millis() / tick.as_millis()) as usize;
        let mut cursor = None;
        let mut seen = BTreeSet::new();
        let mut calls = 0;
        while seen.len() < routes.len() {
            let slice = refresh_slice(&routes, &mut cursor, tick);
            assert!(!slice.is_empty() && slice.len() <= routes.len().div_ceil(ticks), "a tick did more than its share");
            seen.extend(slice);
            calls += 1;
            assert!(calls <= ticks, "some routes were not re-checked within one period");
        }
        // The next round starts over from the beginning.
        let again = refresh_slice(&routes, &mut cursor, tick);
        assert_eq!(again.first(), routes.keys().next());
        // An empty cache asks for nothing; a tiny one is checked whole every tick.
        assert!(refresh_slice(&BTreeMap::new(), &mut None, tick).is_empty());
        let one: BTreeMap<IpAddr, Option<u32>> = [(IpAddr::from([10, 0, 0, 1]), Some(1))].into();
        let mut c = None;
        for _ in 0..3 {
            assert_eq!(refresh_slice(&one, &mut c, tick).len(), 1);
        }
    }
}
