//! Drop events: what the datapath tells the daemon about a packet or connection it
//! dropped, through [`crate::names::MAP_EVENTS`]. The kernel side sends at most one per
//! reason per CPU per [`EVENT_INTERVAL_NS`]; the counters count every drop.

use crate::verdict::DropReason;
use crate::workload::WorkloadKey;

/// Minimum time between two events of one reason on one CPU.
pub const EVENT_INTERVAL_NS: u64 = 100_000_000;

/// One dropped packet (or connection, for sk_lookup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct DropEvent {
    /// [`DropReason`] as its code.
    pub reason: u32,
    /// The interface it arrived on (0 for sk_lookup, which sees no interface).
    pub ifindex: u32,
    pub src: WorkloadKey,
    pub dst: WorkloadKey,
    /// Upper-layer protocol.
    pub proto: u8,
    pub _pad: [u8; 3],
    /// Drops of this reason on this CPU not sent as events since the last one.
    pub suppressed: u32,
}

impl DropEvent {
    pub const SIZE: usize = 48;

    pub fn reason(&self) -> Option<DropReason> {
        DropReason::from_code(self.reason)
    }

    /// Reads an event from the ring buffer's bytes (native byte order); `None` when short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let u32_at = |o: usize| Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let key_at = |o: usize| Some(WorkloadKey { addr: b.get(o..o + 16)?.try_into().ok()? });
        Some(Self {
            reason: u32_at(0)?,
            ifindex: u32_at(4)?,
            src: key_at(8)?,
            dst: key_at(24)?,
            proto: *b.get(40)?,
            _pad: [0; 3],
            suppressed: u32_at(44)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout_has_no_implicit_padding() {
        assert_eq!(offset_of!(DropEvent, src), 8);
        assert_eq!(offset_of!(DropEvent, dst), 24);
        assert_eq!(offset_of!(DropEvent, proto), 40);
        assert_eq!(offset_of!(DropEvent, suppressed), 44);
        assert_eq!(size_of::<DropEvent>(), DropEvent::SIZE);
    }

    #[test]
    fn reads_back_what_the_kernel_writes() {
        let e = DropEvent {
            reason: DropReason::NoRouteBack as u32,
            ifindex: 7,
            src: WorkloadKey::from_v4([10, 244, 2, 10]),
            dst: WorkloadKey::from_v4([10, 244, 1, 12]),
            proto: 6,
            _pad: [0; 3],
            suppressed: 41,
        };
        let mut b = [0u8; DropEvent::SIZE];
        b[..4].copy_from_slice(&e.reason.to_ne_bytes());
        b[4..8].copy_from_slice(&e.ifindex.to_ne_bytes());
        b[8..24].copy_from_slice(&e.src.addr);
        b[24..40].copy_from_slice(&e.dst.addr);
        b[40] = 6;
        b[44..].copy_from_slice(&41u32.to_ne_bytes());
        assert_eq!(DropEvent::from_bytes(&b), Some(e));
        assert_eq!(DropEvent::from_bytes(&b[..47]), None);
    }
}
