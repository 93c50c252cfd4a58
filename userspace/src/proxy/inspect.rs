//! What `meshpath status` and `meshpath policy` ask a daemon about its policies, answered
//! from the index it serves with now: the policies that apply to each local workload, and
//! whether a source would reach a destination, with the policy that decides.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::policy::{ConnectionFacts, DestinationView};
use crate::state::{Tunnel, WorkloadIndex};

/// A local workload and the policies that apply to it (`namespace/name`, in the order they
/// are consulted), with the keys it names that no policy has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadPolicies {
    pub workload: String,
    pub ips: Vec<IpAddr>,
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown: Vec<String>,
}

/// Whether `from` would reach `to`, as the destination's node would decide now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The source's workload and identity (none: it proves none, as plaintext).
    pub from_workload: Option<String>,
    pub from_identity: Option<String>,
    pub to_workload: Option<String>,
    pub allowed: bool,
    /// ztunnel's words: `allowed`, `explicitly denied by: ns/name`, `allow policies exist,
    /// but none allowed`.
    pub decision: String,
    /// The policy that decided, when one did.
    pub deciding: Option<String>,
    pub dry_run: Vec<String>,
}

/// The policies of every workload captured on `node`.
pub fn policies_on(index: &WorkloadIndex, node: &str) -> Vec<WorkloadPolicies> {
    let mut by_workload: BTreeMap<String, WorkloadPolicies> = BTreeMap::new();
    for (ip, w) in index.workloads().filter(|(_, w)| w.node == node && w.tunnel == Tunnel::Hbone) {
        let entry = by_workload.entry(w.id.clone()).or_insert_with(|| {
            let view = DestinationView { namespace: &w.identity.namespace, policy_keys: &w.policies };
            WorkloadPolicies {
                workload: w.id.clone(),
                ips: Vec::new(),
                policies: index.policies().candidates(view).map(|p| p.key().to_owned()).collect(),
                unknown: index.policies().unknown_keys(view).map(str::to_owned).collect(),
            }
        });
        entry.ips.push(ip);
    }
    by_workload
        .into_values()
        .map(|mut w| {
            w.ips.sort();
            w
        })
        .collect()
}

/// Whether a connection from `from` to `to` would pass `to`'s policies. A source the index
/// knows is taken with its identity (as HBONE or the same-node hand-over prove it); any
/// other as plaintext.
pub fn decide(index: &WorkloadIndex, from: IpAddr, to: SocketAddr) -> Decision {
    let src = index.get(from);
    let dst = index.get(to.ip());
    let facts = ConnectionFacts {
        source_identity: src.map(|w| &w.identity),
        source_ip: from,
        destination_ip: to.ip(),
        destination_port: to.port(),
    };
    let (namespace, keys) = dst.map_or(("", &[][..]), |w| (w.identity.namespace.as_str(), &w.policies[..]));
    let verdict = index.policies().evaluate(&facts, DestinationView { namespace, policy_keys: keys });
    let deciding = match &verdict.decision {
        crate::policy::Decision::Deny { policy, .. } => policy.as_ref().map(ToString::to_string),
        crate::policy::Decision::Allow => verdict.allowed_by.as_ref().map(ToString::to_string),
    };
    Decision {
        from_workload: src.map(|w| w.id.clone()),
        from_identity: src.map(|w| w.identity.to_string()),
        to_workload: dst.map(|w| w.id.clone()),
        allowed: matches!(verdict.decision, crate::policy::Decision::Allow),
        decision: verdict.decision.to_string(),
        deciding,
        dry_run: verdict.dry_run.iter().map(ToString::to_string).collect(),
    }
}
