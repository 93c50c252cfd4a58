//! What operators read, checked against known traffic in a lab: Prometheus metrics on 15020,
//! the structured access log through `tracing`, and `meshpath status`.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use meshpath::record::Outcome;
use meshpath_common::names::PORT_METRICS;
use meshpath_lab::lab::{MESHPATH_BIN_ENV, read_records};
use meshpath_lab::traffic::{EchoServer, in_netns};
use meshpath_lab::{Lab, http_get, smoke};

mod support;
use support::{RELEASE, meshpath, send, started_lab, started_lab_with, wait_until};

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

    // Unenrol a (and e): status follows, once the release hold (5 s: a's veth stays, so
    // nothing confirms the release sooner) is over.
    lab.write_workloads(&["c"])?;
    wait_until("a to leave node 1's status", RELEASE, || {
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

/// `meshpath-lab run` (what `cargo xtask run` starts), stopped with SIGINT when dropped.
struct RunningLab(Option<Child>);

impl RunningLab {
    /// Sends SIGINT, as Ctrl-C does, and waits up to `timeout` for the exit.
    fn interrupt(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.0.take().context("already stopped")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the lab did not exit within {timeout:?} of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunningLab {
    fn drop(&mut self) {
        if self.0.is_some() {
            let _ = self.interrupt(Duration::from_secs(30));
        }
    }
}

/// What `meshpath-lab run` printed up to its "press Ctrl-C" line.
struct Printed {
    lab: String,
    /// (command, what it shows), in order.
    commands: Vec<(String, String)>,
    access_logs: Vec<String>,
    /// Each pod's IPv4 address, by name, from the pod lines.
    pods: BTreeMap<String, String>,
}

fn read_until_ready(lines: &mpsc::Receiver<String>, timeout: Duration) -> Result<Printed> {
    let deadline = Instant::now() + timeout;
    let mut all = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .with_context(|| format!("no \"press Ctrl-C\" line; printed:\n{}", all.join("\n")))?;
        let ready = line.contains("press Ctrl-C");
        all.push(line);
        if ready {
            break;
        }
    }
    let lab = all.iter().find_map(|l| l.strip_prefix("lab ")?.split_whitespace().next()).context("no lab line")?;
    let commands = all
        .iter()
        .enumerate()
        .filter_map(|(i, l)| Some((l.strip_prefix("  $ ")?.to_owned(), all.get(i + 1)?.trim().to_owned())))
        .collect();
    let logs = all.iter().find_map(|l| l.split_once("access logs ")).context("no access log line")?.1;
    let access_logs = logs.split_whitespace().filter(|w| w.starts_with('/')).map(str::to_owned).collect();
    let pods = all
        .iter()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("  pod ")?.split_once(' ')?;
            Some((name.to_owned(), rest.split_once("): ")?.1.split_whitespace().next()?.to_owned()))
        })
        .collect();
    Ok(Printed { lab: lab.to_owned(), commands, access_logs, pods })
}

fn shell(command: &str) -> Result<std::process::Output> {
    Ok(Command::new("sh").args(["-c", command]).stdin(Stdio::null()).output()?)
}

/// `cargo xtask run`'s first five minutes: the lab prints four commands to try, each does
/// what it says (an HBONE connection keeping the client's address, a plaintext one the
/// strict node refuses, one through node 1's NodePort, `status` through `ip netns exec`),
/// the access logs it names hold them, and Ctrl-C tears everything down.
#[test]
fn the_running_lab_prints_commands_that_work_and_ctrl_c_tears_it_down() -> Result<()> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshpath-lab"))
        .arg("run")
        .env(MESHPATH_BIN_ENV, meshpath())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut running = RunningLab(Some(child));
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(std::io::Result::ok) {
            let _ = tx.send(line);
        }
    });
    let printed = read_until_ready(&lines, Duration::from_secs(90))?;
    let [(hbone, hbone_shows), (refused, refused_shows), (nodeport, nodeport_shows), (status, _)] =
        printed.commands.as_slice()
    else {
        bail!("wanted four commands, got {:?}", printed.commands);
    };

    let out = shell(hbone)?;
    let want = hbone_shows.split("<port>").next().unwrap_or_default();
    let got = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success() && got.starts_with(want), "`{hbone}` printed {got:?} ({}), not {want:?}", out.status);

    // The proxy resets it once accepted; curl says so as (56), or as (7) when the reset
    // comes before it looks at its connect. The access log below says who refused it.
    let out = shell(refused)?;
    let got = String::from_utf8_lossy(&out.stderr);
    let curl_code = |code: &str| got.starts_with(&format!("curl: ({code})"));
    ensure!(
        !out.status.success() && (curl_code("56") || curl_code("7")) && refused_shows.starts_with("curl: (56)"),
        "`{refused}` printed {got:?} ({}), the lab said {refused_shows:?}",
        out.status
    );

    let out = shell(nodeport)?;
    let want = nodeport_shows.split("<port>").next().unwrap_or_default();
    let got = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && got.starts_with(want),
        "`{nodeport}` printed {got:?} ({}), not {want:?}",
        out.status
    );

    let out = shell(status)?;
    let got = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && got.matches("in SOCKMAP").count() == 6 && got.contains("vpc"),
        "`{status}` printed ({}):\n{got}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // Node 1 proxied b's connection through the NodePort, naming it.
    let [n1_log, n2_log] = printed.access_logs.as_slice() else { bail!("access logs: {:?}", printed.access_logs) };
    let b = printed.pods.get("b").with_context(|| format!("no line for pod b: {:?}", printed.pods))?;
    let frontend = nodeport.rsplit("http://").next().unwrap_or_default().trim_end_matches('/');
    ensure!(
        read_records(n1_log.as_ref())?.iter().any(|r| r.listener == "inbound_plain"
            && r.src.ip().to_string() == *b
            && r.frontend.map(|f| f.to_string()).as_deref() == Some(frontend)),
        "{n1_log} has no record of b through {frontend}"
    );
    // Node 2 served a's tunnel and refused d's plaintext.
    let records: Vec<(String, String, Outcome)> =
        read_records(n2_log.as_ref())?.into_iter().map(|r| (r.listener, r.src.ip().to_string(), r.outcome)).collect();
    for (listener, pod, outcome) in [("hbone", "a", Outcome::Ok), ("inbound_plain", "d", Outcome::PlaintextRefused)] {
        let src = printed.pods.get(pod).with_context(|| format!("no line for pod {pod}: {:?}", printed.pods))?;
        let want = (listener.to_owned(), src.clone(), outcome);
        ensure!(records.contains(&want), "{n2_log} lacks {want:?}: {records:?}");
    }

    let exit = running.interrupt(Duration::from_secs(30))?;
    ensure!(exit.success(), "the lab exited with {exit} after SIGINT");
    let netns = Command::new("ip").args(["netns", "list"]).output()?;
    let left: Vec<String> = String::from_utf8_lossy(&netns.stdout)
        .lines()
        .filter(|l| l.starts_with(&printed.lab))
        .map(str::to_owned)
        .collect();
    ensure!(left.is_empty(), "namespaces left after Ctrl-C: {left:?}");
    for node in ["n1", "n2"] {
        let pins = meshpath::datapath::node_pin_dir(&format!("{}-{node}", printed.lab))?;
        ensure!(!pins.exists(), "{} left after Ctrl-C", pins.display());
    }
    Ok(())
}

/// Where the held connections' servers listen (echoing as bytes arrive).
const HELD_PORT: u16 = 9090;

/// A connection from pod `from` to pod `to` that stays open, after 1000 bytes went there
/// and back.
fn held(lab: &Lab, from: &str, to: &str) -> Result<TcpStream> {
    let dst = lab.addr(to, false, HELD_PORT);
    let mut s = in_netns(&lab.pod(from).netns, || TcpStream::connect_timeout(&dst, Duration::from_secs(3)))??;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&[7u8; 1000])?;
    let mut back = [0u8; 1000];
    s.read_exact(&mut back).with_context(|| format!("{from} -> {to}: the echo"))?;
    Ok(s)
}

/// Whether the proxy ended `s` (EOF or reset) within 5 s.
fn ended(s: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

/// An open connection as status lists it: kind, listener, source IP, source identity,
/// destination workload, target (`-` for none).
type Row = (String, String, String, String, String, String);

/// What node `node`'s daemon lists, checking each connection moved its 1000 bytes both ways.
fn listed(lab: &Lab, node: usize) -> Result<Vec<Row>> {
    let s = status(lab, node)?;
    let daemons = s["connections"].as_array().context("connections")?;
    ensure!(daemons.len() == 1 && daemons[0]["error"].is_null(), "connections: {daemons:?}");
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let mut out = Vec::new();
    for c in daemons[0]["open"].as_array().context("open")? {
        ensure!(c["bytes_sent"].as_u64() >= Some(1000) && c["bytes_received"].as_u64() >= Some(1000), "bytes: {c}");
        let src_ip = c["src"].as_str().and_then(|a| a.rsplit_once(':')).map(|(ip, _)| ip.to_owned());
        out.push((
            text(&c["kind"]),
            text(&c["listener"]),
            src_ip.unwrap_or_default(),
            text(&c["src_identity"]),
            text(&c["dst_workload"]),
            text(&c["target"]),
        ));
    }
    out.sort();
    Ok(out)
}

/// Open connections of every kind show in `meshpath status` (JSON and text) with their bytes;
/// `meshpath close` ends one with its record; a stop that cuts the rest writes a record for
/// each.
#[test]
fn status_lists_open_connections_of_every_kind_and_each_ends_with_a_record() -> Result<()> {
    let mut lab = started_lab()?;
    let _servers: Vec<EchoServer> = ["a", "c", "d", "e"]
        .iter()
        .map(|p| EchoServer::start_streaming(&lab.pod(p).netns, HELD_PORT))
        .collect::<std::io::Result<_>>()?;
    // A plain relay that lives through a takeover: the successor carries it on, adopted.
    let adopted = held(&lab, "a", "d")?;
    lab.take_over(0, Duration::from_secs(30))?;
    let mut clients = vec![adopted];
    for (from, to) in [("a", "c"), ("a", "d"), ("a", "e"), ("b", "a")] {
        clients.push(held(&lab, from, to)?);
    }
    let (a, b, c, d, e) = (lab.pod("a").v4, lab.pod("b").v4, lab.pod("c").v4, lab.pod("d").v4, lab.pod("e").v4);
    let id_a = lab.identity("a").to_string();
    let at = |ip| format!("{ip}:{HELD_PORT}");
    let row = |kind: &str, listener: &str, src, id: &str, dst: &str, target| {
        (kind.to_owned(), listener.to_owned(), format!("{src}"), id.to_owned(), dst.to_owned(), at(target))
    };
    let mut want = vec![
        row("adopted", "outbound", a, "-", "-", d),
        row("hbone_stream", "outbound", a, &id_a, "lab/pod-c", c),
        row("plain_relay", "outbound", a, "-", "-", d),
        row("same_node", "outbound", a, &id_a, "lab/pod-e", e),
        row("plain_relay", "inbound_plain", b, "-", "lab/pod-a", a),
    ];
    want.sort();
    let got = listed(&lab, 0)?;
    ensure!(got == want, "node 1 lists\n{got:#?}\nwant\n{want:#?}");
    // The tunnel's other end lists the stream, with the identity a proved.
    let n2 = listed(&lab, 1)?;
    ensure!(n2 == [row("hbone_stream", "hbone", a, &id_a, "lab/pod-c", c)], "node 2 lists {n2:#?}");
    let text = lab.meshpath(0, &["status", "--node", &lab.nodes[0].name])?;
    ensure!(text.contains("open connections (5)"), "{text}");
    for kind in ["adopted", "hbone_stream", "plain_relay", "same_node"] {
        ensure!(text.lines().any(|l| l.contains(kind) && l.contains("sent 1000")), "no {kind} in\n{text}");
    }

    // Closed by an operator: the same-node pair ends, and its record says so.
    let s = status(&lab, 0)?;
    let same = s["connections"][0]["open"].as_array().into_iter().flatten().find(|c| c["kind"] == "same_node");
    let id = same.and_then(|c| c["id"].as_u64()).context("the same-node pair's id")?;
    let said = lab.meshpath(0, &["close", "--node", &lab.nodes[0].name, &id.to_string()])?;
    ensure!(said.contains(&format!("closed connection {id}")), "{said}");
    ensure!(ended(&mut clients[3]), "the closed connection is still open");
    let closed = lab.wait_record(0, Duration::from_secs(3), |r| r.orig_dst.ip() == e && r.src.ip() == a)?;
    let closed = closed.context("no record of the closed connection")?;
    ensure!(closed.outcome == Outcome::Cut && closed.bytes_sent == 1000, "{closed:?}");
    ensure!(closed.error.as_deref().is_some_and(|e| e.contains("meshpath close")), "{closed:?}");
    ensure!(listed(&lab, 0)?.len() == 4, "the closed connection is still listed");

    // Stopped with four connections open, past the drain's deadline: each is cut, and each
    // has its record.
    let before = lab.records(0)?.len();
    lab.stop_daemon(0, false)?;
    for (i, client) in clients.iter_mut().enumerate().filter(|(i, _)| *i != 3) {
        ensure!(ended(client), "connection #{i} outlived its daemon");
    }
    let cut: Vec<_> = lab.records(0)?.into_iter().skip(before).collect();
    ensure!(cut.len() == 4 && cut.iter().all(|r| r.outcome == Outcome::Cut), "records at the stop: {cut:#?}");
    Ok(())
}

/// `--proxy-only` (the benchmarks' iptables baselines) answers the probes as a node does:
/// ready once its listeners are bound and its first state applied, with metrics.
#[test]
fn proxy_only_answers_readiness_and_metrics() -> Result<()> {
    let lab = support::built_lab()?;
    let ns = lab.nodes[0].name.clone();
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(&lab.binary)
        .args(["node", "--proxy-only", "--node", &ns, "--workloads"])
        .arg(lab.workloads_path())
        .arg("--ca-dir")
        .arg(lab.ca_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let ready = wait_until("the proxy-only daemon to be ready", Duration::from_secs(10), || {
        Ok(meshpath_lab::readiness(&ns).unwrap_or(false))
    });
    let metrics = http_get(&ns, PORT_METRICS, "/metrics");
    let _ = child.kill();
    let _ = child.wait();
    ready?;
    let metrics = metrics?;
    ensure!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("meshpath_"), "metrics: {metrics}");
    Ok(())
}
