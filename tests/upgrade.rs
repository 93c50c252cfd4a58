//! Takeovers on the real kernel: a second daemon takes a node over under load with no failed
//! connection, no reset and no lost byte; a successor that goes away before taking over
//! changes nothing.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshpath_lab::upgrade::{self, UpgradeConfig};
use meshpath_lab::{readiness, smoke};

mod support;
use support::{send, started_lab, wait_until};

#[test]
fn takeovers_under_load_fail_no_connection_and_lose_no_byte() -> Result<()> {
    let mut lab = started_lab()?;
    let report = upgrade::run(&mut lab, &UpgradeConfig::small(), |l| println!("{l}"))?;
    let table = report.table();
    println!("{table}");
    ensure!(report.ok(), "the takeovers failed connections or lost bytes:\n{table}");
    // The plain streams lived through both takeovers: node 1's successor carries them.
    let adopted = lab.http_metric(0, "meshpath_drain_connections_total{outcome=\"adopted\"}")?;
    let handed = lab.http_metric(0, "meshpath_drain_connections_total{outcome=\"handed_over\"}")?;
    ensure!(adopted >= 3.0 && handed == adopted, "node 1's successor adopted {adopted}, was handed {handed}");
    // The old daemons' programs went with them: one classifier per hook, the successor's.
    for ifname in ["vpa", "vpb", "vpe"] {
        ensure!(lab.classifiers(0, ifname)? == 1, "{ifname} has {} classifiers", lab.classifiers(0, ifname)?);
        ensure!(lab.egress_guards(0, ifname)? == 1, "{ifname} has {} egress guards", lab.egress_guards(0, ifname)?);
    }
    let _servers = smoke::start_servers(&lab)?;
    send(&lab, "a", "c", Duration::from_secs(3)).context("a -> c after the takeovers")?;
    Ok(())
}

#[test]
fn a_successor_that_fails_before_taking_over_leaves_the_node_served() -> Result<()> {
    let mut lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let ns = lab.nodes[0].name.clone();
    // Says hello, then fails its start (no such interface) before touching the kernel.
    let log = std::fs::OpenOptions::new().append(true).open(lab.daemon_log_path(0))?;
    let status = lab
        .daemon_command(0)
        .args(["--interface", "no-such-if0"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()?;
    ensure!(!status.success(), "the broken successor started");
    wait_until("node 1 ready again", Duration::from_secs(5), || Ok(readiness(&ns).unwrap_or(false)))?;
    let text = std::fs::read_to_string(lab.daemon_log_path(0))?;
    ensure!(text.contains("a successor is starting"), "the serving daemon never heard the successor");
    ensure!(text.contains("the successor went away before it took over"), "the successor's exit went unnoticed");
    send(&lab, "a", "c", Duration::from_secs(3)).context("a -> c after the failed successor")?;
    send(&lab, "d", "a", Duration::from_secs(3)).context("d -> a after the failed successor")?;
    ensure!(lab.classifiers(0, "vpa")? == 1, "vpa has {} classifiers", lab.classifiers(0, "vpa")?);
    // The pins hold the serving daemon's links: stopped, the node still fails closed.
    lab.stop_daemon(0, true)?;
    ensure!(send(&lab, "a", "c", Duration::from_millis(1500)).is_err(), "a -> c bypassed the killed proxy");
    ensure!(lab.classifiers(0, "vpa")? == 1, "the classifier went with the daemon");
    Ok(())
}

/// A successor killed (SIGKILL) once it has taken the SOCKMAP slots, or just before, while
/// traffic flows: the old daemon, still alive and waiting for its stop signal, serves the
/// node again within 5 s, with no kubelet to restart anything; the node stays open to a
/// later takeover.
#[test]
fn a_successor_killed_after_taking_over_leaves_the_node_served_again_within_5s() -> Result<()> {
    let mut lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let ns = lab.nodes[0].name.clone();
    for kill_after in [Duration::from_millis(300), Duration::from_millis(1000)] {
        let before = meshpath::datapath::pinned_listener_cookies(&ns)?;
        let mut successor = lab.spawn_logged(0)?;
        std::thread::sleep(kill_after);
        let now = meshpath::datapath::pinned_listener_cookies(&ns)?;
        let took = now.iter().zip(&before).any(|(n, b)| n.is_some() && n != b);
        successor.kill()?;
        successor.wait()?;
        let killed = std::time::Instant::now();
        println!("successor killed {kill_after:?} after its start; it had taken the slots: {took}");
        wait_until("node 1 served again", Duration::from_secs(5), || {
            Ok(readiness(&ns).unwrap_or(false)
                && send(&lab, "a", "c", Duration::from_millis(500)).is_ok()
                && send(&lab, "d", "a", Duration::from_millis(500)).is_ok())
        })
        .with_context(|| {
            let log = std::fs::read_to_string(lab.daemon_log_path(0)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect();
            format!(
                "after killing the successor {kill_after:?} into its start; node 1's log ends:\n{}",
                tail.join("\n")
            )
        })?;
        println!("  node 1 ready and carrying connections {:?} after the kill", killed.elapsed());
        let alive = lab.nodes[0].daemon.as_mut().map(|c| c.try_wait()).transpose()?;
        ensure!(matches!(alive, Some(None)), "the old daemon is gone ({alive:?})");
        if kill_after == Duration::from_millis(1000) {
            ensure!(took, "1 s after its start the successor had not taken the slots: nothing was tested");
            let text = std::fs::read_to_string(lab.daemon_log_path(0))?;
            ensure!(text.contains("serving it again"), "the old daemon did not say it serves the node again");
        }
    }
    // The daemon that came back can be taken over again, as any serving daemon.
    lab.take_over(0, Duration::from_secs(15))?;
    send(&lab, "a", "c", Duration::from_secs(3)).context("a -> c after a takeover of the daemon that came back")?;
    Ok(())
}
