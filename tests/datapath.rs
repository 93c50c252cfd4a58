//! The datapath on the real kernel, in throwaway network-namespace labs (root needed).
//! Each test builds its own lab with its own namespaces and pins, so they run in parallel;
//! the lab tears itself down on drop, also when an assertion fails.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshpath_lab::Lab;
use meshpath_lab::smoke;

mod support;
use support::{RELEASE, send, started_lab, started_lab_with, wait_until};

#[test]
fn traffic_matrix_goes_through_the_proxy_and_spoofing_is_dropped() -> Result<()> {
    let lab = started_lab()?;
    let smoke::Smoke { outcomes, evidence } = smoke::run_all(&lab)?;
    println!("TLS evidence: {}", evidence.summary());
    let table = smoke::table(&outcomes);
    println!("{table}");
    ensure!(outcomes.iter().all(|o| o.ok), "some paths misbehaved:\n{table}");
    let c = lab.counters(0)?;
    ensure!(c.classified > 0 && c.steered > 0 && c.spoof_dropped > 0, "node 1 counters did not move: {c:?}");
    Ok(())
}

/// With the proxy gone (killed or stopped), the enrolled pods' traffic must fail rather
/// than flow directly; a restarted daemon picks up the pinned state without duplicates.
fn fails_closed_then_resumes(lab: &mut Lab, kill: bool) -> Result<()> {
    let _servers = smoke::start_servers(lab)?;
    send(lab, "a", "c", Duration::from_secs(3)).context("baseline a -> c")?;
    let before = lab.counters(0)?;

    let status = lab.stop_daemon(0, kill)?.context("daemon was running")?;
    if !kill {
        ensure!(status.success(), "clean stop exited with {status}");
    }
    // Outbound from the enrolled pod, inbound to it from the other node and from its
    // neighbour: all must fail, and nothing may reach a server.
    for (from, to) in [("a", "c"), ("a", "d"), ("d", "a"), ("b", "a")] {
        let r = send(lab, from, to, Duration::from_millis(1500));
        ensure!(r.is_err(), "{from} -> {to} bypassed the stopped proxy: {r:?}");
    }
    let during = lab.counters(0)?;
    ensure!(
        during.missing_socket >= before.missing_socket + 4,
        "missing_socket did not count the refusals: {before:?} -> {during:?}"
    );
    // The pinned datapath stayed attached.
    ensure!(lab.classifiers(0, "vpa")? == 1, "classifier detached from vpa after stop");
    // Non-enrolled pairs are untouched.
    send(lab, "b", "d", Duration::from_secs(3)).context("b -> d while node 1's proxy is down")?;

    // How long enrolled traffic is down across a restart: from the new daemon's start to the
    // first connection it carries (printed, not asserted: timings are the bench's business).
    let restarted = std::time::Instant::now();
    lab.spawn_daemon(0)?;
    let x = loop {
        match send(lab, "a", "c", Duration::from_millis(200)) {
            Ok(x) => break x,
            Err(e) if restarted.elapsed() > Duration::from_secs(30) => {
                return Err(e).context("a -> c after restart");
            }
            Err(_) => {}
        }
    };
    println!("restart to the first connection carried: {} ms", restarted.elapsed().as_millis());
    lab.wait_ready(0, Duration::from_secs(5))?;
    ensure!(x.echoed_intact && x.server_saw.ip() == x.client.ip());
    let client = x.client;
    ensure!(
        lab.wait_record(0, Duration::from_secs(3), |r| r.src == client)?.is_some(),
        "restarted proxy did not record a -> c"
    );
    // Same maps (counters kept counting), one classifier per interface, no duplicates.
    let after = lab.counters(0)?;
    ensure!(
        after.steered > during.steered && after.classified >= during.classified,
        "counters reset: {during:?} -> {after:?}"
    );
    for ifname in ["vpa", "vpb", "ul0"] {
        ensure!(lab.classifiers(0, ifname)? == 1, "{ifname} has a duplicate or missing classifier after restart");
    }
    let links: Vec<_> = std::fs::read_dir(Path::new("/sys/fs/bpf/meshpath").join(&lab.nodes[0].name).join("links"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    ensure!(links.iter().filter(|l| l.as_str() == "sk_lookup").count() == 1, "sk_lookup pins: {links:?}");
    Ok(())
}

#[test]
fn killed_proxy_fails_closed_and_restart_resumes_on_pinned_state() -> Result<()> {
    fails_closed_then_resumes(&mut started_lab()?, true)
}

#[test]
fn stopped_proxy_fails_closed_and_restart_resumes_on_pinned_state() -> Result<()> {
    fails_closed_then_resumes(&mut started_lab()?, false)
}

/// The clsact/netlink attachment older kernels get, forced on this one: same traffic, same
/// fail-closed restart (the filter's program is swapped in place), and a clean uninstall.
#[test]
fn netlink_attach_mode_captures_fails_closed_and_uninstalls_cleanly() -> Result<()> {
    let started = std::time::Instant::now();
    let mut lab = started_lab_with(&["--tc-attach", "netlink"])?;
    ensure!(lab.classifiers(0, "vpa")? == 1, "no classifier on vpa");
    // Asking whether a filter is attached must not detach it (aya's link handle does on drop).
    let status = lab.meshpath(1, &["status", "--node", &lab.nodes[1].name.clone()])?;
    ensure!(
        status.contains("mp_tc_egress") && !status.contains("NOT ATTACHED"),
        "status does not see the netlink filters:\n{status}"
    );
    ensure!(lab.classifiers(1, "vpc")? == 1 && lab.egress_guards(1, "vpc")? == 1, "status detached vpc's filters");
    let filters =
        Command::new("tc").args(["-n", &lab.nodes[0].name, "filter", "show", "dev", "vpa", "ingress"]).output()?;
    let filters = String::from_utf8_lossy(&filters.stdout);
    ensure!(filters.contains("mp_tc_ingress") && filters.contains("pref 1519"), "not a cls_bpf filter: {filters}");
    let smoke::Smoke { outcomes, evidence } = smoke::run_all(&lab)?;
    println!("TLS evidence: {}", evidence.summary());
    let table = smoke::table(&outcomes);
    ensure!(outcomes.iter().all(|o| o.ok), "netlink mode misbehaved:\n{table}");
    // The daemons' safety tick checks every attachment; it must leave them all in place.
    std::thread::sleep((started + Duration::from_secs(12)).saturating_duration_since(std::time::Instant::now()));
    for (n, ifs) in [(0, ["vpa", "vpb", "ul0"]), (1, ["vpc", "vpd", "ul0"])] {
        for ifname in ifs {
            let (ingress, egress) = (lab.classifiers(n, ifname)?, lab.egress_guards(n, ifname)?);
            ensure!(
                ingress == 1 && egress == 1,
                "node {} {ifname} after a tick: {ingress} ingress, {egress} egress",
                n + 1
            );
        }
    }
    let _servers = smoke::start_servers(&lab)?;
    send(&lab, "a", "c", Duration::from_secs(3)).context("a -> c after a tick")?;
    let dst = lab.addr("c", false, smoke::APP_PORT);
    ensure!(
        lab.wait_record(1, Duration::from_secs(3), |r| r.listener == "hbone" && r.orig_dst == dst)?.is_some(),
        "node 2 did not take a -> c through HBONE after a tick"
    );
    drop(_servers);
    fails_closed_then_resumes(&mut lab, true)?;
    for n in 0..2 {
        lab.stop_daemon(n, false)?;
        println!("node {}: {}", n + 1, lab.uninstall(n)?);
        let left = lab.leftovers(n)?;
        ensure!(left.is_empty(), "node {} still holds: {left:#?}", n + 1);
    }
    Ok(())
}

#[test]
fn uninstall_removes_every_rule_attachment_and_pin() -> Result<()> {
    let mut lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    ensure!(!lab.leftovers(0)?.is_empty(), "leftovers() sees nothing while meshpath runs");

    // Refused while the daemon runs: uninstalling under it would be a bypass it cannot see.
    let err = lab.uninstall(0).expect_err("uninstall must refuse while the daemon runs").to_string();
    ensure!(err.contains("still serves"), "unexpected refusal: {err}");

    for n in 0..2 {
        lab.stop_daemon(n, false)?;
        let report = lab.uninstall(n)?;
        println!("node {}: {report}", n + 1);
        let left = lab.leftovers(n)?;
        ensure!(left.is_empty(), "node {} still holds: {left:#?}", n + 1);
    }
    // A second uninstall is a no-op, not an error.
    lab.uninstall(0)?;
    // With meshpath gone, traffic of the formerly enrolled pod flows directly.
    let x = send(&lab, "a", "c", Duration::from_secs(3)).context("a -> c after uninstall")?;
    ensure!(x.echoed_intact);
    let client = x.client;
    ensure!(lab.records(0)?.iter().all(|r| r.src != client), "a proxy recorded traffic after uninstall");
    Ok(())
}

/// Someone flushing the capture rule or its route, or the NAT rule (an admin, another agent)
/// must not leave enrolled traffic uncaptured for long: the daemon puts them back.
#[test]
fn deleted_capture_rule_and_route_are_restored() -> Result<()> {
    use meshpath_common::names::{NAT_RULE_PRIORITY, ROUTE_TABLE, RULE_PRIORITY};
    let lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let n1 = lab.nodes[0].name.clone();
    let table = ROUTE_TABLE.to_string();
    let ip = |args: &[&str]| support::ip(&n1, args);
    ip(&["rule", "del", "priority", &RULE_PRIORITY.to_string()])?;
    ip(&["-6", "rule", "del", "priority", &NAT_RULE_PRIORITY.to_string()])?;
    ip(&["route", "del", "local", "default", "table", &table])?;
    // (No check that they are gone: the next tick may already have put them back; the
    // restore is seen in the log below.)
    wait_until("the capture and NAT rules and the route to come back", Duration::from_secs(5), || {
        let has = |rules: String, prio: u32| rules.lines().any(|l| l.starts_with(&format!("{prio}:")));
        Ok(has(ip(&["rule", "show"])?, RULE_PRIORITY)
            && has(ip(&["-6", "rule", "show"])?, NAT_RULE_PRIORITY)
            && ip(&["route", "show", "table", &table])?.contains("local default"))
    })?;
    let x = send(&lab, "a", "b", Duration::from_secs(3)).context("a -> b after the restore")?;
    ensure!(x.echoed_intact);
    let client = x.client;
    // The proxy writes its record when it closes the relay, just after the client is done.
    wait_until("node 1's record of a -> b (else it bypassed the proxy)", Duration::from_secs(3), || {
        Ok(lab.records(0)?.iter().any(|r| r.src == client))
    })?;
    // Restored, then left alone: the filtered dump sees the route again, so later ticks do
    // not re-add it (a tick between the two deletions may have restored twice).
    let restores = || -> Result<usize> {
        Ok(std::fs::read_to_string(lab.daemon_log_path(0))?.matches("removed behind meshpath's back").count())
    };
    let after = restores()?;
    ensure!(after >= 1, "node 1's log does not mention the restore");
    std::thread::sleep(Duration::from_secs(1));
    ensure!(restores()? == after, "the capture was restored again on later ticks");
    Ok(())
}

/// A pod's route moving to another interface (no interface appearing or going), or its veth
/// going down, reaches the workload map within a tick or two, also on a node with thousands
/// of workloads: meshpath follows route notifications and interface state; its periodic
/// re-check of every cached route is only a safety net that takes minutes at that size.
#[test]
fn a_moved_pod_route_updates_the_map_at_once() -> Result<()> {
    const FILLERS: usize = 3000;
    let lab = started_lab()?;
    let n1 = lab.nodes[0].name.clone();
    let a: IpAddr = lab.pod("a").v4;
    let ip = |args: &[&str]| support::ip(&n1, args);
    let original = *lab.workload_map(0)?.get(&a).context("pod a is not in the map")?;
    // A spare interface carrying the fillers' routes; then a settled map, so that only a's
    // route changes afterwards.
    ip(&["link", "add", "spare0", "type", "veth", "peer", "name", "spare0p"])?;
    ip(&["link", "set", "spare0", "up"])?;
    ip(&["link", "set", "spare0p", "up"])?;
    // Inside the pod network (addresses outside it are refused).
    let fillers: Vec<String> = (0..FILLERS).map(|i| format!("10.244.{}.{}", 100 + i / 250, i % 250 + 1)).collect();
    let batch = lab.dir.join("fillers.batch");
    std::fs::write(&batch, fillers.iter().map(|f| format!("route add {f}/32 dev spare0\n")).collect::<String>())?;
    ip(&["-batch", &batch.display().to_string()])?;
    let mut yaml = lab.workloads_yaml(&["a", "c", "e"]);
    for (i, f) in fillers.iter().enumerate() {
        yaml.push_str(&format!(
            "  - {{name: f{i}, namespace: fill, serviceAccount: filler, node: {n1}, ips: [{f}]}}\n"
        ));
    }
    lab.write_workloads_text(&yaml)?;
    wait_until("the fillers in the map", Duration::from_secs(20), || Ok(lab.workload_map(0)?.len() > FILLERS))?;
    std::thread::sleep(Duration::from_millis(500));

    let link: serde_json::Value = serde_json::from_str(&ip(&["-j", "link", "show", "spare0"])?)?;
    let spare = link[0]["ifindex"].as_u64().context("no ifindex for spare0")? as u32;
    ensure!(spare != original);
    ip(&["route", "replace", &format!("{a}/32"), "dev", "spare0"])?;
    wait_until("the map to follow a's route to spare0", Duration::from_secs(3), || {
        Ok(lab.workload_map(0)?.get(&a) == Some(&spare))
    })?;
    // Back with a replace too: a deleted route would make a unresolved, which is retried
    // every tick whatever the notifications say.
    ip(&["route", "replace", &format!("{a}/32"), "dev", &lab.pod("a").host_if])?;
    wait_until("the map to follow a's route back", Duration::from_secs(3), || {
        Ok(lab.workload_map(0)?.get(&a) == Some(&original))
    })?;

    // An interface going down takes its IPv4 routes along without any route notification:
    // a leaves the map all the same, and comes back with its veth and route.
    let host_if = lab.pod("a").host_if.clone();
    ip(&["link", "set", &host_if, "down"])?;
    wait_until("a to leave the map with its veth down", Duration::from_secs(3), || {
        Ok(!lab.workload_map(0)?.contains_key(&a))
    })?;
    ip(&["link", "set", &host_if, "up"])?;
    ip(&["route", "replace", &format!("{a}/32"), "dev", &host_if])?;
    wait_until("a back in the map", Duration::from_secs(3), || Ok(lab.workload_map(0)?.get(&a) == Some(&original)))?;
    Ok(())
}

#[test]
fn workload_file_changes_apply_live_and_bad_files_change_nothing() -> Result<()> {
    let lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let a: IpAddr = lab.pod("a").v4;

    // Unenrol a: its traffic goes direct once the release hold is over (its veth stays).
    lab.write_workloads(&["c"])?;
    wait_until("a to leave node 1's map", RELEASE, || Ok(!lab.workload_map(0)?.contains_key(&a)))?;
    let x = send(&lab, "a", "d", Duration::from_secs(3))?;
    let client = x.client;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(lab.records(0)?.iter().all(|r| r.src != client), "unenrolled pod still proxied");

    // Enrol it again, now also b.
    lab.write_workloads(&["a", "b", "c"])?;
    wait_until("a and b in node 1's map", Duration::from_secs(2), || {
        let m = lab.workload_map(0)?;
        Ok(m.contains_key(&a) && m.contains_key(&lab.pod("b").v4))
    })?;
    let good = lab.workload_map(0)?;

    // Bad edits: rejected with a clear message, map and capture unchanged.
    let log = lab.daemon_log_path(0);
    let bad_files = [
        ("broken YAML", "workloads: [".to_string()),
        ("duplicate IP", lab.workloads_yaml(&["a", "b", "c"]).replace(&lab.pod("b").v4.to_string(), &a.to_string())),
        ("unknown field", lab.workloads_yaml(&["a"]).replace("namespace: lab", "namespace: lab\n    colour: blue")),
    ];
    for (what, text) in bad_files {
        let before = std::fs::read_to_string(&log)?.matches("rejected workload file").count();
        lab.write_workloads_text(&text)?;
        wait_until(&format!("the daemon to reject the {what} file"), Duration::from_secs(3), || {
            Ok(std::fs::read_to_string(&log)?.matches("rejected workload file").count() > before)
        })?;
        ensure!(lab.workload_map(0)? == good, "{what}: the map changed");
        let x = send(&lab, "a", "d", Duration::from_secs(3))?;
        let client = x.client;
        ensure!(
            lab.wait_record(0, Duration::from_secs(3), |r| r.src == client)?.is_some(),
            "{what}: a's traffic is no longer captured"
        );
    }
    // An edit in place (same inode, same size, possibly the same timestamp tick as the
    // daemon's last read) is seen too: b moves to a node of the same name length.
    let good_text = lab.workloads_yaml(&["a", "b", "c"]);
    let n1 = lab.nodes[0].name.clone();
    let elsewhere = format!("{}9", &n1[..n1.len() - 1]);
    let moved = good_text.replace(
        &format!("serviceAccount: sa-b\n    node: {n1}"),
        &format!("serviceAccount: sa-b\n    node: {elsewhere}"),
    );
    ensure!(moved.len() == good_text.len() && moved != good_text, "the in-place edit must keep the size");
    lab.write_workloads_text(&good_text)?;
    wait_until("b enrolled again", Duration::from_secs(3), || Ok(lab.workload_map(0)?.contains_key(&lab.pod("b").v4)))?;
    std::fs::write(lab.workloads_path(), &moved)?;
    wait_until("an in-place edit to unenrol b", RELEASE, || Ok(!lab.workload_map(0)?.contains_key(&lab.pod("b").v4)))?;
    let line = std::fs::read_to_string(&log)?
        .lines()
        .rfind(|l| l.contains("rejected workload file"))
        .unwrap_or_default()
        .to_string();
    ensure!(line.contains("workloads.yaml"), "the message does not name the file: {line}");
    Ok(())
}

fn meshpath(args: &[&str]) -> std::process::Output {
    Command::new(support::meshpath()).args(args).output().expect("runs")
}

#[test]
fn bad_input_gives_one_clear_line_and_no_backtrace() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("meshpath-badinput-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "workloads:\n  - name: x\n    ips: [not-an-ip]\n")?;
    let none = dir.join("none.yaml");
    std::fs::write(&none, "workloads: []\n")?;
    let empty = dir.join("empty.yaml");
    std::fs::write(&empty, "")?;
    let cases: [(&[&str], &str); 7] = [
        (&["node", "--node", "n1", "--workloads", "/nonexistent/w.yaml"], "/nonexistent/w.yaml"),
        (&["node", "--node", "n1", "--workloads", bad.to_str().unwrap()], "bad.yaml"),
        (&["node", "--node", "../etc", "--workloads", bad.to_str().unwrap()], "invalid node name"),
        (&["uninstall", "--node", "UPPER"], "invalid node name"),
        (
            &["node", "--node", "n1", "--workloads", bad.to_str().unwrap(), "--trust-domain", "a/b"],
            "is not a trust domain",
        ),
        (
            &["node", "--node", "n1", "--workloads", none.to_str().unwrap(), "--cert-dir", "/nonexistent/certs"],
            "/nonexistent/certs: not a directory",
        ),
        // Empty is what a half-written file looks like: "nothing" must be said.
        (&["node", "--node", "n1", "--workloads", empty.to_str().unwrap()], "write `workloads: []`"),
    ];
    for (args, needle) in cases {
        let out = meshpath(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("meshpath: error:")).collect();
        ensure!(!out.status.success(), "{args:?} succeeded");
        ensure!(
            errors.len() == 1 && errors[0].contains(needle),
            "{args:?}: wanted one error line naming {needle:?}, got:\n{stderr}"
        );
        ensure!(!stderr.contains("panicked") && !stderr.contains("stack backtrace"), "{args:?} panicked:\n{stderr}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Sends `chunks` KiB from `ns` to `to`, one every `gap`, then half-closes and reads the echo:
/// whether it came back whole.
fn slow_exchange(ns: &str, to: std::net::SocketAddr, chunks: usize, gap: Duration) -> Result<bool> {
    use std::io::{Read, Write};
    let payload = meshpath_lab::traffic::payload(1024 * chunks);
    let answer = meshpath_lab::traffic::in_netns(ns, || -> std::io::Result<Vec<u8>> {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        for chunk in payload.chunks(1024) {
            s.write_all(chunk)?;
            std::thread::sleep(gap);
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)?;
        Ok(answer)
    })??;
    Ok(answer.ends_with(&payload))
}

/// SIGTERM drains: connections under way when it arrives (a plain relay and an HBONE stream)
/// finish intact, a new one is refused at once (fail closed), and the daemon exits once they
/// are done rather than at its deadline.
#[test]
fn a_stopping_daemon_lets_open_connections_finish_and_refuses_new_ones() -> Result<()> {
    let mut lab = started_lab_with(&["--drain-timeout-secs", "30"])?;
    let _servers = smoke::start_servers(&lab)?;
    let ns = lab.pod("a").netns.clone();
    let slow = |to| {
        let ns = ns.clone();
        std::thread::spawn(move || slow_exchange(&ns, to, 20, Duration::from_millis(100)))
    };
    let plain = slow(lab.addr("d", false, smoke::APP_PORT));
    let hbone = slow(lab.addr("c", false, smoke::APP_PORT));
    std::thread::sleep(Duration::from_millis(500));
    let pid = lab.nodes[0].daemon.as_ref().context("no daemon")?.id();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM)?;
    let before = lab.counters(0)?.missing_socket;
    // A connection whose SYN was queued on a listener as it closed is reset by the kernel
    // (refused too, but not by the datapath): wait for one the datapath refuses.
    wait_until("node 1's datapath to refuse new connections (missing_socket)", Duration::from_secs(3), || {
        Ok(send(&lab, "a", "d", Duration::from_millis(500)).is_err() && lab.counters(0)?.missing_socket > before)
    })?;
    for (what, t) in [("a -> d (plain relay)", plain), ("a -> c (HBONE)", hbone)] {
        let intact = t.join().map_err(|_| anyhow::anyhow!("{what}: client panicked"))??;
        ensure!(intact, "{what}: the echo came back short or garbled across the drain");
    }
    let status = lab.stop_daemon(0, false)?.context("daemon was running")?;
    ensure!(status.success(), "the drained daemon exited with {status}");
    let log = std::fs::read_to_string(lab.daemon_log_path(0))?;
    ensure!(log.contains("drained: every connection finished"), "the daemon did not wait for its connections");
    Ok(())
}
