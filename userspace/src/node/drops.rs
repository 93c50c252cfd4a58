//! What the datapath dropped, told to the operator: the kernel sends rate-limited
//! [`DropEvent`]s, and this writes at most one line per reason per [`REPORT_INTERVAL`],
//! naming the addresses, the interface and the reason of one drop, with how many more drops
//! of that reason (on any interface: the kernel counts them per reason) it stands for.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use meshpath_common::{DropEvent, DropReason};

use crate::datapath::Events;

/// One line per reason and interface at most this often.
const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// A reason quiet this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Follows the events until `stop` is signalled.
pub(super) fn spawn(events: Events, mut stop: crate::drain::Watcher) {
    let mut fd = match crate::datapath::async_events(events) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow the datapath's drop events; drops are only counted");
            return;
        }
    };
    tokio::spawn(async move {
        let mut reports = Reports::default();
        loop {
            // No timer while nothing is held back: an idle node does no periodic work here.
            let due = reports.next_flush().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = stop.signalled() => return,
                () = super::sleep_until(due) => reports.flush(Instant::now()),
                ready = fd.readable_mut() => {
                    let Ok(mut guard) = ready else { return };
                    while let Some(item) = guard.get_inner_mut().next() {
                        if let Some(e) = DropEvent::from_bytes(&item) {
                            reports.event(&e, Instant::now());
                        }
                    }
                    guard.clear_ready();
                }
            }
        }
    });
}

/// Per reason: when a line was last written, the drops seen since, and the
/// latest event among them.
#[derive(Default)]
struct Reports {
    last: HashMap<u32, (Instant, u64, Option<DropEvent>)>,
}

impl Reports {
    fn event(&mut self, e: &DropEvent, now: Instant) {
        let drops = 1 + u64::from(e.suppressed);
        match self.last.get_mut(&e.reason) {
            Some(entry) if now.duration_since(entry.0) < REPORT_INTERVAL => {
                entry.1 += drops;
                entry.2 = Some(*e);
            }
            Some(entry) => {
                log(e, entry.1 + drops - 1);
                *entry = (now, 0, None);
            }
            None => {
                log(e, drops - 1);
                self.last.insert(e.reason, (now, 0, None));
            }
        }
    }

    /// When [`Reports::flush`] has something to do: a held-back line to write, or a quiet
    /// kind to forget.
    fn next_flush(&self) -> Option<Instant> {
        let due = |(at, held, _): &(Instant, u64, Option<DropEvent>)| {
            *at + if *held > 0 { REPORT_INTERVAL } else { FORGET_AFTER }
        };
        self.last.values().map(due).min()
    }

    /// Writes what was held back for longer than the interval.
    fn flush(&mut self, now: Instant) {
        for (at, held, last) in self.last.values_mut() {
            if *held > 0
                && now.duration_since(*at) >= REPORT_INTERVAL
                && let Some(e) = last.take()
            {
                log(&e, *held - 1);
                *at = now;
                *held = 0;
            }
        }
        // Kinds quiet for a while are forgotten: the table stays as small as what happens.
        self.last.retain(|_, (at, held, _)| *held > 0 || now.duration_since(*at) < FORGET_AFTER);
    }
}

fn log(e: &DropEvent, more: u64) {
    let Some(reason) = e.reason() else { return };
    let interface = if e.ifindex == 0 {
        "-".to_owned()
    } else {
        crate::routing::interface_name(e.ifindex).unwrap_or_else(|| format!("ifindex {}", e.ifindex))
    };
    let (src, dst) = (IpAddr::from(e.src), IpAddr::from(e.dst));
    let what = reason.describe();
    match reason {
        DropReason::MissingSocket => {
            tracing::warn!(reason = reason.name(), %src, %dst, more, "connection dropped: {what}")
        }
        _ => {
            tracing::warn!(reason = reason.name(), %interface, %src, %dst, proto = e.proto, more, "packet dropped: {what}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshpath_common::WorkloadKey;

    fn event(reason: DropReason, suppressed: u32) -> DropEvent {
        let k = WorkloadKey::from_v4([10, 0, 0, 1]);
        DropEvent { reason: reason as u32, ifindex: 3, src: k, dst: k, proto: 6, _pad: [0; 3], suppressed }
    }

    #[test]
    fn a_flood_is_one_line_per_interval_and_the_table_stays_small() {
        let mut r = Reports::default();
        let t0 = Instant::now();
        r.event(&event(DropReason::NoRouteBack, 0), t0);
        assert_eq!(r.last[&(DropReason::NoRouteBack as u32)].1, 0, "the first one is written at once");
        for i in 1..1000u32 {
            r.event(&event(DropReason::NoRouteBack, 4), t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(r.last[&(DropReason::NoRouteBack as u32)].1, 999 * 5, "held back, with the kernel's count");
        assert_eq!(r.next_flush(), Some(t0 + REPORT_INTERVAL), "woken when the held-back line is due");
        r.flush(t0 + REPORT_INTERVAL + Duration::from_secs(1));
        assert_eq!(r.last[&(DropReason::NoRouteBack as u32)].1, 0, "written once per interval");
        let written = t0 + REPORT_INTERVAL + Duration::from_secs(1);
        assert_eq!(r.next_flush(), Some(written + FORGET_AFTER), "then only to forget the kind");
        r.flush(t0 + 10 * REPORT_INTERVAL);
        assert!(r.last.is_empty(), "quiet kinds are forgotten");
        assert_eq!(r.next_flush(), None, "no timer on a quiet node");
    }
}
