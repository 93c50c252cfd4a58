//! A policy as evaluated, and its conversion from the wire type (validated: a resource is
//! either taken whole or refused whole).

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::PolicyError;
use crate::xds::proto::istio::security as wire;
use wire::string_match::MatchType;

/// Which destinations a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every workload of the mesh (a root-namespace policy without selector).
    Global,
    /// Every workload of the policy's namespace.
    Namespace,
    /// The workloads that name the policy in their `authorization_policies`.
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// Rules are OR-ed; a rule's clauses are AND-ed; a clause's matches are OR-ed.
pub type Rule = Vec<Clause>;
pub type Clause = Vec<Match>;

/// An authorization policy, keyed `namespace/name` (istiod's resource name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    key: Arc<str>,
    namespace: String,
    name: String,
    scope: Scope,
    action: Action,
    rules: Vec<Rule>,
    dry_run: bool,
}

impl Policy {
    /// A policy; refused if `namespace` or `name` could not form an unambiguous key.
    pub fn new(
        namespace: &str,
        name: &str,
        scope: Scope,
        action: Action,
        rules: Vec<Rule>,
        dry_run: bool,
    ) -> Result<Self, PolicyError> {
        check_name("namespace", namespace)?;
        check_name("name", name)?;
        let key = format!("{namespace}/{name}").into();
        Ok(Self { key, namespace: namespace.into(), name: name.into(), scope, action, rules, dry_run })
    }

    /// A policy from an xDS resource named `resource_name`, which must be its key.
    pub fn from_resource(resource_name: &str, resource: wire::Authorization) -> Result<Self, PolicyError> {
        let policy = Self::try_from(resource)?;
        if policy.key() != resource_name {
            let (resource, key) = (resource_name.to_owned(), policy.key().to_owned());
            return Err(PolicyError::NameMismatch { resource, key });
        }
        Ok(policy)
    }

    /// `namespace/name`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key, shared (what decisions and reports carry).
    pub fn shared_key(&self) -> &Arc<str> {
        &self.key
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    pub fn action(&self) -> Action {
        self.action
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }
}

fn check_name(field: &'static str, value: &str) -> Result<(), PolicyError> {
    if value.is_empty() || value.contains('/') {
        return Err(PolicyError::BadName { field, value: value.into() });
    }
    Ok(())
}

/// One `from`/`to`/`when` condition. Kinds are AND-ed; an empty list does not constrain
/// its kind; a `not_*` list must match none. A Match with every list empty matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    /// Against `trust-domain/ns/<ns>/sa/<sa>` (the SPIFFE ID without `spiffe://`).
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    /// The destination workload's target port (never the HBONE port).
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(s) => value.starts_with(s.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
            Self::Presence => !value.is_empty(),
        }
    }
}

/// A service account of a namespace, in any trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

impl TryFrom<wire::Authorization> for Policy {
    type Error = PolicyError;

    fn try_from(a: wire::Authorization) -> Result<Self, PolicyError> {
        let scope = match wire::Scope::try_from(a.scope) {
            Ok(wire::Scope::Global) => Scope::Global,
            Ok(wire::Scope::Namespace) => Scope::Namespace,
            Ok(wire::Scope::WorkloadSelector) => Scope::WorkloadSelector,
            Err(_) => return Err(PolicyError::UnknownScope(a.scope)),
        };
        let action = match wire::Action::try_from(a.action) {
            Ok(wire::Action::Allow) => Action::Allow,
            Ok(wire::Action::Deny) => Action::Deny,
            Err(_) => return Err(PolicyError::UnknownAction(a.action)),
        };
        let rules = a.rules.iter().map(rule).collect::<Result<_, _>>()?;
        Self::new(&a.namespace, &a.name, scope, action, rules, a.dry_run)
    }
}

fn rule(r: &wire::Rule) -> Result<Rule, PolicyError> {
    r.clauses.iter().map(|c| c.matches.iter().map(Match::try_from).collect()).collect()
}

impl TryFrom<&wire::Match> for Match {
    type Error = PolicyError;

    fn try_from(m: &wire::Match) -> Result<Self, PolicyError> {
        Ok(Self {
            namespaces: strings("namespaces", &m.namespaces)?,
            not_namespaces: strings("not_namespaces", &m.not_namespaces)?,
            principals: strings("principals", &m.principals)?,
            not_principals: strings("not_principals", &m.not_principals)?,
            service_accounts: accounts(&m.service_accounts),
            not_service_accounts: accounts(&m.not_service_accounts),
            source_ips: blocks("source_ips", &m.source_ips)?,
            not_source_ips: blocks("not_source_ips", &m.not_source_ips)?,
            destination_ips: blocks("destination_ips", &m.destination_ips)?,
            not_destination_ips: blocks("not_destination_ips", &m.not_destination_ips)?,
            destination_ports: ports("destination_ports", &m.destination_ports)?,
            not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
        })
    }
}

fn strings(field: &'static str, list: &[wire::StringMatch]) -> Result<Vec<StringMatch>, PolicyError> {
    let one = |s: &wire::StringMatch| match &s.match_type {
        Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
        Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
        Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
        Some(MatchType::Presence(_)) => Ok(StringMatch::Presence),
        None => Err(PolicyError::EmptyStringMatch { field }),
    };
    list.iter().map(one).collect()
}

fn accounts(list: &[wire::ServiceAccountMatch]) -> Vec<ServiceAccountMatch> {
    let one = |s: &wire::ServiceAccountMatch| ServiceAccountMatch {
        namespace: s.namespace.clone(),
        service_account: s.service_account.clone(),
    };
    list.iter().map(one).collect()
}

fn blocks(field: &'static str, list: &[wire::Address]) -> Result<Vec<IpNet>, PolicyError> {
    list.iter().map(|a| block(field, a)).collect()
}

fn block(field: &'static str, a: &wire::Address) -> Result<IpNet, PolicyError> {
    let ip = if let Ok(v4) = <[u8; 4]>::try_from(a.address.as_slice()) {
        IpAddr::from(v4)
    } else if let Ok(v6) = <[u8; 16]>::try_from(a.address.as_slice()) {
        IpAddr::from(v6)
    } else {
        return Err(PolicyError::AddressLength { field, len: a.address.len() });
    };
    let bad = || PolicyError::PrefixLength { field, ip, length: a.length };
    let length = u8::try_from(a.length).map_err(|_| bad())?;
    IpNet::new(ip, length).map_err(|_| bad())
}

fn ports(field: &'static str, list: &[u32]) -> Result<Vec<u16>, PolicyError> {
    list.iter().map(|&port| u16::try_from(port).map_err(|_| PolicyError::Port { field, port })).collect()
}
