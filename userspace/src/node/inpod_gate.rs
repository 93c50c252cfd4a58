//! Pods that still carry Istio's in-pod redirection are not captured. When a node moves from
//! ztunnel and istio-cni to meshpath, its running pods keep istio-cni's rules and ztunnel's
//! sockets inside their own namespaces until they restart; capturing them as well would
//! redirect their traffic twice. A gate between the source and the daemon: each local
//! workload is inspected once ([`crate::inpod`]; its namespace found in `--netns-dir`) before
//! the state that first names it is passed on, and one with traces is left out (one warning
//! line) until a state without it: a restarted pod is a new sandbox, inspected again.
//! A workload that cannot be inspected (no namespace found, a tool missing) is captured:
//! leaving it out would let its traffic around the proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use super::source::StateRx;
use crate::drain;
use crate::inpod::{self, InpodTraces};
use crate::pod_ports;
use crate::routing::Routing;
use crate::state::DesiredState;
use crate::workloads::Workload;

/// A workload as inspected: its id and addresses (a new address is a new sandbox).
type Key = (String, Vec<IpAddr>);

/// What an inspection found.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Clean,
    Traced(InpodTraces),
    /// It could not be inspected: captured, with the reason logged.
    Unchecked(String),
}

/// Passes `input` on, each state without the local workloads that carry in-pod traces.
pub fn gate(mut input: StateRx, node: String, netns_dir: PathBuf, mut stop: drain::Watcher) -> StateRx {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut verdicts: BTreeMap<Key, Verdict> = BTreeMap::new();
        loop {
            let state = input.borrow_and_update().clone();
            if let Some(state) = state {
                let local: BTreeSet<Key> = state.workloads.on_node(&node).map(key).collect();
                // Traced pods are looked at again: their rules may have been removed by hand.
                let before = std::mem::take(&mut verdicts);
                verdicts = before
                    .iter()
                    .filter(|(k, v)| local.contains(*k) && !matches!(v, Verdict::Traced(_)))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let new: Vec<Key> = local.iter().filter(|k| !verdicts.contains_key(*k)).cloned().collect();
                if !new.is_empty() {
                    let found = inspect(&netns_dir, &new).await;
                    log_changed(&found, &before);
                    verdicts.extend(found);
                }
                tx.send_replace(Some(without_traced(&state, &node, &verdicts)));
            }
            tokio::select! {
                _ = stop.signalled() => return,
                r = input.changed() => if r.is_err() { return },
            }
        }
    });
    rx
}

fn key(w: &Workload) -> Key {
    let mut ips = w.ips.clone();
    ips.sort();
    (w.id(), ips)
}

/// `state` without the local workloads found traced.
fn without_traced(state: &Arc<DesiredState>, node: &str, verdicts: &BTreeMap<Key, Verdict>) -> Arc<DesiredState> {
    let traced = |w: &Workload| w.node == node && matches!(verdicts.get(&key(w)), Some(Verdict::Traced(_)));
    if !state.workloads.workloads.iter().any(traced) {
        return state.clone();
    }
    let mut out = (**state).clone();
    out.workloads.workloads.retain(|w| !traced(w));
    Arc::new(out)
}

/// One line per workload whose verdict is new or changed (a traced pod is inspected again on
/// every state, and must not be logged each time).
fn log_changed(found: &BTreeMap<Key, Verdict>, before: &BTreeMap<Key, Verdict>) {
    for (k, verdict) in found.iter().filter(|(k, v)| before.get(*k) != Some(*v)) {
        let id = &k.0;
        match verdict {
            Verdict::Traced(traces) => tracing::warn!(pod = %id, "not captured: {traces}"),
            Verdict::Clean if before.contains_key(k) => {
                tracing::info!(pod = %id, "Istio's in-pod redirection is gone: captured")
            }
            Verdict::Clean => {}
            Verdict::Unchecked(why) => {
                tracing::warn!(pod = %id, "captured without checking for Istio's in-pod redirection: {why}")
            }
        }
    }
}

/// Finds each workload's namespace (by its addresses) and inspects it.
async fn inspect(netns_dir: &Path, keys: &[Key]) -> BTreeMap<Key, Verdict> {
    let unchecked = |why: String| keys.iter().map(|k| (k.clone(), Verdict::Unchecked(why.clone()))).collect();
    let host = match Routing::connect() {
        Ok(r) => match r.interfaces().await {
            Ok(h) => h,
            Err(e) => return unchecked(format!("listing the node's interfaces: {e}")),
        },
        Err(e) => return unchecked(format!("listing the node's interfaces: {e}")),
    };
    let sides = match pod_ports::scan(netns_dir, &host).await {
        Ok(s) => s,
        Err(e) => return unchecked(format!("reading the pods' namespaces: {e}")),
    };
    let netns_of: BTreeMap<IpAddr, PathBuf> = sides.into_iter().map(|s| (s.ip, s.netns)).collect();
    let mut out = BTreeMap::new();
    for k in keys {
        let Some(netns) = k.1.iter().find_map(|ip| netns_of.get(&ip.to_canonical())).cloned() else {
            let why = format!("no namespace in {} holds its addresses", netns_dir.display());
            out.insert(k.clone(), Verdict::Unchecked(why));
            continue;
        };
        let verdict = match tokio::task::spawn_blocking(move || inpod::inspect(&netns)).await {
            Ok(Ok(traces)) if traces.redirects() => Verdict::Traced(traces),
            Ok(Ok(_)) => Verdict::Clean,
            Ok(Err(e)) => Verdict::Unchecked(e.to_string()),
            Err(e) => Verdict::Unchecked(format!("the inspection failed: {e}")),
        };
        out.insert(k.clone(), verdict);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::WorkloadFile;

    fn state() -> Arc<DesiredState> {
        let file = "workloads:\n  - {name: a, namespace: ns, serviceAccount: sa, node: n1, ips: [10.0.0.1]}\n  - {name: b, namespace: ns, serviceAccount: sa, node: n1, ips: [10.0.0.2]}\n  - {name: c, namespace: ns, serviceAccount: sa, node: n2, ips: [10.0.0.3]}\n";
        Arc::new(DesiredState { workloads: WorkloadFile::parse(file, "test").unwrap(), ..Default::default() })
    }

    #[test]
    fn only_traced_local_workloads_are_left_out() {
        let s = state();
        let traced = InpodTraces { listeners: ["127.0.0.1:15001".parse().unwrap()].into(), ..Default::default() };
        let verdicts = BTreeMap::from([
            ((String::from("ns/a"), vec!["10.0.0.1".parse().unwrap()]), Verdict::Traced(traced)),
            ((String::from("ns/b"), vec!["10.0.0.2".parse().unwrap()]), Verdict::Unchecked("no netns".into())),
        ]);
        let out = without_traced(&s, "n1", &verdicts);
        let names: Vec<&str> = out.workloads.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        // Nothing traced: the very same state is passed on.
        assert!(Arc::ptr_eq(&without_traced(&s, "n1", &BTreeMap::new()), &s));
    }
}
