//! Istio's `security.istio.io/v1` AuthorizationPolicy and PeerAuthentication objects, translated
//! into [`Policy`]s as istiod translates them for ztunnel, for the standalone mode (meshpath
//! watching Kubernetes itself). Pure: objects in, a [`Translation`] out.
//!
//! What istiod does (`pilot/pkg/serviceregistry/ambient/{authorization,policies,workloads}.go`),
//! re-expressed:
//! - An AuthorizationPolicy with `targetRef(s)` is for a waypoint: not translated. CUSTOM and
//!   AUDIT are not translated either. Scope: a selector makes it WORKLOAD_SELECTOR (listed by the
//!   matching workloads of its namespace, and of every namespace when it lives in the root
//!   namespace), none makes it NAMESPACE, or GLOBAL in the root namespace.
//! - Each rule becomes a [`Rule`]: its `to` operations one clause of Matches (ports), its `from`
//!   sources one clause (principals, namespaces, service accounts, ipBlocks), each `when` its own
//!   clause (source.ip, source.namespace, source.principal, destination.ip, destination.port; any
//!   other key is HTTP). A rule with HTTP attributes is dropped from an ALLOW; in a DENY they are
//!   left out (an operation or source of HTTP attributes only becomes an empty Match, which
//!   matches nothing). `*` is presence, `*x` a suffix, `x*` a prefix; principals are matched
//!   without `spiffe://`. No rules: an ALLOW that allows nothing; `rules: [{}]`: everything.
//! - PeerAuthentication: the effective mode of a workload is its oldest selecting PA's, else its
//!   namespace's oldest selector-less PA's, else the root namespace's, else `default_mode`
//!   (UNSET inherits). STRICT attaches `<root>/istio_converted_static_strict` (a DENY of any
//!   connection without a principal, sent whenever a PA exists); port-level modes that differ
//!   from it attach `<ns>/converted_peer_authentication_<name>` instead, with the strictness
//!   merged in.
//!
//! Where this departs from istiod (each only narrows access):
//! - A malformed object (one istiod's validation would reject, which no webhook checks in
//!   standalone mode) fails closed, see [`FailClosed`]; istiod silently drops a bad port or
//!   address, which can widen an ALLOW.
//! - `trustDomains`/`notTrustDomains` of a source, which istiod ignores (widening an ALLOW),
//!   are handled as HTTP attributes: the ALLOW rule is dropped, a DENY keeps the rest.
//! - A workload PA of mode PERMISSIVE/DISABLE with a STRICT port under a STRICT mesh, and one of
//!   mode UNSET with a PERMISSIVE port under a namespace PA of mode UNSET and a STRICT mesh: istiod
//!   names a converted policy it never builds, so the workload gets no strictness at all; here
//!   the parent mode is inherited consistently and the policy is built.
//! - `selector: {}` (no labels) is read as no selector, as the API documents; istiod makes such
//!   an AuthorizationPolicy WORKLOAD_SELECTOR and attaches it to nothing.
//! - `istio.io/dry-run` is honoured (ztunnel logs dry-run policies); istiod drops such policies
//!   unless `AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY` is set. Either way they never decide.
//! - The `istio.io/rev` label is not looked at: there is no istiod revision to match.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::{Action, Clause, Match, Policy, PolicyError, PolicyStore, Rule, Scope, ServiceAccountMatch, StringMatch};

pub const GROUP: &str = "security.istio.io";
pub const VERSION: &str = "v1";
pub const AUTHORIZATION_POLICY_KIND: &str = "AuthorizationPolicy";
pub const AUTHORIZATION_POLICY_PLURAL: &str = "authorizationpolicies";
pub const PEER_AUTHENTICATION_KIND: &str = "PeerAuthentication";
pub const PEER_AUTHENTICATION_PLURAL: &str = "peerauthentications";
/// `"true"` (any of Go's `strconv.ParseBool` spellings) makes an AuthorizationPolicy dry-run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
/// The DENY of plaintext that a STRICT workload names, in the root namespace (`_`: no
/// Kubernetes object can take the name).
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";
pub const CONVERTED_PEER_AUTHENTICATION_PREFIX: &str = "converted_peer_authentication_";

/// What to watch AuthorizationPolicies with.
pub fn authorization_policy_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, AUTHORIZATION_POLICY_KIND);
    ApiResource::from_gvk_with_plural(&gvk, AUTHORIZATION_POLICY_PLURAL)
}

/// What to watch PeerAuthentications with.
pub fn peer_authentication_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, PEER_AUTHENTICATION_KIND);
    ApiResource::from_gvk_with_plural(&gvk, PEER_AUTHENTICATION_PLURAL)
}

// ---- The specs, as far as they matter (unknown fields ignored, `null` read as absent). ----

fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
}

/// Only its presence matters: such a policy is a waypoint's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default, deserialize_with = "nullable")]
    pub group: String,
    #[serde(default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthorizationAction {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, deserialize_with = "nullable")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Absent: ALLOW.
    #[serde(default)]
    pub action: Option<AuthorizationAction>,
    #[serde(default, deserialize_with = "nullable")]
    pub rules: Vec<RuleSpec>,
}

/// `from`/`to` absent constrain nothing; present and empty is malformed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleSpec {
    #[serde(default)]
    pub from: Option<Vec<RuleFrom>>,
    #[serde(default)]
    pub to: Option<Vec<RuleTo>>,
    #[serde(default, deserialize_with = "nullable")]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Option<Source>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Option<Operation>,
}

macro_rules! string_lists {
    ($(#[$meta:meta])* $name:ident { $($field:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            $(#[serde(default, deserialize_with = "nullable")] pub $field: Vec<String>,)*
        }

        impl $name {
            fn is_empty(&self) -> bool {
                true $(&& self.$field.is_empty())*
            }
        }
    };
}

string_lists!(Source {
    principals,
    not_principals,
    request_principals,
    not_request_principals,
    namespaces,
    not_namespaces,
    ip_blocks,
    not_ip_blocks,
    remote_ip_blocks,
    not_remote_ip_blocks,
    service_accounts,
    not_service_accounts,
    trust_domains,
    not_trust_domains,
});

string_lists!(Operation { hosts, not_hosts, ports, not_ports, methods, not_methods, paths, not_paths });

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(default, deserialize_with = "nullable")]
    pub key: String,
    #[serde(default, deserialize_with = "nullable")]
    pub values: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_values: Vec<String>,
}

/// A PeerAuthentication mode; UNSET inherits the parent's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MutualTls {
    #[serde(default, deserialize_with = "nullable")]
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Keyed by port (JSON object keys are strings; serde reads them as numbers).
    #[serde(default, deserialize_with = "nullable")]
    pub port_level_mtls: BTreeMap<u32, MutualTls>,
}

// ---- Outcomes. ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    AuthorizationPolicy,
    PeerAuthentication,
}

/// Why an object could not be translated as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("spec does not deserialize: {0}")]
    Spec(String),
    #[error("unknown action {0:?}")]
    UnknownAction(String),
    #[error("{field}: {value:?} is not an IP address or CIDR block")]
    Address { field: String, value: String },
    #[error("{field}: {value:?} is not a port")]
    Port { field: String, value: String },
    #[error("{field}: {value:?} is not `serviceAccount` or `namespace/serviceAccount`")]
    ServiceAccount { field: String, value: String },
    #[error("rule {rule}: {problem}")]
    Shape { rule: usize, problem: &'static str },
    #[error("rule {rule}: condition {key:?} has no key or no values")]
    Condition { rule: usize, key: String },
    #[error("portLevelMtls: port {0} is out of 1..65535")]
    PortLevelPort(u32),
    #[error("portLevelMtls without a selector (namespace- or mesh-wide)")]
    PortLevelWithoutSelector,
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// What stands in for an object that could not be translated: never wider than what it meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailClosed {
    /// A malformed ALLOW: an ALLOW of no rules for its scope (which then allows only what other
    /// ALLOW policies allow).
    AllowNothing,
    /// A malformed DENY, or one whose action is unknown: a DENY of everything in its scope.
    DenyEverything,
    /// A malformed PeerAuthentication: read as mode STRICT, no port levels, for its scope.
    Strict,
    /// Not enforceable at all (no usable namespace/name): nothing.
    Nothing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `namespace/name`.
    pub key: String,
    pub kind: ObjectKind,
    pub error: TranslateError,
    pub outcome: FailClosed,
}

/// What istiod also leaves out or warns about; worth a log line, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoteKind {
    /// `targetRef(s)`: a waypoint's policy.
    TargetRef,
    /// CUSTOM or AUDIT.
    UnsupportedAction(AuthorizationAction),
    /// HTTP attributes found (sorted): ALLOW rules using them dropped, DENY ones trimmed.
    HttpAttributes(Vec<String>),
    /// An unreadable `istio.io/dry-run` value: enforced, as istiod does.
    InvalidDryRun(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub key: String,
    pub kind: ObjectKind,
    pub note: NoteKind,
}

// ---- The translation. ----

/// Every policy of the mesh and what each workload names, from the objects of one moment.
#[derive(Debug, Clone)]
pub struct Translation {
    root_namespace: String,
    store: PolicyStore,
    /// WORKLOAD_SELECTOR AuthorizationPolicies by namespace, then key: their labels. By
    /// namespace, so that a workload's keys cost its namespace's policies, not the mesh's.
    selected: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>,
    peers: Peers,
    static_strict: Option<String>,
    refused: Vec<Refusal>,
    notes: Vec<Note>,
}

impl Translation {
    /// `default_mode`: the mesh-wide mode where no PeerAuthentication sets one (UNSET and
    /// DISABLE are read as PERMISSIVE, istiod's default).
    pub fn new<'a>(
        root_namespace: &str,
        default_mode: MtlsMode,
        authz: impl IntoIterator<Item = &'a DynamicObject>,
        peer: impl IntoIterator<Item = &'a DynamicObject>,
    ) -> Self {
        let mut t = Self {
            root_namespace: root_namespace.to_owned(),
            store: PolicyStore::default(),
            selected: BTreeMap::new(),
            peers: Peers::new(root_namespace, default_mode),
            static_strict: None,
            refused: Vec::new(),
            notes: Vec::new(),
        };
        for obj in authz {
            t.add_authorization_policy(obj);
        }
        let mut any_peer = false;
        for obj in peer {
            any_peer = true;
            t.add_peer_authentication(obj);
        }
        t.peers.settle();
        t.add_converted_peer_authentications();
        // istiod sends the static policy whenever a PeerAuthentication exists; a STRICT default
        // makes every workload name it.
        if any_peer || default_mode == MtlsMode::Strict {
            t.add_static_strict();
        }
        t
    }

    pub fn policies(&self) -> &PolicyStore {
        &self.store
    }

    pub fn into_store(self) -> PolicyStore {
        self.store
    }

    pub fn refused(&self) -> &[Refusal] {
        &self.refused
    }

    pub fn notes(&self) -> &[Note] {
        &self.notes
    }

    /// The keys a workload of `namespace` with `labels` names in its `authorization_policies`,
    /// in istiod's order: the selecting AuthorizationPolicies (its namespace's and the root
    /// namespace's) sorted, then the PeerAuthentication-derived ones sorted.
    pub fn workload_policies(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let root = (namespace != self.root_namespace).then_some(self.root_namespace.as_str());
        let mut keys: Vec<String> = std::iter::once(namespace)
            .chain(root)
            .filter_map(|ns| self.selected.get(ns))
            .flat_map(|by_key| by_key.iter())
            .filter(|(_, selector)| selects(selector, labels))
            .map(|(key, _)| key.clone())
            .collect();
        keys.sort();
        let (strict, converted) = self.peers.effective(namespace, labels);
        let mut derived = BTreeSet::new();
        if strict {
            derived.extend(self.static_strict.clone());
        }
        derived.extend(converted);
        keys.extend(derived);
        keys
    }

    fn refuse(&mut self, key: String, kind: ObjectKind, error: TranslateError, outcome: FailClosed) {
        self.refused.push(Refusal { key, kind, error, outcome });
    }

    fn note(&mut self, key: &str, kind: ObjectKind, note: NoteKind) {
        self.notes.push(Note { key: key.to_owned(), kind, note });
    }

    fn add_authorization_policy(&mut self, obj: &DynamicObject) {
        const KIND: ObjectKind = ObjectKind::AuthorizationPolicy;
        let (namespace, name) = names(obj);
        let key = format!("{namespace}/{name}");
        let dry_run = match obj.metadata.annotations.as_ref().and_then(|a| a.get(DRY_RUN_ANNOTATION)) {
            None => false,
            Some(v) => parse_bool(v).unwrap_or_else(|| {
                self.note(&key, KIND, NoteKind::InvalidDryRun(v.clone()));
                false
            }),
        };
        let raw = obj.data.get("spec").cloned().unwrap_or(Value::Null);
        let spec = if raw.is_null() {
            Ok(AuthorizationPolicySpec::default())
        } else {
            AuthorizationPolicySpec::deserialize(&raw).map_err(|e| e.to_string())
        };
        let spec = match spec {
            Ok(spec) => spec,
            Err(message) => return self.add_unreadable_authorization_policy(&namespace, &name, &raw, dry_run, message),
        };
        if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
            return self.note(&key, KIND, NoteKind::TargetRef);
        }
        let action = match spec.action.unwrap_or(AuthorizationAction::Allow) {
            AuthorizationAction::Allow => Action::Allow,
            AuthorizationAction::Deny => Action::Deny,
            unsupported => return self.note(&key, KIND, NoteKind::UnsupportedAction(unsupported)),
        };
        let labels = spec.selector.map(|s| s.match_labels).unwrap_or_default();
        let converted = convert_rules(action, &spec.rules, &namespace);
        let (rules, outcome) = match converted {
            Ok((rules, http)) => {
                if !http.is_empty() {
                    self.note(&key, KIND, NoteKind::HttpAttributes(http.into_iter().collect()));
                }
                (rules, None)
            }
            Err(error) => (fail_closed_rules(action), Some((error, fail_closed_outcome(action)))),
        };
        self.insert_authorization_policy(&namespace, &name, labels, action, rules, dry_run, outcome);
    }

    /// A spec that does not deserialize: its action and selector as far as they can be read,
    /// the rest fails closed; an unknown action counts as a DENY.
    fn add_unreadable_authorization_policy(
        &mut self,
        namespace: &str,
        name: &str,
        raw: &Value,
        dry_run: bool,
        message: String,
    ) {
        const KIND: ObjectKind = ObjectKind::AuthorizationPolicy;
        let key = format!("{namespace}/{name}");
        let present = |field: &str| raw.get(field).is_some_and(|v| !v.is_null() && *v != Value::Array(vec![]));
        if present("targetRef") || present("targetRefs") {
            return self.note(&key, KIND, NoteKind::TargetRef);
        }
        let (action, error) = match raw.get("action") {
            None | Some(Value::Null) => (Action::Allow, TranslateError::Spec(message)),
            Some(Value::String(s)) if s == "ALLOW" => (Action::Allow, TranslateError::Spec(message)),
            Some(Value::String(s)) if s == "DENY" => (Action::Deny, TranslateError::Spec(message)),
            Some(Value::String(s)) if s == "AUDIT" || s == "CUSTOM" => {
                let unsupported = if s == "AUDIT" { AuthorizationAction::Audit } else { AuthorizationAction::Custom };
                return self.note(&key, KIND, NoteKind::UnsupportedAction(unsupported));
            }
            Some(other) => {
                let shown = other.as_str().map_or_else(|| other.to_string(), str::to_owned);
                (Action::Deny, TranslateError::UnknownAction(shown))
            }
        };
        // An unreadable selector: the wider scope, the whole namespace.
        let labels = raw
            .get("selector")
            .and_then(|s| WorkloadSelector::deserialize(s).ok())
            .map(|s| s.match_labels)
            .unwrap_or_default();
        let rules = fail_closed_rules(action);
        let outcome = Some((error, fail_closed_outcome(action)));
        self.insert_authorization_policy(namespace, name, labels, action, rules, dry_run, outcome);
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_authorization_policy(
        &mut self,
        namespace: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        action: Action,
        rules: Vec<Rule>,
        dry_run: bool,
        refusal: Option<(TranslateError, FailClosed)>,
    ) {
        const KIND: ObjectKind = ObjectKind::AuthorizationPolicy;
        let key = format!("{namespace}/{name}");
        let scope = if !labels.is_empty() {
            Scope::WorkloadSelector
        } else if namespace == self.root_namespace {
            Scope::Global
        } else {
            Scope::Namespace
        };
        match Policy::new(namespace, name, scope, action, rules, dry_run) {
            Ok(policy) => {
                // A replaced object of the same key leaves no stale selector behind.
                if let Some(by_key) = self.selected.get_mut(namespace) {
                    by_key.remove(&key);
                }
                if scope == Scope::WorkloadSelector {
                    self.selected.entry(namespace.to_owned()).or_default().insert(key.clone(), labels);
                }
                self.store.insert(policy);
                if let Some((error, outcome)) = refusal {
                    self.refuse(key, KIND, error, outcome);
                }
            }
            Err(e) => {
                let error = refusal.map_or(TranslateError::Policy(e), |(error, _)| error);
                self.refuse(key, KIND, error, FailClosed::Nothing);
            }
        }
    }

    fn add_peer_authentication(&mut self, obj: &DynamicObject) {
        const KIND: ObjectKind = ObjectKind::PeerAuthentication;
        let (namespace, name) = names(obj);
        let key = format!("{namespace}/{name}");
        if let Err(e) = check_names(&namespace, &name) {
            return self.refuse(key, KIND, e.into(), FailClosed::Nothing);
        }
        let raw = obj.data.get("spec").cloned().unwrap_or(Value::Null);
        let spec = if raw.is_null() {
            Ok(PeerAuthenticationSpec::default())
        } else {
            PeerAuthenticationSpec::deserialize(&raw).map_err(|e| TranslateError::Spec(e.to_string()))
        };
        let checked = spec.and_then(|spec| {
            let labels = spec.selector.map(|s| s.match_labels).unwrap_or_default();
            if let Some(&port) = spec.port_level_mtls.keys().find(|p| !(1..=65535).contains(*p)) {
                return Err(TranslateError::PortLevelPort(port));
            }
            if labels.is_empty() && !spec.port_level_mtls.is_empty() {
                return Err(TranslateError::PortLevelWithoutSelector);
            }
            let ports = spec.port_level_mtls.into_iter().filter_map(|(p, m)| Some((u16::try_from(p).ok()?, m.mode)));
            let mode = spec.mtls.map(|m| m.mode).unwrap_or_default();
            Ok((labels, mode, ports.collect()))
        });
        let (labels, mode, ports) = match checked {
            Ok(read) => read,
            Err(error) => {
                self.refuse(key, KIND, error, FailClosed::Strict);
                // Its selector if it can be read, else the namespace: the wider scope.
                let labels = raw
                    .get("selector")
                    .and_then(|s| WorkloadSelector::deserialize(s).ok())
                    .map(|s| s.match_labels)
                    .unwrap_or_default();
                (labels, MtlsMode::Strict, BTreeMap::new())
            }
        };
        let created = obj.metadata.creation_timestamp.clone();
        self.peers.add(PeerAuth { namespace, name, created, labels, mode, ports });
    }

    fn add_converted_peer_authentications(&mut self) {
        let mut converted = Vec::new();
        for pa in self.peers.workload.values().flatten() {
            let parent_strict = self.peers.parent_strict(&pa.namespace);
            converted.extend(convert_peer_authentication(pa, parent_strict));
        }
        for result in converted {
            match result {
                Ok(policy) => {
                    self.store.insert(policy);
                }
                Err((key, e)) => self.refuse(key, ObjectKind::PeerAuthentication, e.into(), FailClosed::Nothing),
            }
        }
    }

    fn add_static_strict(&mut self) {
        let root = self.root_namespace.clone();
        let rules = vec![vec![vec![no_principal()]]];
        match Policy::new(&root, STATIC_STRICT_POLICY, Scope::WorkloadSelector, Action::Deny, rules, false) {
            Ok(policy) => {
                self.static_strict = Some(policy.key().to_owned());
                self.store.insert(policy);
            }
            Err(e) => {
                let key = format!("{root}/{STATIC_STRICT_POLICY}");
                self.refuse(key, ObjectKind::PeerAuthentication, e.into(), FailClosed::Nothing);
            }
        }
    }
}

fn names(obj: &DynamicObject) -> (String, String) {
    (obj.metadata.namespace.clone().unwrap_or_default(), obj.metadata.name.clone().unwrap_or_default())
}

/// The same rule [`Policy::new`] applies to a key.
fn check_names(namespace: &str, name: &str) -> Result<(), PolicyError> {
    for (field, value) in [("namespace", namespace), ("name", name)] {
        if value.is_empty() || value.contains('/') {
            return Err(PolicyError::BadName { field, value: value.into() });
        }
    }
    Ok(())
}

/// Go's `strconv.ParseBool`, which istiod reads the annotation with.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Whether a non-empty selector selects `labels` (every selector label present and equal).
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn fail_closed_rules(action: Action) -> Vec<Rule> {
    match action {
        // No rule: matches nothing.
        Action::Allow => Vec::new(),
        // One rule of no clause: matches every connection.
        Action::Deny => vec![Vec::new()],
    }
}

fn fail_closed_outcome(action: Action) -> FailClosed {
    match action {
        Action::Allow => FailClosed::AllowNothing,
        Action::Deny => FailClosed::DenyEverything,
    }
}

fn no_principal() -> Match {
    Match { not_principals: vec![StringMatch::Presence], ..Match::default() }
}

// ---- AuthorizationPolicy rules. ----

/// The rules, and the HTTP attributes met (sorted).
fn convert_rules(
    action: Action,
    rules: &[RuleSpec],
    namespace: &str,
) -> Result<(Vec<Rule>, BTreeSet<String>), TranslateError> {
    let mut http = BTreeSet::new();
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        out.extend(convert_rule(action, rule, i, namespace, &mut http)?);
    }
    Ok((out, http))
}

/// `None`: an ALLOW rule dropped for its HTTP attributes.
fn convert_rule(
    action: Action,
    rule: &RuleSpec,
    index: usize,
    namespace: &str,
    http: &mut BTreeSet<String>,
) -> Result<Option<Rule>, TranslateError> {
    let shape = |problem| TranslateError::Shape { rule: index, problem };
    let mut found_http = false;
    let mut note = |fields: Vec<&str>| {
        found_http |= !fields.is_empty();
        http.extend(fields.into_iter().map(str::to_owned));
    };
    let mut clauses: Rule = Vec::new();
    if let Some(to) = &rule.to {
        if to.is_empty() {
            return Err(shape("`to` is empty"));
        }
        let mut clause: Clause = Vec::new();
        for t in to {
            let op = t.operation.as_ref().ok_or_else(|| shape("a `to` without `operation`"))?;
            if op.is_empty() {
                return Err(shape("an empty `to.operation`"));
            }
            note(operation_http(op));
            clause.push(Match {
                destination_ports: ports("ports", &op.ports)?,
                not_destination_ports: ports("notPorts", &op.not_ports)?,
                ..Match::default()
            });
        }
        clauses.push(clause);
    }
    if let Some(from) = &rule.from {
        if from.is_empty() {
            return Err(shape("`from` is empty"));
        }
        let mut clause: Clause = Vec::new();
        for f in from {
            let src = f.source.as_ref().ok_or_else(|| shape("a `from` without `source`"))?;
            if src.is_empty() {
                return Err(shape("an empty `from.source`"));
            }
            note(source_http(src));
            clause.push(Match {
                source_ips: blocks("ipBlocks", &src.ip_blocks)?,
                not_source_ips: blocks("notIpBlocks", &src.not_ip_blocks)?,
                namespaces: strings(&src.namespaces),
                not_namespaces: strings(&src.not_namespaces),
                service_accounts: accounts("serviceAccounts", &src.service_accounts, namespace)?,
                not_service_accounts: accounts("notServiceAccounts", &src.not_service_accounts, namespace)?,
                principals: strings(&src.principals),
                not_principals: strings(&src.not_principals),
                ..Match::default()
            });
        }
        clauses.push(clause);
    }
    for c in &rule.when {
        if c.key.is_empty() || (c.values.is_empty() && c.not_values.is_empty()) {
            return Err(TranslateError::Condition { rule: index, key: c.key.clone() });
        }
        let field = |negated: bool| format!("when {} {}", c.key, if negated { "notValues" } else { "values" });
        let (v, nv) = (&c.values, &c.not_values);
        let m = match c.key.as_str() {
            "source.ip" => Match {
                source_ips: blocks(&field(false), v)?,
                not_source_ips: blocks(&field(true), nv)?,
                ..Match::default()
            },
            "source.namespace" => Match { namespaces: strings(v), not_namespaces: strings(nv), ..Match::default() },
            "source.principal" => Match { principals: strings(v), not_principals: strings(nv), ..Match::default() },
            "destination.ip" => Match {
                destination_ips: blocks(&field(false), v)?,
                not_destination_ips: blocks(&field(true), nv)?,
                ..Match::default()
            },
            "destination.port" => Match {
                destination_ports: ports(&field(false), v)?,
                not_destination_ports: ports(&field(true), nv)?,
                ..Match::default()
            },
            // Anything else is for a waypoint (connection.sni, source.serviceAccount, request.*):
            // an empty Match, which matches nothing.
            other => {
                note(vec![other]);
                Match::default()
            }
        };
        clauses.push(vec![m]);
    }
    // An ALLOW rule that needs HTTP attributes can never be proven at L4.
    Ok((action == Action::Deny || !found_http).then_some(clauses))
}

fn operation_http(op: &Operation) -> Vec<&'static str> {
    let fields = [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ];
    fields.into_iter().filter(|(_, v)| !v.is_empty()).map(|(f, _)| f).collect()
}

/// istiod's HTTP source attributes, plus the trust domains it ignores (see the module notes).
fn source_http(src: &Source) -> Vec<&'static str> {
    let fields = [
        ("remoteIpBlocks", &src.remote_ip_blocks),
        ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
        ("requestPrincipals", &src.request_principals),
        ("notRequestPrincipals", &src.not_request_principals),
        ("trustDomains", &src.trust_domains),
        ("notTrustDomains", &src.not_trust_domains),
    ];
    fields.into_iter().filter(|(_, v)| !v.is_empty()).map(|(f, _)| f).collect()
}

/// `*` presence, `*x` suffix, `x*` prefix, else exact (istiod's `stringToMatch`).
fn string_match(v: &str) -> StringMatch {
    if v == "*" {
        StringMatch::Presence
    } else if let Some(suffix) = v.strip_prefix('*') {
        StringMatch::Suffix(suffix.to_owned())
    } else if let Some(prefix) = v.strip_suffix('*') {
        StringMatch::Prefix(prefix.to_owned())
    } else {
        StringMatch::Exact(v.to_owned())
    }
}

fn strings(list: &[String]) -> Vec<StringMatch> {
    list.iter().map(|v| string_match(v)).collect()
}

fn ports(field: &str, list: &[String]) -> Result<Vec<u16>, TranslateError> {
    let one =
        |v: &String| v.parse::<u16>().map_err(|_| TranslateError::Port { field: field.to_owned(), value: v.clone() });
    list.iter().map(one).collect()
}

/// An address is its own /32 or /128; a block keeps its host bits (matching masks them).
fn blocks(field: &str, list: &[String]) -> Result<Vec<IpNet>, TranslateError> {
    let one = |v: &String| {
        let parsed = if v.contains('/') { v.parse::<IpNet>().ok() } else { v.parse::<IpAddr>().ok().map(IpNet::from) };
        parsed.ok_or_else(|| TranslateError::Address { field: field.to_owned(), value: v.clone() })
    };
    list.iter().map(one).collect()
}

/// `sa` (of the policy's namespace) or `ns/sa`.
fn accounts(field: &str, list: &[String], namespace: &str) -> Result<Vec<ServiceAccountMatch>, TranslateError> {
    let one = |v: &String| {
        let bad = || TranslateError::ServiceAccount { field: field.to_owned(), value: v.clone() };
        if v.is_empty() || v.contains('*') {
            return Err(bad());
        }
        let (ns, sa) = v.split_once('/').unwrap_or((namespace, v));
        if ns.is_empty() || sa.is_empty() || sa.contains('/') {
            return Err(bad());
        }
        Ok(ServiceAccountMatch { namespace: ns.to_owned(), service_account: sa.to_owned() })
    };
    list.iter().map(one).collect()
}

// ---- PeerAuthentication. ----

#[derive(Debug, Clone)]
struct PeerAuth {
    namespace: String,
    name: String,
    created: Option<Time>,
    /// Empty: namespace-wide (mesh-wide in the root namespace).
    labels: BTreeMap<String, String>,
    mode: MtlsMode,
    ports: BTreeMap<u16, MtlsMode>,
}

impl PeerAuth {
    /// Oldest first, as istiod picks among several; then by name (a stable tie-break), and one
    /// without a creation time last.
    fn age(&self) -> (bool, Option<&Time>, &str) {
        (self.created.is_none(), self.created.as_ref(), &self.name)
    }
}

/// The PeerAuthentications that count: the oldest selector-less one of the root namespace
/// (mesh) and of each other namespace, and the ones with a selector outside the root namespace
/// (istiod ignores selectors there), oldest first.
#[derive(Debug, Clone)]
struct Peers {
    root: String,
    default_mode: MtlsMode,
    mesh: Option<PeerAuth>,
    namespace: HashMap<String, PeerAuth>,
    workload: HashMap<String, Vec<PeerAuth>>,
}

impl Peers {
    fn new(root: &str, default_mode: MtlsMode) -> Self {
        Self { root: root.to_owned(), default_mode, mesh: None, namespace: HashMap::new(), workload: HashMap::new() }
    }

    fn add(&mut self, pa: PeerAuth) {
        let older = |current: &Option<PeerAuth>| current.as_ref().is_none_or(|c| pa.age() < c.age());
        match (pa.labels.is_empty(), pa.namespace == self.root) {
            (true, true) => {
                if older(&self.mesh) {
                    self.mesh = Some(pa);
                }
            }
            (true, false) => {
                if older(&self.namespace.get(&pa.namespace).cloned()) {
                    self.namespace.insert(pa.namespace.clone(), pa);
                }
            }
            (false, false) => self.workload.entry(pa.namespace.clone()).or_default().push(pa),
            (false, true) => {}
        }
    }

    /// Orders each namespace's workload policies oldest first.
    fn settle(&mut self) {
        for list in self.workload.values_mut() {
            list.sort_by(|a, b| a.age().cmp(&b.age()));
        }
    }

    /// Whether a workload of `namespace` without a PA of its own is STRICT: its namespace's
    /// mode, else the mesh's, else the default (UNSET inherits at each step).
    fn parent_strict(&self, namespace: &str) -> bool {
        let set = |pa: Option<&PeerAuth>| pa.map(|p| p.mode).filter(|m| *m != MtlsMode::Unset);
        let namespace_mode = if namespace == self.root { None } else { set(self.namespace.get(namespace)) };
        let mode = namespace_mode.or_else(|| set(self.mesh.as_ref())).unwrap_or(self.default_mode);
        mode == MtlsMode::Strict
    }

    /// (whether the static STRICT policy applies, the converted port-level policy's key),
    /// as istiod's `convertedSelectorPeerAuthentications` decides them.
    fn effective(&self, namespace: &str, labels: &BTreeMap<String, String>) -> (bool, Option<String>) {
        use MtlsMode::{Disable, Permissive, Strict, Unset};
        let mut strict = self.parent_strict(namespace);
        let chosen = self.workload.get(namespace).and_then(|list| list.iter().find(|pa| selects(&pa.labels, labels)));
        let Some(pa) = chosen else { return (strict, None) };
        match pa.mode {
            Strict => strict = true,
            Permissive | Disable => strict = false,
            Unset => {}
        }
        let any = |wanted: &[MtlsMode]| pa.ports.values().any(|m| wanted.contains(m));
        let converted = || Some(converted_key(pa));
        let key = match pa.mode {
            Strict if any(&[Permissive, Disable]) => {
                // The converted policy carries the STRICT part, with the port exceptions.
                strict = false;
                converted()
            }
            Permissive | Disable if any(&[Strict]) => converted(),
            // Only PERMISSIVE exempts a port here (a DISABLE port stays STRICT), as in istiod.
            Unset if strict && any(&[Permissive]) => {
                strict = false;
                converted()
            }
            Unset if !strict && any(&[Strict]) => converted(),
            _ => None,
        };
        (strict, key)
    }
}

fn converted_key(pa: &PeerAuth) -> String {
    format!("{}/{CONVERTED_PEER_AUTHENTICATION_PREFIX}{}", pa.namespace, pa.name)
}

/// A workload PA with port-level modes as a DENY (istiod's `convertPeerAuthentication`), or
/// `None` when the static policy or nothing expresses it. `parent_strict`: the mode it inherits.
fn convert_peer_authentication(pa: &PeerAuth, parent_strict: bool) -> Option<Result<Policy, (String, PolicyError)>> {
    use MtlsMode::{Disable, Permissive, Strict, Unset};
    if pa.ports.is_empty() {
        return None;
    }
    let mode = pa.mode;
    let inherits_strict = mode == Strict || (mode == Unset && parent_strict);
    // AND-ed clauses of the final rule; whole rules for STRICT ports.
    let mut clauses: Rule = Vec::new();
    let mut rules: Vec<Rule> = Vec::new();
    if mode == Strict {
        clauses.push(vec![no_principal()]);
    }
    let mut exempted = false;
    for (&port, &port_mode) in &pa.ports {
        match port_mode {
            // Already enforced by the mode it has or inherits.
            Strict if inherits_strict => {}
            Strict => rules.push(vec![vec![Match {
                not_principals: vec![StringMatch::Presence],
                destination_ports: vec![port],
                ..Match::default()
            }]]),
            // Nothing to exempt from.
            Permissive | Disable if !inherits_strict => {}
            Permissive | Disable => {
                exempted = true;
                clauses.push(vec![Match { not_destination_ports: vec![port], ..Match::default() }]);
            }
            Unset => {}
        }
    }
    if mode == Strict && !exempted {
        return None;
    }
    if clauses.is_empty() && rules.is_empty() {
        return None;
    }
    // Strictness inherited from the namespace or mesh is merged in, so that the workload can
    // drop the static policy (a DENY elsewhere could not be excepted).
    if parent_strict && exempted {
        clauses.push(vec![no_principal()]);
    }
    if !clauses.is_empty() {
        rules.push(clauses);
    }
    let name = format!("{CONVERTED_PEER_AUTHENTICATION_PREFIX}{}", pa.name);
    let policy = Policy::new(&pa.namespace, &name, Scope::WorkloadSelector, Action::Deny, rules, false);
    Some(policy.map_err(|e| (format!("{}/{name}", pa.namespace), e)))
}

/// Whether `key` (`namespace/name`) is the policy PeerAuthentication STRICT becomes (istiod's
/// or this module's; its namespace is whatever root the translator had).
pub fn is_static_strict(key: &str) -> bool {
    key.rsplit_once('/').is_some_and(|(_, name)| name == STATIC_STRICT_POLICY)
}
