//! Which port of a pod bridge each pod address lives behind, read from the pods' own
//! network namespaces.
//!
//! Behind a bridge the route to a pod names the bridge, not its port, and the bridge's
//! forwarding and neighbour tables are learnt from frames any pod can forge (a pod needs
//! no more than the default NET_RAW to answer ARP for another's address). The pod's network
//! namespace is what the CNI set up: its interface holds the pod's address, and that
//! interface's veth peer is the host-side port. Changing those takes NET_ADMIN inside the
//! pod; a pod with it can at most make an address claimed twice, which holds it behind no
//! port (its traffic is dropped as spoofed) instead of moving it to the claimant.
//!
//! Namespaces are found where `ip netns`, containerd and CRI-O pin them (`--netns-dir`). That
//! directory holds more than this node's pods (a VM's namespace, another runtime's, another
//! node's on a shared kernel), with the same addresses on interfaces of the same indexes,
//! since indexes repeat from one namespace to the next. So a claim counts only when it is
//! proven to be one of the node's own ports' peers, by namespace as well as by index: the
//! port names its peer's namespace by the id the node's namespace gives it
//! (IFLA_LINK_NETNSID), and the node's namespace tells which id it gives each file in the
//! directory (RTM_GETNSID). A namespace no port leads to is not even entered.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use std::os::fd::AsFd as _;

use crate::routing::{Interface, Peer, Routing, RoutingError};

#[derive(Debug, thiserror::Error)]
pub enum PodPortsError {
    #[error("reading {}: {source}", dir.display())]
    ReadDir { dir: PathBuf, source: std::io::Error },
    #[error("starting the namespace scan: {0}")]
    Thread(std::io::Error),
    #[error("the namespace scan thread panicked")]
    Panicked,
    #[error("entering {}: {source}", path.display())]
    Enter { path: PathBuf, source: std::io::Error },
    #[error("in {}: {source}", path.display())]
    Routing { path: PathBuf, source: RoutingError },
    #[error("in the node's namespace: {0}")]
    Node(RoutingError),
}

/// One pod-side address and the host-side port its interface is the peer of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSide {
    pub ip: IpAddr,
    /// The pod interface's ifindex, inside its namespace.
    pub pod_if: u32,
    /// Its veth peer's ifindex in the namespace that holds the peer.
    pub peer: u32,
    /// The id the node's namespace gives the namespace it was read in.
    pub netns_id: i32,
    /// The namespace file it was read from, for logs.
    pub netns: PathBuf,
}

/// Where a pod address lives, as the namespaces tell it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Behind this host-side port (ifindex), and no other.
    Port(u32),
    /// Claimed behind several ports: held behind none.
    Contested(BTreeSet<u32>),
}

/// The claims of one scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortClaims {
    by_ip: BTreeMap<IpAddr, Claim>,
}

impl PortClaims {
    /// Claims from `seen` that the host side confirms: the port is one of `host`'s veths,
    /// and its own peer is the claiming interface, in the claiming namespace (an index
    /// alone names an interface in every namespace).
    pub fn confirmed(seen: &[PodSide], host: &[Interface]) -> Self {
        let mut ports: BTreeMap<IpAddr, BTreeSet<u32>> = BTreeMap::new();
        for s in seen {
            let claimant = Peer { index: s.pod_if, netns: s.netns_id };
            let confirms = host.iter().any(|h| h.index == s.peer && h.peer == Some(claimant));
            if confirms {
                ports.entry(s.ip.to_canonical()).or_default().insert(s.peer);
            }
        }
        let by_ip = ports
            .into_iter()
            .map(|(ip, set)| {
                let claim = match set.first() {
                    Some(&one) if set.len() == 1 => Claim::Port(one),
                    _ => Claim::Contested(set),
                };
                (ip, claim)
            })
            .collect();
        Self { by_ip }
    }

    pub fn get(&self, ip: &IpAddr) -> Option<&Claim> {
        self.by_ip.get(ip)
    }
}

/// Reads the namespaces under `dir` that the node's veths (in `host`, the node namespace's
/// interfaces) lead to: the addresses on their veths whose peer lives in another namespace.
/// Runs on a thread of its own, which enters each namespace in turn (a thread of the
/// runtime's pool must never change namespace); the caller must be in the node's namespace.
pub async fn scan(dir: &Path, host: &[Interface]) -> Result<Vec<PodSide>, PodPortsError> {
    let (dir, wanted) = (dir.to_owned(), peer_namespaces(host));
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pod-netns-scan".into())
        .spawn(move || {
            let _ = tx.send(scan_blocking(&dir, &wanted));
        })
        .map_err(PodPortsError::Thread)?;
    rx.await.map_err(|_| PodPortsError::Panicked)?
}

/// The ids of the namespaces the node's veths lead to: only claims read there can be confirmed.
fn peer_namespaces(host: &[Interface]) -> BTreeSet<i32> {
    host.iter().filter_map(|h| h.peer.map(|p| p.netns)).collect()
}

fn scan_blocking(dir: &Path, wanted: &BTreeSet<i32>) -> Result<Vec<PodSide>, PodPortsError> {
    let read = |source| PodPortsError::ReadDir { dir: dir.to_owned(), source };
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(PodPortsError::Thread)?;
    // Opened before the thread enters any other namespace, so it stays in the node's (a
    // netlink socket belongs to the namespace it was opened in): the ids it tells are the
    // ones the node's ports name their peers' namespaces by.
    let node = rt.block_on(async { Routing::connect() }).map_err(PodPortsError::Node)?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        // A namespace can go between listing and opening (pod churn): the next pass sees it.
        match rt.block_on(read_if_a_port_leads_there(&node, &path, wanted)) {
            Ok(Some((id, ifaces))) => out.extend(pod_sides(&ifaces, id, &path)),
            Ok(None) => tracing::trace!(netns = %path.display(), "skipped: no port of this node leads there"),
            Err(e) => tracing::debug!(netns = %path.display(), "skipped: {e}"),
        }
    }
    Ok(out)
}

/// The id `node`'s namespace gives the namespace at `path` and that namespace's interfaces,
/// if that id is `wanted`; otherwise the namespace is not entered.
async fn read_if_a_port_leads_there(
    node: &Routing,
    path: &Path,
    wanted: &BTreeSet<i32>,
) -> Result<Option<(i32, Vec<Interface>)>, PodPortsError> {
    let enter = |source| PodPortsError::Enter { path: path.to_owned(), source };
    let routing = |source| PodPortsError::Routing { path: path.to_owned(), source };
    // One open file for both the id and the entering: the path may be re-pinned meanwhile.
    let file = std::fs::File::open(path).map_err(enter)?;
    let Some(id) = node.nsid_of(file.as_fd()).await.map_err(routing)?.filter(|id| wanted.contains(id)) else {
        return Ok(None);
    };
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| enter(e.into()))?;
    // The netlink socket belongs to the namespace the thread is in when it is opened.
    let ifaces = Routing::connect().map_err(routing)?.interfaces().await.map_err(routing)?;
    Ok(Some((id, ifaces)))
}

/// The addresses a pod claims: global ones on its veths that lead to another namespace.
/// `netns_id` is the id the node's namespace gives the pod's.
fn pod_sides(ifaces: &[Interface], netns_id: i32, netns: &Path) -> Vec<PodSide> {
    let global = |ip: &IpAddr| match ip.to_canonical() {
        IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_unicast_link_local() && !v6.is_loopback(),
    };
    ifaces
        .iter()
        .filter_map(|i| i.peer.map(|peer| (i, peer.index)))
        .flat_map(|(i, peer)| {
            i.addresses.iter().filter(|a| global(a)).map(move |ip| PodSide {
                ip: ip.to_canonical(),
                pod_if: i.index,
                peer,
                netns_id,
                netns: netns.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A veth whose peer is ifindex `peer` in the namespace the one it is in numbers `netns`.
    fn veth(index: u32, (peer, netns): (u32, i32), addresses: &[&str]) -> Interface {
        Interface {
            index,
            name: format!("if{index}"),
            loopback: false,
            up: true,
            ethernet: true,
            addresses: addresses.iter().map(|a| a.parse().expect("an IP")).collect(),
            lower: false,
            bridge: false,
            master: None,
            peer: Some(Peer { index: peer, netns }),
            mac: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an IP")
    }

    /// What a pod's interface `pod_if` (peer `peer`) in the namespace the node numbers
    /// `netns_id` claims.
    fn side(addr: &str, pod_if: u32, peer: u32, netns_id: i32) -> PodSide {
        PodSide { ip: ip(addr), pod_if, peer, netns_id, netns: format!("/run/netns/{netns_id}").into() }
    }

    #[test]
    fn a_pods_global_addresses_are_claimed_behind_its_peer() {
        let pod = [veth(2, (7, 0), &["10.244.1.10", "fe80::1", "fd00:244:1::10"])];
        let sides = pod_sides(&pod, 5, Path::new("/run/netns/a"));
        let ips: Vec<String> = sides.iter().map(|s| s.ip.to_string()).collect();
        assert_eq!(ips, ["10.244.1.10", "fd00:244:1::10"], "link-local addresses carry no pod");
        assert!(sides.iter().all(|s| s.peer == 7 && s.pod_if == 2 && s.netns_id == 5));
        // An interface without a peer elsewhere (lo, a device of the pod's own) claims nothing.
        let own = Interface { peer: None, ..veth(3, (0, 0), &["10.244.1.11"]) };
        assert!(pod_sides(&[own], 5, Path::new("x")).is_empty());
    }

    #[test]
    fn only_claims_the_host_confirms_count_and_a_contested_address_is_held_behind_none() {
        // Ports 7 and 8 lead to interface 2 of namespaces 1 and 2; port 9 to interface 5 of 3.
        let host = [veth(7, (2, 1), &[]), veth(8, (2, 2), &[]), veth(9, (5, 3), &[])];
        let claims = PortClaims::confirmed(
            &[
                side("10.244.1.10", 2, 7, 1),
                // Another namespace's veth whose index and peer do not match the host's.
                side("10.244.1.12", 4, 9, 3),
                // Two of the node's pods both holding .11.
                side("10.244.1.11", 2, 7, 1),
                side("10.244.1.11", 2, 8, 2),
            ],
            &host,
        );
        assert_eq!(claims.get(&ip("10.244.1.10")), Some(&Claim::Port(7)));
        assert_eq!(claims.get(&ip("10.244.1.12")), None, "not confirmed by port 9's own peer");
        assert_eq!(claims.get(&ip("10.244.1.11")), Some(&Claim::Contested([7, 8].into())));
    }

    /// Indexes repeat from one namespace to the next: a namespace that is not a port's peer
    /// (another node's pod on the same kernel, a VM) holding a pod's address on an interface
    /// of the right index, with a peer of the right index, claims nothing.
    #[test]
    fn a_claim_from_another_namespace_with_the_same_indexes_is_not_confirmed() {
        let host = [veth(5, (2, 1), &[]), veth(7, (2, 2), &[])];
        let claims = PortClaims::confirmed(
            &[
                side("10.244.1.12", 2, 7, 2),
                // Elsewhere, .12 behind an interface 2 whose peer is an index 5 (not port 5's
                // peer's namespace, 1, nor any the node numbers).
                side("10.244.1.12", 2, 5, 9),
                // Namespace 1's pod holds .10 on interface 2; elsewhere .10 claims port 7.
                side("10.244.1.10", 2, 5, 1),
                side("10.244.1.10", 2, 7, 4),
            ],
            &host,
        );
        assert_eq!(claims.get(&ip("10.244.1.12")), Some(&Claim::Port(7)));
        assert_eq!(claims.get(&ip("10.244.1.10")), Some(&Claim::Port(5)));
    }

    #[test]
    fn only_namespaces_the_nodes_veths_lead_to_are_read() {
        let lo = Interface { peer: None, loopback: true, ..veth(1, (0, 0), &["127.0.0.1"]) };
        let host = [lo, veth(5, (2, 1), &[]), veth(6, (2, 4), &[]), veth(7, (3, 4), &[])];
        assert_eq!(peer_namespaces(&host), [1, 4].into());
        assert!(peer_namespaces(&[]).is_empty());
    }
}
