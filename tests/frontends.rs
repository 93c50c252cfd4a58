//! Connections through the node's NAT (kube-proxy's ClusterIP, NodePort, LoadBalancer and
//! external addresses, a hostPort: [`frontends`]) toward an enrolled pod reach it through
//! the proxy, are recorded with the frontend the client dialed, are decided like a direct
//! connection, and nothing reaches the pod around the proxy.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshpath::record::{ConnectionRecord, Outcome};
use meshpath_lab::capture::Capture;
use meshpath_lab::frontends::{self, Kind, TARGET};
use meshpath_lab::smoke::APP_PORT;
use meshpath_lab::{Lab, smoke, traffic};

mod support;
use support::{built_lab, wait_until};

const TIMEOUT: Duration = Duration::from_secs(3);
/// How long a refused connection is given.
const REFUSED: Duration = Duration::from_millis(1500);

/// A lab with both daemons up (the nodes in `strict` refuse plaintext), echo servers on
/// every pod and the frontends installed.
fn lab(strict: &[usize]) -> Result<(Lab, Vec<traffic::EchoServer>)> {
    let mut lab = built_lab()?;
    lab.strict_nodes = strict.to_vec();
    lab.start_daemons().context("starting the daemons")?;
    let servers = smoke::start_servers(&lab)?;
    frontends::install(&lab, APP_PORT)?;
    Ok((lab, servers))
}

fn dial(lab: &Lab, client: &str, kind: Kind, v6: bool, timeout: Duration) -> std::io::Result<traffic::Exchange> {
    traffic::exchange(&lab.pod(client).netns, None, kind.addr(lab, v6), &traffic::payload(20_000), timeout)
}

/// The record node `node` wrote of a connection from `client` to `dst`, since `since_ms`
/// (a masquerading node may have changed the client's port).
fn record_of(lab: &Lab, node: usize, client: IpAddr, dst: SocketAddr, since_ms: u64) -> Result<ConnectionRecord> {
    lab.wait_record(node, TIMEOUT, |r| r.src.ip() == client && r.orig_dst == dst && r.start_ms >= since_ms)?
        .with_context(|| format!("node {} has no record of {client} -> {dst}", node + 1))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[test]
fn every_frontend_leads_to_the_pod_through_the_proxy_and_nothing_goes_around_it() -> Result<()> {
    let (lab, _servers) = lab(&[1])?;
    let node1 = lab.nodes[0].name.clone();
    let capture = Capture::start(&node1, &lab.pod(TARGET).host_if)?;
    let before = lab.counters(0)?;
    let mut plain = 0;
    // Clients outside the mesh, on the pod's node and on the other: inbound plaintext.
    for kind in Kind::ALL {
        for v6 in [false, true] {
            for client in ["b", "d"] {
                let what = format!("{client} -> {} ({})", kind.name(), if v6 { "v6" } else { "v4" });
                let since = now_ms();
                let x = dial(&lab, client, kind, v6, TIMEOUT).with_context(|| what.clone())?;
                ensure!(x.echoed_intact, "{what}: the payload came back altered");
                let seen = kind.source_seen(&lab, client, v6);
                ensure!(x.server_saw.ip() == seen, "{what}: the pod saw {}, not {seen}", x.server_saw);
                let pod = lab.addr(TARGET, v6, APP_PORT);
                let r = record_of(&lab, 0, seen, pod, since).with_context(|| what.clone())?;
                ensure!(r.listener == "inbound_plain" && r.outcome == Outcome::Ok, "{what}: {r:?}");
                // A ClusterIP dialed on the other node was turned there: node 1 saw the pod.
                let dialed = kind.addr(&lab, v6);
                let frontend = (kind.nat_node(&lab, client) == 0).then_some(dialed);
                ensure!(r.frontend == frontend, "{what}: frontend {:?}, want {frontend:?}", r.frontend);
                plain += 1;
            }
        }
    }
    // Enrolled clients through the same frontends: the pod's node (outbound, delivered on
    // the node) and the other node (outbound there; a ClusterIP becomes HBONE, an address
    // of node 1 is plaintext from node 2's proxy).
    for kind in Kind::ALL {
        for v6 in [false, true] {
            let what = |c: &str| format!("{c} -> {} ({})", kind.name(), if v6 { "v6" } else { "v4" });
            let (pod, dialed) = (lab.addr(TARGET, v6, APP_PORT), kind.addr(&lab, v6));
            let since = now_ms();
            let x = dial(&lab, "e", kind, v6, TIMEOUT).with_context(|| what("e"))?;
            let r = record_of(&lab, 0, x.client.ip(), pod, since).with_context(|| what("e"))?;
            ensure!(r.listener == "outbound" && r.outcome == Outcome::Ok, "{}: {r:?}", what("e"));
            ensure!(r.frontend == Some(dialed), "{}: frontend {:?}", what("e"), r.frontend);
            let since = now_ms();
            let x = dial(&lab, "c", kind, v6, TIMEOUT).with_context(|| what("c"))?;
            ensure!(x.echoed_intact, "{}: the payload came back altered", what("c"));
            // Node 2 turns only the ClusterIP; node 1's addresses go there as dialed.
            let seen = if kind.nat_node(&lab, "c") == 1 { pod } else { dialed };
            let r = record_of(&lab, 1, x.client.ip(), seen, since).with_context(|| what("c"))?;
            ensure!(r.listener == "outbound" && r.outcome == Outcome::Ok, "{}: {r:?}", what("c"));
            // Through node 1's own address it arrives as plaintext from node 2's proxy, and
            // node 1's proxy takes it (its record is written when its own relay ends).
            if kind.nat_node(&lab, "c") == 0 {
                let relayed = r.upstream_src.with_context(|| format!("{}: no upstream on node 2", what("c")))?;
                let hop = lab
                    .wait_record(0, TIMEOUT, |h| h.src == relayed && h.orig_dst == pod)?
                    .with_context(|| format!("{}: node 1 has no record of {relayed}", what("c")))?;
                ensure!(hop.listener == "inbound_plain" && hop.frontend == Some(dialed), "{}: {hop:?}", what("c"));
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let segments = capture.stop()?;
    // Every connection that reached the pod was opened by node 1's proxy.
    let pod = [lab.addr(TARGET, false, APP_PORT), lab.addr(TARGET, true, APP_PORT)];
    let syns: Vec<SocketAddr> =
        segments.iter().filter(|s| s.syn && !s.ack && pod.contains(&s.dst)).map(|s| s.src).collect();
    ensure!(syns.len() >= plain, "the capture saw {} connections to the pod, fewer than were made", syns.len());
    // A record is written when its relay ends, which may trail the client's last read.
    let around = || -> Result<Vec<SocketAddr>> {
        let proxied: BTreeSet<SocketAddr> =
            lab.records(0)?.into_iter().filter(|r| pod.contains(&r.orig_dst)).filter_map(|r| r.upstream_src).collect();
        Ok(syns.iter().filter(|s| !proxied.contains(s)).copied().collect())
    };
    let settled =
        wait_until("node 1's records of every connection the capture saw", TIMEOUT, || Ok(around()?.is_empty()));
    ensure!(settled.is_ok(), "connections reached the pod around the proxy from {:?}", around()?);
    let after = lab.counters(0)?;
    ensure!(after.undelivered == before.undelivered, "node 1 dropped some as undelivered: {before:?} -> {after:?}");
    ensure!(after.steered >= before.steered + plain as u64, "node 1 steered too few: {before:?} -> {after:?}");
    Ok(())
}

#[test]
fn a_strict_pod_refuses_plaintext_through_a_frontend_as_it_does_directly() -> Result<()> {
    let (lab, _servers) = lab(&[0, 1])?;
    for (client, kind, v6) in [
        ("b", Kind::NodePort, false),
        ("b", Kind::ClusterIp, true),
        ("b", Kind::HostPort, false),
        ("d", Kind::LoadBalancer, false),
        ("d", Kind::ExternalIp, true),
        ("d", Kind::NodePort, true),
    ] {
        let what = format!("{client} -> {} ({})", kind.name(), if v6 { "v6" } else { "v4" });
        let started = now_ms();
        let res = dial(&lab, client, kind, v6, REFUSED);
        ensure!(res.is_err(), "{what}: delivered to a strict pod: {res:?}");
        let client_ip = kind.source_seen(&lab, client, v6);
        let dialed = kind.addr(&lab, v6);
        let refused = lab.wait_record(0, TIMEOUT, |r| {
            r.src.ip() == client_ip
                && r.start_ms >= started
                && r.outcome == Outcome::PlaintextRefused
                && r.frontend == Some(dialed)
        })?;
        ensure!(refused.is_some(), "{what}: node 1 recorded no plaintext refusal naming {dialed}");
    }
    // With an identity, the same frontends still lead there.
    for (client, kind) in [("e", Kind::NodePort), ("e", Kind::LoadBalancer), ("c", Kind::ClusterIp)] {
        let x = dial(&lab, client, kind, false, TIMEOUT).with_context(|| format!("{client} -> {}", kind.name()))?;
        ensure!(x.echoed_intact, "{client} -> {}: the payload came back altered", kind.name());
    }
    Ok(())
}

#[test]
fn a_spoofed_source_toward_a_nodeport_is_still_dropped() -> Result<()> {
    let (lab, _servers) = lab(&[1])?;
    let nodeport = Kind::NodePort.addr(&lab, false);
    let before = lab.counters(0)?.spoof_dropped;
    // Node 2 claims the enrolled pod a's address; pod b claims c's (a pod of the other node).
    for (ns, forged) in [(lab.nodes[1].name.clone(), lab.pod("a").v4), (lab.pod("b").netns.clone(), lab.pod("c").v4)] {
        let res = traffic::exchange(&ns, Some(forged), nodeport, b"x", REFUSED);
        ensure!(res.is_err(), "{forged} from {ns} reached the pod: {res:?}");
    }
    wait_until("node 1 to count both spoofs", TIMEOUT, || Ok(lab.counters(0)?.spoof_dropped >= before + 2))?;
    Ok(())
}
