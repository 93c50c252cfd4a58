//! The TC classifier's decision for a packet, free of kernel types: the eBPF program
//! supplies the map lookups and two route lookups ([`Routes`]), host tests supply fakes.

use crate::counters::Counter;
use crate::interface::{IF_POD, IF_WORKLOAD};
use crate::names::{CAPTURE_MARK, NAT_MARK, PROXY_MARK, PROXY_MARK_MASK};
use crate::packet::{Flow, Frame, IPPROTO_TCP, IPPROTO_UNKNOWN};
use crate::workload::{WorkloadKey, WorkloadValue};

/// What the TC classifier does with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not the mesh's business: let the stack route it as usual.
    Pass,
    /// Mark with [`CAPTURE_MARK`] so policy routing delivers it locally to the proxy.
    Capture,
    /// TCP neither end of which is enrolled here: it passes, marked with [`NAT_MARK`], so
    /// that if a NAT on this node turns it toward an enrolled workload, policy routing
    /// delivers it to the proxy instead of forwarding it around.
    Unclaimed,
    /// Dropped, never let past the proxy.
    Drop(DropReason),
}

/// Why the datapath dropped a packet or a connection. The discriminant is the code kernel
/// events carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum DropReason {
    /// An enrolled source IP on an interface its workload does not live behind.
    ForeignInterface = 1,
    /// TCP from an enrolled workload's interface with a source it is not enrolled with.
    UnlistedSource = 2,
    /// A source that does not route back through the pod-facing interface it came in on.
    NoRouteBack = 3,
    /// Traffic of an enrolled workload whose headers could not be followed.
    Malformed = 4,
    /// A frame from a pod-facing interface under more VLAN tags than are walked.
    Undecodable = 5,
    /// A captured connection attempt that the capture rule and routes would not deliver to
    /// this host (they are missing): it would have gone direct.
    Undelivered = 6,
    /// A connection for a proxy listener that is not registered (the proxy is down).
    MissingSocket = 7,
    /// TCP forwarded to an enrolled workload's interface without passing the proxy (a
    /// NAT on this node turned it toward the pod after the classifier saw it, or the
    /// classifier was missing where it came in).
    Bypass = 8,
    /// TCP to an enrolled workload leaving through a bridge port it does not live behind:
    /// the node's neighbour entry for it was forged (ARP or NDP spoofing by another pod).
    Misdelivered = 9,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::ForeignInterface,
        DropReason::UnlistedSource,
        DropReason::NoRouteBack,
        DropReason::Malformed,
        DropReason::Undecodable,
        DropReason::Undelivered,
        DropReason::MissingSocket,
        DropReason::Bypass,
        DropReason::Misdelivered,
    ];

    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| *r as u32 == code)
    }

    /// The counter that counts it.
    pub const fn counter(self) -> Counter {
        match self {
            DropReason::ForeignInterface
            | DropReason::UnlistedSource
            | DropReason::NoRouteBack
            | DropReason::Misdelivered => Counter::SpoofDropped,
            DropReason::Malformed | DropReason::Undecodable => Counter::Malformed,
            DropReason::Undelivered | DropReason::Bypass => Counter::Undelivered,
            DropReason::MissingSocket => Counter::MissingSocket,
        }
    }

    /// Stable snake_case name, for logs.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::ForeignInterface => "foreign_interface",
            DropReason::UnlistedSource => "unlisted_source",
            DropReason::NoRouteBack => "no_route_back",
            DropReason::Malformed => "malformed",
            DropReason::Undecodable => "undecodable",
            DropReason::Undelivered => "undelivered",
            DropReason::MissingSocket => "missing_socket",
            DropReason::Bypass => "bypass",
            DropReason::Misdelivered => "misdelivered",
        }
    }

    /// What it means, for an operator reading the log.
    pub const fn describe(self) -> &'static str {
        match self {
            DropReason::ForeignInterface => "an enrolled workload's source IP arrived on another interface (spoofed)",
            DropReason::UnlistedSource => {
                "TCP from an enrolled workload's interface with a source it is not enrolled with"
            }
            DropReason::NoRouteBack => "the source does not route back through the interface it came in on (spoofed)",
            DropReason::Malformed => "traffic of an enrolled workload whose headers could not be followed",
            DropReason::Undecodable => "a frame under more VLAN tags than meshpath reads, from a pod-facing interface",
            DropReason::Undelivered => {
                "a captured connection would not be delivered to the proxy (capture rule or route missing)"
            }
            DropReason::MissingSocket => "a connection for a proxy listener that is not registered (proxy down)",
            DropReason::Bypass => {
                "TCP forwarded to an enrolled workload without passing the proxy (a NAT on this node, or a missing classifier)"
            }
            DropReason::Misdelivered => {
                "TCP to an enrolled workload leaving through another pod's bridge port (a forged ARP or NDP answer)"
            }
        }
    }
}

/// Where and how a packet arrived.
#[derive(Clone, Copy, Debug)]
pub struct Ingress {
    pub ifindex: u32,
    pub mark: u32,
    /// The interface's flags ([`crate::interface`]), 0 for an interface meshpath does not know.
    pub iface: u32,
    /// The device the node's stack routes the packet from: `ifindex`, or for a bridge port
    /// its bridge ([`crate::InterfaceValue::routed_via`]). Route lookups ask about it.
    pub via: u32,
}

/// The kernel's routing, as far as the classifier asks it.
pub trait Routes {
    /// Whether a packet back to `flow`'s source would leave through `ifindex`.
    fn routes_back(&self, flow: &Flow, ifindex: u32) -> bool;
    /// Whether `flow`, arriving on `ifindex` with `mark`, is delivered to this host.
    fn delivers_locally(&self, flow: &Flow, ifindex: u32, mark: u32) -> bool;
}

/// Decides a frame's fate. `lookup` reads the workload map.
#[inline(always)]
pub fn decide<R: Routes, L: Fn(&WorkloadKey) -> Option<WorkloadValue>>(
    frame: &Frame,
    at: &Ingress,
    lookup: L,
    routes: &R,
) -> Verdict {
    let flow = match frame {
        Frame::Ip(f) => f,
        Frame::Other => return Verdict::Pass,
        // What hides under more tags than are walked could be anything, and the stack strips
        // priority tags without end: it does not pass, on any interface.
        Frame::Undecodable => return Verdict::Drop(DropReason::Undecodable),
    };
    let (src, dst) = (lookup(&flow.src), lookup(&flow.dst));
    if let Some(reason) = spoofed(flow, at, src, routes) {
        return Verdict::Drop(reason);
    }
    if at.mark & PROXY_MARK_MASK == PROXY_MARK {
        return Verdict::Pass;
    }
    // Each end's answer is made opaque first: LLVM would otherwise test both map pointers
    // at once by OR-ing them, which the verifier rejects ("pointer |= pointer").
    if core::hint::black_box(src.is_none()) && dst.is_none() {
        // What hides behind an unreadable IPv6 chain may be TCP that a NAT turns toward an
        // enrolled pod: it is treated as TCP.
        return match flow.proto {
            IPPROTO_TCP | IPPROTO_UNKNOWN => Verdict::Unclaimed,
            _ => Verdict::Pass,
        };
    }
    match flow.proto {
        // A connection attempt is captured only if it will reach the proxy: with the
        // capture rule or route gone it would otherwise go straight to its destination.
        IPPROTO_TCP if flow.may_open && !routes.delivers_locally(flow, at.via, captured_mark(at.mark)) => {
            Verdict::Drop(DropReason::Undelivered)
        }
        IPPROTO_TCP => Verdict::Capture,
        IPPROTO_UNKNOWN => Verdict::Drop(DropReason::Malformed),
        _ => Verdict::Pass,
    }
}

/// Identity is derived from the source IP, so the source is checked before anything else,
/// for every protocol.
#[inline(always)]
fn spoofed<R: Routes>(flow: &Flow, at: &Ingress, src: Option<WorkloadValue>, routes: &R) -> Option<DropReason> {
    match src {
        Some(s) if s.ifindex != at.ifindex => Some(DropReason::ForeignInterface),
        // An enrolled source on its own interface: the map already proves it.
        Some(_) => None,
        // TCP with a source the workload is not enrolled with (an IPv6 link-local, an
        // unlisted secondary address) would escape capture; so would TCP hidden behind an
        // extension-header chain too long to follow. Neighbour discovery and ICMP keep working.
        None if at.iface & IF_WORKLOAD != 0 && matches!(flow.proto, IPPROTO_TCP | IPPROTO_UNKNOWN) => {
            Some(DropReason::UnlistedSource)
        }
        // A pod may only use addresses routed to it: no claiming another node's pod, or
        // the node's own address. Link-scope sources (neighbour discovery, DHCP) have no
        // route and carry no identity. Behind a bridge the route names the bridge, so pods
        // there can claim each other's addresses (not enrolled ones: the map has those).
        None if at.iface & IF_POD != 0 && !flow.src.is_link_scope() && !routes.routes_back(flow, at.via) => {
            Some(DropReason::NoRouteBack)
        }
        None => None,
    }
}

/// Whether a packet leaving (egress) toward `dst` skipped the proxy: TCP to an enrolled
/// workload of this node, forwarded (it came in on an interface, `from_ifindex` is not 0).
/// Captured traffic is delivered to the proxy, never forwarded, and the proxy's own packets
/// are the node's (`from_ifindex` 0), so what is forwarded there was turned toward the pod
/// after the classifier looked (a DNAT on this node) or came in where no classifier ran.
/// No mark exempts it (a mangle rule could set any), and any interface counts (a pod that
/// just moved to a new veth may still be listed behind its old one).
#[inline(always)]
pub fn bypasses(flow: &Flow, from_ifindex: u32, dst: Option<WorkloadValue>) -> bool {
    matches!(flow.proto, IPPROTO_TCP | IPPROTO_UNKNOWN) && from_ifindex != 0 && dst.is_some()
}

/// Whether a packet leaving (egress) through bridge port `ifindex` toward `dst` is going to
/// the wrong pod: TCP to an enrolled workload that does not live behind this port. Behind a
/// bridge the node finds a pod's port through its neighbour entry, which any pod can forge
/// with one ARP or NDP answer; the proxy's plaintext leg to the workload would go with it.
#[inline(always)]
pub fn misdelivered(flow: &Flow, ifindex: u32, dst: Option<WorkloadValue>) -> bool {
    matches!(flow.proto, IPPROTO_TCP | IPPROTO_UNKNOWN) && dst.is_some_and(|d| d.ifindex != ifindex)
}

/// The mark a captured packet leaves the classifier with.
#[inline(always)]
pub const fn captured_mark(mark: u32) -> u32 {
    mark | CAPTURE_MARK
}

/// The mark an unclaimed packet leaves the classifier with.
#[inline(always)]
pub const fn unclaimed_mark(mark: u32) -> u32 {
    mark | NAT_MARK
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{IPPROTO_TCP, IPPROTO_UNKNOWN};

    const POD_IF: u32 = 7;
    const OTHER_IF: u32 = 9;
    const POD: WorkloadValue = WorkloadValue::new(POD_IF);
    const A: WorkloadKey = WorkloadKey::from_v4([10, 0, 0, 1]);
    const B: WorkloadKey = WorkloadKey::from_v4([10, 0, 0, 2]);

    /// Routing as a test wants it.
    struct Fake {
        back: bool,
        local: bool,
    }

    impl Routes for Fake {
        fn routes_back(&self, _: &Flow, _: u32) -> bool {
            self.back
        }
        fn delivers_locally(&self, _: &Flow, _: u32, mark: u32) -> bool {
            assert_eq!(mark & CAPTURE_MARK, CAPTURE_MARK, "the capture mark is what is looked up");
            self.local
        }
    }

    const ROUTED: Fake = Fake { back: true, local: true };

    fn flow(proto: u8) -> Flow {
        Flow { src: A, dst: B, proto, may_open: proto == IPPROTO_TCP, v6: false }
    }

    /// `a` is the workload-map entry of the source, `b` of the destination.
    fn run(
        f: Flow,
        ifindex: u32,
        iface: u32,
        mark: u32,
        a: Option<WorkloadValue>,
        b: Option<WorkloadValue>,
        r: &Fake,
    ) -> Verdict {
        let lookup = |k: &WorkloadKey| {
            if *k == A {
                a
            } else if *k == B {
                b
            } else {
                None
            }
        };
        decide(&Frame::Ip(f), &Ingress { ifindex, mark, iface, via: ifindex }, lookup, r)
    }

    #[test]
    fn tcp_from_or_to_an_enrolled_workload_is_captured() {
        assert_eq!(run(flow(IPPROTO_TCP), POD_IF, IF_WORKLOAD | IF_POD, 0, Some(POD), None, &ROUTED), Verdict::Capture);
        assert_eq!(run(flow(IPPROTO_TCP), OTHER_IF, 0, 0, None, Some(POD), &ROUTED), Verdict::Capture);
        let both = run(flow(IPPROTO_TCP), POD_IF, IF_WORKLOAD, 0, Some(POD), Some(WorkloadValue::new(3)), &ROUTED);
        assert_eq!(both, Verdict::Capture);
    }

    #[test]
    fn non_enrolled_and_non_tcp_traffic_passes() {
        assert_eq!(run(flow(17), POD_IF, IF_POD, 0, None, None, &ROUTED), Verdict::Pass);
        assert_eq!(run(flow(17), POD_IF, IF_WORKLOAD, 0, Some(POD), None, &ROUTED), Verdict::Pass);
        assert_eq!(run(flow(1), OTHER_IF, 0, 0, None, Some(POD), &ROUTED), Verdict::Pass);
        assert_eq!(
            decide(&Frame::Other, &Ingress { ifindex: 1, mark: 0, iface: IF_POD, via: 1 }, |_| None, &ROUTED),
            Verdict::Pass
        );
    }

    #[test]
    fn tcp_between_non_enrolled_ends_passes_marked_for_a_nat_toward_an_enrolled_pod() {
        // Pod-facing or uplink, readable or not: a NAT further on may turn it to a pod.
        for (proto, iface) in [(IPPROTO_TCP, IF_POD), (IPPROTO_TCP, 0), (IPPROTO_UNKNOWN, 0)] {
            assert_eq!(run(flow(proto), OTHER_IF, iface, 0, None, None, &ROUTED), Verdict::Unclaimed);
        }
        // Not the proxy's own packets, and other protocols are no business of the proxy's.
        assert_eq!(run(flow(IPPROTO_TCP), OTHER_IF, 0, PROXY_MARK, None, None, &ROUTED), Verdict::Pass);
        assert_eq!(run(flow(1), OTHER_IF, 0, 0, None, None, &ROUTED), Verdict::Pass);
        // Spoofing is checked first.
        let spoofed = run(flow(IPPROTO_TCP), POD_IF, IF_POD, 0, None, None, &Fake { back: false, local: true });
        assert_eq!(spoofed, Verdict::Drop(DropReason::NoRouteBack));
        assert_eq!(unclaimed_mark(0x4000) & NAT_MARK, NAT_MARK);
        assert_eq!(unclaimed_mark(0x4000) & 0x4000, 0x4000, "other marks are kept");
    }

    #[test]
    fn the_proxys_own_packets_pass() {
        assert_eq!(run(flow(IPPROTO_TCP), OTHER_IF, 0, PROXY_MARK, None, Some(POD), &ROUTED), Verdict::Pass);
        assert_eq!(run(flow(IPPROTO_TCP), OTHER_IF, 0, 0x7000 | PROXY_MARK, None, Some(POD), &ROUTED), Verdict::Pass);
        // Sharing some bits with the proxy mark is not enough.
        assert_eq!(run(flow(IPPROTO_TCP), OTHER_IF, 0, 0x100, None, Some(POD), &ROUTED), Verdict::Capture);
    }

    #[test]
    fn enrolled_source_on_the_wrong_interface_is_dropped_for_any_protocol() {
        for proto in [IPPROTO_TCP, 17, 1, IPPROTO_UNKNOWN] {
            let v = run(flow(proto), OTHER_IF, 0, 0, Some(POD), None, &ROUTED);
            assert_eq!(v, Verdict::Drop(DropReason::ForeignInterface));
            // Even a proxy-looking mark does not excuse a spoofed source.
            assert_eq!(run(flow(proto), OTHER_IF, 0, PROXY_MARK, Some(POD), None, &ROUTED), v);
        }
    }

    #[test]
    fn unparseable_traffic_of_enrolled_workloads_is_dropped() {
        let malformed = Verdict::Drop(DropReason::Malformed);
        assert_eq!(run(flow(IPPROTO_UNKNOWN), POD_IF, IF_WORKLOAD, 0, Some(POD), None, &ROUTED), malformed);
        assert_eq!(run(flow(IPPROTO_UNKNOWN), OTHER_IF, 0, 0, None, Some(POD), &ROUTED), malformed);
        assert_eq!(run(flow(IPPROTO_UNKNOWN), OTHER_IF, 0, 0, None, None, &ROUTED), Verdict::Unclaimed);
    }

    #[test]
    fn tcp_from_a_workload_interface_with_an_unenrolled_source_is_dropped() {
        let unlisted = Verdict::Drop(DropReason::UnlistedSource);
        assert_eq!(run(flow(IPPROTO_TCP), POD_IF, IF_WORKLOAD, 0, None, None, &ROUTED), unlisted);
        assert_eq!(run(flow(IPPROTO_TCP), POD_IF, IF_WORKLOAD, 0, None, Some(POD), &ROUTED), unlisted);
        // Neighbour discovery and other non-TCP traffic still pass.
        assert_eq!(run(flow(58), POD_IF, IF_WORKLOAD, 0, None, None, &ROUTED), Verdict::Pass);
    }

    #[test]
    fn a_pod_source_that_does_not_route_back_is_dropped() {
        let elsewhere = Fake { back: false, local: true };
        let no_route = Verdict::Drop(DropReason::NoRouteBack);
        // Any protocol, enrolled destination or not: a non-enrolled pod claiming an address.
        for proto in [IPPROTO_TCP, 17, 1] {
            assert_eq!(run(flow(proto), POD_IF, IF_POD, 0, None, None, &elsewhere), no_route);
            assert_eq!(run(flow(proto), POD_IF, IF_POD, 0, None, Some(POD), &elsewhere), no_route);
        }
        // Uplinks are not checked (asymmetric routing is theirs to have).
        assert_eq!(run(flow(IPPROTO_TCP), OTHER_IF, 0, 0, None, None, &elsewhere), Verdict::Unclaimed);
        // Link-scope sources carry no identity and have no route.
        let ll = Flow { src: WorkloadKey::from_v4([169, 254, 1, 2]), ..flow(17) };
        assert_eq!(run(ll, POD_IF, IF_POD, 0, None, None, &elsewhere), Verdict::Pass);
        // An enrolled source is proven by the map, whatever the route says.
        assert_eq!(
            run(flow(IPPROTO_TCP), POD_IF, IF_POD | IF_WORKLOAD, 0, Some(POD), None, &elsewhere),
            Verdict::Capture
        );
    }

    #[test]
    fn a_connection_attempt_that_would_not_reach_the_proxy_is_dropped() {
        let unrouted = Fake { back: true, local: false };
        let undelivered = Verdict::Drop(DropReason::Undelivered);
        assert_eq!(run(flow(IPPROTO_TCP), POD_IF, IF_WORKLOAD, 0, Some(POD), None, &unrouted), undelivered);
        assert_eq!(run(flow(IPPROTO_TCP), OTHER_IF, 0, 0, None, Some(POD), &unrouted), undelivered);
        // Later segments of a connection the proxy already holds are not looked up.
        let est = Flow { may_open: false, ..flow(IPPROTO_TCP) };
        assert_eq!(run(est, OTHER_IF, 0, 0, None, Some(POD), &unrouted), Verdict::Capture);
    }

    /// Routing where only `via` leads back to the source and delivers locally.
    struct Only(u32);

    impl Routes for Only {
        fn routes_back(&self, _: &Flow, ifindex: u32) -> bool {
            ifindex == self.0
        }
        fn delivers_locally(&self, _: &Flow, ifindex: u32, _: u32) -> bool {
            ifindex == self.0
        }
    }

    #[test]
    fn a_bridge_ports_routes_are_asked_of_its_bridge_and_its_pods_are_told_apart_by_port() {
        const BRIDGE_IF: u32 = 4;
        let routes = Only(BRIDGE_IF);
        let port = |ifindex, iface, a, b| {
            let lookup = |k: &WorkloadKey| {
                if *k == A {
                    a
                } else if *k == B {
                    b
                } else {
                    None
                }
            };
            decide(&Frame::Ip(flow(IPPROTO_TCP)), &Ingress { ifindex, mark: 0, iface, via: BRIDGE_IF }, lookup, &routes)
        };
        // A plain pod behind the bridge: its source routes back via the bridge.
        assert_eq!(port(OTHER_IF, IF_POD, None, None), Verdict::Unclaimed);
        // An enrolled pod on its own port is captured (delivery is asked of the bridge too).
        assert_eq!(port(POD_IF, IF_POD | IF_WORKLOAD, Some(POD), None), Verdict::Capture);
        assert_eq!(port(OTHER_IF, IF_POD, None, Some(POD)), Verdict::Capture);
        // Another port of the same bridge claiming the enrolled pod's address is told apart.
        assert_eq!(port(OTHER_IF, IF_POD, Some(POD), None), Verdict::Drop(DropReason::ForeignInterface));
        // Asked of the port itself, the source would not route back.
        let at = Ingress { ifindex: OTHER_IF, mark: 0, iface: IF_POD, via: OTHER_IF };
        let v = decide(&Frame::Ip(flow(IPPROTO_TCP)), &at, |_| None, &routes);
        assert_eq!(v, Verdict::Drop(DropReason::NoRouteBack));
    }

    #[test]
    fn tagged_frames_too_deep_to_read_are_dropped_everywhere() {
        let at = |iface| Ingress { ifindex: POD_IF, mark: 0, iface, via: POD_IF };
        let drop = Verdict::Drop(DropReason::Undecodable);
        for iface in [IF_POD, IF_WORKLOAD, 0] {
            assert_eq!(decide(&Frame::Undecodable, &at(iface), |_| None, &ROUTED), drop);
        }
    }

    #[test]
    fn unreadable_ipv6_from_an_unlisted_source_on_a_workload_interface_is_dropped() {
        let v = run(flow(IPPROTO_UNKNOWN), POD_IF, IF_WORKLOAD, 0, None, None, &ROUTED);
        assert_eq!(v, Verdict::Drop(DropReason::UnlistedSource));
    }

    #[test]
    fn forwarded_tcp_to_an_enrolled_workload_is_a_bypass_but_the_nodes_own_is_not() {
        let tcp = flow(IPPROTO_TCP);
        assert!(bypasses(&tcp, 3, Some(POD)), "forwarded: a bypass");
        assert!(bypasses(&tcp, 3, Some(WorkloadValue::new(OTHER_IF))), "also toward a veth it just moved from");
        assert!(!bypasses(&tcp, 0, Some(POD)), "sent by the node (the proxy, kubelet probes)");
        assert!(!bypasses(&tcp, 3, None), "not to an enrolled workload");
        assert!(!bypasses(&flow(17), 3, Some(POD)), "not TCP");
    }

    #[test]
    fn tcp_to_an_enrolled_workload_through_another_port_is_misdelivered() {
        let tcp = flow(IPPROTO_TCP);
        assert!(!misdelivered(&tcp, POD_IF, Some(POD)), "its own port");
        assert!(misdelivered(&tcp, OTHER_IF, Some(POD)), "another pod's port");
        assert!(misdelivered(&tcp, OTHER_IF, Some(WorkloadValue::new(0))), "held behind none");
        assert!(!misdelivered(&tcp, OTHER_IF, None), "not enrolled");
        assert!(!misdelivered(&flow(17), OTHER_IF, Some(POD)), "not TCP");
    }

    #[test]
    fn every_reason_has_a_code_and_a_counter() {
        for r in DropReason::ALL {
            assert_eq!(DropReason::from_code(r as u32), Some(r));
            let _ = r.counter();
        }
        assert_eq!(DropReason::from_code(0), None);
        assert_eq!(captured_mark(0x4000), 0x4000 | CAPTURE_MARK);
    }
}
