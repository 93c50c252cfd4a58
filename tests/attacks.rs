//! A hostile pod and a careless operator against the real kernel, each in a lab of its own:
//! VLAN-tagged frames, addresses of other nodes' pods, the capture rule deleted under a
//! stopped daemon, uninstall under a running one, workload IPs that are not pods', pins
//! deleted, a failed start, a workload file written in place, an unprivileged user locking
//! the node. Every one must fail closed.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use meshpath_common::names::{HANDOVER_SOCKET, STATE_DIR};
use meshpath_lab::capture::Capture;
use meshpath_lab::hostile::{Reach, reach_as};
use meshpath_lab::{Lab, raw, smoke, traffic};

mod support;
use support::{built_lab, ip, send, started_lab, wait_until};

/// Writes a TCP SYN from `from` (claiming address `src`) to `to` under two priority tags
/// (802.1ad then 802.1Q, VID 0), and reports whether node 1's underlay carried it.
fn tagged_syn_crossed_the_underlay(lab: &Lab, from: &str, src: IpAddr, sport: u16, to: &str) -> Result<bool> {
    let p = lab.pod(from);
    let node = &lab.nodes[p.node].name;
    let dst_mac = raw::mac_of(node, &p.host_if)?;
    let src_mac = raw::mac_of(&p.netns, "eth0")?;
    let src = std::net::SocketAddr::new(src, sport);
    let dst = lab.addr(to, false, smoke::APP_PORT);
    let frame = raw::tagged_syn(src_mac, dst_mac, &[raw::TPID_8021AD, raw::TPID_8021Q], src, dst);
    let capture = Capture::start(node, "ul0")?;
    raw::send_frame(&p.netns, "eth0", &frame)?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(capture.stop()?.iter().any(|s| s.syn && !s.ack && s.src == src && s.dst == dst))
}

#[test]
fn double_tagged_frames_are_classified_as_the_stack_will_see_them() -> Result<()> {
    let lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    // a's own SYN to d under two tags: captured and steered to the proxy, never direct.
    let before = lab.counters(0)?;
    ensure!(
        !tagged_syn_crossed_the_underlay(&lab, "a", lab.pod("a").v4, 40_001, "d")?,
        "a's tagged SYN to d went direct"
    );
    let after = lab.counters(0)?;
    ensure!(after.steered > before.steered, "a's tagged SYN did not reach the proxy: {before:?} -> {after:?}");
    // b claiming a's address under two tags: dropped as the spoof it is.
    ensure!(
        !tagged_syn_crossed_the_underlay(&lab, "b", lab.pod("a").v4, 40_002, "c")?,
        "b's tagged spoof reached the underlay"
    );
    ensure!(lab.counters(0)?.spoof_dropped > after.spoof_dropped, "the tagged spoof was not counted as one");
    // Tagged deeper than meshpath reads: dropped on a pod interface.
    let p = lab.pod("b");
    let frame = raw::tagged_syn(
        raw::mac_of(&p.netns, "eth0")?,
        raw::mac_of(&lab.nodes[0].name, &p.host_if)?,
        // The outermost goes to the skb's metadata on the way in: three stay in the frame.
        &[raw::TPID_8021AD, raw::TPID_8021Q, raw::TPID_8021Q, raw::TPID_8021Q],
        std::net::SocketAddr::new(p.v4, 41_000),
        lab.addr("d", false, smoke::APP_PORT),
    );
    let malformed = lab.counters(0)?.malformed;
    raw::send_frame(&p.netns, "eth0", &frame)?;
    wait_until("the triple-tagged frame to be dropped", Duration::from_secs(2), || {
        Ok(lab.counters(0)?.malformed > malformed)
    })?;
    Ok(())
}

#[test]
fn a_pod_cannot_claim_the_address_of_another_nodes_pod() -> Result<()> {
    let lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let c = lab.pod("c").v4;
    // To an enrolled pod of its own node, to a plain one on the other node, to c itself.
    for to in ["e", "d", "c"] {
        let row = smoke::spoof(&lab, "b claims c's address", "b", c, to)?;
        ensure!(row.ok, "b -> {to} claiming c's address: {} ({})", row.path, row.detail);
    }
    wait_until("node 1's log to name the reason, the interface and the address", Duration::from_secs(3), || {
        let log = std::fs::read_to_string(lab.daemon_log_path(0))?;
        Ok(log
            .lines()
            .any(|l| l.contains("no_route_back") && l.contains("interface=vpb") && l.contains(&c.to_string())))
    })?;
    Ok(())
}

#[test]
fn without_the_capture_rule_connections_are_dropped_not_sent_direct() -> Result<()> {
    use meshpath_common::names::{ROUTE_TABLE, RULE_PRIORITY};
    let mut lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let n1 = lab.nodes[0].name.clone();
    send(&lab, "a", "b", Duration::from_secs(3)).context("baseline a -> b")?;
    // The daemon cannot restore what it does not run to see.
    let pid = nix::unistd::Pid::from_raw(lab.nodes[0].daemon.as_ref().context("no daemon")?.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let result = (|| -> Result<()> {
        let before = lab.counters(0)?.undelivered;
        ip(&n1, &["rule", "del", "priority", &RULE_PRIORITY.to_string()])?;
        ip(&n1, &["-6", "rule", "del", "priority", &RULE_PRIORITY.to_string()])?;
        for (from, to) in [("a", "b"), ("a", "d"), ("d", "a"), ("b", "a")] {
            let r = send(&lab, from, to, Duration::from_millis(1500));
            ensure!(r.is_err(), "{from} -> {to} went direct while the capture rule was missing: {r:?}");
        }
        ensure!(lab.counters(0)?.undelivered > before, "the dropped attempts were not counted as undelivered");
        ip(&n1, &["route", "del", "local", "default", "table", &ROUTE_TABLE.to_string()])?;
        let r = send(&lab, "a", "b", Duration::from_millis(1500));
        ensure!(r.is_err(), "a -> b went direct with neither rule nor route: {r:?}");
        Ok(())
    })();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    result?;
    // Running again, the daemon puts them back and traffic resumes through the proxy.
    wait_until("a -> b through the proxy again", Duration::from_secs(10), || {
        Ok(send(&lab, "a", "b", Duration::from_secs(1)).is_ok())
    })?;
    lab.stop_daemon(0, false)?;
    Ok(())
}

/// A NAT on the node (kube-proxy's DNAT of a Service address) turns a non-enrolled client's
/// connection toward an enrolled pod after the classifier saw it: the NAT table's route
/// for the pod delivers it to the proxy. With that route deleted it is dropped by the
/// egress guard, never forwarded around the proxy, until the daemon puts the route back.
#[test]
fn a_nat_on_the_node_leads_to_the_proxy_and_never_around_it() -> Result<()> {
    use meshpath_common::names::NAT_ROUTE_TABLE;
    let mut lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let n1 = lab.nodes[0].name.clone();
    let e = lab.pod("e").v4;
    let rule = ["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-d", "10.96.0.77", "--dport", "80", "-j", "DNAT"];
    let out = Command::new("ip")
        .args(["netns", "exec", &n1, "iptables"])
        .args(rule)
        .args(["--to-destination", &format!("{e}:{}", smoke::APP_PORT)])
        .output()?;
    ensure!(out.status.success(), "iptables: {}", String::from_utf8_lossy(&out.stderr));
    let service: std::net::SocketAddr = "10.96.0.77:80".parse()?;
    let b = lab.pod("b").netns.clone();
    let through = || traffic::exchange(&b, None, service, b"x", Duration::from_millis(1500));
    let x = through().context("b -> the service address, through the proxy")?;
    let r = lab.wait_record(0, Duration::from_secs(3), |r| r.src == x.client)?.context("no record of it")?;
    ensure!(r.listener == "inbound_plain" && r.frontend == Some(service), "not through the proxy: {r:?}");
    // The daemon gone and its route deleted: dropped as a bypass.
    lab.stop_daemon(0, true)?;
    let table = NAT_ROUTE_TABLE.to_string();
    let delete_route = || ip(&n1, &["route", "del", "local", &e.to_string(), "table", &table]);
    delete_route()?;
    let before = lab.counters(0)?.undelivered;
    let r = through();
    ensure!(r.is_err(), "b reached e through the NAT without the proxy: {r:?}");
    wait_until("the bypass to be counted", Duration::from_secs(3), || Ok(lab.counters(0)?.undelivered > before))?;
    // Back, the daemon routes it to the proxy again.
    lab.start_daemon(0)?;
    wait_until("b -> e through the NAT again", Duration::from_secs(10), || Ok(through().is_ok()))?;
    // Deleted under the running daemon: put back at once, and said.
    delete_route()?;
    wait_until("node 1's log to say its NAT route was restored", Duration::from_secs(5), || {
        Ok(std::fs::read_to_string(lab.daemon_log_path(0))?.contains("NAT table were changed behind meshpath's back"))
    })?;
    let routes = ip(&n1, &["route", "show", "table", &table])?;
    ensure!(routes.contains(&format!("local {e} ")), "the route was not put back: {routes}");
    through().context("b -> e after the route came back")?;
    // A route of someone else's in the table would deliver NATed traffic to whatever
    // listens on the node: it goes.
    ip(&n1, &["route", "add", "local", "10.244.1.0/24", "dev", "lo", "table", &table])?;
    wait_until("the stranger route to be deleted", Duration::from_secs(5), || {
        Ok(!ip(&n1, &["route", "show", "table", &table])?.contains("10.244.1.0/24"))
    })?;
    Ok(())
}

#[test]
fn uninstall_refuses_while_a_daemon_serves_the_node_whatever_its_ports() -> Result<()> {
    let mut lab = built_lab()?;
    lab.daemon_args = ["--readiness-port", "16021", "--metrics-port", "16020"].map(String::from).to_vec();
    lab.spawn_daemon(0)?;
    let ns = lab.nodes[0].name.clone();
    wait_until("node 1 ready on port 16021", Duration::from_secs(30), || {
        Ok(meshpath_lab::http_get(&ns, 16021, "/healthz/ready").is_ok_and(|r| r.starts_with("HTTP/1.1 200")))
    })?;
    let err = lab.uninstall(0).expect_err("uninstall must refuse while the daemon runs").to_string();
    ensure!(err.contains("holds the node lock"), "unexpected refusal: {err}");
    ensure!(lab.classifiers(0, "vpa")? == 1, "uninstall touched the running datapath");
    // Once it is gone, uninstall goes through and removes everything.
    lab.stop_daemon(0, true)?;
    lab.uninstall(0)?;
    let left = lab.leftovers(0)?;
    ensure!(left.is_empty(), "node 1 still holds: {left:#?}");
    Ok(())
}

#[test]
fn workload_ips_that_are_not_pods_are_refused_and_the_node_keeps_working() -> Result<()> {
    let lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let n1 = lab.nodes[0].name.clone();
    // An address of the uplink's subnet (behind ul0), the node's own, one outside the pod
    // networks: each would capture or drop flows that are not the workload's.
    let bad = ["192.168.250.77", "192.168.250.1", "10.9.9.9"];
    let mut yaml = lab.workloads_yaml(&["a", "c", "e"]);
    for (i, b) in bad.iter().enumerate() {
        yaml.push_str(&format!("  - {{name: bad{i}, namespace: x, serviceAccount: x, node: {n1}, ips: [{b}]}}\n"));
    }
    lab.write_workloads_text(&yaml)?;
    let log = lab.daemon_log_path(0);
    wait_until("node 1 to refuse the three addresses", Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&log)?;
        Ok(bad.iter().all(|b| text.lines().any(|l| l.contains("not enrolled") && l.contains(b))))
    })?;
    let map = lab.workload_map(0)?;
    for b in bad {
        ensure!(!map.contains_key(&b.parse::<IpAddr>()?), "{b} was enrolled");
    }
    // Cross-node traffic of enrolled and plain pods still flows.
    for (from, to) in [("a", "c"), ("b", "d"), ("d", "a")] {
        send(&lab, from, to, Duration::from_secs(3)).with_context(|| format!("{from} -> {to}"))?;
    }
    Ok(())
}

/// Without `--pod-cidr` to tell pods' addresses from others, what is routed to an uplink (or
/// is the node's own) is still refused.
#[test]
fn without_pod_networks_workload_ips_behind_an_uplink_are_refused() -> Result<()> {
    let mut lab = built_lab()?;
    lab.pod_cidr_args = false;
    lab.start_daemons()?;
    let _servers = smoke::start_servers(&lab)?;
    let n1 = lab.nodes[0].name.clone();
    let mut yaml = lab.workloads_yaml(&["a", "c", "e"]);
    yaml.push_str(&format!("  - {{name: bad, namespace: x, serviceAccount: x, node: {n1}, ips: [192.168.250.77]}}\n"));
    lab.write_workloads_text(&yaml)?;
    let log = lab.daemon_log_path(0);
    wait_until("node 1 to refuse 192.168.250.77 as behind its uplink", Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&log)?;
        Ok(text.lines().any(|l| l.contains("192.168.250.77") && l.contains("not pod-facing")))
    })?;
    ensure!(!lab.workload_map(0)?.contains_key(&"192.168.250.77".parse::<IpAddr>()?), "it was enrolled");
    for (from, to) in [("a", "c"), ("b", "d")] {
        send(&lab, from, to, Duration::from_secs(3)).with_context(|| format!("{from} -> {to}"))?;
    }
    Ok(())
}

#[test]
fn pins_deleted_behind_the_daemon_are_restored() -> Result<()> {
    use meshpath_common::names::{MAP_COUNTERS, MAP_WORKLOADS, PIN_LINKS_SUBDIR, PIN_SK_LOOKUP_LINK};
    let lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    send(&lab, "a", "c", Duration::from_secs(3))?;
    let before = lab.counters(0)?;
    let dir = meshpath::datapath::node_pin_dir(&lab.nodes[0].name)?;
    let gone = [dir.join(MAP_COUNTERS), dir.join(MAP_WORKLOADS), dir.join(PIN_LINKS_SUBDIR).join(PIN_SK_LOOKUP_LINK)];
    for p in &gone {
        std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
    }
    wait_until("the pins to come back", Duration::from_secs(25), || Ok(gone.iter().all(|p| p.exists())))?;
    // The same maps: the counters kept counting, and traffic still goes through the proxy.
    send(&lab, "a", "c", Duration::from_secs(3))?;
    let after = lab.counters(0)?;
    ensure!(after.steered > before.steered, "counters reset or lost: {before:?} -> {after:?}");
    let log = std::fs::read_to_string(lab.daemon_log_path(0))?;
    ensure!(log.matches("pinned it again").count() >= gone.len(), "the restore is not in the log");
    Ok(())
}

/// A start that loaded the datapath but never served (its Kubernetes API never answered)
/// and was stopped leaves nothing either.
#[test]
fn a_start_stopped_before_its_first_state_leaves_nothing_behind() -> Result<()> {
    let lab = built_lab()?;
    let kubeconfig = lab.dir.join("nowhere.kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\", insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n",
    )?;
    let n1 = lab.nodes[0].name.clone();
    let log = std::fs::File::create(lab.dir.join("nowhere.log"))?;
    /// Killed if the test fails before it stops the daemon: the lab's teardown can then
    /// uninstall (a live daemon holds the node lock).
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{n1}"))
            .arg(&lab.binary)
            .args(["node", "--node", &n1])
            .env("KUBECONFIG", &kubeconfig)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let dir = meshpath::datapath::node_pin_dir(&n1)?;
    wait_until("the datapath to be loaded", Duration::from_secs(10), || Ok(dir.join("links").exists()))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
    let status = child.0.wait()?;
    ensure!(status.success(), "the daemon exited with {status}");
    let left = lab.leftovers(0)?;
    ensure!(left.is_empty(), "the stopped start left: {left:#?}");
    Ok(())
}

#[test]
fn a_failed_start_leaves_nothing_behind() -> Result<()> {
    let mut lab = built_lab()?;
    lab.daemon_args = vec!["--interface".into(), "nosuch0".into()];
    let err = lab.start_daemon(0).expect_err("a start naming a missing interface must fail").to_string();
    ensure!(err.contains("nosuch0"), "the failure does not name the interface: {err}");
    let left = lab.leftovers(0)?;
    ensure!(left.is_empty(), "the failed start left: {left:#?}");
    Ok(())
}

#[test]
fn a_workload_file_written_in_place_never_applies_its_empty_or_partial_states() -> Result<()> {
    use std::io::Write;
    let lab = started_lab()?;
    let full = lab.workloads_yaml(&["a", "c", "e"]);
    lab.write_workloads_text(&full)?;
    let want: Vec<IpAddr> = ["a", "e"].iter().flat_map(|p| [lab.pod(p).v4, lab.pod(p).v6]).collect();
    wait_until("a and e enrolled", Duration::from_secs(3), || {
        let m = lab.workload_map(0)?;
        Ok(want.iter().all(|ip| m.contains_key(ip)))
    })?;
    // A slow writer: truncate, pause, half the file, pause, the rest; each state outlives
    // a poll (100 ms in the lab). Meanwhile the map is watched.
    let path = lab.workloads_path();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let lost = std::thread::scope(|s| -> Result<Vec<String>> {
        let watcher = s.spawn(|| -> Result<Vec<String>> {
            let mut lost = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let m = lab.workload_map(0)?;
                lost.extend(want.iter().filter(|ip| !m.contains_key(ip)).map(|ip| ip.to_string()));
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(lost)
        });
        // At an entry boundary: the first half is a valid file with fewer workloads.
        let cut = full.find("  - name: pod-e").context("no entry of e")?;
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&path)?;
        std::thread::sleep(Duration::from_millis(150));
        f.write_all(&full.as_bytes()[..cut])?;
        std::thread::sleep(Duration::from_millis(150));
        f.write_all(&full.as_bytes()[cut..])?;
        drop(f);
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().map_err(|_| anyhow::anyhow!("watcher panicked"))?
    })?;
    let lost: std::collections::BTreeSet<String> = lost.into_iter().collect();
    ensure!(lost.is_empty(), "the map dropped workloads while the file was being written: {lost:?}");
    Ok(())
}

/// `nobody`: a user on the node with no business in meshpath's state.
const NOBODY: (u32, u32) = (65534, 65534);

/// `flock -n <mode> <lock> sleep 60` as [`NOBODY`]: the lock held by a user, until drop.
struct Holder(Child);

impl Holder {
    /// The holder, if it got the lock (it is still running a moment later); its complaint
    /// if it could not.
    fn try_lock(lock: &Path, mode: &str) -> Result<std::result::Result<Self, String>> {
        let mut cmd = Command::new("flock");
        cmd.args(["-n", mode]).arg(lock).args(["sleep", "60"]).uid(NOBODY.0).gid(NOBODY.1);
        let mut holder = Holder(cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?);
        std::thread::sleep(Duration::from_millis(300));
        match holder.0.try_wait()? {
            None => Ok(Ok(holder)),
            Some(_) => {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut holder.0.stderr.take().context("stderr")?, &mut err)?;
                Ok(Err(err.trim().to_owned()))
            }
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Paths under `dir` (itself included) that anyone but root may read, write or enter.
fn open_to_others(dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(p) = pending.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.permissions().mode() & 0o077 != 0 {
            found.push(format!("{} ({:o})", p.display(), meta.permissions().mode() & 0o7777));
        }
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&p)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<Vec<_>>>()?);
        }
    }
    Ok(found)
}

/// Whoever can open the node lock can `flock` it: shared beside the daemons, every
/// uninstall refuses; exclusive, every daemon start fails. Everything in the node's state
/// directory is root-only: as `nobody`, the lock, the daemons' notes and the handover socket
/// cannot be opened or connected to, and with `nobody` trying to hold the lock throughout,
/// uninstall and a daemon start go through.
#[test]
fn an_unprivileged_user_can_neither_open_nor_lock_the_nodes_state() -> Result<()> {
    let mut lab = built_lab()?;
    lab.start_daemon(0)?;
    let state = Path::new(STATE_DIR).join(&lab.nodes[0].name);
    let lock = state.join("lock");
    let notes: Vec<PathBuf> =
        std::fs::read_dir(state.join("daemons"))?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
    ensure!(!notes.is_empty(), "the daemon wrote no note");
    // The handover socket, and the CNI plugin's: whoever reaches it can hold pods' starts.
    let sockets = [state.join(HANDOVER_SOCKET), state.join(meshpath_common::names::CNI_SOCKET)];
    for socket in &sockets {
        ensure!(socket.exists(), "no socket at {}", socket.display());
    }

    // A file any user may read shows the try can succeed.
    let control = PathBuf::from("/etc/passwd");
    let files: Vec<PathBuf> = [control.clone(), lock.clone()].into_iter().chain(notes).collect();
    let tries = reach_as(Path::new(env!("CARGO_BIN_EXE_meshpath-lab")), NOBODY, &files, &sockets)?;
    ensure!(tries.len() == files.len() + sockets.len(), "not every path was tried: {tries:?}");
    for (path, r) in &tries {
        let want = if *path == control { Reach::Reached } else { Reach::Denied };
        ensure!(*r == want, "as nobody, {}: {r:?}, not {want:?} (all: {tries:?})", path.display());
    }
    let open = open_to_others(&state)?;
    ensure!(open.is_empty(), "open to users other than root: {open:#?}");

    // Shared beside the daemon: uninstall would refuse forever.
    let shared = Holder::try_lock(&lock, "-s")?;
    ensure!(shared.is_err(), "nobody holds node 1's lock shared beside its daemon");
    lab.stop_daemon(0, false)?;
    lab.uninstall(0).context("uninstall with nobody at the lock")?;
    // Exclusive with no daemon: every start would fail.
    let exclusive = Holder::try_lock(&lock, "-x")?;
    ensure!(exclusive.is_err(), "nobody holds node 1's lock exclusively");
    let refused = exclusive.err().unwrap_or_default();
    ensure!(refused.contains("Permission denied"), "flock as nobody failed otherwise: {refused}");
    lab.start_daemon(0).context("a daemon start with nobody at the lock")?;
    Ok(())
}

/// Issue sequence: the workload file truncated in place, pod a's entry alone written, a
/// pause long enough for the daemons to apply that short file (0.7 s, the lab polls every
/// 100 ms), then the rest. Pods c and e leave the desired state for that moment; their
/// release is held back, so none of their connections goes around the proxy: every
/// exchange their clients complete has the proxy's outbound record on their node.
#[test]
fn a_workload_file_written_in_place_with_a_pause_sends_no_connection_around_the_proxy() -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let full = lab.workloads_yaml(&["a", "c", "e"]);
    let path = lab.workloads_path();
    let stop = AtomicBool::new(false);
    // e (node 1) to d and c (node 2) to b: non-enrolled destinations, so a client whose
    // pod is unenrolled would reach them directly, without a record.
    let flows = [("e", "d", 0usize), ("c", "b", 1usize)];
    let exchanges = std::thread::scope(|s| -> Result<Vec<(usize, std::net::SocketAddr)>> {
        let clients: Vec<_> = flows
            .iter()
            .map(|&(from, to, node)| {
                let (lab, stop) = (&lab, &stop);
                s.spawn(move || {
                    let mut done = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(x) = send(lab, from, to, Duration::from_secs(2)) {
                            done.push((node, x.client));
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    done
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let cut = full.find("  - name: pod-c").context("no entry of c")?;
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&path)?;
        f.write_all(&full.as_bytes()[..cut])?;
        f.flush()?;
        std::thread::sleep(Duration::from_millis(700));
        f.write_all(&full.as_bytes()[cut..])?;
        drop(f);
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for c in clients {
            all.extend(c.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))?);
        }
        Ok(all)
    })?;
    ensure!(exchanges.len() >= 50, "only {} exchanges completed: nothing was tested", exchanges.len());
    // Records are written as connections end: give the last ones a moment.
    std::thread::sleep(Duration::from_millis(300));
    let mut direct = Vec::new();
    for node in [0, 1] {
        let proxied: std::collections::BTreeSet<std::net::SocketAddr> =
            lab.records(node)?.into_iter().filter(|r| r.listener == "outbound").map(|r| r.src).collect();
        direct.extend(exchanges.iter().filter(|(n, c)| *n == node && !proxied.contains(c)).map(|(_, c)| *c));
    }
    ensure!(direct.is_empty(), "{} of {} connections went around the proxy: {direct:?}", direct.len(), exchanges.len());
    let log = std::fs::read_to_string(lab.daemon_log_path(0))?;
    ensure!(
        log.contains("left the desired state; released after the hold"),
        "node 1 never applied the short file: the pause tested nothing"
    );
    ensure!(log.contains("its release is cancelled"), "the full file did not cancel the hold");
    println!("{} exchanges during the slow write, all through the proxy", exchanges.len());
    Ok(())
}
