//! `cargo xtask bench --policies`: what L4 authorization costs a new HBONE connection.
//!
//! The HBONE paths (meshpath-hbone; ztunnel-hbone with `MESHPATH_ZTUNNEL` set) run under the
//! lab's fake istiod ([`crate::lab_istiod`]), one lab per path and policy set:
//!
//! - **none**: no policy;
//! - **elsewhere**: [`PolicyConfig::count`] policies in other namespaces, or selecting other
//!   workloads: none applies to the destination, so evaluation must not look at them;
//! - **global-deny**: as many GLOBAL DENY policies (ztunnel's own `rbac` benchmark case):
//!   all apply to the destination, none matches the bench's connection, so each connection
//!   is evaluated against every one of them and still allowed.
//!
//! Before measuring, every policy is checked to be ACKed by every proxy of the lab, held
//! (meshpath's `policy` inspection; ztunnel's `/config_dump`), and the bench's connection
//! to be allowed. Configurations are measured in turn, round after round, in a rotating
//! order; each round's rate is compared with the same round's rate without policies.
//! The time of one `PolicyStore::evaluate` against each set is measured in-process too.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::paths::Setup;
use super::report::Stat;
use super::{CONCURRENCY, ECHO_PORT, PathKind, load_average};
use crate::istiod::proto::istio::security::string_match::MatchType;
use crate::istiod::proto::istio::security::{
    Action, Address, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
};
use crate::lab::{Lab, LabError, Result};
use crate::loadgen;

/// Where the policies' section of BENCHMARKS.md starts and ends (other runs keep it).
pub const SECTION_START: &str = "<!-- policies: written by `cargo xtask bench --policies` -->";
pub const SECTION_END: &str = "<!-- /policies -->";

/// Policies per xDS response while filling a lab (istiod pushes debounced batches).
const PUSH_BATCH: usize = 500;
/// How long the proxies get to ACK every policy.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// ztunnel's admin port (its `/config_dump`), in its pod's namespace.
const ZTUNNEL_ADMIN: u16 = 15000;
/// The root namespace: where istiod's GLOBAL policies live.
const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicySet {
    None,
    Elsewhere,
    GlobalDeny,
}

impl PolicySet {
    pub const ALL: [PolicySet; 3] = [PolicySet::None, PolicySet::Elsewhere, PolicySet::GlobalDeny];

    pub fn name(self) -> &'static str {
        match self {
            PolicySet::None => "none",
            PolicySet::Elsewhere => "elsewhere",
            PolicySet::GlobalDeny => "global-deny",
        }
    }

    /// The policies of this set, `count` of them (none for [`PolicySet::None`]).
    pub fn policies(self, count: usize) -> Vec<Authorization> {
        match self {
            PolicySet::None => Vec::new(),
            PolicySet::Elsewhere => (0..count).map(elsewhere).collect(),
            PolicySet::GlobalDeny => (0..count).map(global_deny).collect(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PolicyConfig {
    pub rounds: usize,
    /// Length of each measurement.
    pub duration: Duration,
    /// Policies in each non-empty set.
    pub count: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { rounds: 3, duration: Duration::from_secs(20), count: 10_000 }
    }
}

/// One configuration's figures from one round.
#[derive(Clone, Debug, Serialize)]
pub struct PolicySample {
    pub path: PathKind,
    pub set: PolicySet,
    pub round: usize,
    pub conn_per_s: f64,
    pub connections: u64,
    pub errors: u64,
    /// CPU time of the path's proxies (both together) per connection during the run, µs:
    /// with policies, the difference to the run without is what evaluating them costs.
    pub proxy_cpu_us_per_conn: Option<f64>,
    /// The path's proxies (both of them) after the round.
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
    /// The 1-minute load average at the end of the round.
    pub load1: Option<f64>,
}

/// In-process cost of one evaluation (`PolicyStore::evaluate`) against one set.
#[derive(Clone, Debug, Serialize)]
pub struct EvalTime {
    pub set: PolicySet,
    /// Policies that apply to the destination (the evaluation's candidates).
    pub candidates: usize,
    /// Median of the runs, ns per evaluation.
    pub ns_per_eval: f64,
    pub min_ns: f64,
    pub max_ns: f64,
}

/// Everything the policies' run measured.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyReport {
    pub samples: Vec<PolicySample>,
    pub eval: Vec<EvalTime>,
    /// What was checked of each lab before measuring, one line each.
    pub checks: Vec<String>,
    /// /proc/loadavg's 1, 5 and 15 minutes when the run started.
    pub load_at_start: String,
}

/// Words for the generated policies' namespaces, accounts and names.
const TEAMS: [&str; 20] = [
    "payments",
    "checkout",
    "catalog",
    "search",
    "billing",
    "ledger",
    "identity",
    "orders",
    "shipping",
    "inventory",
    "reviews",
    "ads",
    "media",
    "notify",
    "profile",
    "reports",
    "fraud",
    "pricing",
    "gateway",
    "analytics",
];
const ENVS: [&str; 4] = ["prod", "staging", "dev", "qa"];
const ACCOUNTS: [&str; 12] = [
    "frontend",
    "api",
    "worker",
    "cron",
    "batch",
    "ingest",
    "exporter",
    "db-proxy",
    "scheduler",
    "auth",
    "cache",
    "consumer",
];
/// Ports the generated policies name (none is a bench port).
const PORTS: [u32; 8] = [80, 443, 5432, 6379, 8080, 8443, 9090, 27017];

/// One of 400 namespaces that are none of the lab's (`lab`, `plain`) nor the root.
fn namespace(i: usize) -> String {
    format!("{}-{}-{}", TEAMS[i % TEAMS.len()], ENVS[(i / TEAMS.len()) % ENVS.len()], (i / 80) % 5)
}

fn account(i: usize) -> &'static str {
    ACCOUNTS[i % ACCOUNTS.len()]
}

fn exact(s: String) -> StringMatch {
    StringMatch { match_type: Some(MatchType::Exact(s)) }
}

/// A principal as istiod sends it: the SPIFFE ID without `spiffe://`.
fn principal(ns: &str, sa: &str) -> String {
    format!("{}/ns/{ns}/sa/{sa}", Lab::TRUST_DOMAIN)
}

/// A /24 in 172.16.0.0/12: no lab address is in it.
fn block(i: usize) -> Address {
    Address { address: vec![172, 16 + (i % 16) as u8, ((i / 16) % 256) as u8, 0], length: 24 }
}

fn clause(matches: Vec<Match>) -> Clause {
    Clause { matches }
}

/// The `k`-th rule of policy `i`: one of five shapes istiod produces from AuthorizationPolicy
/// `from`/`to` fields. None matches a connection from namespace `lab`, from a 10.244/16
/// address, as an account `sa-*`: each has a clause on a peer that is not the bench's. Some
/// shapes open with a clause the bench's connection does match (its port), so evaluation
/// goes past the first clause.
fn rule(i: usize, k: usize) -> Rule {
    let j = i * 7 + k * 13;
    let ns = namespace(j);
    let ports = |n: usize| (0..n).map(|x| PORTS[(j + x * 3) % PORTS.len()]).collect::<Vec<u32>>();
    let clauses = match (i + k) % 5 {
        // from: principals; to: ports.
        0 => vec![
            clause(vec![Match {
                principals: vec![exact(principal(&ns, account(j))), exact(principal(&ns, account(j + 1)))],
                ..Default::default()
            }]),
            clause(vec![Match { destination_ports: ports(1 + j % 2), ..Default::default() }]),
        ],
        // to: the bench's port among others (matches), then from: namespaces (does not).
        1 => vec![
            clause(vec![Match {
                destination_ports: vec![u32::from(ECHO_PORT), PORTS[j % PORTS.len()]],
                ..Default::default()
            }]),
            clause(vec![Match {
                namespaces: vec![
                    exact(ns.clone()),
                    StringMatch { match_type: Some(MatchType::Prefix(format!("{}-", TEAMS[j % TEAMS.len()]))) },
                ],
                ..Default::default()
            }]),
        ],
        // from: ipBlocks, notIpBlocks.
        2 => vec![clause(vec![Match {
            source_ips: vec![block(j), block(j + 1)],
            not_source_ips: vec![Address { address: vec![172, 16 + (j % 16) as u8, 255, 0], length: 24 }],
            ..Default::default()
        }])],
        // from: principals by suffix (any namespace), notNamespaces.
        3 => vec![clause(vec![Match {
            principals: vec![StringMatch { match_type: Some(MatchType::Suffix(format!("/sa/{}", account(j)))) }],
            not_namespaces: vec![exact("kube-system".into())],
            ..Default::default()
        }])],
        // from: service accounts; to: ports.
        _ => vec![
            clause(vec![Match {
                service_accounts: vec![
                    ServiceAccountMatch { namespace: ns.clone(), service_account: account(j + 2).into() },
                    ServiceAccountMatch { namespace: namespace(j + 1), service_account: account(j + 3).into() },
                ],
                ..Default::default()
            }]),
            clause(vec![Match { destination_ports: ports(2), ..Default::default() }]),
        ],
    };
    Rule { clauses }
}

/// 1–3 rules.
fn rules(i: usize) -> Vec<Rule> {
    (0..1 + (i * 5 + i / 7) % 3).map(|k| rule(i, k)).collect()
}

/// Policy `i` of the elsewhere set: in another namespace (two in three for the whole
/// namespace, one in three for selected workloads, which the destination's Workload never
/// names), one in five DENY.
fn elsewhere(i: usize) -> Authorization {
    let ns = namespace(i);
    let (scope, what) = if i % 3 == 2 { (Scope::WorkloadSelector, "workload") } else { (Scope::Namespace, "ns") };
    let (action, verb) = if i.is_multiple_of(5) { (Action::Deny, "deny") } else { (Action::Allow, "allow") };
    let name = format!("{verb}-{what}-{}-{}-{i}", account(i / 3), TEAMS[(i / 20) % TEAMS.len()]);
    Authorization { name, namespace: ns, scope: scope as i32, action: action as i32, rules: rules(i), dry_run: false }
}

/// Policy `i` of the global-deny set: GLOBAL (root namespace, no selector), DENY, matching
/// nothing the bench sends.
fn global_deny(i: usize) -> Authorization {
    Authorization {
        name: format!("deny-{}-{}-{i}", TEAMS[i % TEAMS.len()], account(i / 20)),
        namespace: ROOT_NAMESPACE.into(),
        scope: Scope::Global as i32,
        action: Action::Deny as i32,
        rules: rules(i),
        dry_run: false,
    }
}

/// Runs the policies' benchmark: every HBONE path available, every set.
pub fn run(binary: &Path, cfg: &PolicyConfig, mut progress: impl FnMut(&str)) -> Result<PolicyReport> {
    let load_at_start = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let kinds: Vec<PathKind> = PathKind::available()
        .into_iter()
        .filter(|k| matches!(k, PathKind::MeshpathHbone | PathKind::ZtunnelHbone))
        .collect();
    progress(&format!("timing PolicyStore::evaluate in-process ({} policies)", cfg.count));
    let eval = PolicySet::ALL.iter().map(|&set| eval_time(set, cfg.count)).collect::<Result<Vec<_>>>()?;
    let mut labs = Vec::new();
    let mut checks = Vec::new();
    for &kind in &kinds {
        for set in PolicySet::ALL {
            progress(&format!(
                "{}: building its lab under istiod, {} policies ({})",
                kind.name(),
                set.name(),
                cfg.count
            ));
            let setup = Setup::build_on_istiod(kind, binary)?;
            let check = fill(&setup, set, cfg.count)?;
            progress(&format!("{} / {}: {check}", kind.name(), set.name()));
            checks.push(format!("{} / {}: {check}", kind.name(), set.name()));
            labs.push((set, setup));
        }
    }
    let mut samples = Vec::new();
    for round in 0..cfg.rounds {
        for j in 0..labs.len() {
            let (set, setup) = &labs[(j + round) % labs.len()];
            progress(&format!("round {}/{}: {} with {}", round + 1, cfg.rounds, setup.kind.name(), set.name()));
            samples.push(measure(setup, *set, round, cfg.duration)?);
        }
    }
    for (_, s) in labs {
        s.teardown()?;
    }
    Ok(PolicyReport { samples, eval, checks, load_at_start })
}

/// Pushes `set` to the lab's proxies and checks it took: every policy ACKed by each proxy,
/// held, and the bench's connection allowed. Returns what was seen.
fn fill(s: &Setup, set: PolicySet, count: usize) -> Result<String> {
    let policies = set.policies(count);
    let n = policies.len();
    let proxies: Vec<String> = match s.kind {
        PathKind::ZtunnelHbone => vec!["pod-a".into(), "pod-c".into()],
        _ => s.lab.node_pod_names(),
    };
    let started = Instant::now();
    s.lab.istiod().set_policies(&proxies, policies, PUSH_BATCH, ACK_TIMEOUT).map_err(LabError::Other)?;
    let acked = started.elapsed();
    let held = match s.kind {
        PathKind::ZtunnelHbone => ztunnel_held(s)?,
        _ => meshpath_held(s, set, n)?,
    };
    // The bench's connection passes, with its byte echoed.
    let probe = loadgen::conn_rate(Some(&s.client_ns), s.echo_addr(), 1, Duration::from_millis(500))
        .map_err(|e| LabError::Other(format!("{}/{}: probe: {e}", s.kind.name(), set.name())))?;
    if probe.connections == 0 || probe.errors > 0 {
        return Err(LabError::Other(format!(
            "{}/{}: the bench's connection did not pass: {probe:?}",
            s.kind.name(),
            set.name()
        )));
    }
    Ok(format!(
        "{n} policies ACKed by {} in {:.1} s; {held}; a -> c:{ECHO_PORT} allowed ({} connections echoed)",
        proxies.join(" and "),
        acked.as_secs_f64(),
        probe.connections
    ))
}

/// Node 2's meshpath (c's) holds the set: as many policies apply to c as the set puts on it,
/// and it would let a reach c.
fn meshpath_held(s: &Setup, set: PolicySet, n: usize) -> Result<String> {
    let n2 = s.lab.nodes[1].name.clone();
    let c = s.lab.pod("c").v4;
    let c_text = c.to_string();
    let listed = s.lab.meshpath(1, &["policy", "--node", &n2, "-o", "json"])?;
    let listed: serde_json::Value =
        serde_json::from_str(&listed).map_err(|e| LabError::Other(format!("meshpath policy -o json: {e}")))?;
    let on_c = listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["ips"].as_array().is_some_and(|ips| ips.iter().any(|ip| ip.as_str() == Some(c_text.as_str()))))
        .and_then(|w| w["policies"].as_array().map(Vec::len))
        .unwrap_or(0);
    let want = if set == PolicySet::GlobalDeny { n } else { 0 };
    if on_c != want {
        return Err(LabError::Other(format!("node 2's meshpath applies {on_c} policies to c, not {want}")));
    }
    let to = SocketAddr::new(c, ECHO_PORT).to_string();
    let from = s.lab.pod("a").v4.to_string();
    let decision = s.lab.meshpath(1, &["policy", "--node", &n2, "--from", &from, "--to", &to])?;
    Ok(format!("node 2's meshpath applies {on_c} to c and says: {}", decision.trim()))
}

/// ztunnel of pod c holds every policy pushed (its `/config_dump`).
fn ztunnel_held(s: &Setup) -> Result<String> {
    let ns = s.lab.pod("c").netns.clone();
    let body = crate::traffic::in_netns(&ns, || -> std::io::Result<Vec<u8>> {
        let mut t = TcpStream::connect((Ipv4Addr::LOCALHOST, ZTUNNEL_ADMIN))?;
        t.set_read_timeout(Some(Duration::from_secs(30)))?;
        t.write_all(b"GET /config_dump HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut buf = Vec::new();
        t.read_to_end(&mut buf)?;
        Ok(buf)
    })??;
    let text = String::from_utf8_lossy(&body);
    let json = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let dump: serde_json::Value =
        serde_json::from_str(json).map_err(|e| LabError::Other(format!("ztunnel's /config_dump: {e}")))?;
    let held = dump["policies"].as_array().map(Vec::len).unwrap_or(0);
    Ok(format!("pod c's ztunnel's /config_dump lists {held} policies"))
}

/// One round of one configuration: the connection rate (every connection's byte echoed).
fn measure(s: &Setup, set: PolicySet, round: usize, d: Duration) -> Result<PolicySample> {
    let ns = Some(s.client_ns.as_str());
    let err = |what: &'static str| {
        move |e: loadgen::LoadError| LabError::Other(format!("{}/{}: {what}: {e}", s.kind.name(), set.name()))
    };
    loadgen::conn_rate(ns, s.echo_addr(), CONCURRENCY, Duration::from_secs(1)).map_err(err("warm-up"))?;
    let cpu_before = s.proxy_cpu();
    let conn = loadgen::conn_rate(ns, s.echo_addr(), CONCURRENCY, d).map_err(err("connection rate"))?;
    let cpu = s.proxy_cpu().zip(cpu_before).map(|(a, b)| a - b);
    Ok(PolicySample {
        path: s.kind,
        set,
        round,
        conn_per_s: conn.per_second,
        connections: conn.connections,
        errors: conn.errors,
        proxy_cpu_us_per_conn: cpu
            .filter(|_| conn.connections > 0)
            .map(|c| c.as_secs_f64() * 1e6 / conn.connections as f64),
        rss_kib: s.proxy_rss_kib(),
        fds: s.proxy_fds(),
        load1: load_average(),
    })
}

/// The bench's connection as the destination's proxy sees it: from a (`lab/sa-a`) to c's
/// echo port.
fn bench_connection(identity: &meshpath::identity::Identity) -> meshpath::policy::ConnectionFacts<'_> {
    meshpath::policy::ConnectionFacts {
        source_identity: Some(identity),
        source_ip: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10)),
        destination_ip: IpAddr::V4(Ipv4Addr::new(10, 244, 2, 10)),
        destination_port: ECHO_PORT,
    }
}

/// c as the policy store sees it: namespace `lab`, naming no policy.
const DESTINATION: meshpath::policy::DestinationView<'static> =
    meshpath::policy::DestinationView { namespace: "lab", policy_keys: &[] };

/// meshpath's policy store holding `set`, as meshpath takes it from xDS; an error if the
/// bench's connection would not be allowed (the set would then measure refusals).
fn store_of(set: PolicySet, count: usize) -> Result<meshpath::policy::PolicyStore> {
    use meshpath::policy::{Decision, Policy, PolicyStore};
    use prost::Message as _;
    let mut store = PolicyStore::default();
    for p in set.policies(count) {
        let key = format!("{}/{}", p.namespace, p.name);
        // The lab's generated type and meshpath's are two codegens of one proto: go by bytes.
        let wire = meshpath::xds::proto::istio::security::Authorization::decode(p.encode_to_vec().as_slice())
            .map_err(|e| LabError::Other(format!("policy {key}: {e}")))?;
        let policy = Policy::from_resource(&key, wire).map_err(|e| LabError::Other(format!("policy {key}: {e}")))?;
        store.insert(policy);
    }
    let identity = meshpath::identity::Identity::new(Lab::TRUST_DOMAIN, "lab", "sa-a");
    let verdict = store.evaluate(&bench_connection(&identity), DESTINATION);
    if verdict.decision != Decision::Allow {
        return Err(LabError::Other(format!("{}: the bench's connection would be {}", set.name(), verdict.decision)));
    }
    Ok(store)
}

/// The time of `PolicyStore::evaluate` for the bench's connection with `set` in the store:
/// the median of 7 runs of about 200 ms.
pub fn eval_time(set: PolicySet, count: usize) -> Result<EvalTime> {
    let store = store_of(set, count)?;
    let identity = meshpath::identity::Identity::new(Lab::TRUST_DOMAIN, "lab", "sa-a");
    let facts = bench_connection(&identity);
    let mut runs = Vec::new();
    for _ in 0..7 {
        let (started, mut n) = (Instant::now(), 0u64);
        while started.elapsed() < Duration::from_millis(200) {
            for _ in 0..16 {
                std::hint::black_box(store.evaluate(std::hint::black_box(&facts), DESTINATION));
            }
            n += 16;
        }
        runs.push(started.elapsed().as_nanos() as f64 / n as f64);
    }
    runs.sort_by(f64::total_cmp);
    Ok(EvalTime {
        set,
        candidates: store.candidates(DESTINATION).count(),
        ns_per_eval: runs[runs.len() / 2],
        min_ns: runs[0],
        max_ns: runs[runs.len() - 1],
    })
}

/// Each round's rate of `path` with `set` over the same round's rate without policies.
pub fn ratios(samples: &[PolicySample], path: PathKind, set: PolicySet) -> Vec<f64> {
    let rate = |set: PolicySet, round: usize| {
        samples.iter().find(|s| s.path == path && s.set == set && s.round == round).map(|s| s.conn_per_s)
    };
    let rounds = samples.iter().map(|s| s.round).max().map_or(0, |r| r + 1);
    (0..rounds)
        .filter_map(|r| match (rate(set, r), rate(PolicySet::None, r)) {
            (Some(with), Some(without)) if without > 0.0 => Some(with / without),
            _ => None,
        })
        .collect()
}

/// Median and range of `v` (empty: `None`).
fn spread(v: &[f64]) -> Option<Stat> {
    super::report::stat(&mut v.to_vec())
}

fn shown(s: Option<Stat>, digits: usize) -> String {
    s.map(|s| format!("{:.digits$} [{:.digits$}–{:.digits$}]", s.median, s.min, s.max)).unwrap_or_else(|| "–".into())
}

/// The policies' section of BENCHMARKS.md.
pub fn markdown(report: &PolicyReport, cfg: &PolicyConfig, machine: &str, date: &str) -> String {
    let samples = &report.samples;
    let mut s = format!("{SECTION_START}\n## L4 authorization policies ({date})\n\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench --policies` (with `MESHPATH_ZTUNNEL` set for ztunnel's rows). New HBONE \
         connections per second, pod a to pod c on the other node ({CONCURRENCY} at once, each echoing a byte that \
         is checked), with the mesh and the policies pushed by the lab's fake istiod. One lab per path and policy \
         set; {} rounds of {:?} per configuration, in a rotating order; each ratio compares a round with the same \
         round without policies. The labs not being measured stay up and idle (not stopped: a stopped proxy's xDS \
         stream would time out).\n\n- machine: {machine}; load average at the start {load}\n- policy sets: **elsewhere**: {n} policies in 400 other \
         namespaces, two in three for the whole namespace, one in three for selected workloads (not c), one in five \
         DENY; **global-deny**: {n} GLOBAL DENY policies in `{ROOT_NAMESPACE}`, all applying to c, none matching; \
         each policy 1–3 rules of principals, namespaces, service accounts, IP blocks and ports.\n",
        cfg.rounds,
        cfg.duration,
        n = cfg.count,
        load = report.load_at_start,
    );
    let _ = writeln!(s, "Checked before measuring:\n");
    for c in &report.checks {
        let _ = writeln!(s, "- {c}");
    }
    let _ = writeln!(
        s,
        "\n| path | policies | conn/s median [min–max] | vs none | errors | proxy CPU per connection (µs) | RSS (MiB) | \
         fds | load (1 min) |\n|{}",
        "---|".repeat(9)
    );
    let paths: Vec<PathKind> = [PathKind::MeshpathHbone, PathKind::ZtunnelHbone]
        .into_iter()
        .filter(|p| samples.iter().any(|s| s.path == *p))
        .collect();
    for &path in &paths {
        for set in PolicySet::ALL {
            let of: Vec<&PolicySample> = samples.iter().filter(|x| x.path == path && x.set == set).collect();
            if of.is_empty() {
                continue;
            }
            let rates: Vec<f64> = of.iter().map(|x| x.conn_per_s).collect();
            let vs = if set == PolicySet::None { "1".into() } else { shown(spread(&ratios(samples, path, set)), 3) };
            let cpu: Vec<f64> = of.iter().filter_map(|x| x.proxy_cpu_us_per_conn).collect();
            let rss: Vec<f64> = of.iter().filter_map(|x| x.rss_kib).map(|k| k as f64 / 1024.0).collect();
            let fds: Vec<f64> = of.iter().filter_map(|x| x.fds).map(|f| f as f64).collect();
            let load: Vec<f64> = of.iter().filter_map(|x| x.load1).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {vs} | {} | {} | {} | {} | {} |",
                path.name(),
                set.name(),
                shown(spread(&rates), 0),
                of.iter().map(|x| x.errors).sum::<u64>(),
                shown(spread(&cpu), 0),
                shown(spread(&rss), 1),
                shown(spread(&fds), 0),
                shown(spread(&load), 2),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nRSS and fds: both proxies of the path (node 1's and node 2's meshpath; pod a's and pod c's ztunnel), \
         after each round; their CPU per connection is measured over the round's connection-rate run.\n\nIn-process, `PolicyStore::evaluate` for the bench's connection (release build, median \
         of 7 runs of 200 ms):\n\n| policies | candidates for c | ns per evaluation, median [min–max] |\n|---|---|---|"
    );
    for e in &report.eval {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            e.set.name(),
            e.candidates,
            shown(Some(Stat { median: e.ns_per_eval, min: e.min_ns, max: e.max_ns }), 0)
        );
    }
    let _ = writeln!(s, "\n### Policy targets\n\n| target | measured | wanted | |\n|---|---|---|---|");
    let target = |path: PathKind, set: PolicySet| spread(&ratios(samples, path, set));
    let m = target(PathKind::MeshpathHbone, PolicySet::Elsewhere);
    let verdict = |met: Option<bool>| match met {
        None => "not measured",
        Some(true) => "met",
        Some(false) => "**missed**",
    };
    let _ = writeln!(
        s,
        "| meshpath-hbone, {} policies elsewhere / none (median) | {} | >= 0.95 | {} |",
        cfg.count,
        shown(m, 3),
        verdict(m.map(|m| m.median >= 0.95))
    );
    let (mg, zg) =
        (target(PathKind::MeshpathHbone, PolicySet::GlobalDeny), target(PathKind::ZtunnelHbone, PolicySet::GlobalDeny));
    let _ = writeln!(
        s,
        "| {} GLOBAL DENY / none (ztunnel's `rbac` case): meshpath-hbone, ztunnel-hbone | {} ; {} | reported | |",
        cfg.count,
        shown(mg, 3),
        shown(zg, 3)
    );
    let _ = writeln!(s, "\n{SECTION_END}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(path: PathKind, set: PolicySet, round: usize, rate: f64) -> PolicySample {
        PolicySample {
            path,
            set,
            round,
            conn_per_s: rate,
            connections: 1,
            errors: 0,
            proxy_cpu_us_per_conn: None,
            rss_kib: None,
            fds: None,
            load1: None,
        }
    }

    #[test]
    fn ratios_pair_each_round_with_its_own_baseline() {
        let m = PathKind::MeshpathHbone;
        let samples = [
            sample(m, PolicySet::None, 0, 1000.0),
            sample(m, PolicySet::Elsewhere, 0, 990.0),
            sample(m, PolicySet::None, 1, 500.0),
            sample(m, PolicySet::Elsewhere, 1, 500.0),
            sample(PathKind::ZtunnelHbone, PolicySet::Elsewhere, 1, 1.0),
        ];
        assert_eq!(ratios(&samples, m, PolicySet::Elsewhere), vec![0.99, 1.0]);
        assert!(ratios(&samples, m, PolicySet::GlobalDeny).is_empty());
        let s = spread(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
    }

    #[test]
    fn the_sets_are_varied_unique_and_never_about_the_destination() {
        let elsewhere = PolicySet::Elsewhere.policies(10_000);
        let keys: std::collections::HashSet<String> =
            elsewhere.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect();
        assert_eq!(keys.len(), 10_000);
        let namespaces: std::collections::HashSet<&str> = elsewhere.iter().map(|p| p.namespace.as_str()).collect();
        assert!(namespaces.len() >= 300, "{} namespaces", namespaces.len());
        assert!(!namespaces.contains("lab") && !namespaces.contains(ROOT_NAMESPACE));
        assert!(elsewhere.iter().all(|p| p.scope != Scope::Global as i32));
        for n in 1..=3 {
            assert!(elsewhere.iter().any(|p| p.rules.len() == n), "no policy with {n} rules");
        }
        let global = PolicySet::GlobalDeny.policies(10_000);
        assert!(global.iter().all(|p| p.scope == Scope::Global as i32 && p.action == Action::Deny as i32));
        assert!(PolicySet::None.policies(10_000).is_empty());
    }

    #[test]
    fn every_set_lets_the_bench_connection_through_meshpaths_evaluation() {
        for set in PolicySet::ALL {
            let store = store_of(set, 1_000).expect("allowed");
            let want = if set == PolicySet::GlobalDeny { 1_000 } else { 0 };
            assert_eq!(store.len(), if set == PolicySet::None { 0 } else { 1_000 });
            assert_eq!(store.candidates(DESTINATION).count(), want, "{set:?}");
        }
        // The global DENY policies are live: a peer the first one names, on its port, is denied
        // by it (alone in the store: with others, the first matching by key is reported).
        use meshpath::policy::{ConnectionFacts, Decision};
        let store = store_of(PolicySet::GlobalDeny, 1).expect("allowed");
        let named = meshpath::identity::Identity::new(Lab::TRUST_DOMAIN, &namespace(0), account(0));
        let facts = ConnectionFacts { destination_port: 80, ..bench_connection(&named) };
        let decision = store.evaluate(&facts, DESTINATION).decision;
        let first = format!("{ROOT_NAMESPACE}/{}", global_deny(0).name);
        assert!(matches!(&decision, Decision::Deny { policy: Some(p), .. } if **p == *first), "{decision:?}");
    }

    /// Not a check: prints the time of one evaluation against each set, as `bench
    /// --policies` reports it. In a release build:
    /// `cargo test --release -p meshpath-lab --lib eval_time -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn eval_time_of_each_set() {
        for set in PolicySet::ALL {
            let e = eval_time(set, 10_000).expect("allowed");
            println!("{}: {} candidates, {:.0} ns per evaluation", set.name(), e.candidates, e.ns_per_eval);
        }
    }
}
