//! Command line. Every flag is also an environment variable (`MESHPATH_*`), which is how a
//! DaemonSet sets them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::datapath::AttachMode;
use crate::node::{self, CertSource, NodeConfig};
use crate::proxy::PlaintextPolicy;

#[derive(Debug, Parser)]
#[command(name = "meshpath", version, about = "eBPF datapath and node proxy for an ambient service mesh")]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "MESHPATH_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// For `map`: JSON output. Taken before the command too, as `bpftool -j map ...`.
    #[arg(short = 'j', long)]
    pub json: bool,
    /// For `map`: pretty-printed JSON, as `bpftool -p map ...`.
    #[arg(short = 'p', long)]
    pub pretty: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon in the current network namespace.
    Node(NodeArgs),
    /// Remove every rule, route, attachment and pin meshpath made for a node (refused while a
    /// daemon serves it).
    Uninstall {
        /// Node whose datapath to remove.
        #[arg(long, env = "MESHPATH_NODE", default_value_t = hostname())]
        node: String,
    },
    /// Show what meshpath has attached, enrolled and registered for a node, and its counters.
    Status {
        #[arg(long, env = "MESHPATH_NODE", default_value_t = hostname())]
        node: String,
        /// The workload file, to name the workload behind each IP.
        #[arg(long, env = "MESHPATH_WORKLOADS")]
        workloads: Option<PathBuf>,
        /// The pod networks, as the daemon was given them: tells pod bridges from the node's.
        #[arg(long = "pod-cidr", env = "MESHPATH_POD_CIDRS", value_delimiter = ',')]
        pod_cidrs: Vec<IpNet>,
        #[arg(short = 'o', long, default_value = "text")]
        output: Output,
    },
    /// Close an open connection (`meshpath status` lists them): both sides are reset and its
    /// record says `cut`.
    Close {
        #[arg(long, env = "MESHPATH_NODE", default_value_t = hostname())]
        node: String,
        /// The daemon holding it (its pid), when several serve the node (a takeover).
        #[arg(long)]
        daemon: Option<u32>,
        /// The connection's number, as `status` shows it.
        id: u64,
    },
    /// Create a root for the built-in CA in a directory (root-cert.pem, root-key.pem), to
    /// share between nodes, e.g. as the meshpath-ca Secret.
    CaInit {
        /// Directory to create the root in; an existing root there is kept.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local", value_parser = parse_trust_domain)]
        trust_domain: String,
    },
    /// Show or dump BPF maps exactly as `bpftool map` does; --decode for meshpath's own.
    Map(crate::bpftool::MapArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Name of this node (the pin directory /sys/fs/bpf/meshpath/<node>).
    #[arg(long, env = "MESHPATH_NODE", default_value_t = hostname())]
    pub node: String,
    /// YAML file listing the enrolled workloads; changes are applied live. Without it,
    /// meshpath follows the Kubernetes API (KUBECONFIG, ~/.kube/config or in-cluster).
    #[arg(long, env = "MESHPATH_WORKLOADS")]
    pub workloads: Option<PathBuf>,
    /// Interfaces to classify on (default: every non-loopback interface, as they come).
    #[arg(long = "interface", env = "MESHPATH_INTERFACES", value_delimiter = ',')]
    pub interfaces: Vec<String>,
    /// Pod networks; outbound connections to them keep the client pod's source IP.
    #[arg(long = "pod-cidr", env = "MESHPATH_POD_CIDRS", value_delimiter = ',')]
    pub pod_cidrs: Vec<IpNet>,
    /// Where pods' network namespaces are pinned (ip netns, containerd, CRI-O): behind a pod
    /// bridge (flannel's cni0), each pod's port is read from its namespace.
    #[arg(long, env = "MESHPATH_NETNS_DIR", default_value = "/run/netns")]
    pub netns_dir: PathBuf,
    /// Append one JSON line per finished connection to this file.
    #[arg(long, env = "MESHPATH_ACCESS_LOG")]
    pub access_log: Option<PathBuf>,
    #[arg(long, env = "MESHPATH_READINESS_PORT", default_value_t = meshpath_common::names::PORT_READINESS)]
    pub readiness_port: u16,
    /// Port of the Prometheus endpoint (`/metrics`), on every address of the node.
    #[arg(long, env = "MESHPATH_METRICS_PORT", default_value_t = meshpath_common::names::PORT_METRICS)]
    pub metrics_port: u16,
    /// How often the workload file is checked for changes (the kernel's interfaces and routes
    /// are followed by notification).
    #[arg(long, env = "MESHPATH_POLL_INTERVAL_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub poll_interval_ms: u64,
    /// Timeout for upstream connects.
    #[arg(long, env = "MESHPATH_CONNECT_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub connect_timeout_secs: u64,
    /// How to attach the TC classifier: TCX where the kernel has it (auto), or force one.
    #[arg(long, env = "MESHPATH_TC_ATTACH", default_value = "auto")]
    pub tc_attach: TcAttach,
    /// Trust domain of workload identities (spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
    #[arg(long, env = "MESHPATH_TRUST_DOMAIN", default_value = "cluster.local", value_parser = parse_trust_domain)]
    pub trust_domain: String,
    /// Built-in CA: directory of its root (root-cert.pem, root-key.pem), created there if
    /// absent. Without it (and without --cert-dir) the root lives in memory and only this
    /// node trusts it.
    #[arg(long, env = "MESHPATH_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Read workload certificates from <dir>/<namespace>/<service-account>/ instead of
    /// minting them (cert-chain.pem, key.pem, root-cert.pem; reloaded when they change).
    #[arg(long, env = "MESHPATH_CERT_DIR", conflicts_with = "ca_dir")]
    pub cert_dir: Option<PathBuf>,
    /// Lifetime of certificates the built-in CA mints; they are renewed at half-life.
    #[arg(long, env = "MESHPATH_CERT_TTL_SECS", default_value_t = 24 * 3600, value_parser = clap::value_parser!(u64).range(10..=365 * 24 * 3600))]
    pub cert_ttl_secs: u64,
    /// Plaintext connections to enrolled pods: deliver them (permissive) or refuse them (strict).
    #[arg(long, env = "MESHPATH_INBOUND_PLAINTEXT", default_value = "permissive")]
    pub inbound_plaintext: PlaintextPolicy,
    /// Run only the proxy, without loading or touching the datapath: connections must reach
    /// its listeners some other way. For the benchmarks' iptables baselines (TPROXY rules
    /// deliver to the same proxy); not for a node (docs/benchmarks.md).
    #[arg(long, env = "MESHPATH_PROXY_ONLY", hide = true)]
    pub proxy_only: bool,
    /// Connections (and HBONE streams) the proxy holds at once; more are refused and counted
    /// (`meshpath_connections_failed_total{reason="over_limit"}`). Default: what the open-files
    /// limit (raised to its hard limit) holds, two per connection, after 512 for the daemon.
    #[arg(long, env = "MESHPATH_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
    /// Of those, how many one client address may hold. Default: an eighth of --max-connections.
    #[arg(long, env = "MESHPATH_MAX_CONNECTIONS_PER_SOURCE", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections_per_source: Option<u64>,
    /// Close HBONE connections that carried no stream for this long.
    #[arg(long, env = "MESHPATH_HBONE_IDLE_TIMEOUT_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub hbone_idle_timeout_secs: u64,
    /// On SIGTERM, how long open connections and HBONE streams may finish (new ones are
    /// refused at once, until a successor serves); keep it under the pod's
    /// terminationGracePeriodSeconds. 0 exits at once, cutting them.
    #[arg(long, env = "MESHPATH_DRAIN_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub drain_timeout_secs: u64,
    /// How long a workload IP that leaves the desired state stays captured, in case it comes
    /// back (a file written in place, a watch relisting); released at once when its pod's
    /// interface or namespace is gone, or another pod takes the address. 0 releases at once.
    #[arg(long, env = "MESHPATH_RELEASE_HOLD_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=300))]
    pub release_hold_secs: u64,
}

fn parse_trust_domain(s: &str) -> Result<String, String> {
    crate::identity::Identity::new(s, "ns", "sa")
        .to_string()
        .parse::<crate::identity::Identity>()
        .map(|_| s.to_owned())
        .map_err(|_| format!("{s:?} is not a trust domain (letters, digits, '-', '.', '_')"))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TcAttach {
    Auto,
    Tcx,
    /// clsact qdisc + cls_bpf filter over netlink (kernels before 6.6).
    Netlink,
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

pub fn init_tracing(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only for a terminal: files and container logs get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if (cli.json || cli.pretty) && !matches!(cli.command, Command::Map(_)) {
        anyhow::bail!("-j/--json and -p/--pretty apply to `meshpath map` (status takes -o json)");
    }
    match cli.command {
        Command::Node(a) => {
            let cfg = NodeConfig {
                node: a.node,
                source: match a.workloads {
                    Some(path) => node::source::Source::File(path),
                    None => node::source::Source::Kubernetes,
                },
                interfaces: a.interfaces,
                pod_cidrs: a.pod_cidrs,
                netns_dir: a.netns_dir,
                access_log: a.access_log,
                readiness_port: a.readiness_port,
                metrics_port: a.metrics_port,
                poll_interval: Duration::from_millis(a.poll_interval_ms),
                connect_timeout: Duration::from_secs(a.connect_timeout_secs),
                attach_mode: match a.tc_attach {
                    TcAttach::Auto => AttachMode::detect(),
                    TcAttach::Tcx => AttachMode::Tcx,
                    TcAttach::Netlink => AttachMode::Netlink,
                },
                trust_domain: a.trust_domain,
                certificates: match a.cert_dir {
                    Some(dir) => CertSource::Files { dir },
                    None => CertSource::BuiltinCa { dir: a.ca_dir, ttl: Duration::from_secs(a.cert_ttl_secs) },
                },
                plaintext: a.inbound_plaintext,
                hbone_idle_timeout: Duration::from_secs(a.hbone_idle_timeout_secs),
                drain_timeout: Duration::from_secs(a.drain_timeout_secs),
                release_hold: Duration::from_secs(a.release_hold_secs),
                max_connections: a.max_connections.map(|n| n as usize),
                max_connections_per_source: a.max_connections_per_source.map(|n| n as usize),
                proxy_only: a.proxy_only,
            };
            let rt = runtime()?;
            let stop = shutdown_signal(&rt);
            rt.block_on(node::run(cfg, stop))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall { node } => {
            let report = runtime()?.block_on(node::uninstall(&node))?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { node, workloads, pod_cidrs, output } => {
            let status = runtime()?.block_on(crate::status::collect(&node, workloads.as_deref(), &pod_cidrs))?;
            match output {
                Output::Text => print!("{}", status.text()),
                Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Close { node, daemon, id } => {
            println!("{}", runtime()?.block_on(crate::status::close(&node, id, daemon))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::CaInit { dir, trust_domain } => {
            let existed = dir.join(crate::identity::ca::ROOT_KEY_FILE).exists();
            crate::identity::ca::BuiltinCa::open(Some(&dir), &trust_domain, Duration::from_secs(3600))?;
            let verb = if existed { "kept the existing" } else { "created a" };
            println!(
                "{verb} CA root in {} ({} and {}, the key readable by its owner only)",
                dir.display(),
                crate::identity::ca::ROOT_CERT_FILE,
                crate::identity::ca::ROOT_KEY_FILE
            );
            Ok(ExitCode::SUCCESS)
        }
        // Reports its own errors, in bpftool's shape.
        Command::Map(mut a) => {
            a.json |= cli.json;
            a.pretty |= cli.pretty;
            Ok(crate::bpftool::run(a))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed now (inside the runtime), so
/// a signal that comes while the daemon is still starting is not the default kill.
fn shutdown_signal(rt: &tokio::runtime::Runtime) -> impl Future<Output = ()> + use<> {
    use tokio::signal::unix::{SignalKind, signal};
    let _in = rt.enter();
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "shutting down");
    }
}
