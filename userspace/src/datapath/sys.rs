//! The loader's one module with `unsafe`: marking meshpath's shared map types as plain old
//! data for aya, and the few raw BPF syscalls aya does not offer (reading any map byte for
//! byte, its BTF). Everything else in userspace is safe code.
#![allow(unsafe_code)]

use meshpath_common::{InterfaceValue, WorkloadKey, WorkloadValue};

/// [`WorkloadKey`] as an aya map key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct PodKey(pub WorkloadKey);

/// [`WorkloadValue`] as an aya map value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct PodValue(pub WorkloadValue);

/// [`InterfaceValue`] as an aya map value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct IfValue(pub InterfaceValue);

// SAFETY: `InterfaceValue` is `#[repr(C)]` of two `u32` and eight bytes, no padding (checked by the
// layout test in meshpath-common); every bit pattern is valid.
unsafe impl aya::Pod for IfValue {}

// SAFETY: `WorkloadKey` is `#[repr(C)]` around `[u8; 16]`: no padding, every bit pattern
// valid; `repr(transparent)` keeps that layout.
unsafe impl aya::Pod for PodKey {}
// SAFETY: `WorkloadValue` is `#[repr(C)]` of two `u32` with no padding (checked by the
// layout test in meshpath-common); every bit pattern is valid.
unsafe impl aya::Pod for PodValue {}

/// Raw BPF syscalls for inspecting maps by id, fd or pin (aya covers loading, not reading
/// arbitrary maps byte for byte, nor their BTF ids). Each takes or returns owned buffers;
/// the pointers handed to the kernel never outlive the call.
pub mod bpf {
    use std::ffi::CString;
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
    use std::path::Path;

    pub use aya_obj::generated::{bpf_btf_info, bpf_map_info};

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_MAP_GET_NEXT_ID: libc::c_long = 12;
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;

    /// The prefix of `union bpf_attr` each command reads; the kernel takes a shorter attr
    /// and zero-fills the rest.
    #[repr(C)]
    #[derive(Default)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value_or_next_key: u64,
        flags: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct IdAttr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    /// ENOENT (no such key, no next key, no next id) as `None`.
    fn unless_enoent<T>(r: io::Result<T>) -> io::Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn sys<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a live, properly sized `repr(C)` prefix of `union bpf_attr` for
        // `cmd`; any pointers inside it point to buffers the caller keeps alive for the call.
        let r =
            unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T as *mut libc::c_void, size_of::<T>() as u32) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
    }

    fn owned_fd(r: libc::c_long) -> OwnedFd {
        // SAFETY: the kernel just returned this new file descriptor to us; nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(r as i32) }
    }

    /// A map fd with the sizes of its entries. Every access checks the caller's buffers
    /// against them, so the kernel never writes past a buffer whatever the caller passes.
    pub struct MapFd<'a> {
        fd: BorrowedFd<'a>,
        key_size: usize,
        value_len: usize,
    }

    impl<'a> MapFd<'a> {
        /// Reads the map's key and value sizes; per-CPU maps take one 8-byte aligned value
        /// slot per possible CPU.
        pub fn open(fd: BorrowedFd<'a>) -> io::Result<Self> {
            let info = map_info(fd)?;
            let value_len = if map_is_per_cpu(info.type_) {
                (info.value_size as usize).div_ceil(8) * 8 * possible_cpus()?
            } else {
                info.value_size as usize
            };
            Ok(Self { fd, key_size: info.key_size as usize, value_len })
        }

        pub fn key_size(&self) -> usize {
            self.key_size
        }

        /// The size of a value buffer (all CPUs' values for a per-CPU map).
        pub fn value_len(&self) -> usize {
            self.value_len
        }

        fn check(&self, key: usize, value: Option<usize>) -> io::Result<()> {
            if key != self.key_size || value.is_some_and(|v| v != self.value_len) {
                let want = format!("key {}B, value {}B", self.key_size, self.value_len);
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("map entry buffers must be {want}")));
            }
            Ok(())
        }

        fn elem(&self, key: u64, value_or_next_key: u64) -> ElemAttr {
            ElemAttr { map_fd: self.fd.as_raw_fd() as u32, key, value_or_next_key, ..Default::default() }
        }

        /// The value under `key` into `value`; `Ok(false)` when there is no such key.
        pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
            self.check(key.len(), Some(value.len()))?;
            let mut a = self.elem(key.as_ptr() as u64, value.as_mut_ptr() as u64);
            Ok(unless_enoent(sys(BPF_MAP_LOOKUP_ELEM, &mut a))?.is_some())
        }

        /// Sets `key` to `value` (`BPF_ANY`).
        pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
            self.check(key.len(), Some(value.len()))?;
            let mut a = self.elem(key.as_ptr() as u64, value.as_ptr() as u64);
            sys(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
        }

        /// The key after `key` (the first key with `None`) into `next`; `Ok(false)` at the end.
        pub fn next_key(&self, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
            self.check(next.len(), None)?;
            if let Some(k) = key {
                self.check(k.len(), None)?;
            }
            let mut a = self.elem(key.map_or(0, |k| k.as_ptr() as u64), next.as_mut_ptr() as u64);
            Ok(unless_enoent(sys(BPF_MAP_GET_NEXT_KEY, &mut a))?.is_some())
        }
    }

    /// Map types whose values are per CPU.
    pub fn map_is_per_cpu(map_type: u32) -> bool {
        // BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH, _PERCPU_CGROUP_STORAGE.
        matches!(map_type, 5 | 6 | 10 | 21)
    }

    /// The number of possible CPUs (the kernel's `num_possible_cpus()`), read once.
    pub fn possible_cpus() -> io::Result<usize> {
        static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        if let Some(n) = CPUS.get() {
            return Ok(*n);
        }
        let path = "/sys/devices/system/cpu/possible";
        let text = std::fs::read_to_string(path)?;
        let n = parse_cpu_list(&text)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {:?}", text.trim())))?;
        Ok(*CPUS.get_or_init(|| n))
    }

    /// The number of CPUs in a kernel CPU list (`0-3,5`).
    pub fn parse_cpu_list(text: &str) -> Option<usize> {
        let mut set = std::collections::BTreeSet::new();
        for part in text.trim().split(',') {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim().parse::<usize>().ok()?, b.trim().parse::<usize>().ok()?),
                None => {
                    let a = part.trim().parse::<usize>().ok()?;
                    (a, a)
                }
            };
            if a > b || b > 1 << 20 {
                return None;
            }
            set.extend(a..=b);
        }
        (!set.is_empty()).then_some(set.len())
    }

    /// The id of the next map after `id` in the kernel, `None` after the last.
    pub fn next_map_id(id: u32) -> io::Result<Option<u32>> {
        let mut a = IdAttr { id, ..Default::default() };
        Ok(unless_enoent(sys(BPF_MAP_GET_NEXT_ID, &mut a))?.map(|_| a.next_id))
    }

    pub fn map_fd_by_id(id: u32) -> io::Result<OwnedFd> {
        let mut a = IdAttr { id, ..Default::default() };
        sys(BPF_MAP_GET_FD_BY_ID, &mut a).map(owned_fd)
    }

    pub fn btf_fd_by_id(id: u32) -> io::Result<OwnedFd> {
        let mut a = IdAttr { id, ..Default::default() };
        sys(BPF_BTF_GET_FD_BY_ID, &mut a).map(owned_fd)
    }

    /// Pins the object behind `fd` at `path` on bpffs.
    pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut a = ObjGetAttr { pathname: c.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, ..Default::default() };
        sys(BPF_OBJ_PIN, &mut a).map(|_| ())
    }

    /// Opens a pinned BPF object.
    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut a = ObjGetAttr { pathname: c.as_ptr() as u64, ..Default::default() };
        sys(BPF_OBJ_GET, &mut a).map(owned_fd)
    }

    /// The info structs of the kernel ABI: integers only, so all zeroes is a valid value.
    pub trait Info: Copy {}
    impl Info for bpf_map_info {}
    impl Info for bpf_btf_info {}

    /// An all-zero info struct, as bpftool's `struct bpf_map_info info = {};`.
    pub fn zeroed<T: Info>() -> T {
        // SAFETY: `Info` types are plain `repr(C)` structs of integers; zero is valid for each.
        unsafe { std::mem::zeroed() }
    }

    fn info<T: Info>(fd: BorrowedFd<'_>) -> io::Result<T> {
        let mut info = zeroed::<T>();
        let mut a = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: size_of::<T>() as u32,
            info: &mut info as *mut T as u64,
        };
        sys(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
        Ok(info)
    }

    /// `bpf_map_info` of a map fd (fails with EINVAL for other kinds of fd).
    pub fn map_info(fd: BorrowedFd<'_>) -> io::Result<bpf_map_info> {
        info(fd)
    }

    /// `bpf_map_info` of a map fd into the caller's `info` as it is, the way libbpf's
    /// `bpf_obj_get_info_by_fd` does: `len` is the buffer size going in and the size the
    /// kernel filled coming out. Since Linux 6.18 the kernel starts from the caller's buffer
    /// and leaves fields it does not set (the BTF ids of a map without BTF) as they were.
    pub fn map_info_into(fd: BorrowedFd<'_>, info: &mut bpf_map_info, len: &mut u32) -> io::Result<()> {
        let mut a = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            // Never more than the buffer holds, whatever the caller passes.
            info_len: (*len).min(size_of::<bpf_map_info>() as u32),
            info: info as *mut bpf_map_info as u64,
        };
        sys(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
        *len = a.info_len;
        Ok(())
    }

    /// The raw BTF blob of a BTF object fd.
    pub fn btf_data(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
        let size = info::<bpf_btf_info>(fd)?.btf_size;
        let mut data = vec![0u8; size as usize];
        let mut bi = bpf_btf_info { btf: data.as_mut_ptr() as u64, btf_size: size, ..zeroed() };
        let mut a = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: size_of::<bpf_btf_info>() as u32,
            info: &mut bi as *mut _ as u64,
        };
        sys(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
        data.truncate(bi.btf_size as usize);
        Ok(data)
    }
}

/// The drop-event ring buffer, registered with tokio's reactor so its readiness can be
/// awaited.
pub fn async_events(events: super::Events) -> std::io::Result<tokio::io::unix::AsyncFd<super::Events>> {
    // SAFETY: the ring buffer owns its map fd, which nothing else closes while the AsyncFd
    // owns the ring buffer, and `as_raw_fd` always returns that same fd.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}
