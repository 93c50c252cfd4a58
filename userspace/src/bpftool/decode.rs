//! `map dump --decode`: meshpath's own maps in human terms. MP_WORKLOADS as IP → interface,
//! workload and SPIFFE identity (the last two from the workload file, when given);
//! MP_WORKLOAD_IFS as interfaces; MP_LISTENERS as listener slots and whether the proxy's
//! socket is in each; MP_COUNTERS as named counters, in total and per CPU.
//!
//! Interface indexes belong to the node daemon's network namespace: `--netns` enters it
//! (the lab's nodes are namespaces; on a real node the daemon runs in the host's, the default).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};

use meshpath_common::names::{MAP_COUNTERS, MAP_LISTENERS, MAP_WORKLOAD_IFS, MAP_WORKLOADS};
use meshpath_common::{Counter, Listener, WorkloadKey, WorkloadValue};
use serde::Serialize;

use super::{Flow, InfoBuf, MapArgs, MapError, MapInfo, Tool, errno_of, map_is_per_cpu, strerror};
use crate::datapath::bpf;
use crate::identity::Identity;
use crate::workloads::WorkloadFile;

#[derive(Debug, Serialize)]
struct MapView {
    map: String,
    id: u32,
    #[serde(flatten)]
    body: Body,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Body {
    Workloads(Vec<WorkloadRow>),
    Interfaces(Vec<Interface>),
    Listeners(Vec<Slot>),
    Counters(Vec<CounterRow>),
}

#[derive(Debug, Serialize)]
struct WorkloadRow {
    ip: IpAddr,
    #[serde(flatten)]
    interface: Interface,
    /// `namespace/name` from the workload file.
    workload: Option<String>,
    identity: Option<String>,
}

#[derive(Debug, Serialize)]
struct Interface {
    ifindex: u32,
    /// None when no interface has that index in the namespace looked at.
    interface: Option<String>,
}

#[derive(Debug, Serialize)]
struct Slot {
    slot: u32,
    listener: Option<&'static str>,
    family: Option<&'static str>,
    port: Option<u16>,
    registered: bool,
    /// The registered socket's cookie (as `ss -e` shows it).
    cookie: Option<u64>,
    /// A lookup error other than "absent" (ENOENT).
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct CounterRow {
    counter: String,
    total: u64,
    per_cpu: Vec<u64>,
}

/// Workload and identity of each enrolled IP, from the workload file.
type Owners = BTreeMap<IpAddr, (String, String)>;

impl Tool {
    pub(super) fn do_decode(&mut self, words: &[&str], args: &MapArgs) -> Flow {
        if words.len() != 2 {
            return Err(self.usage());
        }
        let fds = self.parse_fds(words)?;
        let mut owners = Owners::new();
        if let Some(path) = &args.workloads {
            let file = WorkloadFile::load(path).map_err(|e| self.fail(e.into()))?;
            for w in &file.workloads {
                let identity = Identity::new(&args.trust_domain, &w.namespace, &w.service_account).to_string();
                for ip in &w.ips {
                    owners.insert(ip.to_canonical(), (w.id(), identity.clone()));
                }
            }
        }
        if let Some(ns) = &args.netns {
            enter_netns(ns).map_err(|e| self.fail(e))?;
        }
        let mut views = Vec::new();
        for fd in &fds {
            let info = InfoBuf::new().read(fd.as_fd()).map_err(|e| self.fail(MapError::MapInfo(errno_of(&e))))?;
            let view = self.decode_map(fd.as_fd(), &info, &owners)?;
            views.push(view);
        }
        if self.json_output() {
            let pretty = args.pretty;
            let text = match views.as_slice() {
                [one] if pretty => serde_json::to_string_pretty(one),
                [one] => serde_json::to_string(one),
                all if pretty => serde_json::to_string_pretty(all),
                all => serde_json::to_string(all),
            };
            // Plain data (strings, numbers): serialising it cannot fail.
            self.out.push_str(&text.unwrap_or_default());
        } else {
            for (i, v) in views.iter().enumerate() {
                if i > 0 {
                    self.out.push('\n');
                }
                render(&mut self.out, v, args.workloads.is_some());
            }
        }
        Ok(())
    }

    fn decode_map(&mut self, fd: BorrowedFd<'_>, info: &MapInfo, owners: &Owners) -> Flow<MapView> {
        let layout = |key: usize, value: usize| info.key_size as usize == key && info.value_size as usize == value;
        let bad_layout = || MapError::Layout { name: info.name.clone(), key: info.key_size, value: info.value_size };
        let body = match info.name.as_str() {
            MAP_WORKLOADS => {
                if !layout(size_of::<WorkloadKey>(), size_of::<WorkloadValue>()) {
                    return Err(self.fail(bad_layout()));
                }
                let mut rows = BTreeMap::new();
                for (key, value) in self.entries(fd, info, 1)? {
                    let Ok(value) = value else { continue };
                    let ip = IpAddr::from(WorkloadKey { addr: bytes(&key) });
                    let ifindex = u32::from_ne_bytes(bytes(&value));
                    let owner = owners.get(&ip);
                    rows.insert(
                        ip,
                        WorkloadRow {
                            ip,
                            interface: interface(ifindex),
                            workload: owner.map(|o| o.0.clone()),
                            identity: owner.map(|o| o.1.clone()),
                        },
                    );
                }
                Body::Workloads(rows.into_values().collect())
            }
            MAP_WORKLOAD_IFS => {
                if !layout(4, 4) {
                    return Err(self.fail(bad_layout()));
                }
                let mut ifindexes: Vec<u32> =
                    self.entries(fd, info, 1)?.into_iter().map(|(k, _)| u32::from_ne_bytes(bytes(&k))).collect();
                ifindexes.sort_unstable();
                Body::Interfaces(ifindexes.into_iter().map(interface).collect())
            }
            MAP_LISTENERS => {
                if info.key_size != 4 {
                    return Err(self.fail(bad_layout()));
                }
                let roles: BTreeMap<u32, (Listener, bool)> =
                    Listener::ALL.iter().flat_map(|l| [false, true].map(|v6| (l.slot(v6), (*l, v6)))).collect();
                let mut slots = Vec::new();
                for (key, value) in self.entries(fd, info, 1)? {
                    let slot = u32::from_ne_bytes(bytes(&key));
                    let role = roles.get(&slot);
                    // The SOCKMAP's values are 8 bytes, so a lookup returns the socket's cookie
                    // for a filled slot and ENOENT for an empty one.
                    let (registered, cookie, error) = match value {
                        Ok(v) if v.len() == 8 => (true, Some(u64::from_ne_bytes(bytes(&v))), None),
                        Ok(_) => (true, None, None),
                        Err(libc::ENOENT) => (false, None, None),
                        Err(errno) => (false, None, Some(strerror(errno))),
                    };
                    slots.push(Slot {
                        slot,
                        listener: role.map(|(l, _)| l.name()),
                        family: role.map(|(_, v6)| if *v6 { "IPv6" } else { "IPv4" }),
                        port: role.map(|(l, _)| l.port()),
                        registered,
                        cookie,
                        error,
                    });
                }
                Body::Listeners(slots)
            }
            MAP_COUNTERS => {
                if !layout(4, 8) {
                    return Err(self.fail(bad_layout()));
                }
                let cpus = self.possible_cpus()?;
                let mut rows = Vec::new();
                for (key, value) in self.entries(fd, info, cpus)? {
                    let Ok(value) = value else { continue };
                    let index = u32::from_ne_bytes(bytes(&key));
                    let per_cpu: Vec<u64> = value.chunks(8).take(cpus).map(|c| u64::from_ne_bytes(bytes(c))).collect();
                    let name = Counter::ALL
                        .iter()
                        .find(|c| c.index() == index)
                        .map_or_else(|| format!("#{index}"), |c| c.name().to_owned());
                    rows.push(CounterRow { counter: name, total: per_cpu.iter().sum(), per_cpu });
                }
                Body::Counters(rows)
            }
            other => return Err(self.fail(MapError::NoDecoder { name: other.to_owned() })),
        };
        Ok(MapView { map: info.name.clone(), id: info.id, body })
    }

    /// Every key with its value, or the lookup's errno; per-CPU maps get `cpus` 8-byte
    /// aligned value slots.
    #[allow(clippy::type_complexity)]
    fn entries(
        &mut self,
        fd: BorrowedFd<'_>,
        info: &MapInfo,
        cpus: usize,
    ) -> Flow<Vec<(Vec<u8>, Result<Vec<u8>, i32>)>> {
        let value_len = if map_is_per_cpu(info.map_type) {
            (info.value_size as usize).div_ceil(8) * 8 * cpus
        } else {
            info.value_size as usize
        };
        let mut out = Vec::new();
        let mut key = vec![0u8; info.key_size as usize];
        let mut prev: Option<Vec<u8>> = None;
        loop {
            match bpf::map_next_key(fd, prev.as_deref(), &mut key) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    return Err(self.fail(MapError::Sys { what: format!("reading {}", info.name), errno: errno_of(&e) }));
                }
            }
            let mut value = vec![0u8; value_len];
            let looked = match bpf::map_lookup(fd, &key, &mut value) {
                Ok(true) => Ok(value),
                Ok(false) => Err(libc::ENOENT),
                Err(e) => Err(errno_of(&e)),
            };
            out.push((key.clone(), looked));
            prev = Some(key.clone());
        }
        Ok(out)
    }
}

/// The first N bytes, zero-padded (the layouts were checked, this only avoids panics).
fn bytes<const N: usize>(data: &[u8]) -> [u8; N] {
    let mut b = [0u8; N];
    let n = data.len().min(N);
    b[..n].copy_from_slice(&data[..n]);
    b
}

fn interface(ifindex: u32) -> Interface {
    // nix 0.31 does not see if_indextoname's NULL as failure: an unknown index comes back
    // as an empty name.
    let interface =
        nix::net::if_::if_indextoname(ifindex).ok().map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty());
    Interface { ifindex, interface }
}

fn enter_netns(ns: &str) -> Result<(), MapError> {
    let path = if ns.contains('/') { ns.to_owned() } else { format!("/run/netns/{ns}") };
    let err = |source| MapError::Netns { path: path.clone(), source };
    let file = std::fs::File::open(&path).map_err(err)?;
    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| err(e.into()))
}

impl Interface {
    fn text(&self) -> String {
        match &self.interface {
            Some(name) => format!("{name} (ifindex {})", self.ifindex),
            None => format!("ifindex {} (not in this network namespace)", self.ifindex),
        }
    }
}

/// Columns padded to their widest cell, two spaces apart.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let _ = write!(text, "{cell:<w$}  ", w = widths[i]);
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(out, &mut header.iter().copied());
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
}

fn render(out: &mut String, v: &MapView, have_workloads: bool) {
    let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    match &v.body {
        Body::Workloads(rows) => {
            let _ =
                writeln!(out, "{} (map id {}): {} enrolled on this node", v.map, v.id, plural(rows.len(), "IP", "IPs"));
            let dash = || "-".to_owned();
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.ip.to_string(),
                        r.interface.text(),
                        r.workload.clone().unwrap_or_else(dash),
                        r.identity.clone().unwrap_or_else(dash),
                    ]
                })
                .collect();
            table(out, &["IP", "INTERFACE", "WORKLOAD", "IDENTITY"], &cells);
            if !have_workloads && !rows.is_empty() {
                out.push_str("(workloads and identities: give --workloads FILE or set MESHPATH_WORKLOADS)\n");
            }
        }
        Body::Interfaces(rows) => {
            let _ = writeln!(
                out,
                "{} (map id {}): {} with enrolled workloads (TCP from unenrolled sources is dropped there)",
                v.map,
                v.id,
                plural(rows.len(), "interface", "interfaces")
            );
            let cells: Vec<Vec<String>> = rows.iter().map(|r| vec![r.text()]).collect();
            table(out, &["INTERFACE"], &cells);
        }
        Body::Listeners(slots) => {
            let registered = slots.iter().filter(|s| s.registered).count();
            let _ = writeln!(
                out,
                "{} (map id {}): {registered} of {} listener slots hold the proxy's socket",
                v.map,
                v.id,
                slots.len()
            );
            let cells: Vec<Vec<String>> = slots
                .iter()
                .map(|s| {
                    let state = match (&s.error, s.registered) {
                        (Some(e), _) => format!("unreadable: {e}"),
                        (None, true) => "registered".to_owned(),
                        (None, false) => "empty: its connections are dropped".to_owned(),
                    };
                    vec![
                        s.slot.to_string(),
                        s.listener.unwrap_or("-").to_owned(),
                        s.family.unwrap_or("-").to_owned(),
                        s.port.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                        state,
                    ]
                })
                .collect();
            table(out, &["SLOT", "LISTENER", "FAMILY", "PORT", "SOCKET"], &cells);
        }
        Body::Counters(rows) => {
            let cpus = rows.first().map_or(0, |r| r.per_cpu.len());
            let _ =
                writeln!(out, "{} (map id {}): datapath counters over {}", v.map, v.id, plural(cpus, "CPU", "CPUs"));
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let per_cpu = r.per_cpu.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
                    vec![r.counter.clone(), r.total.to_string(), per_cpu]
                })
                .collect();
            table(out, &["COUNTER", "TOTAL", "PER CPU"], &cells);
        }
    }
}
