//! `meshpath node`: the per-node daemon. It owns the datapath of the network namespace it
//! runs in, keeps the workload maps in step with the desired state its [`source`] publishes,
//! and runs the proxy.
//!
//! - [`lifecycle`]: the phases of a daemon's life, their transitions and readiness, and
//!   [`daemon`] the driver that does each phase's work;
//! - [`source`]: the workload file or Kubernetes, each publishing the desired state;
//! - [`annotate`]: the redirection annotation on the node's captured pods (Kubernetes);
//! - [`inpod_gate`]: pods still redirected by istio-cni in their own namespace, left uncaptured;
//! - [`cni`]: the pods the CNI plugin hands over, and the socket it asks on;
//! - [`releases`]: workload IPs leaving the desired state, held back for a bounded time;
//! - [`reconcile`]: attachments, route resolution and the map diff, over the [`kernel`] seam;
//! - [`routes`]: the cache of which interface each workload IP is routed to;
//! - [`lock`]: the node lock daemons share and `uninstall` takes whole;
//! - [`instance`]: each daemon's note of its sockets and state, for `status`;
//! - [`takeover`]: a successor daemon taking the node over, relays and all;
//! - [`drops`]: the datapath's drop events, as rate-limited log lines.

mod annotate;
mod certs;
mod cni;
mod config;
mod daemon;
mod drops;
mod inpod_gate;
pub mod instance;
mod kernel;
pub mod lifecycle;
pub mod lock;
mod reconcile;
mod releases;
mod routes;
pub mod source;
pub mod takeover;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::admin;
use crate::datapath::{self, Datapath, DatapathError};
use crate::drain;
use crate::identity::Identity;
use crate::identity::IdentityError;
use crate::identity::manager::CertificateManager;
use crate::k8s;
use crate::metrics::{self, Metrics};
use crate::proxy::limits::{self, Limits};
use crate::proxy::{self, Proxy, ProxyConfig, access_log::AccessLog};
use crate::record::DrainCounts;
use crate::routing::{self, Interface, Routing, RoutingError};
use crate::state::WorkloadIndex;
use crate::topology::{Role, Topology};
use crate::workloads::WorkloadFile;
use crate::xds::client::XdsStatus;
pub use config::{CertSource, ControlPlane, NodeConfig, NodeConfigError, TcAttach};
use kernel::KernelError;
use lifecycle::Condition;
use lock::{LockError, NodeLock};
use reconcile::{Reconciler, Scope};
use source::SourceError;
use takeover::Predecessor;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Config(#[from] NodeConfigError),
    #[error(transparent)]
    Kubernetes(#[from] k8s::K8sError),
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
    #[error("keeping a second fd of the proxy's listeners: {0}")]
    Listeners(std::io::Error),
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

/// The safety tick: even when the kernel announces nothing, every this often what it cannot
/// announce is looked at again (pins, the classifiers, the CNI plugin's pods' namespaces),
/// and everything once a minute ([`reconcile`]). Everything else is driven by changes.
pub(super) const SAFETY_TICK: Duration = Duration::from_secs(10);

/// Sleeps until `at`; never without one (a timer only while something is due).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs until `shutdown` resolves. On return the listeners are closed, so enrolled traffic
/// fails closed, while programs, maps and routing stay in the kernel for the next instance.
pub async fn run(mut cfg: NodeConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), NodeError> {
    datapath::validate_node_name(&cfg.node)?;
    cfg.check(std::env::vars())?;
    if cfg.proxy_only {
        return run_proxy_only(cfg, shutdown).await;
    }
    let (tasks, watcher) = drain::new();
    // Everything cheap is validated before the kernel is touched: a bad workload file or
    // Kubernetes configuration fails the start here.
    let source = cfg.source()?;
    let mut following = source.start(cfg.poll_interval, watcher.clone()).await?;
    let annotations = match source {
        source::Source::Kubernetes(_) | source::Source::Istiod(_) => {
            // Pods come from the cluster, also the ones istio-cni redirected in place.
            let (state, dir) = (following.state.clone(), cfg.netns_dir.clone());
            following.state = inpod_gate::gate(state, cfg.node.clone(), dir, watcher.clone());
            Some(annotate::Annotations::spawn(k8s::client().await?, watcher.clone()))
        }
        source::Source::File(..) => None,
    };
    let log = AccessLog::open(cfg.access_log.as_deref())?;
    let certs = CertificateManager::new(cfg.certificates().provider(&cfg.trust_domain)?);
    let metrics = Metrics::new();
    let ready = lifecycle::Readiness::default();
    let xds = following.control_plane.clone();
    follow_control_plane(following.control_plane, ready.clone(), watcher.clone());
    let istiod = cfg.control_plane == ControlPlane::Istiod;
    let identities = certs::spawn(certs.clone(), ready.clone(), istiod, watcher.clone());
    let _lock = NodeLock::shared(&cfg.node)?;
    let instance = instance::Instance::create(&cfg.node);
    // A daemon serving the node now hands it over once this one is ready.
    let predecessor = Predecessor::announce(&cfg.node).await;
    // Nothing of this node pinned yet: a start that fails takes out again everything it put
    // into the kernel.
    let fresh = datapath::is_fresh(&cfg.node)?;
    let proxy = new_proxy(&cfg, log, certs, &metrics);
    metrics.set_sources(ScrapeSources { node: cfg.node.clone(), proxy: proxy.clone(), xds });
    // `meshpath status` lists this daemon's open connections through it.
    let _control = instance.as_ref().and_then(|_| {
        let path = instance::control_socket(&cfg.node, std::process::id());
        proxy
            .listen_control(&path)
            .inspect_err(|e| tracing::warn!("`meshpath status` will not list connections: {e}"))
            .ok()
    });
    let mut daemon = daemon::Daemon {
        releases: releases::Releases::new(cfg.release_hold),
        cni: cni::Plugin::new(&cfg.node),
        cfg,
        proxy,
        metrics,
        desired: following.state,
        identities,
        state: None,
        ready,
        instance,
        tasks: watcher,
        annotations,
        annotated: Default::default(),
        phase: lifecycle::Phase::Starting,
        signalled: false,
    };
    let shutdown: daemon::Shutdown<'_> = std::pin::pin!(shutdown);
    let result = daemon.live(shutdown, predecessor, fresh).await;
    tasks.stop(Duration::from_secs(1)).await;
    result
}

/// `--proxy-only` (the benchmarks' iptables baselines): the proxy alone, without the
/// datapath, the node lock or takeovers; something else delivers connections to it.
async fn run_proxy_only(cfg: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    tracing::info!("proxy only: no datapath is loaded; something else must deliver connections to the listeners");
    let (tasks, watcher) = drain::new();
    let mut desired = cfg.source()?.start(cfg.poll_interval, watcher).await?.state;
    let log = AccessLog::open(cfg.access_log.as_deref())?;
    let certs = CertificateManager::new(cfg.certificates().provider(&cfg.trust_domain)?);
    let metrics = Metrics::new();
    let proxy = new_proxy(&cfg, log, certs, &metrics);
    metrics.set_sources(ScrapeSources { node: cfg.node.clone(), proxy: proxy.clone(), xds: None });
    let listeners = proxy::bind_listeners()?;
    // Probes and metrics as a node's: ready once the listeners are bound and the first state
    // is applied (no datapath, no control plane, nothing else to wait for).
    let ready = lifecycle::Readiness::default();
    let routes = admin::Routes { ready: Arc::new(ready.clone()), metrics: metrics.clone() };
    let (admin_stop, admin_watcher) = drain::new();
    for port in [cfg.readiness_port, cfg.metrics_port] {
        tokio::spawn(admin::serve(admin::bind(port).await?, routes.clone(), admin_watcher.clone()));
    }
    let (serve, watcher) = drain::new();
    let serving = tokio::spawn(proxy.clone().serve(listeners, watcher));
    tokio::pin!(shutdown);
    loop {
        if let Some(state) = desired.borrow_and_update().clone() {
            let local = local_identities(&state.workloads, &cfg.node, &cfg.trust_domain);
            proxy.set_workloads(WorkloadIndex::new(&state, &cfg.trust_domain), &local);
            Condition::ALL.into_iter().for_each(|c| ready.met(c));
        }
        tokio::select! {
            _ = &mut shutdown => break,
            r = desired.changed() => if r.is_err() { break },
        }
    }
    serve.start(drain::Mode::Graceful);
    let _ = serving.await;
    proxy.count_drained(&drain(&proxy, &serve, cfg.drain_timeout, 0).await);
    admin_stop.start(drain::Mode::Immediate);
    tasks.stop(Duration::from_secs(1)).await;
    Ok(())
}

/// The identities of `workloads` on `node`: the certificates the node keeps.
fn local_identities(workloads: &WorkloadFile, node: &str, trust_domain: &str) -> BTreeSet<Identity> {
    workloads.on_node(node).map(|w| Identity::new(trust_domain, &w.namespace, &w.service_account)).collect()
}

/// Readiness follows the control plane's first push (met at once without one). A client
/// that has applied its first push stays synced across reconnects: the node serves on with
/// the last state.
fn follow_control_plane(
    status: Option<watch::Receiver<XdsStatus>>,
    ready: lifecycle::Readiness,
    mut stop: drain::Watcher,
) {
    let Some(mut status) = status else {
        ready.met(Condition::ControlPlaneSynced);
        return;
    };
    tokio::spawn(async move {
        loop {
            if status.borrow_and_update().ready {
                ready.met(Condition::ControlPlaneSynced);
                tracing::info!("istiod's first push is applied");
                return;
            }
            tokio::select! {
                _ = stop.signalled() => return,
                r = status.changed() => if r.is_err() { return },
            }
        }
    });
}

/// How long connections cut at the drain's deadline get to write their records.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// Lets the proxy's open connections finish (its graceful drain has started), up to
/// `timeout`; what is left is cut then, each connection writing its record. `open` is the
/// count to report from (0: what is open now).
async fn drain(proxy: &Proxy, serve: &drain::Trigger, timeout: Duration, open: usize) -> DrainCounts {
    let open = if open == 0 { proxy.open_connections() } else { open };
    if open == 0 {
        return DrainCounts::default();
    }
    tracing::info!(connections = open, ?timeout, "draining: new connections are refused, open ones may finish");
    let cut = match tokio::time::timeout(timeout, serve.released()).await {
        Ok(()) => {
            tracing::info!("drained: every connection finished");
            0
        }
        Err(_) => {
            let left = proxy.open_connections();
            tracing::warn!(connections = left, "drain deadline passed; cutting the connections left");
            serve.stop(CUT_GRACE).await;
            left
        }
    };
    DrainCounts { handed_over: 0, finished: open.saturating_sub(cut) as u64, cut: cut as u64 }
}

fn new_proxy(cfg: &NodeConfig, log: AccessLog, certs: Arc<CertificateManager>, metrics: &Arc<Metrics>) -> Arc<Proxy> {
    let config = ProxyConfig {
        node: cfg.node.clone(),
        pod_cidrs: cfg.pod_cidrs.clone(),
        flags: cfg.proxy.clone(),
        limits: connection_limits(cfg),
        source_wait: cfg.source_wait(),
    };
    Proxy::new(config, log, certs, metrics.clone())
}

/// The connection budget: what the flags say, or what the open-files limit (raised to its
/// hard limit first) holds after a reserve for the daemon's own work.
fn connection_limits(cfg: &NodeConfig) -> Arc<Limits> {
    let fds = limits::raise_fd_limit();
    let (total, per_source) = Limits::for_fd_limit(fds);
    let total = cfg.proxy.max_connections.unwrap_or(total);
    let per_source = cfg.proxy.max_connections_per_source.unwrap_or(per_source.min(total));
    tracing::info!(open_files = fds, max_connections = total, max_per_source = per_source, "connection limits");
    Limits::new(total, per_source)
}

/// Checks the named interfaces exist (before anything is put into the kernel), then loads
/// the datapath.
async fn load_kernel(cfg: &NodeConfig) -> Result<Reconciler<kernel::System>, NodeError> {
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
    let dp = Datapath::load(&cfg.node, cfg.attach_mode())?;
    let scope = Scope {
        node: cfg.node.clone(),
        interfaces: cfg.interfaces.clone(),
        pod_cidrs: cfg.pod_cidrs.clone(),
        netns_dir: cfg.netns_dir.clone(),
    };
    Ok(Reconciler::new(scope, kernel::System { routing, dp }))
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

/// Scrape-time figures: the pinned counters (read through the pin, so a scrape needs no
/// handle on the loader) and the proxy's pool.
struct ScrapeSources {
    node: String,
    proxy: Arc<Proxy>,
    xds: Option<watch::Receiver<XdsStatus>>,
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

    fn control_plane(&self) -> Option<metrics::ControlPlaneStats> {
        let status = self.xds.as_ref()?.borrow().clone();
        let (workload_addresses, service_addresses) = self.proxy.mesh_size();
        Some(metrics::ControlPlaneStats {
            connected: status.connected,
            attempts: status.attempts,
            nacks: status.nacks,
            workload_addresses,
            service_addresses,
        })
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
    cni::remove_state(node).map_err(|source| DatapathError::Io { path: state(), source })?;
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
