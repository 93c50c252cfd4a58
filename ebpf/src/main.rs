//! meshpath's kernel side: a TC classifier that marks traffic of enrolled workloads for
//! local delivery (and drops spoofed sources), and an sk_lookup dispatcher that hands those
//! connections to the proxy's listening sockets.
//!
//! The decisions themselves live in `meshpath_common` so they are unit-tested on the host;
//! these functions only read the packet and the maps.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_map_type, sk_action},
    btf_maps::{HashMap, PerCpuArray},
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release},
    macros::{btf_map, classifier, sk_lookup},
    programs::{SkLookupContext, TcContext},
};
use aya_log_ebpf::warn;
use meshpath_common::{
    Counter, Listener, WorkloadKey, WorkloadValue,
    names::MAX_WORKLOADS,
    packet::{self, IPPROTO_TCP, Packet, Verdict},
};

// BTF-defined maps: their key and value types travel with them, so bpftool (and
// `meshpath map`) can print entries as typed structs.
#[btf_map]
static MP_WORKLOADS: HashMap<WorkloadKey, WorkloadValue, { MAX_WORKLOADS as usize }> = HashMap::new();

#[btf_map]
static MP_WORKLOAD_IFS: HashMap<u32, u32, { MAX_WORKLOADS as usize }> = HashMap::new();

#[btf_map]
static MP_LISTENERS: ListenerMap<{ Listener::SLOTS as usize }> = ListenerMap::new();

#[btf_map]
static MP_COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

/// A SOCKMAP with 8-byte values. Userspace then reads a slot as the socket's cookie, or
/// ENOENT when it is empty (with 4-byte values every read fails alike with ENOSPC), which is
/// how `meshpath status` tells a registered listener from a missing one. aya-ebpf's
/// `SockMap` fixes 4-byte values, so the BTF map definition is spelled out here, in
/// libbpf's layout: each field's pointee encodes one attribute.
#[repr(C)]
struct ListenerMap<const N: usize> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SOCKMAP as usize],
    key: *const u32,
    value: *const u64,
    max_entries: *const [i32; N],
}

// SAFETY: the fields are never dereferenced; they only carry types into BTF. The kernel
// owns the map behind this symbol and synchronises access to it.
unsafe impl<const N: usize> Sync for ListenerMap<N> {}

impl<const N: usize> ListenerMap<N> {
    const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
        }
    }

    /// Hands the connection of `ctx` to the socket in slot `index`; `false` when the slot
    /// is empty or the socket refuses it.
    #[inline(always)]
    fn assign(&self, ctx: &SkLookupContext, index: u32) -> bool {
        // SAFETY: `self` is the map the loader created for this symbol and `index` a live
        // u32 key; the helper returns a referenced socket or null.
        let sk =
            unsafe { bpf_map_lookup_elem(self as *const Self as *mut c_void, &index as *const u32 as *const c_void) };
        if sk.is_null() {
            return false;
        }
        // SAFETY: `sk` is the non-null socket just looked up; it is released exactly once.
        let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk, 0) };
        // SAFETY: as above; the reference taken by the lookup is dropped here.
        unsafe { bpf_sk_release(sk) };
        ret == 0
    }
}

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

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = MP_COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: the slot is this CPU's own copy and programs don't migrate mid-run.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn workload(key: &WorkloadKey) -> Option<WorkloadValue> {
    // SAFETY: values are plain data copied out at once; a concurrent delete cannot
    // free them under us within this RCU read section.
    unsafe { MP_WORKLOADS.get(key).copied() }
}

/// Reads packet bytes through `bpf_skb_load_bytes`, which also works on non-linear skbs.
struct Skb<'a>(&'a TcContext);

impl Packet for Skb<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(offset).ok()
    }
}

/// TC ingress on pod-facing veths and uplinks. Returns `TC_ACT_UNSPEC` to let the packet
/// continue (to the next TCX program, or the stack) so meshpath chains with other programs.
#[classifier]
pub fn mp_tc_ingress(ctx: TcContext) -> i32 {
    try_tc_ingress(&ctx)
}

#[inline(always)]
fn try_tc_ingress(ctx: &TcContext) -> i32 {
    let Some(flow) = packet::parse(&Skb(ctx)) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: `skb` is the context pointer the kernel handed to this program.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    let from_workload_if = MP_WORKLOAD_IFS.get_ptr(ifindex).is_some();
    match packet::classify(&flow, mark, ifindex, from_workload_if, workload(&flow.src), workload(&flow.dst)) {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Capture => {
            ctx.set_mark(packet::captured_mark(mark));
            count(Counter::Classified);
            TC_ACT_UNSPEC
        }
        Verdict::DropSpoofed => {
            count(Counter::SpoofDropped);
            warn!(ctx, "dropped packet with an enrolled source on foreign ifindex {}", ifindex);
            TC_ACT_SHOT
        }
        Verdict::DropMalformed => {
            count(Counter::Malformed);
            TC_ACT_SHOT
        }
    }
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
    match MP_LISTENERS.assign(ctx, listener.slot(family == AF_INET6)) {
        true => {
            count(Counter::Steered);
            sk_action::SK_PASS
        }
        false => {
            count(Counter::MissingSocket);
            warn!(ctx, "no proxy socket for listener slot {}: connection dropped", listener.slot(family == AF_INET6));
            sk_action::SK_DROP
        }
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
