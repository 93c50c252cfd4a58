//! A daemon's life, as a type: the phases it passes through, the only transitions between
//! them, and what "ready" means. The driver in [`super`] does the work of each phase; what
//! may follow what is decided here alone, and unit-tested.
//!
//! ```text
//!            first state applied, pods placed, listeners registered
//!  Starting ───────────────────────────────────────────────▶ Serving ──stop──▶ Draining ─▶ Stopped
//!     ▲  │ stopped before the first state / failed                 │
//!     │  └──────────────────────────────────────────▶ Stopped      │ a successor took the slots
//!     │                                                            ▼
//!     │      the node unserved (the successor died)          SteppingDown ──stop came already──▶ Stopped
//!     ├──────────────────────────────────────────────────────────┤ │ relays handed over, drained
//!     │                                                            ▼
//!     └──────────────────────────── the node unserved ────────── Standby ──stop──▶ Stopped
//! ```
//!
//! A daemon taken over stays in `Standby` until its stop signal (kubelet sends it once the
//! new pod is ready), so that a successor that dies after taking the slots does not leave
//! the node dark: the old daemon sees the slots empty and serves again.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::sync::lock;

/// Where a daemon is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Loading, waiting for the first state, reconciling; its sockets are not in the SOCKMAP.
    Starting,
    /// Its listeners are in the SOCKMAP; it follows the desired state and the kernel.
    Serving,
    /// A successor took the slots: lingering, handing plain relays over, draining.
    SteppingDown,
    /// Stepped down, waiting for the stop signal, watching that the node stays served.
    Standby,
    /// Stopping with no successor: listeners closed, open connections finishing.
    Draining,
    Stopped,
}

/// What happened, as far as the phase goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The start sequence completed: the daemon serves.
    Started,
    /// The start ended without serving (stop signal before the first state, or an error).
    StartEnded,
    /// The stop signal, with no successor on its way.
    Stop,
    /// A successor's sockets are in the slots; `signalled`: the stop signal came already.
    TakenOver { signalled: bool },
    /// The step-down finished; `signalled`: the stop signal came meanwhile.
    SteppedDown { signalled: bool },
    /// No socket serves the node any more (a successor died after taking over).
    Unserved,
    /// Open connections finished or were cut.
    Drained,
}

impl Phase {
    /// The phase `event` leads to, or `None` when it cannot happen in this one (a bug of
    /// the driver's, which keeps its phase and says so).
    pub fn next(self, event: Event) -> Option<Phase> {
        use Event as E;
        use Phase as P;
        Some(match (self, event) {
            (P::Starting, E::Started) => P::Serving,
            (P::Starting, E::StartEnded) => P::Stopped,
            (P::Serving, E::Stop) => P::Draining,
            (P::Serving, E::TakenOver { .. }) => P::SteppingDown,
            (P::SteppingDown, E::SteppedDown { signalled: true }) => P::Stopped,
            (P::SteppingDown, E::SteppedDown { signalled: false }) => P::Standby,
            (P::SteppingDown | P::Standby, E::Unserved) => P::Starting,
            (P::Standby, E::Stop) => P::Stopped,
            (P::Draining, E::Drained) => P::Stopped,
            _ => return None,
        })
    }

    pub const fn code(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::SteppingDown => "stepping_down",
            Phase::Standby => "standby",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        }
    }
}

/// What readiness waits for. Later sources of state (a control plane's first push,
/// certificates) add their conditions here, never a second definition of "ready".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Condition {
    /// The source's first complete desired state is applied.
    FirstState,
    /// A reconcile pass went through: every known pod of the node is enrolled, or its
    /// reason why not is logged.
    PodsPlaced,
    /// The proxy's listeners are in the SOCKMAP: connections reach this daemon.
    ListenersRegistered,
    /// The control plane's first push of each type is applied (istiod; met at once without).
    ControlPlaneSynced,
    /// Every identity of the node's workloads has a certificate (istiod; met at once with the
    /// built-in CA or certificate files, which fail per connection instead).
    Certificates,
}

impl Condition {
    pub const ALL: [Condition; 5] = [
        Condition::FirstState,
        Condition::PodsPlaced,
        Condition::ListenersRegistered,
        Condition::ControlPlaneSynced,
        Condition::Certificates,
    ];

    pub const fn code(self) -> &'static str {
        match self {
            Condition::FirstState => "first_state",
            Condition::PodsPlaced => "pods_placed",
            Condition::ListenersRegistered => "listeners_registered",
            Condition::ControlPlaneSynced => "control_plane_synced",
            Condition::Certificates => "certificates",
        }
    }
}

/// Whether the daemon is ready, as `/healthz/ready` answers it: every [`Condition`] met, and
/// no successor starting (during a takeover both daemons share the probe port, and kubelet
/// must not see the new pod ready through the old one).
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    inner: Arc<Mutex<ReadyState>>,
}

#[derive(Debug, Default)]
struct ReadyState {
    met: BTreeSet<Condition>,
    handing_over: bool,
}

impl Readiness {
    pub fn met(&self, c: Condition) {
        lock(&self.inner).met.insert(c);
    }

    pub fn unmet(&self, c: Condition) {
        lock(&self.inner).met.remove(&c);
    }

    pub fn is_met(&self, c: Condition) -> bool {
        lock(&self.inner).met.contains(&c)
    }

    pub fn set_handing_over(&self, on: bool) {
        lock(&self.inner).handing_over = on;
    }

    pub fn is_ready(&self) -> bool {
        self.why_not().is_none()
    }

    /// Why it is not ready: the conditions not met, or the takeover under way.
    pub fn why_not(&self) -> Option<String> {
        let s = lock(&self.inner);
        let missing: Vec<&str> = Condition::ALL.iter().filter(|c| !s.met.contains(c)).map(|c| c.code()).collect();
        match (missing.is_empty(), s.handing_over) {
            (true, false) => None,
            (true, true) => Some("a successor is starting".into()),
            (false, _) => Some(format!("waiting for {}", missing.join(", "))),
        }
    }
}

impl crate::admin::Ready for Readiness {
    fn why_not(&self) -> Option<String> {
        Readiness::why_not(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHASES: [Phase; 6] =
        [Phase::Starting, Phase::Serving, Phase::SteppingDown, Phase::Standby, Phase::Draining, Phase::Stopped];
    const EVENTS: [Event; 9] = [
        Event::Started,
        Event::StartEnded,
        Event::Stop,
        Event::TakenOver { signalled: false },
        Event::TakenOver { signalled: true },
        Event::SteppedDown { signalled: false },
        Event::SteppedDown { signalled: true },
        Event::Unserved,
        Event::Drained,
    ];

    #[test]
    fn only_a_start_leads_to_serving_and_nothing_leaves_stopped() {
        for p in PHASES {
            for e in EVENTS {
                if p.next(e) == Some(Phase::Serving) {
                    assert_eq!((p, e), (Phase::Starting, Event::Started));
                }
                if p == Phase::Stopped {
                    assert_eq!(p.next(e), None, "{e:?} left Stopped");
                }
            }
        }
    }

    #[test]
    fn a_taken_over_daemon_serves_again_when_the_node_is_unserved_and_stops_only_when_told() {
        let standby = Phase::Serving
            .next(Event::TakenOver { signalled: false })
            .and_then(|p| p.next(Event::SteppedDown { signalled: false }));
        assert_eq!(standby, Some(Phase::Standby));
        assert_eq!(Phase::Standby.next(Event::Unserved), Some(Phase::Starting));
        assert_eq!(Phase::SteppingDown.next(Event::Unserved), Some(Phase::Starting));
        assert_eq!(Phase::Standby.next(Event::Stop), Some(Phase::Stopped));
        // Taken over after the stop signal: it goes once stepped down.
        assert_eq!(Phase::SteppingDown.next(Event::SteppedDown { signalled: true }), Some(Phase::Stopped));
        // A serving daemon never "resumes": the node cannot be unserved while it serves.
        assert_eq!(Phase::Serving.next(Event::Unserved), None);
    }

    #[test]
    fn every_phase_but_stopped_has_a_way_out() {
        for p in PHASES.into_iter().filter(|p| *p != Phase::Stopped) {
            assert!(EVENTS.iter().any(|e| p.next(*e).is_some()), "{p:?} is a dead end");
        }
    }

    #[test]
    fn ready_only_with_every_condition_and_no_successor_starting() {
        let r = Readiness::default();
        assert_eq!(
            r.why_not().as_deref(),
            Some("waiting for first_state, pods_placed, listeners_registered, control_plane_synced, certificates")
        );
        for c in Condition::ALL {
            assert!(!r.is_ready());
            r.met(c);
        }
        assert!(r.is_ready());
        r.set_handing_over(true);
        assert_eq!(r.why_not().as_deref(), Some("a successor is starting"));
        r.set_handing_over(false);
        r.unmet(Condition::ListenersRegistered);
        assert_eq!(r.why_not().as_deref(), Some("waiting for listeners_registered"));
    }
}
