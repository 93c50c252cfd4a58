//! The proxy's decisions, tested in process: real sockets on loopback standing for pods and
//! peers (see [`super::testnet`]), certificates from the built-in CA, no root and no
//! datapath.
//!
//! Two nodes: n1 runs pods a (10.0.0.1) and e (10.0.0.5), n2 runs pod c (10.0.0.3). The pod
//! network is 10.0.0.0/16; 10.0.0.9 is a pod outside the mesh. Service ns/web
//! (10.96.0.1:80) leads to 10.0.0.9:8080, service ns/empty (10.96.0.2:80) nowhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use meshpath_common::Listener;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::h2::client::H2Client;
use super::registry::Closed;
use super::testnet::{Dial, TestNet, echo_back, greeting};
use super::*;
use crate::drain::Drained;
use crate::identity::ca::BuiltinCa;
use crate::identity::{BoxFuture, CertificateProvider, IdentityError, WorkloadCertificate};
use crate::policy::{self, PolicyDefaults, istio::MtlsMode};
use crate::record::ConnectionRecord;
use crate::state::{Authorization, DesiredState, ServiceBackends, Tunnel, WorkloadInfo};
use crate::workloads::WorkloadFile;

const TD: &str = "cluster.local";
const WORKLOADS: &str = "workloads:
  - {name: a, namespace: ns, serviceAccount: sa-a, node: n1, ips: [10.0.0.1]}
  - {name: e, namespace: ns, serviceAccount: sa-e, node: n1, ips: [10.0.0.5]}
  - {name: c, namespace: ns, serviceAccount: sa-c, node: n2, ips: [10.0.0.3]}
";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a socket address")
}

fn identity(sa: &str) -> String {
    Identity::new(TD, "ns", sa).to_string()
}

/// Both nodes' CA: the same root, so they trust each other.
struct SharedCa(Arc<BuiltinCa>);

impl CertificateProvider for SharedCa {
    fn name(&self) -> &'static str {
        "test-ca"
    }
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
        Box::pin(async move { self.0.mint(id, Duration::from_secs(3600)) })
    }
}

fn ca() -> Arc<BuiltinCa> {
    Arc::new(BuiltinCa::open(None, TD, Duration::from_secs(3600)).expect("a CA"))
}

fn state(workloads: &str, mode: MtlsMode) -> DesiredState {
    let services = BTreeMap::from([
        (
            addr("10.96.0.1:80"),
            ServiceBackends { service: "ns/web".into(), endpoints: vec![addr("10.0.0.9:8080")], waypoint: false },
        ),
        (addr("10.96.0.2:80"), ServiceBackends { service: "ns/empty".into(), endpoints: vec![], waypoint: false }),
    ]);
    let defaults = PolicyDefaults { root_namespace: "istio-system".into(), mode };
    DesiredState {
        workloads: WorkloadFile::parse(workloads, "test").expect("a workload file"),
        services,
        authorization: Authorization::of_defaults(&defaults),
        ..Default::default()
    }
}

/// The identities of `workloads` on `node`: the certificates the proxy keeps.
fn local_identities(workloads: &str, node: &str) -> BTreeSet<Identity> {
    let file = WorkloadFile::parse(workloads, "test").expect("a workload file");
    file.on_node(node).map(|w| Identity::new(TD, &w.namespace, &w.service_account)).collect()
}

/// `index` with workload `id` (its identity `sa-<name>`) at `ip` on `node`, as xDS says it.
fn with_workload(
    mut index: WorkloadIndex,
    ip: &str,
    id: &str,
    node: &str,
    tunnel: Tunnel,
    waypoint: bool,
) -> WorkloadIndex {
    let sa = format!("sa-{}", id.rsplit('/').next().unwrap_or(id));
    let identity = Identity::new(TD, "ns", &sa);
    let info = WorkloadInfo { id: id.into(), node: node.into(), identity, tunnel, waypoint, policies: Vec::new() };
    index.insert_ip(ip.parse().expect("an IP"), Arc::new(info));
    index
}

/// One node's proxy, its access log and the trigger of its drain.
struct Node {
    proxy: Arc<Proxy>,
    log: PathBuf,
    metrics: Arc<Metrics>,
    drain: drain::Trigger,
}

/// A test's files go with it (also when it fails).
impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
        if let Some(dir) = self.log.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

struct Opts {
    mode: MtlsMode,
    connect_timeout: Duration,
    per_source: usize,
    workloads: String,
    source_wait: Duration,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            mode: MtlsMode::Permissive,
            connect_timeout: Duration::from_secs(2),
            per_source: 100,
            workloads: WORKLOADS.into(),
            source_wait: Duration::ZERO,
        }
    }
}

/// A node's access log, in a directory of its own: tests run in parallel, and each node
/// removes its directory when it goes.
fn log_path(node: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("meshpath-proxy-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir.join(format!("{node}.jsonl"))
}

async fn node_with(name: &str, net: &Arc<TestNet>, ca: &Arc<BuiltinCa>, o: Opts) -> Node {
    let cfg = ProxyConfig {
        node: name.into(),
        pod_cidrs: vec!["10.0.0.0/16".parse().expect("a network")],
        flags: ProxyFlags {
            connect_timeout: o.connect_timeout,
            hbone_idle_timeout: Duration::from_secs(60),
            max_connections: Some(100),
            max_connections_per_source: Some(o.per_source),
        },
        limits: limits::Limits::new(100, o.per_source),
        source_wait: o.source_wait,
    };
    let log = log_path(name);
    let metrics = Metrics::new();
    let certs = CertificateManager::new(Box::new(SharedCa(ca.clone())));
    let access = AccessLog::open(Some(&log)).expect("an access log");
    let proxy = Proxy::with_sockets(cfg, access, certs, metrics.clone(), net.clone());
    let local = local_identities(&o.workloads, name);
    proxy.set_workloads(WorkloadIndex::new(&state(&o.workloads, o.mode), TD), &local);
    let (drain, watcher) = drain::new();
    // No listeners of its own: the test network hands connections in; serve passes the
    // drain on to them.
    tokio::spawn(proxy.clone().serve(Vec::new(), watcher));
    Node { proxy, log, metrics, drain }
}

async fn node(name: &str, net: &Arc<TestNet>, ca: &Arc<BuiltinCa>) -> Node {
    node_with(name, net, ca, Opts::default()).await
}

/// Two nodes on one network, n2's HBONE listener reachable at c's address, and echo servers
/// on every pod's app port, on c's, and outside the mesh.
async fn two_nodes() -> (Arc<TestNet>, Node, Node) {
    let (net, ca) = (TestNet::new(), ca());
    let (n1, n2) = (node("n1", &net, &ca).await, node("n2", &net, &ca).await);
    net.listen(&n2.proxy, Listener::Hbone, &[addr("10.0.0.3:15008")]).await;
    net.listen(&n1.proxy, Listener::Hbone, &[addr("10.0.0.1:15008"), addr("10.0.0.5:15008")]).await;
    for a in ["10.0.0.1:8080", "10.0.0.5:8080", "10.0.0.3:8080", "10.0.0.9:80", "10.0.0.9:8080", "192.0.2.1:443"] {
        net.echo(addr(a)).await;
    }
    (net, n1, n2)
}

fn records(log: &Path) -> Vec<ConnectionRecord> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).expect("a record")).collect()
}

/// Waits up to 5 s for the record of `log` that `pred` picks.
async fn record(log: &Path, pred: impl Fn(&ConnectionRecord) -> bool) -> ConnectionRecord {
    for _ in 0..500 {
        if let Some(r) = records(log).into_iter().find(|r| pred(r)) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no such record in {}: {:#?}", log.display(), records(log));
}

/// Waits for the record of the connection from `src`.
async fn record_of(log: &Path, src: &str) -> ConnectionRecord {
    let src = addr(src);
    record(log, |r| r.src == src).await
}

/// Writes `data`, ends the request, and reads the whole answer (the greeting, then the echo).
async fn exchange(s: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(data).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await?;
    Ok(back)
}

/// Sends `data` and reads the greeting and its echo, leaving the connection open.
async fn exchange_open(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).await.expect("sent");
    let mut back = Vec::new();
    let read = async {
        while !(back.ends_with(data) && back.contains(&b'\n')) {
            let mut buf = [0u8; 256];
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => back.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    back
}

/// Whether the peer ends `s` (EOF or reset) within 5 s.
async fn ended(s: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.is_ok()
}

fn sample(m: &Metrics, series: &str) -> Option<f64> {
    m.render().lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn outbound_to_a_pod_outside_the_mesh_is_plain_and_keeps_the_client_address() {
    let (net, n1, _n2) = two_nodes().await;
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40000"), addr("10.0.0.9:80")).await;
    let back = exchange(&mut c, b"hello").await.expect("an answer");
    assert_eq!(back, b"peer=10.0.0.1\nhello", "the pod sees its real client");
    let r = record_of(&n1.log, "10.0.0.1:40000").await;
    assert_eq!((r.outcome, r.listener.as_str(), r.mtls), (Outcome::Ok, "outbound", false));
    assert_eq!((r.src_workload.as_deref(), r.dst_workload.as_deref()), (Some("ns/a"), None));
    assert_eq!((r.bytes_sent, r.bytes_received), (5, 19));
    assert!(net.dials().contains(&Dial { dst: addr("10.0.0.9:80"), source: Some("10.0.0.1".parse().unwrap()) }));
}

#[tokio::test]
async fn outbound_beyond_the_pod_networks_leaves_from_the_node() {
    let (net, n1, _n2) = two_nodes().await;
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40001"), addr("192.0.2.1:443")).await;
    let back = exchange(&mut c, b"x").await.expect("an answer");
    assert_eq!(back, b"peer=node\nx", "NAT on the way out needs the node's address");
    assert!(net.dials().contains(&Dial { dst: addr("192.0.2.1:443"), source: None }));
    assert_eq!(record_of(&n1.log, "10.0.0.1:40001").await.outcome, Outcome::Ok);
}

#[tokio::test]
async fn same_node_pairs_are_handed_over_plain_with_both_identities() {
    let (net, n1, _n2) = two_nodes().await;
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40002"), addr("10.0.0.5:8080")).await;
    assert_eq!(exchange(&mut c, b"local").await.expect("an answer"), b"peer=10.0.0.1\nlocal");
    let r = record_of(&n1.log, "10.0.0.1:40002").await;
    assert_eq!((r.outcome, r.mtls, r.dst_workload.as_deref()), (Outcome::Ok, false, Some("ns/e")));
    assert_eq!(r.src_identity, Some(identity("sa-a")));
    assert_eq!(r.dst_identity, Some(identity("sa-e")));
    assert!(net.dials().iter().all(|d| d.dst.port() != 15008), "no HBONE within the node: {:?}", net.dials());
}

#[tokio::test]
async fn a_hand_over_to_a_proxy_port_and_a_call_to_loopback_are_self_calls() {
    let (net, n1, _n2) = two_nodes().await;
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40003"), addr("10.0.0.5:15008")).await;
    assert!(ended(&mut c).await);
    assert_eq!(record_of(&n1.log, "10.0.0.1:40003").await.outcome, Outcome::SelfCall);
    let mut c =
        TestNet::capture(&n1.proxy, Listener::InboundPlain, addr("10.0.0.50:40004"), addr("127.0.0.1:15006")).await;
    assert!(ended(&mut c).await);
    assert_eq!(record_of(&n1.log, "10.0.0.50:40004").await.outcome, Outcome::SelfCall);
    assert!(net.dials().is_empty(), "a self-call connects nowhere: {:?}", net.dials());
}

#[tokio::test]
async fn a_service_address_leads_to_a_ready_endpoint_or_is_refused_without_one() {
    let (net, n1, _n2) = two_nodes().await;
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40005"), addr("10.96.0.1:80")).await;
    assert_eq!(exchange(&mut c, b"svc").await.expect("an answer"), b"peer=10.0.0.1\nsvc");
    let r = record_of(&n1.log, "10.0.0.1:40005").await;
    assert_eq!((r.outcome, r.dst_service.as_deref(), r.orig_dst), (Outcome::Ok, Some("ns/web"), addr("10.96.0.1:80")));
    assert_eq!(net.dials().last().map(|d| d.dst), Some(addr("10.0.0.9:8080")));

    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40006"), addr("10.96.0.2:80")).await;
    assert!(ended(&mut c).await);
    let r = record_of(&n1.log, "10.0.0.1:40006").await;
    assert_eq!((r.outcome, r.dst_service.as_deref()), (Outcome::NoEndpoint, Some("ns/empty")));
}

#[tokio::test]
async fn a_connection_a_nat_turned_to_a_pod_names_the_frontend_and_the_service_it_was() {
    let (net, n1, _n2) = two_nodes().await;
    let (pod, nodeport, web) = (addr("10.0.0.1:8080"), addr("192.168.0.1:30080"), addr("10.96.0.1:80"));
    // Plaintext from outside the mesh through a NodePort, then through the ClusterIP of
    // ns/web: delivered to the pod it was turned to, as a direct connection would be.
    for (from, frontend, service) in [("10.0.0.50:40101", nodeport, None), ("10.0.0.50:40102", web, Some("ns/web"))] {
        let mut c = net.capture_via(&n1.proxy, Listener::InboundPlain, addr(from), frontend, pod).await;
        assert_eq!(exchange(&mut c, b"nat").await.expect("an answer"), b"peer=10.0.0.50\nnat");
        let r = record_of(&n1.log, from).await;
        assert_eq!((r.outcome, r.orig_dst, r.frontend), (Outcome::Ok, pod, Some(frontend)), "{r:?}");
        assert_eq!(r.dst_service.as_deref(), service);
    }
    // An enrolled client through the NodePort: the pod stays the destination, the record
    // names the frontend; through the service address the proxy picks the endpoint itself.
    let mut c = net.capture_via(&n1.proxy, Listener::Outbound, addr("10.0.0.5:40103"), nodeport, pod).await;
    assert_eq!(exchange(&mut c, b"np").await.expect("an answer"), b"peer=10.0.0.5\nnp");
    let r = record_of(&n1.log, "10.0.0.5:40103").await;
    assert_eq!((r.orig_dst, r.frontend), (pod, Some(nodeport)), "{r:?}");
    let mut c = net.capture_via(&n1.proxy, Listener::Outbound, addr("10.0.0.5:40104"), web, pod).await;
    assert!(exchange(&mut c, b"svc").await.is_ok());
    let r = record_of(&n1.log, "10.0.0.5:40104").await;
    assert_eq!((r.orig_dst, r.frontend, r.dst_service.as_deref()), (web, None, Some("ns/web")), "{r:?}");
    // A connection no NAT touched names none.
    let mut c = TestNet::capture(&n1.proxy, Listener::InboundPlain, addr("10.0.0.50:40105"), pod).await;
    assert!(exchange(&mut c, b"x").await.is_ok());
    assert_eq!(record_of(&n1.log, "10.0.0.50:40105").await.frontend, None);
}

#[tokio::test]
async fn an_unenrolled_source_cannot_reach_the_mesh_but_reaches_the_rest() {
    let (_net, n1, _n2) = two_nodes().await;
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.8:40007"), addr("10.0.0.3:8080")).await;
    assert!(ended(&mut c).await);
    let r = record_of(&n1.log, "10.0.0.8:40007").await;
    assert_eq!((r.outcome, r.src_workload), (Outcome::UnknownSource, None));
    // Outside the mesh nothing needs its identity.
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.8:40008"), addr("10.0.0.9:80")).await;
    assert_eq!(exchange(&mut c, b"").await.expect("an answer"), b"peer=10.0.0.8\n");
}

#[tokio::test]
async fn upstream_refusals_and_timeouts_have_their_own_outcomes() {
    let (net, ca) = (TestNet::new(), ca());
    let o = Opts { connect_timeout: Duration::from_millis(200), ..Opts::default() };
    let n1 = node_with("n1", &net, &ca, o).await;
    net.blackhole(addr("10.0.0.9:82"));
    for (port, src, want) in [(81, 40009, Outcome::UpstreamConnectFailed), (82, 40010, Outcome::UpstreamConnectTimeout)]
    {
        let from = format!("10.0.0.1:{src}");
        let to = addr(&format!("10.0.0.9:{port}"));
        let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr(&from), to).await;
        assert!(ended(&mut c).await);
        assert_eq!(record_of(&n1.log, &from).await.outcome, want);
    }
}

#[tokio::test]
async fn permissive_plaintext_is_delivered_with_the_client_address_and_no_identity() {
    let (_net, n1, _n2) = two_nodes().await;
    // c's address, from outside: an address proves nothing without the kernel's word.
    let mut c =
        TestNet::capture(&n1.proxy, Listener::InboundPlain, addr("10.0.0.3:40011"), addr("10.0.0.1:8080")).await;
    assert_eq!(exchange(&mut c, b"plain").await.expect("an answer"), b"peer=10.0.0.3\nplain");
    let r = record_of(&n1.log, "10.0.0.3:40011").await;
    assert_eq!((r.outcome, r.listener.as_str(), r.mtls), (Outcome::Ok, "inbound_plain", false));
    assert_eq!((r.src_workload, r.src_identity), (None, None));
    assert_eq!(r.dst_identity, Some(identity("sa-a")));
}

#[tokio::test]
async fn strict_plaintext_is_refused() {
    let (net, ca) = (TestNet::new(), ca());
    let o = Opts { mode: MtlsMode::Strict, ..Opts::default() };
    let n1 = node_with("n1", &net, &ca, o).await;
    net.echo(addr("10.0.0.1:8080")).await;
    let mut c =
        TestNet::capture(&n1.proxy, Listener::InboundPlain, addr("10.0.0.50:40012"), addr("10.0.0.1:8080")).await;
    assert!(ended(&mut c).await);
    assert_eq!(record_of(&n1.log, "10.0.0.50:40012").await.outcome, Outcome::PlaintextRefused);
    assert!(net.dials().is_empty(), "a refused connection connects nowhere");
}

#[tokio::test]
async fn hbone_carries_a_connection_between_two_proxies_with_proven_identities() {
    let (net, n1, n2) = two_nodes().await;
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40013"), addr("10.0.0.3:8080")).await;
    let request = vec![7u8; 100_000];
    let back = exchange(&mut c, &request).await.expect("an answer");
    assert_eq!(&back[..14], b"peer=10.0.0.1\n", "c sees a's address through the tunnel");
    assert_eq!(&back[14..], &request[..]);
    let out = record_of(&n1.log, "10.0.0.1:40013").await;
    assert_eq!((out.outcome, out.listener.as_str(), out.mtls), (Outcome::Ok, "outbound", true));
    assert_eq!((out.bytes_sent, out.bytes_received), (100_000, 100_014));
    assert!(net.dials().contains(&Dial { dst: addr("10.0.0.3:15008"), source: Some("10.0.0.1".parse().unwrap()) }));
    // The other end: the peer's identity proven by its certificate, the bytes mirrored.
    let inb = record(&n2.log, |r| r.listener == "hbone").await;
    assert_eq!((inb.outcome, inb.mtls, inb.orig_dst), (Outcome::Ok, true, addr("10.0.0.3:8080")));
    assert_eq!((inb.src_identity, inb.src_workload.as_deref()), (Some(identity("sa-a")), Some("ns/a")));
    assert_eq!((inb.dst_identity, inb.dst_workload.as_deref()), (Some(identity("sa-c")), Some("ns/c")));
    assert_eq!((inb.bytes_sent, inb.bytes_received), (100_000, 100_014));
}

#[tokio::test]
async fn hbone_connections_are_pooled_and_reused() {
    let (net, n1, n2) = two_nodes().await;
    for port in 40014..40017 {
        let from = addr(&format!("10.0.0.1:{port}"));
        let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, from, addr("10.0.0.3:8080")).await;
        assert_eq!(exchange(&mut c, b"again").await.expect("an answer"), b"peer=10.0.0.1\nagain");
    }
    let tunnels = net.dials().iter().filter(|d| d.dst == addr("10.0.0.3:15008")).count();
    assert_eq!(tunnels, 1, "three connections share one HBONE connection: {:?}", net.dials());
    assert_eq!(n1.proxy.pool_stats().connections, 1);
    wait_for("three streams on n2", || records(&n2.log).len() == 3).await;
}

#[tokio::test]
async fn the_peer_refuses_a_stream_to_its_own_ports() {
    let (_net, n1, n2) = two_nodes().await;
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40017"), addr("10.0.0.3:15001")).await;
    assert!(ended(&mut c).await);
    assert_eq!(record_of(&n1.log, "10.0.0.1:40017").await.outcome, Outcome::HboneRefused);
    assert_eq!(record(&n2.log, |r| r.listener == "hbone").await.outcome, Outcome::SelfCall);
}

#[tokio::test]
async fn hbone_to_an_address_the_node_does_not_host_is_refused() {
    let (net, n1, n2) = two_nodes().await;
    // a's HBONE address, steered to n2 (as a misrouted or forged connection would be).
    net.listen(&n2.proxy, Listener::Hbone, &[addr("10.0.0.1:15009")]).await;
    let mut s =
        net.connect(addr("10.0.0.1:15009"), Some("10.0.0.3".parse().unwrap()), Duration::from_secs(1)).await.unwrap();
    assert!(ended(&mut s).await);
    let r = record(&n2.log, |r| r.listener == "hbone").await;
    assert_eq!((r.outcome, r.orig_dst), (Outcome::UnknownDestination, addr("10.0.0.1:15009")));
    assert!(records(&n1.log).is_empty());
}

#[tokio::test]
async fn a_peer_whose_address_belongs_to_another_identity_is_refused() {
    let (net, ca) = (TestNet::new(), ca());
    let n1 = node("n1", &net, &ca).await;
    // n2 believes a's address belongs to another service account than the one a proves.
    let other = WORKLOADS.replace("serviceAccount: sa-a", "serviceAccount: sa-other");
    let n2 = node_with("n2", &net, &ca, Opts { workloads: other, ..Opts::default() }).await;
    net.listen(&n2.proxy, Listener::Hbone, &[addr("10.0.0.3:15008")]).await;
    net.echo(addr("10.0.0.3:8080")).await;
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40018"), addr("10.0.0.3:8080")).await;
    assert!(ended(&mut c).await);
    let r = record(&n2.log, |r| r.listener == "hbone").await;
    assert_eq!((r.outcome, r.src_identity), (Outcome::IdentityMismatch, Some(identity("sa-a"))));
    assert_ne!(record_of(&n1.log, "10.0.0.1:40018").await.outcome, Outcome::Ok);
    assert!(!net.dials().iter().any(|d| d.dst == addr("10.0.0.3:8080")), "nothing reached c");
}

/// A TLS connection to c's HBONE port on n2, from a's address, presenting `cert`.
async fn tls_to_c(
    net: &TestNet,
    cert: &WorkloadCertificate,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = crate::tls::client_config(cert, &Identity::new(TD, "ns", "sa-c")).expect("a client config");
    let tcp = net.connect(addr("10.0.0.3:15008"), Some("10.0.0.1".parse().unwrap()), Duration::from_secs(1)).await?;
    tokio_rustls::TlsConnector::from(config).connect(crate::tls::server_name(), tcp).await
}

#[tokio::test]
async fn hbone_connections_that_carry_no_stream_or_fail_their_handshake_are_recorded() {
    let (net, n1, n2) = two_nodes().await;
    let a = Identity::new(TD, "ns", "sa-a");
    // a's own certificate, then HTTP/2, then nothing.
    let cert = n1.proxy.certs.get(&a).await.expect("a certificate");
    let tls = tls_to_c(&net, &cert).await.expect("a handshake");
    let local = addr("10.0.0.1:1");
    let client = H2Client::handshake(tls, local, "test".into()).await.expect("HTTP/2");
    drop(client);
    assert_eq!(record(&n2.log, |r| r.listener == "hbone").await.outcome, Outcome::NoStream);
    // A certificate of another CA.
    let stranger = CertificateManager::new(Box::new(SharedCa(ca()))).get(&a).await.expect("a certificate");
    assert!(tls_to_c(&net, &stranger).await.is_err(), "a certificate of another CA is refused");
    let r = record(&n2.log, |r| r.outcome != Outcome::NoStream).await;
    assert_eq!((r.listener.as_str(), r.outcome), ("hbone", Outcome::TlsHandshakeFailed));
}

#[tokio::test]
async fn the_registry_lists_every_kind_with_its_bytes_as_they_flow() {
    let (_net, n1, n2) = two_nodes().await;
    let open = [
        (Listener::Outbound, "10.0.0.1:40020", "10.0.0.9:80", Kind::PlainRelay),
        (Listener::Outbound, "10.0.0.1:40021", "10.0.0.5:8080", Kind::SameNode),
        (Listener::Outbound, "10.0.0.1:40022", "10.0.0.3:8080", Kind::HboneStream),
        (Listener::InboundPlain, "10.0.0.50:40023", "10.0.0.1:8080", Kind::PlainRelay),
    ];
    let mut clients = Vec::new();
    for (role, from, to, _) in open {
        let mut c = TestNet::capture(&n1.proxy, role, addr(from), addr(to)).await;
        greeting(&mut c).await;
        assert_eq!(echo_back(&mut c, &[1u8; 1000]).await, [1u8; 1000]);
        clients.push(c);
    }
    let list = n1.proxy.registry().list();
    for (_, from, to, kind) in open {
        let e = list.iter().find(|e| e.src == addr(from)).unwrap_or_else(|| panic!("{from} not listed: {list:#?}"));
        assert_eq!((e.kind, e.target), (kind, addr(to)));
        assert_eq!(e.bytes_sent, 1000, "bytes show while the connection is open");
        assert!(e.bytes_received >= 1000);
    }
    let same = list.iter().find(|e| e.kind == Kind::SameNode).expect("listed");
    assert_eq!((same.src_identity.clone(), same.dst_workload.as_deref()), (Some(identity("sa-a")), Some("ns/e")));
    let plain_in = list.iter().find(|e| e.listener == "inbound_plain").expect("listed");
    assert_eq!((plain_in.src_identity.clone(), plain_in.dst_workload.as_deref()), (None, Some("ns/a")));
    // The other end of the tunnel lists its stream, with the proven identity.
    wait_for("n2's stream to count its bytes", || n2.proxy.registry().list().iter().any(|e| e.bytes_sent == 1000))
        .await;
    let stream = n2.proxy.registry().list().pop().expect("n2 lists its stream");
    assert_eq!((stream.kind, stream.listener.as_str()), (Kind::HboneStream, "hbone"));
    assert_eq!((stream.src_identity, stream.dst_workload.as_deref()), (Some(identity("sa-a")), Some("ns/c")));
    // Istio's byte counters move with the bytes, not at the close.
    let series = format!(
        "istio_tcp_received_bytes_total{{reporter=\"source\",source_workload=\"a\",source_workload_namespace=\"ns\",\
         source_principal=\"{}\",destination_workload=\"e\",destination_workload_namespace=\"ns\",\
         destination_principal=\"{}\",request_protocol=\"tcp\",connection_security_policy=\"none\"}}",
        identity("sa-a"),
        identity("sa-e")
    );
    assert_eq!(sample(&n1.metrics, &series), Some(1000.0), "{}", n1.metrics.render());
    drop(clients);
    wait_for("every entry to go", || n1.proxy.registry().list().is_empty()).await;
    wait_for("n2's entry to go", || n2.proxy.registry().list().is_empty()).await;
}

#[tokio::test]
async fn closing_through_the_handle_ends_each_kind_with_the_closers_outcome() {
    let (_net, n1, n2) = two_nodes().await;
    // Any outcome the closer names (a policy's, later) is what the record says.
    let closed = |reason: &str| Closed { outcome: Outcome::IdentityMismatch, reason: reason.into() };
    for (role, from, to) in [
        (Listener::Outbound, "10.0.0.1:40030", "10.0.0.9:80"),
        (Listener::Outbound, "10.0.0.1:40031", "10.0.0.5:8080"),
        (Listener::Outbound, "10.0.0.1:40032", "10.0.0.3:8080"),
        (Listener::InboundPlain, "10.0.0.50:40033", "10.0.0.1:8080"),
    ] {
        let mut c = TestNet::capture(&n1.proxy, role, addr(from), addr(to)).await;
        greeting(&mut c).await;
        let id = n1.proxy.registry().list().into_iter().find(|e| e.src == addr(from)).expect("listed").id;
        assert!(n1.proxy.registry().close(id, closed(from)));
        assert!(ended(&mut c).await, "{from}: the client's connection ends");
        let r = record_of(&n1.log, from).await;
        assert_eq!((r.outcome, r.error.as_deref()), (Outcome::IdentityMismatch, Some(from)));
        assert!(!n1.proxy.registry().list().iter().any(|e| e.id == id), "{from}: its entry is gone");
    }
    // An inbound HBONE stream, closed on the server's side.
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40034"), addr("10.0.0.3:8080")).await;
    greeting(&mut c).await;
    let id = n2.proxy.registry().list().pop().expect("n2 lists the stream").id;
    assert!(n2.proxy.registry().close(id, closed("on n2")));
    assert!(ended(&mut c).await);
    assert_eq!(record(&n2.log, |r| r.error.as_deref() == Some("on n2")).await.outcome, Outcome::IdentityMismatch);
    // n1 sees its stream reset by the peer.
    assert_eq!(record_of(&n1.log, "10.0.0.1:40034").await.outcome, Outcome::Reset);
}

/// Opens a connection of each kind on n1 (and the inbound stream on n2), each idle after one
/// exchange.
async fn one_of_each(n1: &Node) -> Vec<TcpStream> {
    let mut clients = Vec::new();
    for (role, from, to) in [
        (Listener::Outbound, "10.0.0.1:40040", "10.0.0.9:80"),
        (Listener::Outbound, "10.0.0.1:40041", "10.0.0.5:8080"),
        (Listener::Outbound, "10.0.0.1:40042", "10.0.0.3:8080"),
        (Listener::InboundPlain, "10.0.0.50:40043", "10.0.0.1:8080"),
    ] {
        let mut c = TestNet::capture(&n1.proxy, role, addr(from), addr(to)).await;
        greeting(&mut c).await;
        clients.push(c);
    }
    clients
}

#[tokio::test]
async fn a_drain_that_cuts_connections_writes_a_record_for_each() {
    let (_net, n1, n2) = two_nodes().await;
    let mut clients = one_of_each(&n1).await;
    wait_for("n2's stream", || !n2.proxy.registry().list().is_empty()).await;
    // Nothing finishes within the deadline: every connection is cut.
    let drained = n1.drain.drain(Duration::from_millis(200)).await;
    assert_eq!(drained, Drained::Cut(1), "the proxy holds the node's watcher while connections are open");
    for c in &mut clients {
        assert!(ended(c).await, "a cut connection ends for its client");
    }
    n1.drain.released().await;
    let recs = records(&n1.log);
    assert_eq!(recs.len(), 4, "{recs:#?}");
    assert!(recs.iter().all(|r| r.outcome == Outcome::Cut), "{recs:#?}");
    assert!(n1.proxy.registry().list().is_empty());
    assert_eq!(n1.proxy.open_connections(), 0);
    let cut = sample(&n1.metrics, "meshpath_connections_failed_total{listener=\"outbound\",reason=\"cut\"}");
    assert_eq!(cut, Some(3.0));
    // n2's stream was reset by n1, and says so.
    assert_eq!(record(&n2.log, |r| r.listener == "hbone").await.outcome, Outcome::Reset);
}

#[tokio::test]
async fn a_graceful_drain_lets_open_connections_finish() {
    let (_net, n1, n2) = two_nodes().await;
    let mut clients = one_of_each(&n1).await;
    wait_for("n2's stream", || !n2.proxy.registry().list().is_empty()).await;
    n2.drain.start(Mode::Graceful);
    n1.drain.start(Mode::Graceful);
    // Still served after the drain began (n2 sent its peer a GOAWAY; the stream goes on).
    for c in &mut clients {
        assert_eq!(echo_back(c, b"still here").await, b"still here");
        c.shutdown().await.expect("half-closes");
        assert!(ended(c).await);
    }
    tokio::time::timeout(Duration::from_secs(5), n1.drain.released()).await.expect("n1 drained");
    tokio::time::timeout(Duration::from_secs(5), n2.drain.released()).await.expect("n2 drained");
    assert!(records(&n1.log).iter().all(|r| r.outcome == Outcome::Ok), "{:#?}", records(&n1.log));
    assert_eq!(records(&n1.log).len(), 4);
    assert_eq!(record(&n2.log, |r| r.listener == "hbone").await.outcome, Outcome::Ok);
}

#[test]
fn connections_dropped_with_the_runtime_write_their_records() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let (n1, clients) = rt.block_on(async {
        let (net, n1, n2) = two_nodes().await;
        let clients = one_of_each(&n1).await;
        drop((net, n2));
        (n1, clients)
    });
    assert!(records(&n1.log).is_empty(), "nothing ended yet");
    // The process exits without a drain: its tasks are dropped with the runtime.
    drop(rt);
    let recs = records(&n1.log);
    assert_eq!(recs.len(), 4, "{recs:#?}");
    assert!(recs.iter().all(|r| r.outcome == Outcome::Cut && r.error.is_some()), "{recs:#?}");
    drop(clients);
}

#[tokio::test]
async fn a_takeover_moves_a_relay_to_the_successor_which_carries_it_on() {
    let (net, n1, _n2) = two_nodes().await;
    let successor = node("n1", &net, &ca()).await;
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40050"), addr("10.0.0.9:80")).await;
    greeting(&mut c).await;
    assert_eq!(echo_back(&mut c, b"before").await, b"before");
    let (outbox, mut relays) = tokio::sync::mpsc::channel(1);
    n1.proxy.hand_over_relays(outbox);
    let (relay, ack) = relays.recv().await.expect("the idle relay pauses and comes over");
    assert_eq!((relay.record.bytes_sent, relay.record.bytes_received), (6, 20));
    successor.proxy.adopt(relay);
    ack.send(true).expect("the old relay waits for the answer");
    let old = record_of(&n1.log, "10.0.0.1:40050").await;
    assert_eq!((old.outcome, old.bytes_sent), (Outcome::HandedOver, 6));
    // The same sockets, carried on by the successor.
    wait_for("the adopted entry", || !successor.proxy.registry().list().is_empty()).await;
    let entry = successor.proxy.registry().list().pop().expect("listed");
    assert_eq!((entry.kind, entry.bytes_sent), (Kind::Adopted, 6));
    assert_eq!(echo_back(&mut c, b" and after").await, b" and after");
    c.shutdown().await.expect("half-closes");
    assert!(ended(&mut c).await);
    let new = record_of(&successor.log, "10.0.0.1:40050").await;
    assert_eq!((new.outcome, new.bytes_sent, new.bytes_received), (Outcome::Ok, 16, 30), "the whole connection");
    assert_eq!(sample(&successor.metrics, "meshpath_drain_connections_total{outcome=\"adopted\"}"), Some(1.0));
}

#[tokio::test]
async fn connections_past_the_limit_are_refused_at_the_door_and_counted() {
    let (net, ca) = (TestNet::new(), ca());
    let n1 = node_with("n1", &net, &ca, Opts { per_source: 1, ..Opts::default() }).await;
    net.echo(addr("10.0.0.9:80")).await;
    let mut held = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40060"), addr("10.0.0.9:80")).await;
    greeting(&mut held).await;
    let mut refused =
        TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40061"), addr("10.0.0.9:80")).await;
    assert!(ended(&mut refused).await);
    let over = sample(&n1.metrics, "meshpath_connections_failed_total{listener=\"outbound\",reason=\"over_limit\"}");
    assert_eq!(over, Some(1.0));
    // Another client is not held back by this one.
    let mut other = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.5:40062"), addr("10.0.0.9:80")).await;
    assert_eq!(greeting(&mut other).await, "peer=10.0.0.5");
    assert_eq!(n1.proxy.open_connections(), 2);
    assert!(records(&n1.log).is_empty(), "a refusal at the door costs no record");
}

#[tokio::test]
async fn a_source_the_control_plane_describes_late_waits_for_it_then_proceeds() {
    let (net, ca) = (TestNet::new(), ca());
    let n1 = node_with("n1", &net, &ca, Opts { source_wait: Duration::from_secs(5), ..Opts::default() }).await;
    net.echo(addr("10.0.0.9:80")).await;
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.8:40100"), addr("10.0.0.9:80")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(records(&n1.log).is_empty(), "the connection waits for its source");
    let index = WorkloadIndex::new(&state(WORKLOADS, MtlsMode::Permissive), TD);
    n1.proxy.set_workloads(with_workload(index, "10.0.0.8", "ns/late", "n1", Tunnel::Hbone, false), &BTreeSet::new());
    assert_eq!(exchange(&mut c, b"").await.expect("an answer"), b"peer=10.0.0.8\n");
    drop(c);
    let r = record_of(&n1.log, "10.0.0.8:40100").await;
    assert_eq!((r.outcome, r.src_workload.as_deref()), (Outcome::Ok, Some("ns/late")));
}

#[tokio::test]
async fn a_source_never_described_fails_closed_after_the_wait() {
    let (net, ca) = (TestNet::new(), ca());
    let n1 = node_with("n1", &net, &ca, Opts { source_wait: Duration::from_millis(400), ..Opts::default() }).await;
    net.echo(addr("10.0.0.9:80")).await;
    let started = std::time::Instant::now();
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.8:40101"), addr("10.0.0.9:80")).await;
    assert!(ended(&mut c).await);
    assert!(started.elapsed() >= Duration::from_millis(400));
    let r = record_of(&n1.log, "10.0.0.8:40101").await;
    assert_eq!((r.outcome, r.bytes_sent), (Outcome::SourcePending, 0));
}

#[tokio::test]
async fn a_destination_behind_a_waypoint_is_refused() {
    let (_net, n1, _n2) = two_nodes().await;
    let index = WorkloadIndex::new(&state(WORKLOADS, MtlsMode::Permissive), TD);
    let local = local_identities(WORKLOADS, "n1");
    n1.proxy.set_workloads(with_workload(index, "10.0.0.3", "ns/c", "n2", Tunnel::Hbone, true), &local);
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40102"), addr("10.0.0.3:8080")).await;
    assert!(ended(&mut c).await);
    let r = record_of(&n1.log, "10.0.0.1:40102").await;
    assert_eq!((r.outcome, r.bytes_received), (Outcome::WaypointUnsupported, 0));
}

#[tokio::test]
async fn a_peer_the_control_plane_says_is_not_captured_is_reached_plain_from_the_client() {
    let (_net, n1, n2) = two_nodes().await;
    let index = WorkloadIndex::new(&state(WORKLOADS, MtlsMode::Permissive), TD);
    let local = local_identities(WORKLOADS, "n1");
    n1.proxy.set_workloads(with_workload(index, "10.0.0.3", "ns/c", "n2", Tunnel::Plain, false), &local);
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40103"), addr("10.0.0.3:8080")).await;
    assert_eq!(exchange(&mut c, b"").await.expect("an answer"), b"peer=10.0.0.1\n");
    drop(c);
    let r = record_of(&n1.log, "10.0.0.1:40103").await;
    assert_eq!((r.outcome, r.mtls, r.dst_workload.as_deref()), (Outcome::Ok, false, Some("ns/c")));
    assert!(records(&n2.log).is_empty(), "nothing went through c's node proxy");
}

/// `index` with one namespace-wide policy of namespace `ns`: `action` for connections from
/// principal `from` (istiod's form, without `spiffe://`), or from any one without.
fn with_policy(index: WorkloadIndex, action: policy::Action, from: Option<&str>) -> WorkloadIndex {
    with_scoped_policy(index, "p", policy::Scope::Namespace, action, from)
}

/// `index` with policy `ns/<name>` of `scope`: `action` for principal `from`, or for any
/// connection without.
fn with_scoped_policy(
    mut index: WorkloadIndex,
    name: &str,
    scope: policy::Scope,
    action: policy::Action,
    from: Option<&str>,
) -> WorkloadIndex {
    let principals = from.map(|p| vec![policy::StringMatch::Exact(p.into())]).unwrap_or_default();
    let rule = vec![vec![policy::Match { principals, ..Default::default() }]];
    let rules = if from.is_some() { vec![rule] } else { vec![] };
    let p = policy::Policy::new("ns", name, scope, action, rules, false).expect("a policy");
    let mut store = index.policies().clone();
    store.insert(p);
    index.set_policies(store);
    index
}

/// `index` where the workload at `ip` names policy `key` (its selector now matches it).
fn naming(mut index: WorkloadIndex, ip: &str, key: &str) -> WorkloadIndex {
    let ip = ip.parse().expect("an IP");
    let w = index.get(ip).cloned().expect("a workload at that address");
    index.insert_ip(ip, Arc::new(WorkloadInfo { policies: vec![key.into()], ..(*w).clone() }));
    index
}

/// Both nodes get `index` (each keeping its own local identities).
fn set_index(n1: &Node, n2: &Node, index: &WorkloadIndex) {
    n1.proxy.set_workloads(index.clone(), &local_identities(WORKLOADS, "n1"));
    n2.proxy.set_workloads(index.clone(), &local_identities(WORKLOADS, "n2"));
}

#[tokio::test]
async fn a_deny_policy_answers_hbone_401_before_any_byte_and_names_itself() {
    let (net, n1, n2) = two_nodes().await;
    let index = WorkloadIndex::new(&state(WORKLOADS, MtlsMode::Permissive), TD);
    set_index(&n1, &n2, &with_policy(index, policy::Action::Deny, Some("cluster.local/ns/ns/sa/sa-a")));
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40110"), addr("10.0.0.3:8080")).await;
    assert!(ended(&mut c).await);
    let inb = record(&n2.log, |r| r.listener == "hbone").await;
    assert_eq!(inb.outcome, Outcome::PolicyDenied);
    assert!(inb.error.as_deref().is_some_and(|e| e.contains("explicitly denied by: ns/p")), "{inb:?}");
    assert!(!net.dials().contains(&Dial { dst: addr("10.0.0.3:8080"), source: Some("10.0.0.1".parse().unwrap()) }));
    let out = record_of(&n1.log, "10.0.0.1:40110").await;
    assert!(out.error.as_deref().is_some_and(|e| e.contains("401")), "the client side sees 401: {out:?}");
}

#[tokio::test]
async fn an_allow_policy_admits_its_principal_only_on_every_path() {
    let (_net, n1, n2) = two_nodes().await;
    let index = WorkloadIndex::new(&state(WORKLOADS, MtlsMode::Permissive), TD);
    set_index(&n1, &n2, &with_policy(index, policy::Action::Allow, Some("cluster.local/ns/ns/sa/sa-e")));
    // HBONE from a: not the allowed principal.
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40111"), addr("10.0.0.3:8080")).await;
    assert!(ended(&mut c).await);
    let inb = record(&n2.log, |r| r.listener == "hbone" && r.src.port() != 0).await;
    assert_eq!(inb.outcome, Outcome::PolicyDenied);
    assert!(inb.error.as_deref().is_some_and(|e| e.contains("allow policies exist, but none allowed")), "{inb:?}");
    // Same node, a -> e: the hand-over is checked too.
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40112"), addr("10.0.0.5:8080")).await;
    assert!(ended(&mut c).await);
    assert_eq!(record_of(&n1.log, "10.0.0.1:40112").await.outcome, Outcome::PolicyDenied);
    // Plaintext proves no principal.
    let mut c =
        TestNet::capture(&n1.proxy, Listener::InboundPlain, addr("10.0.0.50:40113"), addr("10.0.0.1:8080")).await;
    assert!(ended(&mut c).await);
    assert_eq!(record_of(&n1.log, "10.0.0.50:40113").await.outcome, Outcome::PolicyDenied);
    // e, the allowed principal, reaches c over HBONE and a on the same node.
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.5:40114"), addr("10.0.0.3:8080")).await;
    assert_eq!(exchange(&mut c, b"").await.expect("an answer"), b"peer=10.0.0.5\n");
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.5:40115"), addr("10.0.0.1:8080")).await;
    assert_eq!(exchange(&mut c, b"").await.expect("an answer"), b"peer=10.0.0.5\n");
}

#[tokio::test]
async fn open_connections_a_new_policy_denies_are_closed_with_their_record() {
    let (_net, n1, n2) = two_nodes().await;
    let index = WorkloadIndex::new(&state(WORKLOADS, MtlsMode::Permissive), TD);
    set_index(&n1, &n2, &index);
    let mut hbone =
        TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40120"), addr("10.0.0.3:8080")).await;
    let mut local =
        TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40121"), addr("10.0.0.5:8080")).await;
    for c in [&mut hbone, &mut local] {
        assert_eq!(exchange_open(c, b"x").await, b"peer=10.0.0.1\nx");
    }
    set_index(&n1, &n2, &with_policy(index, policy::Action::Deny, Some("cluster.local/ns/ns/sa/sa-a")));
    assert!(ended(&mut hbone).await && ended(&mut local).await, "both closed by the new policy");
    let inb = record(&n2.log, |r| r.listener == "hbone").await;
    assert_eq!(inb.outcome, Outcome::PolicyDenied);
    assert!(inb.error.as_deref().is_some_and(|e| e.contains("explicitly denied by: ns/p")), "{inb:?}");
    assert_eq!(record_of(&n1.log, "10.0.0.1:40121").await.outcome, Outcome::PolicyDenied);
}

/// Where meshpath goes further than ztunnel: a policy key newly attached to a workload (its
/// selector now matches) closes that workload's open connections the policy denies.
#[tokio::test]
async fn a_policy_newly_attached_to_a_workload_closes_its_open_connections() {
    let (_net, n1, n2) = two_nodes().await;
    let (scope, allow) = (policy::Scope::WorkloadSelector, policy::Action::Allow);
    let index = WorkloadIndex::new(&state(WORKLOADS, MtlsMode::Permissive), TD);
    let index = with_scoped_policy(index, "only-e", scope, allow, Some("cluster.local/ns/ns/sa/sa-e"));
    set_index(&n1, &n2, &index);
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40122"), addr("10.0.0.3:8080")).await;
    assert_eq!(exchange_open(&mut c, b"x").await, b"peer=10.0.0.1\nx", "c names no policy yet");
    set_index(&n1, &n2, &naming(index, "10.0.0.3", "ns/only-e"));
    assert!(ended(&mut c).await, "closed once c's workload names the policy");
    let inb = record(&n2.log, |r| r.listener == "hbone").await;
    assert_eq!(inb.outcome, Outcome::PolicyDenied);
}

/// A stream on an HBONE connection accepted before its destination named a policy is checked
/// against the workload as described now (found by the side-by-side run with ztunnel).
#[tokio::test]
async fn a_new_stream_on_a_pooled_connection_sees_the_policies_its_destination_names_now() {
    let (_net, n1, n2) = two_nodes().await;
    let (scope, deny) = (policy::Scope::WorkloadSelector, policy::Action::Deny);
    let index = WorkloadIndex::new(&state(WORKLOADS, MtlsMode::Permissive), TD);
    let index = with_scoped_policy(index, "no-a", scope, deny, Some("cluster.local/ns/ns/sa/sa-a"));
    set_index(&n1, &n2, &index);
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40130"), addr("10.0.0.3:8080")).await;
    assert_eq!(exchange(&mut c, b"").await.expect("an answer"), b"peer=10.0.0.1\n", "c names no policy yet");
    set_index(&n1, &n2, &naming(index, "10.0.0.3", "ns/no-a"));
    let mut c = TestNet::capture(&n1.proxy, Listener::Outbound, addr("10.0.0.1:40131"), addr("10.0.0.3:8080")).await;
    assert!(ended(&mut c).await);
    let inb = record(&n2.log, |r| r.listener == "hbone" && r.outcome != Outcome::Ok).await;
    assert_eq!(inb.outcome, Outcome::PolicyDenied, "{inb:?}");
    assert_eq!(n1.proxy.pool_stats().connections, 1, "the second stream rode the pooled connection");
}
