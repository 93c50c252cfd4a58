//! HBONE on the real kernel, in throwaway labs: what the inbound server answers to good and
//! bad requests, who it lets in, resets, certificate renewal and files, pool idling.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use meshpath::identity::ca::{BuiltinCa, pem_encode};
use meshpath::identity::files::{CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE};
use meshpath::identity::{Identity, WorkloadCertificate};
use meshpath::record::Outcome;
use meshpath::tls;
use meshpath_lab::hbone_client::{self, Answer, Probe};
use meshpath_lab::smoke::{self, APP_PORT};
use meshpath_lab::{Lab, traffic};

mod support;
use support::{built_lab, send, started_lab, started_lab_with, wait_until};

const HOUR: Duration = Duration::from_secs(3600);

/// The lab's CA (its root is in the lab directory once a daemon has started).
fn lab_ca(lab: &Lab) -> Result<BuiltinCa> {
    Ok(BuiltinCa::open(Some(&lab.ca_dir()), Lab::TRUST_DOMAIN, HOUR)?)
}

/// Sends `probes` from pod d to c's HBONE port as `cert`, expecting c's identity.
fn probe_c(lab: &Lab, cert: &WorkloadCertificate, probes: &[Probe]) -> Result<hbone_client::Probed> {
    let config = tls::client_config(cert, &lab.identity("c"))?;
    Ok(hbone_client::probe(
        &lab.pod("d").netns,
        config,
        lab.addr("c", false, 15008),
        probes,
        b"hello through HBONE",
        Duration::from_secs(15),
    )?)
}

#[test]
fn bad_requests_get_ztunnel_status_codes_and_the_server_keeps_serving() -> Result<()> {
    let lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let cert = lab_ca(&lab)?.mint(&lab.identity("d"), HOUR)?;
    let c = lab.pod("c").v4;
    // A well-formed GET (an HTTP/2 server resets a GET without :path before we see it).
    let get = Probe { method: http::Method::GET, authority: format!("http://{}/", SocketAddr::new(c, APP_PORT)) };
    let cases: Vec<(&str, Probe, u16)> = vec![
        ("GET instead of CONNECT", get, 400),
        ("authority without a port", Probe::connect(c), 400),
        ("authority is an unknown service name", Probe::connect("web.shop.svc:8080"), 503),
        ("authority is not the dialed IP", Probe::connect(SocketAddr::new(lab.pod("d").v4, APP_PORT)), 400),
        ("self-call to 15008", Probe::connect(SocketAddr::new(c, 15008)), 503),
        ("self-call to 15001", Probe::connect(SocketAddr::new(c, 15001)), 503),
        ("self-call to 15006", Probe::connect(SocketAddr::new(c, 15006)), 503),
        ("nothing listens there", Probe::connect(SocketAddr::new(c, 9)), 503),
    ];
    let mut probes: Vec<Probe> = cases.iter().map(|(_, p, _)| p.clone()).collect();
    // The same connection still serves a good request afterwards.
    probes.push(Probe::connect(SocketAddr::new(c, APP_PORT)));
    let answers = probe_c(&lab, &cert, &probes)?.answers;
    for ((what, _, want), got) in cases.iter().zip(&answers) {
        ensure!(*got == Answer::Status(*want, None), "{what}: wanted {want}, got {got:?}");
    }
    let Answer::Status(200, Some(body)) = answers.last().context("no answer")? else {
        anyhow::bail!("the good request after the bad ones failed: {:?}", answers.last());
    };
    let text = String::from_utf8_lossy(body);
    ensure!(text.ends_with("hello through HBONE"), "echo garbled: {text:?}");
    // The app saw d's own address: the source is preserved through the tunnel.
    ensure!(text.starts_with(&format!("peer={}:", lab.pod("d").v4)), "server saw {text:?}");

    // Each refusal is in node 2's access log with its status and reason, as d's identity.
    let records = lab.records(1)?;
    for (outcome, needle) in [
        (Outcome::BadRequest, "is not CONNECT"),
        (Outcome::BadRequest, "does not match the dialed address"),
        (Outcome::SelfCall, "15008"),
        (Outcome::UpstreamConnectFailed, "upstream connect"),
    ] {
        let r = records
            .iter()
            .find(|r| r.outcome == outcome && r.error.as_deref().is_some_and(|e| e.contains(needle)))
            .with_context(|| format!("no {outcome} record saying {needle:?}"))?;
        ensure!(r.src_identity.as_deref() == Some(lab.identity("d").to_string().as_str()) && r.mtls, "{r:?}");
    }
    Ok(())
}

#[test]
fn peers_without_a_valid_identity_are_refused() -> Result<()> {
    let lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    let ca = lab_ca(&lab)?;
    let good = Probe::connect(lab.addr("c", false, APP_PORT));
    let d = lab.identity("d");
    let other_domain = ca.mint(&Identity::new("evil.example", "lab", "sa-d"), HOUR)?;
    let expired = ca.mint_at(&d, SystemTime::now() - 3 * HOUR, HOUR)?;
    let mut foreign = BuiltinCa::open(None, "foreign-org", HOUR)?.mint(&d, HOUR)?;
    // It trusts the lab's root, so only the server's check can stop it.
    foreign.roots = vec![ca.root().clone()];

    let config_of = |cert: &WorkloadCertificate| tls::client_config(cert, &lab.identity("c"));
    let cases = [
        ("another trust domain", config_of(&other_domain)?, "not in trust domain cluster.local"),
        ("an expired certificate", config_of(&expired)?, "certificate expired"),
        ("a certificate from another CA", config_of(&foreign)?, "UnknownIssuer"),
        (
            "no client certificate",
            tls::anonymous_client_config(&[ca.root().clone()], &lab.identity("c"))?,
            "no certificate",
        ),
    ];
    for (what, config, reason) in cases {
        let answers = hbone_client::probe(
            &lab.pod("d").netns,
            config,
            lab.addr("c", false, 15008),
            std::slice::from_ref(&good),
            b"x",
            Duration::from_secs(10),
        );
        let refused = match &answers {
            Err(_) => true,
            Ok(p) => matches!(p.answers[0], Answer::Failed(_)),
        };
        ensure!(refused, "a client with {what} got through: {answers:?}");
        let record = lab.wait_record(1, Duration::from_secs(3), |r| {
            r.outcome == Outcome::TlsHandshakeFailed && r.error.as_deref().is_some_and(|e| e.contains(reason))
        })?;
        ensure!(record.is_some(), "node 2 has no refusal naming {reason:?} for {what}: {:#?}", lab.records(1)?);
    }
    // A valid peer still gets in.
    let answers = probe_c(&lab, &ca.mint(&d, HOUR)?, &[good])?.answers;
    ensure!(matches!(answers[0], Answer::Status(200, Some(_))), "valid client refused: {answers:?}");
    Ok(())
}

#[test]
fn plaintext_policy_is_permissive_on_node_1_and_strict_on_node_2() -> Result<()> {
    let lab = started_lab()?;
    let _servers = smoke::start_servers(&lab)?;
    // Permissive: delivered, with the client's address, recorded as not mTLS.
    let x = send(&lab, "b", "a", Duration::from_secs(3))?;
    ensure!(x.echoed_intact && x.server_saw.ip() == x.client.ip());
    let client = x.client;
    let r = lab.wait_record(0, Duration::from_secs(3), |r| r.src == client)?.context("no record of b -> a")?;
    ensure!(r.listener == "inbound_plain" && !r.mtls && r.outcome == Outcome::Ok, "{r:?}");
    ensure!(r.dst_identity.as_deref() == Some(lab.identity("a").to_string().as_str()), "{r:?}");
    // Strict: refused before anything reaches the app.
    let refused = send(&lab, "d", "c", Duration::from_secs(2));
    ensure!(refused.is_err(), "strict node delivered plaintext: {refused:?}");
    let r = lab
        .wait_record(1, Duration::from_secs(3), |r| r.listener == "inbound_plain")?
        .context("no record on node 2")?;
    ensure!(r.outcome == Outcome::PlaintextRefused && r.bytes_sent == 0, "{r:?}");
    Ok(())
}

/// A TCP server in `ns` on `port` that accepts one connection, reads, and reports how the
/// read ended and after how long.
fn reset_watcher(ns: &str, port: u16) -> Result<std::sync::mpsc::Receiver<(std::io::ErrorKind, Duration)>> {
    let listener = traffic::in_netns(ns, || std::net::TcpListener::bind(("::", port)))??;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = [0u8; 1024];
            let mut first = None;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        break tx.send((
                            std::io::ErrorKind::UnexpectedEof,
                            first.map_or(Duration::ZERO, |t: Instant| t.elapsed()),
                        ));
                    }
                    Ok(_) => first = first.or(Some(Instant::now())),
                    Err(e) => break tx.send((e.kind(), first.map_or(Duration::ZERO, |t| t.elapsed()))),
                }
            }
            .ok();
        }
    });
    Ok(rx)
}

/// In `ns`, accepts one connection on `port`, reads what comes, then resets it.
fn resetting_server(ns: &str, port: u16) -> Result<std::thread::JoinHandle<()>> {
    let listener = traffic::in_netns(ns, || std::net::TcpListener::bind(("::", port)))??;
    Ok(std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.read(&mut [0u8; 64]);
            std::thread::sleep(Duration::from_millis(200));
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
    }))
}

#[test]
fn a_reset_on_one_side_resets_the_other_side_promptly() -> Result<()> {
    let lab = started_lab()?;
    // Client resets: the server across the tunnel must see a reset, not an end of data.
    let rx = reset_watcher(&lab.pod("c").netns, 9090)?;
    let dst = lab.addr("c", false, 9090);
    traffic::in_netns(&lab.pod("a").netns, || -> std::io::Result<()> {
        let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        s.write_all(b"some bytes first")?;
        std::thread::sleep(Duration::from_millis(300));
        // SO_LINGER 0: close sends a RST.
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        drop(s);
        Ok(())
    })??;
    let (kind, after) = rx.recv_timeout(Duration::from_secs(5)).context("the server never saw the connection end")?;
    ensure!(kind == std::io::ErrorKind::ConnectionReset, "server saw {kind:?}, not a reset");
    ensure!(after < Duration::from_secs(3), "the reset took {after:?} to arrive");
    let r = lab.wait_record(0, Duration::from_secs(3), |r| r.orig_dst == dst)?.context("no record on node 1")?;
    ensure!(r.outcome == Outcome::Reset, "node 1 recorded {:?}", r.outcome);

    // Server resets: the client must see a reset too (stream reset -> TCP RST on node 1).
    let server = resetting_server(&lab.pod("c").netns, 9091)?;
    let dst = lab.addr("c", false, 9091);
    let (kind, took) =
        traffic::in_netns(&lab.pod("a").netns, || -> std::io::Result<(std::io::ErrorKind, Duration)> {
            let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"hello")?;
            let start = Instant::now();
            let kind = match s.read(&mut [0u8; 64]) {
                Ok(0) => std::io::ErrorKind::UnexpectedEof,
                Ok(_) => std::io::ErrorKind::InvalidData,
                Err(e) => e.kind(),
            };
            Ok((kind, start.elapsed()))
        })??;
    let _ = server.join();
    ensure!(kind == std::io::ErrorKind::ConnectionReset, "client saw {kind:?}, not a reset");
    ensure!(took < Duration::from_secs(3), "the reset took {took:?} to arrive");
    Ok(())
}

/// Serials of `id`'s certificates in `node`'s log, in order (issued, then each renewal).
fn serials(lab: &Lab, node: usize, id: &Identity) -> Result<Vec<String>> {
    let log = std::fs::read_to_string(lab.daemon_log_path(node))?;
    let id = format!("identity={id} ");
    Ok(log
        .lines()
        .filter(|l| l.contains(&id) && (l.contains("certificate issued") || l.contains("certificate renewed")))
        .filter_map(|l| l.split(" serial=").nth(1)?.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// Waits until `node` holds no HBONE connection (with a short idle timeout), so the next
/// connection makes a fresh TLS handshake.
fn wait_pool_empty(lab: &Lab, node: usize) -> Result<()> {
    wait_until("idle HBONE connections to close", Duration::from_secs(5), || Ok(hbone_connections(lab, node)? == 0))
}

#[test]
fn certificates_renew_at_half_life_without_dropping_live_connections() -> Result<()> {
    // 12 s certificates renew after 6 s; HBONE connections close after 1 s idle.
    let lab = started_lab_with(&["--cert-ttl-secs", "12", "--hbone-idle-timeout-secs", "1"])?;
    let _servers = smoke::start_servers(&lab)?;
    let dst = lab.addr("c", false, APP_PORT);
    let payload = traffic::payload(8192);
    let (first, second) = payload.split_at(4096);
    // One connection open across the renewal: half the payload before, half after.
    let echoed = traffic::in_netns(&lab.pod("a").netns, || -> std::io::Result<Vec<u8>> {
        let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(first)?;
        std::thread::sleep(Duration::from_secs(8));
        s.write_all(second)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    })??;
    ensure!(echoed.ends_with(&payload), "the connection across the renewal lost or garbled bytes");
    for node in 0..2 {
        let log = std::fs::read_to_string(lab.daemon_log_path(node))?;
        ensure!(log.contains("workload certificate renewed"), "node {} did not renew:\n{log}", node + 1);
        ensure!(!log.contains("PRIVATE KEY"), "a private key reached node {}'s log", node + 1);
    }
    // A new TLS handshake now gets a renewed certificate: c's server presents one of the
    // serials node 2 renewed to, not the first.
    wait_pool_empty(&lab, 0)?;
    let c_serials = serials(&lab, 1, &lab.identity("c"))?;
    let probed = probe_c(&lab, &lab_ca(&lab)?.mint(&lab.identity("d"), HOUR)?, &[Probe::connect(dst)])?;
    let now = serials(&lab, 1, &lab.identity("c"))?;
    ensure!(c_serials.len() >= 2, "no renewal of c's certificate logged: {c_serials:?}");
    ensure!(
        probed.server_serial != c_serials[0] && now.contains(&probed.server_serial),
        "server presented {} (serials {now:?})",
        probed.server_serial
    );
    ensure!(matches!(probed.answers[0], Answer::Status(200, Some(_))), "{:?}", probed.answers);
    // And pod traffic over a fresh HBONE connection works with the renewed certificates.
    let x = send(&lab, "a", "c", Duration::from_secs(3))?;
    ensure!(x.echoed_intact);
    Ok(())
}

/// Writes `id`'s certificate files under `dir` as a Kubernetes Secret volume does: the files
/// are symlinks into `..data`, itself a symlink swapped atomically to a new directory, so a
/// reader never mixes old and new files. `key` overrides the private key's PEM. Returns the
/// leaf's serial.
fn write_cert_files(ca: &BuiltinCa, dir: &std::path::Path, id: &Identity, key: Option<&str>) -> Result<String> {
    use std::os::unix::fs::symlink;
    let c = ca.mint(id, HOUR)?;
    let d = dir.join(&id.namespace).join(&id.service_account);
    let version = format!("..{}", c.serial().replace(':', ""));
    std::fs::create_dir_all(d.join(&version))?;
    let key = key.map(str::to_owned).unwrap_or_else(|| pem_encode("PRIVATE KEY", c.key().secret_der()));
    for (name, text) in [
        (KEY_FILE, key),
        (CERT_CHAIN_FILE, pem_encode("CERTIFICATE", &c.chain[0])),
        (ROOT_CERT_FILE, pem_encode("CERTIFICATE", ca.root())),
    ] {
        std::fs::write(d.join(&version).join(name), text)?;
        if std::fs::symlink_metadata(d.join(name)).is_err() {
            symlink(format!("..data/{name}"), d.join(name))?;
        }
    }
    let tmp = d.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&version, &tmp)?;
    std::fs::rename(&tmp, d.join("..data"))?;
    Ok(c.serial())
}

#[test]
fn certificates_from_files_work_and_are_reloaded_when_they_change() -> Result<()> {
    let mut lab = built_lab()?;
    let certs = lab.dir.join("certs");
    let ca = BuiltinCa::open(Some(&lab.dir.join("file-ca")), Lab::TRUST_DOMAIN, HOUR)?;
    for pod in ["a", "c", "e"] {
        write_cert_files(&ca, &certs, &lab.identity(pod), None)?;
    }
    lab.daemon_args =
        vec!["--cert-dir".into(), certs.display().to_string(), "--hbone-idle-timeout-secs".into(), "1".into()];
    lab.use_builtin_ca = false;
    lab.start_daemons()?;
    let _servers = smoke::start_servers(&lab)?;
    let x = send(&lab, "a", "c", Duration::from_secs(3))?;
    ensure!(x.echoed_intact && x.server_saw.ip() == x.client.ip());
    let client = x.client;
    let r = lab.wait_record(0, Duration::from_secs(3), |r| r.src == client)?.context("no record")?;
    ensure!(r.mtls, "a -> c was not tunnelled: {r:?}");
    let d_cert = ca.mint(&lab.identity("d"), HOUR)?;
    let dst = lab.addr("c", false, APP_PORT);

    // Rotated files are picked up: a fresh handshake shows the new certificate.
    let serial = write_cert_files(&ca, &certs, &lab.identity("c"), None)?;
    wait_until("node 2 to reload c's certificate", Duration::from_secs(6), || {
        Ok(std::fs::read_to_string(lab.daemon_log_path(1))?
            .lines()
            .any(|l| l.contains("renewed") && l.contains(&serial)))
    })?;
    let probed = probe_c(&lab, &d_cert, &[Probe::connect(dst)])?;
    ensure!(probed.server_serial == serial, "server presented {}, not the reloaded {serial}", probed.server_serial);
    wait_pool_empty(&lab, 0)?;
    ensure!(send(&lab, "a", "c", Duration::from_secs(3))?.echoed_intact, "traffic after the reload failed");

    // A broken key is refused and the last good certificate stays in use.
    let broken = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    write_cert_files(&ca, &certs, &lab.identity("c"), Some(broken))?;
    wait_until("node 2 to refuse the broken key", Duration::from_secs(6), || {
        Ok(std::fs::read_to_string(lab.daemon_log_path(1))?
            .lines()
            .any(|l| l.contains("renewing the workload certificate failed") && l.contains("private key unusable")))
    })?;
    let probed = probe_c(&lab, &d_cert, &[Probe::connect(dst)])?;
    ensure!(
        probed.server_serial == serial,
        "server presented {} after the broken update, not the last good {serial}",
        probed.server_serial
    );
    wait_pool_empty(&lab, 0)?;
    send(&lab, "a", "c", Duration::from_secs(3)).context("traffic with the last good certificate")?;
    Ok(())
}

/// Established TCP connections to the HBONE port in `node`'s namespace.
fn hbone_connections(lab: &Lab, node: usize) -> Result<usize> {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.nodes[node].name, "ss", "-Htn", "state", "established", "dport", "=", ":15008"])
        .output()?;
    ensure!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count())
}

#[test]
fn idle_hbone_connections_are_closed_after_the_timeout() -> Result<()> {
    let lab = started_lab_with(&["--hbone-idle-timeout-secs", "1"])?;
    let _servers = smoke::start_servers(&lab)?;
    for _ in 0..3 {
        send(&lab, "a", "c", Duration::from_secs(3))?;
    }
    ensure!(hbone_connections(&lab, 0)? == 1, "three sequential connections should share one HBONE connection");
    wait_until("the idle HBONE connection to close", Duration::from_secs(5), || Ok(hbone_connections(&lab, 0)? == 0))?;
    // And a new one opens on demand.
    send(&lab, "a", "c", Duration::from_secs(3))?;
    ensure!(hbone_connections(&lab, 0)? == 1);
    Ok(())
}
