//! The fake istiod's workload xDS: delta ADS for `istio.workload.Address` and
//! `istio.security.Authorization`, served from a resource set the test controls
//! ([`Xds::put`], [`Xds::remove`], [`Xds::put_raw`] for bytes that do not decode), pushed to
//! every open stream as it changes, with every stream, request and response recorded.
//!
//! What istiod checks is checked, with its codes: the caller ([`super::auth`]:
//! `Unauthenticated`); then on the stream's first request, the node (`InvalidArgument
//! "missing node information"` or a malformed id, as `initProxyMetadata` in
//! `pilot/pkg/xds/ads.go`), and that the node's namespace (metadata `NAMESPACE`, else the id's
//! domain) and service account (metadata `SERVICE_ACCOUNT`, if set) are the token's
//! (`PermissionDenied "authorization failed: ..."`, `pilot/pkg/xds/auth.go`).
//!
//! As delta xDS wants it: a subscription's first response always comes (empty if there is
//! nothing), then only changes; `initial_resource_versions` are taken as what the client
//! holds, so a reconnecting client gets only what changed, and a removal for what is gone.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use meshpath::sync::lock;
use meshpath::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use prost::Message;
use prost_types::Any;
use prost_types::value::Kind;
use tokio::sync::{mpsc, watch};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};

use super::auth::{self, Account, Authenticator};
use super::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use super::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource};
use super::proto::istio::security::{Action, Authorization, Rule, Scope};
use super::proto::istio::workload::{
    Address, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload, WorkloadStatus, address,
};

/// Records kept of each kind; the oldest go first (a long `cargo xtask run` must not grow).
const MAX_RECORDS: usize = 10_000;
/// Responses queued for a stream before pushes wait for the client.
const QUEUED: usize = 16;
/// The largest request the fake reads (a NACK names every refused resource).
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// Node types istiod accepts in a node id (`pkg/model/proxy.go`).
const NODE_TYPES: [&str; 4] = ["sidecar", "router", "waypoint", "ztunnel"];

/// A resource the fake serves, under its xDS name.
#[derive(Clone, Debug, PartialEq)]
pub enum LabResource {
    Workload(Box<Workload>),
    Service(Service),
    Authorization(Authorization),
}

impl LabResource {
    pub fn type_url(&self) -> &'static str {
        match self {
            LabResource::Workload(_) | LabResource::Service(_) => ADDRESS_TYPE,
            LabResource::Authorization(_) => AUTHORIZATION_TYPE,
        }
    }

    /// istiod's names: a workload's uid, `namespace/hostname` of a service, `namespace/name`
    /// of a policy.
    pub fn name(&self) -> String {
        match self {
            LabResource::Workload(w) => w.uid.clone(),
            LabResource::Service(s) => format!("{}/{}", s.namespace, s.hostname),
            LabResource::Authorization(a) => format!("{}/{}", a.namespace, a.name),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let address = |t| Address { r#type: Some(t) }.encode_to_vec();
        match self {
            LabResource::Workload(w) => address(address::Type::Workload(w.as_ref().clone())),
            LabResource::Service(s) => address(address::Type::Service(s.clone())),
            LabResource::Authorization(a) => a.encode_to_vec(),
        }
    }
}

impl From<Workload> for LabResource {
    fn from(w: Workload) -> Self {
        LabResource::Workload(Box::new(w))
    }
}

impl From<Service> for LabResource {
    fn from(s: Service) -> Self {
        LabResource::Service(s)
    }
}

impl From<Authorization> for LabResource {
    fn from(a: Authorization) -> Self {
        LabResource::Authorization(a)
    }
}

/// A pod's workload uid as istiod writes it: `<cluster>//Pod/<namespace>/<name>`
/// (`generatePodUID`, `pilot/pkg/serviceregistry/kube/controller/ambient/helpers.go`; the
/// `<cluster>//v1/Pod/...` of ztunnel's test fixtures is an older istiod's).
pub fn pod_uid(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{cluster}//Pod/{namespace}/{name}")
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// A healthy HBONE pod of `namespace` with service account `service_account`, on `node`.
/// Its `cluster_id` is the cluster of its uid ([`pod_uid`]): istiod sets it on every pod's
/// workload (`podWorkloadBuilder`, `pilot/pkg/serviceregistry/kube/controller/ambient/workloads.go`).
pub fn workload(uid: &str, namespace: &str, name: &str, service_account: &str, node: &str, ips: &[IpAddr]) -> Workload {
    Workload {
        uid: uid.into(),
        cluster_id: uid.split_once("//").map_or("", |(cluster, _)| cluster).into(),
        name: name.into(),
        namespace: namespace.into(),
        addresses: ips.iter().map(ip_bytes).collect(),
        service_account: service_account.into(),
        node: node.into(),
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        status: WorkloadStatus::Healthy as i32,
        ..Default::default()
    }
}

/// Adds `workload` to `service` (`namespace/hostname`) with `(service port, target port)`s.
pub fn in_service(mut workload: Workload, service: &str, ports: &[(u32, u32)]) -> Workload {
    let ports = ports.iter().map(|&(service_port, target_port)| Port { service_port, target_port }).collect();
    workload.services.insert(service.into(), PortList { ports });
    workload
}

/// A service with VIPs `vips` (default network) and `(service port, target port)`s.
pub fn service(namespace: &str, name: &str, hostname: &str, vips: &[IpAddr], ports: &[(u32, u32)]) -> Service {
    Service {
        name: name.into(),
        namespace: namespace.into(),
        hostname: hostname.into(),
        addresses: vips.iter().map(|ip| NetworkAddress { network: String::new(), address: ip_bytes(ip) }).collect(),
        ports: ports.iter().map(|&(service_port, target_port)| Port { service_port, target_port }).collect(),
        ..Default::default()
    }
}

/// An L4 policy.
pub fn authorization(namespace: &str, name: &str, scope: Scope, action: Action, rules: Vec<Rule>) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope: scope as i32,
        action: action as i32,
        rules,
        dry_run: false,
    }
}

/// A node as its stream's first request described it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    /// String-valued metadata (others are shown as their Debug form).
    pub metadata: BTreeMap<String, String>,
}

/// A refused stream: the code and message the caller got, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub message: String,
    pub reason: String,
}

/// One stream, as it was opened.
#[derive(Clone, Debug)]
pub struct StreamRecord {
    pub id: u64,
    /// Every header but the HTTP/2 pseudo-headers, as received (the token too: it is a lab).
    pub headers: BTreeMap<String, String>,
    pub caller: Option<Account>,
    pub node: Option<NodeRecord>,
    pub refused: Option<Refusal>,
}

/// What a request was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// A subscription (no nonce), with the versions the client said it holds.
    Subscribe {
        initial_versions: BTreeMap<String, String>,
    },
    Ack {
        nonce: String,
    },
    Nack {
        nonce: String,
        message: String,
    },
}

#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub stream: u64,
    pub type_url: String,
    pub kind: RequestKind,
    pub node: Option<NodeRecord>,
}

#[derive(Clone, Debug)]
pub struct ResponseRecord {
    pub stream: u64,
    pub type_url: String,
    pub nonce: String,
    /// `(name, version)` of each resource sent.
    pub resources: Vec<(String, String)>,
    pub removed: Vec<String>,
}

/// Everything recorded, oldest first.
#[derive(Clone, Debug, Default)]
pub struct Records {
    pub streams: Vec<StreamRecord>,
    pub requests: Vec<RequestRecord>,
    pub responses: Vec<ResponseRecord>,
}

impl Records {
    pub fn stream(&self, id: u64) -> Option<&StreamRecord> {
        self.streams.iter().find(|s| s.id == id)
    }

    /// The requests of stream `id`.
    pub fn requests_of(&self, id: u64) -> impl Iterator<Item = &RequestRecord> {
        self.requests.iter().filter(move |r| r.stream == id)
    }

    /// The answers (ACKs and NACKs) to the response with `nonce`.
    pub fn answers_to(&self, nonce: &str) -> Vec<&RequestKind> {
        let answers = self.requests.iter().map(|r| &r.kind);
        answers
            .filter(|k| match k {
                RequestKind::Ack { nonce: n } | RequestKind::Nack { nonce: n, .. } => n == nonce,
                RequestKind::Subscribe { .. } => false,
            })
            .collect()
    }
}

#[derive(Default)]
struct Recorded {
    streams: VecDeque<StreamRecord>,
    requests: VecDeque<RequestRecord>,
    responses: VecDeque<ResponseRecord>,
}

fn push_bounded<T>(list: &mut VecDeque<T>, item: T) {
    if list.len() >= MAX_RECORDS {
        list.pop_front();
    }
    list.push_back(item);
}

struct Stored {
    version: String,
    value: Any,
}

/// The resources served: type → name → resource.
#[derive(Default)]
struct Store {
    resources: BTreeMap<&'static str, BTreeMap<String, Stored>>,
    versions: u64,
}

impl Store {
    /// Applies one change; says whether it changed anything.
    fn apply(&mut self, change: &Change) -> bool {
        match change {
            Change::Raw { type_url, name, bytes } => {
                self.versions += 1;
                let value = Any { type_url: (*type_url).into(), value: bytes.clone() };
                let stored = Stored { version: self.versions.to_string(), value };
                self.resources.entry(type_url).or_default().insert(name.clone(), stored);
                true
            }
            Change::Remove { type_url, name } => {
                self.resources.get_mut(type_url).and_then(|m| m.remove(name)).is_some()
            }
        }
    }
}

/// A change of what the fake serves.
#[derive(Clone, Debug)]
pub enum Change {
    /// Serve `bytes` as `name` (a new version), whatever they are.
    Raw {
        type_url: &'static str,
        name: String,
        bytes: Vec<u8>,
    },
    Remove {
        type_url: &'static str,
        name: String,
    },
}

impl Change {
    /// Serve `resource` (a new version).
    pub fn put(resource: impl Into<LabResource>) -> Self {
        let r = resource.into();
        Change::Raw { type_url: r.type_url(), name: r.name(), bytes: r.encode() }
    }
}

struct Shared {
    auth: Authenticator,
    trust_domain: String,
    store: Mutex<Store>,
    records: Mutex<Recorded>,
    /// Bumped on every change of the store; streams push what changed.
    changes: watch::Sender<u64>,
    /// Bumped to end every open stream.
    drops: watch::Sender<u64>,
    streams: Mutex<u64>,
}

/// The test's handle on the fake's xDS side.
#[derive(Clone)]
pub struct Xds {
    shared: Arc<Shared>,
}

impl Xds {
    pub(super) fn new(auth: Authenticator, trust_domain: &str) -> Self {
        let shared = Shared {
            auth,
            trust_domain: trust_domain.into(),
            store: Mutex::default(),
            records: Mutex::default(),
            changes: watch::channel(0).0,
            drops: watch::channel(0).0,
            streams: Mutex::new(0),
        };
        Self { shared: Arc::new(shared) }
    }

    /// The gRPC service, for the listener.
    pub(super) fn service(&self) -> AggregatedDiscoveryServiceServer<AdsService> {
        AggregatedDiscoveryServiceServer::new(AdsService { shared: self.shared.clone() })
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Adds or replaces a resource (a new version), pushed to every stream.
    pub fn put(&self, resource: impl Into<LabResource>) {
        self.change([Change::put(resource)]);
    }

    /// Serves `bytes` as resource `name` of `type_url`, whatever they are.
    pub fn put_raw(&self, type_url: &'static str, name: &str, bytes: Vec<u8>) {
        self.change([Change::Raw { type_url, name: name.into(), bytes }]);
    }

    /// Removes a resource; streams that had it are told. Says whether it was there.
    pub fn remove(&self, type_url: &'static str, name: &str) -> bool {
        self.change([Change::Remove { type_url, name: name.into() }]) == 1
    }

    /// Applies `changes` at once: a stream gets them in one response per type (as istiod
    /// pushes a debounced batch). Returns how many changed something.
    pub fn change(&self, changes: impl IntoIterator<Item = Change>) -> usize {
        let mut store = lock(&self.shared.store);
        let changed = changes.into_iter().filter(|c| store.apply(c)).count();
        drop(store);
        if changed > 0 {
            self.shared.changes.send_modify(|n| *n += 1);
        }
        changed
    }

    /// The version served of a resource.
    pub fn version(&self, type_url: &str, name: &str) -> Option<String> {
        lock(&self.shared.store).resources.get(type_url).and_then(|m| m.get(name)).map(|s| s.version.clone())
    }

    /// Ends every open stream with `Unavailable` (as istiod going away does).
    pub fn drop_streams(&self) {
        self.shared.drops.send_modify(|n| *n += 1);
    }

    pub fn records(&self) -> Records {
        let r = lock(&self.shared.records);
        Records {
            streams: r.streams.iter().cloned().collect(),
            requests: r.requests.iter().cloned().collect(),
            responses: r.responses.iter().cloned().collect(),
        }
    }

    /// Waits until `done` holds of the records; on timeout says `what` was awaited.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Records) -> bool,
    ) -> Result<Records, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let records = self.records();
            if done(&records) {
                return Ok(records);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("fake istiod: no {what} within {timeout:?}; records: {records:#?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Shared {
    fn open_stream(&self, metadata: &MetadataMap) -> u64 {
        let id = {
            let mut n = lock(&self.streams);
            *n += 1;
            *n
        };
        let record = StreamRecord { id, headers: headers(metadata), caller: None, node: None, refused: None };
        push_bounded(&mut lock(&self.records).streams, record);
        id
    }

    fn update_stream(&self, id: u64, f: impl FnOnce(&mut StreamRecord)) {
        if let Some(s) = lock(&self.records).streams.iter_mut().find(|s| s.id == id) {
            f(s);
        }
    }

    /// Records a refusal and returns the status to answer with.
    fn refuse(&self, id: u64, status: Status, reason: String) -> Status {
        tracing::info!(stream = id, code = ?status.code(), %reason, "fake istiod: refused an xDS stream");
        let refusal = Refusal { code: status.code(), message: status.message().into(), reason };
        self.update_stream(id, |s| s.refused = Some(refusal));
        status
    }
}

/// A call's headers (pseudo-headers are not in the metadata), values as text.
pub(super) fn headers(metadata: &MetadataMap) -> BTreeMap<String, String> {
    metadata
        .clone()
        .into_headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect()
}

/// The node of a stream's first request, checked as istiod checks it; `Err` is the answer
/// and the reason.
fn check_node(node: Option<&Node>, caller: &Account, trust_domain: &str) -> Result<NodeRecord, (Status, String)> {
    let invalid = |m: String| (Status::invalid_argument(m.clone()), m);
    let node = node.filter(|n| !n.id.is_empty()).ok_or_else(|| invalid("missing node information".into()))?;
    let record = NodeRecord { id: node.id.clone(), metadata: strings(node) };
    let parts: Vec<&str> = node.id.split('~').collect();
    let [kind, ip, _, domain] = parts.as_slice() else {
        return Err(invalid(format!("missing parts in the service node {:?}", node.id)));
    };
    if !NODE_TYPES.contains(kind) {
        return Err(invalid(format!(
            "invalid node type (valid types: {NODE_TYPES:?}) in the service node {:?}",
            node.id
        )));
    }
    let metadata_ips =
        record.metadata.get("INSTANCE_IPS").filter(|ips| ips.split(',').all(|i| i.parse::<IpAddr>().is_ok()));
    if metadata_ips.is_none() && ip.parse::<IpAddr>().is_err() {
        return Err(invalid("no valid IP address in the service node id or metadata".into()));
    }
    let namespace = match record.metadata.get("NAMESPACE").filter(|n| !n.is_empty()) {
        Some(ns) => ns.as_str(),
        None => domain.split_once('.').map_or("", |(ns, _)| ns),
    };
    let account = record.metadata.get("SERVICE_ACCOUNT").map_or("", String::as_str);
    let namespace_ok = namespace.is_empty() || namespace == caller.namespace;
    let account_ok = account.is_empty() || account == caller.service_account;
    if !(namespace_ok && account_ok) {
        let m = format!("no identities ([{}]) matched {namespace}/{account}", caller.spiffe(trust_domain));
        return Err((Status::permission_denied(format!("authorization failed: {m}")), m));
    }
    Ok(record)
}

fn strings(node: &Node) -> BTreeMap<String, String> {
    struct_strings(node.metadata.as_ref())
}

/// A protobuf `Struct`'s fields: strings as they are, other values in their Debug form.
pub(super) fn struct_strings(s: Option<&prost_types::Struct>) -> BTreeMap<String, String> {
    let fields = s.map(|m| m.fields.clone()).unwrap_or_default();
    fields
        .into_iter()
        .map(|(k, v)| match v.kind {
            Some(Kind::StringValue(s)) => (k, s),
            other => (k, format!("{other:?}")),
        })
        .collect()
}

/// The tonic service.
#[derive(Clone)]
pub struct AdsService {
    shared: Arc<Shared>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let shared = &self.shared;
        let id = shared.open_stream(request.metadata());
        let caller = shared
            .auth
            .authenticate(request.metadata())
            .map_err(|reason| shared.refuse(id, auth::refusal(), reason))?;
        shared.update_stream(id, |s| s.caller = Some(caller.clone()));
        let (tx, rx) = mpsc::channel(QUEUED);
        let conn = Conn { shared: shared.clone(), id, caller, held: BTreeMap::new(), nonces: 0, tx };
        tokio::spawn(conn.serve(request.into_inner()));
        let responses = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        Ok(Response::new(Box::pin(responses)))
    }
}

/// What woke a stream up.
enum Event {
    Request(Box<DeltaDiscoveryRequest>),
    Gone,
    Changed,
    Dropped,
}

/// One stream's state.
struct Conn {
    shared: Arc<Shared>,
    id: u64,
    caller: Account,
    /// Type subscribed → what the client holds (name → version).
    held: BTreeMap<String, BTreeMap<String, String>>,
    nonces: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl Conn {
    async fn serve(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) {
        let mut changes = self.shared.changes.subscribe();
        let mut drops = self.shared.drops.subscribe();
        drops.mark_unchanged();
        let mut first = true;
        loop {
            let event = tokio::select! {
                r = inbound.message() => r.ok().flatten().map_or(Event::Gone, |r| Event::Request(Box::new(r))),
                Ok(()) = changes.changed() => Event::Changed,
                Ok(()) = drops.changed() => Event::Dropped,
            };
            let result = match event {
                Event::Request(r) => self.receive(*r, std::mem::take(&mut first)).await,
                Event::Changed => self.push_all().await,
                Event::Gone => return,
                Event::Dropped => Err(Status::unavailable("the fake istiod dropped the stream")),
            };
            if let Err(status) = result {
                // The client may be gone already: nothing more to do then.
                let _ = self.tx.send(Err(status)).await;
                return;
            }
        }
    }

    /// Records a request; a subscription gets its first response.
    async fn receive(&mut self, r: DeltaDiscoveryRequest, first: bool) -> Result<(), Status> {
        let node = match first {
            true => Some(self.check(r.node.as_ref())?),
            false => r.node.as_ref().map(|n| NodeRecord { id: n.id.clone(), metadata: strings(n) }),
        };
        let kind = match (&r.response_nonce, &r.error_detail) {
            (n, _) if n.is_empty() => {
                RequestKind::Subscribe { initial_versions: r.initial_resource_versions.clone().into_iter().collect() }
            }
            (n, Some(e)) => RequestKind::Nack { nonce: n.clone(), message: e.message.clone() },
            (n, None) => RequestKind::Ack { nonce: n.clone() },
        };
        let record = RequestRecord { stream: self.id, type_url: r.type_url.clone(), kind: kind.clone(), node };
        push_bounded(&mut lock(&self.shared.records).requests, record);
        match kind {
            RequestKind::Subscribe { initial_versions } if !self.held.contains_key(&r.type_url) => {
                self.held.insert(r.type_url.clone(), initial_versions);
                self.push(&r.type_url, true).await
            }
            _ => Ok(()),
        }
    }

    fn check(&self, node: Option<&Node>) -> Result<NodeRecord, Status> {
        match check_node(node, &self.caller, &self.shared.trust_domain) {
            Ok(record) => {
                self.shared.update_stream(self.id, |s| s.node = Some(record.clone()));
                Ok(record)
            }
            Err((status, reason)) => Err(self.shared.refuse(self.id, status, reason)),
        }
    }

    async fn push_all(&mut self) -> Result<(), Status> {
        let types: Vec<String> = self.held.keys().cloned().collect();
        for t in types {
            self.push(&t, false).await?;
        }
        Ok(())
    }

    /// Sends what the client lacks of `type_url` (always, on a subscription's first push).
    async fn push(&mut self, type_url: &str, first: bool) -> Result<(), Status> {
        let Some(response) = self.diff(type_url, first) else { return Ok(()) };
        let record = ResponseRecord {
            stream: self.id,
            type_url: type_url.into(),
            nonce: response.nonce.clone(),
            resources: response.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect(),
            removed: response.removed_resources.clone(),
        };
        push_bounded(&mut lock(&self.shared.records).responses, record);
        // A client that went away ends the stream on its next read.
        let _ = self.tx.send(Ok(response)).await;
        Ok(())
    }

    /// The response bringing the client's `type_url` to the store's, if there is a change.
    fn diff(&mut self, type_url: &str, first: bool) -> Option<DeltaDiscoveryResponse> {
        let store = lock(&self.shared.store);
        let empty = BTreeMap::new();
        let served = store.resources.get(type_url).unwrap_or(&empty);
        let held = self.held.entry(type_url.into()).or_default();
        let resources: Vec<Resource> = served
            .iter()
            .filter(|(name, s)| held.get(*name) != Some(&s.version))
            .map(|(name, s)| Resource {
                version: s.version.clone(),
                resource: Some(s.value.clone()),
                name: name.clone(),
            })
            .collect();
        let removed: Vec<String> = held.keys().filter(|n| !served.contains_key(*n)).cloned().collect();
        if resources.is_empty() && removed.is_empty() && !first {
            return None;
        }
        *held = served.iter().map(|(n, s)| (n.clone(), s.version.clone())).collect();
        self.nonces += 1;
        Some(DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: format!("{}-{}", self.id, self.nonces),
            resources,
            removed_resources: removed,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{Struct, Value};

    fn node(id: &str, meta: &[(&str, &str)]) -> Node {
        let fields =
            meta.iter().map(|(k, v)| (k.to_string(), Value { kind: Some(Kind::StringValue(v.to_string())) })).collect();
        Node { id: id.into(), metadata: Some(Struct { fields }) }
    }

    #[test]
    fn the_node_gates_answer_with_istiods_codes() {
        let caller = Account::new("istio-system", "ztunnel");
        let check = |n: Option<Node>| check_node(n.as_ref(), &caller, "cluster.local").map_err(|(s, _)| s.code());
        let good = "ztunnel~10.0.0.1~mp.istio-system~istio-system.svc.cluster.local";
        assert!(check(Some(node(good, &[("NAMESPACE", "istio-system")]))).is_ok());
        assert!(check(Some(node(good, &[]))).is_ok(), "the namespace comes from the id's domain");
        assert_eq!(check(None), Err(Code::InvalidArgument));
        assert_eq!(check(Some(node("ztunnel~10.0.0.1~mp", &[]))), Err(Code::InvalidArgument));
        assert_eq!(check(Some(node("proxy~10.0.0.1~a~b.svc", &[]))), Err(Code::InvalidArgument));
        assert_eq!(check(Some(node("ztunnel~x~a~b.svc", &[]))), Err(Code::InvalidArgument));
        let other_ns = "ztunnel~10.0.0.1~mp.lab~lab.svc.cluster.local";
        assert_eq!(check(Some(node(other_ns, &[]))), Err(Code::PermissionDenied));
        assert_eq!(check(Some(node(good, &[("NAMESPACE", "lab")]))), Err(Code::PermissionDenied));
        assert_eq!(check(Some(node(good, &[("SERVICE_ACCOUNT", "other")]))), Err(Code::PermissionDenied));
    }

    #[test]
    fn resources_are_named_as_istiod_names_them() {
        let ip: IpAddr = "10.0.0.9".parse().expect("ip");
        let w = workload(&pod_uid("c1", "ns", "a"), "ns", "a", "sa", "n1", &[ip]);
        assert_eq!(w.cluster_id, "c1");
        assert_eq!(LabResource::from(w).name(), "c1//Pod/ns/a");
        let s = service("ns", "web", "web.ns.svc.cluster.local", &[ip], &[(80, 8080)]);
        assert_eq!(LabResource::from(s).name(), "ns/web.ns.svc.cluster.local");
        let a = authorization("ns", "deny", Scope::Namespace, Action::Deny, vec![]);
        let a = LabResource::from(a);
        assert_eq!((a.name().as_str(), a.type_url()), ("ns/deny", AUTHORIZATION_TYPE));
    }
}
