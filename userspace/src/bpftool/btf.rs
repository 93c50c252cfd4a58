//! BTF: a small parser for the raw blobs the kernel hands out, and bpftool's `btf_dumper.c`
//! ported to print map keys and values as typed JSON exactly as `bpftool map dump` does.
//!
//! Why not a crate: aya-obj parses BTF but keeps its type accessors crate-private, and
//! btf-rs hides what the dumper needs (an int's bit count, bit offset and exact encoding)
//! and is LGPL while meshpath is Apache-2.0. The format is small: a header, fixed-size type
//! records with kind-specific tails, and a string table.
//!
//! Reads past the end of a key or value yield zero bytes instead of failing: bpftool reads
//! whatever memory follows there, which only happens with BTF that does not describe the map
//! (see `MapInfoReader` in `mod.rs`), and a panic would help nobody.

use super::json::JsonWriter;

const BTF_MAGIC: u16 = 0xeb9f;
/// libbpf's MAX_RESOLVE_DEPTH.
const MAX_RESOLVE_DEPTH: usize = 32;

pub const KIND_UNKN: u32 = 0;
pub const KIND_INT: u32 = 1;
pub const KIND_PTR: u32 = 2;
pub const KIND_ARRAY: u32 = 3;
pub const KIND_STRUCT: u32 = 4;
pub const KIND_UNION: u32 = 5;
pub const KIND_ENUM: u32 = 6;
pub const KIND_FWD: u32 = 7;
pub const KIND_TYPEDEF: u32 = 8;
pub const KIND_VOLATILE: u32 = 9;
pub const KIND_CONST: u32 = 10;
pub const KIND_RESTRICT: u32 = 11;
pub const KIND_FUNC: u32 = 12;
pub const KIND_FUNC_PROTO: u32 = 13;
pub const KIND_VAR: u32 = 14;
pub const KIND_DATASEC: u32 = 15;
pub const KIND_FLOAT: u32 = 16;
pub const KIND_DECL_TAG: u32 = 17;
pub const KIND_TYPE_TAG: u32 = 18;
pub const KIND_ENUM64: u32 = 19;

const INT_SIGNED: u32 = 1;
const INT_CHAR: u32 = 2;
const INT_BOOL: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("BTF blob too short ({0} bytes)")]
    Truncated(usize),
    #[error("bad BTF magic {0:#06x}")]
    Magic(u16),
    #[error("unknown BTF kind {kind} at type {id}")]
    Kind { kind: u32, id: u32 },
}

/// Kind-specific data following a type record.
#[derive(Debug, Clone)]
enum Tail {
    None,
    /// BTF_KIND_INT: encoding << 24 | offset << 16 | bits.
    Int(u32),
    Array {
        elem: u32,
        nelems: u32,
    },
    /// name_off, type, offset (bit offset, or bitfield size << 24 | bit offset with kflag).
    Members(Vec<(u32, u32, u32)>),
    /// name_off, value.
    Enum(Vec<(u32, i32)>),
    /// name_off, lo32, hi32.
    Enum64(Vec<(u32, u32, u32)>),
    /// type, offset, size.
    Secinfo(Vec<(u32, u32, u32)>),
}

#[derive(Debug, Clone)]
pub struct Type {
    name_off: u32,
    info: u32,
    /// `size` or `type`, depending on the kind.
    size_type: u32,
    tail: Tail,
}

impl Type {
    pub fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn kflag(&self) -> bool {
        self.info >> 31 == 1
    }
    fn is_mod(&self) -> bool {
        matches!(self.kind(), KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG)
    }
}

/// The id-0 type every BTF has implicitly.
static VOID: Type = Type { name_off: 0, info: 0, size_type: 0, tail: Tail::None };

#[derive(Debug)]
pub struct Btf {
    /// Index = type id; 0 is void.
    types: Vec<Type>,
    strings: Vec<u8>,
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let b = self.data.get(self.at..self.at + 4).ok_or(BtfError::Truncated(self.data.len()))?;
        self.at += 4;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl Btf {
    /// Parses a raw (not ELF) little-endian BTF blob, as `BPF_OBJ_GET_INFO_BY_FD` returns it
    /// and /sys/kernel/btf/vmlinux holds it.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let short = || BtfError::Truncated(data.len());
        let u32_at =
            |at: usize| data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or_else(short);
        let magic = data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]])).ok_or_else(short)?;
        if magic != BTF_MAGIC {
            return Err(BtfError::Magic(magic));
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or_else(short)?;
            data.get(start..start.checked_add(len).ok_or_else(short)?).ok_or_else(short)
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();

        let mut types = vec![VOID.clone()];
        let mut r = Reader { data: type_data, at: 0 };
        while r.at < type_data.len() {
            let id = types.len() as u32;
            let (name_off, info, size_type) = (r.u32()?, r.u32()?, r.u32()?);
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let triples = |r: &mut Reader<'_>| -> Result<Vec<(u32, u32, u32)>, BtfError> {
                (0..vlen).map(|_| Ok((r.u32()?, r.u32()?, r.u32()?))).collect()
            };
            let tail = match kind {
                KIND_INT => Tail::Int(r.u32()?),
                KIND_ARRAY => {
                    let (elem, _index, nelems) = (r.u32()?, r.u32()?, r.u32()?);
                    Tail::Array { elem, nelems }
                }
                KIND_STRUCT | KIND_UNION => Tail::Members(triples(&mut r)?),
                KIND_ENUM => {
                    Tail::Enum((0..vlen).map(|_| Ok((r.u32()?, r.u32()? as i32))).collect::<Result<_, BtfError>>()?)
                }
                KIND_ENUM64 => Tail::Enum64(triples(&mut r)?),
                KIND_DATASEC => Tail::Secinfo(triples(&mut r)?),
                KIND_FUNC_PROTO => {
                    // Parameters (name_off, type): not needed for dumping data.
                    for _ in 0..vlen {
                        r.u32()?;
                        r.u32()?;
                    }
                    Tail::None
                }
                KIND_VAR | KIND_DECL_TAG => {
                    r.u32()?; // linkage / component index
                    Tail::None
                }
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC
                | KIND_FLOAT | KIND_TYPE_TAG => Tail::None,
                kind => return Err(BtfError::Kind { kind, id }),
            };
            types.push(Type { name_off, info, size_type, tail });
        }
        Ok(Self { types, strings })
    }

    /// `btf__type_by_id`.
    pub fn type_by_id(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize)
    }

    /// `btf__name_by_offset`; an offset outside the table reads as "".
    pub fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// libbpf's `btf_type_is_void_or_null`: absent, void, or a forward declaration.
    fn void_or_null(&self, id: u32) -> bool {
        match self.type_by_id(id) {
            None => true,
            Some(t) => id == 0 || t.kind() == KIND_FWD,
        }
    }

    /// `btf__resolve_type`: through modifiers, typedefs and vars.
    pub fn resolve_type(&self, mut id: u32) -> Option<u32> {
        let mut depth = 0;
        while depth < MAX_RESOLVE_DEPTH && !self.void_or_null(id) {
            let t = self.type_by_id(id)?;
            if !(t.is_mod() || matches!(t.kind(), KIND_TYPEDEF | KIND_VAR)) {
                break;
            }
            id = t.size_type;
            depth += 1;
        }
        (depth < MAX_RESOLVE_DEPTH && !self.void_or_null(id)).then_some(id)
    }

    /// `btf__resolve_size`.
    pub fn resolve_size(&self, mut id: u32) -> Option<u64> {
        let mut nelems: u64 = 1;
        let mut size: Option<u64> = None;
        for _ in 0..MAX_RESOLVE_DEPTH {
            if self.void_or_null(id) {
                break;
            }
            let t = self.type_by_id(id)?;
            match t.kind() {
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_DATASEC | KIND_FLOAT => {
                    size = Some(t.size_type.into());
                    break;
                }
                KIND_PTR => {
                    size = Some(size_of::<usize>() as u64);
                    break;
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_VAR | KIND_DECL_TAG
                | KIND_TYPE_TAG => id = t.size_type,
                KIND_ARRAY => {
                    let Tail::Array { elem, nelems: n } = t.tail else { return None };
                    if nelems != 0 && u64::from(n) > u64::from(u32::MAX) / nelems {
                        return None;
                    }
                    nelems *= u64::from(n);
                    id = elem;
                }
                _ => return None,
            }
        }
        let size = size?;
        if nelems != 0 && size > u64::from(u32::MAX) / nelems {
            return None;
        }
        Some(nelems * size)
    }
}

/// bpftool stops dumping a struct or array at the first member that fails; what was
/// written so far stays.
#[derive(Debug)]
pub struct Stop;

type Dumped = Result<(), Stop>;

/// `struct btf_dumper`: plain text (`bpftool map dump` without -j) differs from JSON only
/// in how chars, pointers and 128-bit ints are written.
pub struct Dumper<'a> {
    pub btf: &'a Btf,
    pub plain: bool,
}

/// `data` from `off` on (empty past the end).
fn from(data: &[u8], off: usize) -> &[u8] {
    data.get(off..).unwrap_or_default()
}

/// The first N bytes of `data`, zero-padded.
fn bytes<const N: usize>(data: &[u8]) -> [u8; N] {
    let mut b = [0u8; N];
    let n = data.len().min(N);
    b[..n].copy_from_slice(&data[..n]);
    b
}

fn u64_at(data: &[u8]) -> u64 {
    u64::from_le_bytes(bytes(data))
}

impl Dumper<'_> {
    /// `btf_dumper_type`.
    pub fn dump(&self, w: &mut JsonWriter, out: &mut String, type_id: u32, data: &[u8]) -> Dumped {
        self.do_type(w, out, type_id, 0, data)
    }

    fn do_type(&self, w: &mut JsonWriter, out: &mut String, id: u32, bit_offset: u8, data: &[u8]) -> Dumped {
        let t = self.btf.type_by_id(id).ok_or(Stop)?;
        match t.kind() {
            KIND_INT => self.int(w, out, t, bit_offset, data),
            KIND_STRUCT | KIND_UNION => self.structure(w, out, t, data),
            KIND_ARRAY => self.array(w, out, t, data),
            KIND_ENUM => self.enumeration(w, out, t, data),
            KIND_ENUM64 => self.enum64(w, out, t, data),
            KIND_PTR => {
                let v = u64_at(data);
                if self.plain {
                    // glibc's %p
                    if v == 0 { w.raw(out, "(nil)") } else { w.raw(out, format_args!("{v:#x}")) }
                } else {
                    w.raw(out, v);
                }
                Ok(())
            }
            KIND_UNKN => {
                w.raw(out, "(unknown)");
                Ok(())
            }
            KIND_FWD => {
                w.raw(out, "(fwd-kind-invalid)");
                Err(Stop)
            }
            KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT => {
                let actual = self.btf.resolve_type(id).ok_or(Stop)?;
                self.do_type(w, out, actual, bit_offset, data)
            }
            KIND_VAR => {
                w.start_object(out);
                w.name(out, self.btf.name(t.name_off));
                let r = self.do_type(w, out, t.size_type, bit_offset, data);
                w.end_object(out);
                r
            }
            KIND_DATASEC => {
                let Tail::Secinfo(vars) = &t.tail else { return Err(Stop) };
                w.start_object(out);
                w.name(out, self.btf.name(t.name_off));
                w.start_array(out);
                let mut r = Ok(());
                for &(ty, offset, _size) in vars {
                    r = self.do_type(w, out, ty, 0, from(data, offset as usize));
                    if r.is_err() {
                        break;
                    }
                }
                w.end_array(out);
                w.end_object(out);
                r
            }
            _ => {
                // sic: bpftool prints no closing parenthesis here.
                w.raw(out, "(unsupported-kind");
                Err(Stop)
            }
        }
    }

    fn int(&self, w: &mut JsonWriter, out: &mut String, t: &Type, bit_offset: u8, data: &[u8]) -> Dumped {
        let Tail::Int(int) = t.tail else { return Err(Stop) };
        let nr_bits = int & 0xff;
        let int_offset = (int >> 16) & 0xff;
        if bit_offset != 0 || int_offset != 0 || nr_bits % 8 != 0 {
            self.int_bits(w, out, int, bit_offset, data);
            return Ok(());
        }
        if nr_bits == 128 {
            int128_print(w, out, bytes(data), self.plain);
            return Ok(());
        }
        match (int >> 24) & 0x0f {
            0 => match nr_bits {
                64 => w.raw(out, u64::from_le_bytes(bytes(data))),
                32 => w.raw(out, u32::from_le_bytes(bytes(data))),
                16 => w.raw(out, u16::from_le_bytes(bytes(data))),
                8 => w.raw(out, bytes::<1>(data)[0]),
                _ => self.int_bits(w, out, int, bit_offset, data),
            },
            INT_SIGNED => match nr_bits {
                64 => w.raw(out, i64::from_le_bytes(bytes(data))),
                32 => w.raw(out, i32::from_le_bytes(bytes(data))),
                16 => w.raw(out, i16::from_le_bytes(bytes(data))),
                8 => w.raw(out, bytes::<1>(data)[0] as i8),
                _ => self.int_bits(w, out, int, bit_offset, data),
            },
            INT_CHAR => {
                let c = bytes::<1>(data)[0];
                if (0x20..0x7f).contains(&c) {
                    // Unescaped, as bpftool prints it.
                    w.raw(out, format_args!("\"{}\"", c as char));
                } else if self.plain {
                    w.raw(out, format_args!("0x{c:x}"));
                } else {
                    w.raw(out, format_args!("\"\\u00{c:02x}\""));
                }
            }
            INT_BOOL => w.bool(out, bytes::<1>(data)[0] != 0),
            _ => return Err(Stop),
        }
        Ok(())
    }

    /// `btf_dumper_int_bits`.
    fn int_bits(&self, w: &mut JsonWriter, out: &mut String, int: u32, bit_offset: u8, data: &[u8]) {
        let total = u32::from(bit_offset) + ((int >> 16) & 0xff);
        bitfield(w, out, int & 0xff, (total % 8) as u8, from(data, (total / 8) as usize), self.plain);
    }

    fn structure(&self, w: &mut JsonWriter, out: &mut String, t: &Type, data: &[u8]) -> Dumped {
        let Tail::Members(members) = &t.tail else { return Err(Stop) };
        w.start_object(out);
        let mut r = Ok(());
        for &(name_off, ty, offset) in members {
            let (bit_offset, bitfield_size) =
                if t.kflag() { (offset & 0x00ff_ffff, offset >> 24) } else { (offset, 0) };
            w.name(out, self.btf.name(name_off));
            let member = from(data, (bit_offset / 8) as usize);
            if bitfield_size != 0 {
                bitfield(w, out, bitfield_size, (bit_offset % 8) as u8, member, self.plain);
            } else {
                r = self.do_type(w, out, ty, (bit_offset % 8) as u8, member);
                if r.is_err() {
                    break;
                }
            }
        }
        w.end_object(out);
        r
    }

    /// A char array holding a NUL-terminated printable string prints as a string.
    fn is_str_array(&self, elem: u32, nelems: u32, data: &[u8]) -> bool {
        if nelems == 0 {
            return false;
        }
        // Modifiers are skipped, typedefs are not (a typedef to char is no string).
        let mut et = self.btf.type_by_id(elem);
        let mut depth = 0;
        while let Some(t) = et.filter(|t| t.is_mod()) {
            et = self.btf.type_by_id(t.size_type);
            depth += 1;
            if depth > MAX_RESOLVE_DEPTH {
                return false;
            }
        }
        let Some(et) = et else { return false };
        let Tail::Int(int) = et.tail else { return false };
        if et.kind() != KIND_INT || et.size_type != 1 {
            return false;
        }
        if (int >> 24) & 0x0f != INT_CHAR && self.btf.name(et.name_off) != "char" {
            return false;
        }
        for i in 0..nelems as usize {
            match data.get(i).copied().unwrap_or(0) {
                0 => return true,
                c if c <= 0x1f || c >= 0x7f => return false,
                _ => {}
            }
        }
        false
    }

    fn array(&self, w: &mut JsonWriter, out: &mut String, t: &Type, data: &[u8]) -> Dumped {
        let Tail::Array { elem, nelems } = t.tail else { return Err(Stop) };
        if self.is_str_array(elem, nelems, data) {
            let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
            w.string(out, &String::from_utf8_lossy(&data[..end]));
            return Ok(());
        }
        let elem_size = self.btf.resolve_size(elem).ok_or(Stop)? as usize;
        w.start_array(out);
        let mut r = Ok(());
        for i in 0..nelems as usize {
            r = self.do_type(w, out, elem, 0, from(data, i.saturating_mul(elem_size)));
            if r.is_err() {
                break;
            }
        }
        w.end_array(out);
        r
    }

    fn enumeration(&self, w: &mut JsonWriter, out: &mut String, t: &Type, data: &[u8]) -> Dumped {
        let Tail::Enum(values) = &t.tail else { return Err(Stop) };
        let value: i64 = match t.size_type {
            8 => i64::from_le_bytes(bytes(data)),
            4 => i32::from_le_bytes(bytes(data)).into(),
            2 => i16::from_le_bytes(bytes(data)).into(),
            1 => (bytes::<1>(data)[0] as i8).into(),
            _ => return Err(Stop),
        };
        match values.iter().find(|(_, v)| i64::from(*v) == value) {
            Some((name_off, _)) => w.string(out, self.btf.name(*name_off)),
            None => w.raw(out, value),
        }
        Ok(())
    }

    fn enum64(&self, w: &mut JsonWriter, out: &mut String, t: &Type, data: &[u8]) -> Dumped {
        let Tail::Enum64(values) = &t.tail else { return Err(Stop) };
        let value = u64_at(data);
        let (lo, hi) = (value as u32, (value >> 32) as u32);
        match values.iter().find(|(_, l, h)| *l == lo && *h == hi) {
            Some((name_off, _, _)) => w.string(out, self.btf.name(*name_off)),
            // jsonw_int: printed signed.
            None => w.raw(out, value as i64),
        }
        Ok(())
    }
}

/// `btf_int128_print`.
fn int128_print(w: &mut JsonWriter, out: &mut String, data: [u8; 16], plain: bool) {
    let lower = u64::from_le_bytes(bytes(&data[..8]));
    let upper = u64::from_le_bytes(bytes(&data[8..]));
    let text = if upper == 0 { format!("0x{lower:x}") } else { format!("0x{upper:x}{lower:016x}") };
    if plain { w.raw(out, text) } else { w.raw(out, format_args!("\"{text}\"")) }
}

/// `btf_dumper_bitfield` on a little-endian host, with `btf_int128_shift`'s 64-bit halves
/// and x86's shift-count masking, so even its edge cases (a shift by 64) print the same.
fn bitfield(w: &mut JsonWriter, out: &mut String, nr_bits: u32, bit_offset: u8, data: &[u8], plain: bool) {
    let bits_to_copy = u32::from(bit_offset) + nr_bits;
    let bytes_to_copy = (bits_to_copy.div_ceil(8) as usize).min(16);
    let mut buf = [0u8; 16];
    let n = bytes_to_copy.min(data.len());
    buf[..n].copy_from_slice(&data[..n]);
    // The C passes these as __u16.
    let left = 128u32.wrapping_sub(bits_to_copy) as u16;
    let right = 128u32.wrapping_sub(nr_bits) as u16;
    let mut lower = u64::from_le_bytes(bytes(&buf[..8]));
    let mut upper = u64::from_le_bytes(bytes(&buf[8..]));
    if left >= 64 {
        upper = lower.wrapping_shl(u32::from(left - 64));
        lower = 0;
    } else {
        upper = upper.wrapping_shl(left.into()) | lower.wrapping_shr(u32::from(64 - left));
        lower = lower.wrapping_shl(left.into());
    }
    if right >= 64 {
        lower = upper.wrapping_shr(u32::from(right - 64));
        upper = 0;
    } else {
        lower = lower.wrapping_shr(right.into()) | upper.wrapping_shl(u32::from(64 - right));
        upper = upper.wrapping_shr(right.into());
    }
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&lower.to_le_bytes());
    v[8..].copy_from_slice(&upper.to_le_bytes());
    int128_print(w, out, v, plain);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob from type records (already encoded) and a string table.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let type_len = (types.len() * 4) as u32;
        let mut b = Vec::new();
        b.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, type_len, type_len, strings.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for t in types {
            b.extend_from_slice(&t.to_le_bytes());
        }
        b.extend_from_slice(strings);
        b
    }

    fn info(kind: u32, vlen: u32, kflag: bool) -> u32 {
        (kflag as u32) << 31 | kind << 24 | vlen
    }

    /// meshpath's MP_WORKLOADS types: struct { addr: [u8; 16] } and struct { ifindex: u32,
    /// _reserved: u32 }, as the Rust compiler emits them.
    fn workload_btf() -> Btf {
        let strings = b"\0u8\0__ARRAY_SIZE_TYPE__\0Key\0addr\0u32\0Value\0ifindex\0_reserved\0";
        let off = |s: &str| {
            let needle = format!("\0{s}\0");
            strings.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() as u32 + 1
        };
        let types = [
            // 1: u8
            off("u8"),
            info(KIND_INT, 0, false),
            1,
            8,
            // 2: __ARRAY_SIZE_TYPE__
            off("__ARRAY_SIZE_TYPE__"),
            info(KIND_INT, 0, false),
            4,
            32,
            // 3: [u8; 16]
            0,
            info(KIND_ARRAY, 0, false),
            0,
            1,
            2,
            16,
            // 4: struct Key { addr }
            off("Key"),
            info(KIND_STRUCT, 1, false),
            16,
            off("addr"),
            3,
            0,
            // 5: u32
            off("u32"),
            info(KIND_INT, 0, false),
            4,
            32,
            // 6: struct Value { ifindex, _reserved }
            off("Value"),
            info(KIND_STRUCT, 2, false),
            8,
            off("ifindex"),
            5,
            0,
            off("_reserved"),
            5,
            32,
        ];
        Btf::parse(&blob(&types, strings)).unwrap()
    }

    fn dump(btf: &Btf, id: u32, data: &[u8], plain: bool, pretty: bool) -> String {
        let mut out = String::new();
        let mut w = JsonWriter::new(pretty);
        Dumper { btf, plain }.dump(&mut w, &mut out, id, data).unwrap();
        out
    }

    #[test]
    fn structs_and_byte_arrays_print_as_bpftool_does() {
        let btf = workload_btf();
        let key = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 10, 244, 1, 10];
        assert_eq!(dump(&btf, 4, &key, false, false), r#"{"addr":[0,0,0,0,0,0,0,0,0,0,255,255,10,244,1,10]}"#);
        assert_eq!(dump(&btf, 6, &[3, 0, 0, 0, 0, 0, 0, 0], true, false), r#"{"ifindex":3,"_reserved":0}"#);
        assert_eq!(btf.resolve_size(3), Some(16));
    }

    #[test]
    fn ints_chars_and_bitfields() {
        let strings = b"\0char\0s8\0b\0x\0y\0";
        let types = [
            1,
            info(KIND_INT, 0, false),
            1,
            (INT_CHAR << 24) | 8, // 1: char
            6,
            info(KIND_INT, 0, false),
            1,
            (INT_SIGNED << 24) | 8, // 2: s8
            0,
            info(KIND_INT, 0, false),
            8,
            64, // 3: u64
            9,
            info(KIND_STRUCT, 2, true),
            4,
            11,
            3,
            (3 << 24),
            13,
            3,
            (5 << 24) | 3, // 4: bitfields x:3, y:5
            0,
            info(KIND_ARRAY, 0, false),
            0,
            1,
            3,
            4, // 5: char[4]
            0,
            info(KIND_INT, 0, false),
            16,
            128, // 6: u128
        ];
        let btf = Btf::parse(&blob(&types, strings)).unwrap();
        assert_eq!(dump(&btf, 1, b"A", true, false), "\"A\"");
        assert_eq!(dump(&btf, 1, &[7], true, false), "0x7");
        assert_eq!(dump(&btf, 1, &[7], false, false), "\"\\u0007\"");
        assert_eq!(dump(&btf, 2, &[0xff], false, false), "-1");
        assert_eq!(dump(&btf, 3, &u64::MAX.to_le_bytes(), false, false), "18446744073709551615");
        // x = 0b101 (5), y = 0b10110 (22): byte 0b10110_101.
        assert_eq!(dump(&btf, 4, &[0b1011_0101, 0, 0, 0], true, false), r#"{"x":0x5,"y":0x16}"#);
        assert_eq!(dump(&btf, 5, b"hi\0\0", false, false), "\"hi\"");
        assert_eq!(dump(&btf, 5, &[1, 2, 3, 4], false, false), r#"["\u0001","\u0002","\u0003","\u0004"]"#);
        let mut big = [0u8; 16];
        big[8] = 1;
        assert_eq!(dump(&btf, 6, &big, false, false), "\"0x10000000000000000\"");
        assert_eq!(dump(&btf, 6, &[9; 1], true, false), "0x9");
    }

    #[test]
    fn short_data_and_bad_ids_do_not_panic() {
        let btf = workload_btf();
        assert_eq!(dump(&btf, 6, &[1], false, false), r#"{"ifindex":1,"_reserved":0}"#);
        let mut out = String::new();
        assert!(Dumper { btf: &btf, plain: false }.dump(&mut JsonWriter::new(false), &mut out, 99, &[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1]).is_err());
        assert!(Btf::parse(b"nonsense, not btf at all").is_err());
    }
}
