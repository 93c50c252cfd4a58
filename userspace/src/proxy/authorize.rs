//! The destination's authorization policies, checked on every path that delivers to a local
//! pod (HBONE streams, plaintext, same-node hand-overs), in one place, and again for the
//! connections open when the policies or workloads change. Semantics are ztunnel's
//! ([`crate::policy`]); the port is the workload's target port, never 15008.

use std::net::SocketAddr;

use super::Error;
use super::registry::{Closed, Registry};
use crate::identity::Identity;
use crate::policy::{ConnectionFacts, Decision, DestinationView, Verdict, istio};
use crate::record::Outcome;
use crate::state::{Tunnel, WorkloadIndex, WorkloadInfo};

/// Whether `source` (its proven identity, none for plaintext) may reach `target` on `dst`.
pub(super) fn authorize(
    index: &WorkloadIndex,
    source: SocketAddr,
    identity: Option<&Identity>,
    dst: &WorkloadInfo,
    target: SocketAddr,
) -> Result<(), Error> {
    let verdict = evaluate(index, source, identity, dst, target);
    for would in &verdict.dry_run {
        tracing::info!(src = %source, dst = %target, "dry-run policy: {would}");
    }
    allowed(verdict)
}

/// The open connections into this node's captured pods, checked against `index` again;
/// each one denied now is closed and writes its record (`policy_denied`). ztunnel re-checks
/// only when its policy store changes; this runs on every new index, so a workload that
/// gains a policy key or another identity has its connections re-checked too. A connection
/// whose destination and policies are those of `old` is skipped: its decision cannot have
/// changed (its source's identity was proven once, at its start). Returns how many it closed.
pub(super) fn revoke_denied(registry: &Registry, old: &WorkloadIndex, index: &WorkloadIndex, node: &str) -> usize {
    if index.policies().is_empty() {
        return 0;
    }
    let same_policies = index.policies().is_snapshot_of(old.policies());
    let mut closed = 0;
    for c in registry.list() {
        let local = index.get(c.target.ip()).filter(|w| w.node == node && w.tunnel == Tunnel::Hbone);
        let Some(dst) = local else { continue };
        if same_policies && old.get(c.target.ip()).is_some_and(|before| before == dst) {
            continue;
        }
        let identity = c.src_identity.as_deref().and_then(|s| s.parse::<Identity>().ok());
        if let Err(e) = allowed(evaluate(index, c.src, identity.as_ref(), dst, c.target)) {
            let why = Closed { outcome: Outcome::PolicyDenied, reason: e.to_string() };
            closed += usize::from(registry.close(c.id, why));
        }
    }
    if closed > 0 {
        tracing::info!(connections = closed, "closed open connections a policy now denies");
    }
    closed
}

fn evaluate(
    index: &WorkloadIndex,
    source: SocketAddr,
    identity: Option<&Identity>,
    dst: &WorkloadInfo,
    target: SocketAddr,
) -> Verdict {
    let facts = ConnectionFacts {
        source_identity: identity,
        source_ip: source.ip(),
        destination_ip: target.ip(),
        destination_port: target.port(),
    };
    let view = DestinationView { namespace: &dst.identity.namespace, policy_keys: &dst.policies };
    index.policies().evaluate(&facts, view)
}

fn allowed(verdict: Verdict) -> Result<(), Error> {
    match verdict.decision {
        Decision::Allow => Ok(()),
        // PeerAuthentication STRICT: said as such, as before policies existed.
        Decision::Deny { policy: Some(p), .. } if istio::is_static_strict(&p) => Err(Error::PlaintextRefused),
        deny @ Decision::Deny { .. } => Err(Error::PolicyDenied(deny.to_string())),
    }
}
