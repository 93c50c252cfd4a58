//! Kubernetes as the source of truth: kube-rs watchers (with reflectors) on Pods, Namespaces,
//! Services and EndpointSlices, folded after every change into the [`DesiredState`] the node
//! daemon applies: the enrolled workloads of the whole cluster ([`enrol`]) and the service
//! table ([`services`]).
//!
//! Watch errors (API server restarts, refused connections, `410 Gone`) are retried by the
//! watchers with backoff; a relist replaces a reflector's store only once it is complete, so
//! the state never shrinks to a half-listed one. Nothing is published before every watcher
//! has listed once: until then the daemon is not ready.

pub mod annotate;
pub mod enrol;
pub mod services;

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::state::DesiredState;

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster service account): {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Changes are folded together for this long before the state is rebuilt: a burst of pod
/// events costs one rebuild, well within the second enrolment may take.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// A client from KUBECONFIG, ~/.kube/config or the in-cluster service account.
pub async fn client() -> Result<Client, K8sError> {
    let config = kube::Config::infer().await?;
    tracing::info!(server = %config.cluster_url, "Kubernetes API server");
    Ok(Client::try_from(config)?)
}

struct Stores {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
}

impl Stores {
    fn state(&self) -> DesiredState {
        let pods = self.pods.state();
        let namespaces = self.namespaces.state();
        let ns_refs: Vec<&Namespace> = namespaces.iter().map(Arc::as_ref).collect();
        let services = self.services.state();
        let slices = self.slices.state();
        let slice_refs: Vec<&EndpointSlice> = slices.iter().map(Arc::as_ref).collect();
        DesiredState {
            workloads: enrol::enrolled_workloads(pods.iter().map(Arc::as_ref), &ns_refs),
            services: services::service_table(services.iter().map(Arc::as_ref), &slice_refs),
            annotated: enrol::annotated(pods.iter().map(Arc::as_ref)),
            mesh: None,
        }
    }
}

/// Whether a watcher event ends a (re)list.
fn init_done<K>(e: &watcher::Event<K>) -> bool {
    matches!(e, watcher::Event::InitDone)
}

/// What the watchers follow.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Only the pods of this node, and no Services or EndpointSlices (a control plane
    /// describes the mesh): a node never lists every pod of the cluster.
    pub node: Option<String>,
}

/// Starts the watchers; the receiver holds `None` until the first full sync, then the
/// latest state. They stop when `stop` is signalled.
pub fn start(
    client: Client,
    scope: Scope,
    mut stop: crate::drain::Watcher,
) -> watch::Receiver<Option<Arc<DesiredState>>> {
    let (tx, rx) = watch::channel(None);
    let cfg = watcher::Config::default();
    let pods_cfg = match &scope.node {
        Some(node) => cfg.clone().fields(&format!("spec.nodeName={node}")),
        None => cfg.clone(),
    };
    let (pods, pods_w) = reflector::store::<Pod>();
    let (namespaces, ns_w) = reflector::store::<Namespace>();
    let (svcs, svc_w) = reflector::store::<Service>();
    let (slices, slice_w) = reflector::store::<EndpointSlice>();
    // One stream of (kind, "a list completed") per watcher; errors are logged and retried.
    macro_rules! watch_kind {
        ($kind:expr, $api:expr, $writer:expr) => {
            watch_kind!($kind, $api, $writer, cfg.clone())
        };
        ($kind:expr, $api:expr, $writer:expr, $cfg:expr) => {
            reflector::reflector($writer, watcher($api, $cfg).default_backoff())
                .map_ok(|e| init_done(&e))
                .map(|r| ($kind, r))
                .boxed()
        };
    }
    let mut streams = vec![
        watch_kind!("pods", Api::<Pod>::all(client.clone()), pods_w, pods_cfg),
        watch_kind!("namespaces", Api::<Namespace>::all(client.clone()), ns_w),
    ];
    if scope.node.is_none() {
        streams.push(watch_kind!("services", Api::<Service>::all(client.clone()), svc_w));
        streams.push(watch_kind!("endpointslices", Api::<EndpointSlice>::all(client), slice_w));
    }
    let kinds = streams.len();
    let stores = Stores { pods, namespaces, services: svcs, slices };
    tokio::spawn(async move {
        let mut events = futures::stream::select_all(streams);
        let mut listed: std::collections::BTreeSet<&'static str> = Default::default();
        let mut due: Option<tokio::time::Instant> = None;
        let mut last: Option<Arc<DesiredState>> = None;
        loop {
            tokio::select! {
                _ = stop.signalled() => return,
                _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {
                    due = None;
                    if listed.len() < kinds {
                        continue;
                    }
                    let state = Arc::new(stores.state());
                    if last.as_deref() != Some(&state) {
                        if last.is_none() {
                            tracing::info!(workloads = state.workloads.workloads.len(), services = state.services.len(), "Kubernetes state synced");
                        }
                        last = Some(state.clone());
                        let _ = tx.send(Some(state));
                    }
                }
                item = events.next() => match item {
                    None => return,
                    Some((kind, Ok(done))) => {
                        if done && listed.insert(kind) {
                            tracing::info!(kind, "listed");
                        }
                        due.get_or_insert_with(|| tokio::time::Instant::now() + DEBOUNCE);
                    }
                    Some((kind, Err(e))) => tracing::warn!(kind, "watch failed, retrying with backoff: {e}"),
                },
            }
        }
    });
    rx
}
