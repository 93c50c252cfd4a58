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
