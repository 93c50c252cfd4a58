//! The lab's traffic matrix: real connections in every direction that matters, each checked
//! against the evidence the proxies recorded. Used by `meshpath lab --smoke` and the tests.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use crate::capture::{Capture, TlsEvidence, tls_evidence};
use crate::frontends::{self, Kind};
use crate::lab::{Lab, LabError, Result};
use crate::traffic::{self, EchoServer};
use meshpath::record::{self, ConnectionRecord};

/// Port the lab's echo servers listen on (besides the HBONE port).
pub const APP_PORT: u16 = 8080;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a refused path is given before it counts as blocked.
const BLOCKED_TIMEOUT: Duration = Duration::from_millis(1500);

/// Which proxies a connection is expected to pass: (node index, listener role).
pub type Hops = &'static [(usize, &'static str)];

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    pub v6: bool,
    pub port: u16,
    /// Dialed through this frontend of the node's NAT ([`frontends`]) instead of the pod's
    /// own address.
    pub via: Option<Kind>,
    pub expect: Expect,
}

#[derive(Clone, Debug)]
pub enum Expect {
    /// Delivered intact, through exactly these proxy hops, and the server sees the client's IP.
    Through(Hops),
    /// The connection must fail, and this node's proxy must have recorded the refusal
    /// (node index, outcome) of this very client.
    Refused(usize, record::Outcome),
    /// The connection must fail, and the datapath must have counted a spoof drop.
    Dropped,
}

/// An outcome row of the smoke table.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub scenario: Scenario,
    pub path: String,
    pub server_saw: String,
    pub ok: bool,
    pub detail: String,
}

/// The matrix `lab --smoke` runs.
pub fn matrix() -> Vec<Scenario> {
    use Expect::*;
    let s = |name, from, to, v6, port, expect| Scenario { name, from, to, v6, port, via: None, expect };
    let nat = |name, from, v6, kind, expect| Scenario {
        name,
        from,
        to: frontends::TARGET,
        v6,
        port: APP_PORT,
        via: Some(kind),
        expect,
    };
    // Clients on the other node through node 1's own addresses are in tests/frontends.rs
    // (behind flannel they arrive masqueraded, which this table does not follow).
    let plain_in: Hops = &[(0, "inbound_plain")];
    vec![
        s(
            "enrolled -> enrolled, other node (HBONE)",
            "a",
            "c",
            false,
            APP_PORT,
            Through(&[(0, "outbound"), (1, "hbone")]),
        ),
        s(
            "enrolled -> enrolled, other node (HBONE v6)",
            "a",
            "c",
            true,
            APP_PORT,
            Through(&[(0, "outbound"), (1, "hbone")]),
        ),
        s("enrolled -> enrolled, back (HBONE)", "c", "a", false, APP_PORT, Through(&[(1, "outbound"), (0, "hbone")])),
        s("enrolled -> enrolled, same node", "a", "e", false, APP_PORT, Through(&[(0, "outbound")])),
        s("enrolled -> enrolled, same node (v6)", "e", "a", true, APP_PORT, Through(&[(0, "outbound")])),
        s("enrolled -> enrolled :15008 (self-call)", "a", "c", false, 15008, Refused(1, record::Outcome::SelfCall)),
        s("enrolled -> plain, other node", "a", "d", false, APP_PORT, Through(&[(0, "outbound")])),
        s("enrolled -> plain, same node", "a", "b", false, APP_PORT, Through(&[(0, "outbound")])),
        s("enrolled -> plain, same node (v6)", "a", "b", true, APP_PORT, Through(&[(0, "outbound")])),
        s("plain -> enrolled, same node", "b", "a", false, APP_PORT, Through(&[(0, "inbound_plain")])),
        s("plain -> enrolled, other node", "d", "a", false, APP_PORT, Through(&[(0, "inbound_plain")])),
        s("plain -> enrolled, other node (v6)", "d", "a", true, APP_PORT, Through(&[(0, "inbound_plain")])),
        s("plain -> enrolled, strict node", "d", "c", false, APP_PORT, Refused(1, record::Outcome::PlaintextRefused)),
        s(
            "plain -> enrolled, strict node, other node",
            "b",
            "c",
            false,
            APP_PORT,
            Refused(1, record::Outcome::PlaintextRefused),
        ),
        s("plain -> plain, other node", "b", "d", false, APP_PORT, Through(&[])),
        nat("plain -> enrolled via ClusterIP, same node", "b", false, Kind::ClusterIp, Through(plain_in)),
        nat("plain -> enrolled via ClusterIP, other node (v6)", "d", true, Kind::ClusterIp, Through(plain_in)),
        nat("plain -> enrolled via NodePort, same node (v6)", "b", true, Kind::NodePort, Through(plain_in)),
        nat("plain -> enrolled via LoadBalancer, same node", "b", false, Kind::LoadBalancer, Through(plain_in)),
        nat("plain -> enrolled via externalIP, same node (v6)", "b", true, Kind::ExternalIp, Through(plain_in)),
        nat("plain -> enrolled via hostPort, same node", "b", false, Kind::HostPort, Through(plain_in)),
        nat("enrolled -> enrolled via NodePort, same node", "e", false, Kind::NodePort, Through(&[(0, "outbound")])),
    ]
}

/// Echo servers on every pod, on the app port and the HBONE port.
pub fn start_servers(lab: &Lab) -> Result<Vec<EchoServer>> {
    let mut servers = Vec::new();
    for p in &lab.pods {
        for port in [APP_PORT, 15008] {
            servers.push(EchoServer::start(&p.netns, port)?);
        }
    }
    Ok(servers)
}

/// Runs one scenario and checks it against the access logs.
pub fn run(lab: &Lab, sc: &Scenario) -> Result<Outcome> {
    let from = lab.pod(sc.from);
    // Through a frontend, the records name the pod it was turned to.
    let dst = lab.addr(sc.to, sc.v6, sc.port);
    let dialed = sc.via.map_or(dst, |k| k.addr(lab, sc.v6));
    let payload = traffic::payload(64 * 1024 + 17);
    // The refusing proxy records the accept time, which comes after this.
    let started_ms = now_ms();
    let res = traffic::exchange(&from.netns, None, dialed, &payload, CONNECT_TIMEOUT);
    let mut out =
        Outcome { scenario: sc.clone(), path: String::new(), server_saw: "-".into(), ok: false, detail: String::new() };
    match (&sc.expect, res) {
        (Expect::Refused(node, want), Err(e)) => {
            // Evidence of this client's refusal, not just any failure: the record the
            // refusing proxy wrote for it since the attempt began.
            let client = from.addr(sc.v6);
            let found = lab.wait_record(*node, Duration::from_secs(3), |r| {
                r.orig_dst == dst && r.src.ip() == client && r.start_ms >= started_ms && r.outcome == *want
            })?;
            out.path = format!("n{}: {want}", node + 1);
            out.ok = found.is_some();
            out.detail =
                if out.ok { e.to_string() } else { format!("failed ({e}) but node {} recorded no {want}", node + 1) };
        }
        (Expect::Dropped, _) => {
            out.path = "misused".into();
            out.detail = "drops are checked by spoof()".into();
        }
        (Expect::Refused(..), Ok(x)) => {
            out.path = "delivered".into();
            out.server_saw = x.server_saw.ip().to_string();
            out.detail = "expected the connection to fail".into();
        }
        (Expect::Through(_), Err(e)) => {
            out.path = "failed".into();
            out.detail = e.to_string();
        }
        (Expect::Through(hops), Ok(x)) => {
            out.server_saw = x.server_saw.ip().to_string();
            let (records, mut problems) = follow(lab, x.client, dst, hops)?;
            let path: Vec<String> = records.iter().map(|(n, r)| format!("n{}:{}", n + 1, r.listener)).collect();
            out.path = if path.is_empty() { "direct".into() } else { path.join(" > ") };
            check_security(lab, sc, &records, &mut problems);
            check_frontend(lab, sc, dialed, &records, &mut problems);
            if !x.echoed_intact {
                problems.push("payload came back altered".into());
            }
            if x.server_saw.ip() != x.client.ip() {
                problems.push(format!("server saw {} instead of the client {}", x.server_saw.ip(), x.client.ip()));
            }
            out.ok = problems.is_empty();
            out.detail = problems.join("; ");
        }
    }
    Ok(out)
}

/// The hops a connection took (node index, that node's record), and what looked wrong.
type Followed = (Vec<(usize, ConnectionRecord)>, Vec<String>);

/// Follows a connection through the proxies' access logs: the first hop is keyed by the
/// client's address, each further hop by the previous hop's upstream source.
fn follow(lab: &Lab, client: std::net::SocketAddr, dst: std::net::SocketAddr, hops: Hops) -> Result<Followed> {
    let mut path = Vec::new();
    let mut problems = Vec::new();
    let mut src = client;
    let mut srcs = vec![client];
    for (node, role) in hops {
        let found = lab.wait_record(*node, Duration::from_secs(3), |r| r.src == src && r.orig_dst == dst)?;
        match found {
            Some(r) => {
                check_record(&r, role, &mut problems);
                let next = r.upstream_src;
                path.push((*node, r));
                match next {
                    Some(u) => {
                        src = u;
                        srcs.push(u);
                    }
                    None => break,
                }
            }
            None => {
                problems.push(format!("no record on node {} of {src} -> {dst}", node + 1));
                break;
            }
        }
    }
    // Nothing else may have proxied it: no record of any hop's source on another node.
    for node in 0..lab.nodes.len() {
        if hops.iter().any(|(n, _)| *n == node) {
            continue;
        }
        if let Some(r) = lab.records(node)?.into_iter().find(|r| srcs.contains(&r.src) && r.orig_dst == dst) {
            problems.push(format!("unexpected hop n{}:{}", node + 1, r.listener));
        }
    }
    Ok((path, problems))
}

/// Identities and mTLS as the path implies: a tunnelled connection is mTLS on both hops and
/// the receiving side saw the client pod's own identity; anything else is not mTLS.
fn check_security(lab: &Lab, sc: &Scenario, records: &[(usize, ConnectionRecord)], problems: &mut Vec<String>) {
    let tunnelled = records.iter().any(|(_, r)| r.listener == "hbone");
    let want_src = lab.pod(sc.from).enrolled.then(|| lab.identity(sc.from).to_string());
    let want_dst = lab.pod(sc.to).enrolled.then(|| lab.identity(sc.to).to_string());
    for (node, r) in records {
        if r.mtls != tunnelled {
            problems.push(format!("n{}:{} recorded mtls={}", node + 1, r.listener, r.mtls));
        }
        if r.listener == "hbone" && r.src_identity != want_src {
            problems.push(format!("n{} saw client identity {:?}, want {want_src:?}", node + 1, r.src_identity));
        }
        if r.dst_identity.is_some() && r.dst_identity != want_dst {
            problems.push(format!(
                "n{}:{} destination identity {:?}, want {want_dst:?}",
                node + 1,
                r.listener,
                r.dst_identity
            ));
        }
    }
}

/// Through a frontend, the proxy on the node whose NAT turned the connection names the
/// address the client dialed. (A ClusterIP dialed from a pod of another node was turned on
/// that node, where no proxy saw it.)
fn check_frontend(
    lab: &Lab,
    sc: &Scenario,
    dialed: std::net::SocketAddr,
    records: &[(usize, ConnectionRecord)],
    problems: &mut Vec<String>,
) {
    let Some(kind) = sc.via else { return };
    let nat = kind.nat_node(lab, sc.from);
    if let Some((n, r)) = records.iter().find(|(n, _)| *n == nat)
        && r.frontend != Some(dialed)
    {
        problems.push(format!("n{}:{} names frontend {:?}, not {dialed}", n + 1, r.listener, r.frontend));
    }
}

fn check_record(r: &ConnectionRecord, role: &str, problems: &mut Vec<String>) {
    if r.listener != role {
        problems.push(format!("expected listener {role}, got {}", r.listener));
    }
    if r.outcome != record::Outcome::Ok {
        problems.push(format!("proxy outcome {}: {}", r.outcome, r.error.as_deref().unwrap_or("")));
    }
}

/// Sends a connection from `from` with a forged source address; passes when it fails and
/// the node counted a spoof drop.
pub fn spoof(lab: &Lab, name: &'static str, from: &'static str, forged: IpAddr, to: &'static str) -> Result<Outcome> {
    let sc = Scenario { name, from, to, v6: forged.is_ipv6(), port: APP_PORT, via: None, expect: Expect::Dropped };
    let node = lab.pod(from).node;
    let before = lab.counters(node)?.spoof_dropped;
    let res = traffic::exchange(
        &lab.pod(from).netns,
        Some(forged),
        lab.addr(to, forged.is_ipv6(), APP_PORT),
        b"x",
        BLOCKED_TIMEOUT,
    );
    let after = lab.counters(node)?.spoof_dropped;
    let mut out =
        Outcome { scenario: sc, path: String::new(), server_saw: "-".into(), ok: false, detail: String::new() };
    match res {
        Ok(x) => {
            out.path = "delivered".into();
            out.server_saw = x.server_saw.ip().to_string();
            out.detail = "a forged source got through".into();
        }
        Err(_) if after > before => {
            out.ok = true;
            out.path = format!("dropped on n{} (spoof_dropped +{})", node + 1, after - before);
        }
        Err(e) => {
            out.path = "failed".into();
            out.detail = format!("failed ({e}) but spoof_dropped did not move");
        }
    }
    Ok(out)
}

/// What one smoke run showed.
pub struct Smoke {
    pub outcomes: Vec<Outcome>,
    /// The underlay capture taken while enrolled pods talked across nodes.
    pub evidence: TlsEvidence,
}

/// Plaintext that must never show on the underlay while enrolled pods talk.
pub const MARKER: &[u8] = b"MESHPATH-PLAINTEXT-MARKER";

/// `n` concurrent connections a -> c while the underlay of node 1 is captured: each must
/// arrive intact with a's address, the underlay must carry TLS records only, and all of
/// them must share one HBONE connection.
pub fn hbone_evidence(lab: &Lab, n: usize) -> Result<(Vec<Outcome>, TlsEvidence)> {
    let capture = Capture::start(&lab.nodes[0].name, lab.topology.node_link())?;
    let payload: Vec<u8> = MARKER.iter().chain(traffic::payload(32 * 1024).iter()).chain(MARKER).copied().collect();
    let (a, dst) = (lab.pod("a").netns.clone(), lab.addr("c", false, APP_PORT));
    let results: Vec<std::io::Result<traffic::Exchange>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..n).map(|_| s.spawn(|| traffic::exchange(&a, None, dst, &payload, CONNECT_TIMEOUT))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("client thread panicked"))))
            .collect()
    });
    // Let the last ACKs and the close reach the capture.
    std::thread::sleep(Duration::from_millis(200));
    let evidence = tls_evidence(&capture.stop()?, MARKER);

    let row = |name: &'static str, ok: bool, path: String, detail: String| Outcome {
        scenario: Scenario {
            name,
            from: "a",
            to: "c",
            v6: false,
            port: APP_PORT,
            via: None,
            expect: Expect::Through(&[]),
        },
        path,
        server_saw: "-".into(),
        ok,
        detail,
    };
    let bad: Vec<String> = results
        .iter()
        .filter_map(|r| match r {
            Ok(x) if x.echoed_intact && x.server_saw.ip() == x.client.ip() => None,
            Ok(x) => Some(format!("intact={} server saw {}", x.echoed_intact, x.server_saw)),
            Err(e) => Some(e.to_string()),
        })
        .collect();
    let mut rows = vec![row(
        "concurrent connections, intact",
        bad.is_empty(),
        format!("{}/{n} intact, client IP kept", n - bad.len()),
        bad.join("; "),
    )];
    let app = evidence.tls_records.get(&23).copied().unwrap_or(0);
    rows.push(row(
        "underlay carries TLS records only",
        evidence.tls_only() && app > 0,
        format!("{} TLS records, {} bytes", evidence.tls_records.values().sum::<usize>(), evidence.payload_bytes),
        evidence.summary(),
    ));
    rows.push(row(
        "concurrent connections share one TLS conn",
        evidence.hbone_flows == 1 && evidence.hbone_connects <= 1,
        format!("{n} streams on {} TLS connection(s)", evidence.hbone_flows),
        evidence.summary(),
    ));
    Ok((rows, evidence))
}

/// The whole smoke run: servers up, the HBONE evidence, every scenario (the node's NAT
/// frontends installed first), the spoof check.
pub fn run_all(lab: &Lab) -> Result<Smoke> {
    let _servers = start_servers(lab)?;
    frontends::install(lab, APP_PORT)?;
    // First, while no HBONE connection exists yet, so its opening is in the capture.
    let (mut outcomes, evidence) = hbone_evidence(lab, 8)?;
    for sc in matrix() {
        outcomes.push(run(lab, &sc)?);
    }
    let a = lab.pod("a").clone();
    outcomes.push(spoof(lab, "spoofed source (b claims a's IP)", "b", a.v4, "c")?);
    // An enrolled pod using an address it is not enrolled with would escape capture.
    let unlisted: IpAddr = "10.244.1.99".parse().expect("valid");
    outcomes.push(spoof(lab, "enrolled pod, unlisted source IP", "a", unlisted, "d")?);
    outcomes.extend(policy_rows(lab)?);
    Ok(Smoke { outcomes, evidence })
}

/// Under istiod: an ALLOW policy of namespace `lab` naming a's identity only, pushed by
/// istiod; a passes, e (another identity) and d (plaintext) are denied at the destination.
/// The policy is removed afterwards.
fn policy_rows(lab: &Lab) -> Result<Vec<Outcome>> {
    use crate::istiod::proto::istio::security::{Action, Clause, Match, Rule, Scope, StringMatch, string_match};
    let Some(istiod) = &lab.istiod else { return Ok(Vec::new()) };
    let principal = format!("{}/ns/lab/sa/sa-a", Lab::TRUST_DOMAIN);
    let exact = StringMatch { match_type: Some(string_match::MatchType::Exact(principal)) };
    let rule =
        Rule { clauses: vec![Clause { matches: vec![Match { principals: vec![exact], ..Default::default() }] }] };
    let policy = crate::istiod::xds::authorization("lab", "only-a", Scope::Namespace, Action::Allow, vec![rule]);
    let (nodes, key) = (lab.node_pod_names(), "lab/only-a");
    let wait = Duration::from_secs(10);
    istiod.set_policy(&nodes, key, Some(policy), wait).map_err(LabError::Other)?;
    use Expect::*;
    let s = |name, from, to, expect| Scenario { name, from, to, v6: false, port: APP_PORT, via: None, expect };
    let mut rows = Vec::new();
    for sc in [
        s("policy: allowed principal -> enrolled", "a", "c", Through(&[(0, "outbound"), (1, "hbone")])),
        s("policy: other principal -> enrolled", "e", "c", Refused(1, record::Outcome::PolicyDenied)),
        s("policy: other principal, same node", "e", "a", Refused(0, record::Outcome::PolicyDenied)),
        s("policy: plaintext -> enrolled", "d", "a", Refused(0, record::Outcome::PolicyDenied)),
    ] {
        rows.push(run(lab, &sc)?);
    }
    istiod.set_policy(&nodes, key, None, wait).map_err(LabError::Other)?;
    Ok(rows)
}

/// A fixed-width table of outcomes.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:<52} {:<6} {:<36} {:<16} result", "scenario", "pods", "path (proxy hops)", "server saw");
    let _ = writeln!(s, "{}", "-".repeat(122));
    for o in outcomes {
        let _ = writeln!(
            s,
            "{:<52} {:<6} {:<36} {:<16} {}{}",
            o.scenario.name,
            format!("{}->{}", o.scenario.from, o.scenario.to),
            o.path,
            o.server_saw,
            if o.ok { "PASS" } else { "FAIL" },
            if o.detail.is_empty() || o.ok { String::new() } else { format!("  ({})", o.detail) }
        );
    }
    s
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
