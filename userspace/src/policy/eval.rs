//! One connection against the policies that apply to its destination.

use std::cell::OnceCell;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use super::model::{Action, Clause, Match, Policy, ServiceAccountMatch};
use crate::identity::Identity;

/// What the destination's proxy knows of a connection when it decides.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFacts<'a> {
    /// The peer's proven identity; `None` for plaintext.
    pub source_identity: Option<&'a Identity>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    /// The workload's target port (never the HBONE port).
    pub destination_port: u16,
}

/// Why a connection is refused, as a stable code for logs and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyCode {
    /// A DENY policy matched.
    ExplicitlyDenied,
    /// ALLOW policies apply and none matched.
    NotAllowed,
}

impl DenyCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExplicitlyDenied => "explicitly_denied",
            Self::NotAllowed => "not_allowed",
        }
    }
}

/// The outcome. `policy` is the matching DENY's `namespace/name` (`None` for `NotAllowed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { code: DenyCode, policy: Option<Arc<str>> },
}

/// ztunnel's wording, for access logs.
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Allow => f.write_str("allowed"),
            Self::Deny { code: DenyCode::ExplicitlyDenied, policy: Some(p) } => {
                write!(f, "explicitly denied by: {p}")
            }
            Self::Deny { code: DenyCode::ExplicitlyDenied, policy: None } => f.write_str("explicitly denied"),
            Self::Deny { code: DenyCode::NotAllowed, .. } => f.write_str("allow policies exist, but none allowed"),
        }
    }
}

/// What a dry-run policy would have done (ztunnel logs the same three events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DryRun {
    /// This dry-run DENY matched.
    Deny(Arc<str>),
    /// This dry-run ALLOW matched.
    Allow(Arc<str>),
    /// No enforced ALLOW applies, dry-run ones do and none matched: enforcing them would deny.
    NoAllowMatched,
}

impl fmt::Display for DryRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Deny(p) => write!(f, "dry-run: deny policy match: {p}"),
            Self::Allow(p) => write!(f, "dry-run: allow policy match: {p}"),
            Self::NoAllowMatched => f.write_str("dry-run: no allow policies match"),
        }
    }
}

/// A decision with what explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// The ALLOW policy that allowed (`None`: denied, or no ALLOW applies).
    pub allowed_by: Option<Arc<str>>,
    /// Dry-run outcomes, for a log line; empty when no dry-run policy applies.
    pub dry_run: Vec<DryRun>,
}

/// Decides among `candidates`, the policies that apply to the destination (in the order a
/// DENY is reported: the first matching one). Each candidate is consulted at most twice.
pub fn decide<'p, I>(candidates: I, facts: &ConnectionFacts<'_>) -> Verdict
where
    I: Iterator<Item = &'p Policy> + Clone,
{
    let peer = Peer::new(facts);
    let mut dry_run = Vec::new();
    if let Some(deny) = deny_pass(candidates.clone(), &peer, &mut dry_run) {
        let decision = Decision::Deny { code: DenyCode::ExplicitlyDenied, policy: Some(deny.shared_key().clone()) };
        return Verdict { decision, allowed_by: None, dry_run };
    }
    allow_pass(candidates, &peer, dry_run)
}

/// The first enforced DENY that matches; every dry-run DENY is evaluated.
fn deny_pass<'p>(
    candidates: impl Iterator<Item = &'p Policy>,
    peer: &Peer<'_>,
    notes: &mut Vec<DryRun>,
) -> Option<&'p Policy> {
    let mut denied = None;
    for p in candidates.filter(|p| p.action() == Action::Deny) {
        if p.dry_run() {
            if policy_matches(p, peer) {
                notes.push(DryRun::Deny(p.shared_key().clone()));
            }
        } else if denied.is_none() && policy_matches(p, peer) {
            denied = Some(p);
        }
    }
    denied
}

/// No enforced ALLOW: allow; one matches: allow; otherwise deny.
fn allow_pass<'p>(candidates: impl Iterator<Item = &'p Policy>, peer: &Peer<'_>, mut notes: Vec<DryRun>) -> Verdict {
    let (mut enforced, mut dry, mut dry_matched) = (false, false, false);
    let mut allowed_by = None;
    for p in candidates.filter(|p| p.action() == Action::Allow) {
        if p.dry_run() {
            dry = true;
            if policy_matches(p, peer) {
                dry_matched = true;
                notes.push(DryRun::Allow(p.shared_key().clone()));
            }
        } else {
            enforced = true;
            if allowed_by.is_none() && policy_matches(p, peer) {
                allowed_by = Some(p.shared_key().clone());
            }
        }
    }
    if !enforced && dry && !dry_matched {
        notes.push(DryRun::NoAllowMatched);
    }
    let decision = match (enforced, &allowed_by) {
        (true, None) => Decision::Deny { code: DenyCode::NotAllowed, policy: None },
        _ => Decision::Allow,
    };
    Verdict { decision, allowed_by, dry_run: notes }
}

/// The connection as matched: addresses canonical (an IPv4-mapped IPv6 source is IPv4, as
/// ztunnel's sockets report it), the principal built only if a policy asks for it.
struct Peer<'a> {
    identity: Option<&'a Identity>,
    source: IpAddr,
    destination: IpAddr,
    port: u16,
    principal: OnceCell<Option<String>>,
}

impl<'a> Peer<'a> {
    fn new(facts: &ConnectionFacts<'a>) -> Self {
        Self {
            identity: facts.source_identity,
            source: facts.source_ip.to_canonical(),
            destination: facts.destination_ip.to_canonical(),
            port: facts.destination_port,
            principal: OnceCell::new(),
        }
    }

    /// Plaintext has none: ztunnel matches its empty namespace string.
    fn namespace(&self) -> &str {
        self.identity.map_or("", |i| i.namespace.as_str())
    }

    /// The SPIFFE ID without `spiffe://`, the form istiod sends principals in.
    fn principal(&self) -> Option<&str> {
        let build = || self.identity.map(|i| format!("{}/ns/{}/sa/{}", i.trust_domain, i.namespace, i.service_account));
        self.principal.get_or_init(build).as_deref()
    }
}

fn policy_matches(policy: &Policy, peer: &Peer<'_>) -> bool {
    policy.rules().iter().any(|rule| rule.iter().all(|clause| clause_matches(clause, peer)))
}

fn clause_matches(clause: &Clause, peer: &Peer<'_>) -> bool {
    clause.is_empty() || clause.iter().any(|m| match_matches(m, peer))
}

fn match_matches(m: &Match, peer: &Peer<'_>) -> bool {
    !m.is_empty()
        && kind(&m.destination_ports, &m.not_destination_ports, |p| *p == peer.port)
        && kind(&m.source_ips, &m.not_source_ips, |b| b.contains(&peer.source))
        && kind(&m.destination_ips, &m.not_destination_ips, |b| b.contains(&peer.destination))
        && kind(&m.namespaces, &m.not_namespaces, |s| s.matches(peer.namespace()))
        && kind(&m.service_accounts, &m.not_service_accounts, |s| account_matches(s, peer.identity))
        && kind(&m.principals, &m.not_principals, |s| peer.principal().is_some_and(|id| s.matches(id)))
}

/// Some positive value matches (or none is listed), and no negative one does.
fn kind<T>(positive: &[T], negative: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&matches)) && !negative.iter().any(&matches)
}

fn account_matches(m: &ServiceAccountMatch, identity: Option<&Identity>) -> bool {
    identity.is_some_and(|i| i.namespace == m.namespace && i.service_account == m.service_account)
}
