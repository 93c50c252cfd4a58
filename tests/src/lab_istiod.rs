//! The lab under `--control-plane istiod`: the fake istiod ([`crate::istiod`]) serves inside
//! node 1's namespace and is fed from the lab's API server as istiod is fed from a cluster:
//! every pod a workload, marked HBONE only once it carries the redirection annotation that
//! the node daemon patches; the lab's services with their ports; the CA's view of which pod
//! runs on which node. The API server then holds no Services or EndpointSlices (the mesh's
//! services come from xDS alone), and the lab's directory holds no CA key: the fake signs
//! with a root it keeps in memory.
//!
//! A test changes the mesh through xDS only with [`LabIstiod::edit`]: an edit applies to
//! every description the feed derives from then on, as a change made in istiod would.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod as PodObject;
use meshpath::sync::lock;
use meshpath_common::names::{REDIRECTION_ANNOTATION, REDIRECTION_ENABLED};
use tokio::task::JoinHandle;

use crate::apiserver::{ApiServer, Kind};
use crate::cluster::{ECHO_SERVICE, MESH_NAMESPACE, PLAIN_NAMESPACE, WEB_SERVICE};
use crate::istiod::FakeIstiod;
use crate::istiod::auth::Account;
use crate::istiod::ca::{CaSettings, Caller, FakeCa, LabPod};
use crate::istiod::proto::istio::security::string_match::MatchType;
use crate::istiod::proto::istio::security::{Action, Clause, Match, Rule, Scope, StringMatch};
use crate::istiod::proto::istio::workload::{TunnelProtocol, Workload};
use crate::istiod::xds::{self, Change, LabResource};
use crate::lab::{Lab, LabError, Result};
use crate::traffic;

/// istiod's port for xDS and the CA.
pub const ISTIOD_PORT: u16 = 15012;
/// The cluster the lab is (istiod's default).
pub const CLUSTER_ID: &str = "Kubernetes";
/// Where the node daemons run, and as whom: the account istiod trusts to impersonate.
pub const NODE_NAMESPACE: &str = "istio-system";
pub const NODE_ACCOUNT: &str = "ztunnel";
/// The policy istiod makes of PeerAuthentication STRICT (namespace, name).
pub const STRICT_POLICY: (&str, &str) = ("istio-system", "istio_converted_static_strict");
/// How often the feed looks at the API server.
const FEED_POLL: Duration = Duration::from_millis(50);

/// A change a test makes to what istiod says (applied to each derived resource).
type Edit = Box<dyn Fn(&mut LabResource) + Send>;

/// A lab service as istiod describes it: its address, and the pods behind it at `target`.
struct LabService {
    namespace: &'static str,
    name: &'static str,
    addr: SocketAddr,
    backends: &'static [&'static str],
    target: u16,
}

/// The lab's istiod, running on the lab cluster's runtime.
pub struct LabIstiod {
    pub fake: FakeIstiod,
    pub ca: FakeCa,
    /// `https://<node 1's underlay>:15012`: XDS_ADDRESS and CA_ADDRESS.
    pub url: String,
    /// The mesh root (PEM file): XDS_ROOT_CA and CA_ROOT_CA.
    pub root: PathBuf,
    edits: Arc<Mutex<Vec<Edit>>>,
    /// What the feed serves now, by xDS name.
    served: Served,
    feed: JoinHandle<()>,
}

type Served = Arc<Mutex<BTreeMap<String, LabResource>>>;

impl Drop for LabIstiod {
    fn drop(&mut self) {
        self.feed.abort();
    }
}

impl LabIstiod {
    /// Changes what istiod says from now on, as an edit in the cluster would; the nodes are
    /// pushed the resources it changes.
    pub fn edit(&self, f: impl Fn(&mut LabResource) + Send + 'static) {
        lock(&self.edits).push(Box::new(f));
    }

    /// What istiod serves now as `name` (a workload's uid, `namespace/hostname`).
    pub fn served(&self, name: &str) -> Option<LabResource> {
        lock(&self.served).get(name).cloned()
    }

    /// Whether the latest stream of every node in `pods` (their daemons' pod names) has
    /// ACKed a response that carried `name` at the version served now.
    pub fn acked_by(&self, pods: &[String], name: &str) -> bool {
        self.acked(pods, meshpath::xds::ADDRESS_TYPE, name)
    }

    /// Whether every node in `pods` has ACKed the state of resource `name` of `type_url`
    /// served now: its version, or its removal.
    pub fn acked(&self, pods: &[String], type_url: &str, name: &str) -> bool {
        let version = self.fake.xds.version(type_url, name);
        let records = self.fake.xds.records();
        pods.iter().all(|pod| {
            let latest = latest_stream(&records, pod);
            let Some(stream) = latest else { return false };
            records.responses.iter().filter(|r| r.stream == stream && r.type_url == type_url).any(|r| {
                let carried = match &version {
                    Some(version) => r.resources.iter().any(|(n, v)| n == name && v == version),
                    None => r.removed.iter().any(|n| n == name),
                };
                carried && records.answers_to(&r.nonce).iter().any(|a| matches!(a, xds::RequestKind::Ack { .. }))
            })
        })
    }

    /// Serves `policy` (or with `None`, removes `key`) and waits until every node in `pods`
    /// has ACKed that.
    pub fn set_policy(
        &self,
        pods: &[String],
        key: &str,
        policy: Option<crate::istiod::proto::istio::security::Authorization>,
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let type_url = meshpath::xds::AUTHORIZATION_TYPE;
        match policy {
            Some(p) => self.fake.xds.put(p),
            None => {
                self.fake.xds.remove(type_url, key);
            }
        }
        let deadline = std::time::Instant::now() + timeout;
        while !self.acked(pods, type_url, key) {
            if std::time::Instant::now() > deadline {
                return Err(format!("policy {key}: not ACKed by every node within {timeout:?}"));
            }
            std::thread::sleep(FEED_POLL);
        }
        Ok(())
    }

    /// Serves `policies` (in responses of `batch` each, as istiod's debounced pushes come)
    /// and waits until every node in `pods` has ACKed each of them at the version served now.
    pub fn set_policies(
        &self,
        pods: &[String],
        policies: Vec<crate::istiod::proto::istio::security::Authorization>,
        batch: usize,
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let type_url = meshpath::xds::AUTHORIZATION_TYPE;
        let names: Vec<String> = policies.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect();
        let mut policies = policies.into_iter().peekable();
        while policies.peek().is_some() {
            self.fake.xds.change(policies.by_ref().take(batch.max(1)).map(Change::put));
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let missing = self.not_acked(pods, type_url, &names);
            if missing == 0 {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "{missing} of {} policies not ACKed by every node within {timeout:?}",
                    names.len()
                ));
            }
            std::thread::sleep(FEED_POLL * 4);
        }
    }

    /// How many of `names` (resources of `type_url`) some node in `pods` has not ACKed at the
    /// version served now, on its latest stream: [`LabIstiod::acked`] for many names, from
    /// one look at the records.
    pub fn not_acked(&self, pods: &[String], type_url: &str, names: &[String]) -> usize {
        let records = self.fake.xds.records();
        let acked_nonces: std::collections::HashSet<&str> = records
            .requests
            .iter()
            .filter_map(|r| match &r.kind {
                xds::RequestKind::Ack { nonce } => Some(nonce.as_str()),
                _ => None,
            })
            .collect();
        let versions: Vec<Option<String>> = names.iter().map(|n| self.fake.xds.version(type_url, n)).collect();
        let mut missing = std::collections::BTreeSet::new();
        for pod in pods {
            let latest = latest_stream(&records, pod);
            // What this node ACKed: name → versions; removals as `None`.
            let mut held: std::collections::HashMap<&str, Vec<Option<&str>>> = std::collections::HashMap::new();
            let acked = records.responses.iter().filter(|r| {
                Some(r.stream) == latest && r.type_url == type_url && acked_nonces.contains(r.nonce.as_str())
            });
            for r in acked {
                for (n, v) in &r.resources {
                    held.entry(n.as_str()).or_default().push(Some(v.as_str()));
                }
                for n in &r.removed {
                    held.entry(n.as_str()).or_default().push(None);
                }
            }
            for (i, (name, version)) in names.iter().zip(&versions).enumerate() {
                if !held.get(name.as_str()).is_some_and(|vs| vs.contains(&version.as_deref())) {
                    missing.insert(i);
                }
            }
        }
        missing.len()
    }

    /// The serials of every leaf the CA issued (hex, lower case).
    pub fn issued_serials(&self) -> Vec<String> {
        self.ca.records().into_iter().filter_map(|r| r.serial).collect()
    }
}

impl Lab {
    /// The token file of `node`'s daemon (pod-bound: one per node).
    pub fn istiod_token_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!("istio-token-n{}", node + 1))
    }

    /// The token file of lab pod `pod` (its own service account, bound to it).
    pub fn pod_token_path(&self, pod: &str) -> PathBuf {
        self.dir.join(format!("istio-token-pod-{pod}"))
    }

    /// The files of the lab's directory that hold a private key (under istiod: none; the
    /// CA's key stays in the fake's memory, the nodes' keys in theirs).
    pub fn files_with_private_keys(&self) -> Result<Vec<PathBuf>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let text = std::fs::read(&path).unwrap_or_default();
            if String::from_utf8_lossy(&text).contains("PRIVATE KEY") {
                found.push(path);
            }
        }
        Ok(found)
    }

    /// Every node's daemon pod name.
    pub fn node_pod_names(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|n| self.node_pod_name(n)).collect()
    }

    /// The name of `node`'s daemon pod.
    pub fn node_pod_name(&self, node: usize) -> String {
        format!("meshpath-n{}", node + 1)
    }

    /// Starts the lab's istiod (the cluster must be started): daemons started after this
    /// run with `--control-plane istiod`. The API server's Services and EndpointSlices go.
    pub fn start_istiod(&mut self) -> Result<()> {
        let addr = SocketAddr::new(self.nodes[0].underlay_v4, ISTIOD_PORT);
        let listener = traffic::in_netns(&self.nodes[0].name, move || std::net::TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let api = self.cluster().api.clone();
        remove_services(&api)?;
        let other = |e: &dyn std::fmt::Display| LabError::Other(format!("the lab's istiod: {e}"));
        let mut builder = FakeIstiod::builder(CLUSTER_ID).map_err(|e| other(&e))?;
        let mut settings = CaSettings::new(builder.root().pem(), &builder.root().key_pem());
        for node in 0..self.nodes.len() {
            let token = format!("{}-node-token-{}", self.id, node + 1);
            builder = builder.token(&token, Account::new(NODE_NAMESPACE, NODE_ACCOUNT));
            settings.tokens.insert(token.clone(), self.node_caller(node));
            std::fs::write(self.istiod_token_path(node), token)?;
        }
        // Each pod's own token too, for a proxy that serves one pod (ztunnel's dedicated mode).
        for pod in &self.pods {
            let token = format!("{}-pod-token-{}", self.id, pod.name);
            let (ns, sa) = (self.pod_namespace(pod.name), format!("sa-{}", pod.name));
            builder = builder.token(&token, Account::new(ns, &sa));
            let caller = Caller {
                namespace: ns.into(),
                service_account: sa,
                pod: format!("pod-{}", pod.name),
                pod_uid: self
                    .cluster()
                    .api
                    .object(Kind::Pod, Some(ns), &format!("pod-{}", pod.name))
                    .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
                    .unwrap_or_default(),
            };
            settings.tokens.insert(token.clone(), caller);
            std::fs::write(self.pod_token_path(pod.name), token)?;
        }
        let ca = FakeCa::new(settings).map_err(|e| other(&e))?;
        let ip = addr.ip().to_string();
        builder = builder.names(&[&ip, "istiod.istio-system.svc"]).ca(ca.clone());
        let root = self.dir.join("istio-root-cert.pem");
        std::fs::write(&root, builder.root().pem())?;
        let edits: Arc<Mutex<Vec<Edit>>> = Arc::default();
        let cluster = self.cluster.as_ref().expect("checked by cluster() above");
        let _guard = cluster.runtime().enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let fake = builder.serve(listener).map_err(|e| other(&e))?;
        let served = Served::default();
        let feed = Feed {
            lab: self.mesh_shape(),
            api,
            xds: fake.xds.clone(),
            ca: ca.clone(),
            edits: edits.clone(),
            served: served.clone(),
        };
        let feed = cluster.runtime().spawn(feed.run());
        self.istiod = Some(LabIstiod { fake, ca, url: format!("https://{addr}"), root, edits, served, feed });
        Ok(())
    }

    /// The lab's istiod; panics if [`Lab::start_istiod`] was not called (a test bug).
    pub fn istiod(&self) -> &LabIstiod {
        self.istiod.as_ref().expect("start_istiod() first")
    }

    /// Waits until istiod describes every enrolled pod as HBONE (its node annotated it) and
    /// every node has ACKed that: until then a peer reaches the pod in plaintext, as with
    /// Istio.
    pub fn wait_mesh_synced(&self, timeout: Duration) -> Result<()> {
        let istiod = self.istiod();
        let nodes: Vec<String> = (0..self.nodes.len()).map(|n| self.node_pod_name(n)).collect();
        let uids: Vec<String> = self
            .pods
            .iter()
            .filter(|p| p.enrolled)
            .map(|p| xds::pod_uid(CLUSTER_ID, self.pod_namespace(p.name), &format!("pod-{}", p.name)))
            .collect();
        let hbone = |uid: &String| matches!(istiod.served(uid), Some(LabResource::Workload(w)) if w.tunnel_protocol == TunnelProtocol::Hbone as i32);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let pending: Vec<&String> = uids.iter().filter(|u| !(hbone(u) && istiod.acked_by(&nodes, u))).collect();
            if pending.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(LabError::Other(format!(
                    "the lab's istiod: not HBONE and ACKed by every node after {timeout:?}: {pending:?}"
                )));
            }
            std::thread::sleep(FEED_POLL);
        }
    }

    /// `meshpath node`'s settings under the lab's istiod, by the chart's variable names.
    pub(crate) fn istiod_env(&self, node: usize, cmd: &mut Command) {
        let Some(istiod) = &self.istiod else { return };
        cmd.env("MESHPATH_CONTROL_PLANE", "istiod")
            .env("XDS_ADDRESS", &istiod.url)
            .env("CA_ADDRESS", &istiod.url)
            .env("XDS_ROOT_CA", &istiod.root)
            .env("CA_ROOT_CA", &istiod.root)
            .env("AUTH_TOKEN", self.istiod_token_path(node))
            .env("CLUSTER_ID", CLUSTER_ID)
            .env("POD_NAME", self.node_pod_name(node))
            .env("POD_NAMESPACE", NODE_NAMESPACE)
            .env("INSTANCE_IP", self.nodes[node].underlay_v4.to_string());
    }

    fn node_caller(&self, node: usize) -> Caller {
        Caller::new(NODE_NAMESPACE, NODE_ACCOUNT, &self.node_pod_name(node))
    }

    /// What the feed needs of the lab: its services and its daemons' pods.
    fn mesh_shape(&self) -> MeshShape {
        let app = crate::smoke::APP_PORT;
        let services = vec![
            LabService {
                namespace: MESH_NAMESPACE,
                name: "web",
                addr: WEB_SERVICE.parse().expect("valid"),
                backends: &["c"],
                target: app,
            },
            LabService {
                namespace: PLAIN_NAMESPACE,
                name: "echo",
                addr: ECHO_SERVICE.parse().expect("valid"),
                backends: &["d"],
                target: app,
            },
        ];
        let daemons = (0..self.nodes.len())
            .map(|n| {
                let caller = self.node_caller(n);
                LabPod {
                    namespace: caller.namespace,
                    name: caller.pod,
                    uid: caller.pod_uid,
                    service_account: caller.service_account,
                    node: self.nodes[n].name.clone(),
                }
            })
            .collect();
        let strict_nodes = self.strict_nodes.iter().filter_map(|&n| Some(self.nodes.get(n)?.name.clone())).collect();
        MeshShape { services, daemons, strict_nodes }
    }
}

/// The newest stream of node proxy `pod` the fake took (not refused).
fn latest_stream(records: &xds::Records, pod: &str) -> Option<u64> {
    let of_pod = |s: &&xds::StreamRecord| s.node.as_ref().is_some_and(|n| n.id.contains(&format!("~{pod}.")));
    records.streams.iter().filter(|s| s.refused.is_none()).filter(of_pod).map(|s| s.id).max()
}

/// Services go: under istiod they come from xDS alone.
fn remove_services(api: &ApiServer) -> Result<()> {
    for kind in [Kind::Service, Kind::EndpointSlice] {
        for obj in api.objects(kind) {
            let meta = &obj["metadata"];
            let (ns, name) = (meta["namespace"].as_str(), meta["name"].as_str().unwrap_or_default());
            api.delete(kind, ns, name).map_err(|e| LabError::Other(e.to_string()))?;
        }
    }
    Ok(())
}

struct MeshShape {
    services: Vec<LabService>,
    daemons: Vec<LabPod>,
    /// Nodes whose pods are STRICT (as a PeerAuthentication would make them).
    strict_nodes: Vec<String>,
}

/// Derives the mesh from the API server whenever it changes (or a test edits it), and
/// pushes what differs from the last description.
struct Feed {
    lab: MeshShape,
    api: ApiServer,
    xds: xds::Xds,
    ca: FakeCa,
    edits: Arc<Mutex<Vec<Edit>>>,
    served: Served,
}

impl Feed {
    async fn run(self) {
        loop {
            self.sync();
            tokio::time::sleep(FEED_POLL).await;
        }
    }

    /// Derives the mesh once and pushes what changed.
    fn sync(&self) {
        let pods: Vec<PodObject> =
            self.api.objects(Kind::Pod).into_iter().filter_map(|v| serde_json::from_value(v).ok()).collect();
        self.ca.set_pods(self.lab.daemons.iter().cloned().chain(pods.iter().filter_map(lab_pod)).collect());
        let mut now = self.describe(&pods);
        let edits = lock(&self.edits);
        now.values_mut().for_each(|r| edits.iter().for_each(|e| e(r)));
        let mut served = lock(&self.served);
        let changes = diff(&served, &now);
        if !changes.is_empty() {
            self.xds.change(changes);
        }
        *served = now;
    }

    /// Every pod a workload, in the services it backs; every service.
    fn describe(&self, pods: &[PodObject]) -> BTreeMap<String, LabResource> {
        let mut out = BTreeMap::new();
        for svc in &self.lab.services {
            let hostname = format!("{}.{}.svc.cluster.local", svc.name, svc.namespace);
            // The target port is named in the Service: only the workloads' port lists resolve it.
            let port = (u32::from(svc.addr.port()), 0);
            let r = LabResource::from(xds::service(svc.namespace, svc.name, &hostname, &[svc.addr.ip()], &[port]));
            out.insert(r.name(), r);
        }
        // PeerAuthentication STRICT, as istiod sends it: one DENY of every connection without
        // identity, named by the strict workloads.
        if !self.lab.strict_nodes.is_empty() {
            let strict = LabResource::from(xds::authorization(
                STRICT_POLICY.0,
                STRICT_POLICY.1,
                Scope::WorkloadSelector,
                Action::Deny,
                vec![Rule {
                    clauses: vec![Clause {
                        matches: vec![Match {
                            not_principals: vec![StringMatch { match_type: Some(MatchType::Presence(())) }],
                            ..Default::default()
                        }],
                    }],
                }],
            ));
            out.insert(strict.name(), strict);
        }
        for pod in pods {
            let Some(mut w) = workload(pod) else { continue };
            if self.lab.strict_nodes.contains(&w.node) {
                w.authorization_policies.push(format!("{}/{}", STRICT_POLICY.0, STRICT_POLICY.1));
            }
            let name = w.name.clone();
            for svc in self.lab.services.iter().filter(|s| s.backends.iter().any(|b| name == format!("pod-{b}"))) {
                let key = format!("{}/{}.{}.svc.cluster.local", svc.namespace, svc.name, svc.namespace);
                w = xds::in_service(w, &key, &[(u32::from(svc.addr.port()), u32::from(svc.target))]);
            }
            let r = LabResource::from(w);
            out.insert(r.name(), r);
        }
        out
    }
}

/// A pod as istiod describes it: HBONE only once the node daemon annotated it.
fn workload(pod: &PodObject) -> Option<Workload> {
    let (ns, name) = (pod.metadata.namespace.as_deref()?, pod.metadata.name.as_deref()?);
    let spec = pod.spec.as_ref()?;
    let ips: Vec<IpAddr> =
        pod.status.as_ref()?.pod_ips.iter().flatten().filter_map(|p| p.ip.parse().ok()).collect::<Vec<_>>();
    let sa = spec.service_account_name.as_deref().unwrap_or("default");
    let node = spec.node_name.as_deref().unwrap_or_default();
    let mut w = xds::workload(&xds::pod_uid(CLUSTER_ID, ns, name), ns, name, sa, node, &ips);
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REDIRECTION_ANNOTATION))
        .is_some_and(|v| v == REDIRECTION_ENABLED);
    if !annotated {
        w.tunnel_protocol = TunnelProtocol::None as i32;
    }
    Some(w)
}

/// A pod as the CA's node index sees it.
fn lab_pod(pod: &PodObject) -> Option<LabPod> {
    Some(LabPod {
        namespace: pod.metadata.namespace.clone()?,
        name: pod.metadata.name.clone()?,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: pod.spec.as_ref()?.service_account_name.clone().unwrap_or_else(|| "default".into()),
        node: pod.spec.as_ref()?.node_name.clone()?,
    })
}

/// What turns `before` into `after`: changed and new resources put, gone ones removed.
fn diff(before: &BTreeMap<String, LabResource>, after: &BTreeMap<String, LabResource>) -> Vec<Change> {
    let puts = after.iter().filter(|(k, r)| before.get(*k) != Some(*r)).map(|(_, r)| Change::put(r.clone()));
    let removals = before
        .iter()
        .filter(|(k, _)| !after.contains_key(*k))
        .map(|(k, r)| Change::Remove { type_url: r.type_url(), name: k.clone() });
    puts.chain(removals).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(uid: &str, sa: &str) -> LabResource {
        LabResource::from(xds::workload(uid, "lab", "p", sa, "n1", &["10.0.0.1".parse().unwrap()]))
    }

    #[test]
    fn the_feed_pushes_only_what_changed() {
        let before = BTreeMap::from([("a".to_string(), res("a", "x")), ("b".to_string(), res("b", "x"))]);
        let after = BTreeMap::from([("a".to_string(), res("a", "x")), ("c".to_string(), res("c", "y"))]);
        let changes = diff(&before, &after);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(matches!(&changes[0], Change::Raw { name, .. } if name == "c"));
        assert!(matches!(&changes[1], Change::Remove { name, .. } if name == "b"));
        assert!(diff(&after, &after).is_empty());
    }
}
