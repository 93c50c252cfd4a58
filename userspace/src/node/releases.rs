//! Releases held back. A workload IP that leaves the desired state keeps its place (in the
//! map, in the proxy's index, under its old workload) for a bounded time: a source that
//! passes through a short state (a file written in place, a watch that relists) must not
//! send pods around the proxy meanwhile. A hold ends
//! - when the IP comes back in the desired state (under any workload: the new entry wins at
//!   once, so an IP is never served under its old pod's identity once another claims it);
//! - when the kernel says the old pod is gone (its interface or namespace went, or the IP is
//!   now behind another interface): the reconciler confirms such releases at once;
//! - at its deadline.
//!
//! New IPs are never held back: a capture is not delayed by any of this.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::workloads::{Workload, WorkloadFile};

/// Held IPs and the workloads they were released from.
#[derive(Debug)]
pub struct Releases {
    hold: Duration,
    /// IP → the workload it belonged to (with that IP alone), and when its hold ends.
    held: BTreeMap<IpAddr, (Workload, Instant)>,
    /// The desired state last given (what a new one is compared with).
    desired: WorkloadFile,
}

impl Releases {
    pub fn new(hold: Duration) -> Self {
        Self { hold, held: BTreeMap::new(), desired: WorkloadFile::default() }
    }

    /// Takes a new desired state: IPs it drops are held (with a log line), IPs it brings
    /// back end their hold.
    pub fn update(&mut self, desired: WorkloadFile, now: Instant) {
        let wanted: BTreeSet<IpAddr> = ips(&desired).map(|(ip, _)| ip).collect();
        let back: Vec<IpAddr> = self.held.keys().filter(|ip| wanted.contains(ip)).copied().collect();
        for ip in back {
            if let Some((w, _)) = self.held.remove(&ip) {
                tracing::info!(workload = %w.id(), %ip, "back in the desired state; its release is cancelled");
            }
        }
        if !self.hold.is_zero() {
            let deadline = now + self.hold;
            for (ip, w) in ips(&self.desired).filter(|(ip, _)| !wanted.contains(ip)) {
                let alone = Workload { ips: vec![ip], ..w.clone() };
                tracing::info!(workload = %w.id(), %ip, hold = ?self.hold, "left the desired state; released after the hold unless it comes back");
                self.held.insert(ip, (alone, deadline));
            }
        }
        self.desired = desired;
    }

    /// Ends the holds whose time is up; whether any ended.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.held.len();
        self.held.retain(|ip, (w, deadline)| {
            let keep = *deadline > now;
            if !keep {
                tracing::info!(workload = %w.id(), %ip, "hold over; released");
            }
            keep
        });
        self.held.len() != before
    }

    /// Ends the holds of `ips` at once (the kernel says their pod is gone); whether any ended.
    pub fn confirm(&mut self, ips: &[(IpAddr, String)]) -> bool {
        let mut any = false;
        for (ip, why) in ips {
            if let Some((w, _)) = self.held.remove(ip) {
                tracing::info!(workload = %w.id(), %ip, "released at once: {why}");
                any = true;
            }
        }
        any
    }

    /// When the next hold ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.values().map(|(_, d)| *d).min()
    }

    /// The IPs held now.
    pub fn held(&self) -> BTreeSet<IpAddr> {
        self.held.keys().copied().collect()
    }

    /// The state to apply: the desired one and, after it, each held IP under its old
    /// workload.
    pub fn effective(&self) -> WorkloadFile {
        let mut out = self.desired.clone();
        out.workloads.extend(self.held.values().map(|(w, _)| w.clone()));
        out
    }
}

fn ips(f: &WorkloadFile) -> impl Iterator<Item = (IpAddr, &Workload)> {
    f.workloads.iter().flat_map(|w| w.ips.iter().map(move |ip| (ip.to_canonical(), w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str, ips: &[&str]) -> Workload {
        Workload {
            name: name.into(),
            namespace: "ns".into(),
            service_account: format!("sa-{name}"),
            node: "n1".into(),
            ips: ips.iter().map(|i| i.parse().expect("an IP")).collect(),
        }
    }

    fn file(ws: &[Workload]) -> WorkloadFile {
        WorkloadFile { workloads: ws.to_vec() }
    }

    fn owners(f: &WorkloadFile) -> Vec<(String, String)> {
        let mut v: Vec<_> = ips(f).map(|(ip, w)| (ip.to_string(), w.name.clone())).collect();
        v.sort();
        v
    }

    const HOLD: Duration = Duration::from_secs(5);

    #[test]
    fn a_short_state_holds_what_it_drops_and_the_full_one_cancels_the_hold() {
        let t0 = Instant::now();
        let mut r = Releases::new(HOLD);
        let full = file(&[w("a", &["10.0.0.1"]), w("e", &["10.0.0.2", "fd00::2"])]);
        r.update(full.clone(), t0);
        assert!(r.held().is_empty(), "nothing was released");
        // A file written in place: only a's entry for a moment.
        r.update(file(&[w("a", &["10.0.0.1"])]), t0 + Duration::from_millis(100));
        assert_eq!(r.held().len(), 2);
        assert_eq!(owners(&r.effective()), owners(&full), "e's IPs stay under e while held");
        r.update(full.clone(), t0 + Duration::from_millis(800));
        assert!(r.held().is_empty());
        assert!(r.next_deadline().is_none());
        assert_eq!(r.effective(), full);
    }

    #[test]
    fn a_hold_ends_at_its_deadline_or_when_the_kernel_confirms_it() {
        let t0 = Instant::now();
        let mut r = Releases::new(HOLD);
        r.update(file(&[w("a", &["10.0.0.1"]), w("b", &["10.0.0.2"])]), t0);
        r.update(file(&[]), t0);
        assert_eq!(r.next_deadline(), Some(t0 + HOLD));
        assert!(!r.expire(t0 + HOLD - Duration::from_millis(1)));
        assert!(r.confirm(&[("10.0.0.2".parse().expect("an IP"), "its interface is gone".into())]));
        assert_eq!(owners(&r.effective()), [("10.0.0.1".to_string(), "a".to_string())]);
        assert!(r.expire(t0 + HOLD));
        assert!(r.effective().workloads.is_empty());
    }

    #[test]
    fn an_ip_claimed_by_another_workload_is_never_served_under_the_old_one() {
        let t0 = Instant::now();
        let mut r = Releases::new(HOLD);
        r.update(file(&[w("a", &["10.0.0.1"])]), t0);
        r.update(file(&[]), t0);
        r.update(file(&[w("b", &["10.0.0.1"])]), t0 + Duration::from_millis(10));
        assert!(r.held().is_empty());
        assert_eq!(owners(&r.effective()), [("10.0.0.1".to_string(), "b".to_string())]);
    }

    #[test]
    fn new_ips_are_not_delayed_and_no_hold_means_release_at_once() {
        let t0 = Instant::now();
        let mut r = Releases::new(Duration::ZERO);
        r.update(file(&[w("a", &["10.0.0.1"])]), t0);
        assert_eq!(owners(&r.effective()), [("10.0.0.1".to_string(), "a".to_string())]);
        r.update(file(&[]), t0);
        assert!(r.effective().workloads.is_empty());
    }

    #[test]
    fn a_workload_losing_one_of_its_ips_holds_that_one_only() {
        let t0 = Instant::now();
        let mut r = Releases::new(HOLD);
        r.update(file(&[w("e", &["10.0.0.2", "fd00::2"])]), t0);
        r.update(file(&[w("e", &["10.0.0.2"])]), t0);
        assert_eq!(r.held(), ["fd00::2".parse().expect("an IP")].into());
        assert_eq!(
            owners(&r.effective()),
            [("10.0.0.2".to_string(), "e".to_string()), ("fd00::2".to_string(), "e".to_string())]
        );
    }
}
