//! Reading meshpath's maps from any fd (a pin, an id, the loaded object's own): the one
//! decoder of their entries, used by the daemon, `status`, `map dump --decode`, the metrics
//! and the lab. Nothing is loaded; each map's layout is checked against meshpath's before a
//! byte of it is read.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::os::fd::BorrowedFd;

use meshpath_common::names::{MAP_COUNTERS, MAP_INTERFACES, MAP_LISTENERS, MAP_WORKLOADS};
use meshpath_common::{Counter, InterfaceValue, Listener, WorkloadKey, WorkloadValue};

use super::sys::bpf;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{name} has key {key}B value {value}B, not the layout meshpath's {name} has")]
    Layout { name: &'static str, key: usize, value: usize },
    #[error("reading {name}: {source}")]
    Read { name: &'static str, source: io::Error },
}

type Result<T> = std::result::Result<T, DecodeError>;

/// A map opened for reading, its layout checked.
struct Checked<'a> {
    map: bpf::MapFd<'a>,
    name: &'static str,
}

impl<'a> Checked<'a> {
    /// `key` and `value` are the sizes of one entry (`None`: any value size).
    fn open(fd: BorrowedFd<'a>, name: &'static str, key: usize, value: Option<usize>) -> Result<Self> {
        let map = bpf::MapFd::open(fd).map_err(|source| DecodeError::Read { name, source })?;
        let info = bpf::map_info(fd).map_err(|source| DecodeError::Read { name, source })?;
        if map.key_size() != key || value.is_some_and(|v| v != info.value_size as usize) {
            return Err(DecodeError::Layout { name, key: map.key_size(), value: info.value_size as usize });
        }
        Ok(Self { map, name })
    }

    fn read(&self, source: io::Error) -> DecodeError {
        DecodeError::Read { name: self.name, source }
    }

    /// Every key, in the kernel's order.
    fn keys(&self) -> Result<Vec<Vec<u8>>> {
        let mut keys = Vec::new();
        let mut next = vec![0u8; self.map.key_size()];
        while self.map.next_key(keys.last().map(Vec::as_slice), &mut next).map_err(|e| self.read(e))? {
            keys.push(next.clone());
        }
        Ok(keys)
    }

    /// The value under `key`: `Ok(None)` when it is absent.
    fn value(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.map.value_len()];
        Ok(self.map.lookup(key, &mut value)?.then_some(value))
    }

    /// Every entry; entries deleted while the map is walked are skipped.
    fn entries(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for key in self.keys()? {
            if let Some(v) = self.value(&key).map_err(|e| self.read(e))? {
                out.push((key, v));
            }
        }
        Ok(out)
    }
}

fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[..N]);
    out
}

/// [`MAP_WORKLOADS`]: enrolled IP → the ifindex of the interface it lives behind.
pub fn workloads(fd: BorrowedFd<'_>) -> Result<BTreeMap<IpAddr, u32>> {
    let m = Checked::open(fd, MAP_WORKLOADS, size_of::<WorkloadKey>(), Some(size_of::<WorkloadValue>()))?;
    let entries = m.entries()?;
    Ok(entries
        .into_iter()
        .map(|(k, v)| (IpAddr::from(WorkloadKey { addr: array(&k) }), u32::from_ne_bytes(array(&v))))
        .collect())
}

/// [`MAP_INTERFACES`]: the interfaces the classifier knows, with their values (`IF_*` flags,
/// a bridge port's bridge).
pub fn interfaces(fd: BorrowedFd<'_>) -> Result<BTreeMap<u32, InterfaceValue>> {
    let m = Checked::open(fd, MAP_INTERFACES, 4, Some(size_of::<InterfaceValue>()))?;
    Ok(m.entries()?.into_iter().map(|(k, v)| (u32::from_ne_bytes(array(&k)), interface_value(&v))).collect())
}

/// An [`InterfaceValue`] from its 16 bytes (`#[repr(C)]`, no padding), field by field.
fn interface_value(b: &[u8]) -> InterfaceValue {
    InterfaceValue {
        flags: u32::from_ne_bytes(array(&b[0..4])),
        bridge: u32::from_ne_bytes(array(&b[4..8])),
        bridge_mac: array(&b[8..14]),
        _pad: array(&b[14..16]),
    }
}

/// One slot of [`MAP_LISTENERS`].
#[derive(Debug)]
pub struct ListenerSlot {
    pub slot: u32,
    /// The role and family (`true`: IPv6) meshpath gives this slot, if any.
    pub role: Option<(Listener, bool)>,
    /// The registered socket's cookie (`None`: empty), or the lookup's error.
    pub socket: io::Result<Option<u64>>,
}

/// [`MAP_LISTENERS`], slot by slot. Its values are 8 bytes, so a lookup returns the socket's
/// cookie for a filled slot and ENOENT for an empty one.
pub fn listener_slots(fd: BorrowedFd<'_>) -> Result<Vec<ListenerSlot>> {
    let m = Checked::open(fd, MAP_LISTENERS, 4, Some(8))?;
    let roles: BTreeMap<u32, (Listener, bool)> =
        Listener::ALL.iter().flat_map(|l| [false, true].map(|v6| (l.slot(v6), (*l, v6)))).collect();
    let slots = m.keys()?.iter().map(|k| u32::from_ne_bytes(array(k))).collect::<BTreeSet<u32>>();
    Ok(slots
        .into_iter()
        .map(|slot| {
            let socket = m.value(&slot.to_ne_bytes()).map(|v| v.map(|v| u64::from_ne_bytes(array(&v))));
            ListenerSlot { slot, role: roles.get(&slot).copied(), socket }
        })
        .collect())
}

/// One counter of [`MAP_COUNTERS`], per possible CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterValues {
    pub index: u32,
    /// meshpath's counter at this index, if it knows one.
    pub counter: Option<Counter>,
    pub per_cpu: Vec<u64>,
}

impl CounterValues {
    pub fn total(&self) -> u64 {
        self.per_cpu.iter().sum()
    }
}

/// [`MAP_COUNTERS`]: each counter's per-CPU values.
pub fn counters(fd: BorrowedFd<'_>) -> Result<Vec<CounterValues>> {
    let m = Checked::open(fd, MAP_COUNTERS, 4, Some(8))?;
    Ok(m.entries()?
        .into_iter()
        .map(|(k, v)| {
            let index = u32::from_ne_bytes(array(&k));
            let counter = Counter::ALL.iter().find(|c| c.index() == index).copied();
            CounterValues { index, counter, per_cpu: v.chunks_exact(8).map(|c| u64::from_ne_bytes(array(c))).collect() }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_values_decode_field_by_field() {
        let v = InterfaceValue::bridge_port(meshpath_common::interface::IF_POD, 7, [2, 0, 0, 0, 0, 9]);
        let mut bytes = Vec::new();
        bytes.extend(v.flags.to_ne_bytes());
        bytes.extend(v.bridge.to_ne_bytes());
        bytes.extend(v.bridge_mac);
        bytes.extend(v._pad);
        assert_eq!(bytes.len(), size_of::<InterfaceValue>());
        assert_eq!(interface_value(&bytes), v);
    }
}
