//! `meshpath status`: what meshpath has put into this network namespace and bpffs for a
//! node, read from the kernel (not from the daemon), so it also works while the daemon is
//! down: attachments, enrolled workloads, listener sockets and the SOCKMAP, counters. The
//! open connections are each daemon's to tell (its control socket); `meshpath close` ends
//! one of them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::Serialize;

use crate::datapath::{self, AttachMode, Counters, DatapathError, Hook};
use crate::node::instance::{self, DaemonNote};
use crate::proxy::control::{self, ControlError, Request, Response};
use crate::proxy::inspect::{Decision, WorkloadPolicies};
use crate::proxy::registry::OpenConnection;
use crate::routing::{self, Interface, Routing, RoutingError};
use crate::state::WorkloadIndex;
use crate::topology::Topology;
use crate::workloads::{WorkloadFile, WorkloadsError};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Workloads(#[from] WorkloadsError),
    #[error("no meshpath datapath for node {node}: nothing pinned in {dir}; {hint}")]
    NotInstalled { node: String, dir: String, hint: &'static str },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("no meshpath daemon of node {0} is running")]
    NoDaemon(String),
    #[error("several daemons serve node {node} (pids {pids}): say which with --daemon")]
    WhichDaemon { node: String, pids: String },
    #[error("daemon {pid} has no open connection {id} (see `meshpath status`)")]
    NotOpen { pid: u32, id: u64 },
    #[error("daemon {0} gave an answer meshpath does not expect")]
    Unexpected(u32),
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub node: String,
    pub pin_dir: String,
    pub attachments: Vec<Attachment>,
    pub workloads: Vec<EnrolledIp>,
    pub listeners: Vec<ListenerState>,
    /// The daemons serving or draining the node now.
    pub daemons: Vec<DaemonNote>,
    /// Each daemon's open connections.
    pub connections: Vec<DaemonConnections>,
    /// The authorization policies that apply to each local workload, as the newest daemon
    /// holds them (empty without policies, or without a daemon).
    pub policies: Vec<WorkloadPolicies>,
    pub counters: Counters,
    pub cni: CniStatus,
}

/// The chained CNI plugin on this node: the pods it handed over, and its last log lines.
#[derive(Debug, Default, Serialize)]
pub struct CniStatus {
    /// `namespace/name (host interfaces)`.
    pub pods: Vec<String>,
    pub log: Vec<String>,
    /// Why the pods could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Lines of the plugin's log `status` shows.
const CNI_LOG_LINES: usize = 5;

fn cni(node: &str) -> CniStatus {
    let (pods, error) = match crate::cni::read_pods(&crate::cni::pods_path(node)) {
        Ok(p) => {
            (p.pods.values().map(|s| format!("{} ({})", s.pod.id(), s.host_interfaces.join(", "))).collect(), None)
        }
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    CniStatus { pods, log: crate::cni::log_tail(node, CNI_LOG_LINES), error }
}

/// One daemon's open connections, as it told them.
#[derive(Debug, Serialize)]
pub struct DaemonConnections {
    pub pid: u32,
    pub open: Vec<OpenConnection>,
    /// Why the daemon did not tell (`open` is then empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Attachment {
    pub program: &'static str,
    /// `tc` or `sk_lookup`.
    pub hook: &'static str,
    /// The interface, for TC; sk_lookup hooks the whole network namespace.
    pub interface: Option<String>,
    pub ifindex: Option<u32>,
    pub direction: Option<&'static str>,
    /// `tcx`, `netlink` (cls_bpf on clsact) or `link` (sk_lookup's netns link).
    pub mode: &'static str,
    /// For TC: what the interface is to meshpath (`routed pod interface`, `uplink`, ...).
    pub topology: Option<&'static str>,
    /// For TCX: whether the kernel still reports the program on the interface.
    pub live: bool,
}

#[derive(Debug, Serialize)]
pub struct EnrolledIp {
    pub ip: IpAddr,
    pub ifindex: u32,
    pub interface: Option<String>,
    /// `namespace/name`, when a workload file was given.
    pub workload: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ListenerState {
    pub role: &'static str,
    pub address: SocketAddr,
    /// A socket listens on the address in this namespace.
    pub listening: bool,
    /// Its SOCKMAP slot holds a socket: sk_lookup can steer to it.
    pub registered: bool,
    /// The daemon whose socket is in the slot, and its state (`None`: no daemon says so).
    pub owner: Option<DaemonNote>,
}

/// Gathers the status of `node` in the current network namespace.
pub async fn collect(node: &str, workloads: Option<&Path>, pod_cidrs: &[IpNet]) -> Result<Status, StatusError> {
    datapath::validate_node_name(node)?;
    let dir = datapath::readable_pin_dir(node)?;
    if !dir.exists() {
        return Err(StatusError::NotInstalled { node: node.into(), dir: dir.display().to_string(), hint: hint() });
    }
    let ifaces = Routing::connect()?.interfaces().await?;
    let names = routing::names_by_index(&ifaces);
    let daemons = instance::live(node);
    Ok(Status {
        node: node.into(),
        pin_dir: dir.display().to_string(),
        attachments: attachments(node, &ifaces, &names, pod_cidrs)?,
        workloads: enrolled(node, workloads, &names)?,
        listeners: listeners(node, &daemons)?,
        connections: connections(node, &daemons).await,
        policies: policies(node, &daemons).await,
        daemons,
        counters: datapath::read_pinned_counters(node)?,
        cni: cni(node),
    })
}

/// The node's program attachments, as its pins and state say and the kernel confirms.
fn attachments(
    node: &str,
    ifaces: &[Interface],
    names: &BTreeMap<u32, String>,
    pod_cidrs: &[IpNet],
) -> Result<Vec<Attachment>, StatusError> {
    let att = datapath::attachments(node)?;
    let mut out = Vec::new();
    if att.sk_lookup {
        out.push(Attachment {
            program: meshpath_common::names::PROG_SK_LOOKUP,
            hook: "sk_lookup",
            interface: None,
            ifindex: None,
            direction: None,
            mode: "link",
            topology: None,
            live: true,
        });
    }
    let netlink: Vec<(u32, Hook)> = att.netlink.iter().flat_map(|i| Hook::ALL.map(|h| (*i, h))).collect();
    for (mode, list) in [(AttachMode::Tcx, &att.tcx), (AttachMode::Netlink, &netlink)] {
        for &(ifindex, hook) in list {
            let name = names.get(&ifindex).cloned();
            let iface = ifaces.iter().find(|i| i.index == ifindex);
            out.push(Attachment {
                program: hook.program(),
                hook: "tc",
                live: name.as_deref().is_some_and(|n| datapath::tc_attached(mode, n, hook)),
                interface: name,
                ifindex: Some(ifindex),
                direction: Some(hook.name()),
                mode: if mode == AttachMode::Tcx { "tcx" } else { "netlink" },
                topology: iface.map(|i| Topology::of(i, ifaces, pod_cidrs).name()),
            });
        }
    }
    Ok(out)
}

/// The workload map, each IP with its interface and (from the workload file) its workload.
fn enrolled(
    node: &str,
    workloads: Option<&Path>,
    names: &BTreeMap<u32, String>,
) -> Result<Vec<EnrolledIp>, StatusError> {
    // The trust domain does not matter here: only workload names are shown.
    let owners = match workloads {
        Some(p) => WorkloadIndex::from_file(&WorkloadFile::load(p)?, "cluster.local"),
        None => WorkloadIndex::default(),
    };
    Ok(datapath::read_pinned_workloads(node)?
        .into_iter()
        .map(|(ip, ifindex)| EnrolledIp {
            ip,
            ifindex,
            interface: names.get(&ifindex).cloned(),
            workload: owners.get(ip).map(|w| w.id.clone()),
        })
        .collect())
}

/// Each listener slot: whether a socket listens here and is registered, and whose it is.
fn listeners(node: &str, daemons: &[DaemonNote]) -> Result<Vec<ListenerState>, StatusError> {
    let listening = listening_sockets();
    let cookies = datapath::pinned_listener_cookies(node)?;
    Ok(datapath::registered_listeners(node)?
        .into_iter()
        .map(|(role, ipv6, registered)| {
            let ip = if ipv6 { IpAddr::V6(Ipv6Addr::LOCALHOST) } else { IpAddr::V4(Ipv4Addr::LOCALHOST) };
            let address = SocketAddr::new(ip, role.port());
            let cookie = cookies.get(role.slot(ipv6) as usize).copied().flatten();
            let owner = cookie.and_then(|c| daemons.iter().find(|d| d.sockets.contains(&c))).cloned();
            ListenerState { role: role.name(), address, listening: listening.contains(&address), registered, owner }
        })
        .collect())
}

/// Asks each daemon of `node` for its open connections.
async fn connections(node: &str, daemons: &[DaemonNote]) -> Vec<DaemonConnections> {
    let mut out = Vec::new();
    for d in daemons {
        let answer = control::request(&instance::control_socket(node, d.pid), &Request::List).await;
        let (open, error) = match answer {
            Ok(Response::Connections(open)) => (open, None),
            Ok(_) => (Vec::new(), Some("an answer meshpath does not expect".to_owned())),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        out.push(DaemonConnections { pid: d.pid, open, error });
    }
    out
}

/// The policies of each local workload, from the serving daemon (else any); a daemon that
/// cannot tell leaves the list empty.
async fn policies(node: &str, daemons: &[DaemonNote]) -> Vec<WorkloadPolicies> {
    let serving = daemons.iter().find(|d| d.state == instance::DaemonState::Serving);
    let Some(d) = serving.or(daemons.first()) else { return Vec::new() };
    match control::request(&instance::control_socket(node, d.pid), &Request::Policies).await {
        Ok(Response::Policies(list)) => list,
        _ => Vec::new(),
    }
}

/// The daemon of `node` a request goes to: `daemon`, or the only one.
fn daemon_pid(node: &str, daemon: Option<u32>) -> Result<u32, StatusError> {
    datapath::validate_node_name(node)?;
    let pids: Vec<u32> = instance::live(node).iter().map(|d| d.pid).collect();
    match (daemon, pids.as_slice()) {
        (Some(p), _) => Ok(p),
        (None, []) => Err(StatusError::NoDaemon(node.into())),
        (None, [p]) => Ok(*p),
        (None, _) => {
            let pids = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            Err(StatusError::WhichDaemon { node: node.into(), pids })
        }
    }
}

/// `meshpath policy`: the policies of each local workload, as a daemon of `node` holds them.
pub async fn workload_policies(node: &str, daemon: Option<u32>) -> Result<Vec<WorkloadPolicies>, StatusError> {
    let pid = daemon_pid(node, daemon)?;
    match control::request(&instance::control_socket(node, pid), &Request::Policies).await? {
        Response::Policies(list) => Ok(list),
        _ => Err(StatusError::Unexpected(pid)),
    }
}

/// `meshpath policy --from A --to B:P`: whether a daemon of `node` would let A reach B on
/// port P now, and which policy decides.
pub async fn check(node: &str, daemon: Option<u32>, from: IpAddr, to: SocketAddr) -> Result<Decision, StatusError> {
    let pid = daemon_pid(node, daemon)?;
    match control::request(&instance::control_socket(node, pid), &Request::Check { from, to }).await? {
        Response::Decision(d) => Ok(d),
        _ => Err(StatusError::Unexpected(pid)),
    }
}

/// `meshpath close`: ends open connection `id` of a daemon of `node` (`daemon`, or the only
/// one); its record says `cut`.
pub async fn close(node: &str, id: u64, daemon: Option<u32>) -> Result<String, StatusError> {
    let pid = daemon_pid(node, daemon)?;
    match control::request(&instance::control_socket(node, pid), &Request::Close { id }).await? {
        Response::Closed { found: true } => Ok(format!("closed connection {id} of daemon {pid}")),
        Response::Closed { found: false } => Err(StatusError::NotOpen { pid, id }),
        _ => Err(StatusError::Unexpected(pid)),
    }
}

/// The policies part of the human form (nothing when no workload has one).
pub fn policies_text(policies: &[WorkloadPolicies]) -> String {
    let mut s = String::new();
    if policies.iter().all(|w| w.policies.is_empty() && w.unknown.is_empty()) {
        return s;
    }
    let _ = writeln!(s, "\nauthorization policies (per local workload, in the order consulted)");
    for w in policies {
        let list = if w.policies.is_empty() { "none".to_owned() } else { w.policies.join(", ") };
        let _ = writeln!(s, "  {:<30} {list}", w.workload);
        if !w.unknown.is_empty() {
            let _ = writeln!(s, "  {:<30} names unknown policies: {}", "", w.unknown.join(", "));
        }
    }
    s
}

/// The open-connections part of the human form.
fn connections_text(s: &mut String, daemons: &[DaemonConnections]) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let total: usize = daemons.iter().map(|d| d.open.len()).sum();
    let _ = writeln!(s, "\nopen connections ({total})");
    for d in daemons {
        if let Some(e) = &d.error {
            let _ = writeln!(s, "  pid {}: not listed: {e}", d.pid);
        }
        for c in &d.open {
            let age = Duration::from_millis(now.saturating_sub(c.start_ms)).as_secs();
            let _ = writeln!(
                s,
                "  pid {} #{:<6} {:<12} {:<13} {} ({}) -> {} {}  sent {} received {}  {age}s",
                d.pid,
                c.id,
                c.kind.code(),
                c.listener,
                c.src,
                c.src_identity.as_deref().unwrap_or("no identity"),
                c.dst_workload.as_deref().unwrap_or("-"),
                c.target,
                c.bytes_sent,
                c.bytes_received
            );
        }
    }
}

/// What to check when a node has no pins here.
fn hint() -> &'static str {
    if datapath::is_bpffs(Path::new(meshpath_common::names::BPFFS_ROOT)) {
        "is the node name right? (`ls /sys/fs/bpf/meshpath` lists the nodes with pins)"
    } else {
        "this mount namespace has no bpffs on /sys/fs/bpf (`ip netns exec` mounts a fresh /sys) and no ancestor \
         process shows the node's pins either: check the node name, or run \
         `nsenter --net=/run/netns/<netns> meshpath status --node <node>`, which keeps the host's mounts"
    }
}

/// Listening TCP sockets of this network namespace, from /proc/net/tcp{,6}.
fn listening_sockets() -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Columns: sl, local_address, rem_address, st, ...; st 0A is LISTEN.
            if cols.get(3) == Some(&"0A")
                && let Some(addr) = cols.get(1).and_then(|a| parse_proc_addr(a, v6))
            {
                out.push(addr);
            }
        }
    }
    out
}

/// `0100007F:3A99` (IPv4) or 32 hex digits `:port` (IPv6), each 32-bit word in host order.
pub(crate) fn parse_proc_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> =
        (0..ip.len() / 8).map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()).collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip = match (v6, bytes.len()) {
        (false, 4) => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        (true, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

impl Status {
    /// The human form.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "node {}  (pins {})", self.node, self.pin_dir);
        if datapath::read_through_another_mount_namespace(Path::new(&self.pin_dir)) {
            let _ = writeln!(s, "  (read as that process sees them: this mount namespace has no bpffs on /sys/fs/bpf)");
        }
        let _ = writeln!(s, "\nattached programs");
        for a in &self.attachments {
            let place = match (&a.interface, a.ifindex) {
                (Some(n), Some(i)) => format!("{n} (ifindex {i}) {}", a.direction.unwrap_or("")),
                (None, Some(i)) => format!("ifindex {i} (interface gone)"),
                _ => "this network namespace".into(),
            };
            let live = if a.live { "" } else { "  NOT ATTACHED" };
            let topology = a.topology.map(|t| format!("  {t}")).unwrap_or_default();
            let _ = writeln!(s, "  {:<14} {:<10} {:<28} {:<8}{topology}{live}", a.program, a.hook, place, a.mode);
        }
        let _ = writeln!(s, "\nenrolled workload IPs ({})", self.workloads.len());
        for w in &self.workloads {
            let _ = writeln!(
                s,
                "  {:<40} {:<12} {}",
                w.ip,
                w.interface.as_deref().unwrap_or("?"),
                w.workload.as_deref().unwrap_or("")
            );
        }
        let _ = writeln!(s, "\nproxy listeners");
        for l in &self.listeners {
            let owner = l.owner.as_ref().map(|d| format!("  owner: pid {} ({})", d.pid, d.state.code()));
            let _ = writeln!(
                s,
                "  {:<14} {:<18} {:<14} {}{}",
                l.role,
                l.address.to_string(),
                if l.listening { "listening" } else { "not listening" },
                if l.registered { "in SOCKMAP" } else { "NOT in SOCKMAP (its traffic is dropped)" },
                owner.unwrap_or_default()
            );
        }
        let _ = writeln!(s, "\ndaemons");
        if self.daemons.is_empty() {
            let _ = writeln!(s, "  none running");
        }
        for d in &self.daemons {
            let _ = writeln!(s, "  pid {:<10} {}", d.pid, d.state.code());
        }
        connections_text(&mut s, &self.connections);
        s.push_str(&policies_text(&self.policies));
        if !self.cni.log.is_empty() || !self.cni.pods.is_empty() || self.cni.error.is_some() {
            let _ = writeln!(s, "\nCNI plugin: {} pods handed over", self.cni.pods.len());
            for pod in &self.cni.pods {
                let _ = writeln!(s, "  {pod}");
            }
            if let Some(e) = &self.cni.error {
                let _ = writeln!(s, "  cannot read them: {e}");
            }
            for line in &self.cni.log {
                let _ = writeln!(s, "  log: {line}");
            }
        }
        let c = &self.counters;
        let _ = writeln!(
            s,
            "\ndatapath counters\n  classified {}  steered {}  missing_socket {}  spoof_dropped {}  malformed {}  undelivered {}",
            c.classified, c.steered, c.missing_socket, c.spoof_dropped, c.malformed, c.undelivered
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_addresses() {
        assert_eq!(parse_proc_addr("0100007F:3A99", false), Some("127.0.0.1:15001".parse().unwrap()));
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:3A9E", true),
            Some("[::1]:15006".parse().unwrap())
        );
        assert_eq!(parse_proc_addr("garbage", false), None);
        assert_eq!(parse_proc_addr("0100007F:3A99", true), None);
    }
}
