//! The delta xDS protocol as istiod speaks it to a node proxy, as a state machine with no I/O:
//! what to send when a stream opens, and what to do with each response (decode, hand to an
//! [`Applier`], answer with an ACK or a NACK). The transport ([`super::client`]) only moves
//! these messages.
//!
//! Rules (as ztunnel's `src/xds/client.rs` follows them):
//! - one initial request per type, wildcard (no names), the node on the first request of the
//!   stream only, and `initial_resource_versions` = the versions held (after a reconnect);
//! - a resource that does not decode, or that the applier refuses, rejects only itself: the
//!   rest of the response is applied and the answer is a NACK naming each rejected resource
//!   and why; otherwise an ACK carrying the response's nonce;
//! - a rejected resource keeps the version of what is still applied (none if it was new), so
//!   a reconnect asks for it again;
//! - readiness: the first response of each type has been applied (its accepted part: a single
//!   bad resource of the mesh must not keep every node unready).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use prost::Message;

use super::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource, Status,
};
use super::proto::istio::security::Authorization;
use super::proto::istio::workload::Address;
use super::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

/// The resource types meshpath subscribes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    /// Workloads and services (`istio.workload.Address`).
    Address,
    /// L4 authorization policies (`istio.security.Authorization`).
    Authorization,
}

impl ResourceType {
    pub const ALL: [ResourceType; 2] = [ResourceType::Address, ResourceType::Authorization];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Address => ADDRESS_TYPE,
            ResourceType::Authorization => AUTHORIZATION_TYPE,
        }
    }

    pub fn from_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }
}

/// A decoded resource under its xDS name.
#[derive(Clone, Debug, PartialEq)]
pub struct Named<T> {
    pub name: String,
    pub resource: T,
}

/// The changes of one response, decoded: what the applier gets.
#[derive(Clone, Debug, PartialEq)]
pub enum Delta {
    Addresses { updates: Vec<Named<Address>>, removed: Vec<String> },
    Authorizations { updates: Vec<Named<Authorization>>, removed: Vec<String> },
}

impl Delta {
    pub fn resource_type(&self) -> ResourceType {
        match self {
            Delta::Addresses { .. } => ResourceType::Address,
            Delta::Authorizations { .. } => ResourceType::Authorization,
        }
    }
}

/// What takes the changes in (the node's state). It applies every update and removal it can
/// and returns the ones it refused; a refused update leaves what it held under that name.
pub trait Applier {
    fn apply(&mut self, delta: Delta) -> Vec<Rejected>;
}

/// Why a resource was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("the entry holds no resource")]
    Empty,
    #[error("it is a {found}, not a {expected}")]
    WrongType { found: String, expected: &'static str },
    #[error("it does not decode: {0}")]
    Undecodable(String),
    /// The applier refused it (say why).
    #[error("{0}")]
    Refused(String),
}

impl RejectReason {
    /// A stable code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::Empty => "empty",
            RejectReason::WrongType { .. } => "wrong_type",
            RejectReason::Undecodable(_) => "undecodable",
            RejectReason::Refused(_) => "refused",
        }
    }
}

/// A resource not applied, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: RejectReason,
}

impl Rejected {
    /// What an applier returns for a resource it refuses.
    pub fn refused(name: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self { name: name.into(), reason: RejectReason::Refused(reason.to_string()) }
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

/// What handling one response did, and the answer to send.
#[derive(Debug)]
pub struct Outcome {
    /// The ACK or NACK for the response's nonce.
    pub answer: DeltaDiscoveryRequest,
    /// The response's type, if it is one meshpath subscribes to.
    pub resource_type: Option<ResourceType>,
    pub updated: usize,
    pub removed: usize,
    pub rejected: Vec<Rejected>,
}

impl Outcome {
    /// The NACK's message, if the answer is one.
    pub fn nack(&self) -> Option<&str> {
        self.answer.error_detail.as_ref().map(|s| s.message.as_str())
    }
}

/// The client's side of the protocol across streams: the versions held and what was applied.
#[derive(Debug)]
pub struct Session {
    node: Node,
    versions: BTreeMap<ResourceType, HashMap<String, String>>,
    applied: BTreeSet<ResourceType>,
}

impl Session {
    pub fn new(node: Node) -> Self {
        Self { node, versions: BTreeMap::new(), applied: BTreeSet::new() }
    }

    /// The requests that open a stream: one per type, the node on the first.
    pub fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        ResourceType::ALL
            .into_iter()
            .enumerate()
            .map(|(i, t)| DeltaDiscoveryRequest {
                node: (i == 0).then(|| self.node.clone()),
                type_url: t.type_url().to_owned(),
                initial_resource_versions: self
                    .versions
                    .get(&t)
                    .map(|v| v.clone().into_iter().collect())
                    .unwrap_or_default(),
                ..Default::default()
            })
            .collect()
    }

    /// Handles one response: decodes it, hands it to `applier`, records the versions of what
    /// was applied, and says what to answer.
    pub fn handle(&mut self, response: DeltaDiscoveryResponse, applier: &mut impl Applier) -> Outcome {
        let Some(rtype) = ResourceType::from_url(&response.type_url) else {
            let message = format!("type {:?} is not subscribed", response.type_url);
            return Outcome {
                answer: answer(response.type_url, response.nonce, Some(message)),
                resource_type: None,
                updated: 0,
                removed: 0,
                rejected: Vec::new(),
            };
        };
        let (delta, versions, mut rejected) = decode(rtype, &response.resources, &response.removed_resources);
        let removed = response.removed_resources.len();
        rejected.extend(applier.apply(delta));
        let updated = self.record(rtype, versions, &response.removed_resources, &rejected);
        self.applied.insert(rtype);
        let message = (!rejected.is_empty()).then(|| nack_message(&rejected));
        Outcome {
            answer: answer(response.type_url, response.nonce, message),
            resource_type: Some(rtype),
            updated,
            removed,
            rejected,
        }
    }

    /// Whether the first response of `rtype` has been applied.
    pub fn applied(&self, rtype: ResourceType) -> bool {
        self.applied.contains(&rtype)
    }

    /// Whether the first response of every type has been applied.
    pub fn ready(&self) -> bool {
        ResourceType::ALL.into_iter().all(|t| self.applied(t))
    }

    /// The version held of a resource, if any.
    pub fn version(&self, rtype: ResourceType, name: &str) -> Option<&str> {
        self.versions.get(&rtype).and_then(|v| v.get(name)).map(String::as_str)
    }

    /// Records the versions of the updates applied and forgets the removed; returns how many
    /// updates were applied.
    fn record(
        &mut self,
        rtype: ResourceType,
        versions: Vec<(String, String)>,
        removed: &[String],
        rejected: &[Rejected],
    ) -> usize {
        let held = self.versions.entry(rtype).or_default();
        for name in removed {
            held.remove(name);
        }
        let refused: BTreeSet<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        let accepted: Vec<_> = versions.into_iter().filter(|(name, _)| !refused.contains(name.as_str())).collect();
        let count = accepted.len();
        held.extend(accepted);
        count
    }
}

/// Decodes a response's resources: the delta for the applier, the (name, version) of each
/// decoded update, and the entries that did not decode.
fn decode(
    rtype: ResourceType,
    resources: &[Resource],
    removed: &[String],
) -> (Delta, Vec<(String, String)>, Vec<Rejected>) {
    let mut versions = Vec::with_capacity(resources.len());
    let mut rejected = Vec::new();
    let removed = removed.to_vec();
    let delta = match rtype {
        ResourceType::Address => {
            Delta::Addresses { updates: decode_all(rtype, resources, &mut versions, &mut rejected), removed }
        }
        ResourceType::Authorization => {
            Delta::Authorizations { updates: decode_all(rtype, resources, &mut versions, &mut rejected), removed }
        }
    };
    (delta, versions, rejected)
}

fn decode_all<T: Message + Default>(
    rtype: ResourceType,
    resources: &[Resource],
    versions: &mut Vec<(String, String)>,
    rejected: &mut Vec<Rejected>,
) -> Vec<Named<T>> {
    let mut updates = Vec::with_capacity(resources.len());
    for r in resources {
        match decode_one::<T>(rtype, r) {
            Ok(resource) => {
                versions.push((r.name.clone(), r.version.clone()));
                updates.push(Named { name: r.name.clone(), resource });
            }
            Err(reason) => rejected.push(Rejected { name: r.name.clone(), reason }),
        }
    }
    updates
}

fn decode_one<T: Message + Default>(rtype: ResourceType, r: &Resource) -> Result<T, RejectReason> {
    let any = r.resource.as_ref().ok_or(RejectReason::Empty)?;
    if any.type_url != rtype.type_url() {
        return Err(RejectReason::WrongType { found: any.type_url.clone(), expected: rtype.type_url() });
    }
    T::decode(any.value.as_slice()).map_err(|e| RejectReason::Undecodable(e.to_string()))
}

/// One NACK message naming every rejected resource and why (as ztunnel words it).
fn nack_message(rejected: &[Rejected]) -> String {
    rejected.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

fn answer(type_url: String, nonce: String, nack: Option<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url,
        response_nonce: nonce,
        // Envoy's NACKs carry INTERNAL; istiod only looks at the presence of the detail.
        error_detail: nack.map(|message| Status { code: tonic::Code::Internal as i32, message }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use prost_types::Any;

    use super::*;
    use crate::xds::proto::istio::workload::{Workload, address};

    /// An applier that keeps what it is given, refusing names listed in `refuse`.
    #[derive(Default)]
    struct Recorder {
        deltas: Vec<Delta>,
        refuse: Vec<String>,
    }

    impl Applier for Recorder {
        fn apply(&mut self, delta: Delta) -> Vec<Rejected> {
            let names: Vec<String> = match &delta {
                Delta::Addresses { updates, .. } => updates.iter().map(|u| u.name.clone()).collect(),
                Delta::Authorizations { updates, .. } => updates.iter().map(|u| u.name.clone()).collect(),
            };
            self.deltas.push(delta);
            names.into_iter().filter(|n| self.refuse.contains(n)).map(|n| Rejected::refused(n, "not wanted")).collect()
        }
    }

    fn node() -> Node {
        Node { id: "ztunnel~10.0.0.1~mp.istio-system~istio-system.svc.cluster.local".into(), metadata: None }
    }

    fn workload(uid: &str) -> Address {
        let w = Workload { uid: uid.into(), name: uid.into(), namespace: "ns".into(), ..Default::default() };
        Address { r#type: Some(address::Type::Workload(w)) }
    }

    fn entry(name: &str, version: &str, type_url: &str, value: Vec<u8>) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(Any { type_url: type_url.into(), value }),
        }
    }

    fn address_entry(name: &str, version: &str) -> Resource {
        entry(name, version, ADDRESS_TYPE, workload(name).encode_to_vec())
    }

    fn response(type_url: &str, nonce: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: nonce.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn opens_with_one_wildcard_request_per_type_and_the_node_on_the_first() {
        let reqs = Session::new(node()).initial_requests();
        let types: Vec<&str> = reqs.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(types, [ADDRESS_TYPE, AUTHORIZATION_TYPE]);
        assert_eq!(reqs[0].node, Some(node()));
        assert_eq!(reqs[1].node, None);
        for r in &reqs {
            assert!(r.resource_names_subscribe.is_empty() && r.resource_names_unsubscribe.is_empty());
            assert!(r.initial_resource_versions.is_empty() && r.response_nonce.is_empty());
        }
    }

    #[test]
    fn acks_with_the_nonce_and_hands_the_decoded_resources_over() {
        let mut s = Session::new(node());
        let mut app = Recorder::default();
        let out = s.handle(response(ADDRESS_TYPE, "n1", vec![address_entry("a", "1")], &["gone"]), &mut app);
        assert_eq!(out.answer.response_nonce, "n1");
        assert_eq!(out.answer.type_url, ADDRESS_TYPE);
        assert_eq!(out.nack(), None);
        assert_eq!((out.updated, out.removed), (1, 1));
        let expected = Delta::Addresses {
            updates: vec![Named { name: "a".into(), resource: workload("a") }],
            removed: vec!["gone".into()],
        };
        assert_eq!(app.deltas, [expected]);
    }

    #[test]
    fn a_bad_resource_is_nacked_alone_and_the_rest_applied() {
        let mut s = Session::new(node());
        let mut app = Recorder { refuse: vec!["refused".into()], ..Default::default() };
        let garbage = entry("garbage", "1", ADDRESS_TYPE, vec![0xff, 0xff, 0xff]);
        let wrong = entry("wrong", "1", AUTHORIZATION_TYPE, Vec::new());
        let empty = Resource { name: "empty".into(), version: "1".into(), resource: None };
        let resources = vec![address_entry("good", "1"), garbage, wrong, empty, address_entry("refused", "1")];
        let out = s.handle(response(ADDRESS_TYPE, "n1", resources, &[]), &mut app);
        let msg = out.nack().expect("a NACK");
        for name in
            ["garbage: it does not decode", "wrong: it is a", "empty: the entry holds no", "refused: not wanted"]
        {
            assert!(msg.contains(name), "{name:?} not in {msg:?}");
        }
        assert!(!msg.contains("good"), "{msg}");
        assert_eq!(out.answer.response_nonce, "n1");
        let codes: Vec<&str> = out.rejected.iter().map(|r| r.reason.code()).collect();
        assert_eq!(codes, ["undecodable", "wrong_type", "empty", "refused"]);
        let Delta::Addresses { updates, .. } = &app.deltas[0] else { panic!("addresses expected") };
        let names: Vec<&str> = updates.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["good", "refused"], "what decodes reaches the applier");
        assert_eq!(out.updated, 1);
        assert_eq!(s.version(ResourceType::Address, "good"), Some("1"));
        for name in ["garbage", "wrong", "empty", "refused"] {
            assert_eq!(s.version(ResourceType::Address, name), None, "{name} must be asked for again");
        }
    }

    #[test]
    fn a_rejected_update_keeps_the_version_of_what_is_still_applied() {
        let mut s = Session::new(node());
        let mut app = Recorder::default();
        s.handle(response(ADDRESS_TYPE, "n1", vec![address_entry("a", "1")], &[]), &mut app);
        let bad = entry("a", "2", ADDRESS_TYPE, vec![0xff]);
        let out = s.handle(response(ADDRESS_TYPE, "n2", vec![bad], &[]), &mut app);
        assert!(out.nack().is_some());
        assert_eq!(s.version(ResourceType::Address, "a"), Some("1"));
    }

    #[test]
    fn reconnects_with_the_versions_held_and_without_the_removed() {
        let mut s = Session::new(node());
        let mut app = Recorder::default();
        let first = vec![address_entry("a", "1"), address_entry("b", "7")];
        s.handle(response(ADDRESS_TYPE, "n1", first, &[]), &mut app);
        s.handle(response(ADDRESS_TYPE, "n2", vec![address_entry("a", "2")], &["b"]), &mut app);
        let reqs = s.initial_requests();
        let held: Vec<(&str, &str)> =
            reqs[0].initial_resource_versions.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(held, [("a", "2")]);
        assert!(reqs[1].initial_resource_versions.is_empty());
        assert_eq!(reqs[0].node, Some(node()), "every stream starts with the node");
    }

    #[test]
    fn ready_once_the_first_response_of_each_type_is_applied() {
        let mut s = Session::new(node());
        let mut app = Recorder::default();
        assert!(!s.ready());
        s.handle(response(ADDRESS_TYPE, "n1", vec![address_entry("a", "1")], &[]), &mut app);
        assert!(s.applied(ResourceType::Address) && !s.ready());
        // An empty first push counts: a mesh may have no policies.
        s.handle(response(AUTHORIZATION_TYPE, "n2", Vec::new(), &[]), &mut app);
        assert!(s.ready());
    }

    #[test]
    fn a_response_of_a_type_not_subscribed_is_nacked_and_not_applied() {
        let mut s = Session::new(node());
        let mut app = Recorder::default();
        let out = s.handle(response("type.googleapis.com/other", "n1", Vec::new(), &[]), &mut app);
        assert!(out.nack().is_some_and(|m| m.contains("not subscribed")), "{out:?}");
        assert_eq!(out.answer.response_nonce, "n1");
        assert!(app.deltas.is_empty() && !s.ready() && out.resource_type.is_none());
    }

    #[test]
    fn authorizations_are_decoded_as_such() {
        let mut s = Session::new(node());
        let mut app = Recorder::default();
        let policy = Authorization { name: "deny".into(), namespace: "ns".into(), ..Default::default() };
        let resources = vec![entry("ns/deny", "3", AUTHORIZATION_TYPE, policy.encode_to_vec())];
        let out = s.handle(response(AUTHORIZATION_TYPE, "n1", resources, &[]), &mut app);
        assert_eq!(out.nack(), None);
        let expected = Delta::Authorizations {
            updates: vec![Named { name: "ns/deny".into(), resource: policy }],
            removed: vec![],
        };
        assert_eq!(app.deltas, [expected]);
        assert_eq!(s.version(ResourceType::Authorization, "ns/deny"), Some("3"));
    }
}
