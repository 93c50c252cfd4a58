//! The chained CNI plugin, run as a runtime runs it ([`meshpath_lab::cni`]): a pod of the
//! mesh is in the map before its ADD returns, so its first packet goes through the proxy; a
//! node whose daemon is down holds the mesh's pods and no other; the ports the plugin
//! reported stand in for reading the pods' namespaces, across a daemon restart.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshpath_common::names::PORT_HBONE;
use meshpath_lab::capture::{Capture, Segment};
use meshpath_lab::lab::{Topology, VXLAN_IF};
use meshpath_lab::smoke::APP_PORT;
use meshpath_lab::{Lab, smoke, traffic};

mod support;
use support::{meshpath, started_lab, wait_until};

const TIMEOUT: Duration = Duration::from_secs(3);

/// One request/response from `from` to `to` in one family.
fn send(lab: &Lab, from: &str, to: &str, v6: bool) -> std::io::Result<traffic::Exchange> {
    traffic::exchange(&lab.pod(from).netns, None, lab.addr(to, v6, APP_PORT), &traffic::payload(4096), TIMEOUT)
}

/// The segments `pod` sent around the proxy: from one of its addresses, to anything but a
/// peer's HBONE port (the proxy opens HBONE from the pod's own address, as ztunnel does).
fn around<'a>(lab: &Lab, pod: &str, segments: &'a [Segment]) -> Vec<&'a Segment> {
    let p = lab.pod(pod);
    let ips: BTreeSet<IpAddr> = [p.v4, p.v6].into();
    segments.iter().filter(|s| ips.contains(&s.src.ip()) && s.dst.port() != PORT_HBONE).collect()
}

/// The pods the lab's workload file enrols, with `extra`.
fn enrol(lab: &Lab, extra: &[&str]) -> Result<()> {
    let mut names: Vec<&str> = lab.pods.iter().filter(|p| p.enrolled).map(|p| p.name).collect();
    names.extend(extra);
    Ok(lab.write_workloads(&names)?)
}

/// Whether both of `pod`'s addresses are in `node`'s map behind an interface.
fn mapped(lab: &Lab, node: usize, pod: &str) -> Result<bool> {
    let map = lab.workload_map(node)?;
    let p = lab.pod(pod);
    Ok([p.v4, p.v6].iter().all(|ip| map.get(ip).is_some_and(|ifx| *ifx != 0)))
}

#[test]
fn a_pod_of_the_mesh_sends_its_first_packet_through_the_proxy_in_every_topology() -> Result<()> {
    for topology in [Topology::Routed, Topology::Bridge, Topology::L3] {
        first_packet_through_the_proxy(topology).with_context(|| format!("{topology:?} topology"))?;
    }
    Ok(())
}

/// A new pod f sends the instant its ADD returns. Nothing of it may cross to the other node
/// around the proxy (the capture on the node link; flannel's VXLAN device in the bridge
/// topology, where the link carries it encapsulated), and every connection reaching pod c
/// from f's address must be one node 2's proxy opened (the capture on c's veth).
fn first_packet_through_the_proxy(topology: Topology) -> Result<()> {
    let mut lab = Lab::build_with(&meshpath(), topology).context("building the lab")?;
    lab.start_daemons()?;
    let _servers = smoke::start_servers(&lab)?;
    let link = if topology == Topology::Bridge { VXLAN_IF } else { "ul0" };
    // From before the pod exists: every packet it ever sends across.
    let uplink = Capture::start(&lab.nodes[0].name, link)?;
    let peer = Capture::start(&lab.nodes[1].name, &lab.pod("c").host_if)?;
    lab.add_pod("f", 0, true, 20)?;
    enrol(&lab, &["f"])?;
    let add = lab.cni("f", "ADD")?;
    ensure!(add.ok, "ADD failed: {}", add.msg());
    // What the pod's first container would do the instant the chain returns.
    let v4 = send(&lab, "f", "c", false);
    let v6 = send(&lab, "f", "c", true);
    std::thread::sleep(Duration::from_millis(300));
    let (segments, at_peer) = (uplink.stop()?, peer.stop()?);
    v4.context("f -> c (IPv4), its first connection")?;
    v6.context("f -> c (IPv6)")?;
    let around = around(&lab, "f", &segments);
    let hbone = segments.iter().filter(|s| s.dst.port() == PORT_HBONE).count();
    println!(
        "{topology:?}: the interface up to ADD returned: {:?}; {link}: {hbone} HBONE segments, {} of f's around the proxy",
        add.took,
        around.len()
    );
    ensure!(hbone > 0, "the capture on {link} saw no HBONE: it proves nothing");
    ensure!(around.is_empty(), "f's packets crossed {link} around the proxy: {:?}", &around[..around.len().min(5)]);
    let f = lab.pod("f");
    let f_ips: BTreeSet<IpAddr> = [f.v4, f.v6].into();
    let syns: Vec<&Segment> = at_peer.iter().filter(|s| s.syn && !s.ack && f_ips.contains(&s.src.ip())).collect();
    ensure!(syns.len() >= 2, "c's veth saw {} connections from f, not its 2: the capture proves nothing", syns.len());
    let relayed = |s: &Segment| -> Result<bool> {
        Ok(lab.wait_record(1, TIMEOUT, |r| r.listener == "hbone" && r.upstream_src == Some(s.src))?.is_some())
    };
    for syn in syns {
        ensure!(relayed(syn)?, "{} reached c without node 2's proxy opening it", syn.src);
    }
    let log = std::fs::read_to_string(meshpath::cni::log_path(&lab.nodes[0].name))?;
    ensure!(log.contains("ADD: enrolled"), "the plugin's log does not say it enrolled f:\n{log}");
    Ok(())
}

#[test]
fn a_stopped_daemon_holds_the_meshs_pods_and_no_other() -> Result<()> {
    let mut lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    lab.add_pod("f", 0, true, 20)?;
    lab.add_pod("g", 0, false, 21)?;
    enrol(&lab, &["f"])?;
    lab.stop_daemon(0, false)?;
    let socket = meshpath::cni::plugin::socket_path(&lab.nodes[0].name);
    let refused = lab.cni("f", "ADD")?;
    ensure!(!refused.ok, "ADD of a mesh pod went through with the daemon stopped: {}", refused.stdout);
    ensure!(refused.code() == Some(11), "not 'try again later': {}", refused.stdout);
    let msg = refused.msg();
    ensure!(msg.contains(&socket.display().to_string()) && msg.contains("is not running"), "{msg}");
    // The pod is not in the mesh: nothing to wait for. An excluded namespace is not even read.
    let g = lab.cni("g", "ADD")?;
    ensure!(g.ok, "a pod outside the mesh was held up: {}", g.msg());
    let system = lab.cni_in("f", "kube-system", "ADD")?;
    ensure!(system.ok, "a kube-system pod was held up: {}", system.msg());
    // The runtime tears the failed sandbox down and retries with a new one.
    lab.remove_pod("f")?;
    lab.add_pod("f", 0, true, 20)?;
    lab.start_daemon(0)?;
    let retried = lab.cni("f", "ADD")?;
    ensure!(retried.ok, "the retry failed with the daemon back: {}", retried.msg());
    ensure!(mapped(&lab, 0, "f")?, "f is not in the map after its ADD");
    send(&lab, "f", "c", false).context("f -> c after the retry")?;
    Ok(())
}

#[test]
fn a_daemon_killed_during_an_add_fails_it_at_once() -> Result<()> {
    let mut lab = started_lab()?;
    lab.add_pod("h", 0, true, 22)?;
    // Its veth down: no route, so the daemon cannot enrol it yet and the ADD waits.
    let node = lab.nodes[0].name.clone();
    support::ip(&node, &["link", "set", "vph", "down"])?;
    enrol(&lab, &["h"])?;
    let pending = lab.cni_spawn("h", meshpath_lab::cni::POD_NAMESPACE, "ADD")?;
    std::thread::sleep(Duration::from_millis(700));
    lab.stop_daemon(0, true)?;
    let run = pending.wait()?;
    ensure!(!run.ok, "the ADD succeeded although the pod was never enrolled: {}", run.stdout);
    ensure!(run.took < Duration::from_secs(3), "the ADD waited {:?} after the daemon died", run.took);
    ensure!(run.msg().contains("did not answer"), "{}", run.msg());
    // The runtime retries with a new sandbox.
    lab.start_daemon(0)?;
    lab.remove_pod("h")?;
    lab.add_pod("h", 0, true, 22)?;
    let retried = lab.cni("h", "ADD")?;
    ensure!(retried.ok, "the retry failed: {}", retried.msg());
    ensure!(mapped(&lab, 0, "h")?, "h is not in the map after its ADD");
    Ok(())
}

#[test]
fn reported_ports_stand_in_for_the_pods_namespaces_across_a_restart() -> Result<()> {
    // A bridge CNI: without the plugin, a pod's port is read from its namespace. With an
    // empty namespace directory, only the plugin's word places the pods.
    let mut lab = Lab::build_with(&meshpath(), Topology::Bridge).context("building the lab")?;
    let empty = lab.dir.join("no-namespaces");
    std::fs::create_dir_all(&empty)?;
    lab.daemon_args = vec!["--netns-dir".into(), empty.display().to_string()];
    lab.start_daemons()?;
    let _servers = smoke::start_servers(&lab)?;
    ensure!(!mapped(&lab, 0, "a")?, "a is enrolled without its namespace or the plugin");
    lab.cni_add_all()?;
    let port = |lab: &Lab| -> Result<u32> {
        let text = support::ip(&lab.nodes[0].name, &["-o", "link", "show", "vpa"])?;
        Ok(text.split(':').next().unwrap_or("").trim().parse()?)
    };
    let vpa = port(&lab)?;
    ensure!(lab.workload_map(0)?.get(&lab.pod("a").v4) == Some(&vpa), "a is not behind its port vpa ({vpa})");
    send(&lab, "a", "c", false).context("a -> c")?;
    lab.stop_daemon(0, false)?;
    lab.start_daemon(0)?;
    // The restarted daemon has the ports from the plugin's earlier word, without its ADDs.
    wait_until("a behind vpa after the restart", Duration::from_secs(5), || {
        Ok(lab.workload_map(0)?.get(&lab.pod("a").v4) == Some(&vpa))
    })?;
    send(&lab, "a", "c", false).context("a -> c after the restart")?;
    // DEL lets it go (after the release hold, or at once when its namespace is gone).
    let del = lab.cni("a", "DEL")?;
    ensure!(del.ok, "DEL failed: {}", del.msg());
    wait_until("a released", support::RELEASE, || Ok(!mapped(&lab, 0, "a")?))?;
    Ok(())
}

#[test]
fn after_a_reboot_no_pod_of_the_mesh_starts_before_its_daemon_has_it() -> Result<()> {
    let mut lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    lab.cni_add_all()?;
    // The reboot of node 1: its daemon, its pins, rules and routes, its /run and its pods go.
    lab.stop_daemon(0, true)?;
    lab.uninstall(0)?;
    let node = lab.nodes[0].name.clone();
    std::fs::remove_dir_all(std::path::Path::new(meshpath_common::names::STATE_DIR).join(&node))?;
    let pods: Vec<(&'static str, bool, u8)> = lab
        .pods
        .iter()
        .filter(|p| p.node == 0)
        .map(|p| (p.name, p.enrolled, p.v4.to_string().rsplit('.').next().unwrap_or("0").parse().unwrap_or(0)))
        .collect();
    for (name, ..) in &pods {
        lab.remove_pod(name)?;
    }
    let uplink = Capture::start(&node, "ul0")?;
    // kubelet starts every sandbox; the DaemonSet's pod is among them, not first.
    let mut waiting: Vec<(&'static str, bool, u8)> = pods.clone();
    let mut attempts = 0;
    let mut started = Vec::new();
    while !waiting.is_empty() {
        attempts += 1;
        ensure!(attempts < 100, "pods {waiting:?} never started");
        if attempts == 3 {
            lab.spawn_daemon(0)?;
        }
        let mut still = Vec::new();
        for (name, enrolled, host) in waiting {
            lab.add_pod(name, 0, enrolled, host)?;
            let add = lab.cni(name, "ADD")?;
            if add.ok {
                // Its containers start: traffic at once.
                if enrolled {
                    send(&lab, name, "c", false).with_context(|| format!("{name} -> c, the instant it started"))?;
                }
                started.push((name, attempts));
            } else {
                ensure!(enrolled, "{name}, outside the mesh, was held up: {}", add.msg());
                lab.remove_pod(name)?;
                still.push((name, enrolled, host));
            }
        }
        waiting = still;
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.wait_ready(0, Duration::from_secs(20))?;
    for (name, ..) in pods.iter().filter(|(_, enrolled, _)| *enrolled) {
        send(&lab, name, "c", true).with_context(|| format!("{name} -> c (IPv6) after the start"))?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let segments = uplink.stop()?;
    println!("pods started at attempt: {started:?}");
    let hbone = segments.iter().filter(|s| s.dst.port() == PORT_HBONE).count();
    ensure!(hbone > 0, "the capture saw no HBONE: it proves nothing");
    for (name, ..) in pods.iter().filter(|(_, enrolled, _)| *enrolled) {
        let around = around(&lab, name, &segments);
        ensure!(
            around.is_empty(),
            "{name} sent around the proxy after the reboot: {:?}",
            &around[..around.len().min(3)]
        );
    }
    // The pod outside the mesh started on the first attempt, its mesh neighbours only after
    // the daemon came.
    ensure!(started.iter().any(|(n, a)| *n == "b" && *a == 1), "b did not start at once: {started:?}");
    ensure!(started.iter().filter(|(n, _)| *n != "b").all(|(_, a)| *a >= 3), "{started:?}");
    Ok(())
}

#[test]
fn the_daemons_socket_is_root_only_and_answers_garbage_with_nothing_and_floods_hold_no_one_up() -> Result<()> {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::net::UnixStream;
    let mut lab = started_lab()?;
    let socket = meshpath::cni::plugin::socket_path(&lab.nodes[0].name);
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "{} is {mode:o}, not root-only", socket.display());
    let exchange = |bytes: &[u8]| -> Result<String> {
        let mut s = UnixStream::connect(&socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // A peer may close on an oversized line before taking all of it.
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        Ok(answer)
    };
    for (what, bytes) in [
        ("garbage", b"nonsense\n".to_vec()),
        ("a line of 200 kB", vec![b'x'; 200_000]),
        ("half a request", b"{\"add\":".to_vec()),
        ("nothing", Vec::new()),
    ] {
        ensure!(exchange(&bytes)?.is_empty(), "{what} got an answer");
    }
    // A well-formed request for a pod without an address is refused, with the reason.
    let empty = r#"{"add":{"pod":{"namespace":"lab","name":"x","service_account":"sa"},"container_id":"c","netns":"/run/netns/x","host_interfaces":[],"ips":[]}}"#;
    let answer = exchange(format!("{empty}\n").as_bytes())?;
    ensure!(answer.contains("refused") && answer.contains("the pod has no address"), "{answer}");
    // The daemon serves on: a pod's ADD goes through, also beside 300 silent connections
    // (each waits alone for its request: none holds a real one up).
    lab.add_pod("f", 0, true, 20)?;
    enrol(&lab, &["f"])?;
    let silent = (0..300).map(|_| UnixStream::connect(&socket)).collect::<std::io::Result<Vec<_>>>()?;
    let add = lab.cni("f", "ADD")?;
    ensure!(add.ok, "ADD beside 300 silent connections: {}", add.msg());
    ensure!(add.took < Duration::from_secs(3), "ADD beside 300 silent connections took {:?}", add.took);
    drop(silent);
    ensure!(lab.nodes[0].daemon.as_mut().context("daemon")?.try_wait()?.is_none(), "the daemon exited");
    Ok(())
}
