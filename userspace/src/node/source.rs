//! Where the node's desired state comes from. Every source runs as a task of its own and
//! publishes on a watch channel: `None` until its first complete state, then each new one.
//! The node daemon follows the channel and never needs to know which source it is.
//!
//! Under istiod two sources make one state: Kubernetes says which of this node's pods are
//! captured (only this node's pods are watched), istiod's xDS who everyone in the mesh is
//! ([`DesiredState::mesh`]). The state is published once Kubernetes has listed, whatever
//! istiod does: captured pods must be held by the datapath (their connections then wait
//! for istiod, bounded, and fail closed) rather than left uncaptured.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::drain;
use crate::k8s::{self, K8sError};
use crate::policy::PolicyDefaults;
use crate::state::{Authorization, DesiredState, WorkloadIndex};
use crate::workloads::{WorkloadFile, WorkloadsError};
use crate::xds::client::{XdsClient, XdsStatus};
use crate::xds::config::XdsSettings;
use crate::xds::mesh::Mesh;

/// The latest desired state (`None` before the first one).
pub type StateRx = watch::Receiver<Option<Arc<DesiredState>>>;

/// A source being followed: its states, and the control plane's client status (istiod).
pub struct Following {
    pub state: StateRx,
    pub control_plane: Option<watch::Receiver<XdsStatus>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Workloads(#[from] WorkloadsError),
    #[error(transparent)]
    Kubernetes(#[from] K8sError),
}

/// Where the desired state comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A workload file, polled for changes; its policies are the defaults' alone.
    File(PathBuf, PolicyDefaults),
    /// The Kubernetes API (KUBECONFIG, ~/.kube/config or in-cluster), with Istio's
    /// AuthorizationPolicy and PeerAuthentication objects where their CRDs are installed.
    Kubernetes(PolicyDefaults),
    /// istiod's xDS for the mesh, Kubernetes (this node's pods) for capture.
    Istiod(Box<IstiodSource>),
}

/// What the istiod source needs.
#[derive(Clone, Debug)]
pub struct IstiodSource {
    pub node: String,
    /// Of workloads whose resource names none.
    pub trust_domain: String,
    pub xds: XdsSettings,
}

impl Source {
    /// Starts following the source until `stop` is signalled. A workload file is read and
    /// validated here, so a bad one fails the start.
    pub async fn start(&self, poll: Duration, stop: drain::Watcher) -> Result<Following, SourceError> {
        let state = match self {
            Source::File(path, defaults) => {
                let (file, first) = FileSource::open(path, poll)?;
                file.spawn(first, Authorization::of_defaults(defaults), poll, stop)
            }
            Source::Kubernetes(defaults) => {
                let scope = k8s::Scope { node: None, policies: Some(defaults.clone()) };
                k8s::start(k8s::client().await?, scope, stop)
            }
            Source::Istiod(istiod) => return Ok(istiod.start(stop).await?),
        };
        Ok(Following { state, control_plane: None })
    }
}

impl IstiodSource {
    async fn start(&self, stop: drain::Watcher) -> Result<Following, K8sError> {
        let scope = k8s::Scope { node: Some(self.node.clone()), policies: None };
        let pods = k8s::start(k8s::client().await?, scope, stop.clone());
        let mesh = Mesh::new(&self.trust_domain);
        let index = mesh.subscribe();
        let client = XdsClient::new(self.xds.clone(), mesh);
        let status = client.status();
        tokio::spawn(client.run(stop.clone()));
        Ok(Following { state: merge(pods, index, stop), control_plane: Some(status) })
    }
}

/// This node's pods from Kubernetes, with the mesh from xDS: a state as soon as the pods
/// are listed, then one per change of either.
fn merge(mut pods: StateRx, mut mesh: watch::Receiver<WorkloadIndex>, mut stop: drain::Watcher) -> StateRx {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            let local = pods.borrow_and_update().clone();
            let index = mesh.borrow_and_update().clone();
            if let Some(local) = local {
                tx.send_replace(Some(Arc::new(DesiredState { mesh: Some(index), ..(*local).clone() })));
            }
            tokio::select! {
                _ = stop.signalled() => return,
                r = pods.changed() => if r.is_err() { return },
                r = mesh.changed() => if r.is_err() { return },
            }
        }
    });
    rx
}

/// How long a read of the workload file is trusted without reading it again.
const FORCED_READ: Duration = Duration::from_secs(10);
/// Polls a changed file's stamp must hold still before the file is read.
const SETTLE_POLLS: u32 = 2;

/// The workload file, polled: a changed file is applied whole or not at all, only once it
/// has held still for [`SETTLE_POLLS`] polls (a file written in place passes through empty
/// and half-written states), and an unreadable one changes nothing (reading it as empty
/// would unenrol every workload).
struct FileSource {
    path: PathBuf,
    settle: Duration,
    /// A changed stamp, and since when it has held.
    settling: Option<(Option<FileStamp>, Instant)>,
    /// The text last parsed (valid or not): only a different text is parsed again.
    last_text: String,
    read_failed: bool,
    read: FileRead,
}

impl FileSource {
    /// Reads the file for the first time. Its stamp is taken before the read, so an edit
    /// made during start-up shows as a changed stamp and is not missed.
    fn open(path: &Path, poll: Duration) -> Result<(Self, WorkloadFile), WorkloadsError> {
        let stamp = FileStamp::of(path);
        let (file, last_text) = WorkloadFile::load_with_text(path)?;
        let read = FileRead { stamp, at: SystemTime::now() };
        let settle = poll * SETTLE_POLLS;
        Ok((Self { path: path.to_owned(), settle, settling: None, last_text, read_failed: false, read }, file))
    }

    fn spawn(
        mut self,
        first: WorkloadFile,
        authorization: Authorization,
        poll: Duration,
        mut stop: drain::Watcher,
    ) -> StateRx {
        let state = move |workloads| {
            Arc::new(DesiredState { workloads, authorization: authorization.clone(), ..Default::default() })
        };
        let (tx, rx) = watch::channel(Some(state(first)));
        let mut changes = watch_dir(&self.path);
        tokio::spawn(async move {
            loop {
                // With inotify, the file is looked at only when its directory changes (and
                // while a change settles): no timer on an idle node. Without, every poll.
                let wait = (changes.is_none() || self.settling.is_some()).then(|| tokio::time::Instant::now() + poll);
                tokio::select! {
                    _ = stop.signalled() => return,
                    () = super::sleep_until(wait) => {}
                    event = next_change(&mut changes) => {
                        if !event {
                            tracing::warn!(path = %self.path.display(), "inotify stopped; polling the workload file instead");
                            changes = None;
                        }
                    }
                }
                if let Some(workloads) = self.poll() {
                    tracing::info!(workloads = workloads.workloads.len(), "workload file changed; applying");
                    let _ = tx.send(Some(state(workloads)));
                }
            }
        });
        rx
    }

    /// A new valid file, if it changed since the last look.
    fn poll(&mut self) -> Option<WorkloadFile> {
        // Unchanged metadata (inode, size, mtime) means an unchanged file: at 10 000
        // workloads reading and comparing a megabyte every tick is not free.
        let now = FileStamp::of(&self.path);
        if !self.read_failed && self.read.still_current(now) {
            self.settling = None;
            return None;
        }
        match self.settling {
            Some((stamp, since)) if stamp == now && since.elapsed() >= self.settle => self.settling = None,
            Some((stamp, _)) if stamp == now => return None,
            _ => {
                self.settling = Some((now, Instant::now()));
                return None;
            }
        }
        self.read = FileRead { stamp: now, at: SystemTime::now() };
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                if !self.read_failed {
                    tracing::error!("cannot read {}, keeping the running state: {e}", self.path.display());
                    self.read_failed = true;
                }
                return None;
            }
        };
        self.read_failed = false;
        if text == self.last_text {
            return None;
        }
        self.last_text = text;
        match WorkloadFile::parse(&self.last_text, &self.path.display().to_string()) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!("rejected workload file, keeping the running state: {e}");
                None
            }
        }
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
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let mtime_ns = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
        Some(Self { dev: m.dev(), ino: m.ino(), len: m.len(), mtime_ns })
    }
}

/// When the workload file was last read, and its stamp just before.
#[derive(Clone, Copy, Debug)]
struct FileRead {
    stamp: Option<FileStamp>,
    at: SystemTime,
}

impl FileRead {
    /// Whether a file with stamp `now` is certainly what was read: the same stamp, a
    /// modification time well before that read (an edit within the same timestamp tick as
    /// the read could hide behind an equal stamp: git's "racy" rule), and a read not older
    /// than [`FORCED_READ`].
    fn still_current(&self, now: Option<FileStamp>) -> bool {
        let (Some(then), Some(now)) = (self.stamp, now) else { return false };
        let settled = self
            .at
            .duration_since(UNIX_EPOCH)
            .map(|d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX) - now.mtime_ns > 2_000_000_000)
            .unwrap_or(false);
        then == now && settled && self.at.elapsed().map(|e| e < FORCED_READ).unwrap_or(false)
    }
}

type Changes = inotify::EventStream<Vec<u8>>;

/// Follows changes in the directory of `path` (an atomic rename, a Secret or ConfigMap
/// volume's symlink swap, a write in place); `None` where inotify cannot be used.
fn watch_dir(path: &Path) -> Option<Changes> {
    use inotify::{Inotify, WatchMask};
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let watched = Inotify::init().and_then(|i| {
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MODIFY
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::ATTRIB;
        i.watches().add(dir, mask)?;
        i.into_event_stream(vec![0u8; 4096])
    });
    match watched {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the workload file's directory; polling it");
            None
        }
    }
}

/// Waits for the next change in the watched directory; `false` when the watch ended (the
/// directory itself went, or the stream failed). Never resolves without a watch.
async fn next_change(changes: &mut Option<Changes>) -> bool {
    use futures::StreamExt as _;
    match changes {
        Some(c) => matches!(c.next().await, Some(Ok(e)) if !e.mask.contains(inotify::EventMask::IGNORED)),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n: usize) -> String {
        let w = |i| format!("  - {{name: w{i}, namespace: ns, serviceAccount: sa, node: n1, ips: [10.244.1.{i}]}}\n");
        format!("workloads:\n{}", (1..=n).map(w).collect::<String>())
    }

    /// Writes as operators and ConfigMaps do: a new file renamed over the old one.
    fn replace(path: &Path, n: usize) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, file(n)).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    async fn until_workloads(rx: &mut StateRx, n: usize, why: &str) {
        let seen = |s: &Option<Arc<DesiredState>>| s.as_ref().is_some_and(|s| s.workloads.workloads.len() == n);
        let waited = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(seen)).await;
        assert!(waited.is_ok_and(|r| r.is_ok()), "{why}: {n} workloads never published");
    }

    #[tokio::test]
    async fn the_file_is_followed_by_inotify_and_polled_once_its_directory_goes() {
        let dir = std::env::temp_dir().join(format!("meshpath-source-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("workloads.yaml");
        std::fs::write(&path, file(1)).unwrap();
        let poll = Duration::from_millis(20);
        let (source, first) = FileSource::open(&path, poll).unwrap();
        assert_eq!(first.workloads.len(), 1);
        let (_trigger, watcher) = drain::new();
        let mut rx = source.spawn(first, Authorization::default(), poll, watcher);
        replace(&path, 2);
        until_workloads(&mut rx, 2, "a renamed file").await;
        // The watched directory goes and comes back: the watch ended, polls take over.
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        replace(&path, 3);
        until_workloads(&mut rx, 3, "a file in a new directory").await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
