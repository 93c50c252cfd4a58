//! The `l3` topology's node link: a tun device in each node namespace, the two joined by a
//! relay in the lab's own process. It stands in for IPIP, GRE or WireGuard (devices without
//! an Ethernet header), none of which this kernel has.
//!
//! The devices are not persistent: they exist while the relay holds them, and vanish with
//! it, also when the process is killed. [`TunLink`] must be dropped before the namespaces
//! are deleted, or the kernel would move the devices into the root namespace.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::traffic::in_netns;

/// Two tun devices named `ifname`, one in each namespace, relayed both ways.
pub struct TunLink {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TunLink {
    /// Creates the devices (down, no addresses: the caller configures them) and starts the relay.
    pub fn open(namespaces: [&str; 2], ifname: &str) -> io::Result<Self> {
        let open = |ns: &str| -> io::Result<Arc<SyncDevice>> {
            let name = ifname.to_owned();
            let dev = in_netns(ns, move || DeviceBuilder::new().name(name).build_sync())??;
            dev.set_nonblocking(true)?;
            Ok(Arc::new(dev))
        };
        let (a, b) = (open(namespaces[0])?, open(namespaces[1])?);
        let stop = Arc::new(AtomicBool::new(false));
        let threads =
            [(a.clone(), b.clone()), (b, a)].into_iter().map(|(from, to)| relay(from, to, stop.clone())).collect();
        Ok(Self { stop, threads })
    }
}

/// Copies every packet read from `from` into `to` until `stop` is set (checked every 100 ms).
/// Each wake-up drains what is queued: the device's queue (raised to 10 000 packets by the
/// lab) overflowing would be loss TCP has to recover from.
fn relay(from: Arc<SyncDevice>, to: Arc<SyncDevice>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(_) => return,
            }
            loop {
                match from.recv(&mut buf) {
                    // A full queue on the other side drops the packet, as a real link would.
                    Ok(n) => drop(to.send(&buf[..n])),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        }
    })
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
