//! Istio's ztunnel on the lab's fake istiod: the real peer checks the fake. Needs a ztunnel
//! binary (the one in `../shared/peers/ztunnel/`), so it is ignored by default;
//! `cargo xtask interop` runs it beside tests/interop.rs, or by hand (root: it makes a
//! network namespace):
//!
//! ```text
//! MESHPATH_ZTUNNEL=/path/to/ztunnel cargo test -p meshpath-lab --test istiod_ztunnel -- --ignored
//! ```
//!
//! The fake (xDS and CA on one TLS listener) and ztunnel run in a namespace of their own with
//! only a loopback. The fake's cluster: node `n1` runs the node proxy (`istio-system/ztunnel`,
//! pod `ztunnel-n1`) and pods `lab/a` (in service `web`) and `lab/d`; node `n2` runs `lab/b`;
//! one ALLOW policy in `lab`.
//!
//! 1. **Dedicated mode** (ztunnel as pod a's own proxy, with pod a's token, as a sidecar or VM
//!    runs it): its `/config_dump` holds the fake's workloads, service and policy, it ACKed
//!    every push, and the leaf it serves on 15008 is the one the fake's CA logged.
//! 2. **Shared mode** (the node proxy, with the node's token): without istio-cni's socket it
//!    serves no pod, but it still asks the CA for the identity of every HBONE pod of its node as
//!    soon as xDS names them (`cert_fetcher.rs`, prefetch). Those `CreateCertificate` calls are
//!    compared field by field with meshpath's `IstiodCa` asking the same fake for the same
//!    identity.
//!
//! Nothing here is set from ztunnel's test CA (`FAKE_CA` is not set): every certificate comes
//! from the fake.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use meshpath::identity::istiod::{IstiodCa, IstiodCaArgs};
use meshpath::identity::{CertificateProvider, Identity};
use meshpath::sync::lock;
use meshpath::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use meshpath_lab::istiod::FakeIstiod;
use meshpath_lab::istiod::auth::Account;
use meshpath_lab::istiod::ca::{CaSettings, Caller, CsrRecord, FakeCa, LabPod};
use meshpath_lab::istiod::proto::istio::security::{Action, Clause, Match, Rule, Scope, StringMatch, string_match};
use meshpath_lab::istiod::xds::{self as fake, Records, RequestKind};
use meshpath_lab::lab::LAB_PREFIX;
use meshpath_lab::traffic;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

/// Not ztunnel's default (`Kubernetes`): what it sends and shows comes from its settings.
const CLUSTER: &str = "lab-cluster";
const TD: &str = "cluster.local";
const NODE: &str = "n1";
const NS: &str = "lab";
/// istiod's port, ztunnel's admin and HBONE ports.
const ISTIOD_PORT: u16 = 15012;
const ADMIN_PORT: u16 = 15000;
const HBONE_PORT: u16 = 15008;
const WAIT: Duration = Duration::from_secs(30);
/// The node proxy's token (pod `istio-system/ztunnel-n1`) and pod a's.
const NODE_TOKEN: &str = "token-of-ztunnel-n1";
const POD_A_TOKEN: &str = "token-of-pod-a";
const SERVICE_HOST: &str = "web.lab.svc.cluster.local";
const POLICY: &str = "allow-b-to-web";

/// The lab's pods: name, service account, node, IP.
const PODS: [(&str, &str, &str, [u8; 4]); 3] =
    [("a", "sa-a", "n1", [10, 244, 1, 2]), ("d", "sa-d", "n1", [10, 244, 1, 3]), ("b", "sa-b", "n2", [10, 244, 2, 2])];

fn pod_ip(name: &str) -> IpAddr {
    let ip = PODS.iter().find(|p| p.0 == name).map_or([0; 4], |p| p.3);
    IpAddr::V4(Ipv4Addr::from(ip))
}

fn identity(sa: &str) -> Identity {
    Identity::new(TD, NS, sa)
}

/// A principal as istiod sends it in a policy: the identity without `spiffe://` (ztunnel's
/// `src/rbac.rs`, `matches_principal`, strips it from the peer's identity before matching).
fn principal(sa: &str) -> String {
    identity(sa).to_string().trim_start_matches("spiffe://").to_owned()
}

/// A network namespace with only a loopback, removed when dropped.
struct Netns(String);

impl Netns {
    fn create() -> Result<Self> {
        // Named as the lab names its own: if this process dies, `meshpath-lab cleanup` (run
        // by `cargo xtask interop` before and after) removes it and kills what runs in it.
        let name = format!("{LAB_PREFIX}{}xiz", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Self(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.0]) {
            eprintln!("removing network namespace {}: {e:#}", self.0);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

#[test]
#[ignore = "needs a ztunnel binary: MESHPATH_ZTUNNEL (and root)"]
fn ztunnel_runs_on_the_fake_istiod_and_asks_for_certificates_as_meshpath_does() -> Result<()> {
    let binary = PathBuf::from(
        std::env::var_os("MESHPATH_ZTUNNEL").context("MESHPATH_ZTUNNEL is not set (see the top of this file)")?,
    );
    let dir = tempfile::Builder::new().prefix("meshpath-istiod-ztunnel-").tempdir()?;
    let netns = Netns::create()?;
    let ns = netns.0.clone();
    // The whole test (the fake, the clients) runs on one thread inside the namespace.
    traffic::in_netns(&ns, || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(run(&ns, &binary, dir.path()))
    })?
}

async fn run(ns: &str, binary: &Path, dir: &Path) -> Result<()> {
    let (istiod, ca) = fake_istiod().await?;
    seed(&istiod);
    std::fs::write(dir.join("root-cert.pem"), istiod.root_pem())?;
    std::fs::write(dir.join("pod-a-token"), POD_A_TOKEN)?;
    std::fs::write(dir.join("node-token"), NODE_TOKEN)?;
    dedicated(ns, binary, dir, &istiod, &ca).await?;
    shared(ns, binary, dir, &istiod, &ca).await?;
    istiod.stop().await;
    Ok(())
}

/// The fake: the node proxy's and pod a's tokens, for xDS and for the CA; the CA knows the
/// lab's pods and where they run.
async fn fake_istiod() -> Result<(FakeIstiod, FakeCa)> {
    let builder = FakeIstiod::builder(CLUSTER)?
        .token(NODE_TOKEN, Account::new("istio-system", "ztunnel"))
        .token(POD_A_TOKEN, Account::new(NS, "sa-a"));
    let mut settings = CaSettings::new(builder.root().pem(), &builder.root().key_pem());
    settings.cluster_id = CLUSTER.into();
    settings.tokens.insert(NODE_TOKEN.into(), Caller::new("istio-system", "ztunnel", "ztunnel-n1"));
    settings.tokens.insert(POD_A_TOKEN.into(), Caller::new(NS, "sa-a", "a"));
    settings.pods = std::iter::once(LabPod::new("istio-system", "ztunnel-n1", "ztunnel", NODE))
        .chain(PODS.iter().map(|&(name, sa, node, _)| LabPod::new(NS, name, sa, node)))
        .collect();
    let ca = FakeCa::new(settings)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, ISTIOD_PORT)).await?;
    Ok((builder.ca(ca.clone()).serve(listener)?, ca))
}

/// The pods, the service (pod a behind it) and a policy letting b reach web's port.
fn seed(istiod: &FakeIstiod) {
    let service_key = format!("{NS}/{SERVICE_HOST}");
    for &(name, sa, node, _) in &PODS {
        let w = fake::workload(&fake::pod_uid(CLUSTER, NS, name), NS, name, sa, node, &[pod_ip(name)]);
        let w = if name == "a" { fake::in_service(w, &service_key, &[(80, 8080)]) } else { w };
        istiod.xds.put(w);
    }
    let vip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
    istiod.xds.put(fake::service(NS, "web", SERVICE_HOST, &[vip], &[(80, 8080)]));
    let from_b = Match {
        principals: vec![StringMatch { match_type: Some(string_match::MatchType::Exact(principal("sa-b"))) }],
        destination_ports: vec![8080],
        ..Default::default()
    };
    let rule = Rule { clauses: vec![Clause { matches: vec![from_b] }] };
    istiod.xds.put(fake::authorization(NS, POLICY, Scope::Namespace, Action::Allow, vec![rule]));
}

/// ztunnel as pod a's own proxy.
async fn dedicated(ns: &str, binary: &Path, dir: &Path, istiod: &FakeIstiod, ca: &FakeCa) -> Result<()> {
    let env = [
        ("PROXY_MODE", "dedicated".to_owned()),
        ("PROXY_WORKLOAD_INFO", format!("{NS}/a/sa-a")),
        // istiod takes the node's namespace from these and refuses one that is not the
        // token's (pilot/pkg/xds/auth.go): a dedicated proxy runs in its pod's namespace.
        ("POD_NAME", "a".to_owned()),
        ("POD_NAMESPACE", NS.to_owned()),
        ("INSTANCE_IP", pod_ip("a").to_string()),
        ("AUTH_TOKEN", dir.join("pod-a-token").display().to_string()),
    ];
    let mut z = Ztunnel::start(ns, binary, dir, "dedicated", &env).await?;
    let stream = z.acked_every_push(istiod, &format!("ztunnel~{}~a.{NS}~{NS}.svc.cluster.local", pod_ip("a"))).await?;
    println!("dedicated: xDS stream {stream} ACKed every push of both types");

    // Its inbound listener needs pod a's certificate: a TLS hello makes it ask for it.
    let leaf = z.check(served_leaf().await).context("reading the leaf ztunnel serves on 15008")?;
    let serial = leaf_serial(&leaf)?;
    let records = ca.records();
    let record = records
        .iter()
        .find(|r| r.serial.as_deref() == Some(serial.hex.as_str()))
        .with_context(|| format!("the leaf served ({}) is not in the fake's CSR log: {records:#?}", serial.hex))?;
    ensure!(record.code == Code::Ok && record.caller.as_deref() == Some("lab/sa-a"), "{record:?}");
    ensure!(record.impersonated.is_none(), "a dedicated proxy asks for its own identity: {record:?}");
    ensure!(record.issued.as_deref() == Some(identity("sa-a").to_string().as_str()), "{record:?}");
    println!(
        "dedicated: the leaf served on 15008 has serial {} ({}), as the fake's CA logged",
        serial.hex, serial.decimal
    );

    let dump = z.config_dump_holding(&[identity("sa-a")]).await?;
    check_mesh(&dump)?;
    check_certificates(&dump, &records, &[identity("sa-a")])?;
    print_dump("dedicated", &dump);
    pushed_mid_run(&mut z, istiod).await?;
    // The one expected: the test's own TLS hello came without a client certificate.
    z.stop_quietly("dedicated", &["NoCertificatesPresented"])
}

/// A workload added and the policy removed while ztunnel runs: ACKed, and its dump follows.
async fn pushed_mid_run(z: &mut Ztunnel, istiod: &FakeIstiod) -> Result<()> {
    let e = fake::pod_uid(CLUSTER, NS, "e");
    let ip = IpAddr::V4(Ipv4Addr::new(10, 244, 2, 9));
    istiod.xds.put(fake::workload(&e, NS, "e", "sa-e", "n2", &[ip]));
    ensure!(istiod.xds.remove(AUTHORIZATION_TYPE, &format!("{NS}/{POLICY}")), "the fake had no policy to remove");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let dump = z.config_dump().await?;
        let has = |key: &str, f: &dyn Fn(&Value) -> bool| dump[key].as_array().is_some_and(|l| l.iter().any(f));
        let workload = has("workloads", &|w| w["uid"] == e.as_str());
        let policy = has("policies", &|p| p["name"] == POLICY);
        if workload && !policy {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "after the push, workload e: {workload}, policy still there: {policy}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let node_id = format!("ztunnel~{}~a.{NS}~{NS}.svc.cluster.local", pod_ip("a"));
    let stream = z.acked_every_push(istiod, &node_id).await?;
    let removal = istiod.xds.records().responses.iter().any(|r| r.stream == stream && !r.removed.is_empty());
    ensure!(removal, "the fake sent no removal on stream {stream}");
    println!("dedicated: a workload added and the policy removed mid-run: ACKed, and the dump follows");
    Ok(())
}

/// ztunnel as the node proxy of n1, without istio-cni.
async fn shared(ns: &str, binary: &Path, dir: &Path, istiod: &FakeIstiod, ca: &FakeCa) -> Result<()> {
    let before = ca.records().len();
    let env = [
        ("PROXY_MODE", "shared".to_owned()),
        ("POD_NAME", "ztunnel-n1".to_owned()),
        ("POD_NAMESPACE", "istio-system".to_owned()),
        ("INSTANCE_IP", "10.0.0.1".to_owned()),
        ("AUTH_TOKEN", dir.join("node-token").display().to_string()),
        // No istio-cni here: the socket it would listen on does not exist (ztunnel keeps
        // retrying it, and is never ready, but its xDS and certificates work).
        ("INPOD_UDS", dir.join("no-istio-cni.sock").display().to_string()),
    ];
    let mut z = Ztunnel::start(ns, binary, dir, "shared", &env).await?;
    z.acked_every_push(istiod, "ztunnel~10.0.0.1~ztunnel-n1.istio-system~istio-system.svc.cluster.local").await?;
    // The HBONE pods of n1 (a and d), never b (on n2).
    let on_node = [identity("sa-a"), identity("sa-d")];
    let asked = |records: &[CsrRecord]| -> Vec<String> {
        records[before..].iter().filter(|r| r.code == Code::Ok).filter_map(|r| r.impersonated.clone()).collect()
    };
    let records = z
        .wait("certificates for n1's pods", || {
            let records = ca.records();
            on_node.iter().all(|id| asked(&records).contains(&id.to_string())).then_some(records)
        })
        .await?;
    let ztunnel_records = &records[before..];
    let all_asked: std::collections::BTreeSet<String> = ztunnel_records.iter().flat_map(|r| r.asked.clone()).collect();
    let want: std::collections::BTreeSet<String> = on_node.iter().map(Identity::to_string).collect();
    ensure!(all_asked == want, "ztunnel asked for {all_asked:?}, not the HBONE pods of its node {want:?}");
    for r in ztunnel_records {
        println!(
            "shared: ztunnel asked for {:?} (impersonating {:?}): {:?}, serial {:?}",
            r.asked, r.impersonated, r.code, r.serial
        );
    }
    let dump = z.config_dump_holding(&on_node).await?;
    check_certificates(&dump, &records, &on_node)?;
    // The one expected: no istio-cni socket.
    z.stop_quietly("shared", &["failed to connect to the Istio CNI node agent"])?;

    let theirs = ztunnel_records
        .iter()
        .find(|r| r.code == Code::Ok && r.impersonated.as_deref() == Some(identity("sa-a").to_string().as_str()))
        .context("no certificate for pod a")?
        .clone();
    let ours = meshpath_asks(dir, ca, &identity("sa-a")).await?;
    compare(&theirs, &ours)
}

/// meshpath's `IstiodCa`, with its defaults and the node's token, asks the fake for `id`;
/// returns what the fake logged of the call.
async fn meshpath_asks(dir: &Path, ca: &FakeCa, id: &Identity) -> Result<CsrRecord> {
    /// meshpath's own settings parser: its defaults (the lifetime asked) are the daemon's.
    #[derive(Parser)]
    struct Settings {
        #[command(flatten)]
        ca: IstiodCaArgs,
    }
    let address = format!("https://{}", SocketAddr::from((Ipv4Addr::LOCALHOST, ISTIOD_PORT)));
    let root = dir.join("root-cert.pem").display().to_string();
    let mut args = Settings::try_parse_from(["meshpath", "--ca-address", &address, "--ca-root", &root])?.ca;
    args.cluster_id = CLUSTER.into();
    args.token = dir.join("node-token");
    let before = ca.records().len();
    let cert = IstiodCa::new(args)?.fetch(id).await?;
    let records = ca.records();
    let record = records[before..].last().context("meshpath's call is not in the fake's log")?.clone();
    ensure!(record.serial.as_deref() == Some(cert.serial().as_str()), "{record:?} vs {}", cert.serial());
    Ok(record)
}

/// Headers whose values may differ between the two clients, and why that is fine.
const DIFFERENT_HEADERS: [(&str, &str); 3] = [
    ("user-agent", "each client names its own gRPC library (istiod only logs it)"),
    ("grpc-timeout", "a client-side deadline: istiod only bounds its own work by it"),
    ("grpc-accept-encoding", "compression offered for answers; istiod answers uncompressed either way"),
];

/// ztunnel's `CreateCertificate` for an identity against meshpath's for the same one, field by
/// field: every field istiod reads must be the same; what may differ is printed with why.
fn compare(theirs: &CsrRecord, ours: &CsrRecord) -> Result<()> {
    let (tc, oc) = (theirs.csr.as_ref().context("ztunnel's CSR")?, ours.csr.as_ref().context("meshpath's CSR")?);
    let fields: [(&str, String, String); 12] = [
        ("caller (token's account)", format!("{:?}", theirs.caller), format!("{:?}", ours.caller)),
        ("CSR URI SANs", format!("{:?}", theirs.asked), format!("{:?}", ours.asked)),
        ("ImpersonatedIdentity", format!("{:?}", theirs.impersonated), format!("{:?}", ours.impersonated)),
        ("request metadata", format!("{:?}", theirs.metadata), format!("{:?}", ours.metadata)),
        ("validity_duration (s)", theirs.validity_duration.to_string(), ours.validity_duration.to_string()),
        ("CSR subject", format!("{:?}", tc.subject), format!("{:?}", oc.subject)),
        (
            "CSR key",
            format!("{} {:?}", tc.key_algorithm, tc.key_parameter),
            format!("{} {:?}", oc.key_algorithm, oc.key_parameter),
        ),
        ("CSR signature", tc.signature_algorithm.clone(), oc.signature_algorithm.clone()),
        ("CSR extensions (critical)", format!("{:?}", tc.extensions), format!("{:?}", oc.extensions)),
        ("CSR SANs (all kinds)", format!("{:?}", tc.sans), format!("{:?}", oc.sans)),
        ("CSR attributes", format!("{:?}", tc.attributes), format!("{:?}", oc.attributes)),
        (
            "answer (code, SAN issued)",
            format!("{:?} {:?}", theirs.code, theirs.issued),
            format!("{:?} {:?}", ours.code, ours.issued),
        ),
    ];
    let mut unequal = Vec::new();
    println!("shared: CreateCertificate, ztunnel vs meshpath:");
    for (name, t, o) in &fields {
        let mark = if t == o { "same" } else { "DIFFERENT" };
        println!("  {name}: {mark}: ztunnel {t} / meshpath {o}");
        if t != o {
            unequal.push(*name);
        }
    }
    unequal.extend(compare_headers(&theirs.headers, &ours.headers));
    ensure!(unequal.is_empty(), "ztunnel and meshpath differ on {unequal:?} (see above)");
    Ok(())
}

/// The calls' headers: the same names, the same values but for [`DIFFERENT_HEADERS`].
/// Returns the names that differ where they must not.
fn compare_headers(theirs: &BTreeMap<String, String>, ours: &BTreeMap<String, String>) -> Vec<&'static str> {
    let names: std::collections::BTreeSet<&String> = theirs.keys().chain(ours.keys()).collect();
    let mut unequal = Vec::new();
    for name in names {
        let (t, o) = (theirs.get(name), ours.get(name));
        let shown = |v: Option<&String>| match (name.as_str(), v) {
            // The token is the same file's: show that it is, not the token.
            ("authorization", Some(v)) => format!("Bearer <{} bytes>", v.len().saturating_sub(7)),
            (_, v) => format!("{v:?}"),
        };
        let why = DIFFERENT_HEADERS.iter().find(|(h, _)| h == name).map(|(_, why)| *why);
        match (t == o, why) {
            (true, _) => println!("  header {name}: same: {}", shown(t)),
            (false, Some(why)) => {
                println!(
                    "  header {name}: different, acceptable ({why}): ztunnel {} / meshpath {}",
                    shown(t),
                    shown(o)
                );
            }
            (false, None) => {
                println!("  header {name}: DIFFERENT: ztunnel {} / meshpath {}", shown(t), shown(o));
                unequal.push("a header (see above)");
            }
        }
    }
    unequal
}

/// The dump holds the fake's three workloads, its service and its policy, as sent.
fn check_mesh(dump: &Value) -> Result<()> {
    let list = |key: &str| dump.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
    let workloads = list("workloads");
    for &(name, sa, node, _) in &PODS {
        let uid = fake::pod_uid(CLUSTER, NS, name);
        let w = workloads
            .iter()
            .find(|w| w["uid"] == uid.as_str())
            .with_context(|| format!("no workload {uid} in the config dump: {workloads:#?}"))?;
        ensure!(w["serviceAccount"] == sa && w["node"] == node && w["name"] == name, "workload {uid}: {w:#}");
        ensure!(w["clusterId"] == CLUSTER, "workload {uid}'s cluster: {w:#}");
        ensure!(w["protocol"] == "HBONE", "workload {uid} is not HBONE: {w:#}");
    }
    let services = list("services");
    let web = services
        .iter()
        .find(|s| s["hostname"] == SERVICE_HOST)
        .with_context(|| format!("no service {SERVICE_HOST} in the config dump: {services:#?}"))?;
    ensure!(web["namespace"] == NS && web.to_string().contains("10.96.0.10"), "service: {web:#}");
    let policies = list("policies");
    let policy = policies
        .iter()
        .find(|p| p["name"] == POLICY && p["namespace"] == NS)
        .with_context(|| format!("no policy {NS}/{POLICY} in the config dump: {policies:#?}"))?;
    ensure!(policy.to_string().contains(&principal("sa-b")), "policy: {policy:#}");
    Ok(())
}

/// The dump's certificates for `ids` are available and are the leaves the fake logged.
fn check_certificates(dump: &Value, records: &[CsrRecord], ids: &[Identity]) -> Result<()> {
    let certs = dump.get("certificates").and_then(Value::as_array).cloned().unwrap_or_default();
    for id in ids {
        let c = certs
            .iter()
            .find(|c| c["identity"] == id.to_string().as_str())
            .with_context(|| format!("no certificate for {id} in the config dump: {certs:#?}"))?;
        ensure!(c["state"] == "Available", "{id}: {c:#}");
        let serial = c["certChain"][0]["serialNumber"].as_str().with_context(|| format!("{id}: {c:#}"))?;
        let logged = records.iter().filter_map(|r| r.leaf.as_deref()).map(leaf_serial).collect::<Result<Vec<_>>>()?;
        ensure!(
            logged.iter().any(|s| s.decimal == serial),
            "{id}: ztunnel holds serial {serial}, not one the fake's CA issued"
        );
        println!("config dump: {id} holds serial {serial}, issued by the fake");
    }
    Ok(())
}

/// The parts of a config dump the lead's note quotes.
fn print_dump(mode: &str, dump: &Value) {
    for key in ["workloads", "services", "policies"] {
        let text = serde_json::to_string_pretty(&dump[key]).unwrap_or_default();
        println!("{mode}: config_dump {key}:\n{text}");
    }
    let certs: Vec<Value> = dump["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let chain: Vec<&Value> =
                c["certChain"].as_array().into_iter().flatten().map(|x| &x["serialNumber"]).collect();
            serde_json::json!({"identity": c["identity"], "state": c["state"], "serials": chain})
        })
        .collect();
    println!("{mode}: config_dump certificates: {}", serde_json::to_string_pretty(&certs).unwrap_or_default());
}

/// A leaf's serial, as the fake logs it (hex) and as ztunnel dumps it (decimal).
struct Serial {
    hex: String,
    decimal: String,
}

fn leaf_serial(der: &[u8]) -> Result<Serial> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).context("parsing a leaf")?;
    Ok(Serial { hex: cert.tbs_certificate.raw_serial_as_string(), decimal: cert.tbs_certificate.serial.to_string() })
}

/// A running ztunnel; killed when dropped.
struct Ztunnel {
    child: Child,
    log: PathBuf,
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ztunnel {
    /// Starts ztunnel in `ns`, pointed at the fake, with `env` on top, and waits for its admin
    /// port. The environment is only what is given here (no FAKE_CA from the caller's).
    async fn start(ns: &str, binary: &Path, dir: &Path, mode: &str, env: &[(&str, String)]) -> Result<Self> {
        let istiod = format!("https://{}", SocketAddr::from((Ipv4Addr::LOCALHOST, ISTIOD_PORT)));
        let root = dir.join("root-cert.pem").display().to_string();
        let log = dir.join(format!("ztunnel-{mode}.log"));
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(binary)
            .arg("proxy")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs([
                ("XDS_ADDRESS", istiod.as_str()),
                ("CA_ADDRESS", istiod.as_str()),
                ("XDS_ROOT_CA", root.as_str()),
                ("CA_ROOT_CA", root.as_str()),
                ("CLUSTER_ID", CLUSTER),
                ("NODE_NAME", NODE),
                // No in-pod routing for spoofed sources here.
                ("ENABLE_ORIG_SRC", "false"),
                ("RUST_LOG", "info"),
            ])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd.spawn().context("starting ztunnel")?;
        let mut z = Self { child, log };
        z.admin_up().await?;
        Ok(z)
    }

    async fn admin_up(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.alive()?;
            if get(ADMIN_PORT, "/config_dump").await.is_ok() {
                return Ok(());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "ztunnel's admin port not up after {WAIT:?}{}",
                self.tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An error if ztunnel has exited, with its log.
    fn alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("ztunnel exited ({status}){}", self.tail());
        }
        Ok(())
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("; its log ({}) ends:\n{}", self.log.display(), lines[lines.len().saturating_sub(40)..].join("\n"))
    }

    /// `result`, with ztunnel's log on error.
    fn check<T>(&self, result: Result<T>) -> Result<T> {
        result.map_err(|e| e.context(self.tail()))
    }

    /// Polls `f` until it gives something, while ztunnel runs.
    async fn wait<T>(&mut self, what: &str, f: impl Fn() -> Option<T>) -> Result<T> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.alive()?;
            if let Some(v) = f() {
                return Ok(v);
            }
            ensure!(tokio::time::Instant::now() < deadline, "no {what} within {WAIT:?}{}", self.tail());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for ztunnel's stream (node `node_id`) to have subscribed to both types and ACKed
    /// every response it got; no NACK. Returns the stream's id.
    async fn acked_every_push(&mut self, istiod: &FakeIstiod, node_id: &str) -> Result<u64> {
        let records = self
            .wait("xDS stream with every push ACKed", || {
                let r = istiod.xds.records();
                let stream = r.streams.iter().rev().find(|s| s.node.as_ref().is_some_and(|n| n.id == node_id))?;
                all_acked(&r, stream.id).then(|| (r.clone(), stream.id))
            })
            .await;
        let (records, id) = match records {
            Ok(found) => found,
            Err(e) => bail!("{e:#}\nthe fake's xDS records: {:#?}", istiod.xds.records()),
        };
        let stream = records.stream(id).context("the stream")?;
        println!("xDS stream {id}: node {:?}, headers {:?}", stream.node, redacted(&stream.headers));
        Ok(id)
    }

    async fn config_dump(&self) -> Result<Value> {
        let body = self.check(get(ADMIN_PORT, "/config_dump").await)?;
        serde_json::from_str(&body).context("ztunnel's config dump is not JSON")
    }

    /// The config dump, once it shows a certificate for each of `ids` (ztunnel stores an
    /// answer a little after the CA sent it).
    async fn config_dump_holding(&mut self, ids: &[Identity]) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.alive()?;
            let dump = self.config_dump().await?;
            let certs = dump.get("certificates").and_then(Value::as_array).cloned().unwrap_or_default();
            let available = |id: &Identity| {
                certs.iter().any(|c| c["identity"] == id.to_string().as_str() && c["state"] == "Available")
            };
            if ids.iter().all(available) || tokio::time::Instant::now() >= deadline {
                return Ok(dump);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops ztunnel: an error if it logged a warning or error other than the `expected` ones
    /// (a resource it could not take, a certificate it refused, ...).
    fn stop_quietly(self, mode: &str, expected: &[&str]) -> Result<()> {
        let complaints = self.stop()?;
        let (known, other): (Vec<_>, Vec<_>) = complaints.iter().partition(|l| expected.iter().any(|e| l.contains(e)));
        println!("{mode}: ztunnel logged {} expected warnings ({expected:?})", known.len());
        ensure!(other.is_empty(), "{mode}: ztunnel complained: {other:#?}");
        Ok(())
    }

    /// Stops ztunnel; returns the warnings and errors it logged.
    fn stop(mut self) -> Result<Vec<String>> {
        self.child.kill()?;
        self.child.wait()?;
        let text = std::fs::read_to_string(&self.log)?;
        // Lines are `<time>\t<level>\t<target>\t<message>`.
        let complaint = |l: &&str| l.split('\t').nth(1).is_some_and(|level| level == "warn" || level == "error");
        Ok(text.lines().filter(complaint).map(str::to_owned).collect())
    }
}

/// Both types subscribed on stream `id`, every response ACKed, none NACKed.
fn all_acked(r: &Records, id: u64) -> bool {
    let subscribed =
        |t: &str| r.requests_of(id).any(|q| q.type_url == t && matches!(q.kind, RequestKind::Subscribe { .. }));
    let responses: Vec<_> = r.responses.iter().filter(|s| s.stream == id).collect();
    subscribed(ADDRESS_TYPE)
        && subscribed(AUTHORIZATION_TYPE)
        && !responses.is_empty()
        && responses.iter().all(|s| {
            let answers = r.answers_to(&s.nonce);
            answers.iter().any(|a| matches!(a, RequestKind::Ack { .. }))
                && !answers.iter().any(|a| matches!(a, RequestKind::Nack { .. }))
        })
}

fn redacted(headers: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut h = headers.clone();
    if let Some(v) = h.get_mut("authorization") {
        *v = "Bearer <token>".into();
    }
    h
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0: the answer ends with the connection); the body
/// of a 200.
async fn get(port: u16, path: &str) -> Result<String> {
    let exchange = async {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), exchange).await.context("timed out")??;
    let text = String::from_utf8(buf).context("not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    ensure!(head.lines().next().is_some_and(|l| l.contains(" 200 ")), "GET {path}: {head}");
    Ok(body.to_owned())
}

/// The leaf ztunnel presents on its HBONE port. Only read, never trusted: its serial is
/// checked against the fake's log.
async fn served_leaf() -> Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let catcher = Arc::new(LeafCatcher { leaf: Mutex::default(), provider: provider.clone() });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(catcher.clone())
        .with_no_client_auth();
    let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, HBONE_PORT)).await?;
    let name = rustls::pki_types::ServerName::from(IpAddr::V4(Ipv4Addr::LOCALHOST));
    // ztunnel wants a client certificate and will end the handshake without one: the
    // server's certificate has been seen by then, whatever the outcome.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let outcome = tokio::time::timeout(WAIT, connector.connect(name, tcp)).await.map(|r| r.map(|_| ()));
    let leaf = lock(&catcher.leaf).clone();
    leaf.with_context(|| format!("no certificate presented (handshake: {outcome:?})"))
}

/// Keeps the server's leaf; accepts any (the test checks it against the fake's log instead).
#[derive(Debug)]
struct LeafCatcher {
    leaf: Mutex<Option<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for LeafCatcher {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *lock(&self.leaf) = Some(end_entity.to_vec());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
