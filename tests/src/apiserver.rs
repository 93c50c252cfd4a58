//! An in-process Kubernetes API server for the tests and the lab.
//!
//! meshpath learns about pods, namespaces, services and endpoint slices through kube's
//! `watcher`. To exercise that path — initial list, live events, resumption, relists — with no
//! cluster around, this serves the list/watch protocol of kube-apiserver over plain HTTP/1.1
//! from an in-memory store that the test drives ([`ApiServer::apply`], [`ApiServer::delete`])
//! and disturbs ([`ApiServer::compact`], [`ApiServer::disconnect_watches`],
//! [`ApiServer::stop`]). The caller binds the listener, so the server can answer inside a lab
//! network namespace. The real `kube::Client`, `watcher` and `reflector` run against it
//! unchanged.
//!
//! Served (GET only; objects change through the handle, not over HTTP):
//! `/api/v1/{pods,namespaces,services}` and `/apis/discovery.k8s.io/v1/endpointslices`,
//! cluster-wide or below `/namespaces/{ns}/` for the namespaced kinds, and single objects
//! (`…/namespaces/{ns}/pods/{name}`, `/api/v1/namespaces/{name}`).
//!
//! What of the protocol is implemented, as kube-apiserver does it:
//! - **resourceVersion**: one counter for the whole store, like etcd's revision, handed out as
//!   a string on every change. `uid` and `creationTimestamp` are filled in on create and kept
//!   on replace; a replace that changes nothing is a no-op, as an update is.
//! - **LIST**: a `{Kind}List` with `metadata.resourceVersion`; items carry no `kind`/`apiVersion`.
//!   `limit`/`continue` paginate over one consistent snapshot: the token pins the list's
//!   resourceVersion, and one that history no longer reaches is a 410 `Expired`.
//!   `resourceVersion` with `resourceVersionMatch=Exact` lists that snapshot; otherwise the
//!   newest state is listed.
//! - **WATCH** (`watch=true`): newline-delimited JSON events in a chunked response. From
//!   resourceVersion `R`, the retained changes after `R`, then live ones; with no version, "0"
//!   or `sendInitialEvents=true`, a synthetic `ADDED` for every current object first (and with
//!   `sendInitialEvents`, then a `BOOKMARK` annotated `k8s.io/initial-events-end`). Selectors
//!   are applied per event as the watch cache does: an object that starts matching comes as
//!   `ADDED`, one that stops matching as `DELETED`. A version older than the retained history
//!   gets one `ERROR` event holding a 410 `Expired` Status, on which kube's watcher relists.
//!   With `allowWatchBookmarks`, `BOOKMARK`s carrying only `metadata.resourceVersion` come
//!   periodically, on [`ApiServer::bookmark_now`] and before `timeoutSeconds` ends the stream.
//! - **selectors**: `labelSelector` with `k=v`, `k==v`, `k!=v`, `k`, `!k`; `fieldSelector` with
//!   `=`, `==`, `!=` on `metadata.name`, `metadata.namespace` and the fields kube-apiserver
//!   indexes for the kind (`spec.nodeName`, `status.phase`, …). Anything else is refused with a
//!   400 Status rather than answered wrongly.
//! - **errors** are `Status` objects: 404 for unknown paths and objects, 405 for methods other
//!   than GET, 400 for bad parameters, 504 for a resourceVersion from the future.
//!
//! Not implemented: writes over HTTP, protobuf, discovery documents, authentication, TLS,
//! set-based label selectors.

use meshpath::sync::lock;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

/// How often an open watch gets a bookmark unless [`ApiServer::set_bookmark_interval`] says
/// otherwise: about once a minute, as kube-apiserver's watch cache sends them.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);
/// A watch without `timeoutSeconds` ends after this (kube-apiserver picks 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Changes kept for resuming watches; past this the older half is compacted away, as the
/// watch cache's window and etcd's compaction do.
const MAX_HISTORY: usize = 10_000;
/// Messages a watch may fall behind by before it is ended; the client then resumes from the
/// last event it got, which the history still holds.
const WATCH_BUFFER: usize = 4096;

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Namespace,
    Service,
    EndpointSlice,
    /// Istio's `security.istio.io/v1` kinds (their CRDs installed).
    AuthorizationPolicy,
    PeerAuthentication,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Pod,
        Kind::Namespace,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
    ];

    /// The kind's `kind` field, e.g. `Pod`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => "security.istio.io/v1",
            _ => "v1",
        }
    }

    /// The resource name in paths, e.g. `pods`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::PeerAuthentication => "peerauthentications",
        }
    }

    pub fn namespaced(self) -> bool {
        self != Kind::Namespace
    }

    /// The kind of a kube/k8s-openapi type, if it is served.
    pub fn of<K: kube::Resource<DynamicType = ()>>() -> Option<Kind> {
        Self::from_type(&K::api_version(&()), &K::kind(&()))
    }

    fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| k.api_version() == api_version && k.name() == kind)
    }

    /// Path prefix of the kind's group version.
    fn group_path(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1",
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => "/apis/security.istio.io/v1",
            _ => "/api/v1",
        }
    }
}

/// What a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    List,
    Watch,
    Get,
    /// A JSON merge patch of an object's status subresource (what the node patches its
    /// pods' redirection annotation through).
    PatchStatus,
}

/// One request the server answered (after routing), for tests to assert on.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub kind: Kind,
    pub verb: Verb,
    /// The namespace of the path, for namespaced requests.
    pub namespace: Option<String>,
    /// The query parameters, decoded.
    pub params: BTreeMap<String, String>,
}

impl RequestRecord {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("serializing the object: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{api_version:?}/{kind:?} is not served (pods, namespaces, services and endpointslices are)")]
    UnknownKind { api_version: String, kind: String },
    #[error("the object has no {0}")]
    MissingField(&'static str),
    #[error("{kind:?} {namespace}/{name} not found")]
    NotFound { kind: Kind, namespace: String, name: String },
}

/// A listener to serve on: either flavour, bound by the caller (possibly in another network
/// namespace).
pub enum Listener {
    Std(std::net::TcpListener),
    Tokio(tokio::net::TcpListener),
}

impl From<std::net::TcpListener> for Listener {
    fn from(l: std::net::TcpListener) -> Self {
        Listener::Std(l)
    }
}

impl From<tokio::net::TcpListener> for Listener {
    fn from(l: tokio::net::TcpListener) -> Self {
        Listener::Tokio(l)
    }
}

/// Handle on the server and its store. Clones share both; dropping the last one stops serving.
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    serving: Mutex<Vec<Serving>>,
}

/// One listener being served; dropping `stop` ends it too.
struct Serving {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// What the connections share with the handle.
struct Shared {
    store: Mutex<Store>,
    /// Every change in resourceVersion order. Sent while the store is locked, so a watch that
    /// subscribes under the same lock gets each change exactly once: in its replay or from here.
    events: broadcast::Sender<Msg>,
    /// Bumped by [`ApiServer::disconnect_watches`]; every open watch ends abruptly on a change.
    disconnect: watch::Sender<u64>,
    requests: Mutex<Vec<RequestRecord>>,
    bookmark_interval: Mutex<Duration>,
    /// Kinds answered 404, as for a CRD that is not installed.
    uninstalled: Mutex<BTreeSet<Kind>>,
}

#[derive(Clone)]
enum Msg {
    Change(Arc<Change>),
    /// The store's resourceVersion moved without a change (compaction).
    Progress(u64),
    /// Every watch that allows bookmarks gets one now.
    Bookmark,
}

/// Namespace ("" for cluster-scoped kinds) and name: the order lists come in.
type ObjKey = (String, String);
type Objects = BTreeMap<ObjKey, Arc<Value>>;

/// One committed change, kept so that watches can resume from an older resourceVersion.
struct Change {
    rv: u64,
    kind: Kind,
    key: ObjKey,
    /// The state before, if the object existed.
    prev: Option<Arc<Value>>,
    /// The state after; for a deletion the last state with the deletion's resourceVersion.
    obj: Arc<Value>,
    deleted: bool,
}

/// The objects and their history, etcd-style: `base` is the state at `compacted_rv`, `log`
/// every change after it, so any snapshot from `compacted_rv` on can be rebuilt.
struct Store {
    rv: u64,
    objects: BTreeMap<Kind, Objects>,
    base: BTreeMap<Kind, Objects>,
    compacted_rv: u64,
    log: VecDeque<Arc<Change>>,
    uids: u64,
    uid_seed: RandomState,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiServer {
    /// Serves `kind` (its CRD installed) or answers 404 for it (not installed).
    pub fn set_installed(&self, kind: Kind, installed: bool) {
        let mut uninstalled = lock(&self.inner.shared.uninstalled);
        if installed {
            uninstalled.remove(&kind);
        } else {
            uninstalled.insert(kind);
        }
    }

    /// An empty store, not yet serving.
    pub fn new() -> Self {
        let store = Store {
            // Like etcd, revision 1 is the empty store: every list has a non-zero version,
            // and "0" keeps its special meaning ("any version") for clients.
            rv: 1,
            objects: BTreeMap::new(),
            base: BTreeMap::new(),
            compacted_rv: 1,
            log: VecDeque::new(),
            uids: 0,
            uid_seed: RandomState::new(),
        };
        let shared = Shared {
            store: Mutex::new(store),
            events: broadcast::channel(WATCH_BUFFER).0,
            disconnect: watch::channel(0).0,
            requests: Mutex::new(Vec::new()),
            bookmark_interval: Mutex::new(DEFAULT_BOOKMARK_INTERVAL),
            uninstalled: Mutex::new(BTreeSet::new()),
        };
        ApiServer { inner: Arc::new(Inner { shared: Arc::new(shared), serving: Mutex::new(Vec::new()) }) }
    }

    /// Serves on `listener` until [`stop`](Self::stop) (may be called again later, also on
    /// several listeners at once). Must be called within a tokio runtime.
    pub fn start(&self, listener: impl Into<Listener>) -> Result<SocketAddr, ApiServerError> {
        let listener = match listener.into() {
            Listener::Std(l) => {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)?
            }
            Listener::Tokio(l) => l,
        };
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(self.inner.shared.clone(), listener, stopped));
        lock(&self.inner.serving).push(Serving { stop, task });
        Ok(addr)
    }

    /// Stops serving: closes the listeners and drops every open connection, watches included,
    /// as an API server that goes away does. The store stays; [`start`](Self::start) again to
    /// simulate a restart.
    pub async fn stop(&self) {
        let serving = std::mem::take(&mut *lock(&self.inner.serving));
        for s in serving {
            let _ = s.stop.send(());
            let _ = s.task.await;
        }
    }

    /// Creates or replaces `obj`. Returns its new resourceVersion.
    pub fn apply<K>(&self, obj: &K) -> Result<String, ApiServerError>
    where
        K: kube::Resource<DynamicType = ()> + Serialize,
    {
        let mut value = serde_json::to_value(obj)?;
        if let Some(map) = value.as_object_mut() {
            map.entry("apiVersion").or_insert_with(|| K::api_version(&()).into());
            map.entry("kind").or_insert_with(|| K::kind(&()).into());
        }
        self.apply_value(value)
    }

    /// Creates or replaces the object `obj`, which names its `apiVersion`, `kind`,
    /// `metadata.name` and, for namespaced kinds, `metadata.namespace`. A `uid` or
    /// `creationTimestamp` it brings is kept; otherwise those of the object it replaces, or new
    /// ones. Its `resourceVersion` is always the server's. Returns the new resourceVersion (the
    /// current one if nothing changed).
    pub fn apply_value(&self, mut obj: Value) -> Result<String, ApiServerError> {
        let field = |name: &str| obj.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
        let (api_version, kind_name) = (field("apiVersion"), field("kind"));
        let kind = Kind::from_type(&api_version, &kind_name)
            .ok_or(ApiServerError::UnknownKind { api_version, kind: kind_name })?;
        let meta = obj
            .as_object_mut()
            .ok_or(ApiServerError::MissingField("metadata"))?
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or(ApiServerError::MissingField("metadata"))?;
        let text = |name: &str| meta.get(name).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        let name = text("name").ok_or(ApiServerError::MissingField("metadata.name"))?;
        let namespace = if kind.namespaced() {
            text("namespace").ok_or(ApiServerError::MissingField("metadata.namespace"))?
        } else {
            meta.remove("namespace");
            String::new()
        };
        meta.remove("resourceVersion");

        let shared = &self.inner.shared;
        let mut store = lock(&shared.store);
        let key = (namespace, name);
        let existing = store.objects.get(&kind).and_then(|o| o.get(&key)).cloned();
        let kept = |name: &str| existing.as_ref().and_then(|e| e.get("metadata")?.get(name).cloned());
        if meta.get("uid").is_none_or(Value::is_null) {
            let uid = kept("uid").unwrap_or_else(|| store.new_uid().into());
            meta.insert("uid".into(), uid);
        }
        if meta.get("creationTimestamp").is_none_or(Value::is_null) {
            meta.insert("creationTimestamp".into(), kept("creationTimestamp").unwrap_or_else(now));
        }
        if let Some(existing) = &existing {
            let mut old = (**existing).clone();
            if let Some(m) = old.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            if old == obj {
                return Ok(store.rv.to_string());
            }
        }
        let change = store.commit(kind, key, obj, false);
        let _ = shared.events.send(Msg::Change(change.clone()));
        Ok(change.rv.to_string())
    }

    /// The object as the server holds it now (`namespace` is ignored for cluster-scoped kinds).
    pub fn object(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        let namespace = if kind.namespaced() { namespace.unwrap_or_default() } else { "" };
        let store = lock(&self.inner.shared.store);
        store.objects.get(&kind)?.get(&(namespace.to_owned(), name.to_owned())).map(|o| (**o).clone())
    }

    /// Every object of `kind` as the server holds it now, in list order.
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        let store = lock(&self.inner.shared.store);
        store.objects.get(&kind).map(|m| m.values().map(|o| (**o).clone()).collect()).unwrap_or_default()
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds). Watches get a
    /// `DELETED` event with its last state and a new resourceVersion, which is returned.
    pub fn delete(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Result<String, ApiServerError> {
        let namespace = if kind.namespaced() { namespace.unwrap_or_default() } else { "" };
        let key = (namespace.to_owned(), name.to_owned());
        let shared = &self.inner.shared;
        let mut store = lock(&shared.store);
        let last = store
            .objects
            .get(&kind)
            .and_then(|o| o.get(&key))
            .cloned()
            .ok_or_else(|| ApiServerError::NotFound { kind, namespace: key.0.clone(), name: key.1.clone() })?;
        let change = store.commit(kind, key, (*last).clone(), true);
        let _ = shared.events.send(Msg::Change(change.clone()));
        Ok(change.rv.to_string())
    }

    /// Forgets all history: every resourceVersion handed out so far becomes too old, so
    /// watches resuming from one get 410 Expired and continue tokens stop working. The
    /// store's resourceVersion moves on by one (versions are global, a list's version moving
    /// without changes of its kind is normal) so that even an up-to-date watcher is affected.
    /// Open watches go on.
    pub fn compact(&self) {
        let shared = &self.inner.shared;
        let mut store = lock(&shared.store);
        store.rv += 1;
        let rv = store.rv;
        store.compact_to(rv);
        let _ = shared.events.send(Msg::Progress(rv));
    }

    /// Drops every open watch stream abruptly, mid-response, as a broken connection does.
    /// Changes made after this call are never seen on those streams.
    pub fn disconnect_watches(&self) {
        self.inner.shared.disconnect.send_modify(|n| *n += 1);
    }

    /// Sends every open watch that allows bookmarks a bookmark now.
    pub fn bookmark_now(&self) {
        let _ = self.inner.shared.events.send(Msg::Bookmark);
    }

    /// How often watches opened from now on get a bookmark.
    pub fn set_bookmark_interval(&self, every: Duration) {
        *lock(&self.inner.shared.bookmark_interval) = every;
    }

    /// The store's current resourceVersion.
    pub fn resource_version(&self) -> String {
        lock(&self.inner.shared.store).rv.to_string()
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.inner.shared.requests).clone()
    }

    /// How many `verb` requests for `kind` were answered, e.g. to see that a relist happened.
    pub fn request_count(&self, kind: Kind, verb: Verb) -> usize {
        lock(&self.inner.shared.requests).iter().filter(|r| r.kind == kind && r.verb == verb).count()
    }
}

/// A kubeconfig for an API server at `server_url` (e.g. `http://10.0.0.1:6443`), without
/// authentication: for `KUBECONFIG` or `kube::Config::from_custom_kubeconfig`.
pub fn kubeconfig(server_url: &str) -> String {
    // A JSON string is a valid YAML scalar, so the URL needs no YAML quoting rules.
    let server = Value::from(server_url);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: meshpath-lab
  cluster:
    server: {server}
users:
- name: meshpath-lab
  user: {{}}
contexts:
- name: meshpath-lab
  context:
    cluster: meshpath-lab
    user: meshpath-lab
current-context: meshpath-lab
"
    )
}

impl Store {
    fn commit(&mut self, kind: Kind, key: ObjKey, mut obj: Value, deleted: bool) -> Arc<Change> {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let obj = Arc::new(obj);
        let objects = self.objects.entry(kind).or_default();
        let prev = if deleted { objects.remove(&key) } else { objects.insert(key.clone(), obj.clone()) };
        let change = Arc::new(Change { rv: self.rv, kind, key, prev, obj, deleted });
        self.log.push_back(change.clone());
        if self.log.len() > MAX_HISTORY {
            let rv = self.log[self.log.len() - MAX_HISTORY / 2 - 1].rv;
            self.compact_to(rv);
        }
        change
    }

    /// Folds the changes up to `rv` into `base`.
    fn compact_to(&mut self, rv: u64) {
        let n = self.log.partition_point(|c| c.rv <= rv);
        for change in self.log.drain(..n) {
            apply_change(self.base.entry(change.kind).or_default(), &change);
        }
        self.compacted_rv = rv;
    }

    /// The objects of `kind` as they were at `rv` (`compacted_rv` ≤ `rv`).
    fn snapshot(&self, kind: Kind, rv: u64) -> Objects {
        if rv >= self.rv {
            return self.objects.get(&kind).cloned().unwrap_or_default();
        }
        let mut state = self.base.get(&kind).cloned().unwrap_or_default();
        for change in self.log.iter().take_while(|c| c.rv <= rv).filter(|c| c.kind == kind) {
            apply_change(&mut state, change);
        }
        state
    }

    fn changes_after(&self, rv: u64) -> impl Iterator<Item = &Arc<Change>> {
        self.log.range(self.log.partition_point(|c| c.rv <= rv)..)
    }

    /// A random-looking version 4 UUID.
    fn new_uid(&mut self) -> String {
        self.uids += 1;
        let (a, b) = (self.uid_seed.hash_one(self.uids), self.uid_seed.hash_one(!self.uids));
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    /// The version a list without a continue token reads at, or why it cannot be served.
    fn list_version(&self, params: &Params) -> Result<u64, ApiError> {
        let version_match = param(params, "resourceVersionMatch");
        if !matches!(version_match, None | Some("NotOlderThan" | "Exact")) {
            return Err(bad_request(format!("unsupported resourceVersionMatch {version_match:?}")));
        }
        let Some(requested) = param(params, "resourceVersion") else {
            if version_match.is_some() {
                return Err(bad_request("resourceVersionMatch is forbidden unless resourceVersion is provided"));
            }
            // Unset: the most recent state (a quorum read).
            return Ok(self.rv);
        };
        let rv = parse_rv(requested)?;
        if rv > self.rv {
            return Err(too_large(rv, self.rv));
        }
        if version_match != Some("Exact") {
            // "0" (any version) and NotOlderThan: the newest state satisfies both.
            return Ok(self.rv);
        }
        if rv == 0 {
            return Err(bad_request("resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\""));
        }
        if rv < self.compacted_rv {
            return Err(expired(format!("too old resource version: {rv} ({})", self.compacted_rv)));
        }
        Ok(rv)
    }
}

fn apply_change(state: &mut Objects, change: &Change) {
    if change.deleted {
        state.remove(&change.key);
    } else {
        state.insert(change.key.clone(), change.obj.clone());
    }
}

fn now() -> Value {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).expect("a timestamp serializes")
}

// ---------------------------------------------------------------------------------------------
// HTTP

type Body = UnsyncBoxBody<Bytes, io::Error>;
type Params = BTreeMap<String, String>;

async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!("API server accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(serve_request(&shared, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new();
                    if let Err(e) = conn.serve_connection(TokioIo::new(stream), service).await {
                        tracing::debug!("API server connection: {e}");
                    }
                });
            }
        }
    }
    // Closing the listener refuses new connections; aborting the connection tasks drops open
    // requests and watches mid-flight, as a crashed API server would.
    drop(listener);
    connections.shutdown().await;
}

/// Which objects a path addresses.
struct Route {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    /// `status`, for a path ending in the status subresource.
    status: bool,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let (group, rest) = Kind::ALL
            .into_iter()
            .map(Kind::group_path)
            .find_map(|g| Some((g, path.strip_prefix(g)?.strip_prefix('/')?)))?;
        let segments: Vec<&str> = rest.split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return None;
        }
        let (plural, namespace, name, status) = match segments[..] {
            ["namespaces", ns, plural] => (plural, Some(ns), None, false),
            ["namespaces", ns, plural, name] => (plural, Some(ns), Some(name), false),
            ["namespaces", ns, plural, name, "status"] => (plural, Some(ns), Some(name), true),
            [plural] => (plural, None, None, false),
            [plural, name] => (plural, None, Some(name), false),
            _ => return None,
        };
        let kind = Kind::ALL.into_iter().find(|k| k.group_path() == group && k.plural() == plural)?;
        // Cluster-scoped kinds live outside namespaces; namespaced objects are addressed
        // inside theirs (a namespaced kind is listed cluster-wide without one).
        if (namespace.is_some() && !kind.namespaced()) || (name.is_some() && kind.namespaced() && namespace.is_none()) {
            return None;
        }
        Some(Route { kind, namespace: namespace.map(str::to_owned), name: name.map(str::to_owned), status })
    }
}

/// Answers one request: a status patch (which reads its body), or a read.
async fn serve_request(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let route = Route::parse(req.uri().path()).filter(|r| !lock(&shared.uninstalled).contains(&r.kind));
    let Some(route) = route else {
        return status_response(&ApiError::new(404, "NotFound", "the server could not find the requested resource"));
    };
    if req.method() == Method::PATCH && route.status {
        return patch_status(shared, &route, req).await.unwrap_or_else(|e| status_response(&e));
    }
    handle(shared, route, req)
}

/// A JSON merge patch (RFC 7386) of an object through its status subresource, as
/// `kubectl patch --subresource status --type merge` sends it. Watches see the change.
async fn patch_status(shared: &Shared, route: &Route, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let merge = req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v == "application/merge-patch+json");
    if !merge {
        return Err(ApiError::new(415, "UnsupportedMediaType", "only merge patches are served"));
    }
    let body = req.into_body().collect().await.map_err(|e| bad_request(format!("reading the body: {e}")))?;
    let patch: Value = serde_json::from_slice(&body.to_bytes()).map_err(|e| bad_request(format!("the patch: {e}")))?;
    lock(&shared.requests).push(RequestRecord {
        kind: route.kind,
        verb: Verb::PatchStatus,
        namespace: route.namespace.clone(),
        params: BTreeMap::new(),
    });
    let key = (route.namespace.clone().unwrap_or_default(), route.name.clone().unwrap_or_default());
    let mut store = lock(&shared.store);
    let Some(current) = store.objects.get(&route.kind).and_then(|o| o.get(&key)).cloned() else {
        return Err(ApiError {
            details: Some(json!({"name": key.1, "kind": route.kind.plural()})),
            ..ApiError::new(404, "NotFound", format!("{} \"{}\" not found", route.kind.plural(), key.1))
        });
    };
    let mut obj = (*current).clone();
    merge_patch(&mut obj, &patch);
    if obj == *current {
        return Ok(json_response(StatusCode::OK, &obj));
    }
    let change = store.commit(route.kind, key, obj, false);
    let _ = shared.events.send(Msg::Change(change.clone()));
    Ok(json_response(StatusCode::OK, &change.obj))
}

/// RFC 7386: objects merge key by key, `null` removes a key, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("made an object just above");
    for (k, v) in fields {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn handle(shared: &Shared, route: Route, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET || route.status {
        return status_response(&ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    let params = parse_query(req.uri().query().unwrap_or_default());
    let verb = match (&route.name, param(&params, "watch")) {
        (Some(_), _) => Verb::Get,
        (None, Some("true" | "1")) => Verb::Watch,
        (None, _) => Verb::List,
    };
    lock(&shared.requests).push(RequestRecord {
        kind: route.kind,
        verb,
        namespace: route.namespace.clone(),
        params: params.clone(),
    });
    let response = match verb {
        Verb::Get => get(shared, &route),
        Verb::List => list(shared, &route, &params).map(|list| json_response(StatusCode::OK, &list)),
        Verb::Watch => start_watch(shared, &route, &params),
        Verb::PatchStatus => unreachable!("status patches are served by patch_status"),
    };
    response.unwrap_or_else(|e| status_response(&e))
}

fn get(shared: &Shared, route: &Route) -> Result<Response<Body>, ApiError> {
    let name = route.name.clone().unwrap_or_default();
    let key = (route.namespace.clone().unwrap_or_default(), name);
    let store = lock(&shared.store);
    match store.objects.get(&route.kind).and_then(|o| o.get(&key)) {
        Some(obj) => Ok(json_response(StatusCode::OK, obj)),
        None => Err(ApiError {
            details: Some(json!({"name": key.1, "kind": route.kind.plural()})),
            ..ApiError::new(404, "NotFound", format!("{} \"{}\" not found", route.kind.plural(), key.1))
        }),
    }
}

fn list(shared: &Shared, route: &Route, params: &Params) -> Result<Value, ApiError> {
    let kind = route.kind;
    let filter = Filter::parse(kind, route.namespace.clone(), params)?;
    let limit = match param(params, "limit") {
        None => 0,
        Some(l) => l.parse::<usize>().map_err(|_| bad_request(format!("invalid limit {l:?}")))?,
    };
    let store = lock(&shared.store);
    let (rv, after) = match param(params, "continue") {
        Some(token) => {
            if param(params, "resourceVersion").is_some() {
                return Err(bad_request("specifying resource version is not allowed when using continue"));
            }
            let (rv, after) = decode_continue(token)
                .filter(|(rv, _)| *rv <= store.rv)
                .ok_or_else(|| bad_request("continue key is not valid: it was not handed out by this server"))?;
            if rv < store.compacted_rv {
                return Err(expired(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some(after))
        }
        None => (store.list_version(params)?, None),
    };
    let snapshot = store.snapshot(kind, rv);
    drop(store);

    let mut matching = snapshot
        .iter()
        .filter(|(key, _)| after.as_ref().is_none_or(|after| *key > after))
        .filter(|(_, obj)| filter.matches(obj));
    let mut items = Vec::new();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    for (key, obj) in matching.by_ref() {
        let mut item = (**obj).clone();
        // Items of a typed list carry no type fields; the list does.
        if let Some(map) = item.as_object_mut() {
            map.remove("kind");
            map.remove("apiVersion");
        }
        items.push(item);
        if items.len() == limit {
            let remaining = matching.count();
            if remaining > 0 {
                metadata["continue"] = encode_continue(rv, key).into();
                // The real server only knows the count when it need not filter.
                if !filter.has_selectors() {
                    metadata["remainingItemCount"] = remaining.into();
                }
            }
            break;
        }
    }
    Ok(json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}

/// The continue token: the snapshot's resourceVersion and the last key returned. Clients
/// treat it as opaque; names and namespaces cannot contain '/'.
fn encode_continue(rv: u64, (namespace, name): &ObjKey) -> String {
    format!("{rv}/{namespace}/{name}")
}

fn decode_continue(token: &str) -> Option<(u64, ObjKey)> {
    let mut parts = token.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, (parts.next()?.to_owned(), parts.next()?.to_owned())))
}

fn start_watch(shared: &Shared, route: &Route, params: &Params) -> Result<Response<Body>, ApiError> {
    let kind = route.kind;
    let filter = Filter::parse(kind, route.namespace.clone(), params)?;
    let bookmarks = matches!(param(params, "allowWatchBookmarks"), Some("true" | "1"));
    let send_initial = param(params, "sendInitialEvents").map(|v| matches!(v, "true" | "1"));
    let version_match = param(params, "resourceVersionMatch");
    match (send_initial, version_match) {
        (Some(_), Some("NotOlderThan")) | (None, None) => {}
        (Some(_), _) => {
            return Err(bad_request(
                "sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan",
            ));
        }
        (None, Some(_)) => {
            return Err(bad_request(
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
    }
    if send_initial == Some(true) && !bookmarks {
        return Err(bad_request("sendInitialEvents requires setting allowWatchBookmarks to true"));
    }
    let timeout = match param(params, "timeoutSeconds") {
        None | Some("0") => DEFAULT_WATCH_TIMEOUT,
        Some(s) => Duration::from_secs(s.parse().map_err(|_| bad_request(format!("invalid timeoutSeconds {s:?}")))?),
    };
    // "0" means any version, which is what unset means too: start from the current state.
    let from = param(params, "resourceVersion").map(parse_rv).transpose()?.filter(|rv| *rv != 0);
    // Without a version to start from, or when asked, the current state comes first as ADDED.
    let initial = send_initial.unwrap_or(from.is_none());

    let store = lock(&shared.store);
    if let Some(rv) = from {
        if rv > store.rv {
            return Err(too_large(rv, store.rv));
        }
        if !initial && rv < store.compacted_rv {
            // As the watch cache does: a 200 whose one event is the error.
            let status = expired(format!("too old resource version: {rv} ({})", store.compacted_rv)).status();
            return Ok(stream_response(full(event_line("ERROR", &status))));
        }
    }
    let mut lines = VecDeque::new();
    let mut told_rv = from.unwrap_or(0);
    if initial {
        let objects = store.objects.get(&kind).into_iter().flat_map(|o| o.values());
        lines.extend(objects.filter(|obj| filter.matches(obj)).map(|obj| event_line("ADDED", obj)));
        if send_initial == Some(true) {
            lines.push_back(bookmark_line(kind, store.rv, true));
            told_rv = store.rv;
        }
    } else if let Some(rv) = from {
        for change in store.changes_after(rv).filter(|c| c.kind == kind) {
            if let Some(line) = change_line(change, &filter) {
                lines.push_back(line);
                told_rv = change.rv;
            }
        }
    }
    let every = *lock(&shared.bookmark_interval);
    let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let watch = WatchStream {
        kind,
        filter,
        bookmarks,
        lines,
        events: shared.events.subscribe(),
        disconnect: shared.disconnect.subscribe(),
        deadline: Instant::now() + timeout,
        ticker,
        seen_rv: store.rv,
        told_rv,
        done: false,
        aborted: false,
    };
    drop(store);
    let frames = futures::stream::unfold(watch, |mut watch| async move {
        let frame = watch.next_frame().await?;
        Some((frame, watch))
    });
    // No length: hyper sends it chunked, flushing each event as it comes.
    Ok(stream_response(StreamBody::new(frames).boxed_unsync()))
}

/// One open watch: what it still has to send and where its events come from.
struct WatchStream {
    kind: Kind,
    filter: Filter,
    bookmarks: bool,
    lines: VecDeque<Bytes>,
    events: broadcast::Receiver<Msg>,
    disconnect: watch::Receiver<u64>,
    deadline: Instant,
    ticker: tokio::time::Interval,
    /// Every change up to here has been seen (sent or filtered out): what a bookmark may claim.
    seen_rv: u64,
    /// The newest version the client was told of, by an event or a bookmark.
    told_rv: u64,
    /// End the stream cleanly once `lines` is drained.
    done: bool,
    aborted: bool,
}

impl WatchStream {
    async fn next_frame(&mut self) -> Option<io::Result<Frame<Bytes>>> {
        loop {
            if self.aborted {
                return None;
            }
            // A disconnect wins over anything still queued, so that nothing committed after
            // disconnect_watches() reaches the client on this stream.
            if self.disconnect.has_changed().unwrap_or(true) {
                return self.abort();
            }
            if let Some(line) = self.lines.pop_front() {
                return Some(Ok(Frame::data(line)));
            }
            if self.done {
                return None;
            }
            tokio::select! {
                biased;
                _ = self.disconnect.changed() => return self.abort(),
                () = tokio::time::sleep_until(self.deadline) => {
                    // kube-apiserver also sends a last bookmark just before the timeout, so the
                    // client resumes from the newest version rather than its last event's.
                    if self.bookmarks {
                        self.push_bookmark();
                    }
                    self.done = true;
                }
                msg = self.events.recv() => self.receive(msg),
                _ = self.ticker.tick() => {
                    if self.bookmarks && self.seen_rv > self.told_rv {
                        self.push_bookmark();
                    }
                }
            }
        }
    }

    fn receive(&mut self, msg: Result<Msg, RecvError>) {
        match msg {
            Ok(Msg::Change(change)) => {
                self.seen_rv = change.rv;
                if change.kind == self.kind
                    && let Some(line) = change_line(&change, &self.filter)
                {
                    self.lines.push_back(line);
                    self.told_rv = change.rv;
                }
            }
            Ok(Msg::Progress(rv)) => self.seen_rv = rv,
            Ok(Msg::Bookmark) => {
                if self.bookmarks {
                    self.push_bookmark();
                }
            }
            // Fell behind or the server is gone: end cleanly; the client resumes from the last
            // event it got.
            Err(RecvError::Lagged(_) | RecvError::Closed) => self.done = true,
        }
    }

    fn push_bookmark(&mut self) {
        self.lines.push_back(bookmark_line(self.kind, self.seen_rv, false));
        self.told_rv = self.seen_rv;
    }

    /// An error makes hyper drop the connection without ending the chunked body.
    fn abort(&mut self) -> Option<io::Result<Frame<Bytes>>> {
        self.aborted = true;
        Some(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "watch dropped by disconnect_watches")))
    }
}

/// The event a watch with `filter` sees for `change`, as the watch cache decides it: entering
/// the selection is ADDED, leaving it DELETED (the old state with the new version).
fn change_line(change: &Change, filter: &Filter) -> Option<Bytes> {
    let now = !change.deleted && filter.matches(&change.obj);
    let before = change.prev.as_deref().is_some_and(|prev| filter.matches(prev));
    match (before, now) {
        (false, true) => Some(event_line("ADDED", &change.obj)),
        (true, true) => Some(event_line("MODIFIED", &change.obj)),
        (true, false) if change.deleted => Some(event_line("DELETED", &change.obj)),
        (true, false) => {
            let mut gone = change.prev.as_deref().cloned().unwrap_or_default();
            gone["metadata"]["resourceVersion"] = change.rv.to_string().into();
            Some(event_line("DELETED", &gone))
        }
        (false, false) => None,
    }
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    #[derive(Serialize)]
    struct Event<'a> {
        #[serde(rename = "type")]
        event_type: &'a str,
        object: &'a Value,
    }
    let mut line = serde_json::to_vec(&Event { event_type, object }).expect("JSON values serialize");
    line.push(b'\n');
    line.into()
}

/// A bookmark is an object of the watched kind with nothing but its resourceVersion (and, at
/// the end of `sendInitialEvents`, the annotation saying so).
fn bookmark_line(kind: Kind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line("BOOKMARK", &json!({"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": metadata}))
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed_unsync()
}

fn stream_response(body: Body) -> Response<Body> {
    Response::builder().header(header::CONTENT_TYPE, "application/json").body(body).expect("a valid response")
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("JSON values serialize");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(bytes))
        .expect("a valid response")
}

/// A request that failed, answered with a `Status` object as kube-apiserver does.
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), details: None }
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

fn status_response(e: &ApiError) -> Response<Body> {
    json_response(StatusCode::from_u16(e.code).expect("a valid status code"), &e.status())
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "BadRequest", message)
}

fn expired(message: impl Into<String>) -> ApiError {
    ApiError::new(410, "Expired", message)
}

/// A version this store has not reached (kube-apiserver waits a few seconds for it first).
fn too_large(requested: u64, current: u64) -> ApiError {
    ApiError {
        details: Some(json!({
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1,
        })),
        ..ApiError::new(504, "Timeout", format!("Too large resource version: {requested}, current: {current}"))
    }
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse().map_err(|_| bad_request(format!("invalid resourceVersion {s:?}")))
}

/// A query parameter that is present and not empty (an empty one means unset).
fn param<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    params.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// Decodes `application/x-www-form-urlencoded` pairs (kube encodes its query that way). The
/// first occurrence of a key wins, as Go's `url.Values.Get`.
fn parse_query(query: &str) -> Params {
    let mut params = Params::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.entry(percent_decode(k)).or_insert_with(|| percent_decode(v));
    }
    params
}

fn percent_decode(s: &str) -> String {
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
            (b'+', ..) => out.push(b' '),
            (b, ..) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Selectors

/// Fields a `fieldSelector` may name (`None`: every kind) and the value an unset one has —
/// those kube-apiserver offers for these kinds.
const FIELDS: &[(Option<Kind>, &str, &str)] = &[
    (None, "metadata.name", ""),
    (None, "metadata.namespace", ""),
    (Some(Kind::Pod), "spec.nodeName", ""),
    (Some(Kind::Pod), "spec.restartPolicy", ""),
    (Some(Kind::Pod), "spec.schedulerName", ""),
    (Some(Kind::Pod), "spec.serviceAccountName", ""),
    (Some(Kind::Pod), "spec.hostNetwork", "false"),
    (Some(Kind::Pod), "status.phase", ""),
    (Some(Kind::Pod), "status.podIP", ""),
    (Some(Kind::Pod), "status.nominatedNodeName", ""),
    (Some(Kind::Namespace), "status.phase", ""),
    (Some(Kind::Service), "spec.clusterIP", ""),
    (Some(Kind::Service), "spec.type", ""),
];

enum LabelReq {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

struct FieldReq {
    path: &'static str,
    unset: &'static str,
    value: String,
    equals: bool,
}

/// What a request selects: the namespace of its path and its selectors.
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn parse(kind: Kind, namespace: Option<String>, params: &Params) -> Result<Filter, ApiError> {
        let labels = param(params, "labelSelector").map(parse_labels).transpose()?.unwrap_or_default();
        let fields = param(params, "fieldSelector").map(|s| parse_fields(kind, s)).transpose()?.unwrap_or_default();
        Ok(Filter { namespace, labels, fields })
    }

    fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }

    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let label = |k: &str| meta["labels"][k].as_str();
        let labels_match = self.labels.iter().all(|req| match req {
            LabelReq::Equals(k, v) => label(k) == Some(v),
            // As in Kubernetes, `!=` also selects objects without the label.
            LabelReq::NotEquals(k, v) => label(k) != Some(v),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_match
            && self.fields.iter().all(|req| {
                let value = req.path.split('.').fold(obj, |v, part| &v[part]);
                let value = match value {
                    Value::String(s) => s.clone(),
                    Value::Null => req.unset.to_owned(),
                    other => other.to_string(),
                };
                (value == req.value) == req.equals
            })
    }
}

fn parse_labels(selector: &str) -> Result<Vec<LabelReq>, ApiError> {
    let unsupported = || {
        bad_request(format!("unsupported label selector {selector:?}: only k=v, k==v, k!=v, k and !k are implemented"))
    };
    // Set-based requirements (`k in (a,b)`) have commas inside parentheses: refuse them whole.
    if selector.contains(['(', ')']) {
        return Err(unsupported());
    }
    let valid_key = |k: &str| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    let valid_value = |v: &str| v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let mut reqs = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let req = if let Some((k, v)) = term.split_once("!=") {
            LabelReq::NotEquals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelReq::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some(k) = term.strip_prefix('!') {
            LabelReq::NotExists(k.trim().to_owned())
        } else {
            LabelReq::Exists(term.to_owned())
        };
        let ok = match &req {
            LabelReq::Equals(k, v) | LabelReq::NotEquals(k, v) => valid_key(k) && valid_value(v),
            LabelReq::Exists(k) | LabelReq::NotExists(k) => valid_key(k),
        };
        if !ok {
            return Err(unsupported());
        }
        reqs.push(req);
    }
    Ok(reqs)
}

fn parse_fields(kind: Kind, selector: &str) -> Result<Vec<FieldReq>, ApiError> {
    let mut reqs = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (path, value, equals) = if let Some((p, v)) = term.split_once("!=") {
            (p, v, false)
        } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (p, v, true)
        } else {
            return Err(bad_request(format!("invalid selector: {term:?}; can't understand it")));
        };
        let path = path.trim();
        let &(_, path, unset) = FIELDS
            .iter()
            .find(|(k, p, _)| *p == path && k.is_none_or(|k| k == kind))
            .ok_or_else(|| bad_request(format!("field label not supported: {path}")))?;
        reqs.push(FieldReq { path, unset, value: value.trim().to_owned(), equals });
    }
    Ok(reqs)
}

#[cfg(test)]
mod tests {
    //! Everything here goes through the real kube client, watcher and reflector: the point is
    //! that they cannot tell this server from kube-apiserver.

    use std::fmt::Debug;
    use std::net::TcpListener;

    use futures::{StreamExt, TryStreamExt};
    use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::api::{Api, ListParams, WatchEvent, WatchParams};
    use kube::runtime::reflector::{self, Store};
    use kube::runtime::{WatchStreamExt, watcher};
    use kube::{Client, ResourceExt};
    use serde::de::DeserializeOwned;

    use super::*;

    fn pod(namespace: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(PodSpec { node_name: Some(node.into()), ..Default::default() }),
            ..Default::default()
        }
    }

    fn namespace(name: &str) -> Namespace {
        Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() }
    }

    fn client(addr: SocketAddr) -> Client {
        Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap()
    }

    fn start() -> (ApiServer, SocketAddr) {
        let server = ApiServer::new();
        let addr = server.start(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        (server, addr)
    }

    /// A reflector fed by kube's watcher with its default backoff, running in the background.
    fn reflect<K>(api: Api<K>, config: watcher::Config) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let (reader, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
        tokio::spawn(stream.for_each(|_| async {}));
        reader
    }

    fn names<K: kube::Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<String> {
        let mut names: Vec<String> = store.state().iter().map(|o| o.name_any()).collect();
        names.sort();
        names
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn requests(server: &ApiServer, kind: Kind, verb: Verb) -> Vec<RequestRecord> {
        server.requests().into_iter().filter(|r| r.kind == kind && r.verb == verb).collect()
    }

    fn api_error_code(e: kube::Error) -> u16 {
        match e {
            kube::Error::Api(status) => status.code,
            other => panic!("expected a Status, got {other:?}"),
        }
    }

    #[test]
    fn merge_patches_merge_objects_remove_nulls_and_replace_the_rest() {
        let mut obj = json!({"metadata": {"name": "a", "annotations": {"x": "1", "y": "2"}}, "spec": [1, 2]});
        merge_patch(&mut obj, &json!({"metadata": {"annotations": {"x": null, "z": "3"}}, "spec": [3]}));
        assert_eq!(obj, json!({"metadata": {"name": "a", "annotations": {"y": "2", "z": "3"}}, "spec": [3]}));
        let mut bare = json!({"metadata": {"name": "b"}});
        merge_patch(&mut bare, &json!({"metadata": {"annotations": {"k": "v"}}}));
        assert_eq!(bare["metadata"]["annotations"]["k"], "v");
    }

    #[tokio::test]
    async fn watcher_pages_the_initial_list_then_follows_changes() {
        let (server, addr) = start();
        for i in 0..5 {
            server.apply(&pod("default", &format!("p{i}"), "node-1", &[])).unwrap();
        }
        let listed_rv = server.resource_version();
        // The client comes from the kubeconfig helper, as the lab's daemons get it.
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&kubeconfig(&format!("http://{addr}"))).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
        let api: Api<Pod> = Api::all(Client::try_from(config).unwrap());
        let mut events = watcher(api, watcher::Config::default().page_size(2)).boxed();
        let mut next =
            async || tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap().unwrap();

        let mut initial = Vec::new();
        loop {
            match next().await {
                watcher::Event::InitDone => break,
                watcher::Event::InitApply(p) => initial.push(p),
                watcher::Event::Init => assert!(initial.is_empty()),
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(initial.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["p0", "p1", "p2", "p3", "p4"]);
        let mut uids: Vec<_> = initial.iter().map(|p| p.uid().unwrap()).collect();
        uids.dedup();
        assert_eq!(uids.len(), 5);
        assert!(initial.iter().all(|p| p.creation_timestamp().is_some()));
        assert_eq!(initial[4].resource_version().as_deref(), Some(listed_rv.as_str()));

        // Five pods in pages of two: three lists, the later ones continuing the first.
        let lists = requests(&server, Kind::Pod, Verb::List);
        assert_eq!(lists.len(), 3);
        assert!(lists.iter().all(|l| l.param("limit") == Some("2")));
        assert_eq!(lists[0].param("continue"), None);
        assert_eq!(lists[1].param("continue"), Some(format!("{listed_rv}/default/p1").as_str()));
        assert_eq!(lists[2].param("continue"), Some(format!("{listed_rv}/default/p3").as_str()));

        let rv = server.apply(&pod("default", "p5", "node-1", &[])).unwrap();
        match next().await {
            watcher::Event::Apply(p) => assert_eq!((p.name_any(), p.resource_version()), ("p5".into(), Some(rv))),
            other => panic!("expected p5 added, got {other}"),
        }
        let watches = requests(&server, Kind::Pod, Verb::Watch);
        assert_eq!(watches.len(), 1);
        assert_eq!(watches[0].param("resourceVersion"), Some(listed_rv.as_str()));
        assert_eq!(watches[0].param("allowWatchBookmarks"), Some("true"));

        let rv = server.apply(&pod("default", "p5", "node-1", &[("app", "x")])).unwrap();
        match next().await {
            watcher::Event::Apply(p) => {
                assert_eq!(p.resource_version(), Some(rv));
                assert_eq!(p.labels().get("app").map(String::as_str), Some("x"));
            }
            other => panic!("expected p5 modified, got {other}"),
        }

        let rv = server.delete(Kind::Pod, Some("default"), "p0").unwrap();
        match next().await {
            watcher::Event::Delete(p) => assert_eq!((p.name_any(), p.resource_version()), ("p0".into(), Some(rv))),
            other => panic!("expected p0 deleted, got {other}"),
        }
    }

    #[tokio::test]
    async fn compacted_history_makes_the_watcher_relist() {
        let (server, addr) = start();
        for name in ["a", "b", "c"] {
            server.apply(&pod("default", name, "node-1", &[])).unwrap();
        }
        let store = reflect(Api::<Pod>::all(client(addr)), watcher::Config::default());
        eventually("the initial list", || names(&store) == ["a", "b", "c"]).await;
        eventually("the watch", || server.request_count(Kind::Pod, Verb::Watch) == 1).await;
        let stale_rv = server.resource_version();

        // Nothing else runs on this single-threaded runtime between these calls: the open watch
        // is cut before it could carry the changes, and the version it resumes from is gone.
        server.disconnect_watches();
        server.delete(Kind::Pod, Some("default"), "a").unwrap();
        server.apply(&pod("default", "d", "node-1", &[])).unwrap();
        server.compact();

        eventually("the relisted state", || names(&store) == ["b", "c", "d"]).await;
        assert_eq!(server.request_count(Kind::Pod, Verb::List), 2, "one relist after the 410");
        let watches = requests(&server, Kind::Pod, Verb::Watch);
        assert_eq!(watches[1].param("resourceVersion"), Some(stale_rv.as_str()), "the resumption that got 410");
        eventually("the watch after the relist", || server.request_count(Kind::Pod, Verb::Watch) == 3).await;
        let relisted_rv = server.resource_version();
        assert_eq!(requests(&server, Kind::Pod, Verb::Watch)[2].param("resourceVersion"), Some(relisted_rv.as_str()));
    }

    #[tokio::test]
    async fn bookmarks_advance_the_resume_version() {
        let (server, addr) = start();
        server.apply(&pod("default", "a", "node-1", &[])).unwrap();
        let _store = reflect(Api::<Pod>::all(client(addr)), watcher::Config::default());
        eventually("the watch", || server.request_count(Kind::Pod, Verb::Watch) == 1).await;
        let listed_rv = server.resource_version();

        // Namespaces change: the pod watch carries none of it, only bookmarks tell it.
        for i in 0..3 {
            server.apply(&namespace(&format!("ns{i}"))).unwrap();
        }
        let current = server.resource_version();
        assert_ne!(current, listed_rv);
        server.bookmark_now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.set_bookmark_interval(Duration::from_millis(100));
        server.disconnect_watches();
        eventually("the resumed watch", || server.request_count(Kind::Pod, Verb::Watch) == 2).await;
        assert_eq!(requests(&server, Kind::Pod, Verb::Watch)[1].param("resourceVersion"), Some(current.as_str()));

        // Periodic bookmarks (this watch was opened with the 100 ms interval).
        server.apply(&namespace("late")).unwrap();
        let current = server.resource_version();
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.disconnect_watches();
        eventually("the second resumed watch", || server.request_count(Kind::Pod, Verb::Watch) == 3).await;
        assert_eq!(requests(&server, Kind::Pod, Verb::Watch)[2].param("resourceVersion"), Some(current.as_str()));
        assert_eq!(server.request_count(Kind::Pod, Verb::List), 1, "resumed, never relisted");
    }

    #[tokio::test]
    async fn watcher_recovers_when_the_server_restarts() {
        let (server, addr) = start();
        server.apply(&pod("default", "a", "node-1", &[])).unwrap();
        server.apply(&pod("default", "b", "node-1", &[])).unwrap();
        let store = reflect(Api::<Pod>::all(client(addr)), watcher::Config::default());
        eventually("the initial list", || names(&store) == ["a", "b"]).await;
        eventually("the watch", || server.request_count(Kind::Pod, Verb::Watch) == 1).await;

        server.stop().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "stopped means refused");
        // The store outlives the server, as etcd outlives kube-apiserver.
        server.delete(Kind::Pod, Some("default"), "a").unwrap();
        server.apply(&pod("default", "c", "node-2", &[])).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(names(&store), ["a", "b"]);

        server.start(TcpListener::bind(addr).unwrap()).unwrap();
        eventually("the state after the restart", || names(&store) == ["b", "c"]).await;
        assert_eq!(server.request_count(Kind::Pod, Verb::List), 1, "resumed from retained history, no relist");
        assert!(server.request_count(Kind::Pod, Verb::Watch) >= 2);
    }

    #[tokio::test]
    async fn selectors_filter_lists_and_watches() {
        let (server, addr) = start();
        server.apply(&pod("default", "a", "node-1", &[("app", "x")])).unwrap();
        server.apply(&pod("default", "b", "node-1", &[("app", "y")])).unwrap();
        server.apply(&pod("default", "c", "node-2", &[("app", "x")])).unwrap();
        server.apply(&pod("other", "d", "node-1", &[("app", "x")])).unwrap();
        let client = client(addr);
        let all: Api<Pod> = Api::all(client.clone());
        let listed = async |api: &Api<Pod>, lp: ListParams| {
            let mut names: Vec<String> = api.list(&lp).await.unwrap().iter().map(|p| p.name_any()).collect();
            names.sort();
            names
        };

        assert_eq!(listed(&all, ListParams::default().fields("spec.nodeName=node-1")).await, ["a", "b", "d"]);
        assert_eq!(listed(&all, ListParams::default().fields("spec.nodeName!=node-1")).await, ["c"]);
        assert_eq!(listed(&all, ListParams::default().labels("app!=x")).await, ["b"]);
        assert_eq!(
            listed(&all, ListParams::default().labels("app=x,!missing").fields("metadata.namespace=other")).await,
            ["d"]
        );
        let in_default: Api<Pod> = Api::namespaced(client.clone(), "default");
        assert_eq!(listed(&in_default, ListParams::default().labels("app==x")).await, ["a", "c"]);
        // Paging under a selector: the token resumes after the last match.
        let page = all.list(&ListParams::default().labels("app=x").limit(1)).await.unwrap();
        assert_eq!(page.items.len(), 1);
        assert!(page.metadata.continue_.is_some());
        assert_eq!(page.metadata.remaining_item_count, None);

        // What cannot be evaluated is refused, not ignored.
        let refused = all.list(&ListParams::default().labels("app in (x,y)")).await.unwrap_err();
        assert_eq!(api_error_code(refused), 400);
        let refused = all.list(&ListParams::default().fields("spec.containers=x")).await.unwrap_err();
        assert_eq!(api_error_code(refused), 400);

        let config = watcher::Config::default().labels("app=x").fields("spec.nodeName=node-1");
        let store = reflect(all, config);
        eventually("the selected pods", || names(&store) == ["a", "d"]).await;
        server.apply(&pod("default", "b", "node-1", &[("app", "x")])).unwrap();
        eventually("b entering the selection", || names(&store) == ["a", "b", "d"]).await;
        server.apply(&pod("default", "a", "node-1", &[("app", "y")])).unwrap();
        eventually("a leaving the selection", || names(&store) == ["b", "d"]).await;
        assert_eq!(server.request_count(Kind::Pod, Verb::Watch), 1, "entering and leaving need no relist");
    }

    #[tokio::test]
    async fn watch_protocol_details() {
        let (server, addr) = start();
        server.apply(&pod("default", "a", "node-1", &[])).unwrap();
        let client = client(addr);
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

        // timeoutSeconds ends the stream cleanly, after a last bookmark; with no version the
        // current state comes first.
        let started = Instant::now();
        let events: Vec<_> =
            pods.watch(&WatchParams::default().timeout(1), "0").await.unwrap().try_collect().await.unwrap();
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(3), "{elapsed:?}");
        assert!(
            matches!(&events[..], [WatchEvent::Added(p), WatchEvent::Bookmark(_)] if p.name_any() == "a"),
            "{events:?}"
        );

        // A version older than the history: one ERROR event with 410 Expired.
        let old_rv = server.resource_version();
        server.compact();
        let stream = pods.watch(&WatchParams::default(), &old_rv).await.unwrap();
        let events: Vec<_> = tokio::time::timeout(Duration::from_secs(5), stream.try_collect()).await.unwrap().unwrap();
        match &events[..] {
            [WatchEvent::Error(status)] => assert_eq!((status.code, status.reason.as_str()), (410, "Expired")),
            other => panic!("expected one 410, got {other:?}"),
        }
        // So is a continue token from before the compaction.
        server.apply(&pod("default", "b", "node-1", &[])).unwrap();
        let page = pods.list(&ListParams::default().limit(1)).await.unwrap();
        server.compact();
        let stale = ListParams::default().limit(1).continue_token(page.metadata.continue_.as_deref().unwrap());
        assert_eq!(api_error_code(pods.list(&stale).await.unwrap_err()), 410);

        // Streaming lists: initial events, then the bookmark that ends them.
        let mut stream = watcher(pods.clone(), watcher::Config::default().streaming_lists()).boxed();
        let mut seen = Vec::new();
        while seen.last().map(String::as_str) != Some("InitDone") {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap();
            seen.push(event.to_string());
        }
        assert_eq!(seen, ["Init", "InitApply(a)", "InitApply(b)", "InitDone"]);
        let watch = requests(&server, Kind::Pod, Verb::Watch).pop().unwrap();
        assert_eq!(watch.param("sendInitialEvents"), Some("true"));

        // Single objects, unknown paths, other methods.
        assert_eq!(pods.get("a").await.unwrap().spec.unwrap().node_name.as_deref(), Some("node-1"));
        assert_eq!(api_error_code(pods.get("nope").await.unwrap_err()), 404);
        let ns: Api<Namespace> = Api::all(client.clone());
        server.apply(&namespace("default")).unwrap();
        assert!(ns.get("default").await.unwrap().uid().is_some());
        let get = |path: &str| Request::get(path).body(vec![]).unwrap();
        assert_eq!(api_error_code(client.request::<Value>(get("/api/v1/widgets")).await.unwrap_err()), 404);
        assert_eq!(api_error_code(client.request::<Value>(get("/api/v1/pods/a")).await.unwrap_err()), 404);
        let post = Request::post("/api/v1/namespaces/default/pods").body(b"{}".to_vec()).unwrap();
        assert_eq!(api_error_code(client.request::<Value>(post).await.unwrap_err()), 405);
    }
}
