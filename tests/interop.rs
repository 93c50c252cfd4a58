//! Interoperability with Istio's ztunnel, both ways, in a lab where pod c's side of the mesh
//! is a real ztunnel instead of meshpath. Needs a ztunnel binary built with its test CA
//! (`--features testing`), so it is ignored by default; `cargo xtask interop` runs it (as CI
//! does) with the ztunnel kept beside the checkout, checked against its `SHA256SUMS` first,
//! or by hand:
//!
//! ```text
//! MESHPATH_ZTUNNEL=/path/to/ztunnel MESHPATH_ZTUNNEL_SRC=/path/to/ztunnel-source \
//!     cargo test -p meshpath-lab --test interop -- --ignored
//! ```
//!
//! ztunnel runs in dedicated mode inside pod c's namespace (as it would inside a pod), with
//! its fake CA. meshpath's built-in CA is given that CA's root and key (the fixtures
//! `src/tls/root-cert.pem` and `src/tls/ca-key.pem` of ztunnel's source), so both sides
//! trust each other's certificates, and nothing else is shared.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use meshpath::identity::ca;
use meshpath::record::Outcome;
use meshpath_lab::smoke::APP_PORT;
use meshpath_lab::{Lab, traffic};

mod support;
use support::{built_lab, send};

/// ztunnel's SOCKS5 listener (enabled with UNSTABLE_ENABLE_SOCKS5), its way in for a client
/// without traffic capture.
const ZTUNNEL_SOCKS5: u16 = 15080;

struct Ztunnel(Child);

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_path(name: &str) -> Result<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .with_context(|| format!("{name} is not set (see the top of tests/interop.rs)"))
}

fn start_ztunnel(lab: &Lab, binary: &PathBuf) -> Result<Ztunnel> {
    let config = lab.dir.join("ztunnel.yaml");
    std::fs::write(&config, meshpath_lab::bench::paths::ztunnel::config(lab))?;
    let log = std::fs::File::create(lab.dir.join("ztunnel.log"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.pod("c").netns, "env"])
        .args([
            "FAKE_CA=true",
            "XDS_ADDRESS=",
            "PROXY_MODE=dedicated",
            "PROXY_WORKLOAD_INFO=lab/pod-c/sa-c",
            // Without in-pod routing for spoofed sources, ztunnel must connect from its own IP.
            "ENABLE_ORIG_SRC=false",
            "UNSTABLE_ENABLE_SOCKS5=true",
            "RUST_LOG=info",
        ])
        .arg(format!("LOCAL_XDS_PATH={}", config.display()))
        .arg(binary)
        .arg("proxy")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting ztunnel")?;
    let mut z = Ztunnel(child);
    let hbone = lab.addr("c", false, 15008);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = z.0.try_wait()? {
            bail!("ztunnel exited ({status}):\n{}", std::fs::read_to_string(lab.dir.join("ztunnel.log"))?);
        }
        let up = traffic::in_netns(&lab.pod("c").netns, || {
            TcpStream::connect_timeout(&hbone, Duration::from_millis(200)).is_ok()
        })?;
        if up {
            return Ok(z);
        }
        ensure!(Instant::now() < deadline, "ztunnel not listening on {hbone} after 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// From pod c, through ztunnel's SOCKS5 port, to `dst`: sends `payload`, half-closes, and
/// returns what came back.
fn via_socks5(lab: &Lab, dst: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    let IpAddr::V4(ip) = dst.ip() else { bail!("SOCKS5 helper speaks IPv4 only") };
    Ok(traffic::in_netns(&lab.pod("c").netns, || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", ZTUNNEL_SOCKS5))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(&[5, 1, 0])?;
        let mut hello = [0u8; 2];
        s.read_exact(&mut hello)?;
        let mut req = vec![5, 1, 0, 1];
        req.extend_from_slice(&ip.octets());
        req.extend_from_slice(&dst.port().to_be_bytes());
        s.write_all(&req)?;
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply)?;
        if reply[1] != 0 {
            return Err(std::io::Error::other(format!("SOCKS5 CONNECT refused with code {}", reply[1])));
        }
        s.write_all(payload)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    })??)
}

#[test]
#[ignore = "needs a ztunnel binary: MESHPATH_ZTUNNEL and MESHPATH_ZTUNNEL_SRC"]
fn meshpath_and_ztunnel_talk_hbone_both_ways() -> Result<()> {
    let binary = env_path("MESHPATH_ZTUNNEL")?;
    let src = env_path("MESHPATH_ZTUNNEL_SRC")?;
    let mut lab = built_lab()?;
    // meshpath's CA is ztunnel's test CA.
    std::fs::create_dir_all(lab.ca_dir())?;
    std::fs::copy(src.join("src/tls/root-cert.pem"), lab.ca_dir().join(ca::ROOT_CERT_FILE))?;
    std::fs::copy(src.join("src/tls/ca-key.pem"), lab.ca_dir().join(ca::ROOT_KEY_FILE))?;
    // Node 1 runs meshpath; pod c's side is ztunnel (node 2 runs no meshpath).
    lab.start_daemon(0)?;
    let _ztunnel = start_ztunnel(&lab, &binary)?;
    // Apps on a and c (ztunnel holds c's port 15008, so not the lab's usual set).
    let _servers = [
        traffic::EchoServer::start(&lab.pod("a").netns, APP_PORT)?,
        traffic::EchoServer::start(&lab.pod("c").netns, APP_PORT)?,
    ];

    // meshpath client -> ztunnel server: a's connection is tunnelled by node 1's meshpath.
    let x = send(&lab, "a", "c", Duration::from_secs(10)).context("a -> c through meshpath then ztunnel")?;
    ensure!(x.echoed_intact, "payload altered between meshpath and ztunnel");
    let client = x.client;
    let r = lab.wait_record(0, Duration::from_secs(3), |r| r.src == client)?.context("node 1 did not record a -> c")?;
    ensure!(r.mtls && r.outcome == Outcome::Ok && r.listener == "outbound", "node 1 recorded {r:?}");
    println!("meshpath -> ztunnel: {} bytes each way, app saw {}", r.bytes_sent, x.server_saw);

    // ztunnel client -> meshpath server: ztunnel tunnels to a:15008, node 1's meshpath
    // delivers to the app in a from c's address.
    let payload = traffic::payload(100_000);
    let dst = lab.addr("a", false, APP_PORT);
    let answer = via_socks5(&lab, dst, &payload).context("c -> a through ztunnel then meshpath")?;
    let text = String::from_utf8_lossy(&answer[..answer.len().min(40)]).into_owned();
    ensure!(answer.ends_with(&payload), "payload altered between ztunnel and meshpath (answer starts {text:?})");
    ensure!(text.starts_with(&format!("peer={}:", lab.pod("c").v4)), "the app in a saw {text:?}, not c's address");
    let r = lab
        .wait_record(0, Duration::from_secs(3), |r| r.listener == "hbone" && r.orig_dst == dst)?
        .context("node 1 did not record ztunnel's CONNECT")?;
    ensure!(r.outcome == Outcome::Ok && r.mtls, "node 1 recorded {r:?}");
    ensure!(
        r.src_identity.as_deref() == Some(lab.identity("c").to_string().as_str()),
        "ztunnel's identity: {:?}",
        r.src_identity
    );
    println!("ztunnel -> meshpath: {} bytes in, client identity {:?}", r.bytes_sent, r.src_identity);
    Ok(())
}
