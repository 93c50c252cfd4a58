//! A two-node lab of network namespaces on one kernel, for running meshpath with no
//! cluster around (`meshpath lab`, `cargo xtask run`) and for the integration tests.
//!
//! ```text
//!  pod a (enrolled)  pod b        pod e (enrolled)   pod c (enrolled)   pod d
//!  10.244.1.10       10.244.1.11  10.244.1.12        10.244.2.10        10.244.2.11
//!      | vpa             | vpb        | vpe                | vpc              | vpd
//!  +------------------ node 1 ------------+  ul0    +---------- node 2 ---------+
//!  | meshpath node (plaintext permissive) |---------| meshpath node (strict)    |
//!  +--------------------------------------+         +---------------------------+
//! ```
//!
//! Both nodes get their certificates from one built-in CA whose root lives in the lab's
//! directory; enrolled pods talk across nodes inside HBONE.
//!
//! In the routed and l3 topologies pods sit behind routed veths with /32 (/128) host routes
//! and a link-local gateway on the node side of each veth, as Calico and kindnet wire them;
//! in the bridge topology their veths are ports of a bridge per node, as flannel wires them.
//! The underlay link has no route out of the lab; how it is built is the lab's [`Topology`].

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use meshpath::datapath;
use meshpath::record::ConnectionRecord;

use crate::tunlink::TunLink;
use crate::{cluster, traffic};

/// Every lab namespace and node name starts with this, so leftovers can be swept.
pub const LAB_PREFIX: &str = "mplab";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("running `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("node {node}: {reason}\n--- last lines of {log} ---\n{tail}")]
    Daemon { node: String, reason: String, log: String, tail: String },
    #[error("{0}")]
    Other(String),
}

pub(crate) type Result<T, E = LabError> = std::result::Result<T, E>;

/// How the lab's nodes are joined (`--topology`, `MESHPATH_LAB_TOPOLOGY`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Topology {
    /// The node link is a veth pair (Ethernet): Calico's or kindnet's routed mode.
    #[default]
    Routed,
    /// The node link is a device without an Ethernet header (a tun pair relayed by the lab),
    /// as IPIP, GRE or WireGuard between nodes.
    L3,
    /// Pods on a Linux bridge per node (`cni0`, holding the pods' gateway), the other node's
    /// pods over a VXLAN device (`flannel.1`) on the veth node link: flannel's vxlan backend.
    Bridge,
}

/// The environment variable the lab reads its topology from when none is given.
pub const TOPOLOGY_ENV: &str = "MESHPATH_LAB_TOPOLOGY";
/// Names the lab's control plane (`standalone` or `istiod`) to `meshpath-lab`.
pub const CONTROL_PLANE_ENV: &str = "MESHPATH_LAB_CONTROL_PLANE";

impl Topology {
    /// `$MESHPATH_LAB_TOPOLOGY`, else routed.
    pub fn from_env() -> Result<Self> {
        match std::env::var(TOPOLOGY_ENV) {
            Ok(v) if !v.is_empty() => <Self as clap::ValueEnum>::from_str(&v, true)
                .map_err(|_| LabError::Other(format!("{TOPOLOGY_ENV}={v:?}: use routed, bridge or l3"))),
            _ => Ok(Self::Routed),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Routed => "routed",
            Self::L3 => "l3",
            Self::Bridge => "bridge",
        }
    }

    /// The device enrolled pods' traffic crosses between nodes on: the node link, or the
    /// VXLAN device over it (whose underlay carries it encapsulated).
    pub fn node_link(self) -> &'static str {
        match self {
            Self::Routed | Self::L3 => "ul0",
            Self::Bridge => VXLAN_IF,
        }
    }
}

/// The bridge and VXLAN device of the bridge topology, named as flannel names them.
pub const BRIDGE_IF: &str = "cni0";
pub const VXLAN_IF: &str = "flannel.1";

/// One pod of the lab.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Short name: a, b, c, d.
    pub name: &'static str,
    /// Index into [`Lab::nodes`].
    pub node: usize,
    pub enrolled: bool,
    pub netns: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
    /// Host-side veth name in the node namespace.
    pub host_if: String,
}

impl Pod {
    /// The pod's address in one family.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { self.v6 } else { self.v4 }
    }
}

/// One node: a network namespace running `meshpath node`.
#[derive(Debug)]
pub struct Node {
    /// Namespace name and meshpath node name (they are the same).
    pub name: String,
    pub underlay_v4: IpAddr,
    pub underlay_v6: IpAddr,
    pub daemon: Option<Child>,
}

pub struct Lab {
    pub id: String,
    pub dir: PathBuf,
    pub binary: PathBuf,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// Extra arguments for every `meshpath node` the lab starts.
    pub daemon_args: Vec<String>,
    /// Extra arguments per node (after `daemon_args`).
    pub node_args: Vec<Vec<String>>,
    /// Nodes whose pods accept only mTLS (PeerAuthentication STRICT): standalone, their
    /// daemons run with `--inbound-plaintext strict`; under istiod, the lab's istiod
    /// attaches the STRICT policy to their pods. Node 2 by default, so the lab shows both.
    pub strict_nodes: Vec<usize>,
    /// Whether daemons get `--ca-dir` (the lab's shared CA). Off when a test brings its
    /// own certificates with `--cert-dir`.
    pub use_builtin_ca: bool,
    /// The lab's Kubernetes API server, once started: daemons then follow it.
    pub cluster: Option<cluster::LabCluster>,
    /// The lab's istiod, once started: daemons then run with `--control-plane istiod`.
    pub istiod: Option<crate::lab_istiod::LabIstiod>,
    /// Whether daemons get `--pod-cidr` (so they keep the client's IP toward pods). The
    /// benchmarks turn it off so every proxied path connects upstream alike.
    pub pod_cidr_args: bool,
    pub topology: Topology,
    /// The `l3` node link's relay; dropped before the namespaces go.
    tun_link: Option<TunLink>,
    namespaces: Vec<String>,
    keep_dir: bool,
}

/// How a [`Lab::take_over`] went.
#[derive(Clone, Debug)]
pub struct Takeover {
    /// From the successor's start to its sockets in every slot.
    pub swapped: Duration,
    /// From the successor's start to the old daemon's exit.
    pub old_gone: Duration,
    /// How the old daemon exited (`None`: there was none).
    pub old_exit: Option<std::process::ExitStatus>,
}

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Port of the HTTP servers `cargo xtask run` starts in every pod, for [`Lab::try_commands`].
pub const TRY_PORT: u16 = 80;

/// A command to try by hand in a running lab.
#[derive(Clone, Debug)]
pub struct TryCommand {
    pub what: &'static str,
    /// A shell command line.
    pub command: String,
    /// What it prints.
    pub shows: String,
}

/// IPv4 and IPv6 pod networks of the lab (what `--pod-cidr` is set to).
pub const POD_CIDRS: [&str; 2] = ["10.244.0.0/16", "fd00:244::/32"];

impl Lab {
    /// Builds the lab in the topology [`Topology::from_env`] names.
    pub fn build(binary: &Path) -> Result<Self> {
        Self::build_with(binary, Topology::from_env()?)
    }

    /// Builds the namespaces and links (no daemons yet). On error everything created so
    /// far is removed again.
    pub fn build_with(binary: &Path, topology: Topology) -> Result<Self> {
        let id = format!("{LAB_PREFIX}{}x{}", std::process::id(), NEXT_LAB.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)?;
        let node_name = |n: usize| format!("{id}-n{n}");
        let nodes = (1..=2)
            .map(|n| Node {
                name: node_name(n),
                underlay_v4: format!("192.168.250.{n}").parse().expect("valid"),
                underlay_v6: format!("fd00:250::{n}").parse().expect("valid"),
                daemon: None,
            })
            .collect();
        let pods =
            [("a", 0, true, 10), ("b", 0, false, 11), ("e", 0, true, 12), ("c", 1, true, 10), ("d", 1, false, 11)]
                .into_iter()
                .map(|(name, node, enrolled, host)| Pod {
                    name,
                    node,
                    enrolled,
                    netns: format!("{id}-{name}"),
                    v4: format!("10.244.{}.{host}", node + 1).parse().expect("valid"),
                    v6: format!("fd00:244:{}::{host}", node + 1).parse().expect("valid"),
                    host_if: format!("vp{name}"),
                })
                .collect();
        let mut lab = Lab {
            id,
            binary: binary.to_owned(),
            dir,
            nodes,
            pods,
            daemon_args: Vec::new(),
            node_args: Vec::new(),
            strict_nodes: vec![1],
            use_builtin_ca: true,
            cluster: None,
            istiod: None,
            pod_cidr_args: true,
            topology,
            tun_link: None,
            namespaces: Vec::new(),
            keep_dir: std::env::var_os("MESHPATH_LAB_KEEP").is_some(),
        };
        lab.wire()?;
        lab.write_workloads(&lab.pods.iter().filter(|p| p.enrolled).map(|p| p.name).collect::<Vec<_>>())?;
        Ok(lab)
    }

    pub(crate) fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        // No duplicate address detection: addresses are usable at once.
        sysctls(name, &[("net/ipv6/conf/all/accept_dad", "0"), ("net/ipv6/conf/default/accept_dad", "0")])
    }

    fn wire(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            let n = self.nodes[i].name.clone();
            self.add_netns(&n)?;
            sysctls(&n, &[("net/ipv4/ip_forward", "1"), ("net/ipv6/conf/all/forwarding", "1")])?;
        }
        let (n1, n2) = (self.nodes[0].name.clone(), self.nodes[1].name.clone());
        match self.topology {
            Topology::Routed | Topology::Bridge => {
                ip(&["link", "add", "ul0", "netns", &n1, "type", "veth", "peer", "name", "ul0", "netns", &n2])?;
            }
            Topology::L3 => {
                self.tun_link = Some(TunLink::open([&n1, &n2], "ul0")?);
                for ns in [&n1, &n2] {
                    ip(&["-n", ns, "link", "set", "ul0", "txqueuelen", "10000"])?;
                }
            }
        }
        for node in &self.nodes {
            let ns = &node.name;
            ip(&["-n", ns, "addr", "add", &format!("{}/24", node.underlay_v4), "dev", "ul0"])?;
            ip(&["-n", ns, "addr", "add", &format!("{}/64", node.underlay_v6), "dev", "ul0", "nodad"])?;
            if self.topology == Topology::Bridge {
                // Room for VXLAN's 50 bytes: pods and flannel.1 keep a 1500-byte MTU.
                ip(&["-n", ns, "link", "set", "ul0", "mtu", "1550"])?;
            }
            ip(&["-n", ns, "link", "set", "ul0", "up"])?;
        }
        if self.topology == Topology::Bridge {
            self.wire_vxlan()?;
        } else {
            self.route_pods_over_the_node_link()?;
        }
        for p in self.pods.clone() {
            self.wire_pod(&p)?;
        }
        Ok(())
    }

    /// What a pod network's own plugin does for a new sandbox: its namespace, its veth, its
    /// addresses and routes, as the topology wires them.
    fn wire_pod(&mut self, p: &Pod) -> Result<()> {
        self.add_netns(&p.netns)?;
        let node = &self.nodes[p.node].name;
        ip(&["link", "add", &p.host_if, "netns", node, "type", "veth", "peer", "name", "eth0", "netns", &p.netns])?;
        ip(&["-n", &p.netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", node, "link", "set", &p.host_if, "up"])?;
        if self.topology == Topology::Bridge { bridged_pod(node, p) } else { routed_pod(node, p) }
    }

    /// A new pod `name` on node index `node`, with host number `host` in its node's pod
    /// networks, wired as the pod network's plugin would (the CNI chain's first step; see
    /// [`crate::cni`] for the rest). Not in the workload file until it is written again.
    pub fn add_pod(&mut self, name: &'static str, node: usize, enrolled: bool, host: u8) -> Result<()> {
        if self.pods.iter().any(|p| p.name == name) {
            return Err(LabError::Other(format!("the lab already has a pod {name}")));
        }
        let p = Pod {
            name,
            node,
            enrolled,
            netns: format!("{}-{name}", self.id),
            v4: format!("10.244.{}.{host}", node + 1).parse().expect("valid"),
            v6: format!("fd00:244:{}::{host}", node + 1).parse().expect("valid"),
            host_if: format!("vp{name}"),
        };
        self.wire_pod(&p)?;
        self.pods.push(p);
        Ok(())
    }

    /// Tears a pod's sandbox down (its namespace, and its veth with it), as a runtime does
    /// after a failed ADD or at the pod's end.
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let Some(i) = self.pods.iter().position(|p| p.name == name) else {
            return Err(LabError::Other(format!("the lab has no pod {name}")));
        };
        let p = self.pods.remove(i);
        // Deleted with its pair at once: a namespace's devices go later, in the background.
        let node = &self.nodes[p.node].name;
        ip(&["-n", node, "link", "del", &p.host_if])?;
        ip(&["netns", "del", &p.netns])?;
        self.namespaces.retain(|n| *n != p.netns);
        Ok(())
    }

    /// Each node's pod network routed via the other node's underlay address.
    fn route_pods_over_the_node_link(&self) -> Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            let ns = &node.name;
            let peer = &self.nodes[1 - i];
            ip(&["-n", ns, "route", "add", &format!("10.244.{}.0/24", 2 - i), "via", &peer.underlay_v4.to_string()])?;
            let v6 = format!("fd00:244:{}::/64", 2 - i);
            ip(&["-n", ns, "-6", "route", "add", &v6, "via", &peer.underlay_v6.to_string()])?;
        }
        Ok(())
    }

    /// flannel's vxlan backend: `cni0` holds the node's pod gateway, `flannel.1` the pod
    /// network's `.0` address; the other node's pod network is routed via its `.0` on
    /// `flannel.1`, whose MAC is a permanent neighbour and whose underlay address the FDB
    /// names. No learning: every entry is what the node was told.
    fn wire_vxlan(&self) -> Result<()> {
        let mac = |n: usize| format!("02:00:0a:f4:{n:02x}:00");
        for (i, node) in self.nodes.iter().enumerate() {
            let (ns, n) = (node.name.as_str(), i + 1);
            let local = node.underlay_v4.to_string();
            #[rustfmt::skip]
            ip(&["-n", ns, "link", "add", VXLAN_IF, "address", &mac(n), "type", "vxlan", "id", "1", "local", &local,
                 "dev", "ul0", "dstport", "8472", "nolearning"])?;
            ip(&["-n", ns, "link", "set", VXLAN_IF, "mtu", "1500", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("10.244.{n}.0/32"), "dev", VXLAN_IF])?;
            ip(&["-n", ns, "addr", "add", &format!("fd00:244:{n}::/128"), "dev", VXLAN_IF, "nodad"])?;
            ip(&["-n", ns, "link", "add", BRIDGE_IF, "type", "bridge"])?;
            ip(&["-n", ns, "addr", "add", &format!("10.244.{n}.1/24"), "dev", BRIDGE_IF])?;
            ip(&["-n", ns, "addr", "add", &format!("fd00:244:{n}::1/64"), "dev", BRIDGE_IF, "nodad"])?;
            ip(&["-n", ns, "link", "set", BRIDGE_IF, "up"])?;
            let (m, peer) = (3 - n, &self.nodes[2 - n]);
            for (gw, net, v6) in [
                (format!("10.244.{m}.0"), format!("10.244.{m}.0/24"), false),
                (format!("fd00:244:{m}::"), format!("fd00:244:{m}::/64"), true),
            ] {
                let family = if v6 { "-6" } else { "-4" };
                #[rustfmt::skip]
                ip(&["-n", ns, family, "neigh", "add", &gw, "lladdr", &mac(m), "dev", VXLAN_IF, "nud", "permanent"])?;
                ip(&["-n", ns, family, "route", "add", &net, "via", &gw, "dev", VXLAN_IF, "onlink"])?;
            }
            #[rustfmt::skip]
            run(Command::new("bridge").args(["-n", ns, "fdb", "append", &mac(m), "dev", VXLAN_IF, "dst",
                &peer.underlay_v4.to_string()]))?;
        }
        Ok(())
    }

    pub fn workloads_path(&self) -> PathBuf {
        self.dir.join("workloads.yaml")
    }

    pub fn access_log_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!("n{}-access.jsonl", node + 1))
    }

    /// The built-in CA's root directory, shared by both nodes.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// The trust domain of the lab's identities.
    pub const TRUST_DOMAIN: &'static str = "cluster.local";

    /// The SPIFFE identity the lab gives `pod`.
    pub fn identity(&self, pod: &str) -> meshpath::identity::Identity {
        meshpath::identity::Identity::new(Self::TRUST_DOMAIN, "lab", &format!("sa-{pod}"))
    }

    pub fn daemon_log_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!("n{}.log", node + 1))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("lab has no pod {name}"))
    }

    /// The workload file with the given pods enrolled.
    pub fn workloads_yaml(&self, enrolled: &[&str]) -> String {
        if enrolled.is_empty() {
            return "workloads: []\n".into();
        }
        let mut y = String::from("workloads:\n");
        for p in self.pods.iter().filter(|p| enrolled.contains(&p.name)) {
            let _ = write!(
                y,
                "  - name: pod-{n}\n    namespace: lab\n    serviceAccount: sa-{n}\n    node: {node}\n    ips: [{v4}, \"{v6}\"]\n",
                n = p.name,
                node = self.nodes[p.node].name,
                v4 = p.v4,
                v6 = p.v6
            );
        }
        y
    }

    /// Atomically replaces the workload file (the daemons pick it up on their next poll).
    pub fn write_workloads(&self, enrolled: &[&str]) -> Result<()> {
        self.write_workloads_text(&self.workloads_yaml(enrolled))
    }

    pub fn write_workloads_text(&self, text: &str) -> Result<()> {
        let tmp = self.dir.join(".workloads.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.workloads_path())?;
        Ok(())
    }

    /// The command line that runs the daemon of `node` inside its namespace.
    pub fn daemon_command(&self, node: usize) -> Command {
        let n = &self.nodes[node];
        let mut cmd = Command::new("nsenter");
        // Only the network namespace: the daemon must see the host's bpffs, where its pins
        // outlive it.
        cmd.arg(format!("--net=/run/netns/{}", n.name)).arg(&self.binary).args(["node", "--node", &n.name]);
        match &self.cluster {
            Some(c) => {
                cmd.env("KUBECONFIG", &c.kubeconfig);
            }
            None => {
                cmd.arg("--workloads").arg(self.workloads_path());
            }
        }
        cmd.arg("--access-log").arg(self.access_log_path(node)).args([
            "--poll-interval-ms",
            "100",
            "--trust-domain",
            Self::TRUST_DOMAIN,
        ]);
        if self.istiod.is_some() {
            self.istiod_env(node, &mut cmd);
        } else {
            if self.use_builtin_ca {
                cmd.arg("--ca-dir").arg(self.ca_dir());
            }
            if self.strict_nodes.contains(&node) {
                cmd.args(["--inbound-plaintext", "strict"]);
            }
        }
        if self.pod_cidr_args {
            for c in POD_CIDRS {
                cmd.args(["--pod-cidr", c]);
            }
        }
        cmd.args(&self.daemon_args);
        cmd.args(self.node_args.get(node).into_iter().flatten());
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        cmd
    }

    /// Starts `node`'s daemon and waits until it reports ready.
    pub fn start_daemon(&mut self, node: usize) -> Result<()> {
        self.spawn_daemon(node)?;
        self.wait_ready(node, Duration::from_secs(30))
    }

    /// Starts `node`'s daemon without waiting for it to be ready.
    pub fn spawn_daemon(&mut self, node: usize) -> Result<()> {
        self.nodes[node].daemon = Some(self.spawn_logged(node)?);
        Ok(())
    }

    /// A daemon process for `node`, logging to the node's log (a successor, when one serves).
    pub fn spawn_logged(&self, node: usize) -> Result<Child> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.daemon_log_path(node))?;
        let mut cmd = self.daemon_command(node);
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        cmd.spawn().map_err(|source| LabError::Spawn { cmd: format!("{cmd:?}"), source })
    }

    pub fn start_daemons(&mut self) -> Result<()> {
        (0..self.nodes.len()).try_for_each(|n| self.start_daemon(n))
    }

    /// Waits until `node`'s daemon reports ready; an error if it exits or takes longer.
    pub fn wait_ready(&mut self, node: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let ns = self.nodes[node].name.clone();
        loop {
            if let Some(child) = self.nodes[node].daemon.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.nodes[node].daemon = None;
                return Err(self.daemon_error(node, format!("daemon exited during start-up ({status})")));
            }
            if readiness(&ns).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.daemon_error(node, format!("not ready after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn daemon_error(&self, node: usize, reason: String) -> LabError {
        let log = self.daemon_log_path(node);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut tail: Vec<&str> = text.lines().rev().take(15).collect();
        tail.reverse();
        // A long error (a verifier log) pushes its own first line out of the tail.
        let error = text.lines().find(|l| l.starts_with("meshpath: error:")).filter(|e| !tail.contains(e));
        let head = error.map(|e| format!("{}\n...\n", e.chars().take(400).collect::<String>())).unwrap_or_default();
        LabError::Daemon {
            node: self.nodes[node].name.clone(),
            reason,
            log: log.display().to_string(),
            tail: format!("{head}{}", tail.join("\n")),
        }
    }

    /// Stops `node`'s daemon: SIGTERM (clean) or SIGKILL, and waits for it.
    pub fn stop_daemon(&mut self, node: usize, kill: bool) -> Result<Option<std::process::ExitStatus>> {
        let Some(child) = self.nodes[node].daemon.take() else { return Ok(None) };
        let sig = if kill { nix::sys::signal::Signal::SIGKILL } else { nix::sys::signal::Signal::SIGTERM };
        stop_child(child, sig, Duration::from_secs(10)).map(Some)
    }

    /// A takeover of `node` as a rolling update makes it: a second daemon starts beside the
    /// serving one and takes the SOCKMAP slots over; then the old one gets SIGTERM (as
    /// kubelet sends once the new pod is ready) and exits after stepping down. The new one
    /// is the node's daemon afterwards.
    pub fn take_over(&mut self, node: usize, timeout: Duration) -> Result<Takeover> {
        let name = self.nodes[node].name.clone();
        let before = datapath::pinned_listener_cookies(&name).map_err(|e| LabError::Other(e.to_string()))?;
        let started = Instant::now();
        let mut successor = self.spawn_logged(node)?;
        let swapped = loop {
            let gone = successor.try_wait()?;
            let now = datapath::pinned_listener_cookies(&name).map_err(|e| LabError::Other(e.to_string()))?;
            // Every slot the old daemon filled holds another socket now.
            if gone.is_none() && now.iter().zip(&before).all(|(n, b)| b.is_none() || (n.is_some() && n != b)) {
                break started.elapsed();
            }
            if gone.is_some() || started.elapsed() > timeout {
                let _ = successor.kill();
                let status = successor.wait()?;
                return Err(self.daemon_error(
                    node,
                    format!("the successor did not take over ({status}, {:?})", started.elapsed()),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let old = self.nodes[node].daemon.replace(successor);
        let old_exit = match old {
            Some(child) => Some(stop_child(child, nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30))?),
            None => None,
        };
        Ok(Takeover { swapped, old_gone: started.elapsed(), old_exit })
    }

    /// Access-log records of `node` so far.
    pub fn records(&self, node: usize) -> Result<Vec<ConnectionRecord>> {
        Ok(read_records(&self.access_log_path(node))?)
    }

    /// Waits up to `timeout` for a record on `node` matching `pred`.
    pub fn wait_record(
        &self,
        node: usize,
        timeout: Duration,
        pred: impl Fn(&ConnectionRecord) -> bool,
    ) -> Result<Option<ConnectionRecord>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.records(node)?.into_iter().find(|r| pred(r)) {
                return Ok(Some(r));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Datapath counters of `node`, read from its pinned map.
    pub fn counters(&self, node: usize) -> Result<datapath::Counters> {
        datapath::read_pinned_counters(&self.nodes[node].name).map_err(|e| LabError::Other(e.to_string()))
    }

    /// The pinned workload map of `node`: IP → ifindex.
    pub fn workload_map(&self, node: usize) -> Result<std::collections::BTreeMap<IpAddr, u32>> {
        datapath::read_pinned_workloads(&self.nodes[node].name).map_err(|e| LabError::Other(e.to_string()))
    }

    /// The pinned interface map of `node`: ifindex → its value (`IF_*` flags, bridge).
    pub fn interface_map(
        &self,
        node: usize,
    ) -> Result<std::collections::BTreeMap<u32, meshpath_common::InterfaceValue>> {
        let other = |e: &dyn std::fmt::Display| LabError::Other(e.to_string());
        let dir = datapath::readable_pin_dir(&self.nodes[node].name).map_err(|e| other(&e))?;
        let path = dir.join(meshpath_common::names::MAP_INTERFACES);
        let fd = datapath::bpf::obj_get(&path).map_err(|e| other(&format!("{}: {e}", path.display())))?;
        datapath::pinned::interfaces(std::os::fd::AsFd::as_fd(&fd)).map_err(|e| other(&e))
    }

    /// The value of one series of `node`'s `/metrics` (name and labels as printed), 0 when
    /// it is not there.
    pub fn http_metric(&self, node: usize, series: &str) -> Result<f64> {
        let text = http_get(&self.nodes[node].name, meshpath_common::names::PORT_METRICS, "/metrics")?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// Runs `meshpath uninstall` for `node` inside its namespace.
    pub fn uninstall(&self, node: usize) -> Result<String> {
        self.meshpath(node, &["uninstall", "--node", &self.nodes[node].name])
    }

    /// Runs the meshpath binary with `args` inside `node`'s namespace; its stdout.
    pub fn meshpath(&self, node: usize, args: &[&str]) -> Result<String> {
        let n = &self.nodes[node].name;
        run(Command::new("nsenter").arg(format!("--net=/run/netns/{n}")).arg(&self.binary).args(args))
    }

    /// A socket address of `pod` in the given family.
    pub fn addr(&self, pod: &str, v6: bool, port: u16) -> SocketAddr {
        let p = self.pod(pod);
        SocketAddr::new(if v6 { p.v6 } else { p.v4 }, port)
    }

    /// How to reach the pods by hand while the lab runs.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "lab {} ({} topology, files in {}, CA root in {})",
            self.id,
            self.topology.name(),
            self.dir.display(),
            self.ca_dir().display()
        );
        for (i, n) in self.nodes.iter().enumerate() {
            let _ = writeln!(
                s,
                "  node {}: netns {}  pins /sys/fs/bpf/meshpath/{}  log {}",
                i + 1,
                n.name,
                n.name,
                self.daemon_log_path(i).display()
            );
        }
        for p in &self.pods {
            let _ = writeln!(
                s,
                "  pod {} on node {} ({}): {} {}  ->  ip netns exec {} <command>",
                p.name,
                p.node + 1,
                if p.enrolled { "enrolled" } else { "not enrolled" },
                p.v4,
                p.v6,
                p.netns
            );
        }
        s
    }

    /// Commands to try by hand while the lab runs, with the HTTP servers of
    /// [`crate::traffic::EchoServer::start_http`] on [`TRY_PORT`] in every pod: an HBONE
    /// connection across nodes, a plaintext one the strict node refuses, one through
    /// kube-proxy's NAT ([`crate::frontends`], installed toward [`TRY_PORT`]), and `status`.
    pub fn try_commands(&self) -> Vec<TryCommand> {
        let (a, b, c, d) = (self.pod("a"), self.pod("b"), self.pod("c"), self.pod("d"));
        let n2 = &self.nodes[c.node].name;
        let url = |p: &Pod| format!("http://{}:{TRY_PORT}/", p.v4);
        vec![
            TryCommand {
                what: "HBONE: pod a (enrolled, node 1) to pod c (enrolled, node 2), mutual TLS between the nodes",
                command: format!("ip netns exec {} curl -sS --max-time 5 {}", a.netns, url(c)),
                shows: format!(
                    "{}:{TRY_PORT} saw you as {}:<port>  (the client's own address, across nodes)",
                    c.v4, a.v4
                ),
            },
            TryCommand {
                what: "refused: pod d (not enrolled) to pod c, whose node 2 accepts only mTLS (strict)",
                command: format!("ip netns exec {} curl -sS --max-time 5 {}", d.netns, url(c)),
                shows: format!(
                    "curl: (56) Recv failure: Connection reset by peer  (or (7) when the reset beats curl's connect; \
                     outcome plaintext_refused from {} in node 2's access log)",
                    d.v4
                ),
            },
            TryCommand {
                what: "through kube-proxy's NAT: pod b (not enrolled) to node 1's NodePort, which a DNAT turns \
                       toward pod a (enrolled): through node 1's proxy",
                command: format!(
                    "ip netns exec {} curl -sS --max-time 5 http://{}/",
                    b.netns,
                    crate::frontends::Kind::NodePort.addr(self, false)
                ),
                shows: format!(
                    "{}:{TRY_PORT} saw you as {}:<port>  (node 1's access log names the frontend)",
                    a.v4, b.v4
                ),
            },
            TryCommand {
                what: "node 2 as the kernel holds it: attachments, enrolled IPs, listeners, counters",
                command: format!("ip netns exec {n2} {} status --node {n2}", self.binary.display()),
                shows: "the node's programs, pod c's IPs on vpc, six listeners in the SOCKMAP".into(),
            },
        ]
    }

    /// Everything of meshpath's still present for `node`: policy rules, routes in its table,
    /// TC qdiscs, filters and TCX programs on any interface, and bpffs pins. Empty after
    /// `meshpath uninstall`.
    pub fn leftovers(&self, node: usize) -> Result<Vec<String>> {
        use meshpath_common::names::{NAT_ROUTE_TABLE, PROG_TC_EGRESS, PROG_TC_INGRESS, ROUTE_TABLE};
        let ns = self.nodes[node].name.clone();
        let mut found = Vec::new();
        for table in [ROUTE_TABLE.to_string(), NAT_ROUTE_TABLE.to_string()] {
            for fam in ["-4", "-6"] {
                for l in ip(&["-n", &ns, fam, "rule", "show"])?.lines() {
                    if l.split_whitespace().any(|w| w == table) {
                        found.push(format!("rule: {}", l.trim()));
                    }
                }
                // A table that was never filled does not exist: nothing in it.
                let routes = match ip(&["-n", &ns, fam, "route", "show", "table", &table]) {
                    Err(LabError::Command { stderr, .. }) if stderr.contains("does not exist") => String::new(),
                    other => other?,
                };
                for l in routes.lines() {
                    found.push(format!("route in table {table}: {}", l.trim()));
                }
            }
        }
        for l in run(Command::new("tc").args(["-n", &ns, "qdisc", "show"]))?.lines() {
            if l.contains("clsact") || l.contains("qdisc ingress") {
                found.push(format!("qdisc: {}", l.trim()));
            }
        }
        let ifaces: Vec<String> = ip(&["-n", &ns, "-o", "link", "show"])?
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        for ifname in &ifaces {
            for dir in ["ingress", "egress"] {
                let out = run(Command::new("tc").args(["-n", &ns, "filter", "show", "dev", ifname, dir]))?;
                if !out.trim().is_empty() {
                    found.push(format!("tc filter on {ifname} {dir}: {}", out.trim()));
                }
            }
        }
        let tcx = traffic::in_netns(&ns, || -> Vec<String> {
            let mut v = Vec::new();
            for ifname in &ifaces {
                for at in [aya::programs::TcAttachType::Ingress, aya::programs::TcAttachType::Egress] {
                    if let Ok((_, progs)) = aya::programs::SchedClassifier::query_tcx(ifname, at) {
                        v.extend(
                            progs
                                .iter()
                                .filter(|p| matches!(p.name_as_str(), Some(PROG_TC_INGRESS | PROG_TC_EGRESS)))
                                .map(|p| {
                                    let name = p.name_as_str().unwrap_or("?");
                                    format!("tcx program {name} (id {}) on {ifname} {at:?}", p.id())
                                }),
                        );
                    }
                }
            }
            v
        })?;
        found.extend(tcx);
        let pins = datapath::node_pin_dir(&ns).map_err(|e| LabError::Other(e.to_string()))?;
        if pins.exists() {
            found.push(format!("pins: {}", pins.display()));
        }
        // The node lock stays with uninstall (a daemon may take it next); anything else is a
        // leftover.
        let state = Path::new(meshpath_common::names::STATE_DIR).join(&ns);
        if let Ok(entries) = std::fs::read_dir(&state) {
            for e in entries.flatten().filter(|e| e.file_name() != "lock") {
                found.push(format!("state: {}", e.path().display()));
            }
        }
        Ok(found)
    }

    /// Number of meshpath classifiers on `ifname` of `node`: TCX programs plus cls_bpf
    /// filters running it.
    pub fn classifiers(&self, node: usize, ifname: &str) -> Result<usize> {
        self.tc_programs(node, ifname, false)
    }

    /// How many of meshpath's egress guards run on `ifname` (TCX links or netlink filters).
    pub fn egress_guards(&self, node: usize, ifname: &str) -> Result<usize> {
        self.tc_programs(node, ifname, true)
    }

    fn tc_programs(&self, node: usize, ifname: &str, egress: bool) -> Result<usize> {
        use aya::programs::TcAttachType;
        use meshpath_common::names::{PROG_TC_EGRESS, PROG_TC_INGRESS};
        let (hook, program, dir) = match egress {
            false => (TcAttachType::Ingress, PROG_TC_INGRESS, "ingress"),
            true => (TcAttachType::Egress, PROG_TC_EGRESS, "egress"),
        };
        let ns = self.nodes[node].name.clone();
        let tcx = traffic::in_netns(&ns, || {
            aya::programs::SchedClassifier::query_tcx(ifname, hook)
                .map(|(_, progs)| progs.iter().filter(|p| p.name_as_str() == Some(program)).count())
        })?
        .map_err(|e| LabError::Other(format!("querying tcx on {ifname}: {e}")))?;
        let filters = run(Command::new("tc").args(["-n", &ns, "filter", "show", "dev", ifname, dir]))?;
        Ok(tcx + filters.lines().filter(|l| l.contains(program)).count())
    }

    /// Stops the daemons, uninstalls meshpath from both nodes and deletes every namespace.
    /// Also run on drop; calling it twice is harmless.
    pub fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for n in 0..self.nodes.len() {
            if let Err(e) = self.stop_daemon(n, false) {
                problems.push(format!("stopping node {}: {e}", n + 1));
            }
        }
        for n in 0..self.nodes.len() {
            if self.namespaces.contains(&self.nodes[n].name)
                && let Err(e) = self.uninstall(n)
            {
                problems.push(format!("uninstalling node {}: {e}", n + 1));
            }
            // Pins live on the host's bpffs, not in the namespace: make sure they go, and the
            // node's state directory (its lock) with them.
            if let Err(e) = datapath::unpin_all(&self.nodes[n].name) {
                problems.push(format!("unpinning node {}: {e}", n + 1));
            }
            let state = Path::new(meshpath_common::names::STATE_DIR).join(&self.nodes[n].name);
            let _ = std::fs::remove_dir_all(&state);
            let _ = std::fs::remove_dir(meshpath_common::names::STATE_DIR);
        }
        // Its devices must be gone before their namespaces are.
        drop(self.tun_link.take());
        drop(self.istiod.take());
        for ns in std::mem::take(&mut self.namespaces).into_iter().rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                problems.push(e.to_string());
            }
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        problems
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in self.teardown() {
            eprintln!("lab teardown: {p}");
        }
    }
}

/// Sends `sig` to a daemon and waits for it, killing it after `timeout`. nsenter execs the
/// daemon, so the child's pid is the daemon's.
fn stop_child(mut child: Child, sig: nix::sys::signal::Signal, timeout: Duration) -> Result<std::process::ExitStatus> {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Ok(child.wait()?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every complete record of an access log file (none when it does not exist yet).
pub fn read_records(path: &Path) -> std::io::Result<Vec<ConnectionRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    // A line still being written has no newline yet: leave it for the next read.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
        .collect()
}

/// Environment variable naming the `meshpath` binary the lab runs (`cargo xtask` sets it).
pub const MESHPATH_BIN_ENV: &str = "MESHPATH_BIN";

/// The `meshpath` binary to run: `$MESHPATH_BIN`, else the one cargo built next to this
/// executable (the lab binary sits beside it; test binaries one level down, in `deps/`).
pub fn meshpath_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(MESHPATH_BIN_ENV).filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            // Daemons run it from inside other namespaces' views: an absolute path.
            Ok(std::fs::canonicalize(&bin)?)
        } else {
            Err(LabError::Other(format!("{MESHPATH_BIN_ENV}={} is not a file", bin.display())))
        };
    }
    let exe = std::env::current_exe()?;
    exe.ancestors().skip(1).take(2).map(|dir| dir.join("meshpath")).find(|p| p.is_file()).ok_or_else(|| {
        LabError::Other(format!(
            "no meshpath binary next to {} and {MESHPATH_BIN_ENV} is not set: build it first (`cargo xtask build`), \
                 or run through `cargo xtask`",
            exe.display()
        ))
    })
}

/// Whether the daemon in `ns` answers 200 on its readiness endpoint.
pub fn readiness(ns: &str) -> std::io::Result<bool> {
    Ok(http_get(ns, meshpath_common::names::PORT_READINESS, "/healthz/ready")?.starts_with("HTTP/1.1 200"))
}

/// `GET path` on 127.0.0.1:`port` inside `ns`: the whole response, status line included.
pub fn http_get(ns: &str, port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    traffic::in_netns(ns, || -> std::io::Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        Ok(resp)
    })?
}

/// A routed pod (Calico, kindnet): its /32 and /128 behind the veth, with a link-local
/// gateway whose addresses live on every pod veth of the node.
fn routed_pod(node: &str, p: &Pod) -> Result<()> {
    let pn = p.netns.as_str();
    ip(&["-n", pn, "addr", "add", &format!("{}/32", p.v4), "dev", "eth0"])?;
    ip(&["-n", pn, "addr", "add", &format!("{}/128", p.v6), "dev", "eth0", "nodad"])?;
    ip(&["-n", pn, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
    ip(&["-n", pn, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
    ip(&["-n", pn, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"])?;
    ip(&["-n", node, "addr", "add", "169.254.1.1/32", "dev", &p.host_if, "scope", "link"])?;
    ip(&["-n", node, "addr", "add", "fe80::1/64", "dev", &p.host_if, "nodad"])?;
    ip(&["-n", node, "route", "add", &format!("{}/32", p.v4), "dev", &p.host_if])?;
    ip(&["-n", node, "-6", "route", "add", &format!("{}/128", p.v6), "dev", &p.host_if])?;
    Ok(())
}

/// A pod on the node's bridge (flannel's bridge plugin): in the node's /24 and /64, its
/// gateway the bridge's `.1`.
fn bridged_pod(node: &str, p: &Pod) -> Result<()> {
    let (pn, n) = (p.netns.as_str(), p.node + 1);
    ip(&["-n", pn, "addr", "add", &format!("{}/24", p.v4), "dev", "eth0"])?;
    ip(&["-n", pn, "addr", "add", &format!("{}/64", p.v6), "dev", "eth0", "nodad"])?;
    ip(&["-n", pn, "route", "add", "default", "via", &format!("10.244.{n}.1")])?;
    ip(&["-n", pn, "-6", "route", "add", "default", "via", &format!("fd00:244:{n}::1")])?;
    ip(&["-n", node, "link", "set", &p.host_if, "master", BRIDGE_IF])?;
    Ok(())
}

pub(crate) fn sysctls(ns: &str, kv: &[(&str, &str)]) -> Result<()> {
    traffic::in_netns(ns, || -> std::io::Result<()> {
        for (k, v) in kv {
            let path = format!("/proc/sys/{k}");
            std::fs::write(&path, v).map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))?;
        }
        Ok(())
    })??;
    Ok(())
}

pub(crate) fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let text = format!("{cmd:?}").replace('"', "");
    let out = cmd.stdin(Stdio::null()).output().map_err(|source| LabError::Spawn { cmd: text.clone(), source })?;
    if !out.status.success() {
        return Err(LabError::Command { cmd: text, stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `name` belongs to a lab whose creating process is gone. Lab names carry the
/// creator's pid (`mplab<pid>x<n>`), so a sweep leaves running labs alone.
fn is_stale(name: &str) -> bool {
    let Some(pid) = name.strip_prefix(LAB_PREFIX).and_then(|r| r.split('x').next()).and_then(|p| p.parse::<u32>().ok())
    else {
        return false;
    };
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what crashed labs left: their processes, namespaces and pins. Labs of running
/// processes are left alone.
pub fn sweep() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let list = ip(&["netns", "list"])?;
    let stale: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(LAB_PREFIX) && is_stale(n))
        .map(str::to_owned)
        .collect();
    for ns in &stale {
        if let Ok(pids) = ip(&["netns", "pids", ns]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    for ns in stale {
        ip(&["netns", "del", &ns])?;
        removed.push(format!("netns {ns}"));
    }
    if let Ok(entries) = std::fs::read_dir(meshpath_common::names::PIN_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(LAB_PREFIX) && is_stale(&name) {
                datapath::unpin_all(&name).map_err(|e| LabError::Other(e.to_string()))?;
                removed.push(format!("pins of {name}"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(meshpath_common::names::STATE_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(LAB_PREFIX) && is_stale(&name) {
                std::fs::remove_dir_all(e.path())?;
                removed.push(format!("state of {name}"));
            }
        }
        let _ = std::fs::remove_dir(meshpath_common::names::STATE_DIR);
    }
    Ok(removed)
}
