//! `meshpath::inpod` in a real network namespace: istio-cni's in-pod chains (in both iptables
//! backends, IPv4 and IPv6) and a listener on ztunnel's in-pod port, made in a throwaway
//! namespace, are found; another owner's chain and listener are not. Needs root.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use meshpath::inpod::{Family, FoundChain, InpodTraces, inspect};

/// A network namespace of its own, deleted when dropped (also when the test fails).
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Result<Self> {
        let name = format!("mp-{tag}-{}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        Ok(Self(name))
    }

    fn path(&self) -> PathBuf {
        meshpath::netns::path_of(&self.0)
    }

    /// `tool args` inside the namespace.
    fn exec(&self, tool: &str, args: &[&str]) -> Result<()> {
        run("ip", &[&["netns", "exec", &self.0, tool][..], args].concat())
    }

    /// A socket listening on `[::]:port` inside the namespace (it stays there, whichever
    /// thread holds it).
    fn listen(&self, port: u16) -> Result<TcpListener> {
        let ns = self.0.clone();
        std::thread::spawn(move || -> Result<TcpListener> {
            meshpath::netns::enter(&ns)?;
            Ok(TcpListener::bind(("::", port))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the listening thread panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.0]) {
            eprintln!("removing network namespace {}: {e}", self.0);
        }
    }
}

fn run(tool: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(tool).args(args).output().with_context(|| format!("running {tool}"))?;
    ensure!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

fn chain(family: Family, table: &str, chain: &str) -> FoundChain {
    FoundChain { family, table: table.into(), chain: chain.into() }
}

#[test]
fn istio_in_pod_chains_and_listeners_are_found_in_a_pod_namespace() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "this test creates network namespaces: run it as root");
    let ns = Netns::new("inpod")?;
    let clean = inspect(&ns.path())?;
    ensure!(clean.is_empty(), "a fresh namespace: {clean}");

    // Another owner's chain and an application on its own port are no trace of Istio.
    ns.exec("iptables-nft", &["-t", "nat", "-N", "KUBE-SERVICES"])?;
    let _app = ns.listen(8080)?;
    let other = inspect(&ns.path())?;
    ensure!(other.is_empty(), "not Istio's: {other}");

    // istio-cni's chains, in whichever backend the host uses, and ztunnel's HBONE listener.
    ns.exec("iptables-nft", &["-t", "nat", "-N", "ISTIO_PRERT"])?;
    ns.exec("ip6tables-legacy", &["-t", "mangle", "-N", "ISTIO_OUTPUT"])?;
    let _ztunnel = ns.listen(15008)?;
    let traces = inspect(&ns.path())?;
    let want = InpodTraces {
        chains: [chain(Family::Ipv4, "nat", "ISTIO_PRERT"), chain(Family::Ipv6, "mangle", "ISTIO_OUTPUT")].into(),
        nft_tables: Default::default(),
        listeners: ["[::]:15008".parse::<SocketAddr>()?].into(),
    };
    ensure!(traces == want, "found {traces:?}\nwant {want:?}");
    let line = traces.to_string();
    ensure!(
        line.contains("IPv4 nat/ISTIO_PRERT") && line.contains("[::]:15008") && line.contains("restart the pod"),
        "{line}"
    );

    // A namespace that is not there is an error naming it, not a clean bill.
    let gone = ns.path().with_extension("gone");
    let err = inspect(&gone).expect_err("no such namespace").to_string();
    ensure!(err.contains(&gone.display().to_string()), "{err}");
    Ok(())
}
