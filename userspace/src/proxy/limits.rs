//! How many connections the proxy holds at once, in all and per client address, so that a
//! flood (idle connections to every listener) is refused at the door instead of eating the
//! file descriptors the daemon needs for its own work (netlink, the maps, probes).
//!
//! Each slot stands for a proxied connection or HBONE stream: two file descriptors at most.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;

/// File descriptors kept back from the connection budget for the daemon's own use.
pub const FD_RESERVE: u64 = 512;

/// Why a connection was refused at the door.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    /// The node's budget is spent.
    Node,
    /// This client address holds its share already.
    Source,
}

/// The budget and what is in use.
#[derive(Debug)]
pub struct Limits {
    max_total: usize,
    max_per_source: usize,
    open: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    /// When a refusal was last logged, and refusals since.
    last_logged: Mutex<(Option<Instant>, u64)>,
}

/// One admitted connection; gives its slot back when dropped.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<Limits>,
    source: IpAddr,
}

impl Limits {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_source,
            open: AtomicUsize::new(0),
            per_source: Mutex::default(),
            last_logged: Mutex::new((None, 0)),
        })
    }

    /// The budget that fits `fds` file descriptors: two per slot, after the reserve; each
    /// client address may hold an eighth of it (a handful of flooding pods cannot starve
    /// the rest).
    pub fn for_fd_limit(fds: u64) -> (usize, usize) {
        let total = (fds.saturating_sub(FD_RESERVE) / 2).max(1) as usize;
        (total, (total / 8).max(1))
    }

    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// Slots in use.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A slot for a connection from `source`, or why there is none.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Over> {
        let source = source.to_canonical();
        let mut per = lock(&self.per_source);
        let held = per.get(&source).copied().unwrap_or(0);
        let over = if held >= self.max_per_source {
            Some(Over::Source)
        } else if self.open.load(Ordering::Relaxed) >= self.max_total {
            Some(Over::Node)
        } else {
            None
        };
        if let Some(over) = over {
            drop(per);
            self.refusal(over, source);
            return Err(over);
        }
        per.insert(source, held + 1);
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Slot { limits: self.clone(), source })
    }

    /// A slot for a connection a predecessor admitted and handed over: taken even past the
    /// limits, since refusing it now would cut an established connection.
    pub fn carry(self: &Arc<Self>, source: IpAddr) -> Slot {
        let source = source.to_canonical();
        *lock(&self.per_source).entry(source).or_insert(0) += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Slot { limits: self.clone(), source }
    }

    /// Counts a refusal; logs one line per interval at most, with how many it stands for.
    fn refusal(&self, over: Over, source: IpAddr) {
        let mut last = lock(&self.last_logged);
        last.1 += 1;
        if last.0.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            let (what, cap) = match over {
                Over::Node => ("the node's connection limit", self.max_total),
                Over::Source => ("the connection limit per client address", self.max_per_source),
            };
            tracing::warn!(%source, refused = last.1, limit = cap, "refusing connections: {what} is reached");
            *last = (Some(Instant::now()), 0);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per = lock(&self.limits.per_source);
        if let Some(n) = per.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.source);
            }
        }
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Raises this process's soft limit on open files to its hard limit; the limit now.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-files limit; assuming 1024");
            1024
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_source_and_in_all_and_come_back() {
        let l = Limits::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let s1 = l.admit(a).unwrap();
        let _s2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Over::Source);
        let _s3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Over::Node);
        assert_eq!(l.open(), 3);
        drop(s1);
        assert!(l.admit(b).is_ok(), "a freed slot is free for anyone");
        // A v4-mapped address is the same client.
        let one = Limits::new(10, 1);
        let _held = one.admit(a).unwrap();
        assert_eq!(one.admit("::ffff:10.0.0.1".parse().unwrap()).unwrap_err(), Over::Source);
    }

    #[test]
    fn the_budget_keeps_a_reserve_and_halves_per_source() {
        assert_eq!(Limits::for_fd_limit(20_000), (9_744, 1_218));
        assert_eq!(Limits::for_fd_limit(100), (1, 1));
    }
}
