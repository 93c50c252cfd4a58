//! `map dump --decode`: meshpath's own maps in human terms. MP_WORKLOADS as IP → interface,
//! workload and SPIFFE identity (the last two from the workload file, when given);
//! MP_INTERFACES as interfaces and their flags; MP_LISTENERS as listener slots and whether the proxy's
//! socket is in each; MP_COUNTERS as named counters, in total and per CPU.
//!
//! Interface indexes belong to the node daemon's network namespace: `--netns` enters it
//! (the lab's nodes are namespaces; on a real node the daemon runs in the host's, the default).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};

use meshpath_common::interface::{IF_BRIDGE_PORT, IF_L3, IF_POD, IF_WORKLOAD};
use meshpath_common::names::{MAP_COUNTERS, MAP_INTERFACES, MAP_LISTENERS, MAP_WORKLOADS};
use serde::Serialize;

use super::{Flow, InfoBuf, MapArgs, MapError, MapInfo, Tool, errno_of, strerror};
use crate::datapath::pinned;
use crate::state::WorkloadIndex;
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
    Interfaces(Vec<FlaggedInterface>),
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
struct FlaggedInterface {
    #[serde(flatten)]
    interface: Interface,
    /// `workload` (an enrolled workload behind it), `pod` (pod-facing: sources must route
    /// back through it), `l3` (no link-layer header).
    flags: Vec<&'static str>,
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

impl Tool {
    pub(super) fn do_decode(&mut self, words: &[&str], args: &MapArgs) -> Flow {
        if words.len() != 2 {
            return Err(self.usage());
        }
        let fds = self.parse_fds(words)?;
        // Workload and identity of each enrolled IP, from the workload file.
        let owners = match &args.workloads {
            Some(path) => {
                let file = WorkloadFile::load(path).map_err(|e| self.fail(e.into()))?;
                WorkloadIndex::from_file(&file, &args.trust_domain)
            }
            None => WorkloadIndex::default(),
        };
        if let Some(ns) = &args.netns {
            crate::netns::enter(ns).map_err(|source| {
                self.fail(MapError::Netns { path: crate::netns::path_of(ns).display().to_string(), source })
            })?;
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

    fn decode_map(&mut self, fd: BorrowedFd<'_>, info: &MapInfo, owners: &WorkloadIndex) -> Flow<MapView> {
        let decoded = match info.name.as_str() {
            MAP_WORKLOADS => pinned::workloads(fd).map(|entries| {
                let rows = entries.into_iter().map(|(ip, ifindex)| {
                    let owner = owners.get(ip);
                    WorkloadRow {
                        ip,
                        interface: interface(ifindex),
                        workload: owner.map(|o| o.id.clone()),
                        identity: owner.map(|o| o.identity.to_string()),
                    }
                });
                Body::Workloads(rows.collect())
            }),
            MAP_INTERFACES => pinned::interfaces(fd).map(|ifs| {
                let rows = ifs.into_iter().map(|(ifindex, value)| FlaggedInterface {
                    interface: interface(ifindex),
                    flags: [(IF_WORKLOAD, "workload"), (IF_POD, "pod"), (IF_L3, "l3"), (IF_BRIDGE_PORT, "bridge_port")]
                        .into_iter()
                        .filter(|(bit, _)| value.flags & bit != 0)
                        .map(|(_, name)| name)
                        .collect(),
                });
                Body::Interfaces(rows.collect())
            }),
            MAP_LISTENERS => {
                pinned::listener_slots(fd).map(|slots| Body::Listeners(slots.into_iter().map(slot).collect()))
            }
            MAP_COUNTERS => pinned::counters(fd).map(|values| {
                let rows = values.into_iter().map(|v| CounterRow {
                    counter: v.counter.map_or_else(|| format!("#{}", v.index), |c| c.name().to_owned()),
                    total: v.total(),
                    per_cpu: v.per_cpu,
                });
                Body::Counters(rows.collect())
            }),
            other => return Err(self.fail(MapError::NoDecoder { name: other.to_owned() })),
        };
        let body = decoded.map_err(|e| self.fail(MapError::Decode(e)))?;
        Ok(MapView { map: info.name.clone(), id: info.id, body })
    }
}

fn slot(s: pinned::ListenerSlot) -> Slot {
    let (registered, cookie, error) = match s.socket {
        Ok(cookie) => (cookie.is_some(), cookie, None),
        Err(e) => (false, None, Some(strerror(errno_of(&e)))),
    };
    Slot {
        slot: s.slot,
        listener: s.role.map(|(l, _)| l.name()),
        family: s.role.map(|(_, v6)| if v6 { "IPv6" } else { "IPv4" }),
        port: s.role.map(|(l, _)| l.port()),
        registered,
        cookie,
        error,
    }
}

fn interface(ifindex: u32) -> Interface {
    Interface { ifindex, interface: crate::routing::interface_name(ifindex) }
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
                "{} (map id {}): {} the classifier knows (workload: TCP must come from an enrolled IP; \
                 pod: sources must route back through it; l3: no link-layer header; bridge_port: a pod bridge's port, \
                 routed via the bridge)",
                v.map,
                v.id,
                plural(rows.len(), "interface", "interfaces")
            );
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| vec![r.interface.text(), if r.flags.is_empty() { "-".into() } else { r.flags.join(",") }])
                .collect();
            table(out, &["INTERFACE", "FLAGS"], &cells);
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
