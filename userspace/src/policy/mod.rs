//! L4 authorization as ztunnel enforces it: istiod's `istio.security.Authorization`
//! resources, validated into [`Policy`]s ([`model`]), kept in a [`PolicyStore`] indexed by
//! scope ([`store`]), and evaluated for one connection at its destination ([`eval`]).
//!
//! Semantics (ztunnel's `rbac.rs` and `state.rs`, re-expressed):
//! - the policies of a destination are the GLOBAL ones, the NAMESPACE ones of its namespace,
//!   and those its Workload names in `authorization_policies`; nothing else is looked at;
//! - a matching DENY denies; else no ALLOW → allow; else a matching ALLOW allows; else deny;
//! - dry-run policies are evaluated and reported, never deciding;
//! - a policy's rules are OR-ed (none: never matches), a rule's clauses AND-ed (an empty
//!   clause matches), a clause's Matches OR-ed (an empty Match matches nothing); inside a
//!   Match the kinds are AND-ed, a kind's values OR-ed, and a `not_*` list must match none;
//! - a connection without identity (plaintext) fails every positive principal and
//!   service-account value; its namespace is matched as the empty string, as in ztunnel.
//!
//! One divergence in what is accepted: ztunnel silently drops a malformed IP block or a
//! string match of no kind and truncates a port above 65535, which widens or narrows the
//! policy unseen; here such a resource is refused as a whole ([`PolicyError`]).

pub mod eval;
pub mod istio;
pub mod model;
pub mod store;

use std::net::IpAddr;

pub use eval::{ConnectionFacts, Decision, DenyCode, DryRun, Verdict, decide};
pub use model::{Action, Clause, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch};
pub use store::{DestinationView, PolicyStore};

/// What standalone policies start from before any Kubernetes object: Istio's root
/// namespace, and the mesh-wide mTLS mode where no PeerAuthentication sets one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDefaults {
    pub root_namespace: String,
    pub mode: istio::MtlsMode,
}

/// Why an `Authorization` resource is refused. Each refuses only that resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown scope {0}")]
    UnknownScope(i32),
    #[error("unknown action {0}")]
    UnknownAction(i32),
    #[error("{field} {value:?} is not a name (empty, or containing '/')")]
    BadName { field: &'static str, value: String },
    #[error("resource {resource:?} carries policy {key:?}")]
    NameMismatch { resource: String, key: String },
    #[error("{field}: an address of {len} bytes (4 or 16 expected)")]
    AddressLength { field: &'static str, len: usize },
    #[error("{field}: prefix length {length} is out of range for {ip}")]
    PrefixLength { field: &'static str, ip: IpAddr, length: u32 },
    #[error("{field}: port {port} is out of range")]
    Port { field: &'static str, port: u32 },
    #[error("{field}: a string match of no kind (exact, prefix, suffix or presence)")]
    EmptyStringMatch { field: &'static str },
}

#[cfg(test)]
mod istio_tests;
#[cfg(test)]
mod tests;
