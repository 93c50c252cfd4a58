//! The kernel's routing as the classifier asks it ([`Routes`]), through `bpf_fib_lookup`.

use aya_ebpf::{EbpfContext as _, helpers::bpf_fib_lookup, programs::TcContext};
use meshpath_common::packet::Flow;
use meshpath_common::verdict::Routes;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Linux's flags and results (uapi `bpf.h`).
const BPF_FIB_LOOKUP_SKIP_NEIGH: u32 = 1 << 2;
const BPF_FIB_LOOKUP_MARK: u32 = 1 << 5;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// `struct bpf_fib_lookup` as Linux 6.10+ has it: `mark` shares its place with `smac`
/// (aya-ebpf's bindings predate it). 64 bytes.
#[repr(C)]
struct FibLookup {
    family: u8,
    l4_protocol: u8,
    sport: u16,
    dport: u16,
    tot_len: u16,
    ifindex: u32,
    tos: u32,
    src: [u8; 16],
    dst: [u8; 16],
    tbid: u32,
    mark: u32,
    smac_rest: [u8; 2],
    dmac: [u8; 6],
}

impl FibLookup {
    /// A lookup of the route to `to` (for a packet from `from`) arriving on `ifindex`.
    #[inline(always)]
    fn new(flow: &Flow, from: &[u8; 16], to: &[u8; 16], ifindex: u32, mark: u32) -> Self {
        let mut l = FibLookup {
            family: AF_INET6,
            l4_protocol: flow.proto,
            sport: 0,
            dport: 0,
            tot_len: 0,
            ifindex,
            tos: 0,
            src: *from,
            dst: *to,
            tbid: 0,
            mark,
            smac_rest: [0; 2],
            dmac: [0; 6],
        };
        // IPv4 addresses go in the first word (`ipv4_src`/`ipv4_dst` overlay `ipv6_*[0]`).
        // The family is the packet's: an IPv6 packet with v4-mapped addresses is IPv6.
        if !flow.v6 {
            l.family = AF_INET;
            l.src = [0; 16];
            l.dst = [0; 16];
            l.src[..4].copy_from_slice(&from[12..]);
            l.dst[..4].copy_from_slice(&to[12..]);
        }
        l
    }
}

/// Routing of the skb in `ctx`.
pub struct Fib<'a>(pub &'a TcContext);

impl Fib<'_> {
    /// The helper's result and the lookup after it (its `ifindex` is the egress device).
    #[inline(always)]
    fn lookup(&self, mut l: FibLookup, flags: u32) -> (i64, u32) {
        // SAFETY: `l` is a live, properly sized `struct bpf_fib_lookup` on our stack; the
        // helper reads and writes only within its 64 bytes.
        let ret = unsafe {
            bpf_fib_lookup(self.0.as_ptr(), &mut l as *mut FibLookup as *mut _, size_of::<FibLookup>() as i32, flags)
        };
        (ret, l.ifindex)
    }
}

impl Routes for Fib<'_> {
    #[inline(always)]
    fn routes_back(&self, flow: &Flow, ifindex: u32) -> bool {
        // The route to the packet's source, as a reply from anywhere would take it: the
        // packet's own destination may be link-local or multicast (neighbour discovery from
        // a pod's global address), which would skew the lookup.
        let any = [0u8; 16];
        let (ret, out) = self.lookup(FibLookup::new(flow, &any, &flow.src.addr, ifindex, 0), BPF_FIB_LOOKUP_SKIP_NEIGH);
        // A local, unreachable or blackholed source does not route back either.
        (ret == BPF_FIB_LKUP_RET_SUCCESS || ret == BPF_FIB_LKUP_RET_NO_NEIGH) && out == ifindex
    }

    #[inline(always)]
    fn delivers_locally(&self, flow: &Flow, ifindex: u32, mark: u32) -> bool {
        let l = FibLookup::new(flow, &flow.src.addr, &flow.dst.addr, ifindex, mark);
        // "Not forwarded" is the kernel's answer for a local route.
        self.lookup(l, BPF_FIB_LOOKUP_SKIP_NEIGH | BPF_FIB_LOOKUP_MARK).0 == BPF_FIB_LKUP_RET_NOT_FWDED
    }
}
