//! What the datapath knows about an interface it is attached to: the values of
//! [`crate::names::MAP_INTERFACES`], keyed by ifindex.

/// An enrolled workload lives behind this interface: its TCP must carry one of the
/// workload's enrolled IPs.
pub const IF_WORKLOAD: u32 = 1 << 0;
/// Pods sit behind this interface (it carries no address of the node's own): every source
/// arriving on it must route back through it (or through its bridge, for a bridge port).
pub const IF_POD: u32 = 1 << 1;
/// The interface has no link-layer header: IP starts at offset 0 (tun, WireGuard, IPIP).
pub const IF_L3: u32 = 1 << 2;
/// A port of a bridge with pods behind it (flannel's `cni0`): the node routes its traffic
/// from the bridge, and the bridge switches a frame addressed to another pod at L2, so a
/// captured frame is readdressed to the bridge to reach the node's stack.
pub const IF_BRIDGE_PORT: u32 = 1 << 3;

/// One interface's entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct InterfaceValue {
    /// `IF_*` bits.
    pub flags: u32,
    /// The bridge's ifindex for a bridge port ([`IF_BRIDGE_PORT`]), else 0.
    pub bridge: u32,
    /// The bridge's MAC address for a bridge port, else zeros.
    pub bridge_mac: [u8; 6],
    /// Keeps the value 16 bytes with no implicit padding.
    pub _pad: [u8; 2],
}

impl InterfaceValue {
    pub const fn new(flags: u32) -> Self {
        Self { flags, bridge: 0, bridge_mac: [0; 6], _pad: [0; 2] }
    }

    /// A port of bridge `bridge` (MAC `mac`), with `flags` besides [`IF_BRIDGE_PORT`].
    pub const fn bridge_port(flags: u32, bridge: u32, mac: [u8; 6]) -> Self {
        Self { flags: flags | IF_BRIDGE_PORT, bridge, bridge_mac: mac, _pad: [0; 2] }
    }

    /// The device the node's stack sees this interface's packets arrive on, and routes
    /// them back through: the bridge for a bridge port, else the interface itself.
    #[inline(always)]
    pub const fn routed_via(&self, ifindex: u32) -> u32 {
        if self.flags & IF_BRIDGE_PORT != 0 && self.bridge != 0 { self.bridge } else { ifindex }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout_has_no_implicit_padding_and_flags_are_distinct() {
        assert_eq!(size_of::<InterfaceValue>(), 16);
        assert_eq!(offset_of!(InterfaceValue, flags), 0);
        assert_eq!(offset_of!(InterfaceValue, bridge), 4);
        assert_eq!(offset_of!(InterfaceValue, bridge_mac), 8);
        assert_eq!(offset_of!(InterfaceValue, _pad), 14);
        let all = [IF_WORKLOAD, IF_POD, IF_L3, IF_BRIDGE_PORT];
        assert_eq!(all.iter().fold(0, |acc, f| acc | f).count_ones(), all.len() as u32);
    }

    #[test]
    fn a_bridge_port_is_routed_via_its_bridge() {
        let port = InterfaceValue::bridge_port(IF_POD, 4, [2, 0, 0, 0, 0, 1]);
        assert_eq!(port.routed_via(9), 4);
        assert_eq!(InterfaceValue::new(IF_POD).routed_via(9), 9);
    }
}
