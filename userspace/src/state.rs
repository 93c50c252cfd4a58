//! What the node knows about the mesh: the desired state its source publishes (the
//! workload file, or Kubernetes), and the [`WorkloadIndex`] through which the proxy, the
//! metrics and `status` look workloads and services up.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::identity::Identity;
use crate::workloads::WorkloadFile;

/// What a source says the mesh looks like.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredState {
    /// Enrolled workloads of every node.
    pub workloads: WorkloadFile,
    pub services: ServiceTable,
    /// Pods (`namespace/name`) carrying the redirection annotation, with their node (the
    /// Kubernetes source only): those no longer captured lose it.
    pub annotated: BTreeMap<String, String>,
}

/// One Service port on one cluster IP, with where it leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceBackends {
    /// `namespace/name`.
    pub service: String,
    /// Ready endpoints, sorted.
    pub endpoints: Vec<SocketAddr>,
}

/// Every TCP service address of the cluster.
pub type ServiceTable = BTreeMap<SocketAddr, ServiceBackends>;

/// A workload as the proxy needs it.
#[derive(Debug, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// `namespace/name`.
    pub id: String,
    pub node: String,
    pub identity: Identity,
}

/// Workloads by IP, on every node, and services by address.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    by_ip: BTreeMap<IpAddr, Arc<WorkloadInfo>>,
    services: ServiceTable,
    /// Round-robin position over each service's endpoints.
    next_endpoint: AtomicUsize,
}

impl WorkloadIndex {
    pub fn new(state: &DesiredState, trust_domain: &str) -> Self {
        Self { services: state.services.clone(), ..Self::from_file(&state.workloads, trust_domain) }
    }

    pub fn from_file(f: &WorkloadFile, trust_domain: &str) -> Self {
        let mut by_ip = BTreeMap::new();
        for w in &f.workloads {
            let info = Arc::new(WorkloadInfo {
                id: w.id(),
                node: w.node.clone(),
                identity: Identity::new(trust_domain, &w.namespace, &w.service_account),
            });
            for ip in &w.ips {
                by_ip.insert(ip.to_canonical(), info.clone());
            }
        }
        Self { by_ip, ..Default::default() }
    }

    pub fn get(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.by_ip.get(&ip.to_canonical())
    }

    /// Identities of the workloads on `node`.
    pub fn identities_on(&self, node: &str) -> BTreeSet<Identity> {
        self.by_ip.values().filter(|w| w.node == node).map(|w| w.identity.clone()).collect()
    }

    pub fn has_services(&self) -> bool {
        !self.services.is_empty()
    }

    /// Whether `addr` is a service's cluster IP and port.
    pub fn is_service(&self, addr: SocketAddr) -> bool {
        self.services.contains_key(&canonical(addr))
    }

    /// The service at `addr` (a cluster IP and port) and one of its ready endpoints, taken in
    /// turn; `Some((service, None))` when it has none.
    pub fn resolve_service(&self, addr: SocketAddr) -> Option<(&str, Option<SocketAddr>)> {
        let b = self.services.get(&canonical(addr))?;
        if b.endpoints.is_empty() {
            return Some((&b.service, None));
        }
        let i = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
        Some((&b.service, Some(b.endpoints[i % b.endpoints.len()])))
    }
}

/// IPv4-mapped IPv6 socket addresses as plain IPv4.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}
