//! Makes the kernel match the desired state: the capture rule and routes, the classifier on
//! every interface it should be on with that interface's flags, and the workload map.
//!
//! A pass runs when something changed (the desired state, or the kernel announced a link,
//! address, route or rule change) and on a slow safety tick. Each pass: attach (and prune)
//! first, then resolve each local workload IP to the interface the kernel routes it to (for
//! a pod bridge, the port its pod's namespace names: [`crate::pod_ports`]), then write the
//! difference into the maps. The classifier goes first so an IP is never in the map while
//! its interface lacks the program.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshpath_common::interface::IF_WORKLOAD;
use meshpath_common::{InterfaceValue, Listener};

use super::kernel::{Kernel, KernelError};
use super::routes::RouteCache;
use crate::pod_ports::{Claim, PortClaims};
use crate::routing::{Changes, Interface};
use crate::topology::{Role, Topology};
use crate::workloads::WorkloadFile;

/// How long the map's contents are trusted before they are read again (meshpath is their only
/// writer; this catches anyone else's edits).
const FULL_PASS: Duration = Duration::from_secs(60);
/// What the kernel announces (interfaces, the capture rule and routes, the NAT table, pod
/// routes) is also looked at again on a safety tick this long after the last such look, in
/// case a notification went missing unannounced; the safety ticks between check only what
/// it cannot announce (pins, the classifiers), without a netlink round trip.
const DEEP_CHECK: Duration = Duration::from_secs(60);
/// Unresolved IPs with one problem are listed one per line up to this many; beyond, one
/// summary line says how many and names a few.
const LISTED_PROBLEMS: usize = 3;

/// Where a local workload IP should be in the map: its interface (0: held behind none), and
/// its workload (for logs).
type DesiredMap = BTreeMap<IpAddr, (u32, String)>;

/// Where a workload IP goes.
enum Place {
    /// Enrolled behind this interface.
    On(u32),
    /// Enrolled behind no interface, so that its traffic is dropped as spoofed wherever it
    /// comes from, for this reason: its own port cannot be told.
    Held(String),
    /// Not enrolled, for this reason.
    Unresolved(String),
}

/// What the reconciler is told to keep in the kernel.
#[derive(Clone, Debug, Default)]
pub(super) struct Desired {
    /// Workloads of every node (only this node's are enrolled).
    pub file: WorkloadFile,
    /// IPs whose release is held back ([`super::releases`]): kept where they are enrolled
    /// now, and let go at once when that place is gone.
    pub held: BTreeSet<IpAddr>,
    /// The host-side interfaces the CNI plugin reported for an IP's pod ([`super::cni`]):
    /// the port of a pod bridge it names is taken without reading the pods' namespaces.
    pub ports: BTreeMap<IpAddr, Vec<String>>,
}

/// Which part of the node the reconciler looks after.
#[derive(Clone, Debug)]
pub(super) struct Scope {
    pub node: String,
    /// Interfaces named on the command line; empty means every non-loopback one.
    pub interfaces: Vec<String>,
    pub pod_cidrs: Vec<IpNet>,
    /// Where pods' network namespaces are pinned ([`crate::pod_ports`]).
    pub netns_dir: PathBuf,
}

/// What a pass was started by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Trigger {
    /// The desired state or the kernel changed.
    Change,
    /// The safety tick: what the kernel cannot announce is looked at again, and every
    /// [`DEEP_CHECK`] everything, whatever was announced.
    Safety,
}

pub(super) struct Reconciler<K> {
    scope: Scope,
    kernel: K,
    desired: Desired,
    routes: RouteCache,
    /// The interfaces as last listed; listed again when the kernel says they changed.
    ifaces: Option<Vec<Interface>>,
    /// Workload IPs that could not be enrolled, with the reason last logged.
    unresolved: BTreeMap<IpAddr, String>,
    /// What the workload map holds: meshpath is its only writer, so this is read from the
    /// kernel only on full passes.
    map: Option<BTreeMap<IpAddr, u32>>,
    /// The IPs the NAT table routes locally; listed again when the kernel announces a
    /// change of meshpath's tables.
    nat: Option<BTreeSet<IpAddr>>,
    last_full: Instant,
    /// When everything was last looked at whatever the kernel announced.
    last_deep: Instant,
    /// The desired state changed since the last pass over the workloads.
    dirty: bool,
    /// Interfaces carrying the classifier at the last pass.
    last_attached: BTreeSet<u32>,
    /// Notifications taken by a pass that failed, for the next one.
    carried: Changes,
    /// Held IPs the last pass let go, and why (for [`super::releases`]).
    released: Vec<(IpAddr, String)>,
    /// Passes that went through: until one has, no listener may be registered.
    passes: u64,
    /// Whether the last pass failed.
    failed: bool,
}

impl<K: Kernel> Reconciler<K> {
    pub(super) fn new(scope: Scope, kernel: K) -> Self {
        Self {
            scope,
            kernel,
            desired: Desired::default(),
            routes: RouteCache::default(),
            ifaces: None,
            unresolved: BTreeMap::new(),
            map: None,
            nat: None,
            last_full: Instant::now(),
            last_deep: Instant::now(),
            dirty: true,
            last_attached: BTreeSet::new(),
            carried: Changes::default(),
            released: Vec::new(),
            passes: 0,
            failed: false,
        }
    }

    pub(super) fn kernel(&mut self) -> &mut K {
        &mut self.kernel
    }

    pub(super) fn set_desired(&mut self, desired: Desired) {
        self.desired = desired;
        self.dirty = true;
    }

    /// Held IPs the last pass let go because their pod is gone (or moved), with why.
    pub(super) fn take_released(&mut self) -> Vec<(IpAddr, String)> {
        std::mem::take(&mut self.released)
    }

    /// The IPs in the workload map behind an interface (not those held behind none), as of
    /// the last pass.
    pub(super) fn enrolled(&self) -> BTreeSet<IpAddr> {
        self.map.iter().flatten().filter(|(_, ifx)| **ifx != 0).map(|(ip, _)| *ip).collect()
    }

    /// The workload map as of the last pass: each IP and the interface it is behind (0:
    /// held behind none).
    pub(super) fn mapped(&self) -> BTreeMap<IpAddr, u32> {
        self.map.clone().unwrap_or_default()
    }

    /// Whether a pass has gone through: the kernel holds the desired state, so listeners may
    /// be registered (before that, a connection could reach the proxy for a pod whose
    /// interface has no classifier yet, or a pod of a previous run's map).
    pub(super) fn has_reconciled(&self) -> bool {
        self.passes > 0
    }

    /// Registers the proxy's listeners; refused until a pass has gone through. The cookies
    /// of the slots afterwards, to tell this daemon's sockets from a successor's.
    pub(super) fn register(
        &mut self,
        listeners: &[(Listener, bool, BorrowedFd<'_>)],
    ) -> Result<Vec<Option<u64>>, KernelError> {
        if !self.has_reconciled() {
            return Err(KernelError::NotReconciled);
        }
        for (role, ipv6, fd) in listeners {
            self.kernel.register_listener(*role, *ipv6, *fd)?;
        }
        self.kernel.listener_cookies()
    }

    /// Resolves when the kernel announces a change (kept for the next pass).
    pub(super) async fn kernel_changed(&mut self) {
        self.kernel.changed().await
    }

    /// One pass. Nothing is redone when nothing changed: the same workloads over the same
    /// interfaces with the same classifiers, all resolved, recently checked.
    pub(super) async fn reconcile(&mut self, trigger: Trigger) -> Result<(), KernelError> {
        // What a failed pass had taken from the kernel's notifications is not lost with it.
        let mut changes = std::mem::take(&mut self.carried);
        changes.merge(self.kernel.changes());
        let result = self.pass(trigger, &changes).await;
        self.failed = result.is_err();
        match &result {
            Ok(()) => self.passes += 1,
            Err(_) => self.carried = changes,
        }
        result
    }

    async fn pass(&mut self, trigger: Trigger, changes: &Changes) -> Result<(), KernelError> {
        let check = trigger == Trigger::Safety || changes.lost;
        // After a failed pass, the next tick looks at everything.
        let deep = changes.lost || (check && (self.failed || self.last_deep.elapsed() >= DEEP_CHECK));
        if deep {
            self.last_deep = Instant::now();
        }
        let mut repaired = false;
        if check {
            for path in self.kernel.restore_pins()? {
                tracing::warn!(path = %path.display(), "a pin of this node was deleted behind the daemon; pinned it again");
                repaired = true;
            }
        }
        if deep || changes.interfaces || self.ifaces.is_none() {
            self.ifaces = Some(self.kernel.interfaces().await?);
            // An address may have moved to the node, or off it.
            self.dirty = true;
        }
        let ifaces = self.ifaces.clone().unwrap_or_default();
        if check {
            // What changes inside a pod's namespace behind a bridge is announced to nobody
            // here: those namespaces are read again on every tick.
            if ifaces.iter().any(|i| self.is_pod_bridge(i, &ifaces)) {
                self.dirty = true;
            }
            let names = ifaces.iter().map(|i| (i.index, i.name.clone())).collect();
            for ifindex in self.kernel.verify_attachments(&names) {
                tracing::warn!(
                    ifindex,
                    interface = names.get(&ifindex).map(String::as_str).unwrap_or("?"),
                    "a classifier of meshpath was removed behind its back; attaching it again"
                );
                repaired = true;
            }
        }
        // A tick that found everything in place, with nothing announced, pending or due,
        // ends here: an idle node's tick is a few system calls.
        let quiet = !deep && !repaired && !changes.any() && !self.dirty && self.unresolved.is_empty();
        if trigger == Trigger::Safety && quiet && self.map.is_some() && self.last_full.elapsed() < FULL_PASS {
            return Ok(());
        }
        let attached = self.attach(&ifaces, deep || changes.capture).await?;
        let relisted = self.routes.track(&mut self.kernel, &ifaces, changes, deep, DEEP_CHECK).await?;
        self.dirty |= relisted.forgot;
        if deep || changes.capture || self.nat.is_none() {
            self.list_nat_routes().await?;
        }
        let full = relisted.relisted || self.map.is_none() || self.last_full.elapsed() >= FULL_PASS;
        if full || self.dirty || attached != self.last_attached || !self.unresolved.is_empty() {
            if full {
                self.last_full = Instant::now();
                self.map = Some(self.kernel.workloads()?);
            }
            let desired = self.resolve(&ifaces, &attached).await?;
            // An IP's NAT route goes before it leaves the map and comes after it entered: a
            // local route to an IP the map lacks would hand what is DNATed to it to whatever
            // listens on the node's wildcard address, not to the proxy.
            let keep = desired.iter().filter(|(_, (ifx, _))| *ifx != 0).map(|(ip, _)| *ip).collect();
            self.route_nat(&keep, false).await?;
            self.apply(&desired, &ifaces)?;
            // Only a pass that went through clears the flags: a failed one is retried next time.
            self.dirty = false;
            self.last_attached = attached;
        }
        let enrolled = self.enrolled();
        self.route_nat(&enrolled, true).await
    }

    /// Reads which IPs the NAT table routes locally.
    async fn list_nat_routes(&mut self) -> Result<(), KernelError> {
        let listed = self.kernel.nat_routes().await?;
        if self.nat.as_ref().is_some_and(|known| *known != listed) {
            tracing::warn!("routes of the NAT table were changed behind meshpath's back; restoring them");
        }
        self.nat = Some(listed);
        Ok(())
    }

    /// Deletes the NAT table's routes to IPs outside `keep` and, with `add`, adds those of
    /// `keep` it lacks: what a NAT on this node turns toward an enrolled IP then reaches the
    /// proxy. After a failed write the table is listed again next pass.
    async fn route_nat(&mut self, keep: &BTreeSet<IpAddr>, add: bool) -> Result<(), KernelError> {
        let mut have = self.nat.take().unwrap_or_default();
        let stale: Vec<IpAddr> = have.difference(keep).copied().collect();
        let missing: Vec<IpAddr> = if add { keep.difference(&have).copied().collect() } else { Vec::new() };
        if !stale.is_empty() {
            self.kernel.set_nat_routes(&stale, false).await?;
            have.retain(|ip| keep.contains(ip));
        }
        if !missing.is_empty() {
            self.kernel.set_nat_routes(&missing, true).await?;
            have.extend(missing);
        }
        self.nat = Some(have);
        Ok(())
    }

    /// Restores the capture rule and routes (when they may have changed), attaches the
    /// classifier where it should be, with each interface's flags written first, and prunes
    /// what vanished; the interfaces that carry it.
    async fn attach(&mut self, ifaces: &[Interface], check_capture: bool) -> Result<BTreeSet<u32>, KernelError> {
        let wanted: Vec<&Interface> = if self.scope.interfaces.is_empty() {
            ifaces.iter().filter(|i| !i.loopback).collect()
        } else {
            let named = |name: &String| ifaces.iter().find(|i| &i.name == name);
            self.scope
                .interfaces
                .iter()
                .map(|n| named(n).ok_or_else(|| KernelError::NoSuchInterface(n.clone())))
                .collect::<Result<_, _>>()?
        };
        // Someone may have flushed our rule or routes: put them back (idempotent).
        if check_capture {
            self.kernel.install_capture().await?;
        }
        let values = self.kernel.interface_values()?;
        let cidrs = &self.scope.pod_cidrs;
        let classified = |i: &&Interface| Topology::of(i, ifaces, cidrs).classified();
        for (i, topology) in wanted.into_iter().map(|i| (i, Topology::of(i, ifaces, cidrs))) {
            if !topology.classified() {
                continue;
            }
            // The workload bit is the map pass's to set; the rest is the interface's kind.
            let mut want = topology.value();
            want.flags |= values.get(&i.index).map_or(0, |v| v.flags & IF_WORKLOAD);
            if values.get(&i.index) != Some(&want) {
                self.kernel.set_interface(i.index, want)?;
            }
            // An interface can vanish between listing and attaching (pod churn): skip it,
            // the next pass sees the new state.
            if let Err(e) = self.kernel.attach(i.index, &i.name) {
                tracing::warn!(interface = %i.name, "attaching the classifier failed (will retry): {e}");
            }
        }
        // What vanished, and a pod bridge that carries the classifier (an interface that
        // became one), lose it.
        let existing: BTreeSet<u32> = ifaces.iter().filter(classified).map(|i| i.index).collect();
        self.kernel.prune(&existing)?;
        let attached = self.kernel.attached();
        for ifindex in values.keys().filter(|i| !attached.contains(i)) {
            self.kernel.remove_interface(*ifindex)?;
        }
        Ok(attached)
    }

    /// This node's workload IPs → the pod-facing interface the kernel routes them to; the
    /// others are kept (and logged once) as unresolved, to be retried every pass.
    async fn resolve(&mut self, ifaces: &[Interface], attached: &BTreeSet<u32>) -> Result<DesiredMap, KernelError> {
        let local: Vec<(IpAddr, String)> = self
            .desired
            .file
            .on_node(&self.scope.node)
            .flat_map(|w| w.ips.iter().map(|ip| (ip.to_canonical(), w.id())))
            .collect();
        let own: BTreeSet<IpAddr> = ifaces.iter().flat_map(|i| i.addresses.iter().map(|a| a.to_canonical())).collect();
        let routable: Vec<IpAddr> =
            local.iter().map(|(ip, _)| *ip).filter(|ip| !own.contains(ip) && self.in_pod_cidrs(*ip)).collect();
        let routes = self.routes.resolve(&mut self.kernel, routable).await?;
        // Pods the CNI plugin named a port for need no namespace read.
        let unnamed: Vec<u32> =
            routes.iter().filter(|(ip, _)| self.named_port(ip, ifaces).is_none()).filter_map(|(_, r)| *r).collect();
        let claims = self.claims_if_bridged(ifaces, unnamed.iter()).await;
        let mut desired = DesiredMap::new();
        let mut problems = BTreeMap::new();
        for (ip, id) in local {
            let place = self.place(ip, &own, routes.get(&ip).copied().flatten(), ifaces, attached, &claims);
            match self.keep_held(ip, place) {
                Some(Place::On(ifx)) => {
                    desired.insert(ip, (ifx, id));
                }
                Some(Place::Held(problem)) => {
                    desired.insert(ip, (0, id.clone()));
                    problems.insert(ip, (problem, id));
                }
                Some(Place::Unresolved(problem)) => {
                    problems.insert(ip, (problem, id));
                }
                None => {}
            }
        }
        self.report(&problems);
        self.unresolved = problems.into_iter().map(|(ip, (p, _))| (ip, p)).collect();
        Ok(desired)
    }

    /// A held IP stays only where it is enrolled now: anywhere else, or nowhere, its pod is
    /// gone (or another took its address), so it is released at once (`None`).
    fn keep_held(&mut self, ip: IpAddr, place: Place) -> Option<Place> {
        if !self.desired.held.contains(&ip) {
            return Some(place);
        }
        let now = self.map.as_ref().and_then(|m| m.get(&ip)).copied();
        let why = match (place, now) {
            (Place::On(ifx), Some(n)) if ifx == n => return Some(Place::On(ifx)),
            (Place::On(ifx), Some(_)) => format!("its address is now behind another interface (ifindex {ifx})"),
            (Place::On(_), None) => "it was not enrolled".to_owned(),
            (Place::Held(why) | Place::Unresolved(why), _) => why,
        };
        self.released.push((ip, why));
        None
    }

    /// The pods' own word on their ports, read only when some workload is routed via a pod
    /// bridge; an unreadable namespace directory is the reason those stay unresolved.
    async fn claims_if_bridged<'a>(
        &mut self,
        ifaces: &[Interface],
        mut routed_via: impl Iterator<Item = &'a u32>,
    ) -> Result<PortClaims, String> {
        let bridges: BTreeSet<u32> = ifaces.iter().filter(|i| self.is_pod_bridge(i, ifaces)).map(|i| i.index).collect();
        if bridges.is_empty() || !routed_via.any(|ifx| bridges.contains(ifx)) {
            return Ok(PortClaims::default());
        }
        match self.kernel.pod_sides(&self.scope.netns_dir, ifaces).await {
            Ok(seen) => Ok(PortClaims::confirmed(&seen, ifaces)),
            Err(e) => Err(format!("its pod's port cannot be read: {e} (see --netns-dir)")),
        }
    }

    fn is_pod_bridge(&self, i: &Interface, ifaces: &[Interface]) -> bool {
        Topology::of(i, ifaces, &self.scope.pod_cidrs).role == Role::PodBridge
    }

    /// The interface a workload IP is enrolled on, or why it is not. An address of the node,
    /// one outside the pod networks or one behind an uplink would capture (or drop) traffic
    /// that is not the workload's: every flow of the node through that interface.
    fn place(
        &self,
        ip: IpAddr,
        own: &BTreeSet<IpAddr>,
        route: Option<u32>,
        ifaces: &[Interface],
        attached: &BTreeSet<u32>,
        claims: &Result<PortClaims, String>,
    ) -> Place {
        if own.contains(&ip) {
            return Place::Unresolved("it is an address of this node, not of a pod".into());
        }
        if !self.in_pod_cidrs(ip) {
            return Place::Unresolved(format!("it is outside the pod networks ({})", cidrs(&self.scope.pod_cidrs)));
        }
        let Some(ifx) = route else {
            return Place::Unresolved("no device route to it on this node (is its veth up?)".into());
        };
        let iface = ifaces.iter().find(|i| i.index == ifx);
        let name = iface.map_or("?", |i| i.name.as_str());
        let ifx = match iface.map(|i| Topology::of(i, ifaces, &self.scope.pod_cidrs).role) {
            Some(Role::PodBridge) => match self.port_behind(ip, ifx, name, ifaces, claims) {
                Ok(port) => port,
                Err(place) => return place,
            },
            Some(Role::Uplink | Role::Port) => {
                return Place::Unresolved(format!(
                    "it is routed via {name}, which is not pod-facing (it carries the node's addresses)"
                ));
            }
            _ => ifx,
        };
        if !attached.contains(&ifx) {
            let name = ifaces.iter().find(|i| i.index == ifx).map_or("?", |i| i.name.as_str());
            return Place::Unresolved(format!("routed via {name} which meshpath is not attached to (see --interface)"));
        }
        Place::On(ifx)
    }

    /// The bridge port the CNI plugin named for `ip`'s pod, if it named one that exists.
    fn named_port<'a>(&self, ip: &IpAddr, ifaces: &'a [Interface]) -> Option<&'a Interface> {
        let names = self.desired.ports.get(ip)?;
        ifaces.iter().find(|i| i.master.is_some() && names.contains(&i.name))
    }

    /// The port of `bridge` that the pod holding `ip` sits behind: the one the CNI plugin
    /// named, else the one its namespace leads to.
    fn port_behind(
        &self,
        ip: IpAddr,
        bridge: u32,
        name: &str,
        ifaces: &[Interface],
        claims: &Result<PortClaims, String>,
    ) -> Result<u32, Place> {
        let port_of = |p: &u32| ifaces.iter().find(|i| i.index == *p && i.master == Some(bridge));
        match self.named_port(&ip, ifaces) {
            Some(port) if port.master == Some(bridge) && port.up => return Ok(port.index),
            Some(port) if port.master == Some(bridge) => {
                return Err(Place::Unresolved(format!("its port {} on {name} is down", port.name)));
            }
            Some(port) => {
                return Err(Place::Unresolved(format!(
                    "the CNI plugin named {} as its port, which is not a port of {name}, the bridge it is routed via",
                    port.name
                )));
            }
            None => {}
        }
        let claims = claims.as_ref().map_err(|e| Place::Unresolved(e.clone()))?;
        match claims.get(&ip) {
            // A port that is down carries nothing, as a routed veth that is down has no route.
            Some(Claim::Port(p)) if port_of(p).is_some_and(|i| i.up) => Ok(*p),
            Some(Claim::Port(p)) if port_of(p).is_some() => Err(Place::Unresolved(format!(
                "its port {} on {name} is down",
                port_of(p).map_or("?", |i| i.name.as_str())
            ))),
            Some(Claim::Port(p)) => Err(Place::Unresolved(format!(
                "its pod's interface leads to ifindex {p}, which is not a port of {name}, the bridge it is routed via"
            ))),
            Some(Claim::Contested(ports)) => {
                let names: Vec<&str> = ports.iter().filter_map(port_of).map(|i| i.name.as_str()).collect();
                Err(Place::Held(format!(
                    "pods behind several ports of {name} hold it ({}): held behind none, its traffic is dropped",
                    names.join(", ")
                )))
            }
            None => Err(Place::Unresolved(format!(
                "it is routed via the bridge {name}, and no pod namespace in {} holds it on a port of it",
                self.scope.netns_dir.display()
            ))),
        }
    }

    fn in_pod_cidrs(&self, ip: IpAddr) -> bool {
        let cidrs = &self.scope.pod_cidrs;
        cidrs.is_empty() || cidrs.iter().any(|n| n.contains(&ip))
    }

    /// Logs what newly cannot be enrolled: one line per IP for a few, one summary per reason
    /// for many (a bad file with 60 000 entries must not write 60 000 lines).
    fn report(&self, problems: &BTreeMap<IpAddr, (String, String)>) {
        let mut by_reason: BTreeMap<&str, Vec<(IpAddr, &str)>> = BTreeMap::new();
        for (ip, (problem, id)) in problems {
            if self.unresolved.get(ip) != Some(problem) {
                by_reason.entry(problem).or_default().push((*ip, id));
            }
        }
        for (problem, ips) in by_reason {
            if ips.len() <= LISTED_PROBLEMS {
                for (ip, id) in ips {
                    tracing::warn!(workload = %id, %ip, "not enrolled: {problem}");
                }
            } else {
                let some: Vec<String> = ips.iter().take(LISTED_PROBLEMS).map(|(ip, id)| format!("{id} {ip}")).collect();
                tracing::warn!(count = ips.len(), examples = %some.join(", "), "workload IPs not enrolled: {problem}");
            }
        }
        let cleared = self.unresolved.keys().filter(|ip| !problems.contains_key(ip)).count();
        if cleared > 0 && problems.is_empty() {
            tracing::info!(count = cleared, "every workload IP of this node is enrolled again");
        }
    }

    /// Writes the difference between `desired` and the map. Interface flags go after their
    /// IPs on the way in and before them on the way out, so a workload's own TCP is never
    /// dropped as coming from an unenrolled source.
    fn apply(&mut self, desired: &DesiredMap, ifaces: &[Interface]) -> Result<(), KernelError> {
        let names: BTreeMap<u32, &str> = ifaces.iter().map(|i| (i.index, i.name.as_str())).collect();
        let wanted_ifs: BTreeSet<u32> = desired.values().map(|(ifx, _)| *ifx).collect();
        let values = self.kernel.interface_values()?;
        for (ifx, v) in &values {
            if v.flags & IF_WORKLOAD != 0 && !wanted_ifs.contains(ifx) {
                self.kernel.set_interface(*ifx, InterfaceValue { flags: v.flags & !IF_WORKLOAD, ..*v })?;
            }
        }
        let current = self.map.get_or_insert_with(BTreeMap::new);
        let stale: Vec<IpAddr> = current.keys().filter(|ip| !desired.contains_key(ip)).copied().collect();
        for ip in stale {
            self.kernel.remove_workload(ip)?;
            current.remove(&ip);
            tracing::info!(%ip, "unenrolled");
        }
        // Per interface: its IPs, then its flag, so a failure further on leaves every
        // interface done so far complete.
        for ifx in &wanted_ifs {
            for (ip, (_, id)) in desired.iter().filter(|(_, (i, _))| i == ifx) {
                if current.get(ip) != Some(ifx) {
                    self.kernel.upsert_workload(*ip, *ifx)?;
                    current.insert(*ip, *ifx);
                    let ifname = names.get(ifx).copied().unwrap_or("?");
                    tracing::info!(workload = %id, %ip, interface = ifname, ifindex = ifx, "enrolled");
                }
            }
            // Held IPs (behind none) have no interface to flag.
            let v = values.get(ifx).copied().unwrap_or_default();
            if *ifx != 0 && v.flags & IF_WORKLOAD == 0 {
                self.kernel.set_interface(*ifx, InterfaceValue { flags: v.flags | IF_WORKLOAD, ..v })?;
            }
        }
        Ok(())
    }
}

fn cidrs(nets: &[IpNet]) -> String {
    nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use meshpath_common::interface::{IF_BRIDGE_PORT, IF_POD};

    use super::super::kernel::fake::{Fake, Op, uplink, veth};
    use super::*;
    use crate::pod_ports::PodSide;
    use crate::routing::Peer;
    use crate::workloads::Workload;

    const NODE: &str = "n1";

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an IP")
    }

    fn workload(name: &str, node: &str, ips: &[&str]) -> Workload {
        Workload {
            name: name.into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            node: node.into(),
            ips: ips.iter().map(|i| ip(i)).collect(),
        }
    }

    /// A node with an uplink (ifindex 2) and the veths of pods a (3) and b (4).
    fn node() -> Fake {
        let mut k =
            Fake { ifaces: vec![uplink(2, "eth0", "192.168.1.1"), veth(3, "vpa"), veth(4, "vpb")], ..Fake::default() };
        k.routes = [("10.244.1.10", 3), ("fd00::10", 3), ("10.244.1.11", 4), ("192.168.1.1", 2), ("10.9.0.1", 2)]
            .into_iter()
            .map(|(a, i)| (ip(a), i))
            .collect();
        k
    }

    fn reconciler(k: Fake) -> Reconciler<Fake> {
        let scope = Scope {
            node: NODE.into(),
            interfaces: Vec::new(),
            pod_cidrs: vec!["10.244.0.0/16".parse().expect("a net"), "fd00::/64".parse().expect("a net")],
            netns_dir: "/run/netns".into(),
        };
        Reconciler::new(scope, k)
    }

    fn desire(r: &mut Reconciler<Fake>, ws: &[Workload], held: &[&str]) {
        let file = WorkloadFile { workloads: ws.to_vec() };
        r.set_desired(Desired { file, held: held.iter().map(|i| ip(i)).collect(), ..Default::default() });
    }

    async fn pass(r: &mut Reconciler<Fake>) {
        r.reconcile(Trigger::Change).await.expect("a pass");
        assert_eq!(r.kernel().broken, Vec::<String>::new(), "a write broke a rule of the datapath");
    }

    fn map(r: &mut Reconciler<Fake>) -> Vec<(String, u32)> {
        r.kernel().map.iter().map(|(ip, i)| (ip.to_string(), *i)).collect()
    }

    #[tokio::test]
    async fn safety_ticks_need_no_netlink_and_look_at_everything_once_a_minute() {
        let mut r = reconciler(node());
        desire(&mut r, &[workload("a", NODE, &["10.244.1.10"])], &[]);
        pass(&mut r).await;
        // An interface the kernel did not announce (a lost notification, say).
        r.kernel().ifaces.push(veth(5, "vpc"));
        r.kernel().ops.clear();
        r.reconcile(Trigger::Safety).await.expect("a pass");
        assert_eq!(r.kernel().ops, [], "a tick within the minute writes nothing and lists nothing");
        // A classifier gone behind the daemon's back is attached again at the next tick.
        r.kernel().attached.remove(&3);
        r.kernel().detached.push(3);
        r.reconcile(Trigger::Safety).await.expect("a pass");
        assert_eq!(r.kernel().ops, [Op::Attach(3)], "only the lost classifier attached again");
        // The map is read again once a minute: an entry deleted behind the daemon comes back.
        r.kernel().map.remove(&ip("10.244.1.10"));
        r.last_full -= FULL_PASS;
        r.reconcile(Trigger::Safety).await.expect("a pass");
        assert!(r.kernel().ops.contains(&Op::Upsert(ip("10.244.1.10"), 3)), "{:?}", r.kernel().ops);
        r.kernel().ops.clear();
        r.last_deep -= DEEP_CHECK;
        r.reconcile(Trigger::Safety).await.expect("a pass");
        let ops = &r.kernel().ops;
        assert!(ops.contains(&Op::Capture), "the capture rule and routes installed again: {ops:?}");
        assert!(ops.contains(&Op::Attach(5)), "the interfaces listed again: {ops:?}");
        // A failed pass makes the next tick look at everything, within the minute too.
        r.kernel().fail_upsert = Some(ip("10.244.1.11"));
        desire(&mut r, &[workload("a", NODE, &["10.244.1.10"]), workload("b", NODE, &["10.244.1.11"])], &[]);
        assert!(r.reconcile(Trigger::Change).await.is_err(), "the map write fails");
        r.kernel().fail_upsert = None;
        r.kernel().ops.clear();
        r.reconcile(Trigger::Safety).await.expect("a pass");
        assert!(r.kernel().ops.contains(&Op::Capture), "after a failure: {:?}", r.kernel().ops);
    }

    #[tokio::test]
    async fn pods_are_enrolled_behind_their_veths_after_the_classifier_and_before_their_flag() {
        let mut r = reconciler(node());
        desire(
            &mut r,
            &[workload("a", NODE, &["10.244.1.10", "fd00::10"]), workload("c", "n2", &["10.244.2.10"])],
            &[],
        );
        pass(&mut r).await;
        assert_eq!(map(&mut r), [("10.244.1.10".into(), 3), ("fd00::10".into(), 3)], "only this node's pods");
        let ops = r.kernel().ops.clone();
        let at = |op: &Op| ops.iter().position(|o| o == op).unwrap_or_else(|| panic!("no {op:?} in {ops:?}"));
        let flagged = ops
            .iter()
            .position(|o| matches!(o, Op::SetInterface(3, v) if v.flags & IF_WORKLOAD != 0))
            .expect("vpa flagged as a workload's");
        assert!(at(&Op::Attach(3)) < at(&Op::Upsert(ip("10.244.1.10"), 3)), "attach before enrolling: {ops:?}");
        assert!(at(&Op::Upsert(ip("fd00::10"), 3)) < flagged, "every IP before the flag: {ops:?}");
        assert_eq!(r.kernel().values[&3].flags, IF_POD | IF_WORKLOAD);
        assert_eq!(r.kernel().values[&2].flags, 0, "the uplink is no pod interface");
    }

    #[tokio::test]
    async fn the_nat_table_routes_exactly_the_ips_enrolled_behind_an_interface_and_is_restored() {
        let mut r = reconciler(node());
        let a = workload("a", NODE, &["10.244.1.10", "fd00::10"]);
        let b = workload("b", NODE, &["10.244.1.11"]);
        desire(&mut r, &[a.clone(), b.clone(), workload("c", "n2", &["10.244.2.10"])], &[]);
        pass(&mut r).await;
        let all: BTreeSet<IpAddr> = ["10.244.1.10", "fd00::10", "10.244.1.11"].map(ip).into();
        assert_eq!(r.kernel().nat_routes, all, "this node's enrolled IPs, no other");
        // Someone deletes one and adds a stranger: the announced change puts it right.
        r.kernel().nat_routes.remove(&ip("10.244.1.11"));
        r.kernel().nat_routes.insert(ip("10.244.1.99"));
        r.kernel().changes.capture = true;
        pass(&mut r).await;
        assert_eq!(r.kernel().nat_routes, all);
        // Nothing announced, nothing changed: no write.
        r.kernel().ops.clear();
        pass(&mut r).await;
        assert!(!r.kernel().ops.iter().any(|o| matches!(o, Op::NatRoute(..))), "{:?}", r.kernel().ops);
        // b leaves, then a.
        desire(&mut r, &[a], &[]);
        pass(&mut r).await;
        assert_eq!(r.kernel().nat_routes, ["10.244.1.10", "fd00::10"].map(ip).into());
        r.kernel().ops.clear();
        desire(&mut r, &[], &[]);
        pass(&mut r).await;
        assert!(r.kernel().nat_routes.is_empty());
        let ops = r.kernel().ops.clone();
        // Routed only while in the map: the route goes first.
        let unrouted = ops.iter().position(|o| matches!(o, Op::NatRoute(_, false))).expect("routes deleted");
        let removed = ops.iter().position(|o| matches!(o, Op::Remove(_))).expect("IPs removed");
        assert!(unrouted < removed, "{ops:?}");
    }

    #[tokio::test]
    async fn a_pod_leaving_loses_its_flag_before_its_ips() {
        let mut r = reconciler(node());
        desire(&mut r, &[workload("a", NODE, &["10.244.1.10", "fd00::10"])], &[]);
        pass(&mut r).await;
        r.kernel().ops.clear();
        desire(&mut r, &[], &[]);
        pass(&mut r).await;
        let ops = r.kernel().ops.clone();
        let unflagged = ops
            .iter()
            .position(|o| matches!(o, Op::SetInterface(3, v) if v.flags & IF_WORKLOAD == 0))
            .expect("vpa's flag cleared");
        let first_removal = ops.iter().position(|o| matches!(o, Op::Remove(_))).expect("IPs removed");
        assert!(unflagged < first_removal, "the flag before its IPs: {ops:?}");
        assert!(map(&mut r).is_empty());
    }

    #[tokio::test]
    async fn addresses_that_are_not_a_pods_are_never_enrolled() {
        let mut r = reconciler(node());
        desire(
            &mut r,
            &[
                workload("own", NODE, &["192.168.1.1"]),
                workload("outside", NODE, &["10.9.0.1"]),
                workload("unrouted", NODE, &["10.244.1.99"]),
                workload("b", NODE, &["10.244.1.11"]),
            ],
            &[],
        );
        pass(&mut r).await;
        assert_eq!(map(&mut r), [("10.244.1.11".into(), 4)]);
        let reasons: Vec<&str> = r.unresolved.values().map(String::as_str).collect();
        assert!(reasons.iter().any(|r| r.contains("no device route")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("outside the pod networks")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("address of this node")), "{reasons:?}");
    }

    #[tokio::test]
    async fn listeners_are_registered_only_after_a_pass_went_through() {
        let mut k = node();
        k.fail_upsert = Some(ip("10.244.1.10"));
        let mut r = reconciler(k);
        let sock = std::net::TcpListener::bind("127.0.0.1:0").expect("a socket");
        let fds = [(Listener::Outbound, false, sock.as_fd())];
        assert!(matches!(r.register(&fds), Err(KernelError::NotReconciled)));
        desire(&mut r, &[workload("a", NODE, &["10.244.1.10"])], &[]);
        assert!(r.reconcile(Trigger::Safety).await.is_err(), "the map write fails");
        assert!(matches!(r.register(&fds), Err(KernelError::NotReconciled)), "a failed pass is no pass");
        r.kernel().fail_upsert = None;
        pass(&mut r).await;
        let slots = r.register(&fds).expect("registered");
        assert!(slots[Listener::Outbound.slot(false) as usize].is_some());
        assert!(r.kernel().ops.ends_with(&[Op::Register(Listener::Outbound, false)]));
    }

    #[tokio::test]
    async fn a_held_ip_stays_where_it_is_and_is_let_go_once_its_pod_is_gone_or_moved() {
        let mut r = reconciler(node());
        let a = workload("a", NODE, &["10.244.1.10"]);
        let b = workload("b", NODE, &["10.244.1.11"]);
        desire(&mut r, &[a.clone(), b.clone()], &[]);
        pass(&mut r).await;
        // Both left the desired state; the releases keep them, held.
        desire(&mut r, &[a.clone(), b.clone()], &["10.244.1.10", "10.244.1.11"]);
        pass(&mut r).await;
        assert_eq!(map(&mut r), [("10.244.1.10".into(), 3), ("10.244.1.11".into(), 4)]);
        assert!(r.take_released().is_empty());
        // a's veth goes (pod deleted); b's address is now routed to a's old veth index.
        r.kernel().ifaces.retain(|i| i.index != 3);
        r.kernel().routes.remove(&ip("10.244.1.10"));
        r.kernel().routes.insert(ip("10.244.1.11"), 5);
        r.kernel().ifaces.push(veth(5, "vpx"));
        r.kernel().changes.interfaces = true;
        pass(&mut r).await;
        let released: Vec<IpAddr> = r.take_released().into_iter().map(|(ip, _)| ip).collect();
        assert_eq!(released, [ip("10.244.1.10"), ip("10.244.1.11")]);
        assert!(map(&mut r).is_empty(), "neither is served where its old pod was");
    }

    #[tokio::test]
    async fn a_bridged_pod_is_enrolled_behind_the_port_its_namespace_names_and_a_contested_one_behind_none() {
        // flannel's cni0, holding the pods' gateway.
        let bridge = Interface { bridge: true, peer: None, addresses: vec![ip("10.244.1.1")], ..veth(10, "cni0") };
        // Every pod's namespace is numbered 1 here: only the interface index tells them apart.
        let port = |index: u32, peer: u32| Interface {
            master: Some(10),
            peer: Some(Peer { index: peer, netns: 1 }),
            ..veth(index, "vp")
        };
        let mut k = Fake { ifaces: vec![bridge, port(11, 2), port(12, 2)], ..Fake::default() };
        k.routes = [(ip("10.244.1.10"), 10), (ip("10.244.1.12"), 10)].into();
        let side = |a: &str, pod_if, peer| PodSide { ip: ip(a), pod_if, peer, netns_id: 1, netns: "x".into() };
        k.sides = vec![side("10.244.1.10", 2, 11), side("10.244.1.12", 2, 11), side("10.244.1.12", 2, 12)];
        let mut r = reconciler(k);
        desire(&mut r, &[workload("a", NODE, &["10.244.1.10"]), workload("e", NODE, &["10.244.1.12"])], &[]);
        pass(&mut r).await;
        assert_eq!(map(&mut r), [("10.244.1.10".into(), 11), ("10.244.1.12".into(), 0)]);
        assert_eq!(r.kernel().values[&11].flags & (IF_BRIDGE_PORT | IF_WORKLOAD), IF_BRIDGE_PORT | IF_WORKLOAD);
        assert!(!r.kernel().attached.contains(&10), "the bridge itself carries no classifier");
    }
}
