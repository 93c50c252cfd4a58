//! The destination's authorization policies, checked on every path that delivers to a local
//! pod (HBONE streams, plaintext, same-node hand-overs), in one place. Semantics are
//! ztunnel's ([`crate::policy`]); the port is the workload's target port, never 15008.

use std::net::SocketAddr;

use super::Error;
use crate::identity::Identity;
use crate::policy::{ConnectionFacts, Decision, DestinationView};
use crate::state::{WorkloadIndex, WorkloadInfo};

/// Whether `source` (its proven identity, none for plaintext) may reach `target` on `dst`.
pub(super) fn authorize(
    index: &WorkloadIndex,
    source: SocketAddr,
    identity: Option<&Identity>,
    dst: &WorkloadInfo,
    target: SocketAddr,
) -> Result<(), Error> {
    let facts = ConnectionFacts {
        source_identity: identity,
        source_ip: source.ip(),
        destination_ip: target.ip(),
        destination_port: target.port(),
    };
    let view = DestinationView { namespace: &dst.identity.namespace, policy_keys: &dst.policies };
    let verdict = index.policies().evaluate(&facts, view);
    for would in &verdict.dry_run {
        tracing::info!(src = %source, dst = %target, "dry-run policy: {would}");
    }
    match verdict.decision {
        Decision::Allow => Ok(()),
        deny @ Decision::Deny { .. } => Err(Error::PolicyDenied(deny.to_string())),
    }
}
