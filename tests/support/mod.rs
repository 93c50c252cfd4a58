//! Helpers shared by the kernel test files: labs with their daemons up, one-shot traffic,
//! polling.

#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use meshpath_lab::smoke::APP_PORT;
use meshpath_lab::{Lab, traffic};

/// How long a daemon keeps a workload IP that left the desired state while its pod's
/// interface stays (`--release-hold-secs`, default 5), and a margin for the poll and pass.
pub const RELEASE: Duration = Duration::from_secs(5 + 2);

pub fn started_lab() -> Result<Lab> {
    started_lab_with(&[])
}

/// A lab whose daemons get `args` on top of the lab's own.
pub fn started_lab_with(args: &[&str]) -> Result<Lab> {
    let mut lab = built_lab()?;
    lab.daemon_args = args.iter().map(|a| a.to_string()).collect();
    lab.start_daemons().context("starting the daemons")?;
    Ok(lab)
}

/// A lab with no daemons started yet.
pub fn built_lab() -> Result<Lab> {
    Lab::build(&meshpath()).context("building the lab")
}

/// The meshpath binary under test (see [`meshpath_lab::meshpath_binary`]).
pub fn meshpath() -> PathBuf {
    meshpath_lab::meshpath_binary().unwrap_or_else(|e| panic!("{e}"))
}

/// One request/response from pod `from` to pod `to` (IPv4, app port).
pub fn send(lab: &Lab, from: &str, to: &str, timeout: Duration) -> std::io::Result<traffic::Exchange> {
    traffic::exchange(&lab.pod(from).netns, None, lab.addr(to, false, APP_PORT), &traffic::payload(4096), timeout)
}

/// `ip -n <ns> <args>`: its stdout, or an error with its stderr.
pub fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("ip").args(["-n", ns]).args(args).output()?;
    ensure!(out.status.success(), "ip -n {ns} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first record of `node` that `pred` accepts, waiting up to `wait` for it.
pub fn record(
    lab: &Lab,
    node: usize,
    wait: Duration,
    pred: impl Fn(&meshpath::record::ConnectionRecord) -> bool,
) -> Result<meshpath::record::ConnectionRecord> {
    lab.wait_record(node, wait, pred)?.with_context(|| format!("no such record on node {}", node + 1))
}

/// A connection from pod `from` to `to`, echoed once, held open; its reads time out after
/// `timeout`.
pub fn hold(lab: &Lab, from: &str, to: std::net::SocketAddr, timeout: Duration) -> Result<std::net::TcpStream> {
    use std::io::{Read, Write};
    let mut held = traffic::in_netns(&lab.pod(from).netns, || std::net::TcpStream::connect_timeout(&to, timeout))??;
    held.set_read_timeout(Some(timeout))?;
    held.write_all(b"before")?;
    let mut buf = [0u8; 64];
    ensure!(held.read(&mut buf)? > 0, "{from} -> {to} echoed nothing");
    Ok(held)
}

/// Whether the peer closed `held` (EOF or reset) within its read timeout (which is not a
/// close).
pub fn closed(held: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 64];
    loop {
        match held.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}
