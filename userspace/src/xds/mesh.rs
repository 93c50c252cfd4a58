//! The mesh as istiod describes it, applied delta by delta: `Address` resources (workloads
//! and services) update the [`WorkloadIndex`] the proxy reads, touching only what a change
//! concerns (a workload's addresses and the services it is in; a service's addresses), and
//! each applied response publishes a snapshot (a pointer copy: the index is persistent).
//! `Authorization`s become the index's policies ([`crate::policy`]).
//!
//! Choices (ztunnel's, where it has one):
//! - a resource's xDS name is its key: a workload's uid, a service's `namespace/hostname`;
//!   a removal names either;
//! - a service's endpoints are its member workloads that are `HEALTHY` (or all of them
//!   under `ALLOW_ALL`), at the port the workload maps the service port to, else the
//!   service's target port; a member with neither is not an endpoint;
//! - an endpoint's address is the workload's first of the service address's family.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::watch;

use super::proto::istio::security::Authorization;
use super::proto::istio::workload::{
    Address, Service, TunnelProtocol, Workload, WorkloadStatus, address, load_balancing::HealthPolicy,
};
use super::session::{Applier, Delta, Named, Rejected};
use crate::identity::{Identity, valid_segment};
use crate::policy::{Policy, PolicyStore};
use crate::state::{ServiceBackends, Tunnel, WorkloadIndex, WorkloadInfo};

/// A workload as held: what the index points at, and what its service memberships need.
#[derive(Debug)]
struct Member {
    info: Arc<WorkloadInfo>,
    ips: Vec<IpAddr>,
    /// Service key → (service port, target port) pairs.
    ports: BTreeMap<String, Vec<(u16, u16)>>,
    healthy: bool,
}

/// A service as held.
#[derive(Debug, PartialEq)]
struct ServiceDef {
    /// `namespace/name`, for records.
    name: String,
    vips: Vec<IpAddr>,
    /// (service port, target port); a target port of 0 is a named one.
    ports: Vec<(u16, u16)>,
    waypoint: bool,
    allow_unhealthy: bool,
}

impl ServiceDef {
    fn addrs(&self) -> impl Iterator<Item = (SocketAddr, u16)> + '_ {
        self.vips.iter().flat_map(|ip| self.ports.iter().map(|(sp, tp)| (SocketAddr::new(*ip, *sp), *tp)))
    }
}

/// The applier the xDS client feeds; [`Mesh::subscribe`] follows its snapshots.
#[derive(Debug)]
pub struct Mesh {
    /// The trust domain of a workload that names none.
    trust_domain: String,
    workloads: HashMap<String, Member>,
    services: HashMap<String, ServiceDef>,
    /// Service key → uids of the workloads that say they are in it.
    members: HashMap<String, BTreeSet<String>>,
    policies: PolicyStore,
    index: WorkloadIndex,
    published: watch::Sender<WorkloadIndex>,
}

impl Mesh {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            workloads: HashMap::new(),
            services: HashMap::new(),
            members: HashMap::new(),
            policies: PolicyStore::default(),
            index: WorkloadIndex::default(),
            published: watch::channel(WorkloadIndex::default()).0,
        }
    }

    /// The index after each applied response.
    pub fn subscribe(&self) -> watch::Receiver<WorkloadIndex> {
        self.published.subscribe()
    }

    /// How many workloads, services and authorizations are held.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.workloads.len(), self.services.len(), self.policies.len())
    }

    fn apply_addresses(&mut self, updates: Vec<Named<Address>>, removed: Vec<String>) -> Vec<Rejected> {
        let mut rejected = Vec::new();
        let mut touched = BTreeSet::new();
        for name in removed {
            touched.extend(self.remove_workload(&name));
            if let Some(old) = self.services.remove(&name) {
                self.clear_service(&old);
            }
        }
        for Named { name, resource } in updates {
            let result = match resource.r#type {
                Some(address::Type::Workload(w)) => self.put_workload(&name, w).map(|t| touched.extend(t)),
                Some(address::Type::Service(s)) => self.put_service(&name, s).map(|()| {
                    touched.insert(name.clone());
                }),
                None => Err("an Address with neither a workload nor a service".to_owned()),
            };
            if let Err(reason) = result {
                rejected.push(Rejected::refused(name, reason));
            }
        }
        for key in touched {
            self.refresh_service(&key);
        }
        rejected
    }

    /// Replaces workload `uid`; returns the services whose endpoints may have changed.
    fn put_workload(&mut self, uid: &str, w: Workload) -> Result<BTreeSet<String>, String> {
        let member = self.member(w)?;
        let mut touched = self.remove_workload(uid);
        for ip in &member.ips {
            self.index.insert_ip(*ip, member.info.clone());
        }
        for key in member.ports.keys() {
            self.members.entry(key.clone()).or_default().insert(uid.to_owned());
            touched.insert(key.clone());
        }
        self.workloads.insert(uid.to_owned(), member);
        Ok(touched)
    }

    fn member(&self, w: Workload) -> Result<Member, String> {
        for (field, value) in [("namespace", &w.namespace), ("service_account", &w.service_account)] {
            if !valid_segment(value) {
                return Err(format!("{field} {value:?} cannot be part of an identity"));
            }
        }
        let trust_domain = if w.trust_domain.is_empty() { &self.trust_domain } else { &w.trust_domain };
        if !valid_segment(trust_domain) {
            return Err(format!("trust domain {trust_domain:?} cannot be part of an identity"));
        }
        let ips = w.addresses.iter().map(|b| ip_of(b)).collect::<Result<Vec<_>, _>>()?;
        let tunnel = match TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(TunnelProtocol::Hbone) => Tunnel::Hbone,
            Ok(TunnelProtocol::None | TunnelProtocol::LegacyIstioMtls) => Tunnel::Plain,
            Err(_) => return Err(format!("unknown tunnel protocol {}", w.tunnel_protocol)),
        };
        let mut ports = BTreeMap::new();
        for (key, list) in &w.services {
            let pairs = list.ports.iter().map(|p| Ok((port(p.service_port)?, port(p.target_port)?)));
            ports.insert(key.clone(), pairs.collect::<Result<Vec<_>, String>>()?);
        }
        let info = WorkloadInfo {
            id: format!("{}/{}", w.namespace, w.name),
            node: w.node.clone(),
            identity: Identity::new(trust_domain, &w.namespace, &w.service_account),
            tunnel,
            waypoint: w.waypoint.is_some(),
            policies: w.authorization_policies.clone(),
        };
        let healthy = w.status == WorkloadStatus::Healthy as i32;
        Ok(Member { info: Arc::new(info), ips, ports, healthy })
    }

    /// Takes workload `uid` out; returns the services it was in.
    fn remove_workload(&mut self, uid: &str) -> BTreeSet<String> {
        let Some(old) = self.workloads.remove(uid) else { return BTreeSet::new() };
        for ip in &old.ips {
            self.index.remove_ip(*ip, &old.info);
        }
        for key in old.ports.keys() {
            if let Some(set) = self.members.get_mut(key) {
                set.remove(uid);
                if set.is_empty() {
                    self.members.remove(key);
                }
            }
        }
        old.ports.into_keys().collect()
    }

    fn put_service(&mut self, key: &str, s: Service) -> Result<(), String> {
        let vips = s.addresses.iter().map(|a| ip_of(&a.address)).collect::<Result<Vec<_>, _>>()?;
        let ports = s
            .ports
            .iter()
            .map(|p| match port(p.service_port)? {
                0 => Err("a service port of 0".to_owned()),
                sp => Ok((sp, port(p.target_port)?)),
            })
            .collect::<Result<Vec<_>, String>>()?;
        let allow_unhealthy =
            s.load_balancing.as_ref().is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll as i32);
        let def = ServiceDef {
            name: format!("{}/{}", s.namespace, s.name),
            vips,
            ports,
            waypoint: s.waypoint.is_some(),
            allow_unhealthy,
        };
        if let Some(old) = self.services.remove(key) {
            self.clear_service(&old);
        }
        self.services.insert(key.to_owned(), def);
        Ok(())
    }

    /// Takes a service's addresses out of the index.
    fn clear_service(&mut self, def: &ServiceDef) {
        for (addr, _) in def.addrs() {
            self.index.set_service(addr, None);
        }
    }

    /// Recomputes the endpoints of service `key` at each of its addresses.
    fn refresh_service(&mut self, key: &str) {
        let Some(def) = self.services.get(key) else { return };
        let uids = self.members.get(key);
        let mut entries = Vec::new();
        for (addr, target) in def.addrs() {
            let mut endpoints: Vec<SocketAddr> = uids
                .into_iter()
                .flatten()
                .filter_map(|uid| self.workloads.get(uid))
                .filter(|m| m.healthy || def.allow_unhealthy)
                .filter_map(|m| endpoint(m, key, addr, target))
                .collect();
            endpoints.sort();
            entries.push((addr, ServiceBackends { service: def.name.clone(), endpoints, waypoint: def.waypoint }));
        }
        for (addr, backends) in entries {
            self.index.set_service(addr, Some(backends));
        }
    }

    /// A policy refused is left as it was (the last good version keeps deciding).
    fn apply_authorizations(&mut self, updates: Vec<Named<Authorization>>, removed: Vec<String>) -> Vec<Rejected> {
        for name in removed {
            self.policies.remove(&name);
        }
        let mut rejected = Vec::new();
        for Named { name, resource } in updates {
            match Policy::from_resource(&name, resource) {
                Ok(policy) => {
                    self.policies.insert(policy);
                }
                Err(e) => rejected.push(Rejected::refused(name, e.to_string())),
            }
        }
        self.index.set_policies(self.policies.clone());
        rejected
    }
}

impl Applier for Mesh {
    fn apply(&mut self, delta: Delta) -> Vec<Rejected> {
        let rejected = match delta {
            Delta::Addresses { updates, removed } => self.apply_addresses(updates, removed),
            Delta::Authorizations { updates, removed } => self.apply_authorizations(updates, removed),
        };
        self.published.send_replace(self.index.clone());
        rejected
    }
}

/// Where member `m` serves service `key` at `addr` (target port `target` unless it maps one).
fn endpoint(m: &Member, key: &str, addr: SocketAddr, target: u16) -> Option<SocketAddr> {
    let mapped = m.ports.get(key)?.iter().find(|(sp, _)| *sp == addr.port()).map(|(_, tp)| *tp);
    let port = mapped.filter(|p| *p != 0).or(Some(target).filter(|p| *p != 0))?;
    let ip = m.ips.iter().find(|ip| ip.is_ipv4() == addr.is_ipv4())?;
    Some(SocketAddr::new(*ip, port))
}

fn ip_of(bytes: &[u8]) -> Result<IpAddr, String> {
    let ip = if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        IpAddr::from(v4)
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        IpAddr::from(v6)
    } else {
        return Err(format!("an address of {} bytes", bytes.len()));
    };
    Ok(ip.to_canonical())
}

fn port(p: u32) -> Result<u16, String> {
    u16::try_from(p).map_err(|_| format!("port {p} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::super::proto::istio::workload::{NetworkAddress, Port};
    use super::*;

    const NODE: &str = "n1";

    fn workload(name: &str, ip: [u8; 4], services: &[(&str, u32, u32)]) -> Named<Address> {
        let mut w = Workload {
            uid: format!("c//v1/Pod/ns/{name}"),
            name: name.into(),
            namespace: "ns".into(),
            addresses: vec![ip.to_vec()],
            service_account: format!("sa-{name}"),
            node: NODE.into(),
            tunnel_protocol: TunnelProtocol::Hbone as i32,
            ..Default::default()
        };
        for (key, sp, tp) in services {
            w.services.entry(key.to_string()).or_default().ports.push(Port { service_port: *sp, target_port: *tp });
        }
        Named { name: w.uid.clone(), resource: Address { r#type: Some(address::Type::Workload(w)) } }
    }

    fn service(hostname: &str, vip: [u8; 4], ports: &[(u32, u32)]) -> Named<Address> {
        let s = Service {
            name: hostname.split('.').next().unwrap_or_default().into(),
            namespace: "ns".into(),
            hostname: hostname.into(),
            addresses: vec![NetworkAddress { network: String::new(), address: vip.to_vec() }],
            ports: ports.iter().map(|(sp, tp)| Port { service_port: *sp, target_port: *tp }).collect(),
            ..Default::default()
        };
        Named { name: format!("ns/{hostname}"), resource: Address { r#type: Some(address::Type::Service(s)) } }
    }

    fn addrs(updates: Vec<Named<Address>>, removed: &[&str]) -> Delta {
        Delta::Addresses { updates, removed: removed.iter().map(|s| s.to_string()).collect() }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const WEB: &str = "ns/web.ns.svc.cluster.local";

    #[test]
    fn workloads_are_indexed_by_address_with_their_identity_and_tunnel() {
        let mut mesh = Mesh::new("cluster.local");
        let rx = mesh.subscribe();
        let mut plain = workload("b", [10, 0, 0, 2], &[]);
        if let Some(address::Type::Workload(w)) = plain.resource.r#type.as_mut() {
            w.tunnel_protocol = TunnelProtocol::None as i32;
            w.trust_domain = "other.td".into();
        }
        assert!(mesh.apply(addrs(vec![workload("a", [10, 0, 0, 1], &[]), plain], &[])).is_empty());
        let index = rx.borrow().clone();
        let a = index.get("10.0.0.1".parse().unwrap()).expect("a indexed");
        assert_eq!(a.identity.to_string(), "spiffe://cluster.local/ns/ns/sa/sa-a");
        assert_eq!((a.tunnel, a.node.as_str(), a.id.as_str()), (Tunnel::Hbone, NODE, "ns/a"));
        let b = index.get("10.0.0.2".parse().unwrap()).expect("b indexed");
        assert_eq!((b.tunnel, b.identity.trust_domain.as_str()), (Tunnel::Plain, "other.td"));
    }

    #[test]
    fn a_service_leads_to_its_healthy_members_at_their_target_ports() {
        let mut mesh = Mesh::new("cluster.local");
        let rx = mesh.subscribe();
        let delta = addrs(
            vec![
                service("web.ns.svc.cluster.local", [10, 96, 0, 1], &[(80, 8080)]),
                workload("c", [10, 0, 0, 3], &[(WEB, 80, 9090)]),
                workload("d", [10, 0, 0, 4], &[(WEB, 80, 0)]),
            ],
            &[],
        );
        assert!(mesh.apply(delta).is_empty());
        let index = rx.borrow().clone();
        let (svc, _) = index.resolve_service(sa("10.96.0.1:80")).expect("service");
        assert_eq!(svc.service, "ns/web");
        assert_eq!(svc.endpoints, [sa("10.0.0.3:9090"), sa("10.0.0.4:8080")]);
        // d goes unhealthy: only c is left; the service's target port changes: d's follows.
        let mut d = workload("d", [10, 0, 0, 4], &[(WEB, 80, 0)]);
        if let Some(address::Type::Workload(w)) = d.resource.r#type.as_mut() {
            w.status = WorkloadStatus::Unhealthy as i32;
        }
        mesh.apply(addrs(vec![d], &[]));
        assert_eq!(rx.borrow().service(sa("10.96.0.1:80")).unwrap().endpoints, [sa("10.0.0.3:9090")]);
        mesh.apply(addrs(
            vec![
                service("web.ns.svc.cluster.local", [10, 96, 0, 1], &[(80, 7070)]),
                workload("d", [10, 0, 0, 4], &[(WEB, 80, 0)]),
            ],
            &[],
        ));
        assert_eq!(
            rx.borrow().service(sa("10.96.0.1:80")).unwrap().endpoints,
            [sa("10.0.0.3:9090"), sa("10.0.0.4:7070")]
        );
        // Removals: the workload leaves the service and the index; the service goes whole.
        mesh.apply(addrs(vec![], &["c//v1/Pod/ns/c"]));
        assert!(rx.borrow().get("10.0.0.3".parse().unwrap()).is_none());
        assert_eq!(rx.borrow().service(sa("10.96.0.1:80")).unwrap().endpoints, [sa("10.0.0.4:7070")]);
        mesh.apply(addrs(vec![], &[WEB]));
        assert!(!rx.borrow().is_service(sa("10.96.0.1:80")));
        assert_eq!(mesh.counts(), (1, 0, 0));
    }

    #[test]
    fn a_bad_resource_is_refused_alone_and_leaves_what_was_held() {
        let mut mesh = Mesh::new("cluster.local");
        let rx = mesh.subscribe();
        mesh.apply(addrs(vec![workload("a", [10, 0, 0, 1], &[])], &[]));
        let mut bad = workload("a", [10, 0, 0, 9], &[]);
        if let Some(address::Type::Workload(w)) = bad.resource.r#type.as_mut() {
            w.addresses.push(vec![1, 2, 3]);
        }
        let mut evil = workload("e", [10, 0, 0, 5], &[]);
        if let Some(address::Type::Workload(w)) = evil.resource.r#type.as_mut() {
            w.service_account = "../admin".into();
        }
        let rejected = mesh.apply(addrs(vec![bad, evil, workload("f", [10, 0, 0, 6], &[])], &[]));
        let names: Vec<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["c//v1/Pod/ns/a", "c//v1/Pod/ns/e"]);
        assert!(rejected[0].to_string().contains("an address of 3 bytes"), "{}", rejected[0]);
        assert!(rejected[1].to_string().contains("service_account"), "{}", rejected[1]);
        let index = rx.borrow().clone();
        assert!(index.get("10.0.0.1".parse().unwrap()).is_some(), "a's old version is kept");
        assert!(index.get("10.0.0.9".parse().unwrap()).is_none());
        assert!(index.get("10.0.0.6".parse().unwrap()).is_some(), "the rest is applied");
    }

    #[test]
    fn an_address_taken_over_by_another_workload_stays_with_it() {
        let mut mesh = Mesh::new("cluster.local");
        let rx = mesh.subscribe();
        mesh.apply(addrs(vec![workload("old", [10, 0, 0, 1], &[])], &[]));
        mesh.apply(addrs(vec![workload("new", [10, 0, 0, 1], &[])], &[]));
        mesh.apply(addrs(vec![], &["c//v1/Pod/ns/old"]));
        assert_eq!(rx.borrow().get("10.0.0.1".parse().unwrap()).unwrap().id, "ns/new");
    }

    #[test]
    fn waypoints_are_marked() {
        let mut mesh = Mesh::new("cluster.local");
        let rx = mesh.subscribe();
        let mut s = service("web.ns.svc.cluster.local", [10, 96, 0, 1], &[(80, 8080)]);
        if let Some(address::Type::Service(svc)) = s.resource.r#type.as_mut() {
            svc.waypoint = Some(Default::default());
        }
        mesh.apply(addrs(vec![s], &[]));
        assert!(rx.borrow().service(sa("10.96.0.1:80")).unwrap().waypoint);
    }

    #[test]
    fn policies_reach_the_index_and_a_malformed_one_is_refused_alone() {
        use super::super::proto::istio::security::{Action, Scope};
        let mut mesh = Mesh::new("cluster.local");
        let rx = mesh.subscribe();
        let policy = |name: &str| Authorization {
            name: name.into(),
            namespace: "ns".into(),
            scope: Scope::Namespace as i32,
            action: Action::Deny as i32,
            ..Default::default()
        };
        let named = |key: &str, a: Authorization| Named { name: key.into(), resource: a };
        let bad = Authorization { scope: 42, ..policy("bad") };
        let rejected = mesh.apply(Delta::Authorizations {
            updates: vec![named("ns/deny", policy("deny")), named("ns/bad", bad)],
            removed: vec![],
        });
        assert_eq!(rejected.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["ns/bad"]);
        assert!(rx.borrow().policies().get("ns/deny").is_some());
        assert!(rx.borrow().policies().get("ns/bad").is_none());
        mesh.apply(Delta::Authorizations { updates: vec![], removed: vec!["ns/deny".into()] });
        assert!(rx.borrow().policies().is_empty());
    }
}
