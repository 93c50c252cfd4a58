//! The one way work is told to stop: a [`Trigger`] and its [`Watcher`]s (as ztunnel's
//! `drain.rs`). Every task or connection that must end with its owner holds a watcher; the
//! owner starts a drain and waits, up to a deadline, for every watcher to be dropped.
//!
//! A drain has two steps. [`Mode::Graceful`]: take no new work, let what is under way finish
//! (listeners close, HBONE peers get a GOAWAY). [`Mode::Immediate`]: stop now (what is still
//! open is cut, and says so in its record). [`Trigger::drain`] takes both steps, the second
//! only when the deadline passes with watchers left.

use std::time::Duration;

use tokio::sync::watch;

/// How work is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Take nothing new; finish what is under way.
    Graceful,
    /// Stop now.
    Immediate,
}

/// The owner's end.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<Option<Mode>>,
}

/// A holder's end: held for as long as its work runs, dropped when the work is done.
#[derive(Clone, Debug)]
pub struct Watcher {
    rx: watch::Receiver<Option<Mode>>,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every watcher was dropped within the deadline.
    Finished,
    /// These many were still held at the deadline, and were told to stop at once.
    Cut(usize),
}

/// A new trigger and its first watcher.
pub fn new() -> (Trigger, Watcher) {
    let (tx, rx) = watch::channel(None);
    (Trigger { tx }, Watcher { rx })
}

impl Trigger {
    /// Asks every watcher to stop in `mode` (a later, stronger mode overrides a weaker one;
    /// never the other way).
    pub fn start(&self, mode: Mode) {
        self.tx.send_if_modified(|m| {
            let stronger = m.is_none_or(|now| mode > now);
            if stronger {
                *m = Some(mode);
            }
            stronger
        });
    }

    /// Watchers still held.
    pub fn held(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Resolves once every watcher is dropped (at once when none is held).
    pub async fn released(&self) {
        self.tx.closed().await;
    }

    /// Another watcher (for work started by the owner itself).
    pub fn watcher(&self) -> Watcher {
        Watcher { rx: self.tx.subscribe() }
    }

    /// Starts a graceful drain and waits up to `deadline` for every watcher to go; what is
    /// left then is told to stop at once.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        self.start(Mode::Graceful);
        if tokio::time::timeout(deadline, self.tx.closed()).await.is_ok() {
            return Drained::Finished;
        }
        let left = self.held();
        self.start(Mode::Immediate);
        if left == 0 { Drained::Finished } else { Drained::Cut(left) }
    }

    /// Stops everything at once and waits up to `grace` for the watchers to go (their work
    /// writes its records on the way out).
    pub async fn stop(&self, grace: Duration) {
        self.start(Mode::Immediate);
        let _ = tokio::time::timeout(grace, self.tx.closed()).await;
    }
}

impl Watcher {
    /// The mode asked for so far, if any.
    pub fn mode(&self) -> Option<Mode> {
        *self.rx.borrow()
    }

    /// Resolves once a drain of at least `mode` has started (never if the trigger is dropped
    /// without one: an owner that goes away without draining asks nothing).
    pub async fn at_least(&mut self, mode: Mode) {
        if self.rx.wait_for(|m| m.is_some_and(|m| m >= mode)).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once any drain has started.
    pub async fn signalled(&mut self) -> Mode {
        self.at_least(Mode::Graceful).await;
        self.mode().unwrap_or(Mode::Graceful)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_drain_waits_for_every_watcher_and_cuts_the_rest_at_the_deadline() {
        let (trigger, w) = new();
        let (quick, slow) = (w.clone(), w);
        let finished = tokio::spawn(async move {
            let mut quick = quick;
            assert_eq!(quick.signalled().await, Mode::Graceful);
        });
        let cut = tokio::spawn(async move {
            let mut slow = slow;
            slow.at_least(Mode::Immediate).await;
        });
        assert_eq!(trigger.held(), 2);
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, Drained::Cut(1));
        finished.await.unwrap();
        cut.await.unwrap();
        assert_eq!(trigger.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_with_nothing_held_ends_at_once() {
        let (trigger, w) = new();
        drop(w);
        let started = tokio::time::Instant::now();
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, Drained::Finished);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_weaker_mode_never_overrides_a_stronger_one() {
        let (trigger, w) = new();
        assert_eq!(w.mode(), None);
        trigger.start(Mode::Immediate);
        trigger.start(Mode::Graceful);
        assert_eq!(w.mode(), Some(Mode::Immediate));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_trigger_asks_nothing() {
        let (trigger, mut w) = new();
        drop(trigger);
        let asked = tokio::time::timeout(Duration::from_secs(60), w.signalled()).await;
        assert!(asked.is_err(), "a watcher of a dropped trigger was told to stop");
    }
}
