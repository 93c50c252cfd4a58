//! The NAT a node puts in front of its pods, as the lab plays it: iptables rules shaped like
//! kube-proxy's (iptables mode: `KUBE-SERVICES`, `KUBE-NODEPORTS`, `KUBE-MARK-MASQ`) and the
//! CNI portmap plugin's (`CNI-HOSTPORT-DNAT`), one frontend of each kind toward one pod, in
//! both families.
//!
//! The service is `externalTrafficPolicy: Local`, as a LoadBalancer in front of an ambient
//! pod is: its NodePort, LoadBalancer and external addresses are answered by node 1, the
//! pod's node; its ClusterIP by every node (a client's own node DNATs it). The node 2 side
//! routes the LoadBalancer and external prefixes to node 1, as the network in front would.
//! In the bridge topology (flannel's), pods leave the pod networks as their node
//! (flannel's `--ip-masq`): there node 1 sees node 2's address for them.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};

use crate::lab::{Lab, LabError, POD_CIDRS, Result, Topology, ip};

/// The pod every frontend leads to (enrolled, on node 1).
pub const TARGET: &str = "a";
/// The node whose NAT answers the NodePort, LoadBalancer, external and host ports.
pub const TARGET_NODE: usize = 0;
/// Service port of the ClusterIP, LoadBalancer and external addresses.
const SERVICE_PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
const HOST_PORT: u16 = 8081;
/// kube-proxy's masquerade mark.
const MASQ_MARK: &str = "0x4000";

/// A kind of frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
    HostPort,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::ClusterIp, Kind::NodePort, Kind::LoadBalancer, Kind::ExternalIp, Kind::HostPort];

    pub const fn name(self) -> &'static str {
        match self {
            Kind::ClusterIp => "ClusterIP",
            Kind::NodePort => "NodePort",
            Kind::LoadBalancer => "LoadBalancer",
            Kind::ExternalIp => "externalIP",
            Kind::HostPort => "hostPort",
        }
    }

    /// The address a client dials.
    pub fn addr(self, lab: &Lab, v6: bool) -> SocketAddr {
        let node = &lab.nodes[TARGET_NODE];
        let (ip, port): (IpAddr, u16) = match (self, v6) {
            (Kind::ClusterIp, false) => ("10.96.77.80".parse().expect("valid"), SERVICE_PORT),
            (Kind::ClusterIp, true) => ("fd00:96::80".parse().expect("valid"), SERVICE_PORT),
            (Kind::LoadBalancer, false) => ("192.168.251.80".parse().expect("valid"), SERVICE_PORT),
            (Kind::LoadBalancer, true) => ("fd00:251::80".parse().expect("valid"), SERVICE_PORT),
            (Kind::ExternalIp, false) => ("192.168.252.80".parse().expect("valid"), SERVICE_PORT),
            (Kind::ExternalIp, true) => ("fd00:252::80".parse().expect("valid"), SERVICE_PORT),
            (Kind::NodePort, false) => (node.underlay_v4, NODE_PORT),
            (Kind::NodePort, true) => (node.underlay_v6, NODE_PORT),
            (Kind::HostPort, false) => (node.underlay_v4, HOST_PORT),
            (Kind::HostPort, true) => (node.underlay_v6, HOST_PORT),
        };
        SocketAddr::new(ip, port)
    }

    /// The node whose NAT turns a connection from `client` (a pod) toward the target: a
    /// ClusterIP is DNATed on the client's own node, the rest on the target's.
    pub fn nat_node(self, lab: &Lab, client: &str) -> usize {
        match self {
            Kind::ClusterIp => lab.pod(client).node,
            _ => TARGET_NODE,
        }
    }

    /// The source the target's node sees for `client` (a pod not proxied on its own node):
    /// its own address, or its node's where flannel masquerades it (the bridge topology, an
    /// address of node 1 dialed from node 2).
    pub fn source_seen(self, lab: &Lab, client: &str, v6: bool) -> IpAddr {
        let node = lab.pod(client).node;
        if lab.topology == Topology::Bridge && node != TARGET_NODE && self != Kind::ClusterIp {
            let n = &lab.nodes[node];
            if v6 { n.underlay_v6 } else { n.underlay_v4 }
        } else {
            lab.pod(client).addr(v6)
        }
    }
}

/// Installs the frontends on both nodes, leading to the target's `port`.
pub fn install(lab: &Lab, port: u16) -> Result<()> {
    for v6 in [false, true] {
        let target = lab.addr(TARGET, v6, port);
        for node in 0..lab.nodes.len() {
            let mut r = rules(lab, node, v6, target);
            if lab.topology == Topology::Bridge {
                let cidr = POD_CIDRS[usize::from(v6)];
                r = r.replacen("COMMIT\n", &format!("-A POSTROUTING -s {cidr} ! -d {cidr} -j MASQUERADE\nCOMMIT\n"), 1);
            }
            restore(&lab.nodes[node].name, v6, &r)?;
        }
        // The network in front routes the LoadBalancer and external addresses to node 1.
        let (family, via) = if v6 {
            ("-6", lab.nodes[TARGET_NODE].underlay_v6.to_string())
        } else {
            ("-4", lab.nodes[TARGET_NODE].underlay_v4.to_string())
        };
        for kind in [Kind::LoadBalancer, Kind::ExternalIp] {
            let prefix = format!("{}/{}", kind.addr(lab, v6).ip(), if v6 { 128 } else { 32 });
            for node in (0..lab.nodes.len()).filter(|n| *n != TARGET_NODE) {
                ip(&["-n", &lab.nodes[node].name, family, "route", "add", &prefix, "via", &via])?;
            }
        }
    }
    Ok(())
}

/// The nat table of `node` for one family, in iptables-restore's format.
fn rules(lab: &Lab, node: usize, v6: bool, target: SocketAddr) -> String {
    let addr = |k: Kind| k.addr(lab, v6);
    let mut r = String::from("*nat\n");
    for chain in
        ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-MARK-MASQ", "KUBE-POSTROUTING", "KUBE-SVC-LAB", "KUBE-SEP-LAB"]
    {
        r.push_str(&format!(":{chain} - [0:0]\n"));
    }
    r.push_str(":CNI-HOSTPORT-DNAT - [0:0]\n");
    r.push_str("-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n-A POSTROUTING -j KUBE-POSTROUTING\n");
    r.push_str(&format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}\n"));
    r.push_str(&format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n"));
    r.push_str(&format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n-A KUBE-POSTROUTING -j MASQUERADE\n"));
    r.push_str(&format!("-A KUBE-SEP-LAB -p tcp -j DNAT --to-destination {target}\n-A KUBE-SVC-LAB -j KUBE-SEP-LAB\n"));
    let service = |k: Kind| {
        let a = addr(k);
        format!("-A KUBE-SERVICES -d {} -p tcp --dport {} -j KUBE-SVC-LAB\n", a.ip(), a.port())
    };
    r.push_str(&service(Kind::ClusterIp));
    if node == TARGET_NODE {
        r.push_str(&service(Kind::LoadBalancer));
        r.push_str(&service(Kind::ExternalIp));
        let np = addr(Kind::NodePort).port();
        r.push_str(&format!("-A KUBE-NODEPORTS -p tcp --dport {np} -j KUBE-MARK-MASQ\n"));
        r.push_str(&format!("-A KUBE-NODEPORTS -p tcp --dport {np} -j KUBE-SVC-LAB\n"));
        r.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
        for chain in ["PREROUTING", "OUTPUT"] {
            r.push_str(&format!("-A {chain} -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n"));
        }
        let hp = addr(Kind::HostPort).port();
        r.push_str(&format!("-A CNI-HOSTPORT-DNAT -p tcp --dport {hp} -j DNAT --to-destination {target}\n"));
    }
    r.push_str("COMMIT\n");
    r
}

/// Loads `rules` into `ns` without flushing what is there.
fn restore(ns: &str, v6: bool, rules: &str) -> Result<()> {
    let tool = if v6 { "ip6tables-restore" } else { "iptables-restore" };
    let what = format!("{tool} in {ns}");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, tool, "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn { cmd: what.clone(), source })?;
    child.stdin.take().expect("piped").write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(LabError::Command { cmd: what, stderr });
    }
    Ok(())
}
