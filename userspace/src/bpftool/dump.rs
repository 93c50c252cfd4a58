//! `map dump`: bpftool's `do_dump`, `map_dump`, `dump_map_elem` and the entry printers.
//!
//! Three shapes, as in bpftool: `-j`/`-p` print hex bytes (plus `formatted` when the map has
//! BTF) through the global JSON writer; without -j, maps with BTF print only the typed form
//! through a pretty JSON writer of their own; maps without BTF print hex lines and a
//! `Found N elements` line. Failed lookups print their error as the value (SOCKMAP entries:
//! ENOSPC, "No space left on device") and are not counted.

use std::fmt::Write as _;
use std::os::fd::{AsFd, BorrowedFd};

use super::btf::{Btf, Dumper};
use super::json::JsonWriter;
use super::show::{header_json, header_plain};
use super::{
    Flow, InfoBuf, MAP_TYPE_ARRAY_OF_MAPS, MAP_TYPE_HASH_OF_MAPS, MAP_TYPE_PROG_ARRAY, MAP_TYPE_REUSEPORT_SOCKARRAY,
    MapError, MapInfo, Reported, Tool, Wtr, errno_of, fprint_hex, map_is_per_cpu, strerror,
};
use crate::datapath::bpf;

/// Per-CPU values are laid out 8-byte aligned, one slot per possible CPU.
fn per_cpu_step(value_size: u32) -> usize {
    (value_size as usize).div_ceil(8) * 8
}

impl Tool {
    pub(super) fn do_dump(&mut self, words: &[&str]) -> Flow {
        if words.len() != 2 {
            return Err(self.usage());
        }
        let fds = self.parse_fds(words)?;
        let wtr = if self.json_output() {
            Some(Wtr::Global)
        } else if self.maps_have_btf(&fds)? {
            self.btf_wtr = Some(JsonWriter::new(true));
            Some(Wtr::Btf)
        } else {
            None
        };
        let many = fds.len() > 1;
        if let (Some(which), true) = (wtr, many)
            && let Some((w, out)) = self.writer(which)
        {
            w.start_array(out);
        }
        // One buffer for all maps (see `InfoBuf`); bpftool's result starts as failure and
        // is the last map's dump result once one info read succeeded.
        let mut buf = InfoBuf::new();
        let mut result = Err(Reported::FAIL);
        for (i, fd) in fds.iter().enumerate() {
            let info = match buf.read(fd.as_fd()) {
                Ok(info) => info,
                Err(e) => {
                    self.p_err(&MapError::MapInfo(errno_of(&e)));
                    break;
                }
            };
            result = self.map_dump(fd.as_fd(), &info, wtr, many);
            if wtr.is_none() && i != fds.len() - 1 {
                self.out.push('\n');
            }
            if result.is_err() {
                break;
            }
        }
        if let (Some(which), true) = (wtr, many)
            && let Some((w, out)) = self.writer(which)
        {
            w.end_array(out);
        }
        if let Some(w) = self.btf_wtr.take() {
            w.finish(&mut self.out);
        }
        result
    }

    /// `maps_have_btf`: typed plain output only if every map has BTF.
    fn maps_have_btf(&mut self, fds: &[std::os::fd::OwnedFd]) -> Flow<bool> {
        let mut buf = InfoBuf::new();
        for fd in fds {
            match buf.read(fd.as_fd()) {
                Ok(info) if info.btf_id == 0 => return Ok(false),
                Ok(_) => {}
                Err(e) => return Err(self.fail(MapError::MapInfo(errno_of(&e)))),
            }
        }
        Ok(true)
    }

    /// `get_map_kv_btf`: the BTF to type entries with, if the map's value has a type.
    fn map_kv_btf(&mut self, info: &MapInfo) -> Flow<Option<Btf>> {
        let (blob, error) = if info.btf_vmlinux_value_type_id != 0 {
            (std::fs::read("/sys/kernel/btf/vmlinux"), MapError::KernelBtf)
        } else if info.btf_value_type_id != 0 {
            let blob = bpf::btf_fd_by_id(info.btf_id).and_then(|fd| bpf::btf_data(fd.as_fd()));
            (blob, MapError::Btf)
        } else {
            return Ok(None);
        };
        let parsed = blob.map_err(|e| errno_of(&e)).and_then(|b| Btf::parse(&b).map_err(|_| libc::EINVAL));
        match parsed {
            Ok(btf) => Ok(Some(btf)),
            Err(errno) => {
                self.p_err(&error);
                Err(Reported::errno(errno))
            }
        }
    }

    fn map_dump(&mut self, fd: BorrowedFd<'_>, info: &MapInfo, wtr: Option<Wtr>, show_header: bool) -> Flow {
        let cpus = if map_is_per_cpu(info.map_type) { self.possible_cpus()? } else { 1 };
        let map = bpf::MapFd::open(fd).map_err(|e| self.fail(MapError::MapInfo(errno_of(&e))))?;
        let mut key = vec![0u8; map.key_size()];
        let mut value = vec![0u8; map.value_len()];
        let mut btf = None;
        match wtr {
            Some(which) => {
                btf = self.map_kv_btf(info)?;
                if let Some((w, out)) = self.writer(which) {
                    if show_header {
                        w.start_object(out);
                        header_json(w, out, info);
                        w.name(out, "elements");
                    }
                    w.start_array(out);
                }
            }
            None if show_header => header_plain(&mut self.out, info),
            None => {}
        }
        if info.map_type == MAP_TYPE_REUSEPORT_SOCKARRAY && info.value_size != 8 {
            let t = super::map_type_str(info.map_type).unwrap_or("(null)");
            self.p_info(&format!("Warning: cannot read values from {t} map with value_size != 8"));
        }
        let mut prev: Option<Vec<u8>> = None;
        let mut count = 0u32;
        let mut result = Ok(());
        loop {
            match map.next_key(prev.as_deref(), &mut key) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    result = Err(Reported::errno(errno_of(&e)));
                    break;
                }
            }
            if self.dump_elem(&map, &key, &mut value, info, btf.as_ref(), cpus) {
                count += 1;
            }
            prev = Some(key.clone());
        }
        match wtr.and_then(|which| self.writer(which)) {
            Some((w, out)) => {
                w.end_array(out);
                if show_header {
                    w.end_object(out);
                }
            }
            None => {
                let _ = writeln!(self.out, "Found {count} element{}", if count != 1 { "s" } else { "" });
            }
        }
        result
    }

    /// `dump_map_elem`: true when the entry was read (and so counts).
    fn dump_elem(
        &mut self,
        map: &bpf::MapFd<'_>,
        key: &[u8],
        value: &mut [u8],
        info: &MapInfo,
        btf: Option<&Btf>,
        cpus: usize,
    ) -> bool {
        let errno = match map.lookup(key, value) {
            Ok(true) => None,
            Ok(false) => Some(libc::ENOENT),
            Err(e) => Some(errno_of(&e)),
        };
        if let Some(errno) = errno {
            self.entry_error(info, key, errno);
            return false;
        }
        if let Some(w) = &mut self.json {
            entry_json(w, &mut self.out, info, key, value, btf, cpus);
        } else if let (Some(btf), Some(w)) = (btf, &mut self.btf_wtr) {
            dump_btf(&Dumper { btf, plain: true }, w, &mut self.out, info, key, value, cpus);
        } else {
            entry_plain(&mut self.out, info, key, value, cpus);
        }
        true
    }

    /// `print_entry_error`.
    fn entry_error(&mut self, info: &MapInfo, key: &[u8], errno: i32) {
        // In maps of maps or programs a failed lookup just means an empty slot.
        if matches!(info.map_type, MAP_TYPE_ARRAY_OF_MAPS | MAP_TYPE_HASH_OF_MAPS | MAP_TYPE_PROG_ARRAY)
            && errno == libc::ENOENT
        {
            return;
        }
        if let Some(w) = &mut self.json {
            let out = &mut self.out;
            w.start_object(out);
            w.name(out, "key");
            hex_json(w, out, key);
            w.name(out, "value");
            w.start_object(out);
            w.string_field(out, "error", &strerror(errno));
            w.end_object(out);
            w.end_object(out);
            return;
        }
        let msg = if errno == libc::ENOENT {
            "<no entry>".to_owned()
        } else if errno == libc::ENOSPC && info.map_type == MAP_TYPE_REUSEPORT_SOCKARRAY {
            "<cannot read>".to_owned()
        } else {
            strerror(errno)
        };
        // `print_entry_error_msg`
        let break_names = info.key_size > 16 || msg.len() > 16;
        let single_line = info.key_size as usize + msg.len() <= 24 && !break_names;
        let out = &mut self.out;
        out.push_str(if break_names { "key:\n" } else { "key: " });
        fprint_hex(out, key);
        out.push_str(if single_line { "  " } else { "\n" });
        out.push_str(if break_names { "value:\n" } else { "value: " });
        out.push_str(&msg);
        out.push('\n');
    }
}

/// `print_hex_data_json`.
fn hex_json(w: &mut JsonWriter, out: &mut String, data: &[u8]) {
    w.start_array(out);
    for b in data {
        w.raw(out, format_args!("\"0x{b:02x}\""));
    }
    w.end_array(out);
}

/// `print_entry_json`.
fn entry_json(
    w: &mut JsonWriter,
    out: &mut String,
    info: &MapInfo,
    key: &[u8],
    value: &[u8],
    btf: Option<&Btf>,
    cpus: usize,
) {
    let size = info.value_size as usize;
    w.start_object(out);
    w.name(out, "key");
    hex_json(w, out, key);
    if !map_is_per_cpu(info.map_type) {
        w.name(out, "value");
        hex_json(w, out, &value[..size.min(value.len())]);
    } else {
        per_cpu_json(w, out, info, value, cpus, |w, out, v| {
            hex_json(w, out, &v[..size.min(v.len())]);
            Ok::<(), std::convert::Infallible>(())
        });
    }
    if let Some(btf) = btf {
        w.name(out, "formatted");
        dump_btf(&Dumper { btf, plain: false }, w, out, info, key, value, cpus);
    }
    w.end_object(out);
}

/// `"values": [{"cpu": N, "value": ...}, ...]` of a per-CPU value, each CPU's bytes written
/// by `each`; stops after the first CPU `each` fails on, as bpftool's typed dump does.
fn per_cpu_json<E>(
    w: &mut JsonWriter,
    out: &mut String,
    info: &MapInfo,
    value: &[u8],
    cpus: usize,
    mut each: impl FnMut(&mut JsonWriter, &mut String, &[u8]) -> Result<(), E>,
) {
    let step = per_cpu_step(info.value_size);
    w.name(out, "values");
    w.start_array(out);
    for cpu in 0..cpus {
        w.start_object(out);
        w.int_field(out, "cpu", cpu as i64);
        w.name(out, "value");
        let r = each(w, out, value.get(cpu * step..).unwrap_or_default());
        w.end_object(out);
        if r.is_err() {
            break;
        }
    }
    w.end_array(out);
}

/// `do_dump_btf`: one entry as a typed object; stops at the first member that fails.
fn dump_btf(
    d: &Dumper<'_>,
    w: &mut JsonWriter,
    out: &mut String,
    info: &MapInfo,
    key: &[u8],
    value: &[u8],
    cpus: usize,
) {
    w.start_object(out);
    let key_ok = info.btf_key_type_id == 0 || {
        w.name(out, "key");
        d.dump(w, out, info.btf_key_type_id, key).is_ok()
    };
    if key_ok {
        let value_id =
            if info.btf_vmlinux_value_type_id != 0 { info.btf_vmlinux_value_type_id } else { info.btf_value_type_id };
        if !map_is_per_cpu(info.map_type) {
            w.name(out, "value");
            let _ = d.dump(w, out, value_id, value);
        } else {
            per_cpu_json(w, out, info, value, cpus, |w, out, v| d.dump(w, out, value_id, v));
        }
    }
    w.end_object(out);
}

/// `print_entry_plain`: hex, on one line when key and value fit in 24 bytes.
fn entry_plain(out: &mut String, info: &MapInfo, key: &[u8], value: &[u8], cpus: usize) {
    let size = info.value_size as usize;
    if !map_is_per_cpu(info.map_type) {
        let break_names = info.key_size > 16 || info.value_size > 16;
        let single_line = info.key_size + info.value_size <= 24 && !break_names;
        if info.key_size != 0 {
            out.push_str(if break_names { "key:\n" } else { "key: " });
            fprint_hex(out, key);
            out.push_str(if single_line { "  " } else { "\n" });
        }
        if info.value_size != 0 {
            out.push_str(if break_names { "value:\n" } else { "value: " });
            fprint_hex(out, &value[..size.min(value.len())]);
        }
        out.push('\n');
    } else {
        let step = per_cpu_step(info.value_size);
        if info.key_size != 0 {
            out.push_str("key:\n");
            fprint_hex(out, key);
            out.push('\n');
        }
        if info.value_size != 0 {
            for cpu in 0..cpus {
                let _ = write!(out, "value (CPU {cpu:02}):{}", if info.value_size > 16 { '\n' } else { ' ' });
                let v = value.get(cpu * step..).unwrap_or_default();
                fprint_hex(out, &v[..size.min(v.len())]);
                out.push('\n');
            }
        }
    }
}
