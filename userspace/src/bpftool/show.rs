//! `map show` / `map list`: bpftool's `do_show`, `do_show_subset` and `show_map_close_*`.

use std::fmt::Write as _;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;

use super::json::JsonWriter;
use super::{Flow, InfoBuf, MAP_TYPE_PROG_ARRAY, MapError, MapInfo, Tool, atoll, errno_of, fdinfo};
use crate::datapath::bpf;

impl Tool {
    pub(super) fn do_show(&mut self, words: &[&str]) -> Flow {
        if words.len() == 2 {
            return self.show_subset(words);
        }
        if let Some(first) = words.first() {
            return Err(self.fail(MapError::BadArg((*first).to_owned())));
        }
        self.with_json(|w, out| w.start_array(out));
        // One info buffer for the whole walk, as bpftool has (see `InfoBuf`).
        let mut buf = InfoBuf::new();
        let mut id = 0;
        let mut result = Ok(());
        loop {
            id = match bpf::next_map_id(id) {
                Ok(Some(next)) => next,
                Ok(None) => break,
                Err(e) => {
                    result = Err(self.fail(MapError::NextMap(errno_of(&e))));
                    break;
                }
            };
            let fd = match bpf::map_fd_by_id(id) {
                Ok(fd) => fd,
                // Gone since its id was listed.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => {
                    result = Err(self.fail(MapError::MapById { id, errno: errno_of(&e) }));
                    break;
                }
            };
            match buf.read(fd.as_fd()) {
                Ok(info) => self.show_map(fd.as_fd(), &info),
                Err(e) => {
                    result = Err(self.fail(MapError::MapInfo(errno_of(&e))));
                    break;
                }
            }
        }
        self.with_json(|w, out| w.end_array(out));
        result
    }

    fn show_subset(&mut self, words: &[&str]) -> Flow {
        let fds = self.parse_fds(words)?;
        let many = fds.len() > 1;
        if many {
            self.with_json(|w, out| w.start_array(out));
        }
        let mut buf = InfoBuf::new();
        let mut result = Ok(());
        for fd in &fds {
            match buf.read(fd.as_fd()) {
                Ok(info) => self.show_map(fd.as_fd(), &info),
                Err(e) => {
                    result = Err(self.fail(MapError::MapInfo(errno_of(&e))));
                    break;
                }
            }
        }
        if many {
            self.with_json(|w, out| w.end_array(out));
        }
        result
    }

    fn with_json(&mut self, f: impl FnOnce(&mut JsonWriter, &mut String)) {
        if let Some(w) = &mut self.json {
            f(w, &mut self.out);
        }
    }

    fn show_map(&mut self, fd: BorrowedFd<'_>, info: &MapInfo) {
        match &mut self.json {
            Some(w) => show_map_json(w, &mut self.out, fd, info),
            None => show_map_plain(&mut self.out, fd, info),
        }
    }
}

/// `show_map_header_json`, also used for the header of each map in a multi-map dump.
pub(super) fn header_json(w: &mut JsonWriter, out: &mut String, info: &MapInfo) {
    w.uint_field(out, "id", info.id.into());
    match super::map_type_str(info.map_type) {
        Some(t) => w.string_field(out, "type", t),
        None => w.uint_field(out, "type", info.map_type.into()),
    }
    if !info.name.is_empty() {
        w.string_field(out, "name", &info.name);
    }
    w.name(out, "flags");
    // printf("%d")
    w.raw(out, info.map_flags as i32);
}

/// `show_map_header_plain`.
pub(super) fn header_plain(out: &mut String, info: &MapInfo) {
    let _ = write!(out, "{}: ", info.id);
    match super::map_type_str(info.map_type) {
        Some(t) => {
            let _ = write!(out, "{t}  ");
        }
        None => {
            let _ = write!(out, "type {}  ", info.map_type);
        }
    }
    if !info.name.is_empty() {
        let _ = write!(out, "name {}  ", info.name);
    }
    let _ = write!(out, "flags 0x{:x}", info.map_flags);
    dev_plain(out, info);
    out.push('\n');
}

fn show_map_json(w: &mut JsonWriter, out: &mut String, fd: BorrowedFd<'_>, info: &MapInfo) {
    let memlock = fdinfo(fd, "memlock");
    let frozen = fdinfo(fd, "frozen");
    w.start_object(out);
    header_json(w, out, info);
    dev_json(w, out, info);
    w.uint_field(out, "bytes_key", info.key_size.into());
    w.uint_field(out, "bytes_value", info.value_size.into());
    w.uint_field(out, "max_entries", info.max_entries.into());
    if let Some(m) = memlock {
        w.int_field(out, "bytes_memlock", atoll(&m));
    }
    if info.map_type == MAP_TYPE_PROG_ARRAY {
        if let Some(t) = fdinfo(fd, "owner_prog_type") {
            let t = atoll(&t) as u32;
            match super::prog_type_str(t) {
                Some(s) => w.string_field(out, "owner_prog_type", s),
                None => w.uint_field(out, "owner_prog_type", t.into()),
            }
        }
        if let Some(j) = fdinfo(fd, "owner_jited") {
            w.name(out, "owner_jited");
            w.bool(out, atoll(&j) as i32 != 0);
        }
    }
    w.int_field(out, "frozen", frozen.map_or(0, |f| atoll(&f) as i32).into());
    if info.btf_id != 0 {
        w.int_field(out, "btf_id", info.btf_id.into());
    }
    w.end_object(out);
}

fn show_map_plain(out: &mut String, fd: BorrowedFd<'_>, info: &MapInfo) {
    let memlock = fdinfo(fd, "memlock");
    let frozen = fdinfo(fd, "frozen");
    header_plain(out, info);
    let _ = write!(out, "\tkey {}B  value {}B  max_entries {}", info.key_size, info.value_size, info.max_entries);
    if let Some(m) = memlock {
        let _ = write!(out, "  memlock {m}B");
    }
    if info.map_type == MAP_TYPE_PROG_ARRAY {
        let owner_type = fdinfo(fd, "owner_prog_type");
        let owner_jited = fdinfo(fd, "owner_jited");
        if owner_type.is_some() || owner_jited.is_some() {
            out.push_str("\n\t");
        }
        if let Some(t) = owner_type {
            let t = atoll(&t) as i32;
            match super::prog_type_str(t as u32) {
                Some(s) => {
                    let _ = write!(out, "owner_prog_type {s}  ");
                }
                None => {
                    let _ = write!(out, "owner_prog_type {t}  ");
                }
            }
        }
        if let Some(j) = owner_jited {
            let _ = write!(out, "owner{} jited", if atoll(&j) as i32 != 0 { "" } else { " not" });
        }
    }
    let frozen = frozen.map_or(0, |f| atoll(&f) as i32);
    if info.btf_id != 0 || frozen != 0 {
        out.push_str("\n\t");
    }
    if info.btf_id != 0 {
        // printf("%d")
        let _ = write!(out, "btf_id {}", info.btf_id as i32);
    }
    if frozen != 0 {
        let _ = write!(out, "{}frozen", if info.btf_id != 0 { "  " } else { "" });
    }
    out.push('\n');
}

/// The name of an offloaded map's device, when it lives in this network namespace
/// (bpftool compares the namespace's device and inode, as 32-bit values).
fn offload_ifname(info: &MapInfo) -> Option<String> {
    let st = std::fs::metadata("/proc/self/ns/net").ok()?;
    if st.dev() != u64::from(info.netns_dev as u32) || st.ino() != u64::from(info.netns_ino as u32) {
        return None;
    }
    // An unknown index comes back from nix 0.31 as an empty name, not an error.
    nix::net::if_::if_indextoname(info.ifindex).ok().map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty())
}

/// `print_dev_plain`: only offloaded maps have a device.
fn dev_plain(out: &mut String, info: &MapInfo) {
    if info.ifindex == 0 {
        return;
    }
    out.push_str("  offloaded_to ");
    match offload_ifname(info) {
        Some(name) => out.push_str(&name),
        None => {
            let _ = write!(out, "ifindex {} ns_dev {} ns_ino {}", info.ifindex, info.netns_dev, info.netns_ino);
        }
    }
}

fn dev_json(w: &mut JsonWriter, out: &mut String, info: &MapInfo) {
    if info.ifindex == 0 {
        return;
    }
    w.name(out, "dev");
    w.start_object(out);
    w.uint_field(out, "ifindex", info.ifindex.into());
    w.uint_field(out, "ns_dev", info.netns_dev);
    w.uint_field(out, "ns_inode", info.netns_ino);
    if let Some(name) = offload_ifname(info) {
        w.string_field(out, "ifname", &name);
    }
    w.end_object(out);
}
