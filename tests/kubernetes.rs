//! The Kubernetes mode end to end: the real kube-rs client in each node daemon follows the
//! lab's in-process API server (real list/watch protocol), and what the API says shows up
//! in the pinned maps and in real traffic.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::ClusterRole;
use meshpath::record::Outcome;
use meshpath_common::names::{
    DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE, REDIRECTION_ANNOTATION, REDIRECTION_ENABLED,
};
use meshpath_lab::apiserver::{Kind, Verb};
use meshpath_lab::cluster::{self, ECHO_SERVICE, MESH_NAMESPACE, WEB_SERVICE};
use meshpath_lab::{Lab, readiness, smoke, traffic};

mod support;
use support::{RELEASE, built_lab, send, wait_until};

/// A lab whose daemons follow its API server.
fn k8s_lab() -> Result<Lab> {
    let mut lab = built_lab()?;
    lab.start_cluster()?;
    lab.start_daemons().context("starting the daemons in Kubernetes mode")?;
    Ok(lab)
}

fn map_ips(lab: &Lab, node: usize) -> Result<BTreeSet<IpAddr>> {
    Ok(lab.workload_map(node)?.into_keys().collect())
}

fn ips_of(lab: &Lab, pods: &[&str]) -> BTreeSet<IpAddr> {
    pods.iter().flat_map(|p| [lab.pod(p).v4, lab.pod(p).v6]).collect()
}

/// Waits until `node`'s map holds exactly the IPs of `pods` (IPs that leave do so once
/// their release hold is over); returns how long it took.
fn expect_map(lab: &Lab, node: usize, pods: &[&str], what: &str) -> Result<Duration> {
    let start = Instant::now();
    let want = ips_of(lab, pods);
    wait_until(&format!("{what}: node {} to hold {pods:?}", node + 1), RELEASE, || Ok(map_ips(lab, node)? == want))?;
    Ok(start.elapsed())
}

fn with_label(mut pod: Pod, mode: Option<&str>) -> Pod {
    let labels = pod.metadata.labels.get_or_insert_with(Default::default);
    match mode {
        Some(m) => {
            labels.insert(DATAPLANE_MODE_LABEL.into(), m.into());
        }
        None => {
            labels.remove(DATAPLANE_MODE_LABEL);
        }
    }
    pod
}

/// Enrolment within a second of each change, as Istio's labels say (a release waits for
/// its hold: its pod's veth stays in the lab).
const PROMPT: Duration = Duration::from_secs(1);

#[test]
fn enrolment_follows_labels_ips_and_deletions_and_rbac_covers_exactly_the_requests() -> Result<()> {
    let lab = k8s_lab()?;
    let api = &lab.cluster().api;
    expect_map(&lab, 0, &["a", "e"], "initial sync")?;
    expect_map(&lab, 1, &["c"], "initial sync")?;
    let _servers = smoke::start_servers(&lab)?;
    let x = send(&lab, "a", "c", Duration::from_secs(3))?;
    ensure!(x.echoed_intact && x.server_saw.ip() == x.client.ip());
    let client = x.client;
    let r = lab.wait_record(0, Duration::from_secs(3), |r| r.src == client)?.context("a -> c not proxied")?;
    ensure!(r.mtls && r.src_identity.as_deref() == Some(lab.identity("a").to_string().as_str()), "{r:?}");

    // A pod opting out, then the namespace losing its label, then a pod opting in alone.
    api.apply(&with_label(lab.pod_object("a"), Some(DATAPLANE_MODE_NONE)))?;
    let t = expect_map(&lab, 0, &["e"], "pod a opted out")?;
    ensure!(t < RELEASE, "unenrolment took {t:?}");
    api.apply(&cluster::namespace(MESH_NAMESPACE, false))?;
    expect_map(&lab, 0, &[], "namespace lab unlabelled")?;
    expect_map(&lab, 1, &[], "namespace lab unlabelled")?;
    api.apply(&with_label(lab.pod_object("b"), Some(DATAPLANE_MODE_AMBIENT)))?;
    let t = expect_map(&lab, 0, &["b"], "pod b opted in")?;
    ensure!(t < PROMPT, "enrolment took {t:?}");

    // The namespace enrolled again: a stays out (its own label), c and e come back.
    api.apply(&cluster::namespace(MESH_NAMESPACE, true))?;
    expect_map(&lab, 0, &["b", "e"], "namespace lab labelled again")?;
    expect_map(&lab, 1, &["c"], "namespace lab labelled again")?;

    // e's IP changes (to one no veth routes): its old IPs must leave the map.
    let mut moved = lab.pod_object("e");
    let status = moved.status.as_mut().context("status")?;
    status.pod_ip = Some("10.244.1.99".into());
    status.pod_ips = Some(vec![k8s_openapi::api::core::v1::PodIP { ip: "10.244.1.99".into() }]);
    api.apply(&moved)?;
    expect_map(&lab, 0, &["b"], "pod e's IP changed")?;

    // Deletion.
    api.delete(Kind::Pod, Some(MESH_NAMESPACE), "pod-c")?;
    expect_map(&lab, 1, &[], "pod c deleted")?;

    // A host-network pod is never enrolled, whatever its labels. It claims pod d's address
    // here (an address node 2 routes to a veth), so wrongly enrolling it would show.
    let mut host = with_label(lab.pod_object("d"), Some(DATAPLANE_MODE_AMBIENT));
    host.metadata.name = Some("hostnet".into());
    host.metadata.namespace = Some(MESH_NAMESPACE.into());
    host.spec.as_mut().context("spec")?.host_network = Some(true);
    api.apply(&host)?;
    // Together with a change that must show, so the host pod has been seen when we look.
    api.apply(&with_label(lab.pod_object("a"), None))?;
    expect_map(&lab, 0, &["a", "b"], "pod a back")?;
    expect_map(&lab, 1, &[], "host-network pod ignored")?;

    // The CNI plugin, deciding on a pod outside the mesh from the API server: one get of
    // the pod and one of its namespace, nothing held up.
    let add = lab.cni("b", "ADD")?;
    ensure!(add.ok, "ADD of b: {}", add.msg());

    // RBAC: the ClusterRole grants exactly the (verb, group, resource) the daemons and the
    // plugin asked for.
    let mut asked: BTreeSet<(String, String, String)> = BTreeSet::new();
    for r in api.requests() {
        let (verb, resource) = match r.verb {
            Verb::List => ("list", r.kind.plural().to_owned()),
            Verb::Watch => ("watch", r.kind.plural().to_owned()),
            Verb::Get => ("get", r.kind.plural().to_owned()),
            Verb::PatchStatus => ("patch", format!("{}/status", r.kind.plural())),
        };
        let group = r.kind.api_version().rsplit_once('/').map(|(g, _)| g).unwrap_or("").to_string();
        asked.insert((verb.into(), group, resource));
    }
    let rbac = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/rbac.yaml"))?;
    let role: ClusterRole = serde_yaml::Deserializer::from_str(&rbac)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .find_map(|v: serde_yaml::Value| (v["kind"] == "ClusterRole").then(|| serde_yaml::from_value(v).ok()).flatten())
        .context("no ClusterRole in rbac.yaml")?;
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for g in rule.api_groups.iter().flatten() {
            for res in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    granted.insert((v.clone(), g.clone(), res.clone()));
                }
            }
        }
    }
    ensure!(granted == asked, "RBAC grants {granted:?}\nbut the daemons and the plugin asked for {asked:?}");
    Ok(())
}

#[test]
fn a_pod_without_an_address_yet_is_enrolled_on_the_cni_plugins_word_until_the_watch_decides() -> Result<()> {
    let mut lab = k8s_lab()?;
    expect_map(&lab, 0, &["a", "e"], "initial sync")?;
    let _servers = smoke::start_servers(&lab)?;
    lab.add_pod("f", 0, true, 20)?;
    // The pod as the API server has it while its sandbox is made: scheduled, no address.
    let mut pending = lab.pod_object("f");
    pending.status =
        Some(k8s_openapi::api::core::v1::PodStatus { phase: Some("Pending".into()), ..Default::default() });
    lab.cluster().api.apply(&pending)?;
    let add = lab.cni("f", "ADD")?;
    ensure!(add.ok, "ADD of f: {}", add.msg());
    ensure!(map_ips(&lab, 0)?.is_superset(&ips_of(&lab, &["f"])), "f is not in the map when its ADD returns");
    let x = send(&lab, "f", "c", Duration::from_secs(3))?;
    let r = lab.wait_record(0, Duration::from_secs(3), |r| r.src == x.client)?.context("f -> c not proxied")?;
    ensure!(r.mtls && r.src_identity.as_deref() == Some(lab.identity("f").to_string().as_str()), "{r:?}");
    // A takeover before kubelet reports the addresses: only the plugin's word, kept in the
    // node's file, holds f in the successor's desired state, without the plugin running again.
    lab.take_over(0, Duration::from_secs(30))?;
    ensure!(map_ips(&lab, 0)?.is_superset(&ips_of(&lab, &["f"])), "the successor unmapped f");
    send(&lab, "f", "c", Duration::from_secs(3)).context("f -> c after the takeover")?;
    // kubelet reports its addresses: nothing moves. Then the pod opts out: the watch, which
    // has now decided on it, wins over the plugin's earlier word.
    lab.cluster().api.apply(&lab.pod_object("f"))?;
    expect_map(&lab, 0, &["a", "e", "f"], "f's addresses reported")?;
    lab.cluster().api.apply(&with_label(lab.pod_object("f"), Some(DATAPLANE_MODE_NONE)))?;
    expect_map(&lab, 0, &["a", "e"], "f opted out")?;
    Ok(())
}

#[test]
fn service_addresses_lead_to_ready_endpoints_through_the_right_path() -> Result<()> {
    let lab = k8s_lab()?;
    expect_map(&lab, 0, &["a", "e"], "initial sync")?;
    let _servers = smoke::start_servers(&lab)?;
    let web: SocketAddr = WEB_SERVICE.parse()?;
    let payload = traffic::payload(4096);

    // lab/web -> c (enrolled, other node): HBONE, and the app sees a's address.
    let x = traffic::exchange(&lab.pod("a").netns, None, web, &payload, Duration::from_secs(3))?;
    ensure!(x.echoed_intact && x.server_saw.ip() == lab.pod("a").v4, "{x:?}");
    let client = x.client;
    let r = lab.wait_record(0, Duration::from_secs(3), |r| r.src == client)?.context("no record on node 1")?;
    ensure!(
        r.orig_dst == web && r.dst_service.as_deref() == Some("lab/web") && r.mtls && r.outcome == Outcome::Ok,
        "{r:?}"
    );
    ensure!(r.dst_workload.as_deref() == Some("lab/pod-c"), "{r:?}");
    let c_app = lab.addr("c", false, smoke::APP_PORT);
    ensure!(
        lab.wait_record(1, Duration::from_secs(3), |r| r.listener == "hbone" && r.orig_dst == c_app)?.is_some(),
        "node 2 saw no HBONE stream to c:8080 (the named target port)"
    );

    // plain/echo -> d (not enrolled): plain TCP.
    let echo: SocketAddr = ECHO_SERVICE.parse()?;
    let x = traffic::exchange(&lab.pod("a").netns, None, echo, &payload, Duration::from_secs(3))?;
    ensure!(x.echoed_intact, "{x:?}");
    let client = x.client;
    let r = lab.wait_record(0, Duration::from_secs(3), |r| r.src == client)?.context("no record")?;
    ensure!(r.dst_service.as_deref() == Some("plain/echo") && !r.mtls && r.outcome == Outcome::Ok, "{r:?}");

    // With kube-proxy's DNAT in front (as in most clusters), the proxy still sees the
    // service: the NAT happens first, and the pre-NAT address is read back from its entry.
    let rule = [
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        "10.96.0.10/32",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
    ];
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.nodes[0].name, "iptables"])
        .args(rule)
        .arg(c_app.to_string())
        .output()?;
    ensure!(out.status.success(), "installing the kube-proxy-like DNAT rule: {}", String::from_utf8_lossy(&out.stderr));
    let x = traffic::exchange(&lab.pod("a").netns, None, web, &payload, Duration::from_secs(3))?;
    ensure!(x.echoed_intact && x.server_saw.ip() == lab.pod("a").v4, "{x:?}");
    let client = x.client;
    let r = lab.wait_record(0, Duration::from_secs(3), |r| r.src == client)?.context("no record behind the DNAT")?;
    ensure!(
        r.orig_dst == web && r.dst_service.as_deref() == Some("lab/web") && r.mtls,
        "behind kube-proxy's DNAT: {r:?}"
    );
    // The rule did rewrite the connection (else this proves nothing).
    let counters = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.nodes[0].name, "iptables", "-t", "nat", "-L", "PREROUTING", "-v", "-x", "-n"])
        .output()?;
    let dnat = String::from_utf8_lossy(&counters.stdout)
        .lines()
        .find(|l| l.contains("DNAT"))
        .map(str::to_owned)
        .unwrap_or_default();
    let packets: u64 = dnat.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(0);
    ensure!(packets > 0, "the DNAT rule matched nothing: {dnat:?}");

    // No ready endpoint: refused, and said so.
    let (svc, mut slice) = lab.service_objects(MESH_NAMESPACE, "web", web, &["c"], smoke::APP_PORT);
    for ep in slice.endpoints.iter_mut().flatten() {
        ep.conditions.as_mut().context("conditions")?.ready = Some(false);
    }
    lab.cluster().api.apply(&svc)?;
    lab.cluster().api.apply(&slice)?;
    wait_until("the refusal", Duration::from_secs(5), || {
        let _ = traffic::exchange(&lab.pod("a").netns, None, web, b"x", Duration::from_secs(1));
        Ok(lab
            .records(0)?
            .iter()
            .any(|r| r.outcome == Outcome::NoEndpoint && r.dst_service.as_deref() == Some("lab/web")))
    })?;
    Ok(())
}

#[test]
fn outages_expired_watches_and_restarts_keep_the_state() -> Result<()> {
    let mut lab = k8s_lab()?;
    expect_map(&lab, 0, &["a", "e"], "initial sync")?;
    let _servers = smoke::start_servers(&lab)?;
    let n1 = lab.nodes[0].name.clone();

    // API server down: nothing is dropped, traffic flows, the node stays ready.
    lab.cluster().stop();
    std::thread::sleep(Duration::from_secs(2));
    ensure!(map_ips(&lab, 0)? == ips_of(&lab, &["a", "e"]), "enrolment lost during the outage");
    ensure!(send(&lab, "a", "c", Duration::from_secs(3))?.echoed_intact);
    ensure!(readiness(&n1)?, "a synced node must stay ready through an API outage");
    // A change made while it is down arrives once it is back.
    lab.cluster().api.apply(&with_label(lab.pod_object("a"), Some(DATAPLANE_MODE_NONE)))?;
    lab.cluster().restart(&n1)?;
    wait_until("the change made during the outage", Duration::from_secs(20), || {
        Ok(map_ips(&lab, 0)? == ips_of(&lab, &["e"]))
    })?;

    // History gone (410 Gone on resume): the watchers relist and converge.
    let lists = lab.cluster().api.request_count(Kind::Pod, Verb::List);
    lab.cluster().api.compact();
    lab.cluster().api.disconnect_watches();
    lab.cluster().api.apply(&with_label(lab.pod_object("a"), None))?;
    wait_until("a re-enrolled after the relist", Duration::from_secs(20), || {
        Ok(map_ips(&lab, 0)? == ips_of(&lab, &["a", "e"]))
    })?;
    ensure!(
        lab.cluster().api.request_count(Kind::Pod, Verb::List) > lists,
        "no relist after the history was compacted"
    );

    // A daemon restarted while the API is down is not ready until it has synced, and its
    // node keeps capturing (and dropping) enrolled traffic meanwhile: nothing bypasses it.
    lab.stop_daemon(1, false)?;
    lab.cluster().stop();
    // Meanwhile, c's pod goes away in the API; the restarted daemon must drop it.
    lab.cluster().api.delete(Kind::Pod, Some(MESH_NAMESPACE), "pod-c")?;
    lab.spawn_daemon(1)?;
    std::thread::sleep(Duration::from_secs(2));
    let n2 = lab.nodes[1].name.clone();
    ensure!(!readiness(&n2).unwrap_or(false), "ready before any sync");
    ensure!(map_ips(&lab, 1)? == ips_of(&lab, &["c"]), "the pinned map changed before the sync");
    ensure!(
        send(&lab, "d", "c", Duration::from_millis(1500)).is_err(),
        "c reachable directly while its node's daemon was not serving"
    );
    lab.cluster().restart(&n1)?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    ensure!(map_ips(&lab, 1)?.is_empty(), "a stale entry survived the restart: {:?}", map_ips(&lab, 1)?);
    Ok(())
}

/// Whether the API server's pod `name` carries the redirection annotation.
fn annotated(lab: &Lab, pod: &str) -> Result<bool> {
    let name = format!("pod-{pod}");
    let obj = lab.cluster().api.object(Kind::Pod, Some(lab.pod_namespace(pod)), &name).context("no such pod")?;
    Ok(obj["metadata"]["annotations"][REDIRECTION_ANNOTATION] == REDIRECTION_ENABLED)
}

/// Pod `pod` as the server holds it (annotations included), with its enrolment label set.
fn relabelled(lab: &Lab, pod: &str, mode: Option<&str>) -> Result<serde_json::Value> {
    let name = format!("pod-{pod}");
    let mut obj = lab.cluster().api.object(Kind::Pod, Some(lab.pod_namespace(pod)), &name).context("no such pod")?;
    let labels = &mut obj["metadata"]["labels"];
    match mode {
        Some(m) => labels[DATAPLANE_MODE_LABEL] = m.into(),
        None => {
            if let Some(l) = labels.as_object_mut() {
                l.remove(DATAPLANE_MODE_LABEL);
            }
        }
    }
    Ok(obj)
}

/// Like istio-cni, the node marks each pod it captures (`ambient.istio.io/redirection:
/// enabled`, through `pods/status`) once the pod's IPs are in the map and the listeners are
/// registered, and removes the mark once the pod is released; a stale mark on a pod it does
/// not capture is removed.
#[test]
fn captured_pods_carry_the_redirection_annotation_until_their_release() -> Result<()> {
    let lab = k8s_lab()?;
    expect_map(&lab, 0, &["a", "e"], "initial sync")?;
    let api = &lab.cluster().api;
    let mut stale = lab.pod_object("b");
    stale
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(REDIRECTION_ANNOTATION.into(), REDIRECTION_ENABLED.into());
    api.apply(&stale)?;
    wait_until("a, e and c marked, b's stale mark removed", Duration::from_secs(5), || {
        Ok(annotated(&lab, "a")? && annotated(&lab, "e")? && annotated(&lab, "c")? && !annotated(&lab, "b")?)
    })?;
    // The marks came after the listeners were registered, on both nodes.
    for node in [0, 1] {
        let log = std::fs::read_to_string(lab.daemon_log_path(node))?;
        let registered = log.find("proxy listeners registered").context("no registration in the log")?;
        let marked = log.find("redirection annotation set").context("no mark in the log")?;
        ensure!(registered < marked, "node {} marked a pod before it served", node + 1);
    }
    // Pod a opts out: its release is held, and so is its mark; then both go.
    let opted_out = Instant::now();
    api.apply_value(relabelled(&lab, "a", Some(DATAPLANE_MODE_NONE))?)?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(annotated(&lab, "a")?, "a's mark went before its release");
    wait_until("a's mark removed after its release", RELEASE, || Ok(!annotated(&lab, "a")?))?;
    ensure!(opted_out.elapsed() >= Duration::from_secs(4), "a's mark went before the hold was over");
    ensure!(annotated(&lab, "e")?, "e lost its mark with a");
    let patches = api.requests().iter().filter(|r| r.verb == Verb::PatchStatus).count();
    ensure!(patches <= 6, "{patches} status patches for 4 changes of marks: patching more than it must");
    Ok(())
}

/// `iptables -t nat <op> ISTIO_PRERT` inside pod `pod`'s namespace: the chain istio-cni
/// leaves in a pod it redirected in place.
fn istio_chain(lab: &Lab, pod: &str, op: &str) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.pod(pod).netns, "iptables", "-t", "nat", op, "ISTIO_PRERT"])
        .output()?;
    ensure!(out.status.success(), "iptables {op}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A node moving from ztunnel to meshpath: a pod that still carries istio-cni's in-pod
/// rules is not captured twice; it is named in one line and captured once they are gone.
#[test]
fn a_pod_still_redirected_by_istio_cni_is_left_uncaptured_with_one_line() -> Result<()> {
    let mut lab = built_lab()?;
    lab.start_cluster()?;
    istio_chain(&lab, "e", "-N")?;
    lab.start_daemons().context("starting the daemons in Kubernetes mode")?;
    expect_map(&lab, 0, &["a"], "a captured, e left out")?;
    ensure!(!annotated(&lab, "e")?, "e annotated though not captured");
    let log = std::fs::read_to_string(lab.daemon_log_path(0))?;
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("not captured") && l.contains("pod-e")).collect();
    ensure!(lines.len() == 1 && lines[0].contains("ISTIO_PRERT"), "want one line naming the chain: {lines:#?}");
    // The rules go (the pod restarted, or by hand); the next change of the pod captures it.
    istio_chain(&lab, "e", "-X")?;
    let api = &lab.cluster().api;
    let mut touched = relabelled(&lab, "e", None)?;
    touched["metadata"]["labels"]["touched"] = "yes".into();
    api.apply_value(touched).map_err(|e| anyhow::anyhow!("{e}"))?;
    expect_map(&lab, 0, &["a", "e"], "e captured once the rules are gone")?;
    wait_until("e annotated", RELEASE, || annotated(&lab, "e"))?;
    Ok(())
}
