//! `cargo xtask bench --soak`: what short rounds hide. Per path, in its own lab:
//!
//! - sustained connection churn for [`SoakConfig::churn`] (60 s), measured in 10 s slices,
//!   so the last slice's rate (TIME_WAIT at steady state) is compared with the first's;
//! - [`SoakConfig::held`] (10 000) connections opened, used once and held idle, with the
//!   proxies' resident memory and open files;
//! - the proxies' memory again [`SoakConfig::settle`] (30 s) after those closed;
//! - before any load, each proxy's idle CPU and memory.
//!
//! Paths run one after the other; the labs of the others stay up but idle.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::paths::Setup;
use super::{PathKind, Result};
use crate::lab::LabError;
use crate::loadgen;
use crate::traffic::in_netns;

#[derive(Clone, Debug)]
pub struct SoakConfig {
    pub churn: Duration,
    pub slice: Duration,
    pub held: usize,
    pub settle: Duration,
    pub idle: Duration,
    pub concurrency: usize,
}

impl Default for SoakConfig {
    fn default() -> Self {
        Self {
            churn: Duration::from_secs(60),
            slice: Duration::from_secs(10),
            held: 10_000,
            settle: Duration::from_secs(30),
            // A minute: the daemons' once-a-minute pass falls inside it whatever its phase.
            idle: Duration::from_secs(60),
            concurrency: super::CONCURRENCY,
        }
    }
}

/// One path's soak figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SoakSample {
    pub path: PathKind,
    /// CPU of the path's proxies (all of them together) with no traffic, ms per second.
    pub idle_cpu_ms_per_s: Option<f64>,
    pub idle_rss_kib: Option<u64>,
    /// Connections per second in each slice of the churn.
    pub churn_per_s: Vec<f64>,
    pub churn_errors: u64,
    /// TIME_WAIT sockets on the client pod and its node right after the churn.
    pub time_wait: u64,
    /// Held connections that opened and echoed.
    pub held: usize,
    pub held_rss_kib: Option<u64>,
    pub held_fds: Option<u64>,
    /// RSS the settle time after the held connections closed.
    pub settled_rss_kib: Option<u64>,
}

impl SoakSample {
    /// Last slice's rate over the first's.
    pub fn churn_ratio(&self) -> Option<f64> {
        match (self.churn_per_s.first(), self.churn_per_s.last()) {
            (Some(f), Some(l)) if *f > 0.0 => Some(l / f),
            _ => None,
        }
    }

    /// Memory per 1000 idle connections held, KiB.
    pub fn rss_per_1000_idle_kib(&self) -> Option<f64> {
        let (held, idle) = (self.held_rss_kib?, self.idle_rss_kib?);
        (self.held > 0).then(|| held.saturating_sub(idle) as f64 * 1000.0 / self.held as f64)
    }
}

/// Runs the soak over `setups`, reporting progress.
pub fn run(setups: &mut [Setup], cfg: &SoakConfig, mut progress: impl FnMut(&str)) -> Result<Vec<SoakSample>> {
    for s in setups.iter_mut() {
        s.pause(false);
        // The capture holds the client pod (and as many workloads as the bench's first size).
        if s.kind.scales() {
            s.fill(10)?;
        }
    }
    let mut samples: Vec<SoakSample> =
        setups.iter().map(|s| SoakSample { path: s.kind, ..Default::default() }).collect();
    progress(&format!("idle: every proxy's CPU and memory over {:?}", cfg.idle));
    let before: Vec<_> = setups.iter().map(Setup::proxy_thread_times).collect();
    std::thread::sleep(cfg.idle);
    for ((s, b), out) in setups.iter().zip(&before).zip(samples.iter_mut()) {
        out.idle_cpu_ms_per_s = s
            .proxy_thread_times()
            .zip(b.as_ref())
            .map(|(a, b)| a.since(b).as_secs_f64() * 1000.0 / cfg.idle.as_secs_f64());
        out.idle_rss_kib = s.proxy_rss_kib();
    }
    let mut released = Vec::new();
    for (s, out) in setups.iter_mut().zip(samples.iter_mut()) {
        progress(&format!("{}: churn for {:?}", s.kind.name(), cfg.churn));
        churn(s, cfg, out)?;
        if s.kind != PathKind::Direct {
            progress(&format!("{}: holding {} connections", s.kind.name(), cfg.held));
            let held = hold(s, cfg.held)?;
            // Let the proxies settle their side of the last connections.
            std::thread::sleep(Duration::from_millis(500));
            out.held = held.count;
            out.held_rss_kib = s.proxy_rss_kib();
            out.held_fds = s.proxy_fds();
            drop(held);
            s.idle.release();
            released.push(Instant::now());
        } else {
            released.push(Instant::now() - cfg.settle);
        }
    }
    if let Some(last) = released.last() {
        let wait = cfg.settle.saturating_sub(last.elapsed());
        progress(&format!("waiting {wait:?} for the last path's memory to settle"));
        std::thread::sleep(wait);
    }
    for (s, out) in setups.iter().zip(samples.iter_mut()) {
        out.settled_rss_kib = s.proxy_rss_kib();
    }
    Ok(samples)
}

/// Connection churn in slices, and the TIME_WAIT sockets it leaves.
fn churn(s: &Setup, cfg: &SoakConfig, out: &mut SoakSample) -> Result<()> {
    let ns = Some(s.client_ns.as_str());
    let slices = (cfg.churn.as_secs_f64() / cfg.slice.as_secs_f64()).ceil().max(1.0) as usize;
    for _ in 0..slices {
        let r = loadgen::conn_rate(ns, s.echo_addr(), cfg.concurrency, cfg.slice)
            .map_err(|e| LabError::Other(format!("{}: churn: {e}", s.kind.name())))?;
        out.churn_per_s.push(r.per_second);
        out.churn_errors += r.errors;
    }
    out.time_wait = time_wait(&s.client_ns)? + time_wait(&s.lab.nodes[0].name)?;
    Ok(())
}

/// TIME_WAIT sockets in network namespace `ns`.
fn time_wait(ns: &str) -> Result<u64> {
    Ok(in_netns(ns, || {
        ["tcp", "tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).ok())
            .map(|t| t.lines().skip(1).filter(|l| l.split_whitespace().nth(3) == Some("06")).count() as u64)
            .sum()
    })?)
}

/// Connections held by a child process (`meshpath-lab hold`); closed when dropped.
struct Held {
    child: std::process::Child,
    count: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Has a child process open up to `n` connections to the path's idle server and hold them;
/// how many it could open (the proxies' limits may stop it short).
fn hold(s: &Setup, n: usize) -> Result<Held> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["hold", "--netns", &s.client_ns, "--to", &s.idle.addr.to_string(), "--count", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn { cmd: "meshpath-lab hold".into(), source })?;
    let mut line = String::new();
    let stdout = child.stdout.take().ok_or_else(|| LabError::Other("no stdout".into()))?;
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let count = line.trim().strip_prefix("held ").and_then(|n| n.split_whitespace().next()?.parse().ok());
    match count {
        Some(count) => Ok(Held { child, count }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(LabError::Other(format!("{}: the holding process said {line:?}", s.kind.name())))
        }
    }
}

/// The holding process's work: open, echo, report, hold until stdin closes.
pub fn hold_here(ns: &str, dst: SocketAddr, n: usize) -> anyhow::Result<()> {
    let (held, error) = in_netns(ns, || {
        let mut held = Vec::with_capacity(n);
        for i in 0..n {
            let once = || -> std::io::Result<TcpStream> {
                let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                c.write_all(&[i as u8])?;
                let mut b = [0u8];
                c.read_exact(&mut b)?;
                if b[0] == i as u8 { Ok(c) } else { Err(std::io::Error::other("echoed the wrong byte")) }
            };
            match once() {
                Ok(c) => held.push(c),
                Err(e) => return (held, Some(e)),
            }
        }
        (held, None)
    })?;
    match &error {
        Some(e) => println!("held {} (then: {e})", held.len()),
        None => println!("held {}", held.len()),
    }
    std::io::stdout().flush()?;
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

/// Where the soak's section of BENCHMARKS.md starts and ends (a regular run keeps it).
pub const SECTION_START: &str = "<!-- soak: written by `cargo xtask bench --soak` -->";
pub const SECTION_END: &str = "<!-- /soak -->";

/// The soak's section of BENCHMARKS.md.
pub fn markdown(samples: &[SoakSample], cfg: &SoakConfig, date: &str) -> String {
    use std::fmt::Write as _;
    let mut s = format!("{SECTION_START}\n## Soak ({date})\n\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench --soak`. Per path: idle for {:?} first (CPU and memory of its proxies, all \
         together), then {:?} of connection churn at {} at once in {:?} slices, then {} connections opened, used once \
         and held idle, then the memory {:?} after they closed.\n",
        cfg.idle, cfg.churn, cfg.concurrency, cfg.slice, cfg.held, cfg.settle
    );
    if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = writeln!(s, "Open-files limit of the proxies (it caps how many connections each can hold): {soft}.\n");
    }
    let _ = writeln!(
        s,
        "| path | idle CPU (ms/s) | idle RSS (MiB) | churn first / last slice (conn/s) | last / first | churn errors | \
         TIME_WAIT after | held | RSS held (MiB) | fds held | RSS per 1000 idle (KiB) | RSS {:?} later (MiB) |\n|{}",
        cfg.settle,
        "---|".repeat(13)
    );
    let mib = |k: Option<u64>| k.map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "–".into());
    let num = |v: Option<f64>, d: usize| v.map(|v| format!("{v:.d$}")).unwrap_or_else(|| "–".into());
    for x in samples {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.path.name(),
            num(x.idle_cpu_ms_per_s, 3),
            mib(x.idle_rss_kib),
            num(x.churn_per_s.first().copied(), 0),
            num(x.churn_per_s.last().copied(), 0),
            num(x.churn_ratio(), 2),
            x.churn_errors,
            x.time_wait,
            if x.path == PathKind::Direct { "–".into() } else { x.held.to_string() },
            mib(x.held_rss_kib),
            x.held_fds.map(|f| f.to_string()).unwrap_or_else(|| "–".into()),
            num(x.rss_per_1000_idle_kib(), 0),
            mib(x.settled_rss_kib),
        );
    }
    let _ = writeln!(s, "\nChurn per slice (conn/s):\n");
    for x in samples {
        let slices: Vec<String> = x.churn_per_s.iter().map(|r| format!("{r:.0}")).collect();
        let _ = writeln!(s, "- {}: {}", x.path.name(), slices.join(", "));
    }
    let _ = writeln!(s, "\n### Soak targets\n\n| target | measured | wanted | |\n|---|---|---|---|");
    for t in soak_targets(samples) {
        let verdict = match t.met {
            None => "not measured",
            Some(true) => "met",
            Some(false) => "**missed**",
        };
        let _ = writeln!(s, "| {} | {} | {} | {verdict} |", t.what, t.measured, t.want);
    }
    let _ = writeln!(s, "\n{SECTION_END}");
    s
}

struct SoakTarget {
    what: String,
    /// The ratio, or both values where the baseline is zero.
    measured: String,
    want: &'static str,
    met: Option<bool>,
}

fn soak_targets(samples: &[SoakSample]) -> Vec<SoakTarget> {
    let get = |p: PathKind| samples.iter().find(|s| s.path == p);
    let mut out = Vec::new();
    for p in [PathKind::Meshpath, PathKind::MeshpathHbone] {
        let r = get(p).and_then(SoakSample::churn_ratio);
        out.push(SoakTarget {
            what: format!("churn last / first 10 s, {}", p.name()),
            measured: r.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into()),
            want: ">= 0.9",
            met: r.map(|v| v >= 0.9),
        });
    }
    let (m, z) = (get(PathKind::MeshpathHbone), get(PathKind::ZtunnelHbone));
    // What, the figure, the ratio wanted at most and how the report says it.
    let rows: [(&str, Figure, f64, &'static str); 5] = [
        (
            "RSS per 1000 idle connections, meshpath-hbone / ztunnel-hbone",
            SoakSample::rss_per_1000_idle_kib,
            0.5,
            "<= 0.5",
        ),
        (
            "RSS with the connections held, meshpath-hbone / ztunnel-hbone",
            |s| s.held_rss_kib.map(|k| k as f64),
            0.8,
            "<= 0.8",
        ),
        (
            "RSS after they closed, meshpath-hbone / ztunnel-hbone",
            |s| s.settled_rss_kib.map(|k| k as f64),
            0.8,
            "<= 0.8",
        ),
        ("idle RSS, meshpath-hbone / ztunnel-hbone", |s| s.idle_rss_kib.map(|k| k as f64), 1.0, "<= 1"),
        ("idle CPU, meshpath-hbone / ztunnel-hbone", |s| s.idle_cpu_ms_per_s, 1.0, "<= 1"),
    ];
    for (what, f, limit, want) in rows {
        let (measured, met) = match (m.and_then(f), z.and_then(f)) {
            (Some(a), Some(b)) if b > 0.0 => (format!("{:.2}", a / b), Some(a / b <= limit)),
            // A ratio to zero says nothing: show both.
            (Some(a), Some(b)) => (format!("{a:.3} vs {b:.3}"), Some(a <= b)),
            _ => ("–".into(), None),
        };
        out.push(SoakTarget { what: what.to_owned(), measured, want, met });
    }
    out
}

/// One figure of a sample.
type Figure = fn(&SoakSample) -> Option<f64>;

/// `doc` with its soak section replaced by `section` (or put before the analysis marker).
pub fn with_section(doc: &str, section: &str, analysis_marker: &str) -> String {
    super::report::with_section(doc, (SECTION_START, SECTION_END), section, analysis_marker)
}

/// The soak section of an existing document, to carry over when the rest is rewritten.
pub fn section_of(doc: &str) -> Option<&str> {
    super::report::section_of(doc, (SECTION_START, SECTION_END))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_in_place_or_put_before_the_analysis() {
        let marker = "<!-- analysis -->";
        let doc = format!("# B\n\ntables\n{marker}\nhand-written\n");
        let one = with_section(&doc, &format!("{SECTION_START}\nfirst\n{SECTION_END}"), marker);
        assert!(one.contains("tables\nfirst") || one.contains("first"), "{one}");
        assert!(one.find("first").unwrap() < one.find(marker).unwrap());
        let two = with_section(&one, &format!("{SECTION_START}\nsecond\n{SECTION_END}"), marker);
        assert!(!two.contains("first") && two.contains("second") && two.ends_with("hand-written\n"), "{two}");
        assert_eq!(section_of(&two).map(|s| s.contains("second")), Some(true));
    }

    #[test]
    fn ratios_and_per_connection_memory() {
        let s = SoakSample {
            churn_per_s: vec![100.0, 95.0, 90.0],
            held: 10_000,
            held_rss_kib: Some(60_000),
            idle_rss_kib: Some(40_000),
            ..Default::default()
        };
        assert_eq!(s.churn_ratio(), Some(0.9));
        assert_eq!(s.rss_per_1000_idle_kib(), Some(2000.0));
    }
}
