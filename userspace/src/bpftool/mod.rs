//! `meshpath map`: `bpftool map show|list|dump`, byte for byte as Debian's bpftool 7.1.0
//! prints them (its source, `src/map.c`, `common.c`, `btf_dumper.c`, `json_writer.c` and
//! `main.c` at tag v7.1.0, is what this follows), plus `--decode`, a human view of meshpath's
//! own maps.
//!
//! Output is collected and written at the end; errors are bpftool's one-line
//! `Error: ...` on stderr, or `{"error":"..."}` inside the JSON on stdout with -j, and the
//! exit status is bpftool's (255 for its -1).

mod btf;
mod decode;
mod dump;
mod json;
mod show;

use std::io::{self, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::datapath::bpf;
use json::JsonWriter;

/// `meshpath map` arguments. The command and map handle are parsed as bpftool parses them
/// (its prefixes, its messages), so they are taken here as plain words.
#[derive(Debug, clap::Args)]
#[command(after_help = "COMMAND:\n  show|list [MAP]   one map, or every map of the kernel\n  dump MAP          \
    its entries: typed when it has BTF, hex otherwise\n  help\n\nMAP := { id MAP_ID | pinned FILE | name MAP_NAME }\n\n\
    The output is bpftool 7.1's, byte for byte. --decode prints meshpath's own maps in human terms.")]
pub struct MapArgs {
    /// JSON output, as `bpftool -j`.
    #[arg(short = 'j', long)]
    pub json: bool,
    /// Pretty-printed JSON (implies --json), as `bpftool -p`.
    #[arg(short = 'p', long)]
    pub pretty: bool,
    /// With `dump`: meshpath's maps in human terms (workload IPs, interfaces, identities,
    /// listener slots, counters) instead of bpftool's output.
    #[arg(long)]
    pub decode: bool,
    /// With --decode: the workload file, to name each IP's workload and identity.
    #[arg(long, env = "MESHPATH_WORKLOADS")]
    pub workloads: Option<PathBuf>,
    /// With --decode: trust domain of the identities.
    #[arg(long, env = "MESHPATH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// With --decode: network namespace (a name under /run/netns, or a path) whose interface
    /// indexes the maps hold; the node daemon's own namespace. Default: the current one.
    #[arg(long)]
    pub netns: Option<String>,
    /// COMMAND [MAP], as for `bpftool map`.
    #[arg(value_name = "COMMAND")]
    pub args: Vec<String>,
}

/// Everything `meshpath map` reports. The bpftool ones carry bpftool's exact text.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("what is '{0}'?")]
    BadArg(String),
    #[error("expected 'id', 'name' or 'pinned', got: '{0}'?")]
    ExpectedHandle(String),
    #[error("can't parse {0} as ID")]
    ParseId(String),
    #[error("can't parse name")]
    ParseName,
    #[error("get map by id ({id}): {}", strerror(*.errno))]
    GetById { id: u32, errno: i32 },
    #[error("bpf obj get ({path}): {reason}")]
    ObjGet { path: String, reason: String },
    #[error("can't read link type: {}", strerror(*.0))]
    LinkType(i32),
    #[error("incorrect object type: {0}")]
    ObjectType(&'static str),
    #[error("can't get next map: {}{}", strerror(*.0), if *.0 == libc::EINVAL { " -- kernel too old?" } else { "" })]
    NextMap(i32),
    #[error("can't get map by id ({id}): {}", strerror(*.errno))]
    MapById { id: u32, errno: i32 },
    #[error("can't get map info: {}", strerror(*.0))]
    MapInfo(i32),
    #[error("can't get map info ({id}): {}", strerror(*.errno))]
    MapInfoById { id: u32, errno: i32 },
    /// Listing maps by name failed (bpftool prints the bare strerror).
    #[error("{}", strerror(*.0))]
    NameScan(i32),
    #[error("failed to get btf")]
    Btf,
    #[error("failed to get kernel btf")]
    KernelBtf,
    #[error("Can't get # of possible cpus: {}", strerror(*.0))]
    PossibleCpus(i32),
    // Not bpftool's: it prints nothing when no map has the name, or its whole help text.
    #[error("no map named {0}")]
    NoSuchName(String),
    #[error(
        "usage: meshpath map {{ show | list }} [MAP] | dump MAP, MAP := {{ id MAP_ID | pinned FILE | name MAP_NAME }}"
    )]
    Usage,
    #[error("'{0}' is a bpftool command that meshpath map does not implement (it shows and dumps maps)")]
    Unsupported(String),
    #[error("--decode applies to 'dump' only")]
    DecodeNeedsDump,
    #[error("--decode knows meshpath's maps ({}), not {name}", meshpath_common::names::PINNED_MAPS.join(", "))]
    NoDecoder { name: String },
    #[error("--decode: {0}")]
    Decode(crate::datapath::pinned::DecodeError),
    #[error("--netns {path}: {source}")]
    Netns { path: String, source: io::Error },
    #[error("{0}")]
    Workloads(#[from] crate::workloads::WorkloadsError),
    #[error("{what}: {}", strerror(*.errno))]
    Sys { what: String, errno: i32 },
}

/// The error was reported already; exit with this status (bpftool's return value, as the
/// shell sees it: -1 is 255, -errno is 256 - errno).
#[derive(Debug, Clone, Copy)]
pub struct Reported(pub u8);

impl Reported {
    const FAIL: Reported = Reported(255);

    fn errno(errno: i32) -> Self {
        Reported((-errno) as u8)
    }
}

type Flow<T = ()> = Result<T, Reported>;

/// glibc's message for an errno, as `strerror` gives it.
pub fn strerror(errno: i32) -> String {
    let full = io::Error::from_raw_os_error(errno).to_string();
    full.strip_suffix(&format!(" (os error {errno})")).unwrap_or(&full).to_owned()
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Runs `meshpath map ...`; all output is written before it returns.
pub fn run(args: MapArgs) -> ExitCode {
    let done = run_captured(&args);
    // A closed pipe (`| head`) is not worth an error of its own.
    let _ = io::stdout().write_all(done.stdout.as_bytes());
    let _ = io::stdout().flush();
    let _ = io::stderr().write_all(done.stderr.as_bytes());
    ExitCode::from(done.status)
}

/// What a `meshpath map` run printed, and its exit status.
#[derive(Debug)]
pub struct Done {
    pub status: u8,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `meshpath map ...` into strings (what [`run`] prints; also what the fuzzer reads).
pub fn run_captured(args: &MapArgs) -> Done {
    let mut tool = Tool::new(args.json || args.pretty, args.pretty);
    let status = match tool.dispatch(args) {
        Ok(()) => 0,
        Err(Reported(code)) => code,
    };
    if let Some(w) = &tool.json
        && !tool.skip_json_end
    {
        w.finish(&mut tool.out);
    }
    Done { status, stdout: tool.out, stderr: tool.err }
}

/// Which JSON writer a dump goes through: bpftool's global `-j` one, or the pretty one it
/// makes for typed plain dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wtr {
    Global,
    Btf,
}

/// bpftool's process state: stdout, stderr and its JSON writers.
struct Tool {
    out: String,
    err: String,
    /// `json_wtr`, present with -j/-p.
    json: Option<JsonWriter>,
    btf_wtr: Option<JsonWriter>,
    /// bpftool `exit()`s on one error without closing its JSON.
    skip_json_end: bool,
    possible_cpus: Option<usize>,
}

/// What `map_parse_fds` yields: the maps a handle names, in id order.
type Fds = Vec<OwnedFd>;

impl Tool {
    fn new(json: bool, pretty: bool) -> Self {
        Self {
            out: String::new(),
            err: String::new(),
            json: json.then(|| JsonWriter::new(pretty)),
            btf_wtr: None,
            skip_json_end: false,
            possible_cpus: None,
        }
    }

    fn json_output(&self) -> bool {
        self.json.is_some()
    }

    fn writer(&mut self, which: Wtr) -> Option<(&mut JsonWriter, &mut String)> {
        let w = match which {
            Wtr::Global => self.json.as_mut()?,
            Wtr::Btf => self.btf_wtr.as_mut()?,
        };
        Some((w, &mut self.out))
    }

    /// `p_err`: into the JSON stream where bpftool would put it, else one stderr line.
    fn p_err(&mut self, e: &MapError) {
        match &mut self.json {
            Some(w) => {
                w.start_object(&mut self.out);
                w.name(&mut self.out, "error");
                w.enquote(&mut self.out, &e.to_string());
                w.end_object(&mut self.out);
            }
            None => self.err.push_str(&format!("Error: {e}\n")),
        }
    }

    /// An error of meshpath's own (not bpftool's): always one line on stderr, so that
    /// stdout stays what bpftool prints.
    fn note(&mut self, e: &MapError) {
        self.err.push_str(&format!("Error: {e}\n"));
    }

    /// `p_info`: stderr, and only without -j.
    fn p_info(&mut self, msg: &str) {
        if !self.json_output() {
            self.err.push_str(msg);
            self.err.push('\n');
        }
    }

    fn fail(&mut self, e: MapError) -> Reported {
        self.p_err(&e);
        Reported::FAIL
    }

    /// bpftool's `usage()`: its help text (here one line), or `null` with -j; exit 255.
    fn usage(&mut self) -> Reported {
        if let Some(w) = &mut self.json {
            w.null(&mut self.out);
        }
        self.note(&MapError::Usage);
        Reported::FAIL
    }

    fn dispatch(&mut self, args: &MapArgs) -> Flow {
        let words: Vec<&str> = args.args.iter().map(String::as_str).collect();
        // bpftool's command table, in its order: the first command the word is a prefix of
        // wins, and no word at all means the first, `show`.
        const COMMANDS: [&str; 17] = [
            "show",
            "list",
            "help",
            "dump",
            "update",
            "lookup",
            "getnext",
            "delete",
            "pin",
            "event_pipe",
            "create",
            "peek",
            "push",
            "enqueue",
            "pop",
            "dequeue",
            "freeze",
        ];
        let (cmd, rest) = match words.split_first() {
            None => ("show", &[][..]),
            Some((w, rest)) => match COMMANDS.iter().find(|c| c.starts_with(w)) {
                Some(c) => (*c, rest),
                None => {
                    // Unknown command: bpftool prints its help and fails.
                    return Err(self.usage());
                }
            },
        };
        if args.decode && cmd != "dump" {
            self.note(&MapError::DecodeNeedsDump);
            return Err(Reported::FAIL);
        }
        match cmd {
            "show" | "list" => self.do_show(rest),
            "dump" if args.decode => self.do_decode(rest, args),
            "dump" => self.do_dump(rest),
            "help" => {
                self.help();
                Ok(())
            }
            other => {
                self.note(&MapError::Unsupported(other.to_owned()));
                Err(Reported::FAIL)
            }
        }
    }

    fn help(&mut self) {
        if let Some(w) = &mut self.json {
            w.null(&mut self.out);
            return;
        }
        self.err.push_str(concat!(
            "Usage: meshpath map { show | list }   [MAP]\n",
            "       meshpath map dump       MAP [--decode [--workloads FILE] [--netns NAME]]\n",
            "       meshpath map help\n",
            "\n",
            "       MAP := { id MAP_ID | pinned FILE | name MAP_NAME }\n",
            "       OPTIONS := { {-j|--json} [{-p|--pretty}] }\n",
        ));
    }

    /// `map_parse_fds`: exactly two words, `id N`, `name NAME` or `pinned PATH`.
    fn parse_fds(&mut self, words: &[&str]) -> Flow<Fds> {
        let [kind, arg] = words else { return Err(self.usage()) };
        let (kind, arg) = (*kind, *arg);
        if "id".starts_with(kind) {
            let Some(id) = strtoul(arg) else { return Err(self.fail(MapError::ParseId(arg.to_owned()))) };
            // The id is an `unsigned int` in bpftool: truncated as C truncates.
            let id = id as u32;
            match bpf::map_fd_by_id(id) {
                Ok(fd) => Ok(vec![fd]),
                Err(e) => Err(self.fail(MapError::GetById { id, errno: errno_of(&e) })),
            }
        } else if "name".starts_with(kind) {
            // BPF_OBJ_NAME_LEN - 1
            if arg.len() > 15 {
                return Err(self.fail(MapError::ParseName));
            }
            let fds = self.fds_by_name(arg)?;
            if fds.is_empty() {
                self.note(&MapError::NoSuchName(arg.to_owned()));
                return Err(Reported::FAIL);
            }
            Ok(fds)
        } else if "pinned".starts_with(kind) {
            self.open_pinned_map(arg).map(|fd| vec![fd])
        } else {
            Err(self.fail(MapError::ExpectedHandle(kind.to_owned())))
        }
    }

    /// `map_fd_by_name`: every map whose name is `name`, in id order.
    fn fds_by_name(&mut self, name: &str) -> Flow<Fds> {
        let mut fds = Vec::new();
        let mut id = 0;
        loop {
            id = match bpf::next_map_id(id) {
                Ok(Some(next)) => next,
                Ok(None) => return Ok(fds),
                Err(e) => return Err(self.fail(MapError::NameScan(errno_of(&e)))),
            };
            // Unlike `show`, bpftool does not skip a map that vanished meanwhile.
            let fd = match bpf::map_fd_by_id(id) {
                Ok(fd) => fd,
                Err(e) => return Err(self.fail(MapError::MapById { id, errno: errno_of(&e) })),
            };
            // A fresh info struct per map here, so nothing carries over.
            let info = match InfoBuf::new().read(fd.as_fd()) {
                Ok(info) => info,
                Err(e) => return Err(self.fail(MapError::MapInfoById { id, errno: errno_of(&e) })),
            };
            if info.name == name {
                fds.push(fd);
            }
        }
    }

    /// `open_obj_pinned_any(path, BPF_OBJ_MAP)`.
    fn open_pinned_map(&mut self, path: &str) -> Flow<OwnedFd> {
        let fd = match bpf::obj_get(Path::new(path)) {
            Ok(fd) => fd,
            Err(e) => {
                let errno = errno_of(&e);
                // bpftool runs dirname() over its copy of the path before printing it (for
                // EACCES only), so that message shows the directory, not the path.
                let (shown, reason) = if errno == libc::EACCES {
                    let (truncated, dir) = glibc_dirname(path);
                    let reason = if crate::datapath::is_bpffs(Path::new(&dir)) {
                        strerror(errno)
                    } else {
                        "directory not in bpf file system (bpffs)".to_owned()
                    };
                    (truncated, reason)
                } else {
                    (path.to_owned(), strerror(errno))
                };
                return Err(self.fail(MapError::ObjGet { path: shown, reason }));
            }
        };
        let link = match std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd))) {
            Ok(l) => l.to_string_lossy().into_owned(),
            Err(e) => return Err(self.fail(MapError::LinkType(errno_of(&e)))),
        };
        let kind = if link.contains("bpf-map") {
            return Ok(fd);
        } else if link.contains("bpf-prog") {
            "prog"
        } else if link.contains("bpf-link") {
            "link"
        } else {
            "unknown"
        };
        Err(self.fail(MapError::ObjectType(kind)))
    }

    /// `get_possible_cpus`: bpftool exits on failure.
    fn possible_cpus(&mut self) -> Flow<usize> {
        if let Some(n) = self.possible_cpus {
            return Ok(n);
        }
        match possible_cpus() {
            Ok(n) => {
                self.possible_cpus = Some(n);
                Ok(n)
            }
            Err(errno) => {
                self.p_err(&MapError::PossibleCpus(errno));
                self.skip_json_end = true;
                Err(Reported::FAIL)
            }
        }
    }
}

/// A map's `bpf_map_info`, decoded.
#[derive(Debug, Clone)]
pub struct MapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    pub name: String,
    pub ifindex: u32,
    pub btf_vmlinux_value_type_id: u32,
    pub netns_dev: u64,
    pub netns_ino: u64,
    pub btf_id: u32,
    pub btf_key_type_id: u32,
    pub btf_value_type_id: u32,
}

/// One `struct bpf_map_info` that bpftool reuses for every map of a loop.
///
/// Since Linux 6.18 ("bpf: Return hashes of maps in BPF_OBJ_GET_INFO_BY_FD") the kernel
/// first copies the caller's buffer in and then overwrites only what it knows; the BTF
/// fields of a map without BTF are left alone. bpftool's `map list` hands the kernel the
/// previous map's info again, so a map without BTF shows the previous map's `btf_id` there,
/// while `map show id N` (a fresh buffer) shows none. Passing the same buffer the same way
/// reproduces that on any kernel, and does nothing on kernels that clear the buffer.
struct InfoBuf {
    info: bpf::bpf_map_info,
    len: u32,
}

impl InfoBuf {
    fn new() -> Self {
        Self { info: bpf::zeroed(), len: size_of::<bpf::bpf_map_info>() as u32 }
    }

    fn read(&mut self, fd: BorrowedFd<'_>) -> io::Result<MapInfo> {
        bpf::map_info_into(fd, &mut self.info, &mut self.len)?;
        let i = &self.info;
        let name: Vec<u8> = i.name.iter().map(|c| *c as u8).take_while(|c| *c != 0).collect();
        Ok(MapInfo {
            map_type: i.type_,
            id: i.id,
            key_size: i.key_size,
            value_size: i.value_size,
            max_entries: i.max_entries,
            map_flags: i.map_flags,
            name: String::from_utf8_lossy(&name).into_owned(),
            ifindex: i.ifindex,
            btf_vmlinux_value_type_id: i.btf_vmlinux_value_type_id,
            netns_dev: i.netns_dev,
            netns_ino: i.netns_ino,
            btf_id: i.btf_id,
            btf_key_type_id: i.btf_key_type_id,
            btf_value_type_id: i.btf_value_type_id,
        })
    }
}

pub const MAP_TYPE_PROG_ARRAY: u32 = 3;
pub const MAP_TYPE_PERCPU_HASH: u32 = 5;
pub const MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
pub const MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
pub const MAP_TYPE_HASH_OF_MAPS: u32 = 13;
pub const MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
pub const MAP_TYPE_PERCPU_CGROUP_STORAGE: u32 = 21;

/// `libbpf_bpf_map_type_str` of the libbpf Debian's bpftool is built with (Linux 6.1's,
/// which ends at user_ringbuf: later types print as `type N`).
pub fn map_type_str(t: u32) -> Option<&'static str> {
    const NAMES: [&str; 32] = [
        "unspec",
        "hash",
        "array",
        "prog_array",
        "perf_event_array",
        "percpu_hash",
        "percpu_array",
        "stack_trace",
        "cgroup_array",
        "lru_hash",
        "lru_percpu_hash",
        "lpm_trie",
        "array_of_maps",
        "hash_of_maps",
        "devmap",
        "sockmap",
        "cpumap",
        "xskmap",
        "sockhash",
        "cgroup_storage",
        "reuseport_sockarray",
        "percpu_cgroup_storage",
        "queue",
        "stack",
        "sk_storage",
        "devmap_hash",
        "struct_ops",
        "ringbuf",
        "inode_storage",
        "task_storage",
        "bloom_filter",
        "user_ringbuf",
    ];
    NAMES.get(t as usize).copied()
}

/// `libbpf_bpf_prog_type_str`, same libbpf (ends at syscall).
pub fn prog_type_str(t: u32) -> Option<&'static str> {
    const NAMES: [&str; 32] = [
        "unspec",
        "socket_filter",
        "kprobe",
        "sched_cls",
        "sched_act",
        "tracepoint",
        "xdp",
        "perf_event",
        "cgroup_skb",
        "cgroup_sock",
        "lwt_in",
        "lwt_out",
        "lwt_xmit",
        "sock_ops",
        "sk_skb",
        "cgroup_device",
        "sk_msg",
        "raw_tracepoint",
        "cgroup_sock_addr",
        "lwt_seg6local",
        "lirc_mode2",
        "sk_reuseport",
        "flow_dissector",
        "cgroup_sysctl",
        "raw_tracepoint_writable",
        "cgroup_sockopt",
        "tracing",
        "struct_ops",
        "ext",
        "lsm",
        "sk_lookup",
        "syscall",
    ];
    NAMES.get(t as usize).copied()
}

pub use bpf::map_is_per_cpu;

/// C's `strtoul(s, &end, 0)` accepting only when `*end == '\0'`: leading blanks, a sign,
/// 0x for hex, 0 for octal; the empty string is 0; overflow saturates.
fn strtoul(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let mut i = b.iter().take_while(|c| matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')).count();
    let neg = match b.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let (radix, digits_at) = if b.get(i) == Some(&b'0')
        && matches!(b.get(i + 1), Some(b'x' | b'X'))
        && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    {
        (16, i + 2)
    } else if b.get(i) == Some(&b'0') {
        (8, i)
    } else {
        (10, i)
    };
    let digits = b[digits_at..].iter().take_while(|c| (**c as char).is_digit(radix)).count();
    if digits == 0 {
        // No conversion: the end pointer is the string itself, fine only if it is empty.
        return b.is_empty().then_some(0);
    }
    if digits_at + digits != b.len() {
        return None;
    }
    let text = std::str::from_utf8(&b[digits_at..digits_at + digits]).ok()?;
    // Out of range is ULONG_MAX, whatever the sign.
    Some(match u64::from_str_radix(text, radix) {
        Ok(v) if neg => v.wrapping_neg(),
        Ok(v) => v,
        Err(_) => u64::MAX,
    })
}

/// glibc's `dirname` on a copy: (the copy as it is afterwards, the result).
fn glibc_dirname(path: &str) -> (String, String) {
    let b = path.as_bytes();
    let mut last = b.iter().rposition(|c| *c == b'/');
    // A trailing slash: the last slash that matters is the one before it.
    if let Some(ls) = last
        && ls != 0
        && ls == b.len() - 1
    {
        let mut runp = ls;
        while runp != 0 && b[runp - 1] == b'/' {
            runp -= 1;
        }
        if runp != 0 {
            last = b[..runp].iter().rposition(|c| *c == b'/');
        }
    }
    match last {
        Some(ls) => {
            let mut runp = ls;
            while runp != 0 && b[runp - 1] == b'/' {
                runp -= 1;
            }
            let end = if runp == 0 { if ls == 1 { 2 } else { 1 } } else { runp };
            let s = String::from_utf8_lossy(&b[..end.min(b.len())]).into_owned();
            (s.clone(), s)
        }
        None => (path.to_owned(), ".".to_owned()),
    }
}

/// `libbpf_num_possible_cpus`: how many CPUs /sys/devices/system/cpu/possible lists.
fn possible_cpus() -> Result<usize, i32> {
    bpf::possible_cpus().map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))
}

/// `get_fdinfo(fd, key)`: the value of the first /proc/self/fdinfo line containing `key`.
fn fdinfo(fd: BorrowedFd<'_>, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", std::os::fd::AsRawFd::as_raw_fd(&fd))).ok()?;
    let line = text.lines().find(|l| l.contains(key))?;
    let (_, value) = line.split_once('\t')?;
    (!value.is_empty()).then(|| value.to_owned())
}

/// C's `atoll`.
fn atoll(s: &str) -> i64 {
    let s = s.trim_start();
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let v = digits
        .bytes()
        .take_while(u8::is_ascii_digit)
        .fold(0i64, |acc, d| acc.wrapping_mul(10).wrapping_add(i64::from(d - b'0')));
    if neg { v.wrapping_neg() } else { v }
}

/// `fprint_hex(stdout, data, n, " ")`: two spaces every 8 bytes, a newline every 16.
fn fprint_hex(out: &mut String, data: &[u8]) {
    use std::fmt::Write as _;
    for (i, b) in data.iter().enumerate() {
        if i == 0 {
        } else if i % 16 == 0 {
            out.push('\n');
        } else if i % 8 == 0 {
            out.push_str("  ");
        } else {
            out.push(' ');
        }
        let _ = write!(out, "{b:02x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_as_strtoul_does() {
        assert_eq!(strtoul("2787"), Some(2787));
        assert_eq!(strtoul("0x10"), Some(16));
        assert_eq!(strtoul("010"), Some(8));
        assert_eq!(strtoul("0"), Some(0));
        assert_eq!(strtoul(""), Some(0));
        assert_eq!(strtoul(" 7"), Some(7));
        assert_eq!(strtoul("-1").map(|v| v as u32), Some(u32::MAX));
        assert_eq!(strtoul("x"), None);
        assert_eq!(strtoul("12a"), None);
        assert_eq!(strtoul("0x"), None);
        assert_eq!(strtoul("09"), None);
        assert_eq!(strtoul(" "), None);
    }

    #[test]
    fn dirname_as_glibc() {
        assert_eq!(glibc_dirname("/tmp"), ("/".into(), "/".into()));
        assert_eq!(glibc_dirname("/tmp/x"), ("/tmp".into(), "/tmp".into()));
        assert_eq!(glibc_dirname("/tmp/x/"), ("/tmp".into(), "/tmp".into()));
        assert_eq!(glibc_dirname("x"), ("x".into(), ".".into()));
        assert_eq!(glibc_dirname("//x"), ("//".into(), "//".into()));
        assert_eq!(glibc_dirname("/"), ("/".into(), "/".into()));
    }

    #[test]
    fn hex_layout() {
        let mut out = String::new();
        fprint_hex(&mut out, &(0u8..18).collect::<Vec<_>>());
        assert_eq!(out, "00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f\n10 11");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(bpf::parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(bpf::parse_cpu_list("0,2-3,5"), Some(4));
        assert_eq!(bpf::parse_cpu_list("x"), None);
    }

    #[test]
    fn strerror_is_glibc_text() {
        assert_eq!(strerror(libc::ENOSPC), "No space left on device");
        assert_eq!(strerror(libc::ENOENT), "No such file or directory");
    }
}
