//! Keys and values of the enrolled-workload map.

/// An IP address as the workload map stores it: 16 bytes, IPv4 in its IPv4-mapped IPv6
/// form (`::ffff:a.b.c.d`) so one map serves both families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct WorkloadKey {
    pub addr: [u8; 16],
}

impl WorkloadKey {
    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self { addr }
    }

    pub const fn from_v6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }

    /// The IPv4 octets if this key holds an IPv4-mapped address.
    pub fn as_v4(&self) -> Option<[u8; 4]> {
        let a = &self.addr;
        if a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff {
            Some([a[12], a[13], a[14], a[15]])
        } else {
            None
        }
    }
}

impl WorkloadKey {
    /// Link-local, unspecified or multicast: an address with no route to it that carries no
    /// identity (neighbour discovery, DHCP).
    pub fn is_link_scope(&self) -> bool {
        match self.as_v4() {
            Some([169, 254, ..]) | Some([0, 0, 0, 0]) | Some([255, 255, 255, 255]) => true,
            // Multicast; 240/4 ("class E") is unicast, and some clusters route pods there.
            Some([a, ..]) => (224..=239).contains(&a),
            None => {
                let a = &self.addr;
                (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || a[0] == 0xff || a.iter().all(|b| *b == 0)
            }
        }
    }
}

impl From<core::net::IpAddr> for WorkloadKey {
    fn from(ip: core::net::IpAddr) -> Self {
        match ip {
            core::net::IpAddr::V4(v4) => Self::from_v4(v4.octets()),
            // A v4-mapped v6 address is the same workload as its v4 form: keep one key.
            core::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::from_v4(v4.octets()),
                None => Self::from_v6(v6.octets()),
            },
        }
    }
}

impl From<WorkloadKey> for core::net::IpAddr {
    fn from(key: WorkloadKey) -> Self {
        match key.as_v4() {
            Some(o) => core::net::IpAddr::V4(core::net::Ipv4Addr::from(o)),
            None => core::net::IpAddr::V6(core::net::Ipv6Addr::from(key.addr)),
        }
    }
}

/// What the datapath knows about an enrolled workload IP on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct WorkloadValue {
    /// Index of the host-side interface the workload lives behind (anti-spoofing).
    pub ifindex: u32,
    /// Reserved for flags; keeps the value 8-byte sized with no implicit padding.
    pub _reserved: u32,
}

impl WorkloadValue {
    pub const fn new(ifindex: u32) -> Self {
        Self { ifindex, _reserved: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn layout_has_no_implicit_padding() {
        assert_eq!(size_of::<WorkloadKey>(), 16);
        assert_eq!(align_of::<WorkloadKey>(), 1);
        assert_eq!(size_of::<WorkloadValue>(), 8);
        assert_eq!(offset_of!(WorkloadValue, ifindex), 0);
        assert_eq!(offset_of!(WorkloadValue, _reserved), 4);
    }

    #[test]
    fn ipv4_is_stored_v4_mapped() {
        let k = WorkloadKey::from(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10)));
        assert_eq!(k.addr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 244, 1, 10]);
        assert_eq!(IpAddr::from(k), IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10)));
    }

    #[test]
    fn mapped_v6_and_v4_are_one_key() {
        let v4 = Ipv4Addr::new(192, 0, 2, 7);
        assert_eq!(WorkloadKey::from(IpAddr::V4(v4)), WorkloadKey::from(IpAddr::V6(v4.to_ipv6_mapped())));
    }

    #[test]
    fn link_scope_addresses_are_recognised() {
        for s in ["169.254.1.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "fe80::1", "ff02::1", "::"] {
            assert!(WorkloadKey::from(s.parse::<IpAddr>().unwrap()).is_link_scope(), "{s}");
        }
        for s in ["10.244.1.10", "192.168.1.1", "fd00:244:1::10", "2001:db8::1", "240.0.1.2"] {
            assert!(!WorkloadKey::from(s.parse::<IpAddr>().unwrap()).is_link_scope(), "{s}");
        }
    }

    #[test]
    fn ipv6_round_trips() {
        let v6: Ipv6Addr = "fd00:244:1::10".parse().unwrap();
        let k = WorkloadKey::from(IpAddr::V6(v6));
        assert_eq!(k.addr, v6.octets());
        assert_eq!(k.as_v4(), None);
        assert_eq!(IpAddr::from(k), IpAddr::V6(v6));
    }
}
