//! Loads meshpath's eBPF object, pins its maps and links under the node's bpffs directory,
//! attaches the programs and gives typed access to the maps.
//!
//! Pins outlive the daemon on purpose: when it stops, the TC and sk_lookup programs stay
//! attached and, with no listener left in the SOCKMAP, enrolled traffic is dropped instead
//! of bypassing the proxy. A restarted daemon picks the pins up again.

pub mod pinned;
mod sys;
mod tcfilter;

/// Raw BPF syscalls for inspecting any map (used by `meshpath map` and `status`).
pub use sys::{async_events, bpf};

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, IterableMap, MapData, MapError};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, SkLookup, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use meshpath_common::names::{
    BPFFS_ROOT, MAP_COUNTERS, MAP_EVENTS, MAP_INTERFACES, MAP_LISTENERS, MAP_WORKLOADS, PIN_DIR, PIN_LINKS_SUBDIR,
    PIN_SK_LOOKUP_LINK, PIN_TC_EGRESS_LINK_PREFIX, PIN_TC_LINK_PREFIX, PINNED_MAPS, PROG_SK_LOOKUP, PROG_TC_EGRESS,
    PROG_TC_INGRESS, STATE_DIR, TC_FILTER_HANDLE, TC_FILTER_PRIORITY,
};
use meshpath_common::{Counter, InterfaceValue, Listener, WorkloadKey, WorkloadValue};
use sys::{IfValue, PodKey, PodValue};

/// The compiled eBPF object, built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshpath-ebpf.o"));

/// The programs' drop events ([`meshpath_common::DropEvent`]), to read as they come.
pub type Events = aya::maps::RingBuf<MapData>;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("invalid node name {0:?}: use a DNS-1123 name (lowercase letters, digits, '-' and '.')")]
    NodeName(String),
    #[error("bpffs at {BPFFS_ROOT}: {0}")]
    Bpffs(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("the eBPF object has no {kind} named {name}")]
    Missing { kind: &'static str, name: &'static str },
    #[error("this kernel lacks {feature}, which meshpath needs")]
    KernelFeature { feature: &'static str },
    #[error(
        "this meshpath was built without the eBPF toolchain and carries no eBPF programs: build it with `cargo xtask build`"
    )]
    NoPrograms,
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error(transparent)]
    Decode(#[from] pinned::DecodeError),
    #[error("pinned link {path}: {source}")]
    Link { path: PathBuf, source: aya::programs::links::LinkError },
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io { path: path.to_owned(), source }
}

/// Node names become directory names on bpffs: accept only DNS-1123 subdomains.
pub fn validate_node_name(node: &str) -> Result<()> {
    let ok = !node.is_empty()
        && node.len() <= 253
        && node.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !node.starts_with(['-', '.'])
        && !node.ends_with(['-', '.'])
        && !node.contains("..");
    if ok { Ok(()) } else { Err(DatapathError::NodeName(node.to_owned())) }
}

/// `/sys/fs/bpf/meshpath/<node>`.
pub fn node_pin_dir(node: &str) -> Result<PathBuf> {
    validate_node_name(node)?;
    Ok(Path::new(PIN_DIR).join(node))
}

/// Where this process can read `node`'s pins: [`node_pin_dir`], or, when this mount
/// namespace has no bpffs on /sys/fs/bpf, the same directory as PID 1 or the nearest
/// ancestor process sees it (`/proc/<pid>/root/...`): `ip netns exec` runs its command in a
/// mount namespace of its own with a fresh /sys, while the shell that ran it still sees the
/// host's. [`node_pin_dir`] when none has it.
pub fn readable_pin_dir(node: &str) -> Result<PathBuf> {
    let dir = node_pin_dir(node)?;
    if dir.exists() || is_bpffs(Path::new(BPFFS_ROOT)) {
        return Ok(dir);
    }
    let relative = dir.strip_prefix("/").unwrap_or(&dir).to_owned();
    let seen_by = |pid: u32| Path::new("/proc").join(pid.to_string()).join("root").join(&relative);
    Ok(std::iter::once(1).chain(ancestors()).map(seen_by).find(|p| is_bpffs(p)).unwrap_or(dir))
}

/// Whether `dir` (from [`readable_pin_dir`]) is read through another process's mounts.
pub fn read_through_another_mount_namespace(dir: &Path) -> bool {
    !dir.starts_with(PIN_DIR)
}

/// This process's ancestors, nearest first, below PID 1 (at most 64).
fn ancestors() -> impl Iterator<Item = u32> {
    let parent_of = |pid: &u32| -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim().parse().ok()
    };
    std::iter::successors(Some(std::os::unix::process::parent_id()), parent_of).take_while(|p| *p > 1).take(64)
}

/// Whether nothing of `node` is pinned or noted as attached over netlink.
pub fn is_fresh(node: &str) -> Result<bool> {
    Ok(!node_pin_dir(node)?.exists() && !netlink_state_dir(node)?.exists())
}

/// Mounts bpffs on /sys/fs/bpf unless it is already there (it is not by default on
/// every distribution, nor inside some containers).
pub fn ensure_bpffs() -> Result<()> {
    let root = Path::new(BPFFS_ROOT);
    if is_bpffs(root) {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| DatapathError::Bpffs(format!("not mounted and mounting it failed: {e}")))?;
    if !is_bpffs(root) {
        return Err(DatapathError::Bpffs("mounted, but statfs does not report bpffs".into()));
    }
    tracing::info!(path = BPFFS_ROOT, "mounted bpffs");
    Ok(())
}

/// Whether `path` is on a bpf file system.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// How the TC classifier is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links (Linux 6.6+): pinned, replaced atomically, shown by BPF_PROG_QUERY.
    Tcx,
    /// A cls_bpf filter on a clsact qdisc, over netlink: for older kernels. The filter
    /// lives until removed; restarts swap its program in place.
    Netlink,
}

impl AttachMode {
    pub fn kernel_has_tcx() -> bool {
        aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
    }

    /// TCX where the kernel has it, netlink otherwise.
    pub fn detect() -> Self {
        if Self::kernel_has_tcx() { AttachMode::Tcx } else { AttachMode::Netlink }
    }
}

/// Where on an interface a TC program runs: the classifier on ingress, the bypass guard on
/// egress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    pub const ALL: [Hook; 2] = [Hook::Ingress, Hook::Egress];

    pub const fn program(self) -> &'static str {
        match self {
            Hook::Ingress => PROG_TC_INGRESS,
            Hook::Egress => PROG_TC_EGRESS,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }

    fn pin_prefix(self) -> &'static str {
        match self {
            Hook::Ingress => PIN_TC_LINK_PREFIX,
            Hook::Egress => PIN_TC_EGRESS_LINK_PREFIX,
        }
    }
}

/// A classifier attachment this instance made or took over.
enum TcAttachment {
    Tcx(#[allow(dead_code, reason = "held for its fd; the pin keeps the link")] PinnedLink),
    Netlink,
}

/// `/run/meshpath/<node>/clsact/`: one file per interface holding a netlink filter of ours,
/// saying whether we also created its clsact qdisc (and so may remove it on uninstall).
fn netlink_state_dir(node: &str) -> Result<PathBuf> {
    validate_node_name(node)?;
    Ok(Path::new(STATE_DIR).join(node).join("clsact"))
}

/// Sum of a counter over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub classified: u64,
    pub steered: u64,
    pub missing_socket: u64,
    pub spoof_dropped: u64,
    pub malformed: u64,
    pub undelivered: u64,
}

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        match c {
            Counter::Classified => self.classified,
            Counter::Steered => self.steered,
            Counter::MissingSocket => self.missing_socket,
            Counter::SpoofDropped => self.spoof_dropped,
            Counter::Malformed => self.malformed,
            Counter::Undelivered => self.undelivered,
        }
    }

    /// Totals of the known counters among `values`.
    pub fn from_values(values: &[pinned::CounterValues]) -> Self {
        let mut out = Self::default();
        for v in values {
            if let Some(c) = v.counter {
                *out.slot(c) = v.total();
            }
        }
        out
    }

    fn slot(&mut self, c: Counter) -> &mut u64 {
        match c {
            Counter::Classified => &mut self.classified,
            Counter::Steered => &mut self.steered,
            Counter::MissingSocket => &mut self.missing_socket,
            Counter::SpoofDropped => &mut self.spoof_dropped,
            Counter::Malformed => &mut self.malformed,
            Counter::Undelivered => &mut self.undelivered,
        }
    }
}

/// Opens a node's pinned map `name` and decodes it with `decode` (from [`pinned`]).
fn read_pinned<T>(
    node: &str,
    name: &'static str,
    decode: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> Result<T, pinned::DecodeError>,
) -> Result<T> {
    let path = readable_pin_dir(node)?.join(name);
    let fd = bpf::obj_get(&path).map_err(io_err(&path))?;
    Ok(decode(fd.as_fd())?)
}

/// The pinned counters of a node, summed over CPUs (for `status`, metrics and tests).
pub fn read_pinned_counters(node: &str) -> Result<Counters> {
    read_pinned(node, MAP_COUNTERS, pinned::counters).map(|values| Counters::from_values(&values))
}

/// The pinned workload map of a node: IP → ifindex.
pub fn read_pinned_workloads(node: &str) -> Result<BTreeMap<std::net::IpAddr, u32>> {
    read_pinned(node, MAP_WORKLOADS, pinned::workloads)
}

/// A loaded and attached datapath for one node.
pub struct Datapath {
    // Field order matters for drop: links and maps are closed before the object.
    tc_links: BTreeMap<(u32, Hook), TcAttachment>,
    /// TCX attachments another program has been seen ahead of (warned about once).
    behind: BTreeSet<(u32, Hook)>,
    mode: AttachMode,
    node: String,
    /// Held for its fd (the pin keeps the link too); `None` only while being re-pinned.
    sk_lookup_link: Option<PinnedLink>,
    workloads: BpfHashMap<MapData, PodKey, PodValue>,
    interfaces: BpfHashMap<MapData, u32, IfValue>,
    /// A SOCKMAP with 8-byte values, which aya's `SockMap` does not take: written raw.
    listeners: MapData,
    events: Option<Events>,
    /// A second fd of each pinned map, to pin it again if its pin is deleted.
    pinned_maps: Vec<(&'static str, std::os::fd::OwnedFd)>,
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

/// How often a program load the verifier gave up on is tried (libbpf's count).
const LOAD_ATTEMPTS: u32 = 5;

/// Loads a program, again when the verifier gave up with EAGAIN: it does when a signal is
/// pending for the loading thread (the daemon handles SIGTERM and SIGINT from its start),
/// which is no verdict on the program. libbpf retries such loads the same way; CI runs saw
/// daemons fail their start on one.
fn load_retrying(name: &'static str, load: impl FnMut() -> std::result::Result<(), ProgramError>) -> Result<()> {
    let interrupted = |e: &ProgramError| matches!(e, ProgramError::LoadError { io_error, .. } if io_error.kind() == io::ErrorKind::WouldBlock);
    retrying(load, interrupted, |attempt| {
        tracing::info!(program = name, attempt, "the verifier was interrupted (EAGAIN); loading again");
    })
    .map_err(|source| DatapathError::Program { name, source })
}

/// Runs `f` until it succeeds, fails otherwise than `interrupted`, or [`LOAD_ATTEMPTS`] ran,
/// a little longer apart each time.
fn retrying<E>(
    mut f: impl FnMut() -> std::result::Result<(), E>,
    interrupted: impl Fn(&E) -> bool,
    again: impl Fn(u32),
) -> std::result::Result<(), E> {
    let mut attempt = 1;
    loop {
        match f() {
            Err(e) if interrupted(&e) && attempt < LOAD_ATTEMPTS => {
                again(attempt);
                std::thread::sleep(std::time::Duration::from_millis(10 * u64::from(attempt)));
                attempt += 1;
            }
            result => return result,
        }
    }
}

impl Datapath {
    /// Loads the object with its maps pinned under the node's directory (reusing pins a
    /// previous instance left), loads the programs and attaches sk_lookup to the current
    /// network namespace. TC attachments are made per interface with [`Self::attach_tc`].
    pub fn load(node: &str, mode: AttachMode) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoPrograms);
        }
        if mode == AttachMode::Tcx && !AttachMode::kernel_has_tcx() {
            return Err(DatapathError::KernelFeature { feature: "TCX (Linux 6.6; use the netlink attach mode)" });
        }
        // Without it every captured connection attempt would fail its delivery check.
        if !aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 10, 0)) {
            return Err(DatapathError::KernelFeature { feature: "bpf_fib_lookup with a mark (Linux 6.10)" });
        }
        ensure_bpffs()?;
        let pin_dir = node_pin_dir(node)?;
        let links_dir = pin_dir.join(PIN_LINKS_SUBDIR);
        std::fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;

        let map_paths: Vec<(&'static str, PathBuf)> = PINNED_MAPS.into_iter().map(|m| (m, pin_dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        for hook in Hook::ALL {
            let tc: &mut SchedClassifier = program(&mut ebpf, hook.program())?;
            load_retrying(hook.program(), || tc.load())?;
        }

        let sk: &mut SkLookup = program(&mut ebpf, PROG_SK_LOOKUP)?;
        load_retrying(PROG_SK_LOOKUP, || sk.load())?;
        let netns_path = Path::new("/proc/self/ns/net");
        let netns = File::open(netns_path).map_err(io_err(netns_path))?;
        let id = sk.attach(netns).map_err(|source| DatapathError::Program { name: PROG_SK_LOOKUP, source })?;
        let link: FdLink =
            sk.take_link(id).map_err(|source| DatapathError::Program { name: PROG_SK_LOOKUP, source })?.into();
        let sk_lookup_link = replace_pin(link, &links_dir.join(PIN_SK_LOOKUP_LINK))?;

        let workloads = BpfHashMap::try_from(take_map(&mut ebpf, MAP_WORKLOADS)?)
            .map_err(|source| DatapathError::Map { name: MAP_WORKLOADS, source })?;
        let interfaces = BpfHashMap::try_from(take_map(&mut ebpf, MAP_INTERFACES)?)
            .map_err(|source| DatapathError::Map { name: MAP_INTERFACES, source })?;
        let events = aya::maps::RingBuf::try_from(take_map(&mut ebpf, MAP_EVENTS)?)
            .map_err(|source| DatapathError::Map { name: MAP_EVENTS, source })?;
        let listeners = match take_map(&mut ebpf, MAP_LISTENERS)? {
            aya::maps::Map::SockMap(m) => m,
            _ => return Err(DatapathError::Missing { kind: "SOCKMAP", name: MAP_LISTENERS }),
        };

        let mut pinned_maps = Vec::new();
        for (name, path) in map_paths {
            pinned_maps.push((name, bpf::obj_get(&path).map_err(io_err(&path))?));
        }
        tracing::info!(pin_dir = %pin_dir.display(), "datapath loaded; sk_lookup attached to this network namespace");
        Ok(Self {
            tc_links: BTreeMap::new(),
            behind: BTreeSet::new(),
            mode,
            node: node.to_owned(),
            sk_lookup_link: Some(sk_lookup_link),
            workloads,
            interfaces,
            listeners,
            events: Some(events),
            pinned_maps,
            ebpf,
            pin_dir,
        })
    }

    /// Takes the drop events out so the caller can follow them asynchronously.
    pub fn take_events(&mut self) -> Option<Events> {
        self.events.take()
    }

    fn tc_pin_path(&self, ifindex: u32, hook: Hook) -> PathBuf {
        self.pin_dir.join(PIN_LINKS_SUBDIR).join(format!("{}{ifindex}", hook.pin_prefix()))
    }

    /// Pins again whatever of ours someone deleted from bpffs (maps and links stay alive
    /// while this process holds them; without their pins a restart would lose them, and
    /// `status` and the metrics could not see them). The paths it restored.
    pub fn restore_pins(&mut self) -> Result<Vec<PathBuf>> {
        let mut restored = Vec::new();
        let links = self.pin_dir.join(PIN_LINKS_SUBDIR);
        if !links.exists() {
            std::fs::create_dir_all(&links).map_err(io_err(&links))?;
        }
        for (name, fd) in &self.pinned_maps {
            let path = self.pin_dir.join(name);
            if !path.exists() {
                bpf::obj_pin(fd.as_fd(), &path).map_err(io_err(&path))?;
                restored.push(path);
            }
        }
        let sk = links.join(PIN_SK_LOOKUP_LINK);
        if !sk.exists()
            && let Some(link) = self.sk_lookup_link.take()
        {
            self.sk_lookup_link = Some(repin(link, &sk)?);
            restored.push(sk);
        }
        let missing: Vec<(u32, Hook)> = self
            .tc_links
            .iter()
            .filter(|((i, h), a)| matches!(a, TcAttachment::Tcx(_)) && !self.tc_pin_path(*i, *h).exists())
            .map(|(k, _)| *k)
            .collect();
        for key in missing {
            let path = self.tc_pin_path(key.0, key.1);
            if let Some(TcAttachment::Tcx(link)) = self.tc_links.remove(&key) {
                self.tc_links.insert(key, TcAttachment::Tcx(repin(link, &path)?));
                restored.push(path);
            }
        }
        Ok(restored)
    }

    /// Pins this process's links again in place of a successor's (one that started, put its
    /// own pins in, and went away before taking over): with the successor's links gone, the
    /// pins must hold ours so the programs outlive this process too. The links it re-pinned.
    pub fn reclaim_pins(&mut self) -> Result<usize> {
        let mut reclaimed = 0;
        let keys: Vec<(u32, Hook)> = self.tc_links.keys().copied().collect();
        for key in keys {
            let path = self.tc_pin_path(key.0, key.1);
            if !matches!(self.tc_links.get(&key), Some(TcAttachment::Tcx(_))) {
                continue;
            }
            remove_file_if_exists(&path)?;
            if let Some(TcAttachment::Tcx(link)) = self.tc_links.remove(&key) {
                self.tc_links.insert(key, TcAttachment::Tcx(repin(link, &path)?));
                reclaimed += 1;
            }
        }
        let path = self.pin_dir.join(PIN_LINKS_SUBDIR).join(PIN_SK_LOOKUP_LINK);
        remove_file_if_exists(&path)?;
        if let Some(link) = self.sk_lookup_link.take() {
            self.sk_lookup_link = Some(repin(link, &path)?);
            reclaimed += 1;
        }
        Ok(reclaimed)
    }

    /// Interfaces this instance has attached both programs to: only those get workloads
    /// enrolled, so no enrolled pod sits behind a veth without its egress guard.
    pub fn attached_interfaces(&self) -> BTreeSet<u32> {
        let has = |i: u32, h: Hook| self.tc_links.contains_key(&(i, h));
        self.tc_links.keys().map(|(i, _)| *i).filter(|i| Hook::ALL.iter().all(|h| has(*i, *h))).collect()
    }

    /// Forgets attachments the kernel no longer has (a `tc qdisc del`, another program's
    /// cleanup, a detached link), so the next [`Self::attach_tc`] puts them back; the
    /// interfaces that had lost one. Warns once when another program got ahead of ours.
    pub fn verify_attachments(&mut self, names: &BTreeMap<u32, String>) -> Vec<u32> {
        let mut lost = Vec::new();
        let keys: Vec<(u32, Hook)> = self.tc_links.keys().copied().collect();
        for (ifindex, hook) in keys {
            let Some(ifname) = names.get(&ifindex) else { continue };
            let place = match self.mode {
                AttachMode::Tcx => tcx_position(ifname, hook),
                AttachMode::Netlink => tc_attached(self.mode, ifname, hook).then_some(0),
            };
            match place {
                Some(0) => {
                    self.behind.remove(&(ifindex, hook));
                    continue;
                }
                // Another program was put ahead of ours: it can accept or redirect packets
                // before meshpath looks. The kernel does not let a chain hold one program
                // twice, so ours cannot move ahead again without a moment with no classifier:
                // say so (once), the next daemon attaches at the head.
                Some(_) => {
                    if self.behind.insert((ifindex, hook)) {
                        tracing::warn!(
                            interface = %ifname,
                            hook = hook.name(),
                            "another program runs ahead of meshpath's and can accept or redirect packets before the capture sees them"
                        );
                    }
                    continue;
                }
                None => lost.push(ifindex),
            }
            self.tc_links.remove(&(ifindex, hook));
        }
        lost
    }

    /// Attaches the TC classifier to `ifname`'s ingress, ahead of other programs so none can
    /// redirect enrolled traffic past it. An attachment a previous instance left is replaced
    /// without a moment where the interface has no classifier.
    pub fn attach_tc(&mut self, ifindex: u32, ifname: &str) -> Result<()> {
        for hook in Hook::ALL {
            if self.tc_links.contains_key(&(ifindex, hook)) {
                continue;
            }
            let attachment = match self.mode {
                AttachMode::Tcx => TcAttachment::Tcx(self.attach_tcx(ifindex, ifname, hook)?),
                AttachMode::Netlink => {
                    self.attach_netlink(ifindex, ifname, hook)?;
                    TcAttachment::Netlink
                }
            };
            self.tc_links.insert((ifindex, hook), attachment);
            tracing::info!(ifname, ifindex, mode = ?self.mode, hook = hook.name(), program = hook.program(), "attached");
        }
        Ok(())
    }

    /// TCX: a new link at the head of the chain, pinned in place of the old one, which is
    /// released only once the new one runs.
    fn attach_tcx(&mut self, ifindex: u32, ifname: &str, hook: Hook) -> Result<PinnedLink> {
        let pin = self.tc_pin_path(ifindex, hook);
        let prog_err = |source| DatapathError::Program { name: hook.program(), source };
        let tc: &mut SchedClassifier = program(&mut self.ebpf, hook.program())?;
        let id = tc
            .attach_with_options(ifname, hook.attach_type(), TcAttachOptions::TcxOrder(LinkOrder::first()))
            .map_err(prog_err)?;
        let link = tc.take_link(id).map_err(prog_err)?;
        let link = FdLink::try_from(link).map_err(|source| DatapathError::Link { path: pin.clone(), source })?;
        replace_pin(link, &pin)
    }

    /// Netlink: swaps the program of our existing filter in place, or creates the filter
    /// (and the clsact qdisc if the interface has none).
    fn attach_netlink(&mut self, ifindex: u32, ifname: &str, hook: Hook) -> Result<()> {
        let state = netlink_state_dir(&self.node)?;
        crate::state_dir::private_dir(&state).map_err(io_err(&state))?;
        let marker = state.join(ifindex.to_string());
        let created_qdisc = match tc::qdisc_add_clsact(ifname) {
            Ok(()) => true,
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
            Err(e) => return Err(DatapathError::Program { name: PROG_TC_INGRESS, source: e.into() }),
        };
        // Remember a qdisc we created before anything can fail, so uninstall removes it.
        if created_qdisc || !marker.exists() {
            let text = if created_qdisc { "qdisc-created\n" } else { "qdisc-existing\n" };
            let mut options = std::fs::OpenOptions::new();
            options.create(true).truncate(true).write(true);
            crate::state_dir::private_file(&marker, &options)
                .and_then(|mut f| io::Write::write_all(&mut f, text.as_bytes()))
                .map_err(io_err(&marker))?;
        }
        let handle = TcHandle::new(0, TC_FILTER_HANDLE);
        let tc: &mut SchedClassifier = program(&mut self.ebpf, hook.program())?;
        let prog_err = |source| DatapathError::Program { name: hook.program(), source };
        let existing = SchedClassifierLink::attached(ifname, hook.attach_type(), TC_FILTER_PRIORITY, handle, None)
            .map_err(io_err(Path::new(ifname)))?;
        let id = match tc.attach_to_link(existing) {
            Ok(id) => id,
            Err(_) => tc
                .attach_with_options(
                    ifname,
                    hook.attach_type(),
                    TcAttachOptions::Netlink(NlOptions { priority: TC_FILTER_PRIORITY, handle, classid: None }),
                )
                .map_err(prog_err)?,
        };
        // The filter must outlive this process (fail closed): forget the handle, whose drop
        // would detach it. `meshpath uninstall` removes it.
        std::mem::forget(tc.take_link(id).map_err(prog_err)?);
        Ok(())
    }

    /// Removes TC link pins of interfaces that no longer exist (their links are defunct)
    /// and forgets them.
    pub fn prune_tc(&mut self, existing: &BTreeSet<u32>) -> Result<()> {
        self.tc_links.retain(|(ifindex, _), _| existing.contains(ifindex));
        // Netlink filters and qdiscs go with their interface; only our note of them stays.
        for (ifindex, path) in netlink_filters(&self.node)? {
            if !existing.contains(&ifindex) {
                remove_file_if_exists(&path)?;
            }
        }
        for (ifindex, path) in pinned_tc_links(&self.pin_dir)? {
            if !existing.contains(&ifindex) {
                remove_file_if_exists(&path)?;
                tracing::info!(ifindex, "interface gone; removed its TC link pin");
            }
        }
        Ok(())
    }

    pub fn upsert_workload(&mut self, ip: std::net::IpAddr, ifindex: u32) -> Result<()> {
        self.workloads
            .insert(PodKey(WorkloadKey::from(ip)), PodValue(WorkloadValue::new(ifindex)), 0)
            .map_err(|source| DatapathError::Map { name: MAP_WORKLOADS, source })
    }

    pub fn remove_workload(&mut self, ip: std::net::IpAddr) -> Result<()> {
        match self.workloads.remove(&PodKey(WorkloadKey::from(ip))) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map { name: MAP_WORKLOADS, source }),
        }
    }

    /// The interfaces in the interface map, with their values.
    pub fn interfaces(&self) -> Result<BTreeMap<u32, InterfaceValue>> {
        Ok(pinned::interfaces(self.interfaces.map().fd().as_fd())?)
    }

    /// Sets an interface's value in the interface map.
    pub fn set_interface(&mut self, ifindex: u32, value: InterfaceValue) -> Result<()> {
        self.interfaces
            .insert(ifindex, IfValue(value), 0)
            .map_err(|source| DatapathError::Map { name: MAP_INTERFACES, source })
    }

    pub fn remove_interface(&mut self, ifindex: u32) -> Result<()> {
        match self.interfaces.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map { name: MAP_INTERFACES, source }),
        }
    }

    /// Current content of the workload map: IP → ifindex.
    pub fn workloads(&self) -> Result<BTreeMap<std::net::IpAddr, u32>> {
        Ok(pinned::workloads(self.workloads.map().fd().as_fd())?)
    }

    /// Registers a listening socket so sk_lookup can steer into it.
    pub fn register_listener<S: AsRawFd>(&mut self, listener: Listener, ipv6: bool, socket: &S) -> Result<()> {
        // An 8-byte SOCKMAP value is the socket's fd on update (and its cookie on lookup).
        let fd = socket.as_raw_fd() as u64;
        let io = |source| DatapathError::Io { path: self.pin_dir.join(MAP_LISTENERS), source };
        let map = bpf::MapFd::open(self.listeners.fd().as_fd()).map_err(io)?;
        map.update(&listener.slot(ipv6).to_ne_bytes(), &fd.to_ne_bytes()).map_err(io)
    }

    /// The cookie of the socket in each listener slot (`None`: empty), by slot.
    pub fn listener_cookies(&self) -> Result<Vec<Option<u64>>> {
        let slots = pinned::listener_slots(self.listeners.fd().as_fd())?;
        let path = self.pin_dir.join(MAP_LISTENERS);
        slots.into_iter().map(|s| s.socket.map_err(io_err(&path))).collect()
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(DatapathError::Missing { kind: "program", name })?;
    p.try_into().map_err(|source| DatapathError::Program { name, source })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).ok_or(DatapathError::Missing { kind: "map", name })
}

/// Pins `link` at `path`, releasing whatever link was pinned there before. The new link is
/// held by our fd throughout, so the attachment point is never left without a program.
fn replace_pin(link: FdLink, path: &Path) -> Result<PinnedLink> {
    remove_file_if_exists(path)?;
    link.pin(path).map_err(|source| DatapathError::Pin { path: path.to_owned(), source })
}

/// Pins a pinned link again at `path` (its old pin is gone).
fn repin(link: PinnedLink, path: &Path) -> Result<PinnedLink> {
    FdLink::from(link).pin(path).map_err(|source| DatapathError::Pin { path: path.to_owned(), source })
}

fn remove_file_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DatapathError::Io { path: path.to_owned(), source: e }),
    }
}

/// What a node's pins and state say is attached, for `meshpath status`.
#[derive(Clone, Debug, Default)]
pub struct Attachments {
    /// Interfaces and hooks with a pinned TCX link.
    pub tcx: Vec<(u32, Hook)>,
    /// Interfaces with netlink (cls_bpf) filters (both hooks).
    pub netlink: Vec<u32>,
    /// Whether the sk_lookup link is pinned.
    pub sk_lookup: bool,
}

pub fn attachments(node: &str) -> Result<Attachments> {
    let dir = readable_pin_dir(node)?;
    let mut tcx: Vec<(u32, Hook)> = pinned_tc_links_of(&dir)?.into_iter().map(|(i, h, _)| (i, h)).collect();
    let mut netlink: Vec<u32> = netlink_filters(node)?.into_iter().map(|(i, _)| i).collect();
    tcx.sort_unstable();
    netlink.sort_unstable();
    let sk_lookup = dir.join(PIN_LINKS_SUBDIR).join(PIN_SK_LOOKUP_LINK).exists();
    Ok(Attachments { tcx, netlink, sk_lookup })
}

/// Which listener slots of a node's pinned SOCKMAP hold a socket: (role, IPv6, registered).
pub fn registered_listeners(node: &str) -> Result<Vec<(Listener, bool, bool)>> {
    let slots = read_pinned(node, MAP_LISTENERS, pinned::listener_slots)?;
    let mut out = Vec::new();
    for s in slots {
        if let Some((role, ipv6)) = s.role {
            let path = || readable_pin_dir(node).map(|d| d.join(MAP_LISTENERS)).unwrap_or_default();
            let registered = s.socket.map_err(|source| DatapathError::Io { path: path(), source })?;
            out.push((role, ipv6, registered.is_some()));
        }
    }
    Ok(out)
}

/// The socket cookie in each slot of a node's pinned SOCKMAP (`None`: empty), by slot: a
/// takeover shows as every filled slot's cookie changing.
pub fn pinned_listener_cookies(node: &str) -> Result<Vec<Option<u64>>> {
    let path = || readable_pin_dir(node).map(|d| d.join(MAP_LISTENERS)).unwrap_or_default();
    read_pinned(node, MAP_LISTENERS, pinned::listener_slots)?
        .into_iter()
        .map(|s| s.socket.map_err(|source| DatapathError::Io { path: path(), source }))
        .collect()
}

/// TC link pins in a node's directory, both hooks: (ifindex, path).
fn pinned_tc_links(pin_dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    Ok(pinned_tc_links_of(pin_dir)?.into_iter().map(|(i, _, p)| (i, p)).collect())
}

/// TC link pins in a node's directory: (ifindex, hook, path).
fn pinned_tc_links_of(pin_dir: &Path) -> Result<Vec<(u32, Hook, PathBuf)>> {
    let mut out = Vec::new();
    for hook in Hook::ALL {
        let found = per_interface_entries(&pin_dir.join(PIN_LINKS_SUBDIR), hook.pin_prefix())?;
        out.extend(found.into_iter().map(|(i, p)| (i, hook, p)));
    }
    Ok(out)
}

/// Where the program of `hook` sits in `ifname`'s TCX chain (0: first), if it runs there.
fn tcx_position(ifname: &str, hook: Hook) -> Option<usize> {
    let (_, progs) = SchedClassifier::query_tcx(ifname, hook.attach_type()).ok()?;
    progs.iter().position(|p| p.name_as_str() == Some(hook.program()))
}

/// Whether the program of `hook` runs on `ifname` (TCX: the kernel's list of programs;
/// netlink: meshpath's filter).
pub fn tc_attached(mode: AttachMode, ifname: &str, hook: Hook) -> bool {
    match mode {
        AttachMode::Tcx => tcx_position(ifname, hook).is_some(),
        // Not `SchedClassifierLink::attached`: that only builds a handle, and dropping it
        // detaches the filter.
        AttachMode::Netlink => nix::net::if_::if_nametoindex(ifname).is_ok_and(|ifindex| {
            tcfilter::bpf_filters(ifindex, hook == Hook::Egress).is_ok_and(|filters| {
                filters.iter().any(|f| f.priority == TC_FILTER_PRIORITY && f.program == hook.program())
            })
        }),
    }
}

/// Interfaces that hold a netlink filter of `node`: (ifindex, state file).
fn netlink_filters(node: &str) -> Result<Vec<(u32, PathBuf)>> {
    per_interface_entries(&netlink_state_dir(node)?, "")
}

/// Entries of `dir` named `<prefix><ifindex>`: (ifindex, path). A missing dir is empty.
fn per_interface_entries(dir: &Path, prefix: &str) -> Result<Vec<(u32, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DatapathError::Io { path: dir.to_owned(), source: e }),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(ifindex) =
            entry.file_name().to_str().and_then(|n| n.strip_prefix(prefix)).and_then(|i| i.parse().ok())
        {
            out.push((ifindex, entry.path()));
        }
    }
    Ok(out)
}

/// Removes `node`'s netlink filters. `ifname_of` maps an ifindex of this namespace to its
/// name. Returns the interfaces whose clsact qdisc meshpath created (for the caller to
/// remove, now that our filter is gone) and the number of filters removed.
pub fn detach_netlink_filters(node: &str, ifname_of: impl Fn(u32) -> Option<String>) -> Result<(Vec<u32>, usize)> {
    let mut qdiscs = Vec::new();
    let mut removed = 0;
    for (ifindex, path) in netlink_filters(node)? {
        if let Some(ifname) = ifname_of(ifindex) {
            let handle = TcHandle::new(0, TC_FILTER_HANDLE);
            for hook in Hook::ALL {
                if let Ok(link) =
                    SchedClassifierLink::attached(&ifname, hook.attach_type(), TC_FILTER_PRIORITY, handle, None)
                {
                    use aya::programs::links::Link as _;
                    // Already gone is fine: uninstall is idempotent.
                    if link.detach().is_ok() {
                        removed += 1;
                    }
                }
            }
            if std::fs::read_to_string(&path).is_ok_and(|s| s.starts_with("qdisc-created")) {
                qdiscs.push(ifindex);
            }
        }
        remove_file_if_exists(&path)?;
    }
    // The node's state directory stays: it holds the node lock, which the caller holds.
    let clsact = netlink_state_dir(node)?;
    if clsact.exists() {
        std::fs::remove_dir_all(&clsact).map_err(io_err(&clsact))?;
    }
    Ok((qdiscs, removed))
}

/// What `uninstall` removed from bpffs.
#[derive(Debug, Default)]
pub struct Unpinned {
    pub links: usize,
    pub maps: usize,
}

/// Removes every pin of a node: links first (which detaches the programs), then maps,
/// then the directories. Idempotent.
pub fn unpin_all(node: &str) -> Result<Unpinned> {
    let pin_dir = node_pin_dir(node)?;
    let mut report = Unpinned::default();
    if !pin_dir.exists() {
        return Ok(report);
    }
    for (_, path) in pinned_tc_links(&pin_dir)? {
        remove_file_if_exists(&path)?;
        report.links += 1;
    }
    let sk = pin_dir.join(PIN_LINKS_SUBDIR).join(PIN_SK_LOOKUP_LINK);
    if sk.exists() {
        remove_file_if_exists(&sk)?;
        report.links += 1;
    }
    for map in PINNED_MAPS {
        let p = pin_dir.join(map);
        if p.exists() {
            remove_file_if_exists(&p)?;
            report.maps += 1;
        }
    }
    // Anything else left (e.g. from a newer version) is ours too: the directory is.
    std::fs::remove_dir_all(&pin_dir).map_err(io_err(&pin_dir))?;
    // The shared root goes with the last node; fails harmlessly while others remain.
    let _ = std::fs::remove_dir(PIN_DIR);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_load_is_tried_again_a_few_times_and_nothing_else_is() {
        let eagain = || io::Error::from(io::ErrorKind::WouldBlock);
        let interrupted = |e: &io::Error| e.kind() == io::ErrorKind::WouldBlock;
        let mut calls = 0;
        let twice = retrying(
            || {
                calls += 1;
                if calls < 3 { Err(eagain()) } else { Ok(()) }
            },
            interrupted,
            |_| {},
        );
        assert!(twice.is_ok() && calls == 3, "{twice:?} after {calls} calls");
        calls = 0;
        let always = retrying(
            || {
                calls += 1;
                Err(eagain())
            },
            interrupted,
            |_| {},
        );
        assert!(always.is_err() && calls == LOAD_ATTEMPTS, "gives up after {LOAD_ATTEMPTS}: {calls}");
        calls = 0;
        let refused = retrying(
            || {
                calls += 1;
                Err(io::Error::from(io::ErrorKind::PermissionDenied))
            },
            interrupted,
            |_| {},
        );
        assert!(refused.is_err() && calls == 1, "a verdict is not retried: {calls}");
    }

    #[test]
    fn node_names_are_safe_path_components() {
        for ok in ["node1", "kind-worker.example", "a"] {
            assert!(validate_node_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../etc", "Node1", "a/b", "-x", "x.", "a..b", "with space"] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn embedded_object_defines_the_shared_names() {
        if EBPF_OBJECT.is_empty() {
            // Built without the eBPF toolchain (build.rs warned): there is nothing to check,
            // and such a binary refuses to load. CI always builds the object.
            eprintln!("skipped: this build carries no eBPF object");
            return;
        }
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("embedded object parses");
        for map in PINNED_MAPS {
            assert!(obj.maps.contains_key(map), "object lacks map {map}: {:?}", obj.maps.keys().collect::<Vec<_>>());
        }
        for prog in [PROG_TC_INGRESS, PROG_TC_EGRESS, PROG_SK_LOOKUP] {
            assert!(obj.programs.contains_key(prog), "object lacks program {prog}");
        }
    }
}
