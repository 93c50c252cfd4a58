//! meshpath's workload xDS client against the lab's fake istiod, over loopback TLS (no root,
//! no namespaces): the protocol (first pushes, ACK per nonce, a bad resource NACKed alone,
//! changes and removals, reconnects with the versions held), the credentials (the token read
//! again on every connection, a refused token backed off, a wrong root named), and each gate
//! of the fake with istiod's code.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt as _;
use meshpath::drain;
use meshpath::sync::lock;
use meshpath::xds::client::{FailureKind, XdsClient, XdsStatus};
use meshpath::xds::config::XdsArgs;
use meshpath::xds::proto::envoy::service::discovery::v3 as client_proto;
use meshpath::xds::proto::istio::security::Authorization;
use meshpath::xds::proto::istio::workload::{Address, address};
use meshpath::xds::session::{Applier, Delta, Rejected};
use meshpath::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use meshpath_lab::istiod::FakeIstiod;
use meshpath_lab::istiod::auth::Account;
use meshpath_lab::istiod::pki::LabRoot;
use meshpath_lab::istiod::proto::istio::security::{Action, Scope};
use meshpath_lab::istiod::proto::istio::workload::Workload;
use meshpath_lab::istiod::xds::{self as fake, Change, Records, RequestKind};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Code;

const CLUSTER: &str = "Kubernetes";
const TOKEN: &str = "token-of-the-node-proxy";
const SECOND_TOKEN: &str = "rotated-token-of-the-node-proxy";
/// The node proxy's own namespace and account, as the chart runs ztunnel.
const PROXY_NS: &str = "istio-system";
const PROXY_SA: &str = "ztunnel";
const WAIT: Duration = Duration::from_secs(10);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 244, 1, last))
}

/// Pod `name` of namespace `lab` on `node`; its IP ends in its name's length (names differ in it).
fn pod(name: &str, node: &str) -> Workload {
    fake::workload(
        &fake::pod_uid(CLUSTER, "lab", name),
        "lab",
        name,
        &format!("sa-{name}"),
        node,
        &[ip(name.len() as u8)],
    )
}

/// The lab's mesh: two pods, a service, a policy.
fn seed(istiod: &FakeIstiod) {
    let web = fake::service("lab", "web", "web.lab.svc.cluster.local", &[ip(200)], &[(80, 8080)]);
    istiod.xds.put(fake::in_service(pod("a", "n1"), "lab/web.lab.svc.cluster.local", &[(80, 8080)]));
    istiod.xds.put(pod("bb", "n2"));
    istiod.xds.put(web);
    istiod.xds.put(fake::authorization("lab", "deny-9", Scope::Namespace, Action::Deny, vec![]));
}

fn uid(name: &str) -> String {
    fake::pod_uid(CLUSTER, "lab", name)
}

/// What the client applied, by name.
#[derive(Default)]
struct Applied {
    addresses: BTreeMap<String, Address>,
    authorizations: BTreeMap<String, Authorization>,
}

/// The node's state, as a test sees it.
#[derive(Clone, Default)]
struct State(Arc<Mutex<Applied>>);

impl Applier for State {
    fn apply(&mut self, delta: Delta) -> Vec<Rejected> {
        let mut s = lock(&self.0);
        match delta {
            Delta::Addresses { updates, removed } => {
                s.addresses.extend(updates.into_iter().map(|u| (u.name, u.resource)));
                removed.iter().for_each(|n| drop(s.addresses.remove(n)));
            }
            Delta::Authorizations { updates, removed } => {
                s.authorizations.extend(updates.into_iter().map(|u| (u.name, u.resource)));
                removed.iter().for_each(|n| drop(s.authorizations.remove(n)));
            }
        }
        Vec::new()
    }
}

impl State {
    fn node_of(&self, name: &str) -> Option<String> {
        match lock(&self.0).addresses.get(name)?.r#type.as_ref()? {
            address::Type::Workload(w) => Some(w.node.clone()),
            address::Type::Service(_) => None,
        }
    }

    fn names(&self) -> (Vec<String>, Vec<String>) {
        let s = lock(&self.0);
        (s.addresses.keys().cloned().collect(), s.authorizations.keys().cloned().collect())
    }
}

/// How the client is set up, where a test differs from the good case.
struct ClientSetup {
    token: String,
    root_pem: Option<String>,
    namespace: String,
    cluster_id: String,
    port: Option<u16>,
}

impl Default for ClientSetup {
    fn default() -> Self {
        Self { token: TOKEN.into(), root_pem: None, namespace: PROXY_NS.into(), cluster_id: CLUSTER.into(), port: None }
    }
}

/// A running client and what it talks to.
struct Running {
    istiod: FakeIstiod,
    state: State,
    status: watch::Receiver<XdsStatus>,
    token_file: PathBuf,
    stop: drain::Trigger,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn fake_istiod() -> Result<FakeIstiod> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let istiod = FakeIstiod::builder(CLUSTER)?
        .token(TOKEN, Account::new(PROXY_NS, PROXY_SA))
        .token(SECOND_TOKEN, Account::new(PROXY_NS, PROXY_SA))
        .serve(listener)?;
    Ok(istiod)
}

async fn start(setup: ClientSetup) -> Result<Running> {
    init_logs();
    let istiod = fake_istiod().await?;
    seed(&istiod);
    let dir = tempfile::Builder::new().prefix("meshpath-istiod-").tempdir()?;
    let (token_file, root_file) = (dir.path().join("istio-token"), dir.path().join("root-cert.pem"));
    std::fs::write(&token_file, &setup.token)?;
    std::fs::write(&root_file, setup.root_pem.as_deref().unwrap_or(istiod.root_pem()))?;
    let args = XdsArgs {
        xds_address: format!("localhost:{}", setup.port.unwrap_or(istiod.addr().port())),
        cluster_id: setup.cluster_id,
        pod_name: Some("meshpath-x1".into()),
        pod_namespace: Some(setup.namespace),
        node_name: Some("n1".into()),
        instance_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
        token_file: token_file.clone(),
        root_cert: root_file,
    };
    let env = [("ISTIO_META_DNS_CAPTURE".to_owned(), "true".to_owned())];
    let state = State::default();
    let client = XdsClient::new(args.settings(env)?, state.clone());
    let status = client.status();
    let (stop, watcher) = drain::new();
    let task = tokio::spawn(client.run(watcher));
    Ok(Running { istiod, state, status, token_file, stop, task, _dir: dir })
}

impl Running {
    async fn until(&mut self, what: &str, f: impl Fn(&XdsStatus) -> bool) -> Result<XdsStatus> {
        let found = tokio::time::timeout(WAIT, self.status.wait_for(|s| f(s))).await.map(|r| r.map(|s| s.clone()));
        match found {
            Ok(Ok(s)) => Ok(s),
            _ => bail!("no {what} within {WAIT:?}; status {:?}", *self.status.borrow()),
        }
    }

    async fn ready(&mut self) -> Result<XdsStatus> {
        self.until("readiness", |s| s.ready).await
    }

    async fn records(&self, what: &str, f: impl Fn(&Records) -> bool) -> Result<Records> {
        self.istiod.xds.wait_for(what, WAIT, f).await.map_err(anyhow::Error::msg)
    }

    async fn state_until(&self, what: &str, f: impl Fn(&State) -> bool) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        while !f(&self.state) {
            ensure!(Instant::now() < deadline, "the client's state never showed {what}: {:?}", self.state.names());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn stop(self) {
        self.stop.start(drain::Mode::Immediate);
        let _ = self.task.await;
        self.istiod.stop().await;
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("meshpath=debug,meshpath_lab=info").try_init();
}

/// Each response's answers, by nonce.
fn answers(records: &Records) -> Vec<(&str, Vec<&RequestKind>)> {
    records.responses.iter().map(|r| (r.nonce.as_str(), records.answers_to(&r.nonce))).collect()
}

/// Every response has been answered, once, with an ACK.
fn all_acked(records: &Records) -> bool {
    answers(records).iter().all(|(_, a)| matches!(a.as_slice(), [RequestKind::Ack { .. }]))
}

#[tokio::test]
async fn the_first_push_of_both_types_is_applied_then_ready_with_an_ack_per_nonce() -> Result<()> {
    let mut run = start(ClientSetup::default()).await?;
    let status = run.ready().await?;
    ensure!(status.connected && status.nacks == 0 && status.last_failure.is_none(), "{status:?}");
    let (addresses, policies) = run.state.names();
    let want = [uid("a"), uid("bb"), "lab/web.lab.svc.cluster.local".into()];
    ensure!(want.iter().all(|n| addresses.contains(n)) && addresses.len() == 3, "addresses {addresses:?}");
    ensure!(policies == ["lab/deny-9"], "policies {policies:?}");

    let records = run.records("an answer to both first pushes", |r| r.responses.len() == 2 && all_acked(r)).await?;
    let types: Vec<&str> = records.responses.iter().map(|r| r.type_url.as_str()).collect();
    ensure!(types.contains(&ADDRESS_TYPE) && types.contains(&AUTHORIZATION_TYPE), "{types:?}");
    let stream = records.stream(1).context("stream 1")?;
    ensure!(stream.headers.get("authorization").map(String::as_str) == Some(&format!("Bearer {TOKEN}")), "{stream:?}");
    ensure!(stream.headers.get("clusterid").map(String::as_str) == Some(CLUSTER), "{stream:?}");
    let node = stream.node.as_ref().context("the node")?;
    ensure!(node.id == "ztunnel~10.0.0.1~meshpath-x1.istio-system~istio-system.svc.cluster.local", "{node:?}");
    for (k, v) in [("NAMESPACE", PROXY_NS), ("NODE_NAME", "n1"), ("CLUSTER_ID", CLUSTER), ("DNS_CAPTURE", "true")] {
        ensure!(node.metadata.get(k).map(String::as_str) == Some(v), "metadata {k}: {:?}", node.metadata);
    }
    let subscriptions: Vec<_> =
        records.requests_of(1).filter(|r| matches!(r.kind, RequestKind::Subscribe { .. })).collect();
    ensure!(
        subscriptions.len() == 2 && subscriptions.iter().filter(|r| r.node.is_some()).count() == 1,
        "{subscriptions:?}"
    );
    run.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_malformed_resource_is_nacked_alone_naming_it_and_the_rest_applied() -> Result<()> {
    let mut run = start(ClientSetup::default()).await?;
    run.ready().await?;
    let garbled =
        Change::Raw { type_url: ADDRESS_TYPE, name: "lab/garbled".into(), bytes: vec![0x0a, 0xff, 0xff, 0xff] };
    run.istiod.xds.change([garbled, Change::put(pod("ccc", "n1"))]);
    let records =
        run.records("a NACK", |r| r.requests.iter().any(|q| matches!(q.kind, RequestKind::Nack { .. }))).await?;
    let nacks: Vec<&String> = records
        .requests
        .iter()
        .filter_map(|q| match &q.kind {
            RequestKind::Nack { message, .. } => Some(message),
            _ => None,
        })
        .collect();
    ensure!(nacks.len() == 1, "one NACK: {nacks:?}");
    let pushed: Vec<&str> =
        records.responses.last().context("the push")?.resources.iter().map(|r| r.0.as_str()).collect();
    ensure!(pushed.len() == 2 && pushed.contains(&"lab/garbled"), "both in one response: {pushed:?}");
    ensure!(nacks[0].starts_with("lab/garbled: it does not decode"), "the NACK names it: {}", nacks[0]);
    ensure!(!nacks[0].contains("ccc"), "only the bad one: {}", nacks[0]);
    run.state_until("pod ccc beside the bad one", |s| s.node_of(&uid("ccc")).is_some()).await?;
    ensure!(!run.state.names().0.contains(&"lab/garbled".to_owned()), "the bad one is not applied");
    let status = run.until("the NACK counted", |s| s.nacks == 1).await?;
    ensure!(status.ready, "a NACK does not unready the node: {status:?}");

    // The next push is ACKed: the NACK poisons nothing.
    run.istiod.xds.put(pod("dddd", "n2"));
    run.state_until("pod dddd", |s| s.node_of(&uid("dddd")).is_some()).await?;
    let records = run.records("answers to 4 pushes", |r| r.responses.len() == 4 && r.requests.len() == 6).await?;
    let kinds: Vec<&str> = answers(&records)
        .iter()
        .map(|(_, a)| match a.as_slice() {
            [RequestKind::Ack { .. }] => "ACK",
            [RequestKind::Nack { .. }] => "NACK",
            _ => "not answered once",
        })
        .collect();
    ensure!(kinds.iter().filter(|k| **k == "ACK").count() == 3 && kinds[2] == "NACK", "answers {kinds:?}");
    run.stop().await;
    Ok(())
}

#[tokio::test]
async fn pushed_changes_and_removals_are_applied_and_acked() -> Result<()> {
    let mut run = start(ClientSetup::default()).await?;
    run.ready().await?;
    run.istiod.xds.put(pod("a", "n9"));
    run.state_until("pod a moved to n9", |s| s.node_of(&uid("a")).as_deref() == Some("n9")).await?;
    ensure!(run.istiod.xds.remove(ADDRESS_TYPE, &uid("bb")), "bb was served");
    run.state_until("pod bb removed", |s| !s.names().0.contains(&uid("bb"))).await?;
    ensure!(run.istiod.xds.remove(AUTHORIZATION_TYPE, "lab/deny-9"), "the policy was served");
    run.istiod.xds.put(fake::authorization("lab", "allow-1", Scope::Namespace, Action::Allow, vec![]));
    run.state_until("the policies swapped", |s| s.names().1 == ["lab/allow-1"]).await?;
    let records = run.records("every push ACKed", |r| r.responses.len() >= 5 && all_acked(r)).await?;
    let removed: Vec<&String> = records.responses.iter().flat_map(|r| &r.removed).collect();
    ensure!(removed.contains(&&uid("bb")) && removed.contains(&&"lab/deny-9".to_owned()), "{removed:?}");
    run.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_dropped_stream_reconnects_with_the_versions_held_and_the_token_read_again() -> Result<()> {
    let mut run = start(ClientSetup::default()).await?;
    run.ready().await?;
    run.istiod.xds.put_raw(ADDRESS_TYPE, "lab/garbled", vec![0xff]);
    run.until("the NACK", |s| s.nacks == 1).await?;
    run.records("the NACK recorded", |r| r.requests.iter().any(|q| matches!(q.kind, RequestKind::Nack { .. }))).await?;
    std::fs::write(&run.token_file, format!("{SECOND_TOKEN}\n"))?;
    run.istiod.xds.drop_streams();
    let records = run.records("a second stream's subscriptions", |r| r.requests_of(2).count() >= 2).await?;

    let stream = records.stream(2).context("stream 2")?;
    let auth = stream.headers.get("authorization").map(String::as_str);
    ensure!(auth == Some(&format!("Bearer {SECOND_TOKEN}")), "the rotated token: {auth:?}");
    for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        let sub = records.requests_of(2).find(|r| r.type_url == type_url).context("a subscription")?;
        let RequestKind::Subscribe { initial_versions } = &sub.kind else { bail!("not a subscription: {sub:?}") };
        let served = served_versions(&run.istiod, &records, type_url);
        ensure!(initial_versions == &served, "{type_url}: held {initial_versions:?}, served {served:?}");
    }
    // The server sends only what the client lacks: the resource it refused, nothing else.
    let records =
        run.records("stream 2's first pushes", |r| r.responses.iter().filter(|p| p.stream == 2).count() == 2).await?;
    let resent: Vec<&(String, String)> =
        records.responses.iter().filter(|p| p.stream == 2).flat_map(|p| &p.resources).collect();
    ensure!(resent.len() == 1 && resent[0].0 == "lab/garbled", "resent {resent:?}");
    let status = run.until("connected again", |s| s.connected && s.attempts == 2).await?;
    ensure!(status.ready && status.last_failure.as_ref().is_some_and(|f| f.kind == FailureKind::Stream), "{status:?}");
    run.stop().await;
    Ok(())
}

/// The versions the fake serves of `type_url`, but for what the client NACKed.
fn served_versions(istiod: &FakeIstiod, records: &Records, type_url: &str) -> BTreeMap<String, String> {
    records
        .responses
        .iter()
        .filter(|r| r.stream == 1 && r.type_url == type_url)
        .flat_map(|r| &r.resources)
        .filter(|(name, _)| name != "lab/garbled")
        .filter_map(|(name, _)| istiod.xds.version(type_url, name).map(|v| (name.clone(), v)))
        .collect()
}

#[tokio::test]
async fn a_refused_token_is_named_and_backed_off() -> Result<()> {
    let mut run = start(ClientSetup { token: "not-a-lab-token".into(), ..Default::default() }).await?;
    let started = Instant::now();
    let status = run.until("a refusal", |s| s.last_failure.is_some()).await?;
    let failure = status.last_failure.context("a failure")?;
    ensure!(failure.kind == FailureKind::TokenRefused, "{failure:?}");
    ensure!(failure.message == "istiod refused the token: authentication failure", "{failure:?}");
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    let records = run.istiod.xds.records();
    let attempts = records.streams.len();
    // 10 ms doubling: 10+20+...+1280 ms = 2.55 s, so about 9 attempts in 3 s; a client
    // retrying without backoff would make hundreds.
    ensure!((3..=12).contains(&attempts), "{attempts} attempts in 3 s");
    for s in &records.streams {
        let refused = s.refused.as_ref().context("refused")?;
        ensure!(refused.code == Code::Unauthenticated && refused.reason.contains("not one of the lab's"), "{s:?}");
    }
    ensure!(!run.status.borrow().ready, "never ready");
    run.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_wrong_root_is_a_named_tls_failure() -> Result<()> {
    let other = LabRoot::generate("not the mesh root")?;
    let mut run = start(ClientSetup { root_pem: Some(other.pem().to_owned()), ..Default::default() }).await?;
    let status = run.until("a failure", |s| s.last_failure.is_some()).await?;
    let failure = status.last_failure.context("a failure")?;
    ensure!(failure.kind == FailureKind::Tls, "{failure:?}");
    ensure!(
        failure.message.contains("TLS with istiod at localhost:") && failure.message.contains("UnknownIssuer"),
        "{failure:?}"
    );
    ensure!(run.istiod.xds.records().streams.is_empty(), "no gRPC stream without TLS");
    run.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_unreachable_istiod_is_named() -> Result<()> {
    let closed = TcpListener::bind("127.0.0.1:0").await?;
    let port = closed.local_addr()?.port();
    drop(closed);
    let mut run = start(ClientSetup { port: Some(port), ..Default::default() }).await?;
    let status = run.until("a failure", |s| s.last_failure.is_some()).await?;
    let failure = status.last_failure.context("a failure")?;
    ensure!(failure.kind == FailureKind::Unreachable && failure.message.contains("unreachable"), "{failure:?}");
    run.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_client_names_each_refusal_of_its_credentials() -> Result<()> {
    let cases = [
        (
            ClientSetup { cluster_id: "other-cluster".into(), ..Default::default() },
            FailureKind::TokenRefused,
            Code::Unauthenticated,
        ),
        (ClientSetup { namespace: "lab".into(), ..Default::default() }, FailureKind::Denied, Code::PermissionDenied),
    ];
    for (setup, kind, code) in cases {
        let mut run = start(setup).await?;
        let status = run.until("a failure", |s| s.last_failure.is_some()).await?;
        ensure!(status.last_failure.as_ref().is_some_and(|f| f.kind == kind), "{status:?}");
        let records = run.records("the refusal", |r| r.streams.first().is_some_and(|s| s.refused.is_some())).await?;
        let refused = records.streams[0].refused.as_ref().context("refused")?;
        ensure!(refused.code == code, "{refused:?}");
        run.stop().await;
    }
    Ok(())
}

/// One stream opened by hand: `headers`, then `first` as the first request; what istiod
/// answered (`Ok` = a first response came).
async fn raw_stream(
    istiod: &FakeIstiod,
    headers: &[(&'static str, &str)],
    first: client_proto::DeltaDiscoveryRequest,
) -> Result<Result<(), tonic::Status>> {
    use client_proto::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(istiod.root_pem())).domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://localhost:{}", istiod.addr().port()))?
        .tls_config(tls)?
        .connect()
        .await?;
    let mut request = tonic::Request::new(futures::stream::iter([first]).chain(futures::stream::pending()));
    for (k, v) in headers {
        request.metadata_mut().insert(*k, v.parse()?);
    }
    let answer = async {
        let mut responses =
            AggregatedDiscoveryServiceClient::new(channel).delta_aggregated_resources(request).await?.into_inner();
        responses.message().await.map(|_| ())
    };
    Ok(tokio::time::timeout(WAIT, answer).await?)
}

/// One stream opened by hand against a gate of the fake.
struct Gate<'a> {
    what: &'a str,
    headers: Vec<(&'static str, &'a str)>,
    first: client_proto::DeltaDiscoveryRequest,
    /// The code istiod answers with; `None`: a first response.
    want: Option<Code>,
}

fn first_request(node_id: Option<&str>) -> client_proto::DeltaDiscoveryRequest {
    client_proto::DeltaDiscoveryRequest {
        node: node_id.map(|id| client_proto::Node { id: id.into(), metadata: None }),
        type_url: ADDRESS_TYPE.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn each_gate_of_the_fake_refuses_with_istiods_code() -> Result<()> {
    init_logs();
    let istiod = fake_istiod().await?;
    let good = Some("ztunnel~10.0.0.1~mp.istio-system~istio-system.svc.cluster.local");
    let bearer = format!("Bearer {TOKEN}");
    let (token, cluster) = (("authorization", bearer.as_str()), ("clusterid", CLUSTER));
    let gate = |what, headers, node, want| Gate { what, headers, first: first_request(node), want };
    let cases = [
        gate("all good", vec![token, cluster], good, None),
        gate("no token", vec![cluster], good, Some(Code::Unauthenticated)),
        gate("unknown token", vec![("authorization", "Bearer nope"), cluster], good, Some(Code::Unauthenticated)),
        gate("no clusterid", vec![token], good, Some(Code::Unauthenticated)),
        gate("other cluster", vec![token, ("clusterid", "c2")], good, Some(Code::Unauthenticated)),
        gate("no node", vec![token, cluster], None, Some(Code::InvalidArgument)),
        gate("malformed node id", vec![token, cluster], Some("ztunnel~10.0.0.1"), Some(Code::InvalidArgument)),
        gate(
            "another namespace",
            vec![token, cluster],
            Some("ztunnel~10.0.0.1~mp.lab~lab.svc.cluster.local"),
            Some(Code::PermissionDenied),
        ),
    ];
    for Gate { what, headers, first, want } in cases {
        let got = raw_stream(&istiod, &headers, first).await.with_context(|| what.to_owned())?;
        match (got, want) {
            (Ok(()), None) => {}
            (Err(status), Some(code)) if status.code() == code => {}
            (got, want) => bail!("{what}: got {got:?}, want {want:?}"),
        }
    }
    let records = istiod.xds.records();
    let codes: Vec<Option<Code>> = records.streams.iter().map(|s| s.refused.as_ref().map(|r| r.code)).collect();
    ensure!(codes.len() == 8 && codes[0].is_none() && codes[1..].iter().all(Option::is_some), "{codes:?}");
    istiod.stop().await;
    Ok(())
}
