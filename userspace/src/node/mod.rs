//! `meshpath node`: the per-node daemon. It owns the datapath of the network namespace it
//! runs in, keeps the workload maps in step with the desired state its [`source`] publishes,
//! and runs the proxy.
//!
//! - [`source`]: the workload file or Kubernetes, each publishing the desired state;
//! - [`reconcile`]: attachments, route resolution and the map diff;
//! - [`routes`]: the cache of which interface each workload IP is routed to.

mod reconcile;
mod routes;
pub mod source;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::watch;

use crate::admin::{self, Readiness};
use crate::datapath::{self, AttachMode, Datapath, DatapathError};
use crate::identity::manager::CertificateManager;
use crate::identity::{CertificateProvider, IdentityError, ca, files};
use crate::metrics::{self, Metrics};
use crate::proxy::{self, PlaintextPolicy, Proxy, ProxyConfig, access_log::AccessLog};
use crate::routing::{self, Routing, RoutingError};
use crate::state::{DesiredState, WorkloadIndex};
use reconcile::Reconciler;
use source::{Source, SourceError, StateRx};

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
    #[error("the source of the desired state stopped before its first state")]
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

    // The capture rule and routes are installed by the first reconcile pass below. Until
    // then a restarted node keeps capturing with the pinned maps (and drops that traffic:
    // no listener is registered yet).
    let mut kernel = if cfg.proxy_only {
        tracing::info!("proxy only: no datapath is loaded; something else must deliver connections to the listeners");
        None
    } else {
        let mut routing = Routing::connect()?;
        routing.watch_routes()?;
        let dp = Datapath::load(&cfg.node, cfg.attach_mode)?;
        Some(Reconciler::new(&cfg.node, &cfg.interfaces, cfg.poll_interval, routing, dp))
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
    if let Some(logger) = kernel.as_mut().and_then(|k| k.datapath().take_logger()) {
        spawn_ebpf_log_drain(logger, stop_rx.clone());
    }

    // Probes get answers (503 until ready) while the first state is awaited.
    let ready = Readiness::default();
    let routes = admin::Routes { ready: ready.clone(), metrics };
    let admin_task = tokio::spawn(admin::serve(admin_listener, routes.clone(), stop_rx.clone()));
    let metrics_task = tokio::spawn(admin::serve(metrics_listener, routes, stop_rx.clone()));
    tokio::pin!(shutdown);

    let Some(first) = first_state(&mut desired, &mut shutdown).await? else {
        let _ = stop_tx.send(true);
        let _ = tokio::join!(admin_task, metrics_task);
        tracing::info!("stopped before the first state; the pinned datapath is unchanged");
        return Ok(());
    };
    let apply = |state: &DesiredState, kernel: Option<&mut Reconciler>| {
        proxy.set_workloads(WorkloadIndex::new(state, &cfg.trust_domain));
        if let Some(k) = kernel {
            k.set_file(state.workloads.clone());
        }
    };
    apply(&first, kernel.as_mut());
    if let Some(k) = kernel.as_mut() {
        for l in &listeners {
            k.datapath().register_listener(l.role, l.ipv6, &l.socket)?;
        }
        tracing::info!(count = listeners.len(), "proxy listeners registered in the SOCKMAP");
        // Stale entries of a previous run go here, before the node reports ready.
        k.reconcile().await?;
    }
    let proxy_task = tokio::spawn(proxy.clone().serve(listeners, stop_rx.clone()));
    ready.set(true);
    tracing::info!(node = %cfg.node, source = ?cfg.source, "node ready");

    let mut tick = tokio::time::interval(cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut following = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
            changed = desired.changed(), if following => match changed {
                Ok(()) => {
                    if let Some(state) = desired.borrow_and_update().clone() {
                        apply(&state, kernel.as_mut());
                    }
                }
                Err(_) => {
                    tracing::error!("the source of the desired state stopped; keeping the last state");
                    following = false;
                }
            },
        }
        if let Some(k) = kernel.as_mut()
            && let Err(e) = k.reconcile().await
        {
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
