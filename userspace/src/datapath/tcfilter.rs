//! The cls_bpf filters on an interface, read back from the kernel over rtnetlink.
//!
//! aya has no query for netlink filters: `SchedClassifierLink::attached` only builds a handle
//! from what the caller says, and dropping that handle *detaches* the filter. So whether our
//! filter is still there is asked here, with a plain filter dump.

use std::io;

use rtnetlink::packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// One cls_bpf filter: its priority and the name of the program it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfFilter {
    pub priority: u16,
    pub program: String,
}

/// The cls_bpf filters of `ifindex`'s clsact ingress or egress hook.
pub fn bpf_filters(ifindex: u32, egress: bool) -> io::Result<Vec<BpfFilter>> {
    let socket = dump_request(ifindex, egress)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let bytes = &buf[offset..n];
            let len = bytes.get(..4).map_or(0, |l| u32::from_ne_bytes([l[0], l[1], l[2], l[3]]) as usize);
            // A message this crate cannot decode (attributes of a newer kernel, another
            // filter kind) is skipped, not fatal: failing the whole dump would read as
            // "detached" and re-attach every tick.
            let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) else {
                if len == 0 {
                    break;
                }
                offset += aligned(len);
                continue;
            };
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        // No clsact qdisc (or no interface): no filters.
                        Some(c) if matches!(-c.get(), libc::EINVAL | libc::ENOENT | libc::ENODEV) => Ok(Vec::new()),
                        Some(c) => Err(io::Error::from_raw_os_error(-c.get())),
                        None => Ok(out),
                    };
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) => out.extend(bpf_filter(&m)),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += aligned(len);
        }
    }
}

/// Netlink messages start on 4-byte boundaries.
fn aligned(len: usize) -> usize {
    (len + 3) & !3
}

fn dump_request(ifindex: u32, egress: bool) -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut tc = TcMessage::default();
    tc.header.index =
        i32::try_from(ifindex).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
    tc.header.parent =
        TcHandle { major: 0xffff, minor: if egress { TcHandle::MIN_EGRESS } else { TcHandle::MIN_INGRESS } };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetTrafficFilter(tc)));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(socket)
}

/// The filter `m` describes, if it is a cls_bpf filter with a program (the dump also has a
/// line per priority without one).
fn bpf_filter(m: &TcMessage) -> Option<BpfFilter> {
    let bpf = m.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"));
    let program = m.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => Some(n.clone()),
            _ => None,
        }),
        _ => None,
    })?;
    // tcm_info: priority in the upper 16 bits, protocol in the lower.
    bpf.then_some(BpfFilter { priority: (m.header.info >> 16) as u16, program })
}
