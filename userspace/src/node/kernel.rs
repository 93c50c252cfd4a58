//! The reconciler's view of the kernel, behind one seam: the node's interfaces and routes,
//! the capture rule, the classifier attachments and the datapath's maps. [`System`] is the
//! real one (rtnetlink and the loaded [`Datapath`]); the reconciler's unit tests run against
//! an in-memory one, without root or the eBPF toolchain.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use std::os::fd::BorrowedFd;

use meshpath_common::{InterfaceValue, Listener};

use crate::datapath::{Datapath, DatapathError};
use crate::pod_ports::{self, PodPortsError, PodSide};
use crate::routing::{Changes, Interface, Routing, RoutingError};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error("interface {0:?} does not exist in this network namespace")]
    NoSuchInterface(String),
    /// A daemon bug: listeners registered before the kernel held the desired state.
    #[error("listeners may only be registered after a reconcile pass went through")]
    NotReconciled,
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// What the reconciler reads from and writes to the kernel.
pub trait Kernel {
    /// The node's interfaces, as listed now.
    fn interfaces(&mut self) -> impl Future<Output = Result<Vec<Interface>>>;
    /// The interface each IP's route leads to (`None`: no device route).
    fn routes(&mut self, ips: Vec<IpAddr>) -> impl Future<Output = Result<BTreeMap<IpAddr, Option<u32>>>>;
    /// Puts the capture and NAT rules and the capture table's local route in place (idempotent).
    fn install_capture(&mut self) -> impl Future<Output = Result<()>>;
    /// The IPs the NAT table holds a local route for.
    fn nat_routes(&mut self) -> impl Future<Output = Result<BTreeSet<IpAddr>>>;
    /// Adds (`add`) or deletes the NAT table's local routes of `ips` (idempotent).
    fn set_nat_routes(&mut self, ips: &[IpAddr], add: bool) -> impl Future<Output = Result<()>>;
    /// What the kernel announced since the last look.
    fn changes(&mut self) -> Changes;
    /// Resolves when the kernel announces a change (kept for [`Self::changes`]).
    fn changed(&mut self) -> impl Future<Output = ()>;
    /// The pods' own word on their bridge ports, read from their network namespaces.
    /// `host` is the node's interfaces (a namespace none of them leads to is not looked into).
    fn pod_sides(
        &mut self,
        netns_dir: &Path,
        host: &[Interface],
    ) -> impl Future<Output = Result<Vec<PodSide>, PodPortsError>>;

    /// Pins someone deleted, pinned again; the paths restored.
    fn restore_pins(&mut self) -> Result<Vec<PathBuf>>;
    /// Forgets attachments the kernel lost; the interfaces that had lost one.
    fn verify_attachments(&mut self, names: &BTreeMap<u32, String>) -> Vec<u32>;
    /// Attaches the classifier and the egress guard to an interface (no-op when attached).
    fn attach(&mut self, ifindex: u32, name: &str) -> Result<()>;
    /// Forgets attachments of interfaces not in `existing`.
    fn prune(&mut self, existing: &BTreeSet<u32>) -> Result<()>;
    /// Interfaces carrying both programs.
    fn attached(&self) -> BTreeSet<u32>;
    fn interface_values(&self) -> Result<BTreeMap<u32, InterfaceValue>>;
    fn set_interface(&mut self, ifindex: u32, value: InterfaceValue) -> Result<()>;
    fn remove_interface(&mut self, ifindex: u32) -> Result<()>;
    /// The workload map: IP → the interface it is bound to.
    fn workloads(&self) -> Result<BTreeMap<IpAddr, u32>>;
    fn upsert_workload(&mut self, ip: IpAddr, ifindex: u32) -> Result<()>;
    fn remove_workload(&mut self, ip: IpAddr) -> Result<()>;

    /// Puts a listening socket into its SOCKMAP slot: from then on sk_lookup steers there.
    fn register_listener(&mut self, role: Listener, ipv6: bool, socket: BorrowedFd<'_>) -> Result<()>;
    /// The cookie of the socket in each slot (`None`: empty).
    fn listener_cookies(&self) -> Result<Vec<Option<u64>>>;
}

/// The real kernel: rtnetlink in this network namespace and the loaded datapath.
pub struct System {
    pub routing: Routing,
    pub dp: Datapath,
}

impl Kernel for System {
    async fn interfaces(&mut self) -> Result<Vec<Interface>> {
        Ok(self.routing.interfaces().await?)
    }

    async fn routes(&mut self, ips: Vec<IpAddr>) -> Result<BTreeMap<IpAddr, Option<u32>>> {
        Ok(self.routing.interfaces_for(ips).await?)
    }

    async fn install_capture(&mut self) -> Result<()> {
        self.routing.install_capture().await?;
        Ok(())
    }

    async fn nat_routes(&mut self) -> Result<BTreeSet<IpAddr>> {
        Ok(self.routing.nat_routes().await?)
    }

    async fn set_nat_routes(&mut self, ips: &[IpAddr], add: bool) -> Result<()> {
        Ok(self.routing.set_nat_routes(ips, add).await?)
    }

    fn changes(&mut self) -> Changes {
        self.routing.changes()
    }

    async fn changed(&mut self) {
        self.routing.changed().await
    }

    async fn pod_sides(&mut self, netns_dir: &Path, host: &[Interface]) -> Result<Vec<PodSide>, PodPortsError> {
        pod_ports::scan(netns_dir, host).await
    }

    fn restore_pins(&mut self) -> Result<Vec<PathBuf>> {
        Ok(self.dp.restore_pins()?)
    }

    fn verify_attachments(&mut self, names: &BTreeMap<u32, String>) -> Vec<u32> {
        self.dp.verify_attachments(names)
    }

    fn attach(&mut self, ifindex: u32, name: &str) -> Result<()> {
        Ok(self.dp.attach_tc(ifindex, name)?)
    }

    fn prune(&mut self, existing: &BTreeSet<u32>) -> Result<()> {
        Ok(self.dp.prune_tc(existing)?)
    }

    fn attached(&self) -> BTreeSet<u32> {
        self.dp.attached_interfaces()
    }

    fn interface_values(&self) -> Result<BTreeMap<u32, InterfaceValue>> {
        Ok(self.dp.interfaces()?)
    }

    fn set_interface(&mut self, ifindex: u32, value: InterfaceValue) -> Result<()> {
        Ok(self.dp.set_interface(ifindex, value)?)
    }

    fn remove_interface(&mut self, ifindex: u32) -> Result<()> {
        Ok(self.dp.remove_interface(ifindex)?)
    }

    fn workloads(&self) -> Result<BTreeMap<IpAddr, u32>> {
        Ok(self.dp.workloads()?)
    }

    fn upsert_workload(&mut self, ip: IpAddr, ifindex: u32) -> Result<()> {
        Ok(self.dp.upsert_workload(ip, ifindex)?)
    }

    fn remove_workload(&mut self, ip: IpAddr) -> Result<()> {
        Ok(self.dp.remove_workload(ip)?)
    }

    fn register_listener(&mut self, role: Listener, ipv6: bool, socket: BorrowedFd<'_>) -> Result<()> {
        Ok(self.dp.register_listener(role, ipv6, &socket)?)
    }

    fn listener_cookies(&self) -> Result<Vec<Option<u64>>> {
        Ok(self.dp.listener_cookies()?)
    }
}

/// An in-memory kernel for the reconciler's unit tests: interfaces, routes and pods are set
/// by the test; every write is logged, and the rules the datapath relies on are checked as
/// each write happens (a broken rule is recorded, not panicked on, so a test can name it).
#[cfg(test)]
pub mod fake {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::IpAddr;
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::path::{Path, PathBuf};

    use meshpath_common::interface::IF_WORKLOAD;
    use meshpath_common::{InterfaceValue, Listener};

    use super::{Kernel, KernelError, Result};
    use crate::datapath::DatapathError;
    use crate::pod_ports::{PodPortsError, PodSide};
    use crate::routing::{Changes, Interface, Peer};

    /// A write to the kernel.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Op {
        Capture,
        Attach(u32),
        SetInterface(u32, InterfaceValue),
        RemoveInterface(u32),
        Upsert(IpAddr, u32),
        Remove(IpAddr),
        NatRoute(IpAddr, bool),
        Register(Listener, bool),
    }

    #[derive(Default)]
    pub struct Fake {
        pub ifaces: Vec<Interface>,
        /// IP → the interface its route leads to.
        pub routes: BTreeMap<IpAddr, u32>,
        pub sides: Vec<PodSide>,
        pub attached: BTreeSet<u32>,
        /// Classifiers removed behind the daemon's back (also take them out of `attached`).
        pub detached: Vec<u32>,
        pub values: BTreeMap<u32, InterfaceValue>,
        pub map: BTreeMap<IpAddr, u32>,
        /// The NAT table's local routes.
        pub nat_routes: BTreeSet<IpAddr>,
        pub slots: BTreeMap<u32, u64>,
        pub ops: Vec<Op>,
        /// Rules of the datapath broken by a write, in words.
        pub broken: Vec<String>,
        /// Upserts of this IP fail (a full map, a vanished map).
        pub fail_upsert: Option<IpAddr>,
        pub changes: Changes,
    }

    /// A routed veth (no address of the node's).
    pub fn veth(index: u32, name: &str) -> Interface {
        Interface {
            index,
            name: name.into(),
            loopback: false,
            up: true,
            ethernet: true,
            addresses: vec!["fe80::1".parse().expect("an IP")],
            lower: false,
            bridge: false,
            master: None,
            peer: Some(Peer { index: 2, netns: 1 }),
            mac: Some([2, 0, 0, 0, 0, index as u8]),
        }
    }

    /// An interface carrying an address of the node's.
    pub fn uplink(index: u32, name: &str, address: &str) -> Interface {
        Interface { addresses: vec![address.parse().expect("an IP")], peer: None, ..veth(index, name) }
    }

    impl Fake {
        fn check_upsert(&mut self, ip: IpAddr, ifindex: u32) {
            if ifindex != 0 && !self.attached.contains(&ifindex) {
                self.broken.push(format!("{ip} enrolled behind {ifindex}, which has no classifier"));
            }
        }

        fn check_set(&mut self, ifindex: u32, value: InterfaceValue) {
            let was = self.values.get(&ifindex).map_or(0, |v| v.flags & IF_WORKLOAD);
            let wanted: Vec<IpAddr> = self.map.iter().filter(|(_, i)| **i == ifindex).map(|(ip, _)| *ip).collect();
            if value.flags & IF_WORKLOAD != 0 && was == 0 && wanted.is_empty() {
                self.broken.push(format!("{ifindex} flagged as a workload's before any of its IPs is in the map"));
            }
        }

        fn check_remove(&mut self, ip: IpAddr) {
            if self.nat_routes.contains(&ip) {
                self.broken.push(format!("{ip} removed from the map while the NAT table still routes it locally"));
            }
            if let Some(ifindex) = self.map.get(&ip)
                && self.values.get(ifindex).is_some_and(|v| v.flags & IF_WORKLOAD != 0)
                && self.map.iter().filter(|(_, i)| *i == ifindex).count() == 1
            {
                self.broken.push(format!("{ip}, the last IP of {ifindex}, removed while {ifindex} is still flagged"));
            }
        }
    }

    impl Kernel for Fake {
        async fn interfaces(&mut self) -> Result<Vec<Interface>> {
            Ok(self.ifaces.clone())
        }

        async fn routes(&mut self, ips: Vec<IpAddr>) -> Result<BTreeMap<IpAddr, Option<u32>>> {
            Ok(ips.into_iter().map(|ip| (ip, self.routes.get(&ip).copied())).collect())
        }

        async fn install_capture(&mut self) -> Result<()> {
            self.ops.push(Op::Capture);
            Ok(())
        }

        async fn nat_routes(&mut self) -> Result<BTreeSet<IpAddr>> {
            Ok(self.nat_routes.clone())
        }

        async fn set_nat_routes(&mut self, ips: &[IpAddr], add: bool) -> Result<()> {
            for ip in ips {
                if add && self.map.get(ip).is_none_or(|ifx| *ifx == 0) {
                    self.broken.push(format!("NAT route to {ip}, which is not enrolled behind an interface"));
                }
                self.ops.push(Op::NatRoute(*ip, add));
                if add {
                    self.nat_routes.insert(*ip);
                } else {
                    self.nat_routes.remove(ip);
                }
            }
            Ok(())
        }

        fn changes(&mut self) -> Changes {
            std::mem::take(&mut self.changes)
        }

        async fn changed(&mut self) {
            std::future::pending().await
        }

        async fn pod_sides(&mut self, _: &Path, _: &[Interface]) -> std::result::Result<Vec<PodSide>, PodPortsError> {
            Ok(self.sides.clone())
        }

        fn restore_pins(&mut self) -> Result<Vec<PathBuf>> {
            Ok(Vec::new())
        }

        fn verify_attachments(&mut self, _: &BTreeMap<u32, String>) -> Vec<u32> {
            std::mem::take(&mut self.detached)
        }

        fn attach(&mut self, ifindex: u32, _: &str) -> Result<()> {
            if self.attached.insert(ifindex) {
                self.ops.push(Op::Attach(ifindex));
            }
            Ok(())
        }

        fn prune(&mut self, existing: &BTreeSet<u32>) -> Result<()> {
            self.attached.retain(|i| existing.contains(i));
            Ok(())
        }

        fn attached(&self) -> BTreeSet<u32> {
            self.attached.clone()
        }

        fn interface_values(&self) -> Result<BTreeMap<u32, InterfaceValue>> {
            Ok(self.values.clone())
        }

        fn set_interface(&mut self, ifindex: u32, value: InterfaceValue) -> Result<()> {
            self.check_set(ifindex, value);
            self.ops.push(Op::SetInterface(ifindex, value));
            self.values.insert(ifindex, value);
            Ok(())
        }

        fn remove_interface(&mut self, ifindex: u32) -> Result<()> {
            self.ops.push(Op::RemoveInterface(ifindex));
            self.values.remove(&ifindex);
            Ok(())
        }

        fn workloads(&self) -> Result<BTreeMap<IpAddr, u32>> {
            Ok(self.map.clone())
        }

        fn upsert_workload(&mut self, ip: IpAddr, ifindex: u32) -> Result<()> {
            if self.fail_upsert == Some(ip) {
                let source = std::io::Error::from_raw_os_error(libc::E2BIG);
                return Err(KernelError::Datapath(DatapathError::Io { path: "MP_WORKLOADS".into(), source }));
            }
            self.check_upsert(ip, ifindex);
            self.ops.push(Op::Upsert(ip, ifindex));
            self.map.insert(ip, ifindex);
            Ok(())
        }

        fn remove_workload(&mut self, ip: IpAddr) -> Result<()> {
            self.check_remove(ip);
            self.ops.push(Op::Remove(ip));
            self.map.remove(&ip);
            Ok(())
        }

        fn register_listener(&mut self, role: Listener, ipv6: bool, socket: BorrowedFd<'_>) -> Result<()> {
            self.ops.push(Op::Register(role, ipv6));
            self.slots.insert(role.slot(ipv6), socket.as_raw_fd() as u64);
            Ok(())
        }

        fn listener_cookies(&self) -> Result<Vec<Option<u64>>> {
            Ok((0..Listener::SLOTS).map(|s| self.slots.get(&s).copied()).collect())
        }
    }
}
