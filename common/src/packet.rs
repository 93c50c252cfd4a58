//! Packet parsing and the TC classifier's decision, kept free of kernel types so that the
//! eBPF program and host unit tests run the same code.
//!
//! The classifier only needs L3 facts (addresses and upper-layer protocol): capture is by
//! IP and protocol, and ports are left to sk_lookup. That keeps IP fragments of a captured
//! flow on the same path as its first fragment.

use crate::names::{CAPTURE_MARK, PROXY_MARK, PROXY_MARK_MASK};
use crate::workload::{WorkloadKey, WorkloadValue};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
/// Stand-in protocol for IPv6 packets whose extension-header chain is longer than we walk.
pub const IPPROTO_UNKNOWN: u8 = 255;
/// IPv6 extension headers walked before giving up (and treating the packet as unknown).
pub const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Byte access to a packet, starting at its Ethernet header.
pub trait Packet {
    /// `N` bytes at `offset`, or `None` when the packet is shorter.
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl Packet for [u8] {
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.get(offset..offset.checked_add(N)?)?.try_into().ok()
    }
}

/// The L3 facts of an IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: WorkloadKey,
    pub dst: WorkloadKey,
    /// Upper-layer protocol, or [`IPPROTO_UNKNOWN`].
    pub proto: u8,
}

/// Parses an Ethernet frame. `None` for anything that is not a readable IPv4/IPv6 packet
/// (ARP, truncated headers): the stack handles or drops those itself.
#[inline(always)]
pub fn parse<P: Packet + ?Sized>(pkt: &P) -> Option<Flow> {
    let ethertype = u16::from_be_bytes(pkt.load::<2>(12)?);
    match ethertype {
        ETH_P_IP => parse_ipv4(pkt, ETH_HLEN),
        ETH_P_IPV6 => parse_ipv6(pkt, ETH_HLEN),
        _ => None,
    }
}

#[inline(always)]
fn parse_ipv4<P: Packet + ?Sized>(pkt: &P, off: usize) -> Option<Flow> {
    let h = pkt.load::<20>(off)?;
    if h[0] >> 4 != 4 {
        return None;
    }
    Some(Flow {
        src: WorkloadKey::from_v4([h[12], h[13], h[14], h[15]]),
        dst: WorkloadKey::from_v4([h[16], h[17], h[18], h[19]]),
        proto: h[9],
    })
}

#[inline(always)]
fn parse_ipv6<P: Packet + ?Sized>(pkt: &P, off: usize) -> Option<Flow> {
    let h = pkt.load::<40>(off)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let proto = ipv6_upper_protocol(pkt, h[6], off + 40);
    Some(Flow { src: WorkloadKey::from_v6(src), dst: WorkloadKey::from_v6(dst), proto })
}

/// Follows the extension-header chain to the upper-layer protocol. A TCP segment hidden
/// behind extension headers must not escape capture, so a chain we cannot follow yields
/// [`IPPROTO_UNKNOWN`] and the caller decides (it drops for enrolled workloads).
#[inline(always)]
fn ipv6_upper_protocol<P: Packet + ?Sized>(pkt: &P, first: u8, mut off: usize) -> u8 {
    const HOPOPTS: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const AH: u8 = 51;
    const DSTOPTS: u8 = 60;
    let mut next = first;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let len = match next {
            HOPOPTS | ROUTING | DSTOPTS | FRAGMENT | AH => match pkt.load::<2>(off) {
                Some([nh, hlen]) => {
                    let len = match next {
                        FRAGMENT => 8,
                        AH => (hlen as usize + 2) * 4,
                        _ => (hlen as usize + 1) * 8,
                    };
                    next = nh;
                    len
                }
                None => return IPPROTO_UNKNOWN,
            },
            other => return other,
        };
        off += len;
    }
    match next {
        HOPOPTS | ROUTING | DSTOPTS | FRAGMENT | AH => IPPROTO_UNKNOWN,
        other => other,
    }
}

/// What the TC classifier does with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not the mesh's business: let the stack route it as usual.
    Pass,
    /// Mark with [`CAPTURE_MARK`] so policy routing delivers it locally to the proxy.
    Capture,
    /// An enrolled source IP arrived on an interface its workload does not live behind.
    DropSpoofed,
    /// Traffic of an enrolled workload we could not parse: dropped rather than bypassed.
    DropMalformed,
}

/// Decides a packet's fate. `src`/`dst` are the workload-map entries of its addresses;
/// `from_workload_if` says whether it arrived on the veth of an enrolled workload.
#[inline(always)]
pub fn classify(
    flow: &Flow,
    mark: u32,
    ingress_ifindex: u32,
    from_workload_if: bool,
    src: Option<WorkloadValue>,
    dst: Option<WorkloadValue>,
) -> Verdict {
    match src {
        // Identity is derived from the source IP, so this check comes before anything else
        // and applies to every protocol.
        Some(s) if s.ifindex != ingress_ifindex => return Verdict::DropSpoofed,
        // TCP from an enrolled workload's veth with a source that is not one of its enrolled
        // IPs (an IPv6 link-local, an unlisted secondary address) would escape capture.
        // Other protocols (neighbour discovery, ICMP) keep working.
        None if from_workload_if && flow.proto == IPPROTO_TCP => return Verdict::DropSpoofed,
        _ => {}
    }
    if src.is_none() && dst.is_none() {
        return Verdict::Pass;
    }
    if mark & PROXY_MARK_MASK == PROXY_MARK {
        return Verdict::Pass;
    }
    match flow.proto {
        IPPROTO_TCP => Verdict::Capture,
        IPPROTO_UNKNOWN => Verdict::DropMalformed,
        _ => Verdict::Pass,
    }
}

/// The mark a captured packet leaves the classifier with.
#[inline(always)]
pub const fn captured_mark(mark: u32) -> u32 {
    mark | CAPTURE_MARK
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    const POD_IF: u32 = 7;
    const OTHER_IF: u32 = 9;
    const POD: WorkloadValue = WorkloadValue::new(POD_IF);

    fn eth(ethertype: u16, l3: &[u8]) -> Vec<u8> {
        let mut f = std::vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(l3);
        f
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8) -> Vec<u8> {
        let mut h = std::vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, proto, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(&[0u8; 20]); // L4 header bytes, unread
        eth(ETH_P_IP, &h)
    }

    fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, ext: &[u8]) -> Vec<u8> {
        let mut h = std::vec![0x60, 0, 0, 0, 0, 20, next, 64];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(ext);
        h.extend_from_slice(&[0u8; 20]);
        eth(ETH_P_IPV6, &h)
    }

    const A6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    const B6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];

    #[test]
    fn parses_ipv4_tcp() {
        let f = parse(ipv4([10, 244, 1, 10], [10, 244, 2, 10], IPPROTO_TCP).as_slice()).unwrap();
        assert_eq!(f.src, WorkloadKey::from_v4([10, 244, 1, 10]));
        assert_eq!(f.dst, WorkloadKey::from_v4([10, 244, 2, 10]));
        assert_eq!(f.proto, IPPROTO_TCP);
    }

    #[test]
    fn parses_ipv6_tcp_directly_and_behind_extension_headers() {
        let f = parse(ipv6(A6, B6, IPPROTO_TCP, &[]).as_slice()).unwrap();
        assert_eq!((f.src.addr, f.dst.addr, f.proto), (A6, B6, IPPROTO_TCP));
        // Hop-by-hop (8 bytes) then destination options (16 bytes) then TCP.
        let mut ext = std::vec![60, 0, 0, 0, 0, 0, 0, 0];
        ext.extend_from_slice(&[IPPROTO_TCP, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let f = parse(ipv6(A6, B6, 0, &ext).as_slice()).unwrap();
        assert_eq!(f.proto, IPPROTO_TCP);
        // A fragment header (always 8 bytes) in front of UDP.
        let f = parse(ipv6(A6, B6, 44, &[17, 0, 0, 1, 0, 0, 0, 0]).as_slice()).unwrap();
        assert_eq!(f.proto, 17);
    }

    #[test]
    fn long_or_truncated_ipv6_chains_are_unknown() {
        let hop = [0u8, 0, 0, 0, 0, 0, 0, 0]; // hop-by-hop pointing at another hop-by-hop
        let chain: Vec<u8> = hop.iter().copied().cycle().take(8 * (MAX_IPV6_EXT_HEADERS + 1)).collect();
        assert_eq!(parse(ipv6(A6, B6, 0, &chain).as_slice()).unwrap().proto, IPPROTO_UNKNOWN);
        let mut short = ipv6(A6, B6, 60, &[]);
        short.truncate(ETH_HLEN + 40 + 1);
        assert_eq!(parse(short.as_slice()).unwrap().proto, IPPROTO_UNKNOWN);
    }

    #[test]
    fn non_ip_and_truncated_frames_are_not_flows() {
        assert_eq!(parse(eth(0x0806, &[0u8; 28]).as_slice()), None);
        let mut v4 = ipv4([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP);
        v4.truncate(ETH_HLEN + 19);
        assert_eq!(parse(v4.as_slice()), None);
        // IPv4 ethertype with an IPv6 version nibble.
        let mut bad = ipv4([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP);
        bad[ETH_HLEN] = 0x65;
        assert_eq!(parse(bad.as_slice()), None);
    }

    fn flow(proto: u8) -> Flow {
        Flow { src: WorkloadKey::from_v4([10, 0, 0, 1]), dst: WorkloadKey::from_v4([10, 0, 0, 2]), proto }
    }

    #[test]
    fn tcp_from_or_to_an_enrolled_workload_is_captured() {
        assert_eq!(classify(&flow(IPPROTO_TCP), 0, POD_IF, true, Some(POD), None), Verdict::Capture);
        assert_eq!(classify(&flow(IPPROTO_TCP), 0, OTHER_IF, false, None, Some(POD)), Verdict::Capture);
        assert_eq!(
            classify(&flow(IPPROTO_TCP), 0, POD_IF, true, Some(POD), Some(WorkloadValue::new(3))),
            Verdict::Capture
        );
    }

    #[test]
    fn non_enrolled_and_non_tcp_traffic_passes() {
        assert_eq!(classify(&flow(IPPROTO_TCP), 0, POD_IF, false, None, None), Verdict::Pass);
        assert_eq!(classify(&flow(17), 0, POD_IF, true, Some(POD), None), Verdict::Pass);
        assert_eq!(classify(&flow(1), 0, OTHER_IF, false, None, Some(POD)), Verdict::Pass);
    }

    #[test]
    fn the_proxys_own_packets_pass() {
        assert_eq!(classify(&flow(IPPROTO_TCP), PROXY_MARK, OTHER_IF, false, None, Some(POD)), Verdict::Pass);
        assert_eq!(classify(&flow(IPPROTO_TCP), 0x7000 | PROXY_MARK, OTHER_IF, false, None, Some(POD)), Verdict::Pass);
        // Sharing some bits with the proxy mark is not enough.
        assert_eq!(classify(&flow(IPPROTO_TCP), 0x100, OTHER_IF, false, None, Some(POD)), Verdict::Capture);
    }

    #[test]
    fn enrolled_source_on_the_wrong_interface_is_dropped_for_any_protocol() {
        for proto in [IPPROTO_TCP, 17, 1, IPPROTO_UNKNOWN] {
            assert_eq!(classify(&flow(proto), 0, OTHER_IF, false, Some(POD), None), Verdict::DropSpoofed);
            // Even a proxy-looking mark does not excuse a spoofed source.
            assert_eq!(classify(&flow(proto), PROXY_MARK, OTHER_IF, false, Some(POD), None), Verdict::DropSpoofed);
        }
    }

    #[test]
    fn unparseable_traffic_of_enrolled_workloads_is_dropped() {
        assert_eq!(classify(&flow(IPPROTO_UNKNOWN), 0, POD_IF, true, Some(POD), None), Verdict::DropMalformed);
        assert_eq!(classify(&flow(IPPROTO_UNKNOWN), 0, OTHER_IF, false, None, Some(POD)), Verdict::DropMalformed);
        assert_eq!(classify(&flow(IPPROTO_UNKNOWN), 0, OTHER_IF, false, None, None), Verdict::Pass);
    }

    #[test]
    fn tcp_from_a_workload_veth_with_an_unenrolled_source_is_dropped() {
        // e.g. an IPv6 link-local source, or an address the workload file does not list.
        assert_eq!(classify(&flow(IPPROTO_TCP), 0, POD_IF, true, None, None), Verdict::DropSpoofed);
        assert_eq!(classify(&flow(IPPROTO_TCP), 0, POD_IF, true, None, Some(POD)), Verdict::DropSpoofed);
        // Neighbour discovery and other non-TCP traffic still pass.
        assert_eq!(classify(&flow(58), 0, POD_IF, true, None, None), Verdict::Pass);
        // Its enrolled source is captured as usual.
        assert_eq!(classify(&flow(IPPROTO_TCP), 0, POD_IF, true, Some(POD), None), Verdict::Capture);
    }

    #[test]
    fn capture_mark_keeps_other_bits() {
        assert_eq!(captured_mark(0x4000), 0x4000 | CAPTURE_MARK);
    }
}
