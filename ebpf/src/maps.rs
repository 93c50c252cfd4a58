//! The maps both programs use. BTF-defined, so their key and value types travel with them
//! and bpftool (and `meshpath map`) print entries as typed structs.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_map_type,
    btf_maps::{HashMap, PerCpuArray, RingBuf},
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release},
    macros::btf_map,
    programs::SkLookupContext,
};
use meshpath_common::{
    Counter, DropEvent, DropReason, InterfaceValue, Listener, WorkloadKey, WorkloadValue, names::MAX_WORKLOADS,
};

/// `bpf_sk_assign` flags (uapi `BPF_SK_LOOKUP_F_*`): replace what an earlier program in the
/// chain selected, and skip the reuseport group's own selection.
const BPF_SK_LOOKUP_F_REPLACE: u64 = 1 << 0;
const BPF_SK_LOOKUP_F_NO_REUSEPORT: u64 = 1 << 1;

#[btf_map]
static MP_WORKLOADS: HashMap<WorkloadKey, WorkloadValue, { MAX_WORKLOADS as usize }> = HashMap::new();

#[btf_map]
static MP_INTERFACES: HashMap<u32, InterfaceValue, { MAX_WORKLOADS as usize }> = HashMap::new();

#[btf_map]
pub static MP_LISTENERS: ListenerMap<{ Listener::SLOTS as usize }> = ListenerMap::new();

#[btf_map]
static MP_COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

/// 64 KiB: events are rate-limited per reason and CPU, so this never fills in practice,
/// and a full buffer only loses the event (the counter still counts).
#[btf_map]
static MP_EVENTS: RingBuf<DropEvent, { 64 * 1024 }> = RingBuf::new();

/// Per reason (indexed by its code), on each CPU: when it last sent an event, and the drops
/// since.
#[btf_map]
static MP_EVENT_STATE: PerCpuArray<EventState, { DropReason::ALL.len() + 1 }> = PerCpuArray::new();

#[repr(C)]
pub struct EventState {
    last_ns: u64,
    suppressed: u32,
    _pad: u32,
}

#[inline(always)]
pub fn workload(key: &WorkloadKey) -> Option<WorkloadValue> {
    // SAFETY: values are plain data copied out at once; a concurrent delete cannot free them
    // under us within this RCU read section.
    unsafe { MP_WORKLOADS.get(key).copied() }
}

/// What meshpath knows of an interface (no flags when it does not know it).
#[inline(always)]
pub fn interface(ifindex: u32) -> InterfaceValue {
    // SAFETY: as for `workload`: plain data, copied at once.
    unsafe { MP_INTERFACES.get(ifindex).copied().unwrap_or(InterfaceValue::new(0)) }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = MP_COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: the slot is this CPU's own copy and programs don't migrate mid-run.
        unsafe { *slot += 1 };
    }
}

/// Counts a drop and, at most once per reason and CPU per interval, tells the daemon.
#[inline(always)]
pub fn dropped(reason: DropReason, ifindex: u32, src: WorkloadKey, dst: WorkloadKey, proto: u8) {
    count(reason.counter());
    let Some(state) = MP_EVENT_STATE.get_ptr_mut(reason as u32) else { return };
    // SAFETY: no helper arguments; it reads the monotonic clock.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // SAFETY: this CPU's own slot, and programs don't migrate mid-run.
    let state = unsafe { &mut *state };
    if now.wrapping_sub(state.last_ns) < meshpath_common::event::EVENT_INTERVAL_NS {
        state.suppressed = state.suppressed.saturating_add(1);
        return;
    }
    let event =
        DropEvent { reason: reason as u32, ifindex, src, dst, proto, _pad: [0; 3], suppressed: state.suppressed };
    if MP_EVENTS.output(event, 0).is_ok() {
        state.last_ns = now;
        state.suppressed = 0;
    }
}

/// A SOCKMAP with 8-byte values. Userspace then reads a slot as the socket's cookie, or
/// ENOENT when it is empty (with 4-byte values every read fails alike with ENOSPC), which is
/// how `meshpath status` tells a registered listener from a missing one. aya-ebpf's
/// `SockMap` fixes 4-byte values, so the BTF map definition is spelled out here, in
/// libbpf's layout: each field's pointee encodes one attribute.
#[repr(C)]
pub struct ListenerMap<const N: usize> {
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
    pub fn assign(&self, ctx: &SkLookupContext, index: u32) -> bool {
        // SAFETY: `self` is the map the loader created for this symbol and `index` a live
        // u32 key; the helper returns a referenced socket or null.
        let sk =
            unsafe { bpf_map_lookup_elem(self as *const Self as *mut c_void, &index as *const u32 as *const c_void) };
        if sk.is_null() {
            return false;
        }
        // The slot names the one socket to use. REPLACE: during a takeover the old and the
        // new daemon's programs both run (on the same map), and without it the second one's
        // assign fails with EEXIST; it also keeps an enrolled flow the mesh's whatever another
        // sk_lookup program chose. NO_REUSEPORT: the listeners share their ports with a
        // successor's (SO_REUSEPORT), and the kernel must not spread connections over both.
        let flags = BPF_SK_LOOKUP_F_REPLACE | BPF_SK_LOOKUP_F_NO_REUSEPORT;
        // SAFETY: `sk` is the non-null socket just looked up; it is released exactly once.
        let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk, flags) };
        // SAFETY: as above; the reference taken by the lookup is dropped here.
        unsafe { bpf_sk_release(sk) };
        ret == 0
    }
}
