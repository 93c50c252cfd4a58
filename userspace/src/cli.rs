//! Command line. Every flag is also an environment variable (`MESHPATH_*`), which is how a
//! DaemonSet sets them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::flags;
use crate::node::{self, NodeConfig};

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
    Node(Box<NodeConfig>),
    /// Remove every rule, route, attachment and pin meshpath made for a node (refused while a
    /// daemon serves it).
    Uninstall {
        /// Node whose datapath to remove.
        #[arg(long, env = "MESHPATH_NODE", default_value_t = flags::hostname())]
        node: String,
    },
    /// Show what meshpath has attached, enrolled and registered for a node, and its counters.
    Status {
        #[arg(long, env = "MESHPATH_NODE", default_value_t = flags::hostname())]
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
        #[arg(long, env = "MESHPATH_NODE", default_value_t = flags::hostname())]
        node: String,
        /// The daemon holding it (its pid), when several serve the node (a takeover).
        #[arg(long)]
        daemon: Option<u32>,
        /// The connection's number, as `status` shows it.
        id: u64,
    },
    /// The authorization policies a daemon holds: with --from and --to, whether a connection
    /// from that source to that destination would pass now, and which policy decides.
    Policy {
        #[arg(long, env = "MESHPATH_NODE", default_value_t = flags::hostname())]
        node: String,
        /// The daemon to ask (its pid), when several serve the node (a takeover).
        #[arg(long)]
        daemon: Option<u32>,
        /// The source address (a known workload's identity is taken; any other is plaintext).
        #[arg(long, requires = "to")]
        from: Option<IpAddr>,
        /// The destination, `IP:port` (the workload's own port, not 15008).
        #[arg(long, requires = "from")]
        to: Option<SocketAddr>,
        #[arg(short = 'o', long, default_value = "text")]
        output: Output,
    },
    /// Create a root for the built-in CA in a directory (root-cert.pem, root-key.pem), to
    /// share between nodes, e.g. as the meshpath-ca Secret.
    CaInit {
        /// Directory to create the root in; an existing root there is kept.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local", value_parser = flags::trust_domain)]
        trust_domain: String,
    },
    /// Show or dump BPF maps exactly as `bpftool map` does; --decode for meshpath's own.
    Map(crate::bpftool::MapArgs),
    /// Install or remove the chained CNI plugin that holds each new pod of the mesh until
    /// the node's daemon has it.
    #[command(subcommand)]
    Cni(CniCommand),
}

#[derive(Debug, Subcommand)]
pub enum CniCommand {
    /// Copy `meshpath-cni` into the CNI bin dir and chain it into the pod network's
    /// configuration (the first file of the conf dir); with --watch, keep it chained.
    Install(CniInstall),
    /// Take `meshpath-cni` out of every configuration of the conf dir, and remove its binary
    /// and kubeconfig.
    Uninstall {
        #[arg(long, env = "MESHPATH_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, env = "MESHPATH_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct CniInstall {
    #[arg(long, env = "MESHPATH_NODE", default_value_t = flags::hostname())]
    pub node: String,
    #[arg(long, env = "MESHPATH_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    #[arg(long, env = "MESHPATH_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The plugin decides from this workload file (a node without Kubernetes)...
    #[arg(long, env = "MESHPATH_WORKLOADS", conflicts_with = "kubeconfig")]
    pub workloads: Option<PathBuf>,
    /// ...or from the API server through this kubeconfig. Without either, one is written
    /// into the conf dir from this pod's service account.
    #[arg(long, env = "MESHPATH_CNI_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces whose pods are never held (nor looked up).
    #[arg(long, env = "MESHPATH_CNI_EXCLUDE_NAMESPACES", value_delimiter = ',', default_value = "kube-system")]
    pub exclude_namespaces: Vec<String>,
    /// How long an ADD waits for the daemon (and the API server) before it fails.
    #[arg(long, env = "MESHPATH_CNI_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout_secs: u64,
    /// The plugin binary to install.
    #[arg(long, env = "MESHPATH_CNI_PLUGIN", default_value_os_t = sibling_plugin())]
    pub plugin: PathBuf,
    /// Keep running, and chain the plugin again whenever the pod network rewrites its file.
    #[arg(long, env = "MESHPATH_CNI_WATCH")]
    pub watch: bool,
}

/// `meshpath-cni` beside this binary.
fn sibling_plugin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.with_file_name(meshpath_common::names::CNI_PLUGIN)
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Text,
    Json,
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
        Command::Node(cfg) => {
            let rt = runtime()?;
            let stop = shutdown_signal(&rt);
            rt.block_on(node::run(*cfg, stop))?;
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
        Command::Policy { node, daemon, from, to, output } => policy(&node, daemon, from.zip(to), output),
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
        Command::Cni(CniCommand::Install(i)) => cni_install(i),
        Command::Cni(CniCommand::Uninstall { bin_dir, conf_dir }) => {
            let removed = crate::cni::install::uninstall(&bin_dir, &conf_dir)?;
            if removed.is_empty() {
                println!("meshpath-cni was not installed in {} or {}", bin_dir.display(), conf_dir.display());
            }
            for path in removed {
                println!("removed meshpath-cni from {}", path.display());
            }
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

/// `meshpath policy`: the local workloads' policies, or one decision (exit status 1 when
/// denied, so scripts can use it).
fn policy(
    node: &str,
    daemon: Option<u32>,
    check: Option<(IpAddr, SocketAddr)>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let Some((from, to)) = check else {
        let policies = rt.block_on(crate::status::workload_policies(node, daemon))?;
        match output {
            Output::Text if policies.iter().all(|w| w.policies.is_empty()) => {
                println!("no authorization policy applies to a workload of node {node}")
            }
            Output::Text => print!("{}", crate::status::policies_text(&policies)),
            Output::Json => println!("{}", serde_json::to_string_pretty(&policies)?),
        }
        return Ok(ExitCode::SUCCESS);
    };
    let d = rt.block_on(crate::status::check(node, daemon, from, to))?;
    match output {
        Output::Text => {
            let who = d.from_identity.as_deref().unwrap_or("plaintext (no identity)");
            let deciding = d.deciding.as_deref().map(|p| format!(" (policy {p})")).unwrap_or_default();
            println!("{from} ({who}) -> {to}: {}{deciding}", d.decision);
            for dry in &d.dry_run {
                println!("  dry-run: {dry}");
            }
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(&d)?),
    }
    Ok(if d.allowed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `meshpath cni install`: once, or (`--watch`) until SIGTERM, leaving the plugin chained:
/// pods of the mesh must not start uncaptured while the daemon restarts.
fn cni_install(i: CniInstall) -> anyhow::Result<ExitCode> {
    use crate::cni::install::{self, Decider, InstallConfig};
    crate::datapath::validate_node_name(&i.node)?;
    let decider = match (i.workloads, i.kubeconfig) {
        (Some(w), _) => Decider::Workloads(w),
        (None, Some(k)) => Decider::Kubeconfig(k),
        (None, None) => Decider::ServiceAccount,
    };
    let cfg = InstallConfig {
        node: i.node,
        bin_dir: i.bin_dir,
        conf_dir: i.conf_dir,
        decider,
        exclude_namespaces: i.exclude_namespaces,
        timeout_secs: i.timeout_secs,
        plugin: i.plugin,
    };
    let rt = runtime()?;
    let stop = shutdown_signal(&rt);
    let (trigger, watcher) = crate::drain::new();
    rt.block_on(async {
        tokio::spawn(async move {
            stop.await;
            trigger.start(crate::drain::Mode::Immediate);
        });
        install::run(&cfg, i.watch, watcher).await
    })?;
    Ok(ExitCode::SUCCESS)
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
