//! `meshpath-lab`: runs meshpath in the lab of network namespaces, checks it (`smoke`),
//! benchmarks it (`bench`) and sweeps what crashed runs left (`cleanup`). `cargo xtask run`,
//! `lab` and `bench` drive it.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use meshpath_lab::lab::{CONTROL_PLANE_ENV, MESHPATH_BIN_ENV, TOPOLOGY_ENV, TRY_PORT};
use meshpath_lab::{Lab, Topology, bench, frontends, smoke, traffic, upgrade};

#[derive(Parser)]
#[command(name = "meshpath-lab", about = "meshpath in a two-node lab of network namespaces")]
struct Cli {
    /// The meshpath binary the lab's nodes run (default: the one next to this binary).
    #[arg(long, global = true, env = MESHPATH_BIN_ENV)]
    meshpath: Option<PathBuf>,
    /// How the lab's nodes are joined, for `run` and `smoke` (the benchmarks use routed).
    #[arg(long, global = true, value_enum, default_value_t, env = TOPOLOGY_ENV)]
    topology: Topology,
    /// Who describes the mesh to the nodes, for `run`, `smoke` and `upgrade`: the workload
    /// file (standalone), or the lab's API server and a fake istiod (istiod).
    #[arg(long, global = true, value_enum, default_value_t, env = CONTROL_PLANE_ENV)]
    control_plane: ControlPlane,
    #[command(subcommand)]
    command: Command,
}

/// The lab's control plane.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
enum ControlPlane {
    #[default]
    Standalone,
    Istiod,
}

#[derive(Subcommand)]
enum Command {
    /// Build the lab, run meshpath on both nodes until Ctrl-C, then tear everything down.
    Run,
    /// Build the lab, send traffic in every direction, print what went where, tear down;
    /// a non-zero exit on any failure.
    Smoke,
    /// Build the lab and take each node's daemon over under load (new connections and
    /// long-lived streams on every path, every byte checked); print what failed, tear down.
    Upgrade,
    /// Remove the namespaces and pins that crashed labs left behind.
    Cleanup,
    /// (For the soak.) Opens connections from network namespace NETNS to ADDR, echoes a byte
    /// on each, prints `held N`, and holds them until stdin closes. A process of its own:
    /// the held sockets do not count against the lab's open-files limit.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// (For the hostile tests, run as another user.) Tries to reach each path as the calling
    /// user: a socket is connected to, a file opened and locked shared. Prints one line per
    /// path: `reached`, `denied` (no permission) or `error: ...`.
    #[command(hide = true)]
    Reach {
        #[arg(long)]
        file: Vec<PathBuf>,
        #[arg(long)]
        socket: Vec<PathBuf>,
    },
    /// Measure meshpath's capture against the iptables designs it replaces and no proxy at
    /// all, in dedicated labs; write BENCHMARKS.md and its chart.
    Bench {
        /// Three short rounds at 10 workloads only.
        #[arg(long, conflicts_with = "soak")]
        quick: bool,
        /// The soak instead: a minute of churn per path, 10 000 connections held, idle CPU and
        /// memory, memory after the load (its own section of BENCHMARKS.md).
        #[arg(long)]
        soak: bool,
        /// With --soak: seconds of churn per path.
        #[arg(long, default_value_t = 60, requires = "soak")]
        churn_secs: u64,
        /// With --soak: connections held per path.
        #[arg(long, default_value_t = 10_000, requires = "soak")]
        held: usize,
        /// L4 authorization instead: new HBONE connections per second under the lab's istiod
        /// with no policy, 10 000 elsewhere and 10 000 GLOBAL DENY (its own section of
        /// BENCHMARKS.md); ztunnel's rows too with MESHPATH_ZTUNNEL set.
        #[arg(long, conflicts_with_all = ["soak", "quick"])]
        policies: bool,
        /// With --policies: seconds per measurement.
        #[arg(long, default_value_t = 20, requires = "policies")]
        policy_secs: u64,
        /// With --policies: rounds over every configuration.
        #[arg(long, default_value_t = 3, requires = "policies")]
        policy_rounds: usize,
        /// The CNI plugin instead: the time of its ADD for new pods in and outside the mesh
        /// (its own section of BENCHMARKS.md).
        #[arg(long, conflicts_with_all = ["soak", "quick", "policies"])]
        cni: bool,
        /// With --cni: new pods of each kind.
        #[arg(long, default_value_t = 200, requires = "cni")]
        cni_pods: usize,
        #[arg(long, default_value = "BENCHMARKS.md")]
        out: PathBuf,
        /// The chart (SVG), written next to `out`.
        #[arg(long, default_value = "benchmarks.svg")]
        chart: String,
        /// The raw samples as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshpath-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Command::Reach { file, socket } = &cli.command {
        meshpath_lab::hostile::print_reach(file, socket);
        return Ok(ExitCode::SUCCESS);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab creates network namespaces and loads eBPF programs: run it as root");
    }
    raise_fd_limit();
    if let Command::Hold { netns, to, count } = &cli.command {
        return bench::soak::hold_here(netns, *to, *count).map(|()| ExitCode::SUCCESS);
    }
    if let Command::Cleanup = cli.command {
        let removed = meshpath_lab::sweep()?;
        println!(
            "removed {} leftover(s){}",
            removed.len(),
            removed.iter().map(|r| format!("\n  {r}")).collect::<String>()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let bin = match cli.meshpath {
        Some(b) => b,
        None => meshpath_lab::meshpath_binary()?,
    };
    match cli.command {
        Command::Run => run_lab(&bin, cli.topology, cli.control_plane),
        Command::Smoke => run_smoke(&bin, cli.topology, cli.control_plane),
        Command::Upgrade => run_upgrade(&bin, cli.topology, cli.control_plane),
        Command::Bench { soak: true, out, json, churn_secs, held, .. } => {
            let cfg = bench::soak::SoakConfig { churn: Duration::from_secs(churn_secs), held, ..Default::default() };
            run_soak(&bin, &cfg, &out, json.as_deref())
        }
        Command::Bench { policies: true, out, json, policy_secs, policy_rounds, .. } => {
            let cfg = bench::policies::PolicyConfig {
                duration: Duration::from_secs(policy_secs),
                rounds: policy_rounds,
                ..Default::default()
            };
            run_policies(&bin, &cfg, &out, json.as_deref())
        }
        Command::Bench { cni: true, cni_pods, out, json, .. } => {
            run_cni(&bin, &bench::cni::CniConfig { pods: cni_pods }, &out, json.as_deref())
        }
        Command::Bench { quick, out, chart, json, .. } => run_bench(&bin, quick, &out, &chart, json.as_deref()),
        Command::Cleanup | Command::Hold { .. } | Command::Reach { .. } => unreachable!("handled above"),
    }
}

fn run_lab(bin: &Path, topology: Topology, control_plane: ControlPlane) -> Result<ExitCode> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    // Listening from the start: Ctrl-C while the lab is being built still tears it down.
    let stop = rt.block_on(async { StopSignals::install() })?;
    let mut lab = build_and_start(bin, topology, control_plane)?;
    let servers = lab
        .pods
        .iter()
        .map(|p| traffic::EchoServer::start_http(&p.netns, TRY_PORT))
        .collect::<std::io::Result<Vec<_>>>()
        .context("starting the pods' HTTP servers")?;
    frontends::install(&lab, TRY_PORT).context("installing the kube-proxy-like NAT rules")?;
    println!("{}", lab.describe());
    println!("every pod serves HTTP on port {TRY_PORT}. Try, as root, in another shell:");
    for t in lab.try_commands() {
        println!("\n  {}:\n  $ {}\n    {}", t.what, t.command, t.shows);
    }
    println!(
        "\naccess logs (a JSON line per connection): {} and {}",
        lab.access_log_path(0).display(),
        lab.access_log_path(1).display()
    );
    println!("meshpath runs in both nodes; press Ctrl-C to stop and tear the lab down.");
    let which = rt.block_on(stop.wait());
    eprintln!("{which}: tearing the lab down...");
    drop(servers);
    report_teardown(&mut lab);
    Ok(ExitCode::SUCCESS)
}

fn run_smoke(bin: &Path, topology: Topology, control_plane: ControlPlane) -> Result<ExitCode> {
    let mut lab = build_and_start(bin, topology, control_plane)?;
    eprintln!("sending traffic...");
    let smoke::Smoke { mut outcomes, evidence } = smoke::run_all(&lab)?;
    eprintln!("taking both nodes over under load...");
    let takeover = upgrade::run(&mut lab, &upgrade::UpgradeConfig::small(), |l| eprintln!("  {l}"))?;
    outcomes.extend(takeover.rows());
    println!("{}", smoke::table(&outcomes));
    print!("{}", takeover.table());
    println!("TLS evidence (capture on node 1's underlay while a -> c ran): {}", evidence.summary());
    for i in 0..lab.nodes.len() {
        println!("node {} datapath counters: {}", i + 1, serde_json::to_string(&lab.counters(i)?)?);
    }
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    eprintln!("tearing the lab down...");
    let clean = report_teardown(&mut lab);
    println!("{} passed, {} failed", outcomes.len() - failed, failed);
    Ok(if failed == 0 && clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn run_upgrade(bin: &Path, topology: Topology, control_plane: ControlPlane) -> Result<ExitCode> {
    let mut lab = build_and_start(bin, topology, control_plane)?;
    let started = Instant::now();
    let progress = |l: &str| eprintln!("[{:>5.1}s] {l}", started.elapsed().as_secs_f64());
    progress("load on every path: new connections and long-lived streams (plain and HBONE, IPv4 and IPv6)");
    let report = upgrade::run(&mut lab, &upgrade::UpgradeConfig::full(), progress)?;
    println!("{}", report.table());
    eprintln!("tearing the lab down...");
    let clean = report_teardown(&mut lab);
    let ok = report.ok();
    println!("{}", if ok { "takeovers: 0 failed, 0 reset, 0 bytes lost" } else { "takeovers: FAILED (see the table)" });
    Ok(if ok && clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn build_and_start(bin: &Path, topology: Topology, control_plane: ControlPlane) -> Result<Lab> {
    eprintln!("building the lab (2 nodes, 5 pods, {} topology)...", topology.name());
    let mut lab = Lab::build_with(bin, topology)?;
    if let ControlPlane::Istiod = control_plane {
        eprintln!("starting the lab's API server and istiod (fake): workloads, services and certificates from xDS...");
        lab.start_cluster()?;
        lab.start_istiod()?;
    }
    eprintln!("starting meshpath on both nodes...");
    lab.start_daemons()?;
    if let ControlPlane::Istiod = control_plane {
        eprintln!("waiting for istiod to tell every node that the enrolled pods speak HBONE...");
        lab.wait_mesh_synced(Duration::from_secs(20))?;
    }
    eprintln!("starting the pods as a container runtime would: meshpath-cni chained after the pod network (ADD)...");
    for (pod, run) in lab.cni_add_all()? {
        let what = if lab.pod(pod).enrolled { "enrolled" } else { "not in the mesh, left alone" };
        eprintln!("  pod {pod}: {what} ({} ms)", run.took.as_millis());
    }
    Ok(lab)
}

/// Tears the lab down, printing what could not be removed; whether it all went.
fn report_teardown(lab: &mut Lab) -> bool {
    let problems = lab.teardown();
    for p in &problems {
        eprintln!("teardown: {p}");
    }
    problems.is_empty()
}

fn run_bench(bin: &Path, quick: bool, out: &Path, chart: &str, json: Option<&Path>) -> Result<ExitCode> {
    let cfg = if quick { bench::BenchConfig::quick(bin.to_owned()) } else { bench::BenchConfig::full(bin.to_owned()) };
    let started = Instant::now();
    let samples = bench::run(&cfg, |line| eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64()))?;
    let command = if quick { "cargo xtask bench --quick" } else { "cargo xtask bench" };
    // The hand-written analysis below the marker survives a new run.
    let analysis = std::fs::read_to_string(out)
        .ok()
        .and_then(|old| old.split_once(bench::ANALYSIS_MARKER).map(|(_, tail)| tail.to_owned()))
        .unwrap_or_else(|| "\n(no analysis written yet)\n".to_owned());
    let mut doc = format!("{}\n{}{analysis}", bench::document(&cfg, &samples, command, chart), bench::ANALYSIS_MARKER);
    // The soak's and the policies' sections are other commands': kept as they were.
    let old = std::fs::read_to_string(out).unwrap_or_default();
    if let Some(section) = bench::soak::section_of(&old) {
        doc = bench::soak::with_section(&doc, section, bench::ANALYSIS_MARKER);
    }
    for marks in [
        (bench::policies::SECTION_START, bench::policies::SECTION_END),
        (bench::cni::SECTION_START, bench::cni::SECTION_END),
    ] {
        if let Some(section) = bench::report::section_of(&old, marks) {
            doc = bench::report::with_section(&doc, marks, section, bench::ANALYSIS_MARKER);
        }
    }
    std::fs::write(out, doc).with_context(|| format!("writing {}", out.display()))?;
    let chart_path = out.parent().unwrap_or(Path::new(".")).join(chart);
    std::fs::write(&chart_path, bench::report::svg_chart(&samples, cfg.sizes[0]))
        .with_context(|| format!("writing {}", chart_path.display()))?;
    if let Some(j) = json {
        std::fs::write(j, serde_json::to_string_pretty(&samples)?)
            .with_context(|| format!("writing {}", j.display()))?;
    }
    let peer = bench::report::peer_section(&samples, cfg.sizes[0]);
    println!("{}{peer}", bench::report::markdown(&samples, &cfg.sizes, cfg.rounds));
    eprintln!("wrote {} and {} in {:.0}s", out.display(), chart_path.display(), started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn run_soak(bin: &Path, cfg: &bench::soak::SoakConfig, out: &Path, json: Option<&Path>) -> Result<ExitCode> {
    use bench::{PathKind, paths::Setup, soak};
    let started = Instant::now();
    let progress = |line: &str| eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
    let kinds: Vec<PathKind> = PathKind::available()
        .into_iter()
        .filter(|k| {
            matches!(
                k,
                PathKind::Direct
                    | PathKind::Legacy
                    | PathKind::Meshpath
                    | PathKind::MeshpathHbone
                    | PathKind::ZtunnelHbone
            )
        })
        .collect();
    let mut setups = Vec::new();
    for kind in kinds {
        progress(&format!("building the {} lab", kind.name()));
        setups.push(Setup::build(kind, bin)?);
    }
    let samples = soak::run(&mut setups, cfg, progress)?;
    for s in setups {
        s.teardown()?;
    }
    let date = utc_now();
    let section = soak::markdown(&samples, cfg, &date);
    let old = std::fs::read_to_string(out).unwrap_or_else(|_| format!("# Benchmarks\n\n{}\n", bench::ANALYSIS_MARKER));
    std::fs::write(out, soak::with_section(&old, &section, bench::ANALYSIS_MARKER))
        .with_context(|| format!("writing {}", out.display()))?;
    if let Some(j) = json {
        std::fs::write(j, serde_json::to_string_pretty(&samples)?)
            .with_context(|| format!("writing {}", j.display()))?;
    }
    println!("{section}");
    eprintln!("wrote the soak section of {} in {:.0}s", out.display(), started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn run_policies(bin: &Path, cfg: &bench::policies::PolicyConfig, out: &Path, json: Option<&Path>) -> Result<ExitCode> {
    use bench::policies;
    let started = Instant::now();
    let progress = |line: &str| eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
    let report = policies::run(bin, cfg, progress)?;
    let section = policies::markdown(&report, cfg, &bench::machine(), &utc_now());
    let marks = (policies::SECTION_START, policies::SECTION_END);
    write_section(out, marks, &section, json, &report)?;
    eprintln!("wrote the policies' section of {} in {:.0}s", out.display(), started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn run_cni(bin: &Path, cfg: &bench::cni::CniConfig, out: &Path, json: Option<&Path>) -> Result<ExitCode> {
    use bench::cni;
    let started = Instant::now();
    let progress = |line: &str| eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
    let report = cni::run(bin, cfg, progress)?;
    let section = cni::markdown(&report, &bench::machine(), &utc_now());
    write_section(out, (cni::SECTION_START, cni::SECTION_END), &section, json, &report)?;
    eprintln!("wrote the CNI section of {} in {:.0}s", out.display(), started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// Puts `section` between `marks` in `out` (the rest of it kept), `report` as JSON into
/// `json`, and prints the section.
fn write_section(
    out: &Path,
    marks: (&str, &str),
    section: &str,
    json: Option<&Path>,
    report: &impl serde::Serialize,
) -> Result<()> {
    let old = std::fs::read_to_string(out).unwrap_or_else(|_| format!("# Benchmarks\n\n{}\n", bench::ANALYSIS_MARKER));
    std::fs::write(out, bench::report::with_section(&old, marks, section, bench::ANALYSIS_MARKER))
        .with_context(|| format!("writing {}", out.display()))?;
    if let Some(j) = json {
        std::fs::write(j, serde_json::to_string_pretty(report)?).with_context(|| format!("writing {}", j.display()))?;
    }
    println!("{section}");
    Ok(())
}

/// Lets this process (and the daemons it starts, which inherit it) hold as many files as the
/// kernel allows: the benchmarks hold 10 000 connections, two sockets each on this side.
/// Where the hard limit cannot be raised (no CAP_SYS_RESOURCE, a container), the soft limit
/// goes up to it; the benchmarks report what they were capped at.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let max =
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20);
    if setrlimit(Resource::RLIMIT_NOFILE, max, max).is_ok() {
        return;
    }
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// SIGINT and SIGTERM, caught from the moment they are installed.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
        })
    }

    async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// The date and time a benchmark section is stamped with (UTC, to the minute).
fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
