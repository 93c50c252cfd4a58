//! meshpath's kernel side: a TC classifier that marks traffic of enrolled workloads for
//! local delivery (and drops spoofed sources and connection attempts that would not reach
//! the proxy; other TCP is marked so that a NAT toward an enrolled pod is delivered locally
//! too), and an sk_lookup dispatcher that hands those connections to the proxy's
//! listening sockets.
//!
//! The decisions themselves live in `meshpath_common` so they are unit-tested on the host;
//! these functions only read the packet, the maps ([`maps`]) and the routes ([`fib`]).
#![no_std]
#![no_main]

mod fib;
mod maps;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, sk_action},
    macros::{classifier, sk_lookup},
    programs::{SkLookupContext, TcContext},
};
use meshpath_common::{
    Counter, DropReason, Listener, Verdict, WorkloadKey,
    interface::IF_BRIDGE_PORT,
    packet::{self, IPPROTO_TCP, L3Start, Packet},
    verdict::{self, Ingress},
};

use maps::{MP_LISTENERS, count, dropped, interface, workload};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Reads a field of the sk_lookup context. Volatile, so LLVM cannot merge reads of
/// different fields into one load at a computed offset, which the verifier rejects
/// ("dereference of modified ctx ptr").
macro_rules! ctx_field {
    ($ctx:expr, $($field:tt)+) => {
        // SAFETY: `$ctx` is the context pointer the kernel handed to the program; the field
        // is a plain u32 at a constant offset, which the verifier allows reading.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx).$($field)+)) }
    };
}

/// Reads packet bytes through `bpf_skb_load_bytes`, which also works on non-linear skbs.
struct Skb<'a>(&'a TcContext);

impl Packet for Skb<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(offset).ok()
    }
}

/// TC ingress on pod-facing interfaces and uplinks. Returns `TC_ACT_UNSPEC` to let the
/// packet continue (to the next TCX program, or the stack) so meshpath chains with others.
#[classifier]
pub fn mp_tc_ingress(ctx: TcContext) -> i32 {
    try_tc_ingress(&ctx)
}

#[inline(always)]
fn try_tc_ingress(ctx: &TcContext) -> i32 {
    // SAFETY: `skb` is the context pointer the kernel handed to this program.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    let iface = interface(ifindex);
    let frame = packet::parse(&Skb(ctx), L3Start::for_interface(iface.flags));
    let at = Ingress { ifindex, mark, iface: iface.flags, via: iface.routed_via(ifindex) };
    match verdict::decide(&frame, &at, workload, &fib::Fib(ctx)) {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Unclaimed => {
            ctx.set_mark(verdict::unclaimed_mark(mark));
            TC_ACT_UNSPEC
        }
        Verdict::Capture => {
            // A bridge would switch a frame for a pod on it straight to that pod's port:
            // addressed to the bridge itself, it goes up to the node's stack instead.
            if iface.flags & IF_BRIDGE_PORT != 0 && ctx.store(0, &iface.bridge_mac, 0).is_err() {
                dropped(DropReason::Malformed, ifindex, flow_src(&frame), flow_dst(&frame), IPPROTO_TCP);
                return TC_ACT_SHOT;
            }
            ctx.set_mark(verdict::captured_mark(mark));
            count(Counter::Classified);
            TC_ACT_UNSPEC
        }
        Verdict::Drop(reason) => {
            let proto = if let packet::Frame::Ip(f) = frame { f.proto } else { 0 };
            dropped(reason, ifindex, flow_src(&frame), flow_dst(&frame), proto);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn flow_src(frame: &packet::Frame) -> WorkloadKey {
    if let packet::Frame::Ip(f) = frame { f.src } else { WorkloadKey { addr: [0; 16] } }
}

#[inline(always)]
fn flow_dst(frame: &packet::Frame) -> WorkloadKey {
    if let packet::Frame::Ip(f) = frame { f.dst } else { WorkloadKey { addr: [0; 16] } }
}

/// TC egress on the same interfaces: TCP leaving toward an enrolled workload that was
/// forwarded without passing the proxy is dropped (a NAT on this node turned it toward the
/// pod after the ingress classifier looked, or it came in where no classifier ran).
#[classifier]
pub fn mp_tc_egress(ctx: TcContext) -> i32 {
    try_tc_egress(&ctx)
}

#[inline(always)]
fn try_tc_egress(ctx: &TcContext) -> i32 {
    // SAFETY: `skb` is the context pointer the kernel handed to this program.
    let (ifindex, from) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    let iface = interface(ifindex);
    let bridge_port = iface.flags & IF_BRIDGE_PORT != 0;
    // Only locally generated packets have no ingress interface: off bridge ports, where the
    // route alone picks the interface, those pass at once (the proxy's, kubelet's), before
    // the packet is even read.
    if from == 0 && !bridge_port {
        return TC_ACT_UNSPEC;
    }
    let start = L3Start::for_interface(iface.flags);
    let packet::Frame::Ip(flow) = packet::parse(&Skb(ctx), start) else { return TC_ACT_UNSPEC };
    let dst = workload(&flow.dst);
    let reason = if verdict::bypasses(&flow, from, dst) {
        DropReason::Bypass
    } else if bridge_port && verdict::misdelivered(&flow, ifindex, dst) {
        DropReason::Misdelivered
    } else {
        return TC_ACT_UNSPEC;
    };
    dropped(reason, ifindex, flow.src, flow.dst, flow.proto);
    TC_ACT_SHOT
}

/// sk_lookup in the node's network namespace: a new connection from or to an enrolled
/// workload goes to the matching proxy listener, or is dropped when that listener is not
/// registered (proxy down) — it never falls through to a direct path.
#[sk_lookup]
pub fn mp_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // Every field is read up front, in straight-line code: reads under a branch get merged
    // by LLVM into one load at a computed offset, which the verifier rejects ("dereference
    // of modified ctx ptr"). Reading the IPv6 words of an IPv4 lookup is allowed (zeros).
    // SAFETY (for each `ctx_field!`): `lookup` is the context pointer the kernel handed to
    // this program, and every read is a plain u32 field at a constant offset.
    let family = ctx_field!(l, family);
    let protocol = ctx_field!(l, protocol);
    let local_port = ctx_field!(l, local_port);
    let remote4 = ctx_field!(l, remote_ip4);
    let local4 = ctx_field!(l, local_ip4);
    let remote6 = [
        ctx_field!(l, remote_ip6[0]),
        ctx_field!(l, remote_ip6[1]),
        ctx_field!(l, remote_ip6[2]),
        ctx_field!(l, remote_ip6[3]),
    ];
    let local6 = [
        ctx_field!(l, local_ip6[0]),
        ctx_field!(l, local_ip6[1]),
        ctx_field!(l, local_ip6[2]),
        ctx_field!(l, local_ip6[3]),
    ];
    let (remote, local) = match family {
        AF_INET => (WorkloadKey::from_v4(remote4.to_ne_bytes()), WorkloadKey::from_v4(local4.to_ne_bytes())),
        AF_INET6 => (WorkloadKey::from_v6(ip6_bytes(remote6)), WorkloadKey::from_v6(ip6_bytes(local6))),
        _ => return sk_action::SK_PASS,
    };
    if protocol != IPPROTO_TCP as u32 {
        return sk_action::SK_PASS;
    }
    let src_enrolled = workload(&remote).is_some();
    let dst_enrolled = workload(&local).is_some();
    let Some(listener) = Listener::steer(src_enrolled, dst_enrolled, local_port as u16) else {
        return sk_action::SK_PASS;
    };
    if MP_LISTENERS.assign(ctx, listener.slot(family == AF_INET6)) {
        count(Counter::Steered);
        sk_action::SK_PASS
    } else {
        dropped(DropReason::MissingSocket, 0, remote, local, IPPROTO_TCP);
        sk_action::SK_DROP
    }
}

/// `bpf_sk_lookup.*_ip6` are four network-order words: their in-memory bytes are the address.
#[inline(always)]
fn ip6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any reachable panic path; this only satisfies the compiler.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
