//! The daemon's side of the CNI plugin ([`crate::cni`]): the pods it hands over, kept in
//! `<STATE_DIR>/<node>/cni-pods.json` so that a restarted daemon or a successor has them
//! without the plugin running again, and the socket it asks on, answered once the pod's
//! addresses are in the map behind its interface.
//!
//! What a pod handed over adds to the desired state ([`merge`]): its host-side interface,
//! which the reconciler takes over reading pod namespaces to find a bridge port; and, where
//! the source decides pod by pod from Kubernetes and has not seen the pod's addresses yet
//! (kubelet reports them only after the ADD), the pod itself.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};

use meshpath_common::names::{CNI_SOCKET, STATE_DIR};

use crate::cni::CniPods;
use crate::cni::wire::{self, Reply, Request, Sandbox};
use crate::drain;
use crate::state_dir;
use crate::workloads::{Workload, WorkloadFile};

/// How long an ADD may wait for its pod in the map, whatever the plugin's own timeout.
const ENROL_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections answered at once, each on its own task: kubelet runs a few ADDs at a time,
/// and a silent connection must not hold a real one up. Beyond, new ones are closed at once
/// (the plugin fails, kubelet retries).
const CONCURRENT: usize = 1024;
/// A request line must arrive this soon after the connection.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections closed without a usable request are logged at most this often, counted.
const BAD_LOG_EVERY: Duration = Duration::from_secs(10);

/// Connections closed without a usable request: one line per [`BAD_LOG_EVERY`] at most, with
/// how many there were (a flood must not write a line each).
#[derive(Default)]
struct BadRequests {
    logged: Option<std::time::Instant>,
    since: u64,
}

impl BadRequests {
    fn note(&mut self, why: &str) {
        self.since += 1;
        if self.logged.is_none_or(|t| t.elapsed() >= BAD_LOG_EVERY) {
            tracing::warn!(
                count = self.since,
                "CNI socket: connections closed without a usable request (the last: {why})"
            );
            self.logged = Some(std::time::Instant::now());
            self.since = 0;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
}

/// The IPs the map holds, as of the last pass.
pub(super) type Mapped = Arc<BTreeMap<IpAddr, Placed>>;

/// Where an IP of the map is, and whose it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Placed {
    /// The interface it is behind (0: held behind none).
    pub ifindex: u32,
    /// The workload (`namespace/name`) the desired state gives it: the identity its
    /// connections get.
    pub owner: String,
}

/// The handed-over pods, in memory and on disk; each change is published.
pub(super) struct Registry {
    path: PathBuf,
    tx: watch::Sender<Arc<CniPods>>,
    /// Held while the file is read or written; the last read's error, logged once.
    last_error: std::sync::Mutex<Option<String>>,
}

impl Registry {
    /// The node's registry, empty until [`Registry::reload`].
    pub(super) fn open(node: &str) -> Arc<Self> {
        let path = crate::cni::pods_path(node);
        let (tx, _) = watch::channel(Arc::new(CniPods::default()));
        Arc::new(Self { path, tx, last_error: std::sync::Mutex::new(None) })
    }

    /// Reads the file (a successor may have written it while this daemon stood by). An
    /// unreadable file is logged and set aside: its pods are still enrolled from the source,
    /// as before the plugin, and found again by their namespaces.
    pub(super) fn reload(&self) {
        let mut last_error = self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let pods = match read(&self.path) {
            Ok(pods) => pods,
            Err(e) => {
                // Kept as they were: a file that cannot be read now says nothing new.
                let e = e.to_string();
                if last_error.as_ref() != Some(&e) {
                    tracing::error!("the CNI plugin's pods cannot be read, keeping the last known: {e}");
                }
                *last_error = Some(e);
                return;
            }
        };
        *last_error = None;
        self.tx.send_if_modified(|now| {
            let changed = **now != pods;
            if changed {
                tracing::info!(
                    count = pods.pods.len(),
                    "pods handed over by the CNI plugin, as the node's file has them"
                );
            }
            *now = Arc::new(pods);
            changed
        });
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<CniPods>> {
        self.tx.subscribe()
    }

    /// Applies `change` (when it says it changed something): written, then published.
    /// Starts from the file as it is (another daemon of the node may have written it last);
    /// a file that could not be read is written whole again, changed or not.
    fn update(&self, change: impl FnOnce(&mut CniPods) -> bool) -> Result<(), CniError> {
        let mut last_error = self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut pods = read(&self.path).unwrap_or_else(|_| (**self.tx.borrow()).clone());
        if !change(&mut pods) && last_error.is_none() {
            return Ok(());
        }
        write(&self.path, &pods)?;
        *last_error = None;
        self.tx.send_if_modified(|now| {
            let changed = **now != pods;
            *now = Arc::new(pods);
            changed
        });
        Ok(())
    }

    /// Lets go of pods whose network namespace is gone (a DEL the daemon never heard).
    pub(super) fn prune(&self) -> Result<Vec<String>, CniError> {
        if self.tx.borrow().pods.values().all(|s| s.netns.exists()) {
            return Ok(Vec::new());
        }
        let mut gone = Vec::new();
        self.update(|pods| {
            pods.pods.retain(|id, s| {
                let here = s.netns.exists();
                if !here {
                    gone.push(id.clone());
                }
                here
            });
            !gone.is_empty()
        })?;
        Ok(gone)
    }
}

fn read(path: &Path) -> Result<CniPods, CniError> {
    crate::cni::read_pods(path).map_err(|e| match e {
        crate::cni::PodsError::Io(source) => CniError::Io { path: path.to_owned(), source },
        crate::cni::PodsError::Json(source) => CniError::Json { path: path.to_owned(), source },
    })
}

/// Written through a temporary file and a rename: a daemon killed mid-write leaves the old
/// file whole.
fn write(path: &Path, pods: &CniPods) -> Result<(), CniError> {
    let io = |source| CniError::Io { path: path.to_owned(), source };
    // Of this process: two daemons of a node never write one temporary file.
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let text = serde_json::to_vec_pretty(pods).map_err(|source| CniError::Json { path: path.to_owned(), source })?;
    let mut file = state_dir::private_file(&tmp, std::fs::OpenOptions::new().write(true).create(true).truncate(true))
        .map_err(io)?;
    std::io::Write::write_all(&mut file, &text).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// What the handed-over pods add to the source's workloads: the host-side interfaces of
/// their addresses, and, where `decided` lists the pods the source has seen with addresses
/// (Kubernetes), the pods it has not seen yet. A workload file decides every pod itself
/// (`decided` is `None`): a pod it does not list is not enrolled, whatever was handed over.
pub(super) fn merge(
    workloads: &WorkloadFile,
    decided: Option<&BTreeSet<String>>,
    pods: &CniPods,
    node: &str,
) -> (WorkloadFile, BTreeMap<IpAddr, Vec<String>>) {
    let mut out = workloads.clone();
    let claimed: BTreeSet<IpAddr> = workloads.workloads.iter().flat_map(|w| w.ips.iter().copied()).collect();
    let mut ports = BTreeMap::new();
    for (id, s) in &pods.pods {
        let unseen = decided.is_some_and(|d| !d.contains(id)) && !s.ips.iter().any(|ip| claimed.contains(ip));
        if unseen {
            out.workloads.push(Workload {
                name: s.pod.name.clone(),
                namespace: s.pod.namespace.clone(),
                service_account: s.pod.service_account.clone(),
                node: node.to_owned(),
                ips: s.ips.clone(),
            });
        }
        for ip in &s.ips {
            ports.insert(ip.to_canonical(), s.host_interfaces.clone());
        }
    }
    (out, ports)
}

/// `meshpath uninstall`: the socket a killed daemon left, the pods handed over and the
/// plugin's log go with the node's datapath (a plugin still chained writes a new log).
pub(super) fn remove_state(node: &str) -> std::io::Result<()> {
    let dir = Path::new(STATE_DIR).join(node);
    let log = crate::cni::log_path(node);
    let files = [dir.join(CNI_SOCKET), crate::cni::pods_path(node), log.with_extension("log.1"), log];
    for path in files {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// What the daemon holds of the plugin across its terms.
pub(super) struct Plugin {
    registry: Arc<Registry>,
    pods: watch::Receiver<Arc<CniPods>>,
    mapped: watch::Sender<Mapped>,
    /// The host-side interfaces of the handed-over pods' IPs, as of the last merge.
    pub ports: BTreeMap<IpAddr, Vec<String>>,
}

impl Plugin {
    pub(super) fn new(node: &str) -> Self {
        let registry = Registry::open(node);
        let pods = registry.subscribe();
        Self { registry, pods, mapped: watch::channel(Mapped::default()).0, ports: BTreeMap::new() }
    }

    /// Starts answering the plugin (the pods file is read before each pass anyway).
    /// `None`, logged, when the socket cannot be had: the plugin's ADDs then fail and
    /// kubelet retries them.
    pub(super) fn listen(&self, node: &str) -> Option<Listening> {
        listen(node, self.registry.clone(), self.mapped.subscribe())
            .inspect_err(|e| tracing::error!("the CNI plugin cannot reach this daemon (its pods will not start): {e}"))
            .ok()
    }

    /// The source's workloads with what the plugin handed over ([`merge`]).
    pub(super) fn merge(&mut self, state: &crate::state::DesiredState, node: &str) -> WorkloadFile {
        let pods = self.pods.borrow_and_update().clone();
        let (workloads, ports) = merge(&state.workloads, state.decided.as_ref(), &pods, node);
        self.ports = ports;
        workloads
    }

    /// Whether the pods changed since the last merge.
    pub(super) fn pending(&self) -> bool {
        self.pods.has_changed().unwrap_or(false)
    }

    /// Resolves when the plugin hands a pod over or takes one back.
    pub(super) async fn changed(&mut self) {
        if self.pods.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// What the map holds after a pass, and whose each IP is in `workloads`: the ADDs
    /// waiting for their pods look.
    pub(super) fn mapped(&self, map: BTreeMap<IpAddr, u32>, workloads: &WorkloadFile, node: &str) {
        let owners: BTreeMap<IpAddr, String> =
            workloads.on_node(node).flat_map(|w| w.ips.iter().map(move |ip| (ip.to_canonical(), w.id()))).collect();
        let map: BTreeMap<IpAddr, Placed> = map
            .into_iter()
            .map(|(ip, ifindex)| (ip, Placed { ifindex, owner: owners.get(&ip).cloned().unwrap_or_default() }))
            .collect();
        self.mapped.send_if_modified(|now| {
            let changed = **now != map;
            *now = Arc::new(map);
            changed
        });
    }

    /// Reads the node's file again (see [`Registry::reload`]).
    pub(super) fn reload(&self) {
        self.registry.reload();
    }

    /// Lets go of pods whose namespace is gone, with a line each.
    pub(super) fn prune(&self) {
        match self.registry.prune() {
            Ok(gone) => {
                for pod in gone {
                    tracing::info!(%pod, "the CNI plugin's pod has no network namespace any more; released");
                }
            }
            Err(e) => tracing::warn!("forgetting the CNI plugin's pods that are gone: {e}"),
        }
    }
}

/// The socket being answered; dropped, it stops, and its file goes unless a successor's
/// socket replaced it.
pub(super) struct Listening {
    trigger: drain::Trigger,
    path: PathBuf,
    inode: u64,
}

impl Listening {
    /// Whether the node's socket is still this one (a successor binds its own).
    pub(super) fn owns(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.trigger.start(drain::Mode::Immediate);
        if self.owns() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listens on the node's CNI socket (replacing whatever is there: this daemon serves the
/// node now) until dropped.
fn listen(node: &str, registry: Arc<Registry>, mapped: watch::Receiver<Mapped>) -> Result<Listening, CniError> {
    let dir = Path::new(STATE_DIR).join(node);
    let path = dir.join(CNI_SOCKET);
    let io = |source| CniError::Io { path: path.clone(), source };
    state_dir::private_dir(&dir).map_err(io)?;
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    // Root-only: whoever can connect can hold any pod's start.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(io)?;
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(&path).map_err(io)?);
    let (trigger, mut stop) = drain::new();
    let turns = Arc::new(Semaphore::new(CONCURRENT));
    let bad = Arc::new(std::sync::Mutex::new(BadRequests::default()));
    tokio::spawn(async move {
        let mut refusing = false;
        loop {
            let stream = tokio::select! {
                _ = stop.signalled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("CNI socket: accepting failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(turn) = turns.clone().try_acquire_owned() else {
                if !std::mem::replace(&mut refusing, true) {
                    tracing::warn!(
                        "CNI socket: {CONCURRENT} connections open already; closing new ones until some end"
                    );
                }
                continue;
            };
            refusing = false;
            let (registry, mapped, bad) = (registry.clone(), mapped.clone(), bad.clone());
            tokio::spawn(async move {
                if let Err(why) = answer(stream, &registry, mapped).await {
                    bad.lock().unwrap_or_else(std::sync::PoisonError::into_inner).note(&why);
                }
                drop(turn);
            });
        }
    });
    Ok(Listening { trigger, path, inode })
}

/// Answers one connection; why it was closed unanswered.
async fn answer(mut stream: UnixStream, registry: &Registry, mapped: watch::Receiver<Mapped>) -> Result<(), String> {
    let request = match tokio::time::timeout(READ_TIMEOUT, wire::receive::<Request>(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("an unreadable request: {e}")),
        Err(_) => return Err(format!("no request within {READ_TIMEOUT:?}")),
    };
    let reply = match request {
        Request::Add(sandbox) => add(sandbox, registry, mapped).await,
        Request::Del { namespace, name, container_id } => {
            let id = format!("{namespace}/{name}");
            let removed = registry.update(|pods| {
                let ours = pods.pods.get(&id).is_some_and(|s| s.container_id == container_id);
                ours && pods.pods.remove(&id).is_some()
            });
            match removed {
                Ok(()) => {
                    tracing::info!(pod = %id, "the CNI plugin released the pod");
                    Reply::Released
                }
                Err(e) => Reply::Refused { reason: e.to_string() },
            }
        }
    };
    // The plugin may have given up already: it retries, nothing is lost.
    let _ = wire::send(&mut stream, &reply).await;
    Ok(())
}

async fn add(sandbox: Sandbox, registry: &Registry, mapped: watch::Receiver<Mapped>) -> Reply {
    let id = sandbox.pod.id();
    if let Some(why) = invalid(&sandbox) {
        tracing::warn!(pod = %id, "CNI plugin: refused a pod: {why}");
        return Reply::Refused { reason: why };
    }
    let s = sandbox.clone();
    if let Err(e) = registry.update(move |pods| {
        let changed = pods.pods.get(&id) != Some(&s);
        pods.pods.insert(id, s);
        changed
    }) {
        tracing::error!(pod = %sandbox.pod.id(), "CNI plugin: keeping the pod failed: {e}");
        return Reply::Refused { reason: e.to_string() };
    }
    match wait_mapped(&sandbox, mapped, ENROL_TIMEOUT).await {
        Ok(interface) => {
            tracing::info!(pod = %sandbox.pod.id(), interface, "CNI plugin: pod enrolled before its containers start");
            Reply::Enrolled { interface }
        }
        Err(reason) => {
            tracing::warn!(pod = %sandbox.pod.id(), "CNI plugin: pod not enrolled: {reason}");
            Reply::Refused { reason }
        }
    }
}

/// What makes a handed-over pod unusable, in words for the plugin's error.
fn invalid(s: &Sandbox) -> Option<String> {
    let names_ok = |n: &str| !n.is_empty() && n.len() <= 253 && !n.contains('/');
    if !names_ok(&s.pod.namespace) || !names_ok(&s.pod.name) {
        return Some("a pod needs a namespace and a name".into());
    }
    if s.ips.is_empty() {
        return Some("the pod has no address".into());
    }
    if s.container_id.is_empty() || !s.netns.is_absolute() {
        return Some("the pod needs a container id and an absolute network namespace path".into());
    }
    // A process's namespace (cri-dockerd's) cannot be seen from the daemon's pod: its pod
    // would look gone at once.
    if s.netns.starts_with("/proc") {
        return Some(format!("network namespace paths under /proc ({}) are not supported", s.netns.display()));
    }
    None
}

/// Waits until every address of the pod is in the map behind one of its host-side
/// interfaces (any interface when it gave none), as this pod's (an address some other
/// workload still holds would carry that one's identity); that interface's name.
async fn wait_mapped(s: &Sandbox, mut mapped: watch::Receiver<Mapped>, timeout: Duration) -> Result<String, String> {
    let hosts: BTreeMap<u32, &str> = s
        .host_interfaces
        .iter()
        .filter_map(|name| Some((nix::net::if_::if_nametoindex(name.as_str()).ok()?, name.as_str())))
        .collect();
    if hosts.is_empty() && !s.host_interfaces.is_empty() {
        return Err(format!("none of its host-side interfaces ({}) exists on this node", s.host_interfaces.join(", ")));
    }
    let id = s.pod.id();
    let placed = |map: &BTreeMap<IpAddr, Placed>| -> Option<String> {
        let ifxs: BTreeSet<u32> = s
            .ips
            .iter()
            .map(|ip| map.get(&ip.to_canonical()).filter(|p| p.owner == id).map(|p| p.ifindex))
            .collect::<Option<_>>()?;
        let ifx = *ifxs.first()?;
        let behind_its_interface = ifxs.len() == 1 && ifx != 0 && (hosts.is_empty() || hosts.contains_key(&ifx));
        behind_its_interface.then(|| hosts.get(&ifx).map_or_else(|| format!("ifindex {ifx}"), |n| (*n).to_owned()))
    };
    let wait = async {
        loop {
            if let Some(name) = placed(&mapped.borrow_and_update()) {
                return Ok(name);
            }
            if mapped.changed().await.is_err() {
                return Err("the daemon stopped before enrolling it".to_owned());
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.unwrap_or_else(|_| {
        Err(format!(
            "its addresses were not in the map behind {} within {timeout:?} (the daemon's log says why)",
            if s.host_interfaces.is_empty() { "an interface".to_owned() } else { s.host_interfaces.join(" or ") }
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::wire::PodRef;

    fn sandbox(ns: &str, name: &str, ips: &[&str], ifs: &[&str]) -> Sandbox {
        Sandbox {
            pod: PodRef { namespace: ns.into(), name: name.into(), uid: None, service_account: "sa".into() },
            container_id: "c1".into(),
            netns: "/var/run/netns/x".into(),
            host_interfaces: ifs.iter().map(|s| (*s).to_owned()).collect(),
            ips: ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
        }
    }

    fn pods(list: &[Sandbox]) -> CniPods {
        CniPods { pods: list.iter().map(|s| (s.pod.id(), s.clone())).collect() }
    }

    #[test]
    fn a_workload_file_decides_alone_and_kubernetes_lets_an_unseen_pod_in() {
        let file = WorkloadFile::parse(
            "workloads:\n  - {name: a, namespace: lab, serviceAccount: sa, node: n1, ips: [10.244.1.10]}\n",
            "test",
        )
        .expect("valid");
        let handed = pods(&[
            sandbox("lab", "a", &["10.244.1.10"], &["cni0", "vpa"]),
            sandbox("lab", "z", &["10.244.1.30"], &["vpz"]),
        ]);
        // File: the handed-over pod it does not list stays out; the listed one gets its port.
        let (w, ports) = merge(&file, None, &handed, "n1");
        assert_eq!(w, file);
        assert_eq!(ports.get(&"10.244.1.10".parse().expect("ip")), Some(&vec!["cni0".to_owned(), "vpa".to_owned()]));
        // Kubernetes, which has not seen z's addresses yet: z comes in on the plugin's word.
        let seen: BTreeSet<String> = ["lab/a".to_owned()].into();
        let (w, _) = merge(&file, Some(&seen), &handed, "n1");
        let z = w.workloads.iter().find(|w| w.name == "z").expect("z enrolled");
        assert_eq!((z.node.as_str(), z.ips.len()), ("n1", 1));
        // Once Kubernetes has seen z (and left it out: its label says none), it stays out.
        let seen: BTreeSet<String> = ["lab/a".to_owned(), "lab/z".to_owned()].into();
        assert_eq!(merge(&file, Some(&seen), &handed, "n1").0, file);
        // An address some workload already holds is not claimed again by an unseen pod.
        let stale = pods(&[sandbox("lab", "old", &["10.244.1.10"], &["vpold"])]);
        assert_eq!(merge(&file, Some(&BTreeSet::new()), &stale, "n1").0, file);
    }

    #[test]
    fn a_bad_pod_is_refused_with_a_reason() {
        assert_eq!(invalid(&sandbox("lab", "a", &["10.244.1.10"], &[])), None);
        assert!(invalid(&sandbox("", "a", &["10.244.1.10"], &[])).is_some());
        assert!(invalid(&sandbox("lab", "a/b", &["10.244.1.10"], &[])).is_some());
        assert_eq!(invalid(&sandbox("lab", "a", &[], &[])).as_deref(), Some("the pod has no address"));
        let mut relative = sandbox("lab", "a", &["10.244.1.10"], &[]);
        relative.netns = "netns".into();
        assert!(invalid(&relative).is_some());
        let mut process = sandbox("lab", "a", &["10.244.1.10"], &[]);
        process.netns = "/proc/4242/ns/net".into();
        assert!(invalid(&process).is_some_and(|why| why.contains("/proc")));
    }

    #[tokio::test]
    async fn an_add_is_answered_once_every_address_is_behind_one_interface() {
        let s = sandbox("lab", "a", &["10.244.1.10", "fd00:244:1::10"], &[]);
        let (tx, rx) = watch::channel(Mapped::default());
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { wait_mapped(&s, rx, Duration::from_secs(5)).await }
        });
        let v4: IpAddr = "10.244.1.10".parse().expect("ip");
        let v6: IpAddr = "fd00:244:1::10".parse().expect("ip");
        let at = |ifindex: u32, owner: &str| Placed { ifindex, owner: owner.to_owned() };
        tx.send_replace(Arc::new([(v4, at(7, "lab/a"))].into()));
        tx.send_replace(Arc::new([(v4, at(7, "lab/a")), (v6, at(0, "lab/a"))].into()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "one address held behind none is not enrolled");
        // Behind its interface, but still another pod's: that pod's identity, not a's.
        tx.send_replace(Arc::new([(v4, at(7, "lab/a")), (v6, at(7, "lab/old"))].into()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "an address still another workload's is not a's");
        tx.send_replace(Arc::new([(v4, at(7, "lab/a")), (v6, at(7, "lab/a"))].into()));
        assert_eq!(waiting.await.expect("task"), Ok("ifindex 7".to_owned()));
        let (_tx, rx) = watch::channel(Mapped::default());
        let e = wait_mapped(&s, rx, Duration::from_millis(50)).await.expect_err("times out");
        assert!(e.contains("not in the map"), "{e}");
        // Interfaces named that this node does not have: refused at once, never matched loosely.
        let elsewhere = sandbox("lab", "a", &["10.244.1.10"], &["no-such-veth0"]);
        let (_tx, rx) = watch::channel(Arc::new([(v4, at(7, "lab/a"))].into()));
        let e = wait_mapped(&elsewhere, rx, Duration::from_secs(5)).await.expect_err("refused");
        assert!(e.contains("no-such-veth0"), "{e}");
    }
}
