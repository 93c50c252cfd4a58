//! `meshpath node`: the per-node daemon. It owns the datapath of the network namespace it
//! runs in, keeps the workload maps in step with the desired state its [`source`] publishes,
//! and runs the proxy.
//!
//! - [`source`]: the workload file or Kubernetes, each publishing the desired state;
//! - [`reconcile`]: attachments, route resolution and the map diff;
//! - [`routes`]: the cache of which interface each workload IP is routed to;
//! - [`lock`]: the node lock daemons share and `uninstall` takes whole;
//! - [`instance`]: each daemon's note of its sockets and state, for `status`;
//! - [`takeover`]: a successor daemon taking the node over, relays and all;
//! - [`drops`]: the datapath's drop events, as rate-limited log lines.

mod drops;
pub mod instance;
pub mod lock;
mod reconcile;
mod routes;
pub mod source;
pub mod takeover;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::watch;

use crate::admin::{self, Readiness};
use crate::datapath::{self, AttachMode, Datapath, DatapathError};
use crate::drain::{self, Mode};
use crate::identity::manager::CertificateManager;
use crate::identity::{CertificateProvider, IdentityError, ca, files};
use crate::metrics::{self, Metrics};
use crate::proxy::limits::{self, Limits};
use crate::proxy::{self, PlaintextPolicy, Proxy, ProxyConfig, access_log::AccessLog};
use crate::record::DrainCounts;
use crate::routing::{self, Interface, Routing, RoutingError};
use crate::state::{DesiredState, WorkloadIndex};
use crate::topology::{Role, Topology};
use lock::{LockError, NodeLock};
use reconcile::{Reconciler, Trigger};
use source::{Source, SourceError, StateRx};
use takeover::{Predecessor, Successors};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Source(#[from] SourceError),
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
    #[error(
        "interface {bridge} is a bridge with pods behind it (a bridge CNI such as flannel's cni0), and the \
         pods' network namespaces, which name each pod's port, cannot be read in {}: {source} (see --netns-dir)",
        dir.display()
    )]
    PodNamespaces { bridge: String, dir: PathBuf, source: std::io::Error },
    #[error("the source of the desired state stopped before its first state")]
    Sync,
    #[error("a meshpath daemon still serves node {0} (it holds the node lock); stop it first")]
    DaemonRunning(String),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Takeover(#[from] takeover::TakeoverError),
    #[error(
        "IPv4 forwarding is off in this network namespace (net.ipv4.ip_forward=0): pods cannot be routed through it"
    )]
    Forwarding,
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
    /// Where pods' network namespaces are pinned: read to find each pod's bridge port.
    pub netns_dir: PathBuf,
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
    /// How long a stopping daemon lets open connections finish.
    pub drain_timeout: Duration,
    /// Connections (and HBONE streams) held at once; `None`: what the open-files limit holds.
    pub max_connections: Option<usize>,
    /// Of those, per client address; `None`: an eighth of the node's.
    pub max_connections_per_source: Option<usize>,
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

/// The safety tick: even when the kernel announces nothing, every this often the whole
/// state is looked at again (interfaces, the capture rule and routes, pins, a slice of the
/// cached route lookups). Everything else is driven by changes.
pub(super) const SAFETY_TICK: Duration = Duration::from_secs(10);

/// Runs until `shutdown` resolves. On return the listeners are closed, so enrolled traffic
/// fails closed, while programs, maps and routing stay in the kernel for the next instance.
pub async fn run(cfg: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    datapath::validate_node_name(&cfg.node)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // Everything cheap is validated before the kernel is touched: a bad workload file or
    // Kubernetes configuration fails the start here.
    let mut desired = cfg.source.start(cfg.poll_interval, stop_rx.clone()).await?;
    let log = AccessLog::open(cfg.access_log.as_deref())?;
    let certs = CertificateManager::new(cfg.certificates.provider(&cfg.trust_domain)?);
    let admin_listener = admin::bind(cfg.readiness_port).await?;
    let metrics_listener = admin::bind(cfg.metrics_port).await?;
    let metrics = Metrics::new();
    let listeners = proxy::bind_listeners()?;
    let _lock = if cfg.proxy_only { None } else { Some(NodeLock::shared(&cfg.node)?) };
    let mut instance = if cfg.proxy_only { None } else { instance::Instance::create(&cfg.node) };
    // A daemon serving the node now hands it over once this one is ready.
    let predecessor = if cfg.proxy_only { None } else { Predecessor::announce(&cfg.node).await };
    // Nothing of this node pinned yet: a start that fails takes out again everything it put
    // into the kernel.
    let fresh = !cfg.proxy_only && datapath::is_fresh(&cfg.node)?;

    // The capture rule and routes are installed by the first reconcile pass below. Until
    // then a restarted node keeps capturing with the pinned maps (and drops that traffic:
    // no listener is registered yet).
    let mut kernel = if cfg.proxy_only {
        tracing::info!("proxy only: no datapath is loaded; something else must deliver connections to the listeners");
        None
    } else {
        match load_kernel(&cfg).await {
            Ok(k) => Some(k),
            Err(e) => return undo_start(&cfg.node, fresh, Err(e)).await,
        }
    };

    let proxy = new_proxy(&cfg, log, certs, &metrics);
    metrics.set_sources(ScrapeSources { node: cfg.node.clone(), proxy: proxy.clone() });
    // `meshpath status` lists this daemon's open connections through it.
    let _control = instance.as_ref().and_then(|_| {
        let path = instance::control_socket(&cfg.node, std::process::id());
        proxy
            .listen_control(&path)
            .inspect_err(|e| tracing::warn!("`meshpath status` will not list connections: {e}"))
            .ok()
    });
    let (proxy_drain, proxy_watcher) = drain::new();
    if let Some(events) = kernel.as_mut().and_then(|k| k.datapath().take_events()) {
        drops::spawn(events, stop_rx.clone());
    }

    // Probes get answers (503 until ready) while the first state is awaited. The admin
    // ports close on their own signal: a daemon taken over gives them up at once.
    let ready = Readiness::default();
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    let routes = admin::Routes { ready: ready.clone(), metrics };
    let admin_task = tokio::spawn(admin::serve(admin_listener, routes.clone(), admin_stop_rx.clone()));
    let metrics_task = tokio::spawn(admin::serve(metrics_listener, routes, admin_stop_rx));
    tokio::pin!(shutdown);

    let apply = |state: &DesiredState, kernel: Option<&mut Reconciler>| {
        proxy.set_workloads(WorkloadIndex::new(state, &cfg.trust_domain));
        if let Some(k) = kernel {
            k.set_file(state.workloads.clone());
        }
    };
    let started = async {
        let Some(first) = first_state(&mut desired, &mut shutdown).await? else { return Ok(None) };
        apply(&first, kernel.as_mut());
        let Some(k) = kernel.as_mut() else { return Ok(Some(Vec::new())) };
        // Attachments, routes and maps first (stale entries of a previous run go here),
        // then the listeners: writing them into the SOCKMAP is the moment this daemon
        // serves, and takes the node over from a predecessor.
        k.reconcile(Trigger::Safety).await?;
        for l in &listeners {
            k.datapath().register_listener(l.role, l.ipv6, &l.socket)?;
        }
        tracing::info!(count = listeners.len(), "proxy listeners registered in the SOCKMAP");
        Ok::<_, NodeError>(Some(k.datapath().listener_cookies()?))
    }
    .await;
    let own_slots = match started {
        Ok(Some(cookies)) => cookies,
        Ok(None) => {
            let _ = stop_tx.send(true);
            let _ = admin_stop.send(true);
            let _ = tokio::join!(admin_task, metrics_task);
            if fresh {
                drop(kernel.take());
                return undo_start(&cfg.node, true, Ok(())).await;
            }
            tracing::info!("stopped before the first state; the pinned datapath is unchanged");
            return Ok(());
        }
        Err(e) => {
            let _ = stop_tx.send(true);
            // The programs detach once their links' last fds close with the datapath.
            drop(kernel.take());
            return undo_start(&cfg.node, fresh, Err(e)).await;
        }
    };
    let proxy_task = tokio::spawn(proxy.clone().serve(listeners, proxy_watcher));
    if let Some(p) = predecessor {
        tokio::spawn(p.adopt_relays(proxy.clone()));
    }
    let successors = match kernel.is_some().then(|| Successors::listen(&cfg.node, ready.clone())).transpose() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(
                "a successor will find no handover channel (its takeover still works, without moving relays): {e}"
            );
            None
        }
    };
    ready.set(true);
    if let Some(i) = instance.as_mut() {
        i.set(instance::DaemonState::Serving, Some(own_slots.iter().flatten().copied().collect()));
    }
    tracing::info!(node = %cfg.node, source = ?cfg.source, "node ready");

    let watch = SlotWatch { own: own_slots, successors: successors.as_ref(), ready: &ready };
    let stop = follow(&mut desired, &mut kernel, apply, &mut shutdown, watch, cfg.drain_timeout).await;

    ready.set(false);
    if let Some(i) = instance.as_mut() {
        i.set(instance::DaemonState::Draining, None);
    }
    let drained = match (stop, successors) {
        (Stop::TakenOver { .. }, Some(successors)) => {
            let _ = admin_stop.send(true);
            step_down(&proxy, &mut kernel, &stop_tx, &proxy_drain, proxy_task, successors, cfg.drain_timeout).await
        }
        (_, successors) => {
            if let Some(s) = successors {
                s.close();
            }
            let _ = stop_tx.send(true);
            proxy_drain.start(Mode::Graceful);
            // The accept loops are done: the listeners are closed and out of the SOCKMAP, so
            // new enrolled connections are dropped (fail closed) while the open ones finish.
            let _ = proxy_task.await;
            drain(&proxy, &proxy_drain, cfg.drain_timeout, 0).await
        }
    };
    proxy.count_drained(&drained);
    let _ = admin_stop.send(true);
    let _ = admin_task.await;
    let _ = metrics_task.await;
    if let Stop::TakenOver { signalled } = stop {
        if !signalled {
            tracing::info!(
                "taken over and drained; waiting for the stop signal (kubelet sends it once the successor is ready)"
            );
            shutdown.as_mut().await;
        }
        tracing::info!("stopped after a takeover; the successor serves the node");
        return Ok(());
    }
    tracing::info!(
        pin_dir = %datapath::node_pin_dir(&cfg.node).map(|p| p.display().to_string()).unwrap_or_default(),
        "stopped; the datapath stays pinned and drops enrolled traffic until a daemon takes over (`meshpath uninstall` removes it)"
    );
    Ok(())
}

/// A taken-over daemon steps down: it keeps accepting what its listeners still queue for
/// [`takeover::LINGER`], closes them and its program links (the successor's run ahead of
/// them), hands its plain relays to the successor and lets the rest finish.
async fn step_down(
    proxy: &Arc<Proxy>,
    kernel: &mut Option<Reconciler>,
    stop_tx: &watch::Sender<bool>,
    proxy_drain: &drain::Trigger,
    proxy_task: tokio::task::JoinHandle<()>,
    successors: Successors,
    timeout: Duration,
) -> DrainCounts {
    tracing::info!(
        linger = ?takeover::LINGER,
        "taken over: new connections go to the successor; accepting what is still queued here, then draining"
    );
    tokio::time::sleep(takeover::LINGER).await;
    let _ = stop_tx.send(true);
    proxy_drain.start(Mode::Graceful);
    let _ = proxy_task.await;
    drop(kernel.take());
    let open = proxy.open_connections();
    let sender = successors.take().map(|successor| {
        let (outbox, relays) = tokio::sync::mpsc::channel(64);
        proxy.hand_over_relays(outbox);
        tokio::spawn(async move {
            let n = successor.hand_over(relays).await;
            (successor, n)
        })
    });
    let mut drained = drain(proxy, proxy_drain, timeout, open).await;
    // No relay moves after the deadline: the channel closes, and the successor learns what
    // became of the rest.
    proxy.stop_handing_over();
    if let Some(Ok((successor, n))) = match sender {
        Some(task) => Some(task.await),
        None => None,
    } {
        drained.handed_over = n;
        drained.finished = drained.finished.saturating_sub(n);
        successor.report(&drained).await;
    }
    tracing::info!(
        handed_over = drained.handed_over,
        finished = drained.finished,
        cut = drained.cut,
        "stepped down: plain relays moved to the successor, the rest finished or were cut"
    );
    drained
}

/// How long connections cut at the drain's deadline get to write their records.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// Lets open connections finish, up to `timeout` (the graceful drain has started); what is
/// left is cut then, each connection writing its record. `open` is the count to report from
/// (0: what is open now).
async fn drain(proxy: &Proxy, proxy_drain: &drain::Trigger, timeout: Duration, open: usize) -> DrainCounts {
    let open = if open == 0 { proxy.open_connections() } else { open };
    if open == 0 {
        return DrainCounts::default();
    }
    tracing::info!(connections = open, ?timeout, "draining: new connections are refused, open ones may finish");
    let deadline = tokio::time::Instant::now() + timeout;
    while proxy.open_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cut = proxy.open_connections();
    match cut {
        0 => tracing::info!("drained: every connection finished"),
        left => {
            tracing::warn!(connections = left, "drain deadline passed; cutting the connections left");
            proxy_drain.stop(CUT_GRACE).await;
        }
    }
    DrainCounts { handed_over: 0, finished: open.saturating_sub(cut) as u64, cut: cut as u64 }
}

/// Why [`follow`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The stop signal.
    Shutdown,
    /// A successor's sockets are in the SOCKMAP slots; `signalled`: the stop signal came
    /// already.
    TakenOver { signalled: bool },
}

/// What a serving daemon watches for a takeover.
struct SlotWatch<'a> {
    /// The cookies of this daemon's sockets, by slot.
    own: Vec<Option<u64>>,
    successors: Option<&'a Successors>,
    ready: &'a Readiness,
}

impl SlotWatch<'_> {
    /// Whether a slot holds a socket that is not this daemon's; also notices a successor
    /// that went away before taking over (and pins this daemon's links again).
    fn taken_over(&self, kernel: &mut Reconciler) -> bool {
        if let Some(s) = self.successors
            && s.check_alive(self.ready)
        {
            match kernel.datapath().reclaim_pins() {
                Ok(n) => tracing::info!(links = n, "pinned this daemon's links again in place of the successor's"),
                Err(e) => tracing::error!("pinning this daemon's links again failed: {e}"),
            }
        }
        match kernel.datapath().listener_cookies() {
            Ok(now) => now.iter().zip(&self.own).any(|(n, o)| n.is_some() && n != o),
            Err(e) => {
                tracing::debug!("reading the listener slots: {e}");
                false
            }
        }
    }
}

/// Follows the desired state and the kernel until `shutdown` or a takeover: each change,
/// and each safety tick, ends in one reconcile pass; a failing pass is logged once per
/// streak and retried.
async fn follow(
    desired: &mut StateRx,
    kernel: &mut Option<Reconciler>,
    apply: impl Fn(&DesiredState, Option<&mut Reconciler>),
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    watch: SlotWatch<'_>,
    successor_wait: Duration,
) -> Stop {
    let mut safety = tokio::time::interval(SAFETY_TICK);
    safety.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    safety.reset();
    let mut slots = tokio::time::interval(takeover::WATCH);
    slots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut following = true;
    let mut failing = false;
    let mut stopping = None;
    loop {
        let trigger = tokio::select! {
            _ = &mut *shutdown, if stopping.is_none() => {
                // Kubelet may stop the old pod before the new one took the slots over: a
                // successor on its way is waited for (at most `successor_wait`), then this
                // daemon steps down as after any takeover.
                if kernel.as_mut().is_some_and(|k| watch.taken_over(k)) {
                    return Stop::TakenOver { signalled: true };
                }
                if !watch.successors.is_some_and(Successors::pending) {
                    return Stop::Shutdown;
                }
                tracing::info!(wait = ?successor_wait, "stop signal while a successor starts: serving until it takes over");
                stopping = Some(tokio::time::Instant::now() + successor_wait);
                continue;
            }
            _ = slots.tick(), if kernel.is_some() => {
                if kernel.as_mut().is_some_and(|k| watch.taken_over(k)) {
                    return Stop::TakenOver { signalled: stopping.is_some() };
                }
                if stopping.is_some_and(|at| tokio::time::Instant::now() >= at) {
                    tracing::warn!("the successor did not take over in time; stopping without it");
                    return Stop::Shutdown;
                }
                continue;
            }
            _ = safety.tick() => Trigger::Safety,
            _ = kernel_changed(kernel.as_mut()) => Trigger::Change,
            changed = desired.changed(), if following => {
                match changed {
                    Ok(()) => {
                        if let Some(state) = desired.borrow_and_update().clone() {
                            apply(&state, kernel.as_mut());
                        }
                    }
                    Err(_) => {
                        tracing::error!("the source of the desired state stopped; keeping the last state");
                        following = false;
                    }
                }
                Trigger::Change
            }
        };
        if let Some(k) = kernel.as_mut() {
            match k.reconcile(trigger).await {
                Ok(()) if failing => {
                    tracing::info!("reconcile recovered: the kernel matches the desired state again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) => {
                    // One line per failure streak's cause, not one per pass.
                    tracing::error!("reconcile failed (retrying on the next change or within {SAFETY_TICK:?}): {e}");
                    failing = true;
                }
            }
        }
    }
}

fn new_proxy(cfg: &NodeConfig, log: AccessLog, certs: Arc<CertificateManager>, metrics: &Arc<Metrics>) -> Arc<Proxy> {
    let config = ProxyConfig {
        node: cfg.node.clone(),
        pod_cidrs: cfg.pod_cidrs.clone(),
        connect_timeout: cfg.connect_timeout,
        plaintext: cfg.plaintext,
        hbone_idle_timeout: cfg.hbone_idle_timeout,
        limits: connection_limits(cfg),
    };
    Proxy::new(config, log, certs, metrics.clone())
}

/// The connection budget: what the flags say, or what the open-files limit (raised to its
/// hard limit first) holds after a reserve for the daemon's own work.
fn connection_limits(cfg: &NodeConfig) -> Arc<Limits> {
    let fds = limits::raise_fd_limit();
    let (total, per_source) = Limits::for_fd_limit(fds);
    let total = cfg.max_connections.unwrap_or(total);
    let per_source = cfg.max_connections_per_source.unwrap_or(per_source.min(total));
    tracing::info!(open_files = fds, max_connections = total, max_per_source = per_source, "connection limits");
    Limits::new(total, per_source)
}

/// Checks the named interfaces exist (before anything is put into the kernel), then loads
/// the datapath.
async fn load_kernel(cfg: &NodeConfig) -> Result<Reconciler, NodeError> {
    forwarding_on()?;
    let mut routing = Routing::connect()?;
    let ifaces = routing.interfaces().await?;
    if let Some(missing) = cfg.interfaces.iter().find(|n| !ifaces.iter().any(|i| &i.name == *n)) {
        return Err(NodeError::NoSuchInterface(missing.clone()));
    }
    // A node meshpath cannot serve is refused before anything is put into the kernel: behind
    // a pod bridge, only the pods' namespaces tell which port each pod is on.
    let bridged = |i: &&Interface| Topology::of(i, &ifaces, &cfg.pod_cidrs).role == Role::PodBridge;
    if let Some(bridge) = ifaces.iter().find(bridged)
        && let Err(source) = std::fs::read_dir(&cfg.netns_dir)
    {
        return Err(NodeError::PodNamespaces { bridge: bridge.name.clone(), dir: cfg.netns_dir.clone(), source });
    }
    routing.watch()?;
    let dp = Datapath::load(&cfg.node, cfg.attach_mode)?;
    Ok(Reconciler::new(cfg, routing, dp))
}

/// After a start that did not get to serve (failed, or stopped before its first state):
/// when the node was fresh, removes what it put into the kernel and the state directory.
async fn undo_start(node: &str, fresh: bool, outcome: Result<(), NodeError>) -> Result<(), NodeError> {
    if fresh {
        match remove_datapath(node).await {
            Ok(report) => tracing::info!("the start did not complete; removed what it had set up: {report}"),
            Err(undo) => tracing::error!("the start did not complete, and removing what it had set up failed: {undo}"),
        }
    }
    outcome
}

/// Pods are routed through the node, and the datapath's route checks assume it: IPv4
/// forwarding off is an error, IPv6 forwarding off a warning (IPv6 of enrolled pods is then
/// dropped).
fn forwarding_on() -> Result<(), NodeError> {
    let on = |path: &str| std::fs::read_to_string(path).map(|v| v.trim() != "0").unwrap_or(true);
    if !on("/proc/sys/net/ipv4/ip_forward") {
        return Err(NodeError::Forwarding);
    }
    if !on("/proc/sys/net/ipv6/conf/all/forwarding") {
        tracing::warn!(
            "IPv6 forwarding is off in this network namespace: IPv6 traffic of enrolled pods will be dropped"
        );
    }
    Ok(())
}

/// Resolves when the kernel announces a change; never without a datapath.
async fn kernel_changed(kernel: Option<&mut Reconciler>) {
    match kernel {
        Some(k) => k.kernel_changed().await,
        None => std::future::pending().await,
    }
}

/// Waits for the source's first state; `None` when `shutdown` came first.
async fn first_state(
    desired: &mut StateRx,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<Arc<DesiredState>>, NodeError> {
    if desired.borrow().is_none() {
        tracing::info!(
            "waiting for the first full state (with Kubernetes: pods, namespaces, services, endpoint slices)"
        );
    }
    loop {
        if let Some(s) = desired.borrow_and_update().clone() {
            return Ok(Some(s));
        }
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(None),
            r = desired.changed() => r.map_err(|_| NodeError::Sync)?,
        }
    }
}

/// Scrape-time figures: the pinned counters (read through the pin, so a scrape needs no
/// handle on the loader) and the proxy's pool.
struct ScrapeSources {
    node: String,
    proxy: Arc<Proxy>,
}

impl metrics::Sources for ScrapeSources {
    fn datapath_counters(&self) -> Option<Vec<(&'static str, u64)>> {
        let c = datapath::read_pinned_counters(&self.node).ok()?;
        Some(meshpath_common::Counter::ALL.iter().map(|k| (k.name(), c.get(*k))).collect())
    }

    fn pool(&self) -> metrics::PoolStats {
        self.proxy.pool_stats()
    }

    fn connections(&self) -> (usize, usize) {
        self.proxy.connections()
    }
}

/// `meshpath uninstall`: removes every rule, route, attachment and pin of `node` from the
/// current network namespace and bpffs. Refused while any daemon holds the node lock.
pub async fn uninstall(node: &str) -> Result<String, NodeError> {
    datapath::validate_node_name(node)?;
    let Some(_lock) = NodeLock::exclusive(node)? else { return Err(NodeError::DaemonRunning(node.to_owned())) };
    remove_datapath(node).await
}

/// Removes what meshpath put into the kernel for `node`, saying what it removed.
async fn remove_datapath(node: &str) -> Result<String, NodeError> {
    let routing = Routing::connect()?;
    let (rules, routes) = routing.remove_capture().await?;
    let names = routing::names_by_index(&routing.interfaces().await?);
    let (qdiscs, filters) = datapath::detach_netlink_filters(node, |i| names.get(&i).cloned())?;
    for ifindex in &qdiscs {
        routing.delete_clsact(*ifindex).await?;
    }
    let pins = datapath::unpin_all(node)?;
    // What daemons that are gone left in the state directory (the node lock stays).
    let state = || PathBuf::from(meshpath_common::names::STATE_DIR).join(node);
    takeover::remove_stale_socket(node).map_err(|source| DatapathError::Io { path: state(), source })?;
    instance::remove_dead(node).map_err(|source| DatapathError::Io { path: state(), source })?;
    // The clsact part only applies where meshpath attached over netlink.
    let netlink = if filters > 0 || !qdiscs.is_empty() {
        format!(", {filters} tc filter(s), {} clsact qdisc(s)", qdiscs.len())
    } else {
        String::new()
    };
    Ok(format!(
        "removed {rules} routing rule(s), {routes} route(s), {} link pin(s) (detaching their programs){netlink} and {} map pin(s) of node {node}",
        pins.links, pins.maps
    ))
}
