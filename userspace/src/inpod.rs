//! Istio's in-pod redirection left behind in a pod's network namespace.
//!
//! Since Istio 1.21 istio-cni writes netfilter rules inside each ambient pod's network
//! namespace, and ztunnel opens its listeners there. Both outlive the components: a pod that
//! was running when a node moved from ztunnel to meshpath still redirects its traffic to
//! ports where nothing (or a dying ztunnel) listens. Capturing it again would capture it
//! twice; the daemon refuses such a pod with the one line [`InpodTraces`] displays, until the
//! pod is restarted.
//!
//! What is looked for, from istio/istio:
//! - iptables chains `ISTIO_PRERT` and `ISTIO_OUTPUT` in any table, IPv4 or IPv6
//!   (`cni/pkg/iptables/iptables.go`: `ChainInpodPrerouting`, `ChainInpodOutput`);
//! - nftables tables `inet istio-ambient-{nat,mangle,raw}` (`cni/pkg/nftables/nftables.go`,
//!   the native nftables backend);
//! - listening sockets on ztunnel's in-pod ports 15001, 15006, 15008
//!   (`cni/pkg/config/config.go`: `ZtunnelOutboundPort`, `ZtunnelInboundPlaintextPort`,
//!   `ZtunnelInboundPort`).
//!
//! [`detect`] is pure, over what the tools print; [`inspect`] gathers that inside a namespace.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use meshpath_common::names::{PORT_HBONE, PORT_INBOUND_PLAIN, PORT_OUTBOUND};

/// istio-cni's in-pod iptables chains.
pub const INPOD_CHAINS: [&str; 2] = ["ISTIO_PRERT", "ISTIO_OUTPUT"];
/// istio-cni's in-pod nftables tables (family `inet`).
pub const INPOD_NFT_TABLES: [&str; 3] = ["istio-ambient-nat", "istio-ambient-mangle", "istio-ambient-raw"];
/// ztunnel's listeners inside a pod (the same ports as meshpath's own, on the node).
pub const INPOD_PORTS: [u16; 3] = [PORT_OUTBOUND, PORT_INBOUND_PLAIN, PORT_HBONE];

/// The iptables dump tools tried per family: both backends, since istio-cni picks the one
/// the host uses; plain `*-save` only where neither variant is installed.
const SAVE_TOOLS: [(Family, [&str; 3]); 2] = [
    (Family::Ipv4, ["iptables-legacy-save", "iptables-nft-save", "iptables-save"]),
    (Family::Ipv6, ["ip6tables-legacy-save", "ip6tables-nft-save", "ip6tables-save"]),
];

#[derive(Debug, thiserror::Error)]
pub enum InpodError {
    #[error("network namespace {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("running {tool}: {source}")]
    Run { tool: String, source: io::Error },
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed { tool: String, status: std::process::ExitStatus, stderr: String },
    #[error("none of {0:?} is installed: the pod's {1} rules cannot be checked")]
    NoTool(Vec<&'static str>, Family),
    #[error("the thread inspecting {0} panicked")]
    Panicked(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

/// An iptables chain of istio-cni's, where it was found.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FoundChain {
    pub family: Family,
    pub table: String,
    pub chain: String,
}

/// What a namespace showed: each tool's output, as read inside it.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// `iptables-save`-format dumps, per family (one per backend tried).
    pub iptables_save: Vec<(Family, String)>,
    /// `nft list tables`, when nft is installed.
    pub nft_tables: Option<String>,
    /// `/proc/net/tcp` and `/proc/net/tcp6` of the namespace.
    pub proc_tcp: String,
    pub proc_tcp6: String,
}

/// The traces of Istio's in-pod redirection found in one namespace; empty when clean.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InpodTraces {
    pub chains: BTreeSet<FoundChain>,
    pub nft_tables: BTreeSet<String>,
    pub listeners: BTreeSet<SocketAddr>,
}

impl InpodTraces {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.nft_tables.is_empty() && self.listeners.is_empty()
    }

    /// Whether the pod's traffic is redirected in place: istio-cni's rules are there.
    /// Listeners alone do not say so: an app may use those ports, and ztunnel's in-pod
    /// sockets close with it while the rules stay.
    pub fn redirects(&self) -> bool {
        !self.chains.is_empty() || !self.nft_tables.is_empty()
    }
}

impl fmt::Display for InpodTraces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no trace of Istio's in-pod redirection");
        }
        let mut found = Vec::new();
        if !self.chains.is_empty() {
            let chains: Vec<String> =
                self.chains.iter().map(|c| format!("{} {}/{}", c.family, c.table, c.chain)).collect();
            found.push(format!("iptables chains {}", chains.join(", ")));
        }
        if !self.nft_tables.is_empty() {
            let tables: Vec<&str> = self.nft_tables.iter().map(String::as_str).collect();
            found.push(format!("nftables tables inet {}", tables.join(", inet ")));
        }
        if !self.listeners.is_empty() {
            let socks: Vec<String> = self.listeners.iter().map(SocketAddr::to_string).collect();
            found.push(format!("ztunnel's in-pod listeners {}", socks.join(", ")));
        }
        write!(
            f,
            "Istio's in-pod redirection is still in the pod's network namespace ({}): restart the pod to capture it",
            found.join("; ")
        )
    }
}

/// The traces in what a namespace showed.
pub fn detect(observed: &Observed) -> InpodTraces {
    let chains = observed.iptables_save.iter().flat_map(|(family, text)| inpod_chains(text, *family)).collect();
    let nft_tables = observed.nft_tables.as_deref().map(inpod_nft_tables).unwrap_or_default();
    let listeners = [(&observed.proc_tcp, false), (&observed.proc_tcp6, true)]
        .into_iter()
        .flat_map(|(t, v6)| inpod_listeners(t, v6))
        .collect();
    InpodTraces { chains, nft_tables, listeners }
}

/// istio-cni's chains in an `iptables-save` dump: declared as `:CHAIN POLICY [p:b]` under
/// `*table` (or `-N CHAIN`, as `iptables-restore` input has them).
pub fn inpod_chains(save: &str, family: Family) -> Vec<FoundChain> {
    let mut table = "";
    let mut out = Vec::new();
    for line in save.lines().map(str::trim) {
        let declared = if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
            None
        } else if let Some(rest) = line.strip_prefix(':') {
            rest.split_whitespace().next()
        } else {
            line.strip_prefix("-N ").map(str::trim)
        };
        if let Some(chain) = declared.filter(|c| INPOD_CHAINS.contains(c)) {
            out.push(FoundChain { family, table: table.to_owned(), chain: chain.to_owned() });
        }
    }
    out
}

/// istio-cni's tables in `nft list tables` (`table inet istio-ambient-nat` lines).
pub fn inpod_nft_tables(list: &str) -> BTreeSet<String> {
    list.lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            ["table", "inet", name] if INPOD_NFT_TABLES.contains(&name) => Some(name.to_owned()),
            _ => None,
        })
        .collect()
}

/// Listening sockets on ztunnel's in-pod ports in `/proc/net/tcp` (or `tcp6` with `v6`).
pub fn inpod_listeners(proc_tcp: &str, v6: bool) -> Vec<SocketAddr> {
    proc_tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Columns: sl, local_address, rem_address, st, ...; st 0A is LISTEN.
            (cols.get(3) == Some(&"0A")).then_some(())?;
            crate::status::parse_proc_addr(cols.get(1)?, v6)
        })
        .filter(|a| INPOD_PORTS.contains(&a.port()))
        .collect()
}

/// What the pod's network namespace at `netns` (e.g. `/run/netns/cni-…`) shows. Blocking:
/// it runs the dump tools, on a thread of its own that enters the namespace (so no other
/// thread's namespace changes).
pub fn inspect(netns: &Path) -> Result<InpodTraces, InpodError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(netns).map_err(|source| InpodError::Enter { path: netns.into(), source })?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| InpodError::Enter { path: netns.into(), source: e.into() })?;
            observe().map(|o| detect(&o))
        })
        .join()
        .map_err(|_| InpodError::Panicked(netns.into()))?
    })
}

/// Gathers [`Observed`] in the calling thread's network namespace (the tools it runs are
/// its children, and start in it).
fn observe() -> Result<Observed, InpodError> {
    let mut observed = Observed::default();
    for (family, tools) in SAVE_TOOLS {
        let installed: Vec<&str> = tools.iter().copied().filter(|t| installed(t)).collect();
        // The plain `*-save` is one of the two variants when both are there.
        let chosen: Vec<&str> = match installed[..] {
            [] => return Err(InpodError::NoTool(tools.to_vec(), family)),
            [only] => vec![only],
            _ => installed.into_iter().filter(|t| *t != tools[2]).collect(),
        };
        for tool in chosen {
            observed.iptables_save.push((family, run(tool, &[])?));
        }
    }
    if installed("nft") {
        observed.nft_tables = Some(run("nft", &["list", "tables"])?);
    }
    // thread-self: /proc/net is the process's (its main thread's) namespace, not this thread's.
    observed.proc_tcp = read_proc("/proc/thread-self/net/tcp")?;
    observed.proc_tcp6 = read_proc("/proc/thread-self/net/tcp6")?;
    Ok(observed)
}

/// A /proc file; absent (no IPv6 in this kernel) reads as empty.
fn read_proc(path: &str) -> Result<String, InpodError> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        other => other.map_err(|source| InpodError::Read { path: path.into(), source }),
    }
}

fn installed(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn run(tool: &str, args: &[&str]) -> Result<String, InpodError> {
    let out = Command::new(tool).args(args).output().map_err(|source| InpodError::Run { tool: tool.into(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(InpodError::ToolFailed { tool: tool.into(), status: out.status, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `iptables-save` prints for istio-cni's in-pod rules (istio/istio
    /// cni/pkg/iptables/testdata/default.golden, as iptables-save declares chains), with a
    /// chain of another owner.
    const SAVE: &str = "\
# Generated by iptables-save v1.8.9
*mangle
:PREROUTING ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:ISTIO_PRERT - [0:0]
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -j REDIRECT --to-ports 15006
COMMIT
";

    #[test]
    fn chains_are_found_with_their_table_and_family() {
        let found = inpod_chains(SAVE, Family::Ipv6);
        let got: Vec<(&str, &str)> = found.iter().map(|c| (c.table.as_str(), c.chain.as_str())).collect();
        assert_eq!(got, [("mangle", "ISTIO_OUTPUT"), ("mangle", "ISTIO_PRERT"), ("nat", "ISTIO_PRERT")]);
        assert!(found.iter().all(|c| c.family == Family::Ipv6));
        // The restore form istio-cni's golden files use.
        let restore = "* nat\n-N ISTIO_OUTPUT\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";
        assert_eq!(inpod_chains(restore, Family::Ipv4)[0].chain, "ISTIO_OUTPUT");
        assert_eq!(inpod_chains(restore, Family::Ipv4)[0].table, "nat");
    }

    #[test]
    fn a_namespace_without_istio_is_clean() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:ISTIO_PRERTX - [0:0]\n-A PREROUTING -j ISTIO_PRERT\nCOMMIT\n";
        let tcp = "  sl  local_address rem_address   st\n   0: 00000000:1F90 00000000:0000 0A 0\n";
        let observed = Observed {
            iptables_save: vec![(Family::Ipv4, save.into())],
            nft_tables: Some("table inet filter\ntable ip nat\n".into()),
            proc_tcp: tcp.into(),
            proc_tcp6: String::new(),
        };
        let traces = detect(&observed);
        assert!(traces.is_empty(), "{traces:?}");
        assert_eq!(traces.to_string(), "no trace of Istio's in-pod redirection");
    }

    #[test]
    fn nft_tables_and_listeners_are_found() {
        let tables = inpod_nft_tables(
            "table inet istio-ambient-nat\ntable inet istio-ambient-raw\ntable ip istio-ambient-nat\n",
        );
        assert_eq!(tables.into_iter().collect::<Vec<_>>(), ["istio-ambient-nat", "istio-ambient-raw"]);
        // 0.0.0.0:15008 listening, 127.0.0.1:15001 connected (not a listener), [::]:15006 listening.
        let tcp = "  sl  local_address rem_address   st\n\
                   0: 00000000:3AA0 00000000:0000 0A 0\n\
                   1: 0100007F:3A99 0100007F:D431 01 0\n";
        let tcp6 = "  sl  local_address rem_address   st\n\
                    0: 00000000000000000000000000000000:3A9E 00000000000000000000000000000000:0000 0A 0\n";
        let observed = Observed { proc_tcp: tcp.into(), proc_tcp6: tcp6.into(), ..Observed::default() };
        let listeners: Vec<String> = detect(&observed).listeners.iter().map(ToString::to_string).collect();
        assert_eq!(listeners, ["0.0.0.0:15008", "[::]:15006"]);
    }

    #[test]
    fn the_line_names_every_trace_and_what_to_do() {
        let observed = Observed {
            iptables_save: vec![(Family::Ipv4, SAVE.into())],
            nft_tables: Some("table inet istio-ambient-mangle\n".into()),
            proc_tcp: "h\n0: 00000000:3AA0 00000000:0000 0A 0\n".into(),
            proc_tcp6: String::new(),
        };
        let line = detect(&observed).to_string();
        assert_eq!(
            line,
            "Istio's in-pod redirection is still in the pod's network namespace (iptables chains IPv4 \
             mangle/ISTIO_OUTPUT, IPv4 mangle/ISTIO_PRERT, IPv4 nat/ISTIO_PRERT; nftables tables inet \
             istio-ambient-mangle; ztunnel's in-pod listeners 0.0.0.0:15008): restart the pod to capture it"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn only_rules_say_a_pod_is_redirected_in_place() {
        let listening = InpodTraces { listeners: ["[::]:15008".parse().unwrap()].into(), ..Default::default() };
        assert!(!listening.is_empty() && !listening.redirects(), "an app on 15008 is not istio-cni's rules");
        let nft = InpodTraces { nft_tables: ["istio-ambient-nat".to_string()].into(), ..Default::default() };
        assert!(nft.redirects());
    }
}
