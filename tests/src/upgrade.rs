//! Takeovers under load (`lab --upgrade`, a row group of `lab --smoke`, a kernel test): new
//! connections arrive at a steady rate on every path while long-lived connections stream
//! bytes that are checked one by one; node 1's daemon is taken over, then node 2's.
//!
//! Plain streams live through both takeovers, long past the old daemons' exit: they only
//! survive by being handed over. HBONE streams are opened before a takeover and end within
//! the old daemon's drain (their TLS state cannot move), so they must all complete too.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::lab::{Lab, Result, Takeover};
use crate::smoke;
use crate::traffic::{self, EchoServer};

/// Request/response servers for the steady stream of new connections.
pub const CHURN_PORT: u16 = 8082;
/// Servers that echo as they read, for the long-lived streams.
pub const STREAM_PORT: u16 = 8081;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The paths under load: (from, to, HBONE).
const PATHS: [(&str, &str, bool); 5] =
    [("a", "c", true), ("c", "a", true), ("a", "d", false), ("d", "a", false), ("a", "e", false)];

/// How hard and how long.
#[derive(Clone, Debug)]
pub struct UpgradeConfig {
    /// Pause between two new connections of one path.
    pub churn_interval: Duration,
    /// Long-lived connections per path and family.
    pub streams: usize,
    /// Load before and after each takeover.
    pub settle: Duration,
    /// How long an HBONE stream lives: it must end within the old daemon's drain.
    pub hbone_stream: Duration,
}

impl UpgradeConfig {
    /// `lab --upgrade`.
    pub fn full() -> Self {
        Self {
            churn_interval: Duration::from_millis(10),
            streams: 4,
            settle: Duration::from_secs(2),
            hbone_stream: Duration::from_secs(5),
        }
    }

    /// The smoke's row group and the kernel test.
    pub fn small() -> Self {
        Self {
            churn_interval: Duration::from_millis(25),
            streams: 1,
            settle: Duration::from_secs(1),
            hbone_stream: Duration::from_secs(3),
        }
    }
}

/// One path and family under load.
#[derive(Clone, Debug, Default)]
pub struct PathReport {
    pub from: &'static str,
    pub to: &'static str,
    pub v6: bool,
    pub hbone: bool,
    /// New connections attempted, failed (any error, or an altered echo), of which reset.
    pub attempted: u64,
    pub failed: u64,
    pub reset: u64,
    /// The slowest new connection (connect to last byte): the takeover's gap, as clients
    /// see it.
    pub slowest: Duration,
    /// When it began, from the start of the load.
    pub slowest_at: Duration,
    pub streams: u64,
    pub streams_failed: u64,
    pub streams_reset: u64,
    pub bytes_sent: u64,
    pub bytes_lost: u64,
    pub problems: Vec<String>,
}

impl PathReport {
    pub fn name(&self) -> String {
        format!("{} -> {}{}", self.from, self.to, if self.v6 { " v6" } else { "" })
    }

    pub fn ok(&self) -> bool {
        self.failed == 0 && self.streams_failed == 0 && self.bytes_lost == 0 && self.attempted > 0
    }
}

/// What the upgrade run showed.
pub struct UpgradeReport {
    pub paths: Vec<PathReport>,
    /// Per node taken over: how it went.
    pub takeovers: Vec<(usize, Takeover)>,
}

impl UpgradeReport {
    pub fn ok(&self) -> bool {
        self.paths.iter().all(PathReport::ok)
            && self.takeovers.iter().all(|(_, t)| t.old_exit.is_some_and(|s| s.success()))
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<22} {:>9} {:>6} {:>5} {:>16} {:>7} {:>7} {:>6} {:>12} {:>10}  result",
            "path",
            "attempted",
            "failed",
            "reset",
            "slowest ms (at)",
            "streams",
            "failed",
            "reset",
            "bytes sent",
            "bytes lost"
        );
        let _ = writeln!(s, "{}", "-".repeat(117));
        for p in &self.paths {
            let _ = writeln!(
                s,
                "{:<22} {:>9} {:>6} {:>5} {:>16} {:>7} {:>7} {:>6} {:>12} {:>10}  {}{}",
                format!("{}{}", p.name(), if p.hbone { " (HBONE)" } else { " (plain)" }),
                p.attempted,
                p.failed,
                p.reset,
                format!("{:.1} ({:.1}s)", p.slowest.as_secs_f64() * 1e3, p.slowest_at.as_secs_f64()),
                p.streams,
                p.streams_failed,
                p.streams_reset,
                p.bytes_sent,
                p.bytes_lost,
                if p.ok() { "PASS" } else { "FAIL" },
                if p.problems.is_empty() { String::new() } else { format!("  ({})", p.problems.join("; ")) }
            );
        }
        for (node, t) in &self.takeovers {
            let exit = t.old_exit.map(|s| s.to_string()).unwrap_or_else(|| "none".into());
            let _ = writeln!(
                s,
                "takeover of node {}: slots swapped {:.0} ms after the successor started; old daemon gone after {:.1} s ({exit})",
                node + 1,
                t.swapped.as_secs_f64() * 1e3,
                t.old_gone.as_secs_f64()
            );
        }
        s
    }

    /// The run as rows of the smoke table.
    pub fn rows(&self) -> Vec<smoke::Outcome> {
        self.paths
            .iter()
            .map(|p| smoke::Outcome {
                scenario: smoke::Scenario {
                    name: match (p.hbone, p.v6) {
                        (true, false) => "takeovers under load (HBONE)",
                        (true, true) => "takeovers under load (HBONE v6)",
                        (false, false) => "takeovers under load (plain)",
                        (false, true) => "takeovers under load (plain v6)",
                    },
                    from: p.from,
                    to: p.to,
                    v6: p.v6,
                    port: CHURN_PORT,
                    via: None,
                    expect: smoke::Expect::Through(&[]),
                },
                path: format!("{} new, {} streams, {} failed", p.attempted, p.streams, p.failed + p.streams_failed),
                server_saw: format!("{} B lost", p.bytes_lost),
                ok: p.ok(),
                detail: p.problems.join("; "),
            })
            .collect()
    }
}

/// Takes node 1 over, then node 2, under load; the lab's daemons must be running.
pub fn run(lab: &mut Lab, cfg: &UpgradeConfig, progress: impl Fn(&str)) -> Result<UpgradeReport> {
    let mut servers = Vec::new();
    for p in &lab.pods {
        servers.push(EchoServer::start(&p.netns, CHURN_PORT)?);
        servers.push(EchoServer::start_streaming(&p.netns, STREAM_PORT)?);
    }
    // One exchange per path first: a fresh lab's first IPv6 packets wait for neighbour
    // discovery, which is not the takeover's doing.
    for (from, to, _) in PATHS {
        for v6 in [false, true] {
            let dst = lab.addr(to, v6, CHURN_PORT);
            if let Err(e) = traffic::exchange(&lab.pod(from).netns, None, dst, b"warm-up", CONNECT_TIMEOUT) {
                progress(&format!("warm-up {from} -> {dst} failed: {e}"));
            }
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut churn = Vec::new();
    let mut long = Vec::new();
    for (from, to, hbone) in PATHS {
        for v6 in [false, true] {
            let ns = lab.pod(from).netns.clone();
            let (app, streamed) = (lab.addr(to, v6, CHURN_PORT), lab.addr(to, v6, STREAM_PORT));
            let report = PathReport { from, to, v6, hbone, ..Default::default() };
            churn.push(spawn_churn(report, ns.clone(), app, cfg.churn_interval, stop.clone()));
            if !hbone {
                for _ in 0..cfg.streams {
                    long.push(((from, to, v6), Stream::open(&ns, streamed, None)));
                }
            }
        }
    }
    let mut hbone_streams = Vec::new();
    let mut takeovers = Vec::new();
    for node in 0..lab.nodes.len() {
        // HBONE streams that begin before this takeover and end within the old daemon's drain.
        for (from, to, _) in PATHS.iter().filter(|p| p.2) {
            for v6 in [false, true] {
                for _ in 0..cfg.streams {
                    let ns = lab.pod(from).netns.clone();
                    let s = Stream::open(&ns, lab.addr(to, v6, STREAM_PORT), Some(cfg.settle + cfg.hbone_stream));
                    hbone_streams.push(((*from, *to, v6), s));
                }
            }
        }
        std::thread::sleep(cfg.settle);
        progress(&format!("taking node {} over", node + 1));
        let t = lab.take_over(node, Duration::from_secs(30))?;
        progress(&format!(
            "node {} taken over: slots swapped after {:.0} ms, old daemon gone after {:.1} s",
            node + 1,
            t.swapped.as_secs_f64() * 1e3,
            t.old_gone.as_secs_f64()
        ));
        takeovers.push((node, t));
    }
    std::thread::sleep(cfg.settle);
    stop.store(true, Ordering::Relaxed);
    let mut paths: Vec<PathReport> = churn.into_iter().filter_map(|h| h.join().ok()).collect();
    for (key, stream) in long.into_iter().chain(hbone_streams) {
        let outcome = stream.close();
        let Some(p) = paths.iter_mut().find(|p| (p.from, p.to, p.v6) == key) else { continue };
        p.streams += 1;
        p.bytes_sent += outcome.sent;
        p.bytes_lost += outcome.sent.saturating_sub(outcome.received);
        if let Some(e) = outcome.error {
            p.streams_failed += 1;
            p.streams_reset += u64::from(e.kind() == io::ErrorKind::ConnectionReset);
            p.problems.push(format!("stream: {e}"));
        }
    }
    drop(servers);
    Ok(UpgradeReport { paths, takeovers })
}

/// New connections from `ns` to `dst`, one every `interval`, each a checked exchange.
fn spawn_churn(
    mut r: PathReport,
    ns: String,
    dst: SocketAddr,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<PathReport> {
    std::thread::spawn(move || {
        let payload = traffic::payload(700);
        let load_started = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            r.attempted += 1;
            match traffic::exchange(&ns, None, dst, &payload, CONNECT_TIMEOUT) {
                Ok(x) if x.echoed_intact => {}
                Ok(_) => {
                    r.failed += 1;
                    r.problems.push("an echo came back altered".into());
                }
                Err(e) => {
                    r.failed += 1;
                    r.reset += u64::from(e.kind() == io::ErrorKind::ConnectionReset);
                    if r.problems.len() < 3 {
                        r.problems.push(format!("new connection: {e}"));
                    }
                }
            }
            if started.elapsed() > r.slowest {
                (r.slowest, r.slowest_at) = (started.elapsed(), started - load_started);
            }
            std::thread::sleep(interval);
        }
        r
    })
}

/// The byte at `offset` of a stream: a pattern a lost, doubled or reordered chunk breaks.
fn byte_at(offset: u64) -> u8 {
    (offset.wrapping_mul(7) ^ (offset >> 9)) as u8
}

/// How a long-lived stream ended.
#[derive(Debug, Default)]
pub struct StreamOutcome {
    pub sent: u64,
    /// Echoed back intact, in order.
    pub received: u64,
    pub error: Option<io::Error>,
}

/// A long-lived connection writing a checked pattern and reading its echo concurrently.
struct Stream {
    stop: Arc<AtomicBool>,
    writer: JoinHandle<io::Result<u64>>,
    reader: JoinHandle<(u64, Option<io::Error>)>,
}

impl Stream {
    /// Opens it from `ns`; it writes until [`Self::close`] or for `lifetime`.
    fn open(ns: &str, dst: SocketAddr, lifetime: Option<Duration>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let conn = traffic::in_netns(ns, || -> io::Result<TcpStream> {
            let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
            s.connect_timeout(&SockAddr::from(dst), CONNECT_TIMEOUT)?;
            Ok(s.into())
        })
        .and_then(|r| r);
        let (w, r) = match conn.and_then(|c| Ok((c.try_clone()?, c))) {
            Ok(pair) => pair,
            Err(e) => {
                let kind = e.kind();
                let msg = format!("connect: {e}");
                return Self {
                    stop,
                    writer: std::thread::spawn(|| Ok(0)),
                    reader: std::thread::spawn(move || (0, Some(io::Error::new(kind, msg)))),
                };
            }
        };
        let flag = stop.clone();
        let writer = std::thread::spawn(move || write_pattern(w, &flag, lifetime));
        let reader = std::thread::spawn(move || read_pattern(r));
        Self { stop, writer, reader }
    }

    fn close(self) -> StreamOutcome {
        self.stop.store(true, Ordering::Relaxed);
        let written = self.writer.join().unwrap_or_else(|_| Err(io::Error::other("writer panicked")));
        let (received, read_error) = self.reader.join().unwrap_or((0, Some(io::Error::other("reader panicked"))));
        let (sent, write_error) = match written {
            Ok(n) => (n, None),
            Err(e) => (0, Some(e)),
        };
        StreamOutcome { sent, received, error: write_error.or(read_error) }
    }
}

fn write_pattern(mut w: TcpStream, stop: &AtomicBool, lifetime: Option<Duration>) -> io::Result<u64> {
    let started = Instant::now();
    let mut offset = 0u64;
    let mut chunk = vec![0u8; 2048];
    while !stop.load(Ordering::Relaxed) && lifetime.is_none_or(|l| started.elapsed() < l) {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = byte_at(offset + i as u64);
        }
        w.write_all(&chunk)?;
        offset += chunk.len() as u64;
        std::thread::sleep(Duration::from_millis(5));
    }
    w.shutdown(std::net::Shutdown::Write)?;
    Ok(offset)
}

/// Reads the echo until its end; the bytes that came back intact and in order.
fn read_pattern(mut r: TcpStream) -> (u64, Option<io::Error>) {
    let _ = r.set_read_timeout(Some(Duration::from_secs(15)));
    let mut offset = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (offset, None),
            Ok(n) => {
                if let Some(i) = (0..n).find(|i| buf[*i] != byte_at(offset + *i as u64)) {
                    let e = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("echo altered at byte {}", offset + i as u64),
                    );
                    return (offset + i as u64, Some(e));
                }
                offset += n as u64;
            }
            Err(e) => return (offset, Some(e)),
        }
    }
}
