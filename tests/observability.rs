//! What operators read, checked against known traffic in a lab: Prometheus metrics on 15020,
//! the structured access log through `tracing`, and `meshpath status`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshpath_common::names::PORT_METRICS;
use meshpath_lab::{Lab, http_get, smoke};

mod support;
use support::{meshpath, send, started_lab, started_lab_with, wait_until};

/// The value of the sample `name{labels}` in a scrape, if present.
fn sample(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse().ok())
}

fn scrape(lab: &Lab, node: usize) -> Result<String> {
    let resp = http_get(&lab.nodes[node].name, PORT_METRICS, "/metrics")?;
    ensure!(resp.starts_with("HTTP/1.1 200"), "metrics endpoint answered: {}", resp.lines().next().unwrap_or(""));
    Ok(resp)
}

#[test]
fn metrics_and_access_log_count_the_labs_traffic() -> Result<()> {
    let lab = started_lab_with(&["--log-format", "json"])?;
    let _servers = smoke::start_servers(&lab)?;
    let mut request = 0usize;
    let mut response = 0usize;
    for _ in 0..3 {
        let x = send(&lab, "a", "c", Duration::from_secs(3))?;
        ensure!(x.echoed_intact);
        request += 4096;
        // The echo server answers `peer=<addr>\n` and the request back.
        response += format!("peer={}\n", x.server_saw).len() + 4096;
    }
    let (a, c) = (lab.identity("a"), lab.identity("c"));
    let labels = |reporter: &str| {
        format!(
            "{{reporter=\"{reporter}\",source_workload=\"pod-a\",source_workload_namespace=\"lab\",source_principal=\"{a}\",\
             destination_workload=\"pod-c\",destination_workload_namespace=\"lab\",destination_principal=\"{c}\",\
             request_protocol=\"tcp\",connection_security_policy=\"mutual_tls\"}}"
        )
    };
    // The client's node reports as source, the server's as destination; same counts.
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let l = labels(reporter);
        let want = [
            ("istio_tcp_connections_opened_total", 3.0),
            ("istio_tcp_connections_closed_total", 3.0),
            ("istio_tcp_received_bytes_total", request as f64),
            ("istio_tcp_sent_bytes_total", response as f64),
        ];
        // Records are written as connections end; give the last one a moment.
        wait_until(&format!("node {} to count 3 closed connections", node + 1), Duration::from_secs(3), || {
            Ok(sample(&scrape(&lab, node)?, &format!("istio_tcp_connections_closed_total{l}")) == Some(3.0))
        })?;
        let text = scrape(&lab, node)?;
        for (name, value) in want {
            let got = sample(&text, &format!("{name}{l}"));
            ensure!(got == Some(value), "node {}: {name}{l} = {got:?}, want {value}\n{text}", node + 1);
        }
    }
    let n1 = scrape(&lab, 0)?;
    let steered = sample(&n1, "meshpath_datapath_steered_total").context("no steered counter")?;
    ensure!(steered >= 3.0, "steered = {steered}");
    ensure!(sample(&n1, "meshpath_datapath_missing_socket_total") == Some(0.0));
    ensure!(
        sample(&n1, "meshpath_hbone_pool_connections") == Some(1.0),
        "the three connections should share one pooled HBONE connection:\n{n1}"
    );
    ensure!(sample(&n1, "meshpath_hbone_pool_streams") == Some(0.0));

    // The access log through tracing, as JSON: one line per connection, with everything.
    let log = std::fs::read_to_string(lab.daemon_log_path(0))?;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access" && v["fields"]["dst_workload"] == "lab/pod-c")
        .collect();
    ensure!(lines.len() == 3, "wanted 3 access lines for a -> c, got {}:\n{log}", lines.len());
    let f = &lines[0]["fields"];
    for key in [
        "src",
        "orig_dst",
        "src_workload",
        "src_identity",
        "dst_identity",
        "bytes_sent",
        "bytes_received",
        "duration_ms",
        "mtls",
        "outcome",
    ] {
        ensure!(!f[key].is_null(), "access line lacks {key}: {f}");
    }
    ensure!(
        f["mtls"] == true && f["outcome"] == "ok" && f["src_identity"] == a.to_string() && f["bytes_sent"] == 4096,
        "{f}"
    );
    Ok(())
}

fn status(lab: &Lab, node: usize) -> Result<serde_json::Value> {
    let n = lab.nodes[node].name.clone();
    let wl = lab.workloads_path().display().to_string();
    let out = lab.meshpath(node, &["status", "--node", &n, "--workloads", &wl, "-o", "json"])?;
    serde_json::from_str(&out).with_context(|| format!("status output is not JSON:\n{out}"))
}

#[test]
fn status_shows_attachments_workloads_listeners_and_follows_enrolment() -> Result<()> {
    let mut lab = started_lab()?;
    let a = lab.pod("a").clone();
    let s = status(&lab, 0)?;
    let ips: Vec<(String, String, String)> = s["workloads"]
        .as_array()
        .context("workloads")?
        .iter()
        .map(|w| {
            (
                w["ip"].as_str().unwrap_or("").to_owned(),
                w["interface"].as_str().unwrap_or("").to_owned(),
                w["workload"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for ip in [a.v4, a.v6] {
        ensure!(ips.contains(&(ip.to_string(), "vpa".into(), "lab/pod-a".into())), "{ip} missing from {ips:?}");
    }
    let tcx_on = |s: &serde_json::Value, ifname: &str| {
        s["attachments"]
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x["interface"] == ifname && x["mode"] == "tcx" && x["live"] == true))
    };
    ensure!(tcx_on(&s, "vpa") && tcx_on(&s, "ul0"), "attachments: {}", s["attachments"]);
    ensure!(s["attachments"].as_array().is_some_and(|v| v.iter().any(|x| x["hook"] == "sk_lookup")));
    let listeners = s["listeners"].as_array().context("listeners")?;
    ensure!(
        listeners.len() == 6 && listeners.iter().all(|l| l["listening"] == true && l["registered"] == true),
        "{listeners:?}"
    );
    // Each slot names its owner: the daemon, serving.
    let pid = lab.nodes[0].daemon.as_ref().context("node 1's daemon")?.id();
    ensure!(
        listeners.iter().all(|l| l["owner"]["pid"] == pid && l["owner"]["state"] == "serving"),
        "slot owners: {listeners:?}"
    );
    ensure!(s["daemons"].as_array().is_some_and(|d| d.len() == 1 && d[0]["pid"] == pid), "daemons: {}", s["daemons"]);

    // `ip netns exec`, which the lab's description suggests, gives its command a fresh /sys
    // without bpffs: status still finds the node's pins, and says through whose mounts.
    let n1 = lab.nodes[0].name.clone();
    let out =
        Command::new("ip").args(["netns", "exec", &n1]).arg(meshpath()).args(["status", "--node", &n1]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.matches("in SOCKMAP").count() == 6 && text.contains("vpa"),
        "`ip netns exec {n1} meshpath status` failed ({}):\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(text.contains("read as that process sees them"), "{text}");

    // Unenrol a (and e): status follows.
    lab.write_workloads(&["c"])?;
    wait_until("a to leave node 1's status", Duration::from_secs(3), || {
        Ok(status(&lab, 0)?["workloads"].as_array().is_some_and(|v| v.is_empty()))
    })?;

    // With the daemon stopped, nothing listens and the SOCKMAP is empty: enrolled traffic
    // is dropped, and status says so.
    lab.stop_daemon(0, false)?;
    let s = status(&lab, 0)?;
    let listeners = s["listeners"].as_array().context("listeners")?;
    ensure!(listeners.iter().all(|l| l["listening"] == false && l["registered"] == false), "{listeners:?}");
    ensure!(
        s["daemons"].as_array().is_some_and(|d| d.is_empty()),
        "a stopped daemon is still listed: {}",
        s["daemons"]
    );
    let text = lab.meshpath(0, &["status", "--node", &lab.nodes[0].name])?;
    ensure!(text.contains("NOT in SOCKMAP"), "{text}");
    // A node with nothing installed gives one clear error.
    let err = lab
        .meshpath(0, &["status", "--node", "no-such-node"])
        .expect_err("status of an unknown node must fail")
        .to_string();
    ensure!(err.contains("no meshpath datapath for node no-such-node"), "{err}");
    Ok(())
}
