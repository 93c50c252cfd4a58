//! Kubernetes as the source of truth: kube-rs watchers (with reflectors) on Pods, Namespaces,
//! Services and EndpointSlices, folded after every change into the [`DesiredState`] the node
//! daemon applies: the enrolled workloads of the whole cluster ([`enrol`]) and the service
//! table ([`services`]). Standalone, also Istio's AuthorizationPolicy and PeerAuthentication
//! objects, translated as istiod translates them ([`crate::policy::istio`]); where their CRDs
//! are not installed (the list answers 404), there are none, and the watch keeps looking.
//!
//! Watch errors (API server restarts, refused connections, `410 Gone`) are retried by the
//! watchers with backoff; a relist replaces a reflector's store only once it is complete, so
//! the state never shrinks to a half-listed one. Nothing is published before every watcher
//! has listed once: until then the daemon is not ready.

pub mod annotate;
pub mod enrol;
pub mod services;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::policy::PolicyDefaults;
use crate::policy::istio::{self, Note, Refusal, Translation};
use crate::state::{Authorization, DesiredState};
use crate::sync::lock;

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
    policies: Option<PolicyStores>,
}

/// Istio's security objects, with what their translation starts from.
struct PolicyStores {
    defaults: PolicyDefaults,
    authorization: Store<DynamicObject>,
    peer_authentication: Store<DynamicObject>,
    /// The last translation and the object versions it was made from: most rebuilds are for
    /// a pod's change, and 10 000 policies take tens of milliseconds to translate.
    last: Mutex<Option<(Vec<String>, Arc<Translation>)>>,
}

impl Stores {
    /// The state the stores describe, and what its policy objects' translation has to say.
    fn state(&self) -> (DesiredState, Vec<Remark>) {
        let pods = self.pods.state();
        let namespaces = self.namespaces.state();
        let ns_refs: Vec<&Namespace> = namespaces.iter().map(Arc::as_ref).collect();
        let services = self.services.state();
        let slices = self.slices.state();
        let slice_refs: Vec<&EndpointSlice> = slices.iter().map(Arc::as_ref).collect();
        let workloads = enrol::enrolled_workloads(pods.iter().map(Arc::as_ref), &ns_refs);
        let (authorization, remarks) = match &self.policies {
            Some(p) => p.translate(&pods, &workloads),
            None => Default::default(),
        };
        let state = DesiredState {
            workloads,
            services: services::service_table(services.iter().map(Arc::as_ref), &slice_refs),
            annotated: enrol::annotated(pods.iter().map(Arc::as_ref)),
            decided: Some(enrol::with_addresses(pods.iter().map(Arc::as_ref))),
            authorization,
            mesh: None,
        };
        (state, remarks)
    }
}

/// What the translation of policy objects says: each is logged once, when it appears.
#[derive(Debug, Clone, PartialEq)]
enum Remark {
    Refused(Refusal),
    Noted(Note),
}

impl Remark {
    fn log(&self) {
        match self {
            Remark::Refused(r) => tracing::error!(
                object = %r.key, kind = ?r.kind, enforced = ?r.outcome,
                "policy object refused, enforced fail-closed instead: {}", r.error
            ),
            Remark::Noted(n) => tracing::warn!(object = %n.key, kind = ?n.kind, "policy object: {:?}", n.note),
        }
    }
}

impl PolicyStores {
    /// The policies, and the selector keys of each enrolled pod (from its labels).
    fn translate(&self, pods: &[Arc<Pod>], enrolled: &crate::workloads::WorkloadFile) -> (Authorization, Vec<Remark>) {
        let t = self.translation();
        let ids: std::collections::HashSet<String> = enrolled.workloads.iter().map(|w| w.id()).collect();
        let no_labels = Default::default();
        let keys = pods
            .iter()
            .filter_map(|p| {
                let (ns, name) = (p.metadata.namespace.as_deref()?, p.metadata.name.as_deref()?);
                let id = format!("{ns}/{name}");
                ids.contains(&id)
                    .then(|| (id, t.workload_policies(ns, p.metadata.labels.as_ref().unwrap_or(&no_labels))))
            })
            .collect();
        let default_keys = t.workload_policies("", &no_labels);
        let refused = t.refused().iter().cloned().map(Remark::Refused);
        let remarks = refused.chain(t.notes().iter().cloned().map(Remark::Noted)).collect();
        (Authorization { policies: t.policies().clone(), keys, default_keys }, remarks)
    }

    /// The objects' translation: the last one while they are unchanged.
    fn translation(&self) -> Arc<Translation> {
        let (ap, pa) = (self.authorization.state(), self.peer_authentication.state());
        let versions = versions(&ap, &pa);
        let mut last = lock(&self.last);
        if let (Some(now), Some((then, t))) = (&versions, last.as_ref())
            && now == then
        {
            return t.clone();
        }
        let d = &self.defaults;
        let (ap_objects, pa_objects) = (ap.iter().map(Arc::as_ref), pa.iter().map(Arc::as_ref));
        let t = Arc::new(Translation::new(&d.root_namespace, d.mode, ap_objects, pa_objects));
        *last = versions.map(|v| (v, t.clone()));
        t
    }
}

/// What identifies these objects' contents (kind, key and resource version, sorted); `None`
/// if one has no resource version.
fn versions(ap: &[Arc<DynamicObject>], pa: &[Arc<DynamicObject>]) -> Option<Vec<String>> {
    let tagged = ap.iter().map(|o| ('A', o)).chain(pa.iter().map(|o| ('P', o)));
    let mut out = tagged
        .map(|(kind, o)| {
            let m = &o.metadata;
            let (ns, name) = (m.namespace.as_deref().unwrap_or(""), m.name.as_deref().unwrap_or(""));
            Some(format!("{kind} {ns}/{name} {}", m.resource_version.as_deref()?))
        })
        .collect::<Option<Vec<_>>>()?;
    out.sort_unstable();
    Some(out)
}

/// A list answered 404: the kind's CRD is not installed.
fn not_installed(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.is_not_found())
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
    /// Translate Istio's AuthorizationPolicy and PeerAuthentication objects (standalone).
    pub policies: Option<PolicyDefaults>,
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
        streams.push(watch_kind!("endpointslices", Api::<EndpointSlice>::all(client.clone()), slice_w));
    }
    let policies = scope.policies.map(|defaults| {
        let (ap, pa) = (istio::authorization_policy_resource(), istio::peer_authentication_resource());
        let (ap_w, pa_w) = (reflector::store::Writer::new(ap.clone()), reflector::store::Writer::new(pa.clone()));
        let (authorization, peer_authentication) = (ap_w.as_reader(), pa_w.as_reader());
        let stores = PolicyStores { defaults, authorization, peer_authentication, last: Mutex::default() };
        streams.push(watch_kind!("authorizationpolicies", Api::<DynamicObject>::all_with(client.clone(), &ap), ap_w));
        streams.push(watch_kind!("peerauthentications", Api::<DynamicObject>::all_with(client.clone(), &pa), pa_w));
        stores
    });
    let kinds = streams.len();
    let stores = Stores { pods, namespaces, services: svcs, slices, policies };
    tokio::spawn(async move {
        let mut events = futures::stream::select_all(streams);
        let mut listed: std::collections::BTreeSet<&'static str> = Default::default();
        let mut due: Option<tokio::time::Instant> = None;
        let mut last: Option<Arc<DesiredState>> = None;
        // Kinds whose CRD is missing (said once each), and the refusals already said.
        let mut missing: std::collections::BTreeSet<&'static str> = Default::default();
        let mut said: Vec<Remark> = Vec::new();
        loop {
            tokio::select! {
                _ = stop.signalled() => return,
                _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {
                    due = None;
                    if listed.len() < kinds {
                        continue;
                    }
                    let (state, remarks) = stores.state();
                    remarks.iter().filter(|r| !said.contains(r)).for_each(Remark::log);
                    said = remarks;
                    let state = Arc::new(state);
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
                        if done {
                            missing.remove(kind);
                        }
                        if done && listed.insert(kind) {
                            tracing::info!(kind, "listed");
                        }
                        due.get_or_insert_with(|| tokio::time::Instant::now() + DEBOUNCE);
                    }
                    Some((kind, Err(e))) if not_installed(&e) => {
                        if missing.insert(kind) {
                            tracing::info!(kind, "not installed in this cluster (no CRD): none until it is");
                        }
                        listed.insert(kind);
                        due.get_or_insert_with(|| tokio::time::Instant::now() + DEBOUNCE);
                    }
                    Some((kind, Err(e))) => tracing::warn!(kind, "watch failed, retrying with backoff: {e}"),
                },
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(ns: &str, name: &str, rv: Option<&str>) -> Arc<DynamicObject> {
        let mut o = DynamicObject::new(name, &istio::authorization_policy_resource()).within(ns);
        o.metadata.resource_version = rv.map(Into::into);
        Arc::new(o)
    }

    #[test]
    fn a_translation_is_reused_only_for_the_same_object_versions() {
        let (a, b) = (object("x", "a", Some("1")), object("x", "b", Some("2")));
        let v = versions(&[a.clone(), b.clone()], &[]);
        assert!(v.is_some());
        assert_eq!(v, versions(&[b.clone(), a.clone()], &[]), "order does not matter");
        assert_ne!(v, versions(&[a.clone(), object("x", "b", Some("3"))], &[]), "a new version is new");
        assert_ne!(
            v,
            versions(std::slice::from_ref(&a), std::slice::from_ref(&b)),
            "nor is the same key of another kind"
        );
        assert_eq!(versions(&[a, object("x", "c", None)], &[]), None, "no version: never reused");
    }
}
