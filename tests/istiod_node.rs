//! `--control-plane istiod` end to end in the lab: both node daemons follow the lab's API
//! server for capture and the fake istiod for the mesh and their certificates, and what
//! istiod says (only istiod: the API server holds no Services or EndpointSlices, the lab no
//! CA key) shows up in real traffic.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshpath::record::{ConnectionRecord, Outcome};
use meshpath::tls;
use meshpath_lab::apiserver::{Kind, Verb};
use meshpath_lab::hbone_client::{self, Answer, Probe};
use meshpath_lab::istiod::proto::istio::workload::{GatewayAddress, PortList, TunnelProtocol};
use meshpath_lab::istiod::xds::{LabResource, pod_uid};
use meshpath_lab::lab_istiod::CLUSTER_ID;
use meshpath_lab::smoke::{self, APP_PORT};
use meshpath_lab::{Lab, Topology, traffic};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

mod support;
use support::{built_lab, send, wait_until};

const WAIT: Duration = Duration::from_secs(10);
const CONNECT: Duration = Duration::from_secs(10);

/// A lab whose daemons run under the lab's istiod, every enrolled pod known as HBONE.
fn istiod_lab() -> Result<Lab> {
    istiod_lab_in(built_lab()?)
}

fn istiod_lab_in(mut lab: Lab) -> Result<Lab> {
    lab.start_cluster()?;
    lab.start_istiod()?;
    lab.start_daemons().context("starting the daemons under istiod")?;
    lab.wait_mesh_synced(Duration::from_secs(20))?;
    Ok(lab)
}

fn uid(lab: &Lab, pod: &str) -> String {
    pod_uid(CLUSTER_ID, lab.pod_namespace(pod), &format!("pod-{pod}"))
}

/// Edits pod `pod`'s workload in istiod, then waits until both nodes ACKed the change.
fn edit_workload(
    lab: &Lab,
    pod: &str,
    f: impl Fn(&mut meshpath_lab::istiod::proto::istio::workload::Workload) + Send + 'static,
) -> Result<()> {
    let name = uid(lab, pod);
    let target = name.clone();
    let before = lab.istiod().fake.xds.version(meshpath::xds::ADDRESS_TYPE, &name);
    lab.istiod().edit(move |r| {
        if let LabResource::Workload(w) = r
            && w.uid == target
        {
            f(w)
        }
    });
    acked(lab, &name, before)
}

/// Waits until `name` is served at a version other than `before` and both nodes ACKed it.
fn acked(lab: &Lab, name: &str, before: Option<String>) -> Result<()> {
    let nodes = lab.node_pod_names();
    let istiod = lab.istiod();
    wait_until(&format!("both nodes to ACK a new version of {name}"), WAIT, || {
        let now = istiod.fake.xds.version(meshpath::xds::ADDRESS_TYPE, name);
        Ok(now.is_some() && now != before && istiod.acked_by(&nodes, name))
    })
}

fn record(lab: &Lab, node: usize, pred: impl Fn(&ConnectionRecord) -> bool) -> Result<ConnectionRecord> {
    support::record(lab, node, WAIT, pred)
}

#[test]
fn the_mesh_comes_from_xds_alone_and_changes_take_effect() -> Result<()> {
    let lab = istiod_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let api = &lab.cluster().api;
    ensure!(api.objects(Kind::Service).is_empty() && api.objects(Kind::EndpointSlice).is_empty());
    // The metrics show the stream and the mesh it described.
    let scrape = meshpath_lab::http_get(&lab.nodes[0].name, 15020, "/metrics")?;
    for want in ["meshpath_xds_connected 1", "meshpath_mesh_workload_addresses 10", "meshpath_mesh_service_addresses 2"]
    {
        ensure!(scrape.lines().any(|l| l == want), "no `{want}` in the metrics:\n{scrape}");
    }
    // Each node watches its own pods only, and never services.
    let requests = api.requests();
    ensure!(!requests.iter().any(|r| matches!(r.kind, Kind::Service | Kind::EndpointSlice)), "{requests:#?}");
    let nodes: Vec<String> = lab.nodes.iter().map(|n| format!("spec.nodeName={}", n.name)).collect();
    let pod_reads: Vec<_> = requests.iter().filter(|r| r.kind == Kind::Pod && r.verb != Verb::PatchStatus).collect();
    ensure!(!pod_reads.is_empty(), "no pod list or watch");
    ensure!(
        pod_reads.iter().all(|r| r.param("fieldSelector").is_some_and(|f| nodes.iter().any(|n| n == f))),
        "a pod list or watch not scoped to its node: {pod_reads:#?}"
    );
    let c = lab.pod("c").v4;
    let web: SocketAddr = meshpath_lab::cluster::WEB_SERVICE.parse()?;

    // The baseline: HBONE to c, and the service (known to xDS only) leads to it.
    ensure!(send(&lab, "a", "c", CONNECT)?.echoed_intact, "a -> c");
    record(&lab, 0, |r| r.orig_dst.ip() == c && r.mtls && r.outcome == Outcome::Ok)?;
    let x = traffic::exchange(&lab.pod("a").netns, None, web, &traffic::payload(512), CONNECT)?;
    ensure!(x.echoed_intact, "a -> web");
    let r = record(&lab, 0, |r| r.orig_dst == web && r.outcome == Outcome::Ok)?;
    ensure!(r.dst_service.as_deref() == Some("lab/web") && r.mtls, "{r:?}");

    // A service's target port, changed in the workload's port list: node 2 dials c there.
    let other_port = APP_PORT + 1000;
    let _other = traffic::EchoServer::start(&lab.pod("c").netns, other_port)?;
    edit_workload(&lab, "c", move |w| {
        for ports in w.services.values_mut() {
            *ports = PortList { ports: ports.ports.iter().map(|p| p_with_target(p, other_port)).collect() };
        }
    })?;
    let x = traffic::exchange(&lab.pod("a").netns, None, web, &traffic::payload(512), CONNECT)?;
    ensure!(x.echoed_intact, "a -> web, new target port");
    let to_other = SocketAddr::new(c, other_port);
    record(&lab, 1, |r| r.listener == "hbone" && r.orig_dst == to_other && r.outcome == Outcome::Ok)?;

    // A waypoint on the service: refused, never sent around it.
    let svc = format!("{}/web.{}.svc.cluster.local", meshpath_lab::cluster::MESH_NAMESPACE, "lab");
    let before = lab.istiod().fake.xds.version(meshpath::xds::ADDRESS_TYPE, &svc);
    lab.istiod().edit(|r| {
        if let LabResource::Service(s) = r
            && s.name == "web"
        {
            s.waypoint = Some(GatewayAddress::default());
        }
    });
    acked(&lab, &svc, before)?;
    let refused = traffic::exchange(&lab.pod("a").netns, None, web, &traffic::payload(64), CONNECT);
    ensure!(!refused.as_ref().is_ok_and(|x| x.echoed_intact), "a waypoint's service was reached: {refused:?}");
    record(&lab, 0, |r| r.orig_dst == web && r.outcome == Outcome::WaypointUnsupported)?;

    // c no longer HBONE for its peers: node 1 sends plaintext, node 2 (strict) refuses it.
    edit_workload(&lab, "c", |w| w.tunnel_protocol = TunnelProtocol::None as i32)?;
    let plain = send(&lab, "a", "c", CONNECT);
    ensure!(!plain.as_ref().is_ok_and(|x| x.echoed_intact), "strict node 2 took plaintext: {plain:?}");
    record(&lab, 0, |r| r.orig_dst.ip() == c && r.orig_dst.port() == APP_PORT && !r.mtls && r.start_ms > 0)?;
    record(&lab, 1, |r| r.src.ip() == lab.pod("a").v4 && r.outcome == Outcome::PlaintextRefused)?;
    edit_workload(&lab, "c", |w| w.tunnel_protocol = TunnelProtocol::Hbone as i32)?;
    ensure!(send(&lab, "a", "c", CONNECT)?.echoed_intact, "a -> c, HBONE again");

    // Another identity for c: node 1 now expects it, and c's certificate does not prove it.
    edit_workload(&lab, "c", |w| w.service_account = "sa-impostor".into())?;
    let wrong = send(&lab, "a", "c", CONNECT);
    ensure!(!wrong.as_ref().is_ok_and(|x| x.echoed_intact), "reached c expecting another identity: {wrong:?}");
    let r = record(&lab, 0, |r| {
        r.orig_dst.ip() == c && r.dst_identity.as_deref().is_some_and(|i| i.ends_with("/sa/sa-impostor"))
    })?;
    ensure!(r.outcome != Outcome::Ok, "{r:?}");
    Ok(())
}

/// The smoke (every scenario, both families, the TLS evidence, spoofing) in each topology,
/// under istiod: `cargo xtask test` runs the CNI matrix this way too.
#[test]
fn every_smoke_scenario_in_every_topology_under_istiod() -> Result<()> {
    for topology in [Topology::Routed, Topology::Bridge, Topology::L3] {
        let lab = istiod_lab_in(Lab::build_with(&support::meshpath(), topology)?)?;
        let smoke::Smoke { outcomes, evidence } = smoke::run_all(&lab)?;
        println!("{} topology under istiod; TLS evidence: {}", topology.name(), evidence.summary());
        ensure!(outcomes.iter().all(|o| o.ok), "{} topology:\n{}", topology.name(), smoke::table(&outcomes));
    }
    Ok(())
}

fn p_with_target(
    p: &meshpath_lab::istiod::proto::istio::workload::Port,
    target: u16,
) -> meshpath_lab::istiod::proto::istio::workload::Port {
    meshpath_lab::istiod::proto::istio::workload::Port { service_port: p.service_port, target_port: u32::from(target) }
}

#[test]
fn every_leaf_a_node_presents_was_issued_by_istiods_ca() -> Result<()> {
    let lab = istiod_lab()?;
    let keys = lab.files_with_private_keys()?;
    ensure!(keys.is_empty(), "private keys in the lab: {keys:?}");
    let root = CertificateDer::from_pem_file(&lab.istiod().root)?;
    let issued = lab.istiod().issued_serials();
    for (from, to) in [("d", "a"), ("d", "e"), ("b", "c")] {
        let config = tls::anonymous_client_config(std::slice::from_ref(&root), &lab.identity(to))?;
        let probed = hbone_client::probe(
            &lab.pod(from).netns,
            config,
            lab.addr(to, false, 15008),
            &[Probe::connect(lab.addr(to, false, APP_PORT))],
            b"x",
            CONNECT,
        )?;
        ensure!(!probed.server_serial.is_empty(), "{to}'s node presented no certificate");
        ensure!(
            issued.contains(&probed.server_serial),
            "{to}'s node presented serial {} which istiod's CA never issued (issued: {issued:?})",
            probed.server_serial
        );
        // Without a client certificate the stream is refused: the server checked it.
        ensure!(!matches!(probed.answers[..], [Answer::Status(200, _)]), "{:?}", probed.answers);
    }
    // Each was asked for by the node proxy, impersonating the pod's identity.
    let records = lab.istiod().ca.records();
    for pod in ["a", "c", "e"] {
        let id = lab.identity(pod).to_string();
        ensure!(
            records.iter().any(|r| r.impersonated.as_deref() == Some(id.as_str())
                && r.caller.as_deref() == Some("istio-system/ztunnel")
                && r.serial.is_some()),
            "no certificate issued for {id} to the node account: {records:#?}"
        );
    }
    Ok(())
}

/// Cuts (or restores) every node's way to istiod: new connections to its port are reset in
/// node 1's namespace, where it listens, and open streams are ended.
fn istiod_reachable(lab: &Lab, reachable: bool) -> Result<()> {
    let op = if reachable { "-D" } else { "-I" };
    let port = meshpath_lab::lab_istiod::ISTIOD_PORT.to_string();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.nodes[0].name, "iptables", op, "INPUT", "-p", "tcp", "--dport", &port])
        .args(["-j", "REJECT", "--reject-with", "tcp-reset"])
        .output()?;
    ensure!(out.status.success(), "iptables {op}: {}", String::from_utf8_lossy(&out.stderr));
    if !reachable {
        lab.istiod().fake.xds.drop_streams();
    }
    Ok(())
}

/// The lines of `node`'s log about its xDS stream, from line `from` on.
fn xds_lines(lab: &Lab, node: usize, from: usize) -> Result<Vec<String>> {
    let log = std::fs::read_to_string(lab.daemon_log_path(node))?;
    Ok(log.lines().skip(from).filter(|l| l.contains("xds: ")).map(str::to_owned).collect())
}

fn log_len(lab: &Lab, node: usize) -> Result<usize> {
    Ok(std::fs::read_to_string(lab.daemon_log_path(node))?.lines().count())
}

/// Backoff from 10 ms doubling to 15 s: a few seconds of outage are a handful of attempts.
const MAX_LINES_IN_OUTAGE: usize = 12;

#[test]
fn istiod_lost_while_serving_the_node_serves_on_then_resyncs() -> Result<()> {
    let lab = istiod_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let from = log_len(&lab, 0)?;
    istiod_reachable(&lab, false)?;
    // While istiod is away, a change is made there.
    let other_port = APP_PORT + 1000;
    let _other = traffic::EchoServer::start(&lab.pod("c").netns, other_port)?;
    lab.istiod().edit(move |r| {
        if let LabResource::Workload(w) = r {
            w.services.values_mut().flat_map(|p| p.ports.iter_mut()).for_each(|p| p.target_port = other_port.into());
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        ensure!(send(&lab, "a", "c", CONNECT)?.echoed_intact, "a -> c while istiod is away");
        ensure!(meshpath_lab::readiness(&lab.nodes[0].name)?, "node 1 unready while istiod is away");
        std::thread::sleep(Duration::from_millis(500));
    }
    let lines = xds_lines(&lab, 0, from)?;
    ensure!(!lines.is_empty() && lines.len() <= MAX_LINES_IN_OUTAGE, "want one line per backoff step: {lines:#?}");
    istiod_reachable(&lab, true)?;
    // Back: the node re-syncs and the change made meanwhile takes effect.
    let web: SocketAddr = meshpath_lab::cluster::WEB_SERVICE.parse()?;
    let to_other = SocketAddr::new(lab.pod("c").v4, other_port);
    wait_until("the change made while istiod was away to take effect", Duration::from_secs(30), || {
        let _ = traffic::exchange(&lab.pod("a").netns, None, web, &traffic::payload(64), CONNECT);
        Ok(lab.records(1)?.iter().any(|r| r.orig_dst == to_other && r.outcome == Outcome::Ok))
    })
}

#[test]
fn istiod_unreachable_at_start_not_ready_and_enrolled_traffic_fails_closed() -> Result<()> {
    let mut lab = built_lab()?;
    lab.start_cluster()?;
    lab.start_istiod()?;
    istiod_reachable(&lab, false)?;
    let _servers = smoke::start_servers(&lab)?;
    lab.spawn_daemon(0)?;
    lab.spawn_daemon(1)?;
    std::thread::sleep(Duration::from_secs(4));
    ensure!(!meshpath_lab::readiness(&lab.nodes[0].name)?, "node 1 ready without istiod");
    // a is captured (Kubernetes says so) but istiod has not described anyone: a's connection
    // waits for that, bounded, then fails closed.
    let attempt = send(&lab, "a", "d", Duration::from_secs(15));
    ensure!(!attempt.as_ref().is_ok_and(|x| x.echoed_intact), "a reached d without istiod: {attempt:?}");
    record(&lab, 0, |r| r.src.ip() == lab.pod("a").v4 && r.outcome == Outcome::SourcePending)?;
    let lines = xds_lines(&lab, 0, 0)?;
    ensure!(!lines.is_empty() && lines.len() <= MAX_LINES_IN_OUTAGE + 2, "want one line per backoff step: {lines:#?}");
    istiod_reachable(&lab, true)?;
    lab.wait_ready(0, Duration::from_secs(30))?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    lab.wait_mesh_synced(Duration::from_secs(30))?;
    ensure!(send(&lab, "a", "c", CONNECT)?.echoed_intact, "a -> c once istiod is back");
    Ok(())
}

#[test]
fn a_takeover_while_istiod_is_down_waits_and_the_old_daemon_serves_on() -> Result<()> {
    let mut lab = istiod_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let name = lab.nodes[0].name.clone();
    let before = meshpath::datapath::pinned_listener_cookies(&name)?;
    istiod_reachable(&lab, false)?;
    let successor = lab.spawn_logged(0)?;
    // Held here until istiod answers: the old daemon keeps the slots and serves.
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < deadline {
        ensure!(send(&lab, "a", "c", CONNECT)?.echoed_intact, "the old daemon stopped serving");
        ensure!(
            meshpath::datapath::pinned_listener_cookies(&name)? == before,
            "the successor took the slots without istiod's first push and certificates"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let old = lab.nodes[0].daemon.replace(successor);
    istiod_reachable(&lab, true)?;
    wait_until("the successor to take the slots once istiod is back", Duration::from_secs(30), || {
        let now = meshpath::datapath::pinned_listener_cookies(&name)?;
        Ok(now.iter().zip(&before).all(|(n, b)| b.is_none() || (n.is_some() && n != b)))
    })?;
    if let Some(mut old) = old {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
        old.wait()?;
    }
    ensure!(send(&lab, "a", "c", CONNECT)?.echoed_intact, "a -> c through the successor");
    Ok(())
}

/// An L4 policy from istiod decides at the destination, on every path: an ALLOW policy with
/// no rule in namespace `lab` lets nothing in (ztunnel: "allow policies exist, but none
/// allowed"), so HBONE streams get 401, same-node hand-overs and plaintext are refused;
/// removed, everything passes again.
#[test]
fn an_istiod_policy_decides_at_the_destination_on_every_path() -> Result<()> {
    use meshpath_lab::istiod::proto::istio::security::{Action, Scope};
    let lab = istiod_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let policy = meshpath_lab::istiod::xds::authorization("lab", "nothing-in", Scope::Namespace, Action::Allow, vec![]);
    let key = "lab/nothing-in";
    let xds = &lab.istiod().fake.xds;
    let nodes = lab.node_pod_names();
    let acked_policy = || lab.istiod().acked(&nodes, meshpath::xds::AUTHORIZATION_TYPE, key);
    // A connection open before the policy: closed once it arrives (meshpath re-checks open
    // connections). The time from the push to the close bounds the ACK-to-close time.
    let streaming = APP_PORT + 2000;
    let _echo = traffic::EchoServer::start_streaming(&lab.pod("c").netns, streaming)?;
    let mut held = traffic::in_netns(&lab.pod("a").netns, || {
        std::net::TcpStream::connect_timeout(&lab.addr("c", false, streaming), CONNECT)
    })??;
    held.set_read_timeout(Some(WAIT))?;
    std::io::Write::write_all(&mut held, b"before")?;
    let mut buf = [0u8; 64];
    ensure!(std::io::Read::read(&mut held, &mut buf)? > 0, "the held connection echoed nothing");
    let pushed = std::time::Instant::now();
    xds.put(policy);
    let ended = loop {
        match std::io::Read::read(&mut held, &mut buf) {
            Ok(0) | Err(_) => break pushed.elapsed(),
            Ok(_) => continue,
        }
    };
    ensure!(ended < WAIT, "the open connection outlived the policy that denies it");
    println!("push to close of an open HBONE stream: {ended:?}");
    wait_until("both nodes to ACK the policy", WAIT, || Ok(acked_policy()))?;
    let (a, c, e) = (lab.pod("a").v4, lab.pod("c").v4, lab.pod("e").v4);
    for (from, to) in [("a", "c"), ("a", "e"), ("d", "a")] {
        let r = send(&lab, from, to, CONNECT);
        ensure!(!r.as_ref().is_ok_and(|x| x.echoed_intact), "{from} -> {to} passed the policy: {r:?}");
    }
    let denied = |r: &ConnectionRecord| {
        r.outcome == Outcome::PolicyDenied
            && r.error.as_deref().is_some_and(|e| e.contains("allow policies exist, but none allowed"))
    };
    // The held stream's record on node 2 says why it was closed.
    let held_port = SocketAddr::new(c, streaming);
    record(&lab, 1, |r| r.listener == "hbone" && r.orig_dst == held_port && denied(r))?;
    record(&lab, 1, |r| r.listener == "hbone" && r.src.ip() == a && r.orig_dst.port() == APP_PORT && denied(r))?;
    let to_c = SocketAddr::new(c, APP_PORT);
    let out = record(&lab, 0, |r| r.listener == "outbound" && r.orig_dst == to_c && r.outcome != Outcome::Ok)?;
    ensure!(out.error.as_deref().is_some_and(|e| e.contains("401")), "node 1 did not see a 401: {out:?}");
    record(&lab, 0, |r| r.listener == "outbound" && r.orig_dst.ip() == e && denied(r))?;
    record(&lab, 0, |r| r.listener == "inbound_plain" && r.src.ip() == lab.pod("d").v4 && denied(r))?;
    // Inspection from the live state: what applies to c, and whether a would reach c.
    let n2 = lab.nodes[1].name.clone();
    let listed = lab.meshpath(1, &["policy", "--node", &n2])?;
    ensure!(listed.lines().any(|l| l.contains("lab/pod-c") && l.contains(key)), "policies of node 2:\n{listed}");
    let status = lab.meshpath(1, &["status", "--node", &n2])?;
    ensure!(status.contains("authorization policies") && status.contains(key), "status:\n{status}");
    let to = lab.addr("c", false, APP_PORT).to_string();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{n2}"))
        .arg(&lab.binary)
        .args(["policy", "--node", &n2, "--from", &a.to_string(), "--to", &to])
        .output()?;
    let answer = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(1) && answer.contains("allow policies exist, but none allowed"),
        "meshpath policy --from a --to c: {:?} {answer}",
        out.status
    );
    ensure!(xds.remove(meshpath::xds::AUTHORIZATION_TYPE, key), "the policy was not served");
    wait_until("the policy's removal to reach both nodes", WAIT, || {
        Ok(send(&lab, "a", "c", CONNECT).is_ok_and(|x| x.echoed_intact)
            && send(&lab, "a", "e", CONNECT).is_ok_and(|x| x.echoed_intact))
    })
}

/// The same policy over IPv6, on a plain relay open before it (closed when it arrives), and
/// across a takeover of the destination's node (the successor enforces it from its first
/// connection: it takes the listeners over only once istiod's first push is applied).
#[test]
fn a_policy_closes_a_plain_relay_and_holds_over_v6_and_across_a_takeover() -> Result<()> {
    use meshpath_lab::istiod::proto::istio::security::{Action, Scope};
    let mut lab = istiod_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let streaming = APP_PORT + 2000;
    let _echo = traffic::EchoServer::start_streaming(&lab.pod("a").netns, streaming)?;
    let to_a = lab.addr("a", true, streaming);
    let mut held = support::hold(&lab, "d", to_a, WAIT)?;

    let (nodes, key) = (lab.node_pod_names(), "lab/nothing-in");
    let policy = meshpath_lab::istiod::xds::authorization("lab", "nothing-in", Scope::Namespace, Action::Allow, vec![]);
    lab.istiod().set_policy(&nodes, key, Some(policy), WAIT).map_err(anyhow::Error::msg)?;
    ensure!(support::closed(&mut held), "the plain relay stayed open");
    let denied = |r: &ConnectionRecord| r.outcome == Outcome::PolicyDenied;
    record(&lab, 0, |r| r.listener == "inbound_plain" && r.orig_dst == to_a && denied(r))?;

    let c6 = lab.addr("c", true, APP_PORT);
    let try_c6 = |lab: &Lab| traffic::exchange(&lab.pod("a").netns, None, c6, &traffic::payload(64), CONNECT);
    ensure!(!try_c6(&lab).is_ok_and(|x| x.echoed_intact), "a reached c over IPv6 through the policy");
    record(&lab, 1, |r| r.listener == "hbone" && r.orig_dst == c6 && denied(r))?;
    let before = lab.records(1)?.len();
    lab.take_over(1, Duration::from_secs(30))?;
    ensure!(!try_c6(&lab).is_ok_and(|x| x.echoed_intact), "a reached c through node 2's successor");
    let after = lab.records(1)?;
    ensure!(
        after[before..].iter().any(|r| r.listener == "hbone" && r.orig_dst == c6 && denied(r)),
        "the successor did not deny: {:#?}",
        &after[before..]
    );
    lab.istiod().set_policy(&nodes, key, None, WAIT).map_err(anyhow::Error::msg)?;
    ensure!(try_c6(&lab)?.echoed_intact, "a -> c over IPv6 once the policy is gone");
    Ok(())
}
