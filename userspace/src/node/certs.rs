//! The certificates of the node's workloads, fetched ahead of their first connection, and
//! the readiness that waits for them under istiod. One task: it follows the set of local
//! identities, fetches what is missing, retries what failed every [`RETRY`] (the manager
//! spaces the calls to the CA out per identity), and logs a failure once per streak (a CA
//! that is down must not flood the log with one line per identity per state change).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::lifecycle::{Condition, Readiness};
use crate::drain;
use crate::identity::Identity;
use crate::identity::manager::CertificateManager;

/// How often identities without a certificate are tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Starts the task; send it the node's identities as they change. `required`: readiness
/// waits for every certificate (otherwise [`Condition::Certificates`] is met at once).
pub fn spawn(
    certs: Arc<CertificateManager>,
    ready: Readiness,
    required: bool,
    mut stop: drain::Watcher,
) -> watch::Sender<BTreeSet<Identity>> {
    let (tx, mut rx) = watch::channel(BTreeSet::new());
    if !required {
        ready.met(Condition::Certificates);
    }
    tokio::spawn(async move {
        let mut failing: BTreeSet<Identity> = BTreeSet::new();
        loop {
            let wanted = rx.borrow_and_update().clone();
            failing = fetch(&certs, &wanted, failing).await;
            if required {
                match failing.is_empty() {
                    true => ready.met(Condition::Certificates),
                    false => ready.unmet(Condition::Certificates),
                }
            }
            tokio::select! {
                _ = stop.signalled() => return,
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(RETRY), if !failing.is_empty() => {}
            }
        }
    });
    tx
}

/// Fetches every wanted certificate (the manager answers from its cache when it has one);
/// returns the identities still without one. `failing`: those without one before, whose
/// failure was logged already.
async fn fetch(
    certs: &CertificateManager,
    wanted: &BTreeSet<Identity>,
    failing: BTreeSet<Identity>,
) -> BTreeSet<Identity> {
    let mut still = BTreeSet::new();
    for id in wanted {
        match certs.get(id).await {
            Ok(_) if failing.contains(id) => tracing::info!(identity = %id, "certificate obtained"),
            Ok(_) => {}
            Err(e) => {
                if !failing.contains(id) {
                    tracing::error!(identity = %id, "no certificate for a local workload; its mTLS connections fail until there is one: {e}");
                }
                still.insert(id.clone());
            }
        }
    }
    still
}
