//! What each interface of the node is to meshpath: the one place that tells a routed pod
//! interface from an uplink, a pod bridge from its ports, and which devices have no Ethernet
//! header. The daemon derives the datapath's interface values from it; `meshpath status`
//! names it per interface.

use std::net::IpAddr;

use ipnet::IpNet;
use meshpath_common::InterfaceValue;
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
    /// use it as their gateway). The classifier runs on its ports, not on it: what reaches
    /// the bridge itself was classified on the port it came in on.
    PodBridge,
    /// A port of a pod bridge: one pod's veth. Its pod's traffic is classified there, before
    /// the bridge switches it; the route to the pod names the bridge.
    PodPort { bridge: u32, mac: [u8; 6] },
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
    /// What `i` is among `ifaces` (the node's interfaces, for its master): pod-facing unless
    /// it carries an address of the node's own (a global address outside `pod_cidrs`).
    pub fn of(i: &Interface, ifaces: &[Interface], pod_cidrs: &[IpNet]) -> Self {
        let pod_bridge = |b: &Interface| b.bridge && has_pod_address(b, pod_cidrs);
        let master = i.master.and_then(|m| ifaces.iter().find(|b| b.index == m));
        let role = if let Some(b) = master.filter(|b| pod_bridge(b)) {
            // A bridge without a MAC is no Ethernet bridge: a frame cannot be readdressed.
            match b.mac {
                Some(mac) => Role::PodPort { bridge: b.index, mac },
                None => Role::Port,
            }
        } else if i.lower {
            Role::Port
        } else if pod_bridge(i) {
            Role::PodBridge
        } else if i.bridge || has_node_address(i, pod_cidrs) {
            // Other bridges (docker0, a VM bridge without addresses) are the node's.
            Role::Uplink
        } else {
            Role::Pod
        };
        Self { role, l3: !i.ethernet }
    }

    /// The datapath's value for it (the workload bit is the map pass's to add).
    pub fn value(self) -> InterfaceValue {
        let l3 = if self.l3 { IF_L3 } else { 0 };
        match self.role {
            Role::Pod => InterfaceValue::new(IF_POD | l3),
            Role::PodPort { bridge, mac } => InterfaceValue::bridge_port(IF_POD | l3, bridge, mac),
            Role::Uplink | Role::PodBridge | Role::Port => InterfaceValue::new(l3),
        }
    }

    /// Whether the classifier runs on it: not on a pod bridge, whose frames were classified
    /// on the port they came in on (and would look spoofed there).
    pub fn classified(self) -> bool {
        self.role != Role::PodBridge
    }

    pub fn name(self) -> &'static str {
        match (self.role, self.l3) {
            (Role::Pod, false) => "routed pod interface",
            (Role::Pod, true) => "routed pod interface, no Ethernet header",
            (Role::PodPort { .. }, _) => "bridged pod interface",
            (Role::Uplink, false) => "uplink",
            (Role::Uplink, true) => "uplink, no Ethernet header",
            (Role::PodBridge, _) => "bridge with pods (classified on its ports)",
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
    use crate::routing::Peer;

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
            master: None,
            peer: None,
            mac: Some([2, 0, 0, 0, 0, 3]),
        }
    }

    fn role(i: &Interface, pods: &[IpNet]) -> Role {
        Topology::of(i, &[], pods).role
    }

    fn flags(i: &Interface, pods: &[IpNet]) -> u32 {
        Topology::of(i, &[], pods).value().flags
    }

    #[test]
    fn uplinks_carry_node_addresses_and_pod_interfaces_do_not() {
        let pods: Vec<IpNet> = vec!["10.244.0.0/16".parse().expect("a net")];
        // A routed veth: only link-local gateway addresses.
        assert_eq!(flags(&iface(&["169.254.1.1", "fe80::1"], true), &pods), IF_POD);
        assert_eq!(role(&iface(&[], true), &pods), Role::Pod);
        // The uplink, with the node's address.
        assert_eq!(flags(&iface(&["192.168.250.1", "fe80::2"], true), &pods), 0);
        // A tunnel with a pod-network address (Calico's tunl0) is still pod-facing...
        assert_eq!(role(&iface(&["10.244.1.1"], true), &pods), Role::Pod);
        // ...but without pod networks to tell, any global address makes an uplink.
        assert_eq!(role(&iface(&["10.244.1.1"], true), &[]), Role::Uplink);
        // A tun or WireGuard device has no Ethernet header.
        assert_eq!(flags(&iface(&["192.168.9.1"], false), &pods), IF_L3);
        // Bridge ports, bond slaves and VLAN parents are no pod's.
        let port = Interface { lower: true, ..iface(&[], true) };
        assert_eq!((role(&port, &pods), flags(&port, &pods)), (Role::Port, 0));
    }

    #[test]
    fn a_bridge_with_pods_behind_it_is_told_from_one_with_the_nodes_address() {
        let pods: Vec<IpNet> = vec!["10.244.0.0/16".parse().expect("a net")];
        let cni0 = Interface { bridge: true, ..iface(&["10.244.1.1", "fe80::1"], true) };
        assert_eq!(role(&cni0, &pods), Role::PodBridge);
        assert_eq!(flags(&cni0, &pods), 0, "never flagged pod-facing");
        assert!(!Topology::of(&cni0, &[], &pods).classified(), "classified on its ports instead");
        // Its ports are pod-facing, routed via the bridge, and readdress to its MAC.
        let cni0 = Interface { index: 4, ..cni0 };
        let veth = Interface {
            index: 9,
            lower: true,
            master: Some(4),
            peer: Some(Peer { index: 2, netns: 0 }),
            ..iface(&[], true)
        };
        let port = Topology::of(&veth, std::slice::from_ref(&cni0), &pods);
        assert_eq!(port.role, Role::PodPort { bridge: 4, mac: [2, 0, 0, 0, 0, 3] });
        assert_eq!(port.value().routed_via(9), 4);
        assert_eq!(port.value().flags, IF_POD | meshpath_common::interface::IF_BRIDGE_PORT);
        // A port of docker0 is no pod's.
        let docker0 = Interface { index: 4, bridge: true, ..iface(&["172.17.0.1"], true) };
        assert_eq!(Topology::of(&veth, &[docker0], &pods).role, Role::Port);
        // docker0 (an address outside the pod networks) is the node's, and so is a bridge
        // with no address at all (VMs behind it, say).
        let docker0 = Interface { bridge: true, ..iface(&["172.17.0.1"], true) };
        assert_eq!(role(&docker0, &pods), Role::Uplink);
        assert_eq!(role(&Interface { bridge: true, ..iface(&[], true) }, &pods), Role::Uplink);
        // Without pod networks to tell, cni0 looks like docker0.
        assert_eq!(role(&cni0, &[]), Role::Uplink);
    }
}
