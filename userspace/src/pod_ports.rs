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
//! Namespaces are found where `ip netns`, containerd and CRI-O pin them (`--netns-dir`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::routing::{Interface, Routing, RoutingError};

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
}

/// One pod-side address and the host-side port its interface is the peer of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSide {
    pub ip: IpAddr,
    /// The pod interface's ifindex, inside its namespace.
    pub pod_if: u32,
    /// Its veth peer's ifindex in the namespace that holds the peer.
    pub peer: u32,
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
    /// and its own peer is the claiming interface.
    pub fn confirmed(seen: &[PodSide], host: &[Interface]) -> Self {
        let mut ports: BTreeMap<IpAddr, BTreeSet<u32>> = BTreeMap::new();
        for s in seen {
            let confirms = host.iter().any(|h| h.index == s.peer && h.peer == Some(s.pod_if));
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

/// Reads every namespace under `dir`: the addresses on its veths whose peer lives in another
/// namespace. Runs on a thread of its own, which enters each namespace in turn (a thread of
/// the runtime's pool must never change namespace).
pub async fn scan(dir: &Path) -> Result<Vec<PodSide>, PodPortsError> {
    let dir = dir.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pod-netns-scan".into())
        .spawn(move || {
            let _ = tx.send(scan_blocking(&dir));
        })
        .map_err(PodPortsError::Thread)?;
    rx.await.map_err(|_| PodPortsError::Panicked)?
}

fn scan_blocking(dir: &Path) -> Result<Vec<PodSide>, PodPortsError> {
    let read = |source| PodPortsError::ReadDir { dir: dir.to_owned(), source };
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(PodPortsError::Thread)?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        // A namespace can go between listing and opening (pod churn): the next pass sees it.
        match rt.block_on(read_namespace(&path)) {
            Ok(ifaces) => out.extend(pod_sides(&ifaces, &path)),
            Err(e) => tracing::debug!(netns = %path.display(), "skipped: {e}"),
        }
    }
    Ok(out)
}

async fn read_namespace(path: &Path) -> Result<Vec<Interface>, PodPortsError> {
    let enter = |source| PodPortsError::Enter { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(enter)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| enter(e.into()))?;
    // The netlink socket belongs to the namespace the thread is in when it is opened.
    let routing = |source| PodPortsError::Routing { path: path.to_owned(), source };
    Routing::connect().map_err(routing)?.interfaces().await.map_err(routing)
}

/// The addresses a pod claims: global ones on its veths that lead to another namespace.
fn pod_sides(ifaces: &[Interface], netns: &Path) -> Vec<PodSide> {
    let global = |ip: &IpAddr| match ip.to_canonical() {
        IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_unicast_link_local() && !v6.is_loopback(),
    };
    ifaces
        .iter()
        .filter_map(|i| i.peer.map(|peer| (i, peer)))
        .flat_map(|(i, peer)| {
            i.addresses.iter().filter(|a| global(a)).map(move |ip| PodSide {
                ip: ip.to_canonical(),
                pod_if: i.index,
                peer,
                netns: netns.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn veth(index: u32, peer: u32, addresses: &[&str]) -> Interface {
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
            peer: Some(peer),
            mac: None,
        }
    }

    #[test]
    fn a_pods_global_addresses_are_claimed_behind_its_peer() {
        let pod = [veth(2, 7, &["10.244.1.10", "fe80::1", "fd00:244:1::10"])];
        let sides = pod_sides(&pod, Path::new("/run/netns/a"));
        let ips: Vec<String> = sides.iter().map(|s| s.ip.to_string()).collect();
        assert_eq!(ips, ["10.244.1.10", "fd00:244:1::10"], "link-local addresses carry no pod");
        assert!(sides.iter().all(|s| s.peer == 7 && s.pod_if == 2));
        // An interface without a peer elsewhere (lo, a device of the pod's own) claims nothing.
        let own = Interface { peer: None, ..veth(3, 0, &["10.244.1.11"]) };
        assert!(pod_sides(&[own], Path::new("x")).is_empty());
    }

    #[test]
    fn only_claims_the_host_confirms_count_and_a_contested_address_is_held_behind_none() {
        let side = |ip: &str, pod_if, peer| PodSide { ip: ip.parse().expect("an IP"), pod_if, peer, netns: "x".into() };
        let host = [veth(7, 2, &[]), veth(8, 2, &[]), veth(9, 5, &[])];
        let claims = PortClaims::confirmed(
            &[
                side("10.244.1.10", 2, 7),
                // Another namespace's veth whose index and peer do not match the host's.
                side("10.244.1.12", 4, 9),
                // Two pods both holding .11.
                side("10.244.1.11", 2, 7),
                side("10.244.1.11", 2, 8),
            ],
            &host,
        );
        let ip = |s: &str| s.parse::<IpAddr>().expect("an IP");
        assert_eq!(claims.get(&ip("10.244.1.10")), Some(&Claim::Port(7)));
        assert_eq!(claims.get(&ip("10.244.1.12")), None, "not confirmed by port 9's own peer");
        assert_eq!(claims.get(&ip("10.244.1.11")), Some(&Claim::Contested([7, 8].into())));
    }
}
