//! A packet capture on one interface of a lab namespace (an AF_PACKET socket, no tcpdump
//! needed) and the TLS evidence read from it: every TCP byte on the underlay must be part
//! of a well-formed TLS record on an HBONE connection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use nix::sys::socket::{self, AddressFamily, LinkAddr, SockFlag, SockProtocol, SockType, sockopt};

use meshpath_common::names::PORT_HBONE;

/// One captured TCP segment.
#[derive(Clone, Debug)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub syn: bool,
    pub ack: bool,
    pub payload: Vec<u8>,
}

/// A running capture; [`Capture::stop`] returns what it saw.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<Vec<Segment>>>>,
}

impl Capture {
    /// Captures TCP on `ifname` inside network namespace `ns` (both directions).
    pub fn start(ns: &str, ifname: &str) -> std::io::Result<Self> {
        let ns = ns.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ifname = ifname.to_owned();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let opened = (|| -> std::io::Result<_> {
                meshpath::netns::enter(&ns)?;
                let ifindex = nix::net::if_::if_nametoindex(ifname.as_str()).map_err(std::io::Error::from)? as usize;
                let fd =
                    socket::socket(AddressFamily::Packet, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::EthAll)
                        .map_err(std::io::Error::from)?;
                // Room for bursts of 64 KiB GSO segments: a full buffer drops packets, and
                // dropped bytes are bytes not checked.
                socket::setsockopt(&fd, sockopt::RcvBufForce, &(16 << 20)).map_err(std::io::Error::from)?;
                // A short timeout lets the loop notice `stop`.
                socket::setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(0, 100_000))
                    .map_err(std::io::Error::from)?;
                Ok((fd, ifindex))
            })();
            let (fd, ifindex) = match opened {
                Ok(v) => {
                    let _ = ready_tx.send(Ok(()));
                    v
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Err(e);
                }
            };
            let mut segments = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                match socket::recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf) {
                    Ok((n, Some(addr))) if addr.ifindex() == ifindex => {
                        // A device without a link-layer header (tun) hands over bare IP packets.
                        let l3 = addr.hatype() == ARPHRD_NONE;
                        segments.extend(parse(&buf[..n], l3))
                    }
                    Ok(_) => {}
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(segments)
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Self { stop, thread: Some(thread) }),
            Ok(Err(e)) => Err(std::io::Error::other(format!("starting the capture: {e}"))),
            Err(_) => Err(std::io::Error::other("the capture thread did not start")),
        }
    }

    pub fn stop(mut self) -> std::io::Result<Vec<Segment>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Err(std::io::Error::other("the capture thread panicked")),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// ARPHRD_NONE: the hardware type of a tun device.
const ARPHRD_NONE: u16 = 0xfffe;

fn parse(frame: &[u8], l3: bool) -> Option<Segment> {
    let p = if l3 { SlicedPacket::from_ip(frame) } else { SlicedPacket::from_ethernet(frame) }.ok()?;
    let (src, dst) = match p.net? {
        NetSlice::Ipv4(ip) => (IpAddr::V4(ip.header().source_addr()), IpAddr::V4(ip.header().destination_addr())),
        NetSlice::Ipv6(ip) => (IpAddr::V6(ip.header().source_addr()), IpAddr::V6(ip.header().destination_addr())),
        NetSlice::Arp(_) => return None,
    };
    let TransportSlice::Tcp(tcp) = p.transport? else { return None };
    Some(Segment {
        src: SocketAddr::new(src, tcp.source_port()),
        dst: SocketAddr::new(dst, tcp.destination_port()),
        seq: tcp.sequence_number(),
        syn: tcp.syn(),
        ack: tcp.ack(),
        payload: tcp.payload().to_vec(),
    })
}

/// What a capture shows about the traffic's protection.
#[derive(Clone, Debug, Default)]
pub struct TlsEvidence {
    /// TCP segments carrying payload.
    pub data_segments: usize,
    pub payload_bytes: usize,
    /// Connections opened to the HBONE port (SYNs without ACK).
    pub hbone_connects: usize,
    /// Distinct HBONE connections that carried data.
    pub hbone_flows: usize,
    /// Complete TLS records found, by content type (22 handshake, 23 application data, ...).
    pub tls_records: BTreeMap<u8, usize>,
    /// Everything that is not TLS on an HBONE connection: payload on other ports, bytes
    /// that do not parse as TLS records, or the marker in the clear.
    pub violations: Vec<String>,
}

impl TlsEvidence {
    pub fn tls_only(&self) -> bool {
        self.violations.is_empty() && self.data_segments > 0
    }

    /// One line for the smoke output.
    pub fn summary(&self) -> String {
        let records: usize = self.tls_records.values().sum();
        format!(
            "{} data segments, {} payload bytes, {} TLS records ({} handshake, {} application data), {} HBONE connection(s) opened, {} carrying data; {}",
            self.data_segments,
            self.payload_bytes,
            records,
            self.tls_records.get(&22).unwrap_or(&0),
            self.tls_records.get(&23).unwrap_or(&0),
            self.hbone_connects,
            self.hbone_flows,
            if self.violations.is_empty() { "no plaintext".to_string() } else { self.violations.join("; ") }
        )
    }
}

/// Checks every payload byte: only on HBONE connections, only whole TLS records, and
/// `marker` (a string the test sent in its payload) nowhere.
pub fn tls_evidence(segments: &[Segment], marker: &[u8]) -> TlsEvidence {
    let mut ev = TlsEvidence::default();
    // Each direction of each connection, its payload keyed by sequence number
    // (retransmissions collapse).
    let mut streams: BTreeMap<(SocketAddr, SocketAddr), BTreeMap<u32, Vec<u8>>> = BTreeMap::new();
    let mut flows = BTreeSet::new();
    for s in segments {
        if s.syn && !s.ack && s.dst.port() == PORT_HBONE {
            ev.hbone_connects += 1;
        }
        if s.payload.is_empty() {
            continue;
        }
        ev.data_segments += 1;
        ev.payload_bytes += s.payload.len();
        if !marker.is_empty() && s.payload.windows(marker.len()).any(|w| w == marker) {
            ev.violations.push(format!("plaintext marker seen in {} -> {}", s.src, s.dst));
        }
        if s.src.port() != PORT_HBONE && s.dst.port() != PORT_HBONE {
            ev.violations.push(format!("payload outside HBONE: {} -> {} ({} bytes)", s.src, s.dst, s.payload.len()));
            continue;
        }
        let client = if s.dst.port() == PORT_HBONE { s.src } else { s.dst };
        flows.insert(client);
        streams.entry((s.src, s.dst)).or_default().entry(s.seq).or_insert_with(|| s.payload.clone());
    }
    ev.hbone_flows = flows.len();
    for ((src, dst), by_seq) in streams {
        let bytes = contiguous(&by_seq);
        // Bytes from the first sequence number to the end of the furthest segment.
        let first = by_seq.keys().next().copied().unwrap_or(0);
        let captured = by_seq.iter().map(|(seq, d)| seq.wrapping_sub(first) as usize + d.len()).max().unwrap_or(0);
        if captured > bytes.len() {
            // A hole (a segment the capture missed) leaves bytes after it unchecked.
            ev.violations.push(format!(
                "{src} -> {dst}: {} captured bytes after a gap could not be checked",
                captured - bytes.len()
            ));
        }
        if let Err(e) = walk_records(&bytes, &mut ev.tls_records) {
            ev.violations.push(format!("{src} -> {dst}: {e}"));
        }
    }
    ev
}

/// The in-order bytes of one direction, up to the first gap.
fn contiguous(by_seq: &BTreeMap<u32, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(first) = by_seq.keys().next().copied() else { return out };
    let mut next = first;
    for (&seq, data) in by_seq {
        let offset = seq.wrapping_sub(next) as usize;
        if seq == next {
            out.extend_from_slice(data);
            next = next.wrapping_add(data.len() as u32);
        } else if offset > u32::MAX as usize / 2 {
            // Overlaps what we have (a partial retransmission): take only the new tail.
            let overlap = next.wrapping_sub(seq) as usize;
            if overlap < data.len() {
                out.extend_from_slice(&data[overlap..]);
                next = next.wrapping_add((data.len() - overlap) as u32);
            }
        } else {
            break;
        }
    }
    out
}

/// Walks TLS records: content type 20–23, legacy version 3.1–3.3, length within the limit.
/// A record cut off by the end of the capture is fine; anything else is not TLS.
fn walk_records(mut bytes: &[u8], counts: &mut BTreeMap<u8, usize>) -> Result<(), String> {
    const MAX_RECORD: usize = 16384 + 256;
    let mut offset = 0;
    while bytes.len() >= 5 {
        let (ty, major, minor) = (bytes[0], bytes[1], bytes[2]);
        let len = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
        if !(20..=23).contains(&ty) || major != 3 || !(1..=3).contains(&minor) || len > MAX_RECORD {
            return Err(format!("not a TLS record at byte {offset} (starts {:02x?})", &bytes[..5]));
        }
        if bytes.len() < 5 + len {
            return Ok(());
        }
        *counts.entry(ty).or_default() += 1;
        bytes = &bytes[5 + len..];
        offset += 5 + len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(src: &str, dst: &str, seq: u32, payload: &[u8]) -> Segment {
        Segment {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            seq,
            syn: false,
            ack: true,
            payload: payload.to_vec(),
        }
    }

    fn record(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![ty, 3, 3];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn tls_records_across_segments_and_retransmissions_pass() {
        let stream = [record(22, &[1; 40]), record(23, &[2; 300]), record(23, &[3; 10])].concat();
        let (a, b) = stream.split_at(123);
        let segs = [
            seg("10.0.0.1:40000", "10.0.0.2:15008", 1000, a),
            seg("10.0.0.1:40000", "10.0.0.2:15008", 1000, a), // retransmitted
            seg("10.0.0.1:40000", "10.0.0.2:15008", 1123, b),
        ];
        let ev = tls_evidence(&segs, b"SECRET");
        assert!(ev.tls_only(), "{:?}", ev.violations);
        assert_eq!(ev.tls_records.get(&23), Some(&2));
        assert_eq!(ev.hbone_flows, 1);
    }

    #[test]
    fn a_gap_in_the_capture_is_reported_not_ignored() {
        let r = record(23, &[1; 100]);
        let segs = [
            seg("10.0.0.1:40000", "10.0.0.2:15008", 1, &r[..50]),
            seg("10.0.0.1:40000", "10.0.0.2:15008", 80, &r[79..]),
        ];
        let ev = tls_evidence(&segs, b"SECRET");
        assert!(!ev.tls_only() && ev.violations[0].contains("could not be checked"), "{:?}", ev.violations);
    }

    #[test]
    fn plaintext_anywhere_is_a_violation() {
        let plain = seg("10.0.0.1:40000", "10.0.0.2:8080", 1, b"hello SECRET");
        let ev = tls_evidence(&[plain], b"SECRET");
        assert_eq!(ev.violations.len(), 2, "{:?}", ev.violations);
        let on_hbone = seg("10.0.0.1:40000", "10.0.0.2:15008", 1, b"GET / HTTP/1.1\r\n");
        let ev = tls_evidence(&[on_hbone], b"SECRET");
        assert!(ev.violations[0].contains("not a TLS record"), "{:?}", ev.violations);
        assert!(!tls_evidence(&[], b"x").tls_only(), "an empty capture proves nothing");
    }
}
