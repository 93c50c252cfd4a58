//! Keeps the redirection annotation of this node's pods in step with what the datapath
//! captures: set once every IP of a pod is in the map behind its interface and the
//! listeners are registered, removed once the pod is released. Patches run on a task of
//! their own (the daemon never waits on the API server); a failed one is retried with
//! backoff and logged once per streak.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;

use crate::drain;
use crate::k8s::annotate::{self, Patched};

/// The first retry of a failed patch; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Pods (`namespace/name`) and whether each should carry the annotation.
pub type Wanted = BTreeMap<String, bool>;

/// The daemon's end: what it wants annotated.
pub struct Annotations {
    tx: watch::Sender<Wanted>,
}

impl Annotations {
    /// Starts the task patching through `client`, until `stop`.
    pub fn spawn(client: Client, stop: drain::Watcher) -> Self {
        let (tx, rx) = watch::channel(Wanted::new());
        tokio::spawn(follow(client, rx, stop));
        Self { tx }
    }

    /// The annotations wanted now (a pod not named is left as it is).
    pub fn want(&self, wanted: Wanted) {
        self.tx.send_if_modified(|w| {
            let changed = *w != wanted;
            *w = wanted;
            changed
        });
    }
}

/// What the task has applied, and the retries it owes.
#[derive(Default)]
struct Applied {
    done: BTreeMap<String, bool>,
    /// Pods whose last patch failed: when to try again, and the backoff so far.
    failing: BTreeMap<String, (tokio::time::Instant, Duration)>,
}

async fn follow(client: Client, mut rx: watch::Receiver<Wanted>, mut stop: drain::Watcher) {
    let mut applied = Applied::default();
    loop {
        let wanted = rx.borrow_and_update().clone();
        applied.done.retain(|pod, _| wanted.contains_key(pod));
        applied.failing.retain(|pod, _| wanted.contains_key(pod));
        for (pod, on) in &wanted {
            if applied.done.get(pod) != Some(on) && applied.due(pod) {
                applied.patch(&client, pod, *on).await;
            }
        }
        let retry = applied.failing.values().map(|(at, _)| *at).min();
        tokio::select! {
            _ = stop.signalled() => return,
            r = rx.changed() => if r.is_err() { return },
            () = super::sleep_until(retry) => {}
        }
    }
}

impl Applied {
    fn due(&self, pod: &str) -> bool {
        self.failing.get(pod).is_none_or(|(at, _)| *at <= tokio::time::Instant::now())
    }

    async fn patch(&mut self, client: &Client, pod: &str, on: bool) {
        let what = if on { "set" } else { "removed" };
        match annotate::set_redirection(client, pod, on).await {
            Ok(result) => {
                if self.failing.remove(pod).is_some() {
                    tracing::info!(%pod, "redirection annotation {what} after earlier failures");
                } else if result == Patched::Done {
                    tracing::info!(%pod, "redirection annotation {what}");
                }
                self.done.insert(pod.to_owned(), on);
            }
            Err(e) => {
                let backoff = self.failing.get(pod).map_or(FIRST_BACKOFF, |(_, b)| (*b * 2).min(MAX_BACKOFF));
                if !self.failing.contains_key(pod) {
                    tracing::warn!(%pod, "redirection annotation not {what} (retrying with backoff up to {MAX_BACKOFF:?}): {e}");
                }
                self.failing.insert(pod.to_owned(), (tokio::time::Instant::now() + backoff, backoff));
            }
        }
    }
}
