//! Packet parsing, kept free of kernel types so that the eBPF program and host unit tests
//! (and the fuzzer) run the same code.
//!
//! The classifier needs L3 facts (addresses and upper-layer protocol): capture is by IP and
//! protocol, ports are left to sk_lookup, so IP fragments of a captured flow stay on the
//! path of its first fragment. From TCP it reads only whether a segment may open a
//! connection (a SYN without ACK), which is when delivery to the proxy is checked.

use crate::workload::WorkloadKey;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// 802.1Q, 802.1ad and the pre-standard QinQ ethertype: tags a frame may carry.
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_P_QINQ: u16 = 0x9100;
/// VLAN tags walked (in the frame; the kernel may hold one more in the skb's metadata).
pub const MAX_VLAN_TAGS: usize = 2;
pub const VLAN_HLEN: usize = 4;
pub const IPPROTO_TCP: u8 = 6;
/// Stand-in protocol for IPv6 packets whose extension-header chain is longer than we walk.
pub const IPPROTO_UNKNOWN: u8 = 255;
/// IPv6 extension headers walked before giving up (and treating the packet as unknown).
pub const MAX_IPV6_EXT_HEADERS: usize = 4;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// Byte access to a packet.
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
    /// TCP that may open a connection: a SYN without ACK, or a segment whose flags cannot be
    /// read (a later fragment, a truncated header), which is treated the same.
    pub may_open: bool,
    /// An IPv6 packet (its addresses may still be v4-mapped).
    pub v6: bool,
}

/// What a frame is, as far as the classifier cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// An IPv4 or IPv6 packet.
    Ip(Flow),
    /// Not IP (ARP, LLDP...), or an IP header too short to read: the stack handles or drops
    /// those itself.
    Other,
    /// Tagged deeper than [`MAX_VLAN_TAGS`]: what it carries cannot be seen.
    Undecodable,
}

/// Parses a frame whose IP header (or, for Ethernet, its ethertype) starts where `start`
/// says.
#[inline(always)]
pub fn parse<P: Packet + ?Sized>(pkt: &P, start: L3Start) -> Frame {
    let (ethertype, l3) = match start {
        L3Start::Ethernet => match ethertype_after_tags(pkt) {
            Some(found) => found,
            None => return Frame::Undecodable,
        },
        L3Start::Raw => match pkt.load::<1>(0) {
            Some([b]) if b >> 4 == 4 => (ETH_P_IP, 0),
            Some([b]) if b >> 4 == 6 => (ETH_P_IPV6, 0),
            _ => return Frame::Other,
        },
    };
    let flow = match ethertype {
        ETH_P_IP => parse_ipv4(pkt, l3),
        ETH_P_IPV6 => parse_ipv6(pkt, l3),
        _ => None,
    };
    flow.map_or(Frame::Other, Frame::Ip)
}

/// Where a device's frames carry their IP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L3Start {
    /// After an Ethernet header (and any VLAN tags).
    Ethernet,
    /// At offset 0: devices without a link-layer header (tun, WireGuard, IPIP).
    Raw,
}

impl L3Start {
    /// Where the IP header is on an interface with these `MP_INTERFACES` flags.
    #[inline(always)]
    pub const fn for_interface(flags: u32) -> Self {
        if flags & crate::interface::IF_L3 != 0 { Self::Raw } else { Self::Ethernet }
    }
}

/// The ethertype under up to [`MAX_VLAN_TAGS`] VLAN tags, and where its payload starts;
/// `None` when there are more tags than that. A tag the kernel has already taken into the
/// skb's metadata is not in the frame, so what is parsed is what the stack will see once it
/// strips the rest.
#[inline(always)]
fn ethertype_after_tags<P: Packet + ?Sized>(pkt: &P) -> Option<(u16, usize)> {
    let mut off = ETH_HLEN - 2;
    for _ in 0..=MAX_VLAN_TAGS {
        let Some(t) = pkt.load::<2>(off) else {
            // Too short for even an ethertype: not IP.
            return Some((0, off));
        };
        let ethertype = u16::from_be_bytes(t);
        if !matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ) {
            return Some((ethertype, off + 2));
        }
        off += VLAN_HLEN;
    }
    None
}

#[inline(always)]
fn parse_ipv4<P: Packet + ?Sized>(pkt: &P, off: usize) -> Option<Flow> {
    let h = pkt.load::<20>(off)?;
    if h[0] >> 4 != 4 {
        return None;
    }
    let proto = h[9];
    let ihl = (h[0] & 0x0f) as usize * 4;
    // A later fragment carries no TCP header.
    let first_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0;
    let may_open = proto == IPPROTO_TCP && (!first_fragment || ihl < 20 || tcp_may_open(pkt, off + ihl));
    Some(Flow {
        src: WorkloadKey::from_v4([h[12], h[13], h[14], h[15]]),
        dst: WorkloadKey::from_v4([h[16], h[17], h[18], h[19]]),
        proto,
        may_open,
        v6: false,
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
    let upper = ipv6_upper(pkt, h[6], off + 40);
    let may_open = upper.proto == IPPROTO_TCP && (!upper.first_fragment || tcp_may_open(pkt, upper.offset));
    Some(Flow {
        src: WorkloadKey::from_v6(src),
        dst: WorkloadKey::from_v6(dst),
        proto: upper.proto,
        may_open,
        v6: true,
    })
}

/// Whether the TCP header at `off` is a SYN without ACK; unreadable flags count as one.
#[inline(always)]
fn tcp_may_open<P: Packet + ?Sized>(pkt: &P, off: usize) -> bool {
    match pkt.load::<1>(off + 13) {
        Some([flags]) => flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0,
        None => true,
    }
}

/// The upper-layer header of an IPv6 packet.
struct Upper {
    proto: u8,
    offset: usize,
    /// False behind a fragment header with a non-zero offset: no upper header there.
    first_fragment: bool,
}

/// Follows the extension-header chain to the upper-layer protocol. A TCP segment hidden
/// behind extension headers must not escape capture, so a chain we cannot follow yields
/// [`IPPROTO_UNKNOWN`] and the caller decides (it drops for enrolled workloads).
#[inline(always)]
fn ipv6_upper<P: Packet + ?Sized>(pkt: &P, first: u8, mut off: usize) -> Upper {
    const HOPOPTS: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const AH: u8 = 51;
    const DSTOPTS: u8 = 60;
    let unknown = Upper { proto: IPPROTO_UNKNOWN, offset: off, first_fragment: true };
    let mut next = first;
    let mut first_fragment = true;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let len = match next {
            HOPOPTS | ROUTING | DSTOPTS | FRAGMENT | AH => match pkt.load::<4>(off) {
                Some([nh, hlen, f0, f1]) => {
                    let len = match next {
                        FRAGMENT => {
                            first_fragment &= u16::from_be_bytes([f0, f1]) & 0xfff8 == 0;
                            8
                        }
                        AH => (hlen as usize + 2) * 4,
                        _ => (hlen as usize + 1) * 8,
                    };
                    next = nh;
                    len
                }
                None => return unknown,
            },
            other => return Upper { proto: other, offset: off, first_fragment },
        };
        off += len;
    }
    match next {
        HOPOPTS | ROUTING | DSTOPTS | FRAGMENT | AH => unknown,
        other => Upper { proto: other, offset: off, first_fragment },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    pub(crate) fn eth(ethertype: u16, l3: &[u8]) -> Vec<u8> {
        let mut f = std::vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(l3);
        f
    }

    /// An IPv4 header and a TCP header with `flags`.
    pub(crate) fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], proto: u8, flags: u8) -> Vec<u8> {
        let mut h = std::vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, proto, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        let mut tcp = [0u8; 20];
        tcp[13] = flags;
        h.extend_from_slice(&tcp);
        h
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8) -> Vec<u8> {
        eth(ETH_P_IP, &ipv4_tcp(src, dst, proto, TCP_FLAG_ACK))
    }

    fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, ext: &[u8]) -> Vec<u8> {
        let mut h = std::vec![0x60, 0, 0, 0, 0, 20, next, 64];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(ext);
        let mut tcp = [0u8; 20];
        tcp[13] = TCP_FLAG_SYN;
        h.extend_from_slice(&tcp);
        eth(ETH_P_IPV6, &h)
    }

    fn flow(frame: Frame) -> Flow {
        match frame {
            Frame::Ip(f) => f,
            other => panic!("not an IP packet: {other:?}"),
        }
    }

    fn eth_parse(p: &[u8]) -> Frame {
        parse(p, L3Start::Ethernet)
    }

    const A6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    const B6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];

    #[test]
    fn parses_ipv4_tcp() {
        let f = flow(eth_parse(&ipv4([10, 244, 1, 10], [10, 244, 2, 10], IPPROTO_TCP)));
        assert_eq!(f.src, WorkloadKey::from_v4([10, 244, 1, 10]));
        assert_eq!(f.dst, WorkloadKey::from_v4([10, 244, 2, 10]));
        assert_eq!((f.proto, f.may_open), (IPPROTO_TCP, false));
    }

    #[test]
    fn syn_without_ack_and_unreadable_flags_may_open_a_connection() {
        let syn = |flags| flow(eth_parse(&eth(ETH_P_IP, &ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP, flags))));
        assert!(syn(TCP_FLAG_SYN).may_open);
        assert!(!syn(TCP_FLAG_SYN | TCP_FLAG_ACK).may_open);
        assert!(!syn(TCP_FLAG_ACK).may_open);
        // A later fragment: no TCP header to read.
        let mut frag = eth(ETH_P_IP, &ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP, TCP_FLAG_ACK));
        frag[ETH_HLEN + 7] = 0x10;
        assert!(flow(eth_parse(&frag)).may_open);
        // A first fragment cut inside the TCP header, before the flags.
        let mut short = eth(ETH_P_IP, &ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP, TCP_FLAG_ACK));
        short.truncate(ETH_HLEN + 20 + 8);
        assert!(flow(eth_parse(&short)).may_open);
        // UDP never opens a TCP connection.
        assert!(!flow(eth_parse(&ipv4([10, 0, 0, 1], [10, 0, 0, 2], 17))).may_open);
    }

    #[test]
    fn parses_ipv6_tcp_directly_and_behind_extension_headers() {
        let f = flow(eth_parse(&ipv6(A6, B6, IPPROTO_TCP, &[])));
        assert_eq!((f.src.addr, f.dst.addr, f.proto, f.may_open), (A6, B6, IPPROTO_TCP, true));
        // Hop-by-hop (8 bytes) then destination options (16 bytes) then TCP.
        let mut ext = std::vec![60, 0, 0, 0, 0, 0, 0, 0];
        ext.extend_from_slice(&[IPPROTO_TCP, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let f = flow(eth_parse(&ipv6(A6, B6, 0, &ext)));
        assert_eq!((f.proto, f.may_open), (IPPROTO_TCP, true));
        // A fragment header (always 8 bytes) in front of UDP.
        assert_eq!(flow(eth_parse(&ipv6(A6, B6, 44, &[17, 0, 0, 1, 0, 0, 0, 0]))).proto, 17);
        // A later TCP fragment may open (its flags are elsewhere).
        assert!(flow(eth_parse(&ipv6(A6, B6, 44, &[IPPROTO_TCP, 0, 0, 0x10, 0, 0, 0, 0]))).may_open);
    }

    #[test]
    fn long_or_truncated_ipv6_chains_are_unknown() {
        let hop = [0u8, 0, 0, 0, 0, 0, 0, 0]; // hop-by-hop pointing at another hop-by-hop
        let chain: Vec<u8> = hop.iter().copied().cycle().take(8 * (MAX_IPV6_EXT_HEADERS + 1)).collect();
        assert_eq!(flow(eth_parse(&ipv6(A6, B6, 0, &chain))).proto, IPPROTO_UNKNOWN);
        let mut short = ipv6(A6, B6, 60, &[]);
        short.truncate(ETH_HLEN + 40 + 1);
        assert_eq!(flow(eth_parse(&short)).proto, IPPROTO_UNKNOWN);
    }

    #[test]
    fn non_ip_and_truncated_frames_are_other() {
        assert_eq!(eth_parse(&eth(0x0806, &[0u8; 28])), Frame::Other);
        let mut v4 = ipv4([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP);
        v4.truncate(ETH_HLEN + 19);
        assert_eq!(eth_parse(&v4), Frame::Other);
        // IPv4 ethertype with an IPv6 version nibble.
        let mut bad = ipv4([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP);
        bad[ETH_HLEN] = 0x65;
        assert_eq!(eth_parse(&bad), Frame::Other);
        assert_eq!(eth_parse(&[0u8; 5]), Frame::Other);
    }

    /// `tags` VLAN tags (each a TPID and a TCI) in front of an IPv4 TCP packet.
    fn tagged(tpids: &[u16]) -> Vec<u8> {
        let mut f = std::vec![0u8; 12];
        for t in tpids {
            f.extend_from_slice(&t.to_be_bytes());
            f.extend_from_slice(&[0, 0]); // VID 0: a priority tag the stack accepts untagged
        }
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        f.extend_from_slice(&ipv4_tcp([10, 244, 1, 10], [10, 244, 1, 11], IPPROTO_TCP, TCP_FLAG_SYN));
        f
    }

    #[test]
    fn vlan_tags_are_seen_through() {
        for tags in [&[ETH_P_8021Q][..], &[ETH_P_8021Q, ETH_P_8021Q], &[ETH_P_8021AD, ETH_P_8021Q], &[ETH_P_QINQ]] {
            let f = flow(eth_parse(&tagged(tags)));
            assert_eq!((f.src, f.proto, f.may_open), (WorkloadKey::from_v4([10, 244, 1, 10]), IPPROTO_TCP, true));
        }
        assert_eq!(eth_parse(&tagged(&[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q])), Frame::Undecodable);
    }

    #[test]
    fn raw_l3_devices_start_with_the_ip_header() {
        let pkt = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP, TCP_FLAG_SYN);
        assert_eq!(flow(parse(pkt.as_slice(), L3Start::Raw)).src, WorkloadKey::from_v4([10, 0, 0, 1]));
        assert_eq!(parse(&[0u8; 20][..], L3Start::Raw), Frame::Other);
    }
}
