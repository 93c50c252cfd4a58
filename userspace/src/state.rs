//! What the node knows about the mesh: the desired state its source publishes (the
//! workload file, or Kubernetes), and the [`WorkloadIndex`] through which the proxy, the
//! metrics and `status` look workloads and services up.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::identity::Identity;
use crate::policy::istio::Translation;
use crate::policy::{PolicyDefaults, PolicyStore};
use crate::workloads::WorkloadFile;

/// What a source says the mesh looks like.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredState {
    /// Enrolled workloads: of every node (workload file, Kubernetes), or of this node only
    /// (under istiod, whose [`DesiredState::mesh`] says who everyone is).
    pub workloads: WorkloadFile,
    pub services: ServiceTable,
    /// Pods (`namespace/name`) carrying the redirection annotation, with their node (the
    /// Kubernetes source only): those no longer captured lose it.
    pub annotated: BTreeMap<String, String>,
    /// The pods (`namespace/name`) the source has decided on one by one, enrolled or not
    /// (Kubernetes: every pod of the node with an address); `None` when the source's
    /// workloads are the whole word (the workload file). A pod the CNI plugin hands over
    /// outside this set is enrolled on the plugin's word until the source sees it.
    pub decided: Option<std::collections::BTreeSet<String>>,
    /// The authorization policies meshpath translated itself (standalone: Kubernetes'
    /// AuthorizationPolicy and PeerAuthentication objects, and the default mTLS mode).
    pub authorization: Authorization,
    /// The mesh as istiod's xDS describes it (every workload and service, kept up to date by
    /// deltas); `None` when the workloads and services above describe the mesh.
    pub mesh: Option<WorkloadIndex>,
}

/// Policies, and which workload-selector ones each workload gets, as istiod would list them
/// in its Workloads' `authorization_policies` (under istiod, xDS carries both instead).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Authorization {
    pub policies: PolicyStore,
    /// By workload (`namespace/name`).
    pub keys: BTreeMap<String, Vec<String>>,
    /// The keys of a workload missing from `keys` (the workload file's, or one held back
    /// after it left the state): what the mesh-wide default mode attaches.
    pub default_keys: Vec<String>,
}

impl Authorization {
    /// The defaults' policies alone (no Kubernetes objects): with STRICT as the mesh-wide
    /// mode, every workload gets the DENY policy istiod makes of it.
    pub fn of_defaults(d: &PolicyDefaults) -> Self {
        let t = Translation::new(&d.root_namespace, d.mode, std::iter::empty(), std::iter::empty());
        let default_keys = t.workload_policies("", &BTreeMap::new());
        Self { policies: t.into_store(), keys: BTreeMap::new(), default_keys }
    }

    fn keys_of(&self, workload: &str) -> &[String] {
        self.keys.get(workload).unwrap_or(&self.default_keys)
    }
}

/// One Service port on one cluster IP, with where it leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceBackends {
    /// `namespace/name`.
    pub service: String,
    /// Ready endpoints, sorted.
    pub endpoints: Vec<SocketAddr>,
    /// A waypoint stands in front of the service (xDS).
    pub waypoint: bool,
}

/// Every TCP service address of the cluster.
pub type ServiceTable = BTreeMap<SocketAddr, ServiceBackends>;

/// How a workload's peers reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// Through its node's proxy, in HBONE.
    Hbone,
    /// Plain TCP to the pod: no node proxy captures it (yet).
    Plain,
}

/// A workload as the proxy needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// `namespace/name`.
    pub id: String,
    pub node: String,
    pub identity: Identity,
    pub tunnel: Tunnel,
    /// A waypoint stands in front of it (xDS): its traffic must pass there.
    pub waypoint: bool,
    /// The workload-selector policies that apply to it (`namespace/name`).
    pub policies: Vec<String>,
}

impl WorkloadInfo {
    /// A workload enrolled by the workload file or Kubernetes: HBONE, no waypoint.
    pub fn enrolled(id: String, node: String, identity: Identity) -> Self {
        Self { id, node, identity, tunnel: Tunnel::Hbone, waypoint: false, policies: Vec::new() }
    }
}

/// Workloads by IP, on every node, and services by address. Cloning it is cheap (persistent
/// maps), so every change can publish a snapshot; updates change only what they touch.
#[derive(Clone, Debug, Default)]
pub struct WorkloadIndex {
    by_ip: imbl::HashMap<IpAddr, Arc<WorkloadInfo>>,
    services: imbl::HashMap<SocketAddr, Arc<ServiceBackends>>,
    /// Round-robin position over each service's endpoints (shared by the snapshots).
    next_endpoint: Arc<AtomicUsize>,
    /// The authorization policies of the mesh, by scope.
    policies: PolicyStore,
}

impl PartialEq for WorkloadIndex {
    fn eq(&self, other: &Self) -> bool {
        self.by_ip == other.by_ip && self.services == other.services
    }
}

impl WorkloadIndex {
    /// The index a state describes: istiod's, or the one its workloads and services make.
    pub fn new(state: &DesiredState, trust_domain: &str) -> Self {
        if let Some(mesh) = &state.mesh {
            return mesh.clone();
        }
        let services = state.services.iter().map(|(a, b)| (canonical(*a), Arc::new(b.clone()))).collect();
        let auth = &state.authorization;
        let by_ip = Self::workloads_of(&state.workloads, trust_domain, |id| auth.keys_of(id));
        Self { by_ip, services, policies: auth.policies.clone(), ..Default::default() }
    }

    /// The index of a workload file alone (no services, no policies).
    pub fn from_file(f: &WorkloadFile, trust_domain: &str) -> Self {
        Self { by_ip: Self::workloads_of(f, trust_domain, |_| &[]), ..Default::default() }
    }

    fn workloads_of<'a>(
        f: &WorkloadFile,
        trust_domain: &str,
        keys: impl Fn(&str) -> &'a [String],
    ) -> imbl::HashMap<IpAddr, Arc<WorkloadInfo>> {
        let mut by_ip = imbl::HashMap::new();
        for w in &f.workloads {
            let identity = Identity::new(trust_domain, &w.namespace, &w.service_account);
            let id = w.id();
            let policies = keys(&id).to_vec();
            let info = Arc::new(WorkloadInfo { policies, ..WorkloadInfo::enrolled(id, w.node.clone(), identity) });
            for ip in &w.ips {
                by_ip.insert(ip.to_canonical(), info.clone());
            }
        }
        by_ip
    }

    pub fn get(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.by_ip.get(&ip.to_canonical())
    }

    /// Every workload address and its workload.
    pub fn workloads(&self) -> impl Iterator<Item = (IpAddr, &Arc<WorkloadInfo>)> {
        self.by_ip.iter().map(|(ip, w)| (*ip, w))
    }

    /// How many workload addresses and service addresses it holds.
    pub fn len(&self) -> (usize, usize) {
        (self.by_ip.len(), self.services.len())
    }

    /// The mesh's authorization policies.
    pub fn policies(&self) -> &PolicyStore {
        &self.policies
    }

    pub fn set_policies(&mut self, policies: PolicyStore) {
        self.policies = policies;
    }

    /// Whether `addr` is a service's cluster IP and port.
    pub fn is_service(&self, addr: SocketAddr) -> bool {
        self.services.contains_key(&canonical(addr))
    }

    pub fn service(&self, addr: SocketAddr) -> Option<&Arc<ServiceBackends>> {
        self.services.get(&canonical(addr))
    }

    /// The service at `addr` (a cluster IP and port) and one of its ready endpoints, taken in
    /// turn; `Some((service, None))` when it has none.
    pub fn resolve_service(&self, addr: SocketAddr) -> Option<(&ServiceBackends, Option<SocketAddr>)> {
        let b = self.services.get(&canonical(addr))?;
        if b.endpoints.is_empty() {
            return Some((b, None));
        }
        let i = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
        Some((b, Some(b.endpoints[i % b.endpoints.len()])))
    }

    /// Puts `ip` under `info` (replacing what held it).
    pub fn insert_ip(&mut self, ip: IpAddr, info: Arc<WorkloadInfo>) {
        self.by_ip.insert(ip.to_canonical(), info);
    }

    /// This node's captured pods are reached through its proxy even while the control plane
    /// still calls them plain: istiod marks a pod HBONE only once this node has annotated it,
    /// a round trip during which the node knows better.
    pub fn captured_here(mut self, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        for ip in ips {
            if let Some(w) = self.get(ip).filter(|w| w.tunnel == Tunnel::Plain) {
                let hbone = Arc::new(WorkloadInfo { tunnel: Tunnel::Hbone, ..(**w).clone() });
                self.insert_ip(ip, hbone);
            }
        }
        self
    }

    /// Takes `ip` out if `owner` still holds it (another workload may have taken the address).
    pub fn remove_ip(&mut self, ip: IpAddr, owner: &Arc<WorkloadInfo>) {
        let ip = ip.to_canonical();
        if self.by_ip.get(&ip).is_some_and(|held| Arc::ptr_eq(held, owner)) {
            self.by_ip.remove(&ip);
        }
    }

    /// Sets (or with `None` removes) what a service address leads to.
    pub fn set_service(&mut self, addr: SocketAddr, backends: Option<ServiceBackends>) {
        match backends {
            Some(b) => self.services.insert(canonical(addr), Arc::new(b)),
            None => self.services.remove(&canonical(addr)),
        };
    }
}

/// IPv4-mapped IPv6 socket addresses as plain IPv4.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, tunnel: Tunnel) -> Arc<WorkloadInfo> {
        let identity = Identity::new("cluster.local", "ns", id);
        Arc::new(WorkloadInfo { tunnel, ..WorkloadInfo::enrolled(id.into(), "n1".into(), identity) })
    }

    #[test]
    fn pods_captured_here_are_reached_through_the_proxy_before_the_control_plane_says_so() {
        let (a, b, c): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let mut index = WorkloadIndex::default();
        index.insert_ip(a, info("a", Tunnel::Plain));
        index.insert_ip(b, info("b", Tunnel::Plain));
        // c is captured here but not described yet: it stays unknown (its source waits).
        let index = index.captured_here([a, c]);
        assert_eq!(index.get(a).map(|w| w.tunnel), Some(Tunnel::Hbone));
        assert_eq!(index.get(a).map(|w| w.id.as_str()), Some("a"));
        assert_eq!(index.get(b).map(|w| w.tunnel), Some(Tunnel::Plain), "not captured here");
        assert!(index.get(c).is_none());
    }
}
