//! Raw frames from a pod, as a hostile pod with CAP_NET_RAW (a default container
//! capability) writes them: forged addresses under VLAN tags that the node's stack strips on
//! its own. This kernel has no 802.1Q module and no tc vlan action, so the frame is built
//! here and written to an AF_PACKET socket by Python's `socket` module (safe code, and
//! `python3` is on every machine the lab runs on).

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};

use etherparse::PacketBuilder;

/// 802.1Q and 802.1ad tag protocol identifiers.
pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

/// The MAC address of `ifname` in network namespace `ns`.
pub fn mac_of(ns: &str, ifname: &str) -> io::Result<[u8; 6]> {
    let out = Command::new("ip").args(["-n", ns, "-j", "link", "show", ifname]).output()?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let text = v[0]["address"].as_str().unwrap_or_default();
    let bytes: Vec<u8> = text.split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
    bytes.try_into().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("no MAC for {ifname}: {text:?}")))
}

/// An Ethernet frame carrying a TCP SYN from `src` to `dst` under VLAN tags with these
/// TPIDs, outermost first, each with VID 0 (a priority tag the stack treats as untagged).
pub fn tagged_syn(src_mac: [u8; 6], dst_mac: [u8; 6], tpids: &[u16], src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let builder = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => panic!("a packet has one address family"),
    };
    let mut ip = Vec::new();
    builder.tcp(src.port(), dst.port(), 0x1234_5678, 64240).syn().write(&mut ip, &[]).expect("writing to a Vec");
    let mut frame = Vec::with_capacity(14 + 4 * tpids.len() + ip.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    for t in tpids {
        frame.extend_from_slice(&t.to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
    }
    let ethertype: u16 = if src.is_ipv4() { 0x0800 } else { 0x86dd };
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame
}

/// Writes `frame` as it is to `ifname` inside network namespace `ns`.
pub fn send_frame(ns: &str, ifname: &str, frame: &[u8]) -> io::Result<()> {
    const SEND: &str = "import socket,sys\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n\
                        s.bind((sys.argv[1],0))\ns.send(sys.stdin.buffer.read())\n";
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", SEND, ifname])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or_else(|| io::Error::other("no stdin"))?.write_all(frame)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("sending a raw frame: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

/// An Ethernet frame carrying an ARP reply: `ip` is at `mac`, told to `to_mac`/`to_ip`. What
/// a pod forging its neighbour's address sends.
pub fn arp_reply(mac: [u8; 6], ip: std::net::Ipv4Addr, to_mac: [u8; 6], to_ip: std::net::Ipv4Addr) -> Vec<u8> {
    const ETH_P_ARP: u16 = 0x0806;
    const ARPHRD_ETHER: u16 = 1;
    const ARPOP_REPLY: u16 = 2;
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&to_mac);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    frame.extend_from_slice(&ARPHRD_ETHER.to_be_bytes());
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&[6, 4]);
    frame.extend_from_slice(&ARPOP_REPLY.to_be_bytes());
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&to_mac);
    frame.extend_from_slice(&to_ip.octets());
    frame
}
