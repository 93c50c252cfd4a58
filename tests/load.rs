//! What the proxy costs and withstands under load, on the real kernel: connection churn
//! from one client IP against TIME_WAIT, idle connections held, floods past the connection
//! limits. Resource bounds are asserted (bytes, counts); speed is measured by the bench.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshpath_lab::{Lab, smoke, traffic};

mod support;
use support::{RELEASE, send, started_lab, started_lab_with, wait_until};

/// Resident memory of `node`'s daemon, KiB.
fn daemon_rss_kib(lab: &Lab, node: usize) -> Result<u64> {
    let pid = lab.nodes[node].daemon.as_ref().context("no daemon")?.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
}

/// Bytes that `ns`'s TCP connections still have to send or to read (their send and receive
/// queues, from /proc/net/tcp{,6}): 0 once every relay there has nothing in flight.
fn queued_bytes(ns: &str) -> Result<u64> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/tcp", "/proc/net/tcp6"])
        .output()?;
    ensure!(out.status.success(), "reading {ns}'s sockets: {}", String::from_utf8_lossy(&out.stderr));
    let mut total = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // sl local remote st tx_queue:rx_queue ...; a listener's rx_queue is its backlog.
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(state), Some(queues)) = (cols.get(3), cols.get(4)) else { continue };
        let Some((tx, rx)) = queues.split_once(':') else { continue };
        if *state != "0A" {
            total += u64::from_str_radix(tx, 16).unwrap_or(0) + u64::from_str_radix(rx, 16).unwrap_or(0);
        }
    }
    Ok(total)
}

/// Opens `n` connections from pod `from` to `to`, writes `hello` (if any) on each and keeps
/// them open.
fn hold(
    lab: &Lab,
    from: &str,
    to: std::net::SocketAddr,
    n: usize,
    hello: &[u8],
) -> Result<Vec<std::io::Result<TcpStream>>> {
    Ok(traffic::in_netns(&lab.pod(from).netns, || {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
                s.write_all(hello)?;
                Ok(s)
            })
            .collect()
    })?)
}

#[test]
fn churn_from_one_client_ip_is_not_blocked_by_time_wait() -> Result<()> {
    let lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    // Few local ports on node 1. The proxy closes its upstream side first (the client
    // half-closes), so each connection leaves a TIME_WAIT from a's address there. Ports
    // chosen at bind for the address alone are blocked by any of them; chosen at connect
    // for the whole 4-tuple, a port in TIME_WAIT toward one server is free toward another.
    let n1 = lab.nodes[0].name.clone();
    traffic::in_netns(&n1, || std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 40039"))??;
    let payload = traffic::payload(100);
    for (port, n) in [(smoke::APP_PORT, 30), (15008, 30)] {
        let dst = lab.addr("b", false, port);
        for i in 0..n {
            traffic::exchange(&lab.pod("a").netns, None, dst, &payload, Duration::from_secs(3))
                .with_context(|| format!("a -> {dst}, connection {i}"))?;
        }
    }
    let records = lab.records(0)?;
    let failed: Vec<_> = records.iter().filter(|r| r.outcome != meshpath::record::Outcome::Ok).collect();
    ensure!(failed.is_empty(), "{} connections failed upstream, e.g. {:?}", failed.len(), failed.first());
    Ok(())
}

#[test]
fn idle_connections_cost_a_few_kib_each_and_the_memory_goes_back() -> Result<()> {
    const N: usize = 2000;
    // One client holds them all: the per-address share must allow it.
    let lab = started_lab_with(&["--max-connections-per-source", "5000"])?;
    let _servers = smoke::start_servers(&lab)?;
    // Warm the proxy (pools, caches, the allocator's first arenas).
    send(&lab, "a", "d", Duration::from_secs(3))?;
    let before = daemon_rss_kib(&lab, 0)?;
    // Each connection first carries a burst (buffers are needed, and touched), then idles.
    let burst = traffic::payload(100 * 1024);
    let held = hold(&lab, "a", lab.addr("d", false, smoke::APP_PORT), N, &burst)?;
    let ok = held.iter().filter(|c| c.is_ok()).count();
    ensure!(ok == N, "only {ok} of {N} connections opened: {:?}", held.iter().find(|c| c.is_err()));
    wait_until("node 1 to relay them all", Duration::from_secs(10), || {
        Ok(lab.http_metric(0, "meshpath_proxy_connections_open")? >= N as f64)
    })?;
    // Idle means every burst delivered: on a slow node link, relays may still be copying.
    wait_until("node 1's relays to have nothing in flight", Duration::from_secs(20), || {
        Ok(queued_bytes(&lab.nodes[0].name)? == 0)
    })?;
    let loaded = daemon_rss_kib(&lab, 0)?;
    let per = (loaded.saturating_sub(before)) as f64 / N as f64;
    println!("daemon RSS {before} KiB idle, {loaded} KiB with {N} connections: {per:.1} KiB each");
    ensure!(per < 16.0, "{per:.1} KiB of daemon memory per idle connection");
    drop(held);
    wait_until("the connections to close", Duration::from_secs(10), || {
        Ok(lab.http_metric(0, "meshpath_proxy_connections_open")? == 0.0)
    })?;
    // The memory goes back to the system, not only to the allocator (within a few seconds).
    let mut after = 0;
    wait_until("the daemon's memory to go back", Duration::from_secs(15), || {
        after = daemon_rss_kib(&lab, 0)?;
        Ok(after < before + (loaded - before) / 4)
    })
    .with_context(|| format!("RSS {before} KiB before, {loaded} KiB loaded, {after} KiB after"))?;
    println!("daemon RSS back to {after} KiB after the connections closed");
    Ok(())
}

#[test]
fn a_flood_past_the_limits_is_refused_and_counted_and_good_clients_still_connect() -> Result<()> {
    let lab = started_lab_with(&["--max-connections", "70", "--max-connections-per-source", "30"])?;
    let _servers = smoke::start_servers(&lab)?;
    let series =
        |listener: &str| format!(r#"meshpath_connections_failed_total{{listener="{listener}",reason="over_limit"}}"#);
    // Idle connections from two non-enrolled pods, each past its own share: d to e's HBONE
    // port (a TLS handshake that never starts), b to e's plaintext inbound.
    let d = hold(&lab, "d", lab.addr("e", false, 15008), 60, b"")?;
    let b = hold(&lab, "b", lab.addr("e", false, smoke::APP_PORT), 60, b"hello")?;
    wait_until("the per-address refusals to be counted", Duration::from_secs(10), || {
        Ok(lab.http_metric(0, &series("hbone"))? >= 30.0 && lab.http_metric(0, &series("inbound_plain"))? >= 30.0)
    })?;
    ensure!(
        lab.http_metric(0, "meshpath_proxy_connections_open")? <= 60.0,
        "more than the per-address caps were admitted"
    );
    // A client of another address still gets through, both ways across the nodes.
    send(&lab, "a", "c", Duration::from_secs(3)).context("a -> c during the flood")?;
    send(&lab, "c", "a", Duration::from_secs(3)).context("c -> a during the flood")?;
    // A third flooder fills what is left of the node's budget: then the node refuses even
    // a good client, and takes it again once the flood is gone.
    let a_flood = hold(&lab, "a", lab.addr("d", false, smoke::APP_PORT), 30, b"hello")?;
    wait_until("the node's budget to be spent", Duration::from_secs(10), || {
        Ok(lab.http_metric(0, "meshpath_proxy_connections_open")? >= 70.0)
    })?;
    ensure!(lab.http_metric(0, "meshpath_proxy_connections_open")? <= 70.0, "more than the node's cap was admitted");
    ensure!(send(&lab, "b", "e", Duration::from_millis(1500)).is_err(), "the node admitted past its cap");
    drop((d, b, a_flood));
    wait_until("a good client to get through again", Duration::from_secs(10), || {
        Ok(send(&lab, "a", "c", Duration::from_secs(2)).is_ok())
    })?;
    // The daemon kept working (its reconcile needs descriptors too) and logged summaries,
    // not a line per refused connection.
    lab.write_workloads(&["a", "c"])?;
    wait_until("e unenrolled after the flood", RELEASE, || Ok(!lab.workload_map(0)?.contains_key(&lab.pod("e").v4)))?;
    let log = std::fs::read_to_string(lab.daemon_log_path(0))?;
    let lines = log.lines().filter(|l| l.contains("refusing connections")).count();
    ensure!((1..=6).contains(&lines), "{lines} log lines about refusals for more than 90 refused connections");
    Ok(())
}
