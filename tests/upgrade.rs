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
