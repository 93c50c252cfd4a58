//! Any frame through the classifier's parser and decision, as the TC program runs them:
//! no panic, and a frame the parser calls IP has a verdict consistent with its addresses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpath_common::interface::{IF_POD, IF_WORKLOAD};
use meshpath_common::packet::{Flow, Frame, L3Start, parse};
use meshpath_common::verdict::{Ingress, Routes, Verdict, decide};
use meshpath_common::{WorkloadKey, WorkloadValue};

/// Routing answers taken from the input's first byte.
struct Fuzzed(u8);

impl Routes for Fuzzed {
    fn routes_back(&self, _: &Flow, _: u32) -> bool {
        self.0 & 1 != 0
    }
    fn delivers_locally(&self, _: &Flow, _: u32, _: u32) -> bool {
        self.0 & 2 != 0
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, frame)) = data.split_first() else { return };
    let start = if knobs & 4 != 0 { L3Start::Raw } else { L3Start::Ethernet };
    let parsed = parse(frame, start);
    let enrolled = WorkloadKey::from_v4([10, 244, 1, 10]);
    let lookup = |k: &WorkloadKey| (*k == enrolled).then_some(WorkloadValue::new(7));
    let iface = u32::from(knobs >> 3) & (IF_POD | IF_WORKLOAD);
    let at = Ingress { ifindex: 7, mark: u32::from(knobs), iface, via: 7 };
    let verdict = decide(&parsed, &at, lookup, &Fuzzed(knobs));
    if let Frame::Ip(flow) = parsed
        && lookup(&flow.src).is_none()
        && lookup(&flow.dst).is_none()
    {
        // Traffic of no enrolled workload is never captured, only marked for a NAT.
        assert_ne!(verdict, Verdict::Capture);
    } else {
        assert_ne!(verdict, Verdict::Unclaimed);
    }
});
