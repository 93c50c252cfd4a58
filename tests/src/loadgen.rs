//! A load generator and its servers, for the benchmarks: how fast connections, requests and
//! bytes get through meshpath compared with a direct path.
//!
//! Three measurements, each over a fixed duration the caller picks (warm-up is the caller's
//! business too):
//!
//! - [`conn_rate`]: new connections per second. Each cycle connects, sends one byte, reads it
//!   back and closes: a connection only counts once data went both ways, so a proxy that
//!   accepts and then fails is not mistaken for a fast one.
//! - [`request_rate`]: one-byte requests per second over persistent connections, with the
//!   50th and 99th percentile of their round-trip times.
//! - [`throughput`]: bulk bytes per second. The [`Servers`] sink checks every byte against a
//!   counter pattern, and the caller compares the sink's count with the client's, so a
//!   datapath that loses, duplicates or reorders data cannot pass as fast.
//!
//! Everything runs on plain std threads with blocking sockets, not tokio: the proxy under
//! test is a tokio program, and the load must not share a runtime, a scheduler or its
//! wake-up paths with it. Threads also make namespaces simple: `setns` moves only the calling
//! thread, so a thread entered into a pod's network namespace opens its sockets there
//! ([`spawn_in_netns`]), and the threads it spawns start in that namespace too.
//!
//! Long connection-rate runs across veths leave the client's closed connections in
//! TIME_WAIT; without `net.ipv4.tcp_tw_reuse=1` in the client's namespace the ephemeral ports
//! run out (EADDRNOTAVAIL). That shows up in `errors` (and fails the run past 1%) instead of
//! being hidden.

use meshpath::sync::lock;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use serde::Serialize;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Longest a single connect, read or write may block before it counts as failed: a proxy
/// that black-holes traffic must turn into errors, not a hung benchmark.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Size of each bulk write and of every server's read buffer.
const CHUNK: usize = 64 * 1024;

/// The sink's pattern repeats every this many bytes. A prime, so it never lines up with
/// buffer or segment sizes: a dropped, repeated or swapped chunk always shows.
const PATTERN_PERIOD: usize = 251;

/// Server worker and client threads keep their buffers on the heap; this is plenty.
const STACK_SIZE: usize = 256 * 1024;

/// Connection attempts queued in the kernel before the servers accept them.
const BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// More than 1% of the attempts failed.
    #[error("{what}: {errors} of {attempts} attempts failed (more than 1%); first: {first}")]
    TooManyErrors { what: &'static str, errors: u64, attempts: u64, first: String },
    /// Data came back wrong: never a matter of load, always a bug.
    #[error("{0}")]
    Corrupt(String),
    #[error("{0} thread panicked")]
    Panicked(String),
}

impl LoadError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        LoadError::Io { context: context.into(), source }
    }
}

type Result<T, E = LoadError> = std::result::Result<T, E>;

/// What [`conn_rate`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct ConnRate {
    /// Completed connect / one byte each way / close cycles.
    pub connections: u64,
    pub per_second: f64,
    /// Cycles that failed with an I/O error (refused, timed out, EADDRNOTAVAIL...).
    pub errors: u64,
    /// Wall-clock time of the run, from the common start until the last worker finished.
    pub seconds: f64,
}

/// What [`request_rate`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct RequestRate {
    pub requests: u64,
    pub per_second: f64,
    /// Round-trip time percentiles of all requests, in microseconds.
    pub p50_us: u32,
    pub p99_us: u32,
    /// Requests that failed with an I/O error; the connection is then reopened.
    pub errors: u64,
    pub seconds: f64,
}

/// What [`throughput`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// Bytes the client wrote; compare with [`Servers::sink_totals`] to prove none was lost.
    pub bytes: u64,
    /// `bytes` over the time until the sink had closed every stream, so data still sitting
    /// in buffers when the clock ran out is paid for.
    pub gbit_per_s: f64,
    pub seconds: f64,
}

/// Running totals of one server.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServerTotals {
    pub connections: u64,
    pub bytes: u64,
    /// Connections that ended with an I/O error (reset by the peer, say).
    pub io_errors: u64,
    /// Sink only: connections whose stream broke the counter pattern (counted once each).
    pub pattern_errors: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    bytes: AtomicU64,
    io_errors: AtomicU64,
    pattern_errors: AtomicU64,
}

impl Counters {
    fn totals(&self) -> ServerTotals {
        ServerTotals {
            connections: self.connections.load(Ordering::Acquire),
            bytes: self.bytes.load(Ordering::Acquire),
            io_errors: self.io_errors.load(Ordering::Acquire),
            pattern_errors: self.pattern_errors.load(Ordering::Acquire),
        }
    }
}

/// The counter pattern, `byte[i] = i % 251`, long enough that the bytes expected at any
/// stream offset `o` for up to [`CHUNK`] bytes are one slice, `[o % 251..]`: writing and
/// checking become plain memcpy/memcmp instead of a per-byte modulo.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| (0..PATTERN_PERIOD + CHUNK).map(|i| (i % PATTERN_PERIOD) as u8).collect())
}

/// Spawns a thread running `f` inside network namespace `ns` (a name under /run/netns), or
/// in the current one for `None`. Only that thread changes namespace; threads it spawns
/// start in the same one. A missing namespace fails here, a failing `setns` in the handle.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: Option<&str>,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<io::Result<T>>> {
    let target = match ns {
        Some(ns) => {
            let path = format!("/run/netns/{ns}");
            let file = std::fs::File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
            Some((path, file))
        }
        None => None,
    };
    std::thread::Builder::new().name(name.to_owned()).stack_size(STACK_SIZE).spawn(move || {
        if let Some((path, file)) = target {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| io::Error::other(format!("setns {path}: {e}")))?;
        }
        Ok(f())
    })
}

fn annotate(e: io::Error, context: std::fmt::Arguments<'_>) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

/// An echo server and a pattern-checking sink, each on its own port. Stopped (and every
/// thread joined) on drop.
pub struct Servers {
    pub echo_addr: SocketAddr,
    pub sink_addr: SocketAddr,
    echo: Server,
    sink: Server,
}

impl Servers {
    /// Listens on `ip:echo_port` and `ip:sink_port` inside `ns` (`None`: here). Port 0 picks
    /// a free one; the real addresses are in `echo_addr` and `sink_addr`.
    pub fn start(ns: Option<&str>, ip: IpAddr, echo_port: u16, sink_port: u16) -> io::Result<Servers> {
        let echo = Server::start(ns, SocketAddr::new(ip, echo_port), "echo", serve_echo)?;
        let sink = Server::start(ns, SocketAddr::new(ip, sink_port), "sink", serve_sink)?;
        Ok(Servers { echo_addr: echo.addr, sink_addr: sink.addr, echo, sink })
    }

    pub fn echo_totals(&self) -> ServerTotals {
        self.echo.shared.counters.totals()
    }

    /// Bytes received, connections and pattern errors of the sink so far. A stream's bytes
    /// are all counted before the sink closes it.
    pub fn sink_totals(&self) -> ServerTotals {
        self.sink.shared.counters.totals()
    }
}

type Handler = fn(&mut TcpStream, &mut [u8], &Counters) -> io::Result<()>;

/// One listener served by a pool of worker threads that all block in `accept` (the kernel
/// wakes one per connection, nothing spins). A worker serves the connection it accepted to
/// the end, so persistent connections each keep a thread; whenever the last idle worker
/// takes a connection it spawns another, so a new connection never waits for an old one.
struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    listener: TcpListener,
    what: &'static str,
    handler: Handler,
    stop: AtomicBool,
    idle: AtomicUsize,
    counters: Counters,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// A clone of every connection being served, to shut them down on stop.
    live: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

impl Server {
    fn start(ns: Option<&str>, addr: SocketAddr, what: &'static str, handler: Handler) -> io::Result<Server> {
        spawn_in_netns(ns, &format!("lg-{what}-start"), move || -> io::Result<Server> {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            // A restarted benchmark rebinds while the last run's connections sit in TIME_WAIT.
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(BACKLOG)?;
            let listener: TcpListener = s.into();
            let addr = listener.local_addr()?;
            let shared = Arc::new(Shared {
                listener,
                what,
                handler,
                stop: AtomicBool::new(false),
                idle: AtomicUsize::new(0),
                counters: Counters::default(),
                workers: Mutex::new(Vec::new()),
                live: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(0),
            });
            // From here on an error drops `server`, which stops the workers already started.
            let server = Server { addr, shared };
            // Two to start with, so a second connection never waits for a thread to be
            // spawned. Spawned from this thread, they start in its namespace.
            for _ in 0..2 {
                spawn_worker(&server.shared)?;
            }
            Ok(server)
        })?
        .join()
        .map_err(|_| io::Error::other(format!("{what} server start thread panicked")))?
        .and_then(|r| r)
        .map_err(|e| annotate(e, format_args!("{what} server on {addr}")))
    }
}

fn spawn_worker(sh: &Arc<Shared>) -> io::Result<()> {
    let next = sh.clone();
    let h = std::thread::Builder::new()
        .name(format!("lg-{}", sh.what))
        .stack_size(STACK_SIZE)
        .spawn(move || worker(next))?;
    lock(&sh.workers).push(h);
    Ok(())
}

fn worker(sh: Arc<Shared>) {
    let mut buf = vec![0u8; CHUNK];
    while !sh.stop.load(Ordering::Acquire) {
        sh.idle.fetch_add(1, Ordering::AcqRel);
        let accepted = sh.listener.accept();
        let idle_before = sh.idle.fetch_sub(1, Ordering::AcqRel);
        let mut stream = match accepted {
            Ok((s, _)) => s,
            Err(_) if sh.stop.load(Ordering::Acquire) => break,
            Err(e) => {
                // ECONNABORTED, EMFILE...: the listener is still good. The pause keeps a
                // persistent condition (out of descriptors) from spinning a core.
                sh.counters.io_errors.fetch_add(1, Ordering::AcqRel);
                if e.kind() != io::ErrorKind::ConnectionAborted {
                    std::thread::sleep(Duration::from_millis(5));
                }
                continue;
            }
        };
        // Spawned from this thread, a new worker starts in this thread's namespace. Out of
        // threads, the workers there are keep serving.
        if idle_before == 1
            && !sh.stop.load(Ordering::Acquire)
            && let Err(e) = spawn_worker(&sh)
        {
            eprintln!("loadgen {} server: spawning a worker: {e}", sh.what);
        }
        sh.counters.connections.fetch_add(1, Ordering::AcqRel);
        let id = sh.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            let mut live = lock(&sh.live);
            // Checked under the lock `stop` sweeps under: a connection either is in the
            // sweep or sees the flag here, so none can keep a worker blocked past stop.
            if sh.stop.load(Ordering::Acquire) {
                break;
            }
            match stream.try_clone() {
                Ok(c) => {
                    live.insert(id, c);
                }
                Err(_) => {
                    sh.counters.io_errors.fetch_add(1, Ordering::AcqRel);
                    continue;
                }
            }
        }
        let result = stream.set_nodelay(true).and_then(|()| (sh.handler)(&mut stream, &mut buf, &sh.counters));
        if result.is_err() {
            sh.counters.io_errors.fetch_add(1, Ordering::AcqRel);
        }
        lock(&sh.live).remove(&id);
        // `stream` closes here: after the peer's EOF, so a FIN, never a reset.
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let sh = &self.shared;
        sh.stop.store(true, Ordering::Release);
        // On Linux, shutting down a listening socket makes every blocked `accept` return
        // (EINVAL), so no wake-up connection per idle worker is needed.
        let _ = SockRef::from(&sh.listener).shutdown(Shutdown::Read);
        for s in lock(&sh.live).values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Popping one at a time: a worker may still push a newly spawned one until it is
        // joined itself, and the lock must not be held across a join.
        loop {
            let next = lock(&sh.workers).pop();
            match next {
                Some(h) => {
                    let _ = h.join();
                }
                None => break,
            }
        }
    }
}

fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Writes back every byte until EOF.
fn serve_echo(stream: &mut TcpStream, buf: &mut [u8], counters: &Counters) -> io::Result<()> {
    loop {
        let n = read_some(stream, buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
        counters.bytes.fetch_add(n as u64, Ordering::AcqRel);
    }
}

/// Reads until EOF, checking the counter pattern from the connection's first byte on.
fn serve_sink(stream: &mut TcpStream, buf: &mut [u8], counters: &Counters) -> io::Result<()> {
    let pattern = pattern();
    let buf = &mut buf[..CHUNK];
    // Stream offset modulo the period, and whether the stream is still intact.
    let (mut at, mut intact) = (0usize, true);
    loop {
        let n = read_some(stream, buf)?;
        if n == 0 {
            return Ok(());
        }
        counters.bytes.fetch_add(n as u64, Ordering::AcqRel);
        if intact && buf[..n] != pattern[at..at + n] {
            // Once off, every later byte may be too: one error per connection. Keep reading
            // so the client still gets its orderly close.
            intact = false;
            counters.pattern_errors.fetch_add(1, Ordering::AcqRel);
        }
        at = (at + n) % PATTERN_PERIOD;
    }
}

/// Measures new connections per second: `concurrency` workers each connect to `dst`, send
/// one byte, read it back, close (FIN), and start over, for `duration`. Fails if more than
/// 1% of the cycles fail or any byte comes back wrong.
pub fn conn_rate(ns: Option<&str>, dst: SocketAddr, concurrency: usize, duration: Duration) -> Result<ConnRate> {
    let (counts, elapsed) = run_workers(ns, "conn_rate", concurrency, duration, move |id, ticket| {
        let Some(deadline) = ticket.ready() else { return Ok(Tally::default()) };
        let mut tally = Tally::default();
        let mut byte = id as u8;
        while Instant::now() < deadline {
            byte = byte.wrapping_add(1);
            match connect_once(dst, byte) {
                Ok(got) if got == byte => tally.ok += 1,
                Ok(got) => {
                    return Err(LoadError::Corrupt(format!(
                        "conn_rate to {dst}: sent byte {byte:#04x}, got {got:#04x} back"
                    )));
                }
                Err(e) => tally.error(e),
            }
        }
        Ok(tally)
    })?;
    let tally = Tally::sum(counts);
    tally.check("conn_rate")?;
    Ok(ConnRate {
        connections: tally.ok,
        per_second: rate(tally.ok, elapsed),
        errors: tally.errors,
        seconds: elapsed.as_secs_f64(),
    })
}

/// One conn_rate cycle; the byte that came back.
fn connect_once(dst: SocketAddr, byte: u8) -> io::Result<u8> {
    let mut s = connect(dst)?;
    s.write_all(&[byte]).map_err(|e| annotate(e, format_args!("write")))?;
    let mut got = [0u8];
    s.read_exact(&mut got).map_err(|e| annotate(e, format_args!("read")))?;
    Ok(got[0])
    // `s` closes here with nothing unread: a FIN.
}

fn connect(dst: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&dst, IO_TIMEOUT).map_err(|e| annotate(e, format_args!("connect to {dst}")))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Measures request round trips: `connections` persistent connections to `dst`, each on its
/// own thread sending a one-byte request and waiting for its one-byte answer (the byte
/// changes every time and must come back unchanged), for `duration`. A request that fails
/// counts as an error and the connection is reopened; more than 1% failing fails the run.
pub fn request_rate(ns: Option<&str>, dst: SocketAddr, connections: usize, duration: Duration) -> Result<RequestRate> {
    let (counts, elapsed) = run_workers(ns, "request_rate", connections, duration, move |id, ticket| {
        // Connected before the clock starts: setup is not what this measures.
        let first = connect(dst).map_err(|e| LoadError::io(format!("request_rate connection {id}"), e))?;
        let Some(deadline) = ticket.ready() else { return Ok(Tally::default()) };
        let mut conn = Some(first);
        let mut tally = Tally::default();
        let mut byte = (id as u8).wrapping_mul(31);
        let mut got = [0u8];
        while Instant::now() < deadline {
            let s = match conn.as_mut() {
                Some(s) => s,
                None => match connect(dst) {
                    Ok(s) => conn.insert(s),
                    Err(e) => {
                        tally.error(e);
                        continue;
                    }
                },
            };
            byte = byte.wrapping_add(1);
            let t0 = Instant::now();
            let r = s
                .write_all(&[byte])
                .map_err(|e| annotate(e, format_args!("write")))
                .and_then(|()| s.read_exact(&mut got).map_err(|e| annotate(e, format_args!("read"))));
            let took = t0.elapsed();
            match r {
                Ok(()) if got[0] == byte => {
                    tally.ok += 1;
                    tally.samples.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                }
                Ok(()) => {
                    return Err(LoadError::Corrupt(format!(
                        "request_rate to {dst}: sent byte {byte:#04x}, got {:#04x} back",
                        got[0]
                    )));
                }
                Err(e) => {
                    tally.error(e);
                    conn = None;
                }
            }
        }
        Ok(tally)
    })?;
    let mut tally = Tally::sum(counts);
    tally.check("request_rate")?;
    tally.samples.sort_unstable();
    Ok(RequestRate {
        requests: tally.ok,
        per_second: rate(tally.ok, elapsed),
        p50_us: percentile(&tally.samples, 0.50),
        p99_us: percentile(&tally.samples, 0.99),
        errors: tally.errors,
        seconds: elapsed.as_secs_f64(),
    })
}

/// Nearest-rank percentile of sorted samples; 0 with none.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Measures bulk throughput: `streams` connections to `dst` (the sink) each write the
/// counter pattern in 64 KiB writes for `duration`, then half-close and wait for the sink to
/// close, which it does only after counting every byte. Any I/O error fails the run: a
/// broken stream would make the byte comparison meaningless.
pub fn throughput(ns: Option<&str>, dst: SocketAddr, streams: usize, duration: Duration) -> Result<Throughput> {
    let (counts, elapsed) = run_workers(ns, "throughput", streams, duration, move |id, ticket| {
        let fail = |e| LoadError::io(format!("throughput stream {id} to {dst}"), e);
        let mut s = connect(dst).map_err(fail)?;
        let Some(deadline) = ticket.ready() else { return Ok(0u64) };
        let pattern = pattern();
        let (mut at, mut sent) = (0usize, 0u64);
        while Instant::now() < deadline {
            // A partial write just moves the offset: the stream stays one unbroken pattern.
            let n = match s.write(&pattern[at..at + CHUNK]) {
                Ok(0) => return Err(fail(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"))),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(fail(annotate(e, format_args!("write")))),
            };
            sent += n as u64;
            at = (at + n) % PATTERN_PERIOD;
        }
        s.shutdown(Shutdown::Write).map_err(|e| fail(annotate(e, format_args!("half-close"))))?;
        let mut buf = [0u8; 64];
        match read_some(&mut s, &mut buf) {
            Ok(0) => Ok(sent),
            Ok(n) => Err(LoadError::Corrupt(format!("throughput stream {id} to {dst}: the sink sent {n} bytes"))),
            Err(e) => Err(fail(annotate(e, format_args!("waiting for the sink to close")))),
        }
    })?;
    let bytes: u64 = counts.iter().sum();
    let secs = elapsed.as_secs_f64();
    Ok(Throughput { bytes, gbit_per_s: if secs > 0.0 { bytes as f64 * 8.0 / secs / 1e9 } else { 0.0 }, seconds: secs })
}

fn rate(n: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// One worker's outcome for the rate measurements.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    samples: Vec<u32>,
}

impl Tally {
    fn error(&mut self, e: io::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| e.to_string());
    }

    fn sum(all: Vec<Tally>) -> Tally {
        all.into_iter().fold(Tally::default(), |mut acc, t| {
            acc.ok += t.ok;
            acc.errors += t.errors;
            acc.first_error = acc.first_error.or(t.first_error);
            acc.samples.extend(t.samples);
            acc
        })
    }

    fn check(&self, what: &'static str) -> Result<()> {
        let attempts = self.ok + self.errors;
        if self.errors * 100 > attempts {
            return Err(LoadError::TooManyErrors {
                what,
                errors: self.errors,
                attempts,
                first: self.first_error.clone().unwrap_or_default(),
            });
        }
        Ok(())
    }
}

/// Where every client worker waits after its setup so all start measuring together, and
/// where the run is called off if any worker could not get ready.
#[derive(Default)]
struct StartLine {
    state: Mutex<StartState>,
    changed: Condvar,
}

#[derive(Default)]
struct StartState {
    arrived: usize,
    failed: usize,
    go: Go,
}

#[derive(Clone, Copy, Default)]
enum Go {
    #[default]
    Wait,
    Run(Instant),
    Abort,
}

impl StartLine {
    fn wait<'a>(
        &self,
        mut st: MutexGuard<'a, StartState>,
        until: impl Fn(&StartState) -> bool,
    ) -> MutexGuard<'a, StartState> {
        while !until(&st) {
            st = self.changed.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st
    }

    fn release(&self, go: Go) {
        lock(&self.state).go = go;
        self.changed.notify_all();
    }
}

/// A worker's place at the start line. Dropped without [`Ticket::ready`] (setup failed,
/// setns failed, the thread never started) it counts as a failed arrival, so the others are
/// never left waiting for it.
struct Ticket {
    line: Arc<StartLine>,
    arrived: bool,
}

impl Ticket {
    /// Reports ready and waits for the start: the deadline, or `None` if the run was called off.
    fn ready(mut self) -> Option<Instant> {
        self.arrived = true;
        let mut st = lock(&self.line.state);
        st.arrived += 1;
        self.line.changed.notify_all();
        match self.line.wait(st, |s| !matches!(s.go, Go::Wait)).go {
            Go::Run(deadline) => Some(deadline),
            Go::Wait | Go::Abort => None,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.arrived {
            let mut st = lock(&self.line.state);
            st.arrived += 1;
            st.failed += 1;
            self.line.changed.notify_all();
        }
    }
}

/// Runs `n` copies of `work` on threads in `ns`, starts them together once all are set up,
/// and returns their results and the time from the start until the last one finished. The
/// first worker error is the run's error.
fn run_workers<T, W>(
    ns: Option<&str>,
    what: &'static str,
    n: usize,
    duration: Duration,
    work: W,
) -> Result<(Vec<T>, Duration)>
where
    T: Send + 'static,
    W: Fn(usize, Ticket) -> Result<T> + Send + Sync + 'static,
{
    if n == 0 {
        return Err(LoadError::io(what, io::Error::new(io::ErrorKind::InvalidInput, "needs at least one worker")));
    }
    let line = Arc::new(StartLine::default());
    let work = Arc::new(work);
    let mut handles = Vec::with_capacity(n);
    for id in 0..n {
        let ticket = Ticket { line: line.clone(), arrived: false };
        let w = work.clone();
        match spawn_in_netns(ns, &format!("lg-{what}-{id}"), move || w(id, ticket)) {
            Ok(h) => handles.push(h),
            Err(e) => {
                line.release(Go::Abort);
                for h in handles {
                    let _ = h.join();
                }
                return Err(LoadError::io(format!("{what}: starting worker {id}"), e));
            }
        }
    }
    let all_ready = line.wait(lock(&line.state), |s| s.arrived == n).failed == 0;
    let start = Instant::now();
    line.release(if all_ready { Go::Run(start + duration) } else { Go::Abort });
    let mut results = Vec::with_capacity(n);
    let mut first_err = None;
    for (id, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(Ok(t))) => results.push(t),
            Ok(Ok(Err(e))) => {
                first_err.get_or_insert(e);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(LoadError::io(format!("{what}: worker {id}"), e));
            }
            Err(_) => {
                first_err.get_or_insert(LoadError::Panicked(format!("{what} worker {id}")));
            }
        }
    }
    let elapsed = start.elapsed();
    match first_err {
        Some(e) => Err(e),
        None => Ok((results, elapsed)),
    }
}

/// A server for connections that are opened, used once and then held: it echoes each
/// connection's first byte and keeps the connection, with no thread or buffer of its own
/// (one file descriptor each), until [`IdleServer::release`].
pub struct IdleServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl IdleServer {
    pub fn start(ns: &str, addr: SocketAddr) -> io::Result<Self> {
        let listener = crate::traffic::in_netns(ns, || -> io::Result<TcpListener> {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(BACKLOG)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })??;
        let (stop, release) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (flag, free) = (stop.clone(), release.clone());
        let thread = std::thread::Builder::new().name("lg-idle".into()).spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if free.swap(false, Ordering::Relaxed) {
                    held.clear();
                }
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let mut b = [0u8];
                        let echoed = s
                            .set_nonblocking(false)
                            .and_then(|()| s.set_read_timeout(Some(IO_TIMEOUT)))
                            .and_then(|()| s.read_exact(&mut b))
                            .and_then(|()| s.write_all(&b));
                        if echoed.is_ok() {
                            held.push(s);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
        Ok(Self { addr, stop, release, thread: Some(thread) })
    }

    /// Closes every connection held so far.
    pub fn release(&self) {
        self.release.store(true, Ordering::Relaxed);
    }
}

impl Drop for IdleServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const SHORT: Duration = Duration::from_millis(300);

    fn servers() -> Servers {
        Servers::start(None, LOOPBACK, 0, 0).expect("servers start")
    }

    #[test]
    fn echo_round_trips_and_conn_rate() {
        let srv = servers();
        let mut s = connect(srv.echo_addr).unwrap();
        let msg: Vec<u8> = (0..200_000u32).map(|i| (i * 13) as u8).collect();
        // Written from another thread: the echo comes back while we still write.
        let mut w = s.try_clone().unwrap();
        let sent = msg.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back == msg, "echo returned {} bytes, not the {} sent", back.len(), msg.len());

        let r = conn_rate(None, srv.echo_addr, 2, SHORT).unwrap();
        assert!(r.connections > 0 && r.errors == 0 && r.per_second > 0.0, "{r:?}");
        let echo = srv.echo_totals();
        assert!(echo.connections > r.connections && echo.io_errors == 0, "{echo:?}");
    }

    #[test]
    fn request_rate_has_ordered_percentiles() {
        let srv = servers();
        let r = request_rate(None, srv.echo_addr, 3, SHORT).unwrap();
        assert!(r.requests > 0 && r.errors == 0, "{r:?}");
        assert!(r.p50_us <= r.p99_us, "{r:?}");
        assert_eq!(srv.echo_totals().connections, 3);
    }

    #[test]
    fn throughput_loses_nothing() {
        let srv = servers();
        let r = throughput(None, srv.sink_addr, 2, SHORT).unwrap();
        let sink = srv.sink_totals();
        assert!(r.bytes > 0 && r.gbit_per_s > 0.0, "{r:?}");
        assert_eq!(sink.bytes, r.bytes, "{sink:?} vs {r:?}");
        assert_eq!((sink.connections, sink.pattern_errors, sink.io_errors), (2, 0, 0), "{sink:?}");
    }

    /// Sends `data` to the sink in `piece`-sized writes and waits for its close.
    fn sink_stream(srv: &Servers, data: &[u8], piece: usize) {
        let mut s = connect(srv.sink_addr).unwrap();
        for p in data.chunks(piece) {
            s.write_all(p).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn sink_checks_the_pattern() {
        let srv = servers();
        // Built from the definition, not from `pattern()`, and written in odd pieces so
        // the sink's reads land at every offset of the period.
        let mut data: Vec<u8> = (0..300_000usize).map(|i| (i % 251) as u8).collect();
        sink_stream(&srv, &data, 1000);
        assert_eq!(srv.sink_totals().pattern_errors, 0, "{:?}", srv.sink_totals());
        // A deliberately corrupting client: one wrong byte, well past the first read.
        data[200_003] ^= 0x40;
        sink_stream(&srv, &data, 4093);
        let sink = srv.sink_totals();
        assert_eq!((sink.connections, sink.bytes, sink.pattern_errors), (2, 2 * data.len() as u64, 1), "{sink:?}");
    }

    #[test]
    fn conn_rate_to_a_closed_port_fails() {
        let port = TcpListener::bind((LOOPBACK, 0)).unwrap().local_addr().unwrap().port();
        let started = Instant::now();
        let err = conn_rate(None, SocketAddr::new(LOOPBACK, port), 2, SHORT).unwrap_err();
        assert!(matches!(err, LoadError::TooManyErrors { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        assert!(request_rate(None, SocketAddr::new(LOOPBACK, port), 2, SHORT).is_err());
    }

    #[test]
    fn servers_stop_with_connections_open() {
        let srv = servers();
        let _idle = connect(srv.echo_addr).unwrap();
        let _sinking = connect(srv.sink_addr).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        drop(srv);
        assert!(started.elapsed() < Duration::from_secs(2), "drop took {:?}", started.elapsed());
    }

    #[test]
    fn missing_namespace_is_an_error() {
        let err = conn_rate(Some("mplab-no-such-ns"), SocketAddr::new(LOOPBACK, 9), 1, SHORT).unwrap_err();
        assert!(err.to_string().contains("/run/netns/mplab-no-such-ns"), "{err}");
    }
}
