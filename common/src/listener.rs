//! The proxy's listeners and where sk_lookup finds them in the SOCKMAP.

use crate::names::{PORT_HBONE, PORT_INBOUND_PLAIN, PORT_OUTBOUND};

/// A role of the proxy's listening sockets. Each role has one IPv4 and one IPv6 socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Listener {
    /// Connections opened by an enrolled workload (15001).
    Outbound = 0,
    /// Plaintext connections to an enrolled workload (15006).
    InboundPlain = 1,
    /// HBONE connections to an enrolled workload (15008).
    Hbone = 2,
}

impl Listener {
    pub const ALL: [Listener; 3] = [Listener::Outbound, Listener::InboundPlain, Listener::Hbone];
    /// Number of SOCKMAP slots: one per role and address family.
    pub const SLOTS: u32 = 6;

    pub const fn port(self) -> u16 {
        match self {
            Listener::Outbound => PORT_OUTBOUND,
            Listener::InboundPlain => PORT_INBOUND_PLAIN,
            Listener::Hbone => PORT_HBONE,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Listener::Outbound => "outbound",
            Listener::InboundPlain => "inbound_plain",
            Listener::Hbone => "hbone",
        }
    }

    /// SOCKMAP index of this role's socket for the given family.
    pub const fn slot(self, ipv6: bool) -> u32 {
        self as u32 * 2 + ipv6 as u32
    }

    /// Which listener a new TCP connection belongs to, given whether its source (the
    /// remote end as the node sees it) and its destination are enrolled on this node.
    ///
    /// An enrolled source wins: the outbound side of the proxy handles same-node pairs in
    /// one hop. `None` means the connection is not the mesh's business.
    pub const fn steer(src_enrolled: bool, dst_enrolled: bool, dst_port: u16) -> Option<Listener> {
        if src_enrolled {
            Some(Listener::Outbound)
        } else if dst_enrolled {
            if dst_port == PORT_HBONE { Some(Listener::Hbone) } else { Some(Listener::InboundPlain) }
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_unique_and_in_range() {
        let mut seen = [false; Listener::SLOTS as usize];
        for l in Listener::ALL {
            for v6 in [false, true] {
                let s = l.slot(v6) as usize;
                assert!(!seen[s], "slot {s} used twice");
                seen[s] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn steering_follows_ambient_semantics() {
        assert_eq!(Listener::steer(true, false, 80), Some(Listener::Outbound));
        assert_eq!(Listener::steer(true, true, 15008), Some(Listener::Outbound));
        assert_eq!(Listener::steer(false, true, 80), Some(Listener::InboundPlain));
        assert_eq!(Listener::steer(false, true, 15008), Some(Listener::Hbone));
        assert_eq!(Listener::steer(false, false, 15001), None);
        assert_eq!(Listener::steer(false, false, 80), None);
    }
}
