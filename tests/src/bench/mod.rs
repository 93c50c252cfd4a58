//! `meshpath bench`: meshpath's capture against the designs it replaces, side by side, on
//! the same kernel, in the same run, with the same proxy (meshpath's own listeners and relay).
//!
//! Every path gets a lab of its own (two nodes, pods a, b, e on node 1, c, d on node 2); the
//! client is pod a, the server pod b on the same node (c or d on the other node for the
//! cross-node rows):
//!
//! - **direct**: no proxy; node 1 routes a to b;
//! - **legacy**: the 2022 ambient capture ([`paths::legacy`]): ipset, mangle mark 0x100, policy
//!   routing into a VXLAN tunnel (Geneve is not in this kernel) to a proxy network namespace,
//!   TPROXY there, conntrack active on the node;
//! - **tproxy**: the proxy in the node's namespace behind one ipset-matched TPROXY rule;
//! - **meshpath**: the eBPF datapath;
//! - **meshpath-hbone** (a to c, both enrolled, HBONE between the nodes) and
//!   **meshpath-relay** (a to d, d not enrolled: plain TCP relay across the nodes).
//!
//! Paths are measured in turn, round after round, in a rotating order, so drift (thermal,
//! noisy neighbours) spreads over all of them. Every figure checks its bytes.

pub mod cni;
pub mod paths;
pub mod policies;
pub mod report;
pub mod soak;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::lab::{LabError, Result};
use crate::loadgen;
use paths::Setup;

/// Everything in BENCHMARKS.md after this line is written by hand (the analysis of a run)
/// and kept when the bench writes the file again.
pub const ANALYSIS_MARKER: &str = "<!-- analysis: written by hand, kept by `cargo xtask bench` -->";

/// Ports of the bench servers in the server pods.
pub const ECHO_PORT: u16 = 9000;
pub const SINK_PORT: u16 = 9001;
pub const IDLE_PORT: u16 = 9002;
/// Connections kept busy at once for the connection-rate and request-rate figures.
pub const CONCURRENCY: usize = 8;
/// Rounds at most for the HBONE rows against ztunnel, while their spread is too wide.
pub const MAX_PEER_ROUNDS: usize = 9;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    #[default]
    Direct,
    Legacy,
    Tproxy,
    Meshpath,
    MeshpathHbone,
    MeshpathRelay,
    /// Two Istio ztunnels in dedicated mode (pods a and c), HBONE between them: the peer
    /// meshpath-hbone is compared with. Only with `MESHPATH_ZTUNNEL` set.
    ZtunnelHbone,
}

impl PathKind {
    pub const ALL: [PathKind; 6] = [
        PathKind::Direct,
        PathKind::Legacy,
        PathKind::Tproxy,
        PathKind::Meshpath,
        PathKind::MeshpathHbone,
        PathKind::MeshpathRelay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Legacy => "legacy",
            PathKind::Tproxy => "tproxy",
            PathKind::Meshpath => "meshpath",
            PathKind::MeshpathHbone => "meshpath-hbone",
            PathKind::MeshpathRelay => "meshpath-relay",
            PathKind::ZtunnelHbone => "ztunnel-hbone",
        }
    }

    /// The paths this run measures: all but ztunnel's, which needs a ztunnel binary.
    pub fn available() -> Vec<PathKind> {
        let mut kinds = Self::ALL.to_vec();
        if paths::ztunnel::binary().is_some() {
            kinds.push(PathKind::ZtunnelHbone);
        }
        kinds
    }

    /// Paths whose capture is sized by the number of enrolled workloads.
    pub fn scales(self) -> bool {
        matches!(self, PathKind::Legacy | PathKind::Tproxy | PathKind::Meshpath)
    }
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub binary: PathBuf,
    pub rounds: usize,
    /// Length of each measurement.
    pub duration: Duration,
    /// Enrolled-workload counts for the capture paths; the first is also the one all the
    /// other paths run at.
    pub sizes: Vec<usize>,
}

impl BenchConfig {
    pub fn full(binary: PathBuf) -> Self {
        Self { binary, rounds: 3, duration: Duration::from_secs(2), sizes: vec![10, 1_000, 10_000] }
    }

    pub fn quick(binary: PathBuf) -> Self {
        Self { binary, rounds: 3, duration: Duration::from_millis(600), sizes: vec![10] }
    }
}

/// One path's figures from one round.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub path: PathKind,
    pub workloads: usize,
    pub round: usize,
    pub conn_per_s: f64,
    pub req_per_s: f64,
    pub p50_us: u32,
    pub p99_us: u32,
    pub gbit_1: f64,
    pub gbit_8: f64,
    /// Whole-machine CPU time (everything but idle) per connection during the
    /// connection-rate run, µs: client, server, proxies and the kernel's packet work alike.
    pub cpu_us_per_conn: Option<f64>,
    /// Proxy resident memory after the round, KiB.
    pub rss_kib: Option<u64>,
    /// The proxies' own CPU time (all of them) during the connection-rate run, per 1000
    /// connections, ms.
    pub proxy_cpu_ms_per_1000_conn: Option<f64>,
    /// The proxies' CPU time during the throughput runs, per GB moved, ms.
    pub proxy_cpu_ms_per_gb: Option<f64>,
    /// The machine's 1-minute load average at the end of the round: how busy it was.
    pub load_1m: Option<f64>,
}

/// This machine, as the reports describe it: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0) / 1024 / 1024)
        })
        .unwrap_or(0);
    format!("{cpu}, {cores} cores, {mem} GiB; kernel {kernel}")
}

/// The whole BENCHMARKS.md for a finished run.
pub fn document(cfg: &BenchConfig, samples: &[Sample], command: &str, chart_file: &str) -> String {
    format!(
        "# Benchmarks\n\n\
         Written by `{command}`; everything above the analysis marker is regenerated by each run.\n\n\
         - machine: {machine}; load average (1 min) at the end of the rounds: {load}\n\
         - peer: {peer}\n\
         - {rounds} alternating rounds of {dur:?} per figure; {conc} concurrent connections for connection and request rates; \
         1-byte request/response; throughput with 64 KiB writes; every byte checked (echo and a pattern-checking sink)\n\
         - client, server and proxies share the machine's cores: the figures compare paths, they are not a capacity claim\n\n\
         ![median relative to direct]({chart_file})\n\n\
         Paths (same proxy binary and relay everywhere; only the capture differs):\n\n\
         - **direct**: pod a to pod b through node 1's routing, no proxy;\n\
         - **legacy**: the 2022 ambient capture: ipset `ztunnel-pods-ips`, mangle mark `0x100/0x100`, `ip rule fwmark 0x100/0x100 lookup 101` with \
         `default via 192.168.127.2 dev istioout` and the proxy namespace's address on-link in table 101, a VXLAN pair `istioout`/`pistioout` \
         (VXLAN stands in for Geneve, which this kernel lacks), TPROXY in the proxy's own network namespace; replies leave the proxy \
         namespace through its veth rather than a second tunnel;\n\
         - **tproxy**: the proxy in node 1's namespace behind one ipset-matched TPROXY rule;\n\
         - **meshpath**: the eBPF datapath (TC classifier, policy routing to local, sk_lookup into the proxy's listener);\n\
         - **meshpath-hbone**: pod a to pod c on the other node, both enrolled: HBONE (mTLS HTTP/2) between two meshpath proxies;\n\
         - **meshpath-relay**: pod a to pod d on the other node, d not enrolled: meshpath's capture and a plain TCP relay.\n\n\
         Every node runs kube-proxy's NAT chains, so conntrack follows every flow on every path, as in a real cluster. For the proxied \
         paths on one node the proxy connects upstream from its own address. Only the measured lab's proxies run (the others are \
         stopped with SIGSTOP). CPU per connection is the whole machine's busy time (client, server, proxies, kernel) during the \
         connection-rate run divided by its connections.\n\n{}",
        report::markdown(samples, &cfg.sizes, cfg.rounds) + &report::peer_section(samples, cfg.sizes[0]),
        machine = machine(),
        load = report::load_summary(samples),
        peer = paths::ztunnel::build().unwrap_or_else(|| "none (MESHPATH_ZTUNNEL unset)".into()),
        rounds = cfg.rounds,
        dur = cfg.duration,
        conc = CONCURRENCY,
    )
}

/// Runs the benchmark; `progress` gets one line per step.
pub fn run(cfg: &BenchConfig, mut progress: impl FnMut(&str)) -> Result<Vec<Sample>> {
    let mut setups = Vec::new();
    for kind in PathKind::available() {
        progress(&format!("building the {} lab", kind.name()));
        setups.push(Setup::build(kind, &cfg.binary)?);
    }
    let mut samples = Vec::new();
    for (i, &size) in cfg.sizes.iter().enumerate() {
        let kinds: Vec<PathKind> = PathKind::available().into_iter().filter(|k| i == 0 || k.scales()).collect();
        // Filling needs the daemons running (the last round stopped all but one).
        for s in &setups {
            s.pause(false);
        }
        for s in setups.iter_mut().filter(|s| kinds.contains(&s.kind) && s.kind.scales()) {
            progress(&format!("{}: filling the capture to {size} workloads", s.kind.name()));
            s.fill(size)?;
        }
        for round in 0..cfg.rounds {
            // Rotate the order each round.
            for j in 0..kinds.len() {
                let kind = kinds[(j + round) % kinds.len()];
                progress(&format!("round {}/{} at {size} workloads: {}", round + 1, cfg.rounds, kind.name()));
                // Only the measured lab's proxies run.
                for s in &setups {
                    s.pause(s.kind != kind);
                }
                let setup = setups.iter_mut().find(|s| s.kind == kind).expect("every kind has a setup");
                samples.push(measure(setup, size, round, cfg.duration)?);
            }
        }
        if i == 0 {
            peer_rounds(cfg, &mut setups, &mut samples, size, &mut progress)?;
        }
    }
    for s in setups {
        s.teardown()?;
    }
    Ok(samples)
}

/// The HBONE rows against ztunnel repeat, both paths in alternating order, until the
/// per-round ratios of every compared figure spread less than [`report::PEER_SPREAD`] around
/// their median, or [`MAX_PEER_ROUNDS`] rounds have run (the report then says so).
fn peer_rounds(
    cfg: &BenchConfig,
    setups: &mut [Setup],
    samples: &mut Vec<Sample>,
    size: usize,
    progress: &mut impl FnMut(&str),
) -> Result<()> {
    let pair = [PathKind::MeshpathHbone, PathKind::ZtunnelHbone];
    if !pair.iter().all(|k| setups.iter().any(|s| s.kind == *k)) {
        return Ok(());
    }
    let mut round = cfg.rounds;
    while round < MAX_PEER_ROUNDS.max(cfg.rounds) {
        let spread = report::peer_ratios(samples, size).iter().filter_map(|r| r.spread()).fold(0.0, f64::max);
        if spread < report::PEER_SPREAD {
            break;
        }
        for j in 0..pair.len() {
            let kind = pair[(j + round) % pair.len()];
            progress(&format!("extra round {} (spread {:.0} %): {}", round + 1, spread * 100.0, kind.name()));
            for s in setups.iter() {
                s.pause(s.kind != kind);
            }
            let setup = setups.iter_mut().find(|s| s.kind == kind).expect("checked above");
            samples.push(measure(setup, size, round, cfg.duration)?);
        }
        round += 1;
    }
    Ok(())
}

fn load_err(kind: PathKind, what: &str) -> impl FnOnce(loadgen::LoadError) -> LabError + '_ {
    move |e| LabError::Other(format!("{}: {what}: {e}", kind.name()))
}

/// One round of one path: connection rate, request rate and latency, throughput with one and
/// eight streams, each checked for lost or altered bytes.
fn measure(s: &mut Setup, workloads: usize, round: usize, d: Duration) -> Result<Sample> {
    let ns = Some(s.client_ns.as_str());
    let (echo, sink) = (s.echo_addr(), s.sink_addr());
    // Warm the path (pools, caches) outside the figures.
    loadgen::conn_rate(ns, echo, CONCURRENCY, Duration::from_millis(200)).map_err(load_err(s.kind, "warm-up"))?;
    let cpu_before = machine_busy();
    let proxy_before = s.proxy_cpu();
    let conn = loadgen::conn_rate(ns, echo, CONCURRENCY, d).map_err(load_err(s.kind, "connection rate"))?;
    let cpu_after = machine_busy();
    let proxy_conn = s.proxy_cpu().zip(proxy_before).map(|(a, b)| a - b);
    let req = loadgen::request_rate(ns, echo, CONCURRENCY, d).map_err(load_err(s.kind, "request rate"))?;
    let sink_before = s.servers.sink_totals();
    let proxy_before = s.proxy_cpu();
    let t1 = loadgen::throughput(ns, sink, 1, d).map_err(load_err(s.kind, "1-stream throughput"))?;
    let t8 = loadgen::throughput(ns, sink, 8, d).map_err(load_err(s.kind, "8-stream throughput"))?;
    let proxy_bulk = s.proxy_cpu().zip(proxy_before).map(|(a, b)| a - b);
    // The sink saw every byte the client sent, in order.
    let sink = wait_for_sink(s, sink_before.bytes + t1.bytes + t8.bytes);
    if sink.bytes != sink_before.bytes + t1.bytes + t8.bytes || sink.pattern_errors != sink_before.pattern_errors {
        return Err(LabError::Other(format!(
            "{}: the sink received {} bytes ({} pattern errors), the clients sent {}",
            s.kind.name(),
            sink.bytes - sink_before.bytes,
            sink.pattern_errors - sink_before.pattern_errors,
            t1.bytes + t8.bytes
        )));
    }
    let cpu_us_per_conn = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) if conn.connections > 0 => Some((a - b).as_secs_f64() * 1e6 / conn.connections as f64),
        _ => None,
    };
    Ok(Sample {
        path: s.kind,
        workloads,
        round,
        conn_per_s: conn.per_second,
        req_per_s: req.per_second,
        p50_us: req.p50_us,
        p99_us: req.p99_us,
        gbit_1: t1.gbit_per_s,
        gbit_8: t8.gbit_per_s,
        cpu_us_per_conn,
        rss_kib: s.proxy_rss_kib(),
        proxy_cpu_ms_per_1000_conn: proxy_conn
            .filter(|_| conn.connections > 0)
            .map(|c| c.as_secs_f64() * 1e6 / conn.connections as f64),
        proxy_cpu_ms_per_gb: proxy_bulk
            .filter(|_| t1.bytes + t8.bytes > 0)
            .map(|c| c.as_secs_f64() * 1e3 / ((t1.bytes + t8.bytes) as f64 / 1e9)),
        load_1m: load_average(),
    })
}

/// The 1-minute load average now (/proc/loadavg).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// CPU time the whole machine spent not idle so far (all CPUs, /proc/stat).
fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<f64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
    let busy: f64 = fields.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten()? as f64;
    Some(Duration::from_secs_f64(busy / ticks))
}

/// The sink counts a stream's last bytes just after the client returns: wait a moment.
fn wait_for_sink(s: &Setup, want: u64) -> loadgen::ServerTotals {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let t = s.servers.sink_totals();
        if t.bytes >= want || std::time::Instant::now() > deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
