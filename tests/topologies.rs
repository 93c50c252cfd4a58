//! The CNI matrix. Each lab topology end to end (every smoke scenario in both families,
//! node-originated probes, the proxy killed, what `status` calls each interface, a clean
//! uninstall); another CNI's TCX programs before and after meshpath's; a pod bridge whose
//! pods' namespaces cannot be read refused at start with the reason; another lab's pods,
//! with the same addresses, not taken for a bridged node's own.

mod support;

use std::time::Duration;

use std::net::IpAddr;

use anyhow::{Context, Result, bail, ensure};
use aya::programs::LinkOrder;
use meshpath_lab::capture::Capture;
use meshpath_lab::chain::{Foreign, Verdict, tcx_chain};
use meshpath_lab::lab::BRIDGE_IF;
use meshpath_lab::smoke::{self, APP_PORT};
use meshpath_lab::{Lab, POD_CIDRS, Topology, raw, traffic};

use support::{meshpath, send, started_lab, wait_until};

fn every_scenario_in(topology: Topology) -> Result<()> {
    let mut lab = Lab::build_with(&meshpath(), topology).context("building the lab")?;
    lab.start_daemons()?;
    let smoke::Smoke { outcomes, evidence } = smoke::run_all(&lab)?;
    println!("{} topology; TLS evidence: {}", topology.name(), evidence.summary());
    ensure!(outcomes.iter().all(|o| o.ok), "{} topology:\n{}", topology.name(), smoke::table(&outcomes));

    probes_from_the_node_reach_enrolled_pods(&lab)?;
    let uplink = if topology == Topology::L3 { "uplink, no Ethernet header" } else { "uplink" };
    let pod = if topology == Topology::Bridge { "bridged pod interface" } else { "routed pod interface" };
    for (ifname, want) in [("vpa", pod), ("ul0", uplink)] {
        let got = topology_in_status(&lab, ifname)?;
        ensure!(got.as_deref() == Some(want), "status calls {ifname} {got:?}, not {want:?}");
    }

    // Killed, node 1's proxy takes its pods' traffic down with it, in both directions.
    let _servers = smoke::start_servers(&lab)?;
    lab.stop_daemon(0, true)?;
    let before = lab.counters(0)?.missing_socket;
    for (from, to) in [("a", "c"), ("d", "a"), ("b", "a")] {
        let r = send(&lab, from, to, Duration::from_millis(1500));
        ensure!(r.is_err(), "{from} -> {to} bypassed the killed proxy ({}): {r:?}", topology.name());
    }
    // Dropped by the datapath for want of a listener, not lost some other way.
    let after = lab.counters(0)?.missing_socket;
    ensure!(after >= before + 3, "missing_socket went from {before} to {after} for 3 refused connections");
    for n in 0..2 {
        lab.stop_daemon(n, false)?;
        lab.uninstall(n)?;
        let left = lab.leftovers(n)?;
        ensure!(left.is_empty(), "node {} still holds: {left:#?}", n + 1);
    }
    Ok(())
}

/// kubelet's probes come from the node itself: they are not captured (as in Istio's ambient
/// mode) and must keep working, both families.
fn probes_from_the_node_reach_enrolled_pods(lab: &Lab) -> Result<()> {
    let _servers = smoke::start_servers(lab)?;
    let node = &lab.nodes[0].name;
    for v6 in [false, true] {
        let to = lab.addr("a", v6, APP_PORT);
        let x = traffic::exchange(node, None, to, &traffic::payload(512), Duration::from_secs(3))
            .with_context(|| format!("a probe from node 1 to {to}"))?;
        ensure!(x.echoed_intact, "probe to {to}: echo garbled");
        let client = x.client;
        // A record is written when the connection closes: give it that moment.
        let record = lab.wait_record(0, Duration::from_millis(500), |r| r.src == client)?;
        ensure!(record.is_none(), "the probe to {to} went through the proxy: {record:?}");
    }
    Ok(())
}

/// What `meshpath status` on node 1 calls `ifname` (its ingress attachment).
fn topology_in_status(lab: &Lab, ifname: &str) -> Result<Option<String>> {
    let mut args = vec!["status", "--node", &lab.nodes[0].name, "-o", "json"];
    for c in POD_CIDRS {
        args.extend(["--pod-cidr", c]);
    }
    let status: serde_json::Value = serde_json::from_str(&lab.meshpath(0, &args)?)?;
    let attachments = status["attachments"].as_array().context("no attachments in status")?;
    Ok(attachments
        .iter()
        .find(|a| a["interface"] == ifname && a["direction"] == "ingress")
        .and_then(|a| a["topology"].as_str())
        .map(str::to_owned))
}

#[test]
fn routed_pod_veths_pass_every_scenario() -> Result<()> {
    every_scenario_in(Topology::Routed)
}

/// The node link has no Ethernet header (tun standing in for IPIP or WireGuard): the
/// classifier reads packets from offset 0 there, and HBONE, spoof checks and plaintext
/// policy work across it as across a veth.
#[test]
fn a_node_link_without_ethernet_header_passes_every_scenario() -> Result<()> {
    every_scenario_in(Topology::L3)
}

/// flannel's wiring: pods on `cni0`, the other node over VXLAN. Pods on one bridge are
/// switched at L2, so the classifier runs on each pod's port and readdresses what it
/// captures to the bridge; each pod's port is read from its namespace.
#[test]
fn a_bridge_cni_with_vxlan_between_nodes_passes_every_scenario() -> Result<()> {
    every_scenario_in(Topology::Bridge)
}

/// Another CNI's programs in the same TCX chain: one with no opinion before meshpath's, one
/// accepting after it, and one redirecting after it on a pod meshpath does not capture.
#[test]
fn another_cnis_tcx_programs_before_and_after_meshpaths_keep_their_verdicts() -> Result<()> {
    let mut lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let n1 = lab.nodes[0].name.clone();
    let captured_by_node_1 = |lab: &Lab| -> Result<()> {
        let client = send(lab, "a", "c", Duration::from_secs(3)).context("a -> c")?.client;
        let record = lab.wait_record(0, Duration::from_secs(3), |r| r.src == client && r.listener == "outbound")?;
        ensure!(record.is_some(), "a -> c was not captured by node 1's proxy");
        Ok(())
    };

    let _next = Foreign::attach(&lab.dir, &n1, "vpa", Verdict::Next, LinkOrder::first())?;
    let _pass = Foreign::attach(&lab.dir, &n1, "vpa", Verdict::Pass, LinkOrder::last())?;
    let chain = tcx_chain(&n1, "vpa")?;
    println!("vpa ingress: {chain:?}");
    ensure!(chain == ["cni_next", "mp_tc_ingress", "cni_pass"], "chain: {chain:?}");
    captured_by_node_1(&lab)?;

    // A program ahead of meshpath's could accept or redirect packets before the capture: the
    // safety tick notices and says so (once), and the classifier stays attached and enrolled.
    wait_until("the daemon to warn about the program ahead of it", Duration::from_secs(12), || {
        Ok(std::fs::read_to_string(lab.daemon_log_path(0))?.contains("another program runs ahead of meshpath's"))
    })?;
    ensure!(tcx_chain(&n1, "vpa")? == chain, "the chain changed: {:?}", tcx_chain(&n1, "vpa"));
    captured_by_node_1(&lab)?;

    // A restarted daemon attaches at the head again.
    lab.stop_daemon(0, false)?;
    lab.start_daemon(0)?;
    let chain = tcx_chain(&n1, "vpa")?;
    println!("vpa ingress after a restart: {chain:?}");
    ensure!(chain == ["mp_tc_ingress", "cni_next", "cni_pass"], "chain after restart: {chain:?}");
    captured_by_node_1(&lab)?;

    // meshpath has no opinion on b's traffic (TCX_NEXT, not TCX_PASS), so a redirect after it
    // happens: here back into b, so b -> d no longer gets through, until it is detached.
    send(&lab, "b", "d", Duration::from_secs(3)).context("b -> d before the redirect")?;
    let vpb = ifindex(&n1, "vpb")?;
    let redirect = Foreign::attach(&lab.dir, &n1, "vpb", Verdict::RedirectTo(vpb), LinkOrder::last())?;
    ensure!(tcx_chain(&n1, "vpb")? == ["mp_tc_ingress", "cni_redirect"], "vpb chain: {:?}", tcx_chain(&n1, "vpb"));
    let r = send(&lab, "b", "d", Duration::from_millis(1500));
    ensure!(r.is_err(), "b -> d got through although the program after meshpath's redirects it: {r:?}");
    drop(redirect);
    send(&lab, "b", "d", Duration::from_secs(3)).context("b -> d once the redirect is detached")?;
    Ok(())
}

/// Behind a bridge the node reaches a pod through its neighbour entry, which any pod with
/// CAP_NET_RAW (a default) can forge with one ARP answer: the proxy's plaintext leg to an
/// enrolled pod would then be switched to the forger's port. The datapath drops TCP to an
/// enrolled pod leaving through a port it does not live behind.
#[test]
fn a_forged_arp_answer_does_not_hand_an_enrolled_pods_traffic_to_another_pod() -> Result<()> {
    let mut lab = Lab::build_with(&meshpath(), Topology::Bridge).context("building the lab")?;
    lab.start_daemons()?;
    let _servers = smoke::start_servers(&lab)?;
    let n1 = lab.nodes[0].name.clone();
    // Through the proxy first, so the node has a neighbour entry for a to overwrite.
    send(&lab, "d", "a", Duration::from_secs(3)).context("d -> a before the forgery")?;
    let (a, b) = (lab.pod("a").clone(), lab.pod("b").clone());
    let (IpAddr::V4(a_ip), IpAddr::V4(gateway)) = (a.v4, "10.244.1.1".parse()?) else { bail!("IPv4 expected") };
    let b_mac = raw::mac_of(&b.netns, "eth0")?;
    let bridge_mac = raw::mac_of(&n1, BRIDGE_IF)?;
    // Past the neighbour entry's locktime (1 s), within which an answer would be ignored.
    std::thread::sleep(Duration::from_millis(1200));
    raw::send_frame(&b.netns, "eth0", &raw::arp_reply(b_mac, a_ip, bridge_mac, gateway))?;
    let neigh = support::ip(&n1, &["-4", "neigh", "show", &a_ip.to_string(), "dev", BRIDGE_IF])?;
    let b_text: Vec<String> = b_mac.iter().map(|x| format!("{x:02x}")).collect();
    ensure!(neigh.contains(&b_text.join(":")), "the forged answer did not take, so this proves nothing: {neigh}");

    let before = lab.counters(0)?.spoof_dropped;
    let capture = Capture::start(&b.netns, "eth0")?;
    let r = send(&lab, "d", "a", Duration::from_millis(1500));
    let to_a = capture.stop()?.iter().filter(|s| s.dst.ip() == a.v4).count();
    ensure!(to_a == 0, "{to_a} TCP segments for a reached b's interface");
    ensure!(r.is_err(), "d -> a got through while the node's entry for a named b: {r:?}");
    ensure!(lab.counters(0)?.spoof_dropped > before, "spoof_dropped did not count the misdelivery");
    ensure!(
        std::fs::read_to_string(lab.daemon_log_path(0))?.contains("reason=\"misdelivered\""),
        "no misdelivered drop in node 1's log"
    );
    Ok(())
}

/// Behind a pod bridge (flannel's and k3s's `cni0`) only the pods' namespaces tell which
/// port each pod is on: a node whose namespace directory cannot be read is refused at start
/// with the reason, and nothing is left in the kernel.
#[test]
fn a_pod_bridge_without_readable_pod_namespaces_is_refused_with_the_reason() -> Result<()> {
    let mut lab = Lab::build_with(&meshpath(), Topology::Bridge).context("building the lab")?;
    lab.daemon_args.extend(["--netns-dir".into(), "/nonexistent/netns".into()]);
    let err = lab.start_daemon(0).expect_err("a node with a pod bridge must not start").to_string();
    ensure!(
        err.contains("cni0 is a bridge with pods behind it") && err.contains("/nonexistent/netns"),
        "unexpected refusal: {err}"
    );
    let left = lab.leftovers(0)?;
    ensure!(left.is_empty(), "the refused start left: {left:#?}");
    Ok(())
}

/// Namespaces on the host that are not this node's pods claim nothing. Here another lab's:
/// its pods hold the same addresses, every pod's interface has the same index, and (routed,
/// so its nodes have no bridge and no VXLAN device) its pod e's peer has the index of this
/// node's port vpa. Every bridged pod is enrolled behind its own port and its traffic flows.
#[test]
fn another_labs_pods_with_the_same_addresses_do_not_take_a_bridged_pods_port() -> Result<()> {
    let _other = Lab::build_with(&meshpath(), Topology::Routed).context("building the other lab")?;
    let mut lab = Lab::build_with(&meshpath(), Topology::Bridge).context("building the lab")?;
    lab.start_daemons()?;
    for pod in lab.pods.iter().filter(|p| p.enrolled) {
        let port = ifindex(&lab.nodes[pod.node].name, &pod.host_if)?;
        let want = [pod.v4, pod.v6];
        // The first pass may still be under way when readiness is up: give it a moment.
        let enrolled = |lab: &Lab| -> Result<bool> {
            let map = lab.workload_map(pod.node)?;
            Ok(want.iter().all(|ip| map.get(ip) == Some(&port)))
        };
        let waited =
            wait_until(&format!("pod {} enrolled behind {}", pod.name, pod.host_if), Duration::from_secs(5), || {
                enrolled(&lab)
            });
        if let Err(e) = waited {
            let map = lab.workload_map(pod.node)?;
            bail!("{e}: {:?} -> {:?}", want, want.map(|ip| map.get(&ip).copied()));
        }
    }
    let _servers = smoke::start_servers(&lab)?;
    for (from, to) in [("a", "e"), ("e", "a"), ("d", "a"), ("a", "c"), ("c", "e")] {
        send(&lab, from, to, Duration::from_secs(3)).with_context(|| format!("{from} -> {to}"))?;
    }
    for n in 0..2 {
        let log = std::fs::read_to_string(lab.daemon_log_path(n))?;
        ensure!(!log.contains("not enrolled"), "node {} left a pod out:\n{log}", n + 1);
    }
    Ok(())
}

fn ifindex(ns: &str, ifname: &str) -> Result<u32> {
    let name = ifname.to_owned();
    Ok(traffic::in_netns(ns, move || nix::net::if_::if_nametoindex(name.as_str()))??)
}
