//! What each interface of the node is to meshpath: the one place that tells a routed pod
//! interface from an uplink, a bridge from its ports, and which devices have no Ethernet
//! header. The daemon derives the datapath's interface flags from it and refuses a node it
//! cannot serve; `meshpath status` names it per interface.

use std::net::IpAddr;

use ipnet::IpNet;
use meshpath_common::interface::{IF_L3, IF_POD};

use crate::routing::Interface;

/// An interface's part in the node's wiring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Pods live behind it, routed (Calico, kindnet, Cilium's veths; also a tunnel whose
    /// address is from the pod networks): every source must route back through it.
    Pod,
    /// It carries an address of the node's own: other nodes and the world.
    Uplink,
    /// A bridge holding a pod-network address (flannel's and k3s's `cni0`: pods behind it
    /// use it as their gateway). Its pods' traffic with
    /// each other is switched at L2, where a capture mark does nothing, and the route to a
    /// pod names the bridge, not the pod's port: meshpath cannot serve it.
    PodBridge,
    /// A bridge or bond port, or a VLAN's parent: its traffic belongs to the device above.
    Port,
}

/// [`Role`] and link type of one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    pub role: Role,
    /// No Ethernet header (tun, WireGuard, IPIP): IP starts at offset 0.
    pub l3: bool,
}

impl Topology {
    /// What `i` is: pod-facing unless it carries an address of the node's own (a
    /// global address outside `pod_cidrs`).
    pub fn of(i: &Interface, pod_cidrs: &[IpNet]) -> Self {
        let role = if i.lower {
            Role::Port
        } else if i.bridge && has_pod_address(i, pod_cidrs) {
            Role::PodBridge
        } else if i.bridge || has_node_address(i, pod_cidrs) {
            // Other bridges (docker0, a VM bridge without addresses) are the node's.
            Role::Uplink
        } else {
            Role::Pod
        };
        Self { role, l3: !i.ethernet }
    }

    /// The datapath's flags for it (the workload bit is the map pass's).
    pub fn flags(self) -> u32 {
        let pod = if self.role == Role::Pod { IF_POD } else { 0 };
        pod | if self.l3 { IF_L3 } else { 0 }
    }

    pub fn name(self) -> &'static str {
        match (self.role, self.l3) {
            (Role::Pod, false) => "routed pod interface",
            (Role::Pod, true) => "routed pod interface, no Ethernet header",
            (Role::Uplink, false) => "uplink",
            (Role::Uplink, true) => "uplink, no Ethernet header",
            (Role::PodBridge, _) => "bridge with pods (not supported)",
            (Role::Port, _) => "bridge or bond port",
        }
    }
}

/// A gateway address of the pod networks: what a bridge CNI puts on its bridge.
fn has_pod_address(i: &Interface, pod_cidrs: &[IpNet]) -> bool {
    i.addresses.iter().any(|a| pod_cidrs.iter().any(|n| n.contains(&a.to_canonical())))
}

fn has_node_address(i: &Interface, pod_cidrs: &[IpNet]) -> bool {
    i.addresses.iter().any(|a| {
        let a = a.to_canonical();
        let link_scope = match a {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        !link_scope && !a.is_loopback() && !pod_cidrs.iter().any(|n| n.contains(&a))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(addresses: &[&str], ethernet: bool) -> Interface {
        Interface {
            index: 3,
            name: "x".into(),
            loopback: false,
            up: true,
            ethernet,
            addresses: addresses.iter().map(|a| a.parse().expect("an IP")).collect(),
            lower: false,
            bridge: false,
        }
    }

    fn role(i: &Interface, pods: &[IpNet]) -> Role {
        Topology::of(i, pods).role
    }

    #[test]
    fn uplinks_carry_node_addresses_and_pod_interfaces_do_not() {
        let pods: Vec<IpNet> = vec!["10.244.0.0/16".parse().expect("a net")];
        // A routed veth: only link-local gateway addresses.
        assert_eq!(Topology::of(&iface(&["169.254.1.1", "fe80::1"], true), &pods).flags(), IF_POD);
        assert_eq!(role(&iface(&[], true), &pods), Role::Pod);
        // The uplink, with the node's address.
        assert_eq!(Topology::of(&iface(&["192.168.250.1", "fe80::2"], true), &pods).flags(), 0);
        // A tunnel with a pod-network address (Calico's tunl0) is still pod-facing...
        assert_eq!(role(&iface(&["10.244.1.1"], true), &pods), Role::Pod);
        // ...but without pod networks to tell, any global address makes an uplink.
        assert_eq!(role(&iface(&["10.244.1.1"], true), &[]), Role::Uplink);
        // A tun or WireGuard device has no Ethernet header.
        assert_eq!(Topology::of(&iface(&["192.168.9.1"], false), &pods).flags(), IF_L3);
        // Bridge ports, bond slaves and VLAN parents are no pod's.
        let port = Interface { lower: true, ..iface(&[], true) };
        assert_eq!((role(&port, &pods), Topology::of(&port, &pods).flags()), (Role::Port, 0));
    }

    #[test]
    fn a_bridge_with_pods_behind_it_is_told_from_one_with_the_nodes_address() {
        let pods: Vec<IpNet> = vec!["10.244.0.0/16".parse().expect("a net")];
        let cni0 = Interface { bridge: true, ..iface(&["10.244.1.1", "fe80::1"], true) };
        assert_eq!(role(&cni0, &pods), Role::PodBridge);
        assert_eq!(Topology::of(&cni0, &pods).flags(), 0, "never flagged pod-facing");
        // docker0 (an address outside the pod networks) is the node's, and so is a bridge
        // with no address at all (VMs behind it, say).
        let docker0 = Interface { bridge: true, ..iface(&["172.17.0.1"], true) };
        assert_eq!(role(&docker0, &pods), Role::Uplink);
        assert_eq!(role(&Interface { bridge: true, ..iface(&[], true) }, &pods), Role::Uplink);
        // Without pod networks to tell, cni0 looks like docker0.
        assert_eq!(role(&cni0, &[]), Role::Uplink);
    }
}
