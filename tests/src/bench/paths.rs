//! The labs of the benchmark, one per path, and how each captures pod a's connections.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{ECHO_PORT, IDLE_PORT, PathKind, SINK_PORT};
use crate::lab::{Lab, LabError, Result, ip, readiness, sysctls};
use crate::loadgen;

/// The legacy capture's names and numbers, as the 2022 ambient scripts had them.
pub mod legacy {
    /// The ipset of enrolled pod IPs.
    pub const IPSET: &str = "ztunnel-pods-ips";
    /// The mangle mark of captured packets and its mask, as ambient had it. meshpath's proxy
    /// mark 0x539 has this bit too, so nothing of the legacy path uses 0x539; the proxy's own
    /// sockets live in the proxy namespace, and a veth clears marks between namespaces.
    pub const MARK: &str = "0x100/0x100";
    pub const TABLE: &str = "101";
    /// The tunnel's inner addresses (node side, proxy side).
    pub const TUNNEL_NODE: &str = "192.168.127.1";
    pub const TUNNEL_PROXY: &str = "192.168.127.2";
    /// The proxy namespace's address (a pod address, as ztunnel's pod had).
    pub const PROXY_IP: &str = "10.244.1.3";
    /// VXLAN network id and port of the istioout/pistioout pair (Geneve is not in this kernel).
    pub const VNI: &str = "1001";
    pub const VXLAN_PORT: &str = "4789";
}

/// TPROXY's socket mark in the tproxy and legacy proxies' namespaces: a bit 0x539 (the
/// proxy's own mark, which its upstream sockets carry) does not have, or the upstream
/// connections would be delivered back to the proxy.
const TPROXY_MARK: &str = "0x4000/0x4000";
const TPROXY_TABLE: &str = "100";
/// The tproxy path's ipset.
const TPROXY_IPSET: &str = "mp-bench-pods";
/// How long the proxies under the lab's istiod get to take the mesh (pods a and c).
const ISTIOD_SETTLE: Duration = Duration::from_secs(30);
const CONNECTION_SYSCTLS: &[(&str, &str)] =
    &[("net/ipv4/tcp_tw_reuse", "1"), ("net/ipv4/ip_local_port_range", "1024 65000")];

pub struct Setup {
    pub kind: PathKind,
    pub lab: Lab,
    pub client_ns: String,
    pub servers: loadgen::Servers,
    /// Where the soak's held connections go.
    pub idle: loadgen::IdleServer,
    /// The proxies whose CPU time and memory are reported.
    proxy_pids: Vec<u32>,
    /// The legacy path's proxy, which is no lab daemon (it runs in its own namespace).
    legacy_proxy: Option<Child>,
    /// ztunnel's path: its two ztunnels, in pods a and c.
    ztunnels: Vec<Child>,
}

impl Setup {
    pub fn build(kind: PathKind, binary: &Path) -> Result<Self> {
        Self::build_with(kind, binary, false)
    }

    /// The HBONE paths (meshpath-hbone, ztunnel-hbone) with the mesh described by the lab's
    /// fake istiod instead of a workload file, so that authorization policies can be pushed
    /// to the proxies ([`crate::lab_istiod`]). Returns once the proxies ACKed pods a and c.
    pub fn build_on_istiod(kind: PathKind, binary: &Path) -> Result<Self> {
        if !matches!(kind, PathKind::MeshpathHbone | PathKind::ZtunnelHbone) {
            return Err(LabError::Other(format!("{}: no istiod variant of this path", kind.name())));
        }
        Self::build_with(kind, binary, true)
    }

    fn build_with(kind: PathKind, binary: &Path, istiod: bool) -> Result<Self> {
        let mut lab = Lab::build_with(binary, crate::Topology::Routed)?;
        // Thousands of short connections a second from one client to one server: let
        // TIME_WAIT ports be reused (as load generators do), everywhere alike.
        for ns in
            lab.nodes.iter().map(|n| n.name.clone()).chain(lab.pods.iter().map(|p| p.netns.clone())).collect::<Vec<_>>()
        {
            sysctls(&ns, CONNECTION_SYSCTLS)?;
        }
        // Every node of a real cluster runs kube-proxy: its NAT chains make conntrack follow
        // every flow, on every path alike.
        for n in lab.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>() {
            kube_proxy_chains(&n)?;
        }
        let server = match kind {
            PathKind::MeshpathHbone => "c",
            PathKind::MeshpathRelay => "d",
            PathKind::ZtunnelHbone => "c",
            _ => "b",
        };
        let mut legacy_proxy = None;
        let mut ztunnels = Vec::new();
        // Every proxied path relays alike: upstream from the node's (or proxy namespace's)
        // own address, which TPROXY setups need and meshpath can do too.
        lab.pod_cidr_args = matches!(kind, PathKind::MeshpathHbone | PathKind::MeshpathRelay);
        // One client pod makes all the load: its share of the connection limit is all of it.
        lab.daemon_args = vec!["--max-connections-per-source".into(), "1000000".into()];
        if istiod {
            lab.start_cluster()?;
            lab.start_istiod()?;
        }
        match kind {
            PathKind::Direct => {}
            PathKind::Meshpath | PathKind::MeshpathRelay => {
                lab.write_workloads_text(&workloads_yaml(&lab, 1))?;
                lab.start_daemon(0)?;
            }
            PathKind::MeshpathHbone if istiod => {
                lab.start_daemons()?;
                lab.wait_mesh_synced(ISTIOD_SETTLE)?;
            }
            PathKind::MeshpathHbone => {
                lab.write_workloads(&["a", "c"])?;
                lab.start_daemons()?;
            }
            PathKind::Tproxy => {
                lab.write_workloads_text(&workloads_yaml(&lab, 1))?;
                tproxy_capture(&lab)?;
                lab.daemon_args.push("--proxy-only".into());
                lab.start_daemon(0)?;
            }
            PathKind::Legacy => {
                lab.write_workloads_text(&workloads_yaml(&lab, 1))?;
                let zt = legacy_capture(&mut lab)?;
                legacy_proxy = Some(start_legacy_proxy(&lab, &zt)?);
            }
            PathKind::ZtunnelHbone if istiod => ztunnels = ztunnel::start_on_istiod(&lab)?,
            PathKind::ZtunnelHbone => ztunnels = ztunnel::start(&lab)?,
        }
        let mut proxy_pids: Vec<u32> = lab.nodes.iter().filter_map(|n| n.daemon.as_ref().map(Child::id)).collect();
        proxy_pids.extend(legacy_proxy.as_ref().map(Child::id));
        proxy_pids.extend(ztunnels.iter().map(Child::id));
        let sp = lab.pod(server).clone();
        let servers = loadgen::Servers::start(Some(&sp.netns), sp.v4, ECHO_PORT, SINK_PORT)?;
        let idle = loadgen::IdleServer::start(&sp.netns, SocketAddr::new(sp.v4, IDLE_PORT))?;
        let client_ns = lab.pod("a").netns.clone();
        Ok(Self { kind, lab, client_ns, servers, idle, proxy_pids, legacy_proxy, ztunnels })
    }

    pub fn echo_addr(&self) -> SocketAddr {
        self.servers.echo_addr
    }

    pub fn sink_addr(&self) -> SocketAddr {
        self.servers.sink_addr
    }

    /// Fills the capture to `n` enrolled workloads: pod a and `n - 1` others (addresses routed
    /// to a spare interface of node 1), in the workload map (meshpath) or the ipset.
    pub fn fill(&mut self, n: usize) -> Result<()> {
        let n1 = self.lab.nodes[0].name.clone();
        let yaml = workloads_yaml(&self.lab, n);
        match self.kind {
            PathKind::Meshpath => {
                // A veth pair (this kernel has no dummy driver) carries the fillers' routes.
                let _ = ip(&["-n", &n1, "link", "del", "fill0"]);
                ip(&["-n", &n1, "link", "add", "fill0", "type", "veth", "peer", "name", "fill0p"])?;
                ip(&["-n", &n1, "link", "set", "fill0", "up"])?;
                ip(&["-n", &n1, "link", "set", "fill0p", "up"])?;
                let mut batch = String::new();
                for f in fillers(n) {
                    let _ = writeln!(batch, "route add {f}/32 dev fill0");
                }
                let file = self.lab.dir.join("fill-routes.batch");
                std::fs::write(&file, batch)?;
                ip(&["-n", &n1, "-batch", &file.display().to_string()])?;
                self.lab.write_workloads_text(&yaml)?;
                // a's two addresses and one per filler.
                let want = n + 1;
                let deadline = Instant::now() + Duration::from_secs(120);
                while self.lab.workload_map(0)?.len() != want {
                    if Instant::now() > deadline {
                        return Err(LabError::Other(format!("the workload map did not reach {want} entries")));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            PathKind::Tproxy | PathKind::Legacy => {
                let set = if self.kind == PathKind::Tproxy { TPROXY_IPSET } else { legacy::IPSET };
                let mut script = format!("flush {set}\nadd {set} {}\n", self.lab.pod("a").v4);
                for f in fillers(n) {
                    let _ = writeln!(script, "add {set} {f}");
                }
                ipset_restore(&n1, &script)?;
                // Their proxies hold the same workload list as meshpath's.
                self.lab.write_workloads_text(&yaml)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) this lab's proxies, so an idle lab takes no CPU
    /// from the one being measured.
    pub fn pause(&self, stop: bool) {
        let sig = if stop { nix::sys::signal::Signal::SIGSTOP } else { nix::sys::signal::Signal::SIGCONT };
        for pid in &self.proxy_pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), sig);
        }
    }

    /// Resident memory of the proxies, KiB.
    pub fn proxy_rss_kib(&self) -> Option<u64> {
        if self.proxy_pids.is_empty() {
            return None;
        }
        let mut total = 0;
        for pid in &self.proxy_pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()?;
        }
        Some(total)
    }

    /// CPU time the proxies have used (user and system), all together.
    pub fn proxy_cpu(&self) -> Option<Duration> {
        if self.proxy_pids.is_empty() {
            return None;
        }
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten()? as f64;
        let mut total = 0.0;
        for pid in &self.proxy_pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command's closing parenthesis: state is field 3, utime and stime 14 and 15.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            total += fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        }
        Some(Duration::from_secs_f64(total / ticks))
    }

    /// On-CPU time of every proxy thread so far, exact (from the scheduler), by thread id.
    /// `/proc/<pid>/stat` counts in clock ticks (10 ms): too coarse for an idle proxy.
    pub fn proxy_thread_times(&self) -> Option<ThreadTimes> {
        if self.proxy_pids.is_empty() {
            return None;
        }
        let mut times = ThreadTimes::default();
        for pid in &self.proxy_pids {
            for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
                let Ok(tid) = task.file_name().to_string_lossy().parse::<u32>() else { continue };
                // The first field is the time on a CPU in ns; a thread gone meanwhile is skipped.
                let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
                if let Some(ns) = stat.split_whitespace().next().and_then(|f| f.parse().ok()) {
                    times.0.insert(tid, ns);
                }
            }
        }
        Some(times)
    }

    /// Open file descriptors of the proxies, all together.
    pub fn proxy_fds(&self) -> Option<u64> {
        self.proxy_pids.iter().map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok().map(|d| d.count() as u64)).sum()
    }

    pub fn teardown(mut self) -> Result<()> {
        self.pause(false);
        self.stop_legacy_proxy();
        let problems = self.lab.teardown();
        if problems.is_empty() { Ok(()) } else { Err(LabError::Other(problems.join("; "))) }
    }

    fn stop_legacy_proxy(&mut self) {
        for mut z in self.ztunnels.drain(..) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(z.id() as i32), nix::sys::signal::Signal::SIGCONT);
            let _ = z.kill();
            let _ = z.wait();
        }
        if let Some(mut p) = self.legacy_proxy.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.id() as i32), nix::sys::signal::Signal::SIGCONT);
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = p.wait();
        }
    }
}

// The legacy proxy is no lab daemon: a failed run must not leave it behind (the lab's own
// teardown handles the rest).
impl Drop for Setup {
    fn drop(&mut self) {
        self.pause(false);
        self.stop_legacy_proxy();
    }
}

/// Addresses of `n - 1` filler workloads.
fn fillers(n: usize) -> impl Iterator<Item = IpAddr> {
    (0..n.saturating_sub(1)).map(|i| IpAddr::from([10, 250, (i / 250) as u8, (i % 250 + 1) as u8]))
}

/// Pod a and `n - 1` fillers on node 1 (one service account: one certificate).
fn workloads_yaml(lab: &Lab, n: usize) -> String {
    let mut y = lab.workloads_yaml(&["a"]);
    let node = &lab.nodes[0].name;
    for (i, f) in fillers(n).enumerate() {
        let _ = writeln!(y, "  - {{name: f{i}, namespace: fill, serviceAccount: filler, node: {node}, ips: [{f}]}}");
    }
    y
}

fn ipset_restore(ns: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "ipset", "restore", "-exist"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn { cmd: "ipset restore".into(), source })?;
    child.stdin.take().expect("piped").write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: "ipset restore".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    Ok(())
}

/// Runs `iptables ARGS` inside `ns`.
fn iptables(ns: &str, args: &[&str]) -> Result<()> {
    crate::lab::run(Command::new("ip").args(["netns", "exec", ns, "iptables"]).args(args)).map(|_| ())
}

/// TPROXY in the namespace `ns` to the proxy's outbound listener for TCP matching `rule`,
/// with the local route that delivers the marked packets.
fn tproxy_to_listener(ns: &str, rule: &[&str]) -> Result<()> {
    let port = meshpath_common::names::PORT_OUTBOUND.to_string();
    let mut args = vec!["-t", "mangle", "-A", "PREROUTING", "-p", "tcp"];
    args.extend_from_slice(rule);
    args.extend_from_slice(&["-j", "TPROXY", "--on-ip", "127.0.0.1", "--on-port", &port, "--tproxy-mark", TPROXY_MARK]);
    iptables(ns, &args)?;
    ip(&["-n", ns, "rule", "add", "fwmark", TPROXY_MARK, "lookup", TPROXY_TABLE, "priority", "100"])?;
    ip(&["-n", ns, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", TPROXY_TABLE])?;
    Ok(())
}

/// The tproxy path: one ipset-matched TPROXY rule in node 1.
fn tproxy_capture(lab: &Lab) -> Result<()> {
    let n1 = &lab.nodes[0].name;
    crate::lab::run(Command::new("ip").args([
        "netns",
        "exec",
        n1,
        "ipset",
        "create",
        TPROXY_IPSET,
        "hash:ip",
        "maxelem",
        "65536",
    ]))?;
    tproxy_to_listener(n1, &["-m", "set", "--match-set", TPROXY_IPSET, "src"])
}

/// The legacy path: a proxy namespace behind a veth (as ztunnel's pod was), the ipset and
/// mangle mark on node 1, policy routing into the istioout tunnel, TPROXY in the proxy's
/// namespace, and kube-proxy's NAT chains so conntrack tracks every connection. Returns the
/// proxy namespace.
fn legacy_capture(lab: &mut Lab) -> Result<String> {
    use legacy::*;
    let n1 = lab.nodes[0].name.clone();
    let zt = format!("{}-zt", lab.id);
    lab.add_netns(&zt)?;
    // The proxy's "pod": a routed veth like the others.
    ip(&["link", "add", "vzt", "netns", &n1, "type", "veth", "peer", "name", "eth0", "netns", &zt])?;
    ip(&["-n", &zt, "addr", "add", &format!("{PROXY_IP}/32"), "dev", "eth0"])?;
    ip(&["-n", &zt, "link", "set", "eth0", "up"])?;
    ip(&["-n", &zt, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
    ip(&["-n", &zt, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
    ip(&["-n", &n1, "link", "set", "vzt", "up"])?;
    ip(&["-n", &n1, "addr", "add", "169.254.1.1/32", "dev", "vzt", "scope", "link"])?;
    ip(&["-n", &n1, "route", "add", &format!("{PROXY_IP}/32"), "dev", "vzt"])?;
    // The tunnel between the node and the proxy's namespace.
    let node_ip = lab.nodes[0].underlay_v4.to_string();
    ip(&[
        "-n", &n1, "link", "add", "istioout", "type", "vxlan", "id", VNI, "local", &node_ip, "remote", PROXY_IP,
        "dstport", VXLAN_PORT,
    ])?;
    ip(&["-n", &n1, "addr", "add", &format!("{TUNNEL_NODE}/30"), "dev", "istioout"])?;
    ip(&["-n", &n1, "link", "set", "istioout", "up"])?;
    ip(&[
        "-n",
        &zt,
        "link",
        "add",
        "pistioout",
        "type",
        "vxlan",
        "id",
        VNI,
        "local",
        PROXY_IP,
        "remote",
        &node_ip,
        "dstport",
        VXLAN_PORT,
    ])?;
    ip(&["-n", &zt, "addr", "add", &format!("{TUNNEL_PROXY}/30"), "dev", "pistioout"])?;
    ip(&["-n", &zt, "link", "set", "pistioout", "up"])?;
    // Packets arrive in the proxy namespace from the tunnel with sources it routes elsewhere.
    sysctls(
        &zt,
        &[
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv4/conf/pistioout/rp_filter", "0"),
        ],
    )?;
    sysctls(&zt, CONNECTION_SYSCTLS)?;
    sysctls(&n1, &[("net/ipv4/conf/all/rp_filter", "0"), ("net/ipv4/conf/vzt/rp_filter", "0")])?;
    // Node 1: mark enrolled sources, route the marked into the tunnel. The tunnel's own outer
    // packets inherit the mark, so the proxy namespace's address is on-link in the table too,
    // or they would route back into the tunnel.
    crate::lab::run(
        Command::new("ip").args(["netns", "exec", &n1, "ipset", "create", IPSET, "hash:ip", "maxelem", "65536"]),
    )?;
    iptables(
        &n1,
        &[
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-m",
            "set",
            "--match-set",
            IPSET,
            "src",
            "-j",
            "MARK",
            "--set-xmark",
            MARK,
        ],
    )?;
    ip(&["-n", &n1, "rule", "add", "fwmark", MARK, "lookup", TABLE, "priority", "101"])?;
    ip(&["-n", &n1, "route", "add", "default", "via", TUNNEL_PROXY, "dev", "istioout", "table", TABLE])?;
    ip(&["-n", &n1, "route", "add", &format!("{PROXY_IP}/32"), "dev", "vzt", "scope", "link", "table", TABLE])?;
    // (kube-proxy's NAT chains are in every lab: see `Setup::build`.)
    // The proxy namespace: TPROXY what comes out of the tunnel.
    tproxy_to_listener(&zt, &["-i", "pistioout"])?;
    Ok(zt)
}

/// kube-proxy's NAT chains in `ns`: with a NAT table in place, conntrack follows every flow.
fn kube_proxy_chains(ns: &str) -> Result<()> {
    iptables(ns, &["-t", "nat", "-N", "KUBE-SERVICES"])?;
    for chain in ["PREROUTING", "OUTPUT"] {
        iptables(ns, &["-t", "nat", "-A", chain, "-j", "KUBE-SERVICES"])?;
    }
    Ok(())
}

/// meshpath's proxy, datapath-less, in the legacy proxy namespace.
fn start_legacy_proxy(lab: &Lab, zt: &str) -> Result<Child> {
    let log = std::fs::File::create(lab.dir.join("legacy-proxy.log"))?;
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{zt}"))
        .arg(&lab.binary)
        .args(["node", "--proxy-only", "--max-connections-per-source", "1000000", "--node", &lab.nodes[0].name])
        .arg("--workloads")
        .arg(lab.workloads_path())
        .args(["--ca-dir"])
        .arg(lab.ca_dir())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|source| LabError::Spawn { cmd: "legacy proxy".into(), source })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !readiness(zt).unwrap_or(false) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::Other(format!(
                "the legacy proxy in {zt} is not ready; see {}",
                lab.dir.join("legacy-proxy.log").display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// Istio's ztunnel as the peer of meshpath-hbone: one in pod a (its outbound side, with
/// pod a's connections redirected to it as a sidecar's are) and one in pod c (inbound),
/// both in dedicated mode with ztunnel's test CA and a local workload file.
pub mod ztunnel {
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::lab::{Lab, LabError, Result};

    /// The ztunnel binary (built with `--features testing` for its fake CA), from
    /// `MESHPATH_ZTUNNEL`, as the interop test takes it.
    pub fn binary() -> Option<PathBuf> {
        std::env::var_os("MESHPATH_ZTUNNEL").filter(|v| !v.is_empty()).map(PathBuf::from).filter(|p| p.is_file())
    }

    /// What the ztunnel binary is, from the README and SHA256SUMS beside it (the shared peer's
    /// layout): its commit, its cargo features, and whether its checksum is the listed one.
    pub fn build() -> Option<String> {
        let bin = binary()?;
        let dir = bin.parent()?;
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap_or_default();
        let commit = readme
            .split_whitespace()
            .find(|w| w.len() >= 40 && w.chars().take(40).all(|c| c.is_ascii_hexdigit()))
            .map(|w| w[..12].to_owned());
        let features = readme.lines().find_map(|l| l.split_once("--features ").map(|(_, f)| f.trim().to_owned()));
        let listed = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap_or_default();
        let sum = Command::new("sha256sum").arg(&bin).output().ok();
        let sum = sum.and_then(|o| String::from_utf8(o.stdout).ok()?.split_whitespace().next().map(str::to_owned));
        let checked = match &sum {
            Some(s) if listed.contains(s.as_str()) => "its SHA256SUMS entry",
            Some(_) => "NOT in its SHA256SUMS",
            None => "checksum not computed",
        };
        let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "unknown (no README beside the binary)".into());
        Some(format!(
            "ztunnel `{}`, commit {}, features `{}`, sha256 {}",
            bin.display(),
            or_unknown(commit),
            or_unknown(features),
            checked
        ))
    }

    /// ztunnel's local workload file: pods a and c with their lab identities, both speaking
    /// HBONE (the interop test uses it too).
    pub fn config(lab: &Lab) -> String {
        let mut y = String::from("workloads:\n");
        for pod in ["a", "c"] {
            let p = lab.pod(pod);
            y += &format!(
                "- uid: lab//v1/Pod/lab/pod-{pod}\n  name: pod-{pod}\n  namespace: lab\n  serviceAccount: sa-{pod}\n  \
                 trustDomain: {}\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n  node: {}\n  network: \"\"\n  services: {{}}\n",
                Lab::TRUST_DOMAIN,
                p.v4,
                lab.nodes[p.node].name
            );
        }
        y
    }

    /// Starts both ztunnels with ztunnel's test CA and a local workload file, and redirects
    /// pod a's outbound TCP to a's (see [`start_with`]).
    pub fn start(lab: &Lab) -> Result<Vec<Child>> {
        let cfg = lab.dir.join("ztunnel.yaml");
        std::fs::write(&cfg, config(lab))?;
        start_with(lab, |pod| {
            vec![
                "FAKE_CA=true".into(),
                "XDS_ADDRESS=".into(),
                format!("PROXY_WORKLOAD_INFO=lab/pod-{pod}/sa-{pod}"),
                format!("LOCAL_XDS_PATH={}", cfg.display()),
            ]
        })
    }

    /// Starts both ztunnels on the lab's istiod (started, with pods a and c described as
    /// HBONE: no meshpath daemon runs to annotate them), each with its pod's token, as the
    /// interop test runs ztunnel; returns once both ACKed a's and c's workloads.
    pub fn start_on_istiod(lab: &Lab) -> Result<Vec<Child>> {
        use crate::istiod::proto::istio::workload::TunnelProtocol;
        use crate::istiod::xds::{LabResource, pod_uid};
        use crate::lab_istiod::CLUSTER_ID;
        let uids: Vec<String> =
            ["a", "c"].iter().map(|p| pod_uid(CLUSTER_ID, lab.pod_namespace(p), &format!("pod-{p}"))).collect();
        let hbone = uids.clone();
        lab.istiod().edit(move |r| {
            if let LabResource::Workload(w) = r
                && hbone.contains(&w.uid)
            {
                w.tunnel_protocol = TunnelProtocol::Hbone as i32;
            }
        });
        let istiod = lab.istiod();
        let children = start_with(lab, |pod| {
            let p = lab.pod(pod);
            let ns = lab.pod_namespace(pod);
            vec![
                format!("XDS_ADDRESS={}", istiod.url),
                format!("CA_ADDRESS={}", istiod.url),
                format!("XDS_ROOT_CA={}", istiod.root.display()),
                format!("CA_ROOT_CA={}", istiod.root.display()),
                format!("AUTH_TOKEN={}", lab.pod_token_path(pod).display()),
                format!("CLUSTER_ID={CLUSTER_ID}"),
                format!("NODE_NAME={}", lab.nodes[p.node].name),
                // istiod takes the proxy's namespace from these and checks it against the token's.
                format!("POD_NAME=pod-{pod}"),
                format!("POD_NAMESPACE={ns}"),
                format!("INSTANCE_IP={}", p.v4),
                format!("PROXY_WORKLOAD_INFO={ns}/pod-{pod}/sa-{pod}"),
            ]
        })?;
        let proxies = vec!["pod-a".to_owned(), "pod-c".to_owned()];
        let deadline = Instant::now() + Duration::from_secs(30);
        while !uids.iter().all(|u| istiod.acked_by(&proxies, u)) {
            if Instant::now() > deadline {
                return Err(LabError::Other(format!(
                    "the ztunnels did not ACK pods a and c within 30 s; see {}",
                    lab.dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(children)
    }

    /// Starts ztunnel in dedicated mode in pods a and c, with `env(pod)` on top of the common
    /// settings, and redirects pod a's outbound TCP (but ztunnel's own, to ports 15008 and
    /// 15012) to a's, as a sidecar's capture would.
    fn start_with(lab: &Lab, env: impl Fn(&str) -> Vec<String>) -> Result<Vec<Child>> {
        let bin = binary().ok_or_else(|| LabError::Other("MESHPATH_ZTUNNEL is not set".into()))?;
        let a = lab.pod("a").netns.clone();
        for rule in [
            // ztunnel's own HBONE and istiod connections (in dedicated mode it marks none of
            // its sockets, and the bench's apps use other ports).
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "15008", "-j", "RETURN"][..],
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "15012", "-j", "RETURN"],
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.0/8", "-j", "RETURN"],
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"],
        ] {
            crate::lab::run(Command::new("ip").args(["netns", "exec", &a, "iptables"]).args(rule))?;
        }
        let mut out = Vec::new();
        for pod in ["a", "c"] {
            let ns = lab.pod(pod).netns.clone();
            let log = std::fs::File::create(lab.dir.join(format!("ztunnel-{pod}.log")))?;
            let child = Command::new("ip")
                .args(["netns", "exec", &ns, "env"])
                .args(["PROXY_MODE=dedicated", "ENABLE_ORIG_SRC=false", "RUST_LOG=warn"])
                .args(env(pod))
                .arg(&bin)
                .arg("proxy")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .map_err(|source| LabError::Spawn { cmd: "ztunnel".into(), source })?;
            out.push(child);
            wait_listening(lab, &ns, if pod == "a" { 15001 } else { 15008 })?;
        }
        Ok(out)
    }

    fn wait_listening(lab: &Lab, ns: &str, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = crate::traffic::in_netns(ns, || {
                ["tcp", "tcp6"].iter().any(|f| {
                    std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).is_ok_and(|t| {
                        t.lines().skip(1).any(|l| {
                            let c: Vec<&str> = l.split_whitespace().collect();
                            c.get(3) == Some(&"0A") && c.get(1).is_some_and(|a| a.ends_with(&format!(":{port:04X}")))
                        })
                    })
                })
            })?;
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::Other(format!(
                    "ztunnel in {ns} not listening on {port} after 30 s; see {}",
                    lab.dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// On-CPU nanoseconds of each thread of the proxies at one moment.
#[derive(Default)]
pub struct ThreadTimes(std::collections::HashMap<u32, u64>);

impl ThreadTimes {
    /// CPU time spent since `earlier`: by the threads alive at both moments, and all of a
    /// thread started since. A thread that ended in between loses its share (its time is
    /// not readable any more).
    pub fn since(&self, earlier: &ThreadTimes) -> Duration {
        let ns = self.0.iter().map(|(tid, now)| now.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0))).sum();
        Duration::from_nanos(ns)
    }
}
