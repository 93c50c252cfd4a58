//! What the datapath knows about an interface it is attached to: the values of
//! [`crate::names::MAP_INTERFACES`], keyed by ifindex.

/// An enrolled workload lives behind this interface: its TCP must carry one of the
/// workload's enrolled IPs.
pub const IF_WORKLOAD: u32 = 1 << 0;
/// Pods sit behind this interface (it carries no address of the node's own): every source
/// arriving on it must route back through it.
pub const IF_POD: u32 = 1 << 1;
/// The interface has no link-layer header: IP starts at offset 0 (tun, WireGuard, IPIP).
pub const IF_L3: u32 = 1 << 2;

/// One interface's entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct InterfaceValue {
    /// `IF_*` bits.
    pub flags: u32,
    /// Reserved; keeps the value 8 bytes with no implicit padding.
    pub _reserved: u32,
}

impl InterfaceValue {
    pub const fn new(flags: u32) -> Self {
        Self { flags, _reserved: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout_has_no_implicit_padding_and_flags_are_distinct() {
        assert_eq!(size_of::<InterfaceValue>(), 8);
        assert_eq!(offset_of!(InterfaceValue, flags), 0);
        assert_eq!(IF_WORKLOAD & IF_POD, 0);
        assert_eq!((IF_WORKLOAD | IF_POD) & IF_L3, 0);
    }
}
