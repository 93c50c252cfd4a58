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
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshpath_common::InterfaceValue;
use meshpath_common::interface::IF_WORKLOAD;

use super::NodeError;
use super::routes::RouteCache;
use crate::datapath::Datapath;
use crate::pod_ports::{self, Claim, PortClaims};
use crate::routing::{Changes, Interface, Routing};
use crate::topology::{Role, Topology};
use crate::workloads::WorkloadFile;

/// How long the map's contents are trusted before they are read again (meshpath is their only
/// writer; this catches anyone else's edits).
const FULL_PASS: Duration = Duration::from_secs(60);
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

/// What a pass was started by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Trigger {
    /// The desired state or the kernel changed.
    Change,
    /// The safety tick: everything is looked at again, whatever was announced.
    Safety,
}

pub(super) struct Reconciler {
    node: String,
    /// Interfaces named on the command line; empty means every non-loopback one.
    named: Vec<String>,
    pod_cidrs: Vec<IpNet>,
    safety_tick: Duration,
    routing: Routing,
    dp: Datapath,
    file: WorkloadFile,
    routes: RouteCache,
    /// The interfaces as last listed; listed again when the kernel says they changed.
    ifaces: Option<Vec<Interface>>,
    /// Workload IPs that could not be enrolled, with the reason last logged.
    unresolved: BTreeMap<IpAddr, String>,
    /// What the workload map holds: meshpath is its only writer, so this is read from the
    /// kernel only on full passes.
    map: Option<BTreeMap<IpAddr, u32>>,
    last_full: Instant,
    /// The desired state changed since the last pass over the workloads.
    dirty: bool,
    /// Interfaces carrying the classifier at the last pass.
    last_attached: BTreeSet<u32>,
    /// Notifications taken by a pass that failed, for the next one.
    carried: Changes,
    /// Where pods' network namespaces are pinned ([`crate::pod_ports`]).
    netns_dir: PathBuf,
}

impl Reconciler {
    pub(super) fn new(cfg: &super::NodeConfig, routing: Routing, dp: Datapath) -> Self {
        Self {
            node: cfg.node.clone(),
            named: cfg.interfaces.clone(),
            pod_cidrs: cfg.pod_cidrs.clone(),
            safety_tick: super::SAFETY_TICK,
            routing,
            dp,
            file: WorkloadFile::default(),
            routes: RouteCache::default(),
            ifaces: None,
            unresolved: BTreeMap::new(),
            map: None,
            last_full: Instant::now(),
            dirty: true,
            last_attached: BTreeSet::new(),
            carried: Changes::default(),
            netns_dir: cfg.netns_dir.clone(),
        }
    }

    pub(super) fn datapath(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    pub(super) fn set_file(&mut self, file: WorkloadFile) {
        self.file = file;
        self.dirty = true;
    }

    /// Resolves when the kernel announces a change (kept for the next pass).
    pub(super) async fn kernel_changed(&mut self) {
        self.routing.changed().await
    }

    /// One pass. Nothing is redone when nothing changed: the same workloads over the same
    /// interfaces with the same classifiers, all resolved, recently checked.
    pub(super) async fn reconcile(&mut self, trigger: Trigger) -> Result<(), NodeError> {
        // What a failed pass had taken from the kernel's notifications is not lost with it.
        let mut changes = std::mem::take(&mut self.carried);
        changes.merge(self.routing.changes());
        let result = self.pass(trigger, &changes).await;
        if result.is_err() {
            self.carried = changes;
        }
        result
    }

    async fn pass(&mut self, trigger: Trigger, changes: &Changes) -> Result<(), NodeError> {
        let safety = trigger == Trigger::Safety || changes.lost;
        if safety {
            for path in self.dp.restore_pins()? {
                tracing::warn!(path = %path.display(), "a pin of this node was deleted behind the daemon; pinned it again");
            }
        }
        if safety || changes.interfaces || self.ifaces.is_none() {
            self.ifaces = Some(self.routing.interfaces().await?);
            // An address may have moved to the node, or off it.
            self.dirty = true;
        }
        let ifaces = self.ifaces.clone().unwrap_or_default();
        if safety {
            let names = ifaces.iter().map(|i| (i.index, i.name.clone())).collect();
            for ifindex in self.dp.verify_attachments(&names) {
                tracing::warn!(
                    ifindex,
                    interface = names.get(&ifindex).map(String::as_str).unwrap_or("?"),
                    "a classifier of meshpath was removed behind its back; attaching it again"
                );
            }
        }
        let attached = self.attach(&ifaces, safety || changes.capture).await?;
        let relisted = self.routes.track(&mut self.routing, &ifaces, changes, safety, self.safety_tick).await?;
        self.dirty |= relisted.forgot;
        let full = relisted.relisted || self.map.is_none() || self.last_full.elapsed() >= FULL_PASS;
        if !full && !self.dirty && attached == self.last_attached && self.unresolved.is_empty() {
            return Ok(());
        }
        if full {
            self.last_full = Instant::now();
            self.map = Some(self.dp.workloads()?);
        }
        let desired = self.resolve(&ifaces, &attached).await?;
        self.apply(&desired, &ifaces)?;
        // Only a pass that went through clears the flags: a failed one is retried next time.
        self.dirty = false;
        self.last_attached = attached;
        Ok(())
    }

    /// Restores the capture rule and routes (when they may have changed), attaches the
    /// classifier where it should be, with each interface's flags written first, and prunes
    /// what vanished; the interfaces that carry it.
    async fn attach(&mut self, ifaces: &[Interface], check_capture: bool) -> Result<BTreeSet<u32>, NodeError> {
        let wanted: Vec<&Interface> = if self.named.is_empty() {
            ifaces.iter().filter(|i| !i.loopback).collect()
        } else {
            let named = |name: &String| ifaces.iter().find(|i| &i.name == name);
            self.named
                .iter()
                .map(|n| named(n).ok_or_else(|| NodeError::NoSuchInterface(n.clone())))
                .collect::<Result<_, _>>()?
        };
        // Someone may have flushed our rule or routes: put them back (idempotent).
        if check_capture {
            self.routing.install_capture().await?;
        }
        let values = self.dp.interfaces()?;
        let classified = |i: &&Interface| Topology::of(i, ifaces, &self.pod_cidrs).classified();
        for (i, topology) in wanted.into_iter().map(|i| (i, Topology::of(i, ifaces, &self.pod_cidrs))) {
            if !topology.classified() {
                continue;
            }
            // The workload bit is the map pass's to set; the rest is the interface's kind.
            let mut want = topology.value();
            want.flags |= values.get(&i.index).map_or(0, |v| v.flags & IF_WORKLOAD);
            if values.get(&i.index) != Some(&want) {
                self.dp.set_interface(i.index, want)?;
            }
            // An interface can vanish between listing and attaching (pod churn): skip it,
            // the next pass sees the new state.
            if let Err(e) = self.dp.attach_tc(i.index, &i.name) {
                tracing::warn!(interface = %i.name, "attaching the classifier failed (will retry): {e}");
            }
        }
        // What vanished, and a pod bridge that carries the classifier (an interface that
        // became one), lose it.
        let existing: BTreeSet<u32> = ifaces.iter().filter(classified).map(|i| i.index).collect();
        self.dp.prune_tc(&existing)?;
        let attached = self.dp.attached_interfaces();
        for ifindex in values.keys().filter(|i| !attached.contains(i)) {
            self.dp.remove_interface(*ifindex)?;
        }
        Ok(attached)
    }

    /// This node's workload IPs → the pod-facing interface the kernel routes them to; the
    /// others are kept (and logged once) as unresolved, to be retried every pass.
    async fn resolve(&mut self, ifaces: &[Interface], attached: &BTreeSet<u32>) -> Result<DesiredMap, NodeError> {
        let local: Vec<(IpAddr, String)> =
            self.file.on_node(&self.node).flat_map(|w| w.ips.iter().map(|ip| (ip.to_canonical(), w.id()))).collect();
        let own: BTreeSet<IpAddr> = ifaces.iter().flat_map(|i| i.addresses.iter().map(|a| a.to_canonical())).collect();
        let routable: Vec<IpAddr> =
            local.iter().map(|(ip, _)| *ip).filter(|ip| !own.contains(ip) && self.in_pod_cidrs(*ip)).collect();
        let routes = self.routes.resolve(&self.routing, routable).await?;
        let claims = self.claims_if_bridged(ifaces, routes.values().flatten()).await;
        let mut desired = DesiredMap::new();
        let mut problems = BTreeMap::new();
        for (ip, id) in local {
            match self.place(ip, &own, routes.get(&ip).copied().flatten(), ifaces, attached, &claims) {
                Place::On(ifx) => {
                    desired.insert(ip, (ifx, id));
                }
                Place::Held(problem) => {
                    desired.insert(ip, (0, id.clone()));
                    problems.insert(ip, (problem, id));
                }
                Place::Unresolved(problem) => {
                    problems.insert(ip, (problem, id));
                }
            }
        }
        self.report(&problems);
        self.unresolved = problems.into_iter().map(|(ip, (p, _))| (ip, p)).collect();
        Ok(desired)
    }

    /// The pods' own word on their ports, read only when some workload is routed via a pod
    /// bridge; an unreadable namespace directory is the reason those stay unresolved.
    async fn claims_if_bridged<'a>(
        &self,
        ifaces: &[Interface],
        mut routed_via: impl Iterator<Item = &'a u32>,
    ) -> Result<PortClaims, String> {
        let bridges: BTreeSet<u32> = ifaces
            .iter()
            .filter(|i| Topology::of(i, ifaces, &self.pod_cidrs).role == Role::PodBridge)
            .map(|i| i.index)
            .collect();
        if bridges.is_empty() || !routed_via.any(|ifx| bridges.contains(ifx)) {
            return Ok(PortClaims::default());
        }
        match pod_ports::scan(&self.netns_dir, ifaces).await {
            Ok(seen) => Ok(PortClaims::confirmed(&seen, ifaces)),
            Err(e) => Err(format!("its pod's port cannot be read: {e} (see --netns-dir)")),
        }
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
            return Place::Unresolved(format!("it is outside the pod networks ({})", cidrs(&self.pod_cidrs)));
        }
        let Some(ifx) = route else {
            return Place::Unresolved("no device route to it on this node (is its veth up?)".into());
        };
        let iface = ifaces.iter().find(|i| i.index == ifx);
        let name = iface.map_or("?", |i| i.name.as_str());
        let ifx = match iface.map(|i| Topology::of(i, ifaces, &self.pod_cidrs).role) {
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

    /// The port of `bridge` that the pod holding `ip` sits behind.
    fn port_behind(
        &self,
        ip: IpAddr,
        bridge: u32,
        name: &str,
        ifaces: &[Interface],
        claims: &Result<PortClaims, String>,
    ) -> Result<u32, Place> {
        let claims = claims.as_ref().map_err(|e| Place::Unresolved(e.clone()))?;
        let port_of = |p: &u32| ifaces.iter().find(|i| i.index == *p && i.master == Some(bridge));
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
                self.netns_dir.display()
            ))),
        }
    }

    fn in_pod_cidrs(&self, ip: IpAddr) -> bool {
        self.pod_cidrs.is_empty() || self.pod_cidrs.iter().any(|n| n.contains(&ip))
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
    fn apply(&mut self, desired: &DesiredMap, ifaces: &[Interface]) -> Result<(), NodeError> {
        let names: BTreeMap<u32, &str> = ifaces.iter().map(|i| (i.index, i.name.as_str())).collect();
        let wanted_ifs: BTreeSet<u32> = desired.values().map(|(ifx, _)| *ifx).collect();
        let values = self.dp.interfaces()?;
        for (ifx, v) in &values {
            if v.flags & IF_WORKLOAD != 0 && !wanted_ifs.contains(ifx) {
                self.dp.set_interface(*ifx, InterfaceValue { flags: v.flags & !IF_WORKLOAD, ..*v })?;
            }
        }
        let current = self.map.get_or_insert_with(BTreeMap::new);
        let stale: Vec<IpAddr> = current.keys().filter(|ip| !desired.contains_key(ip)).copied().collect();
        for ip in stale {
            self.dp.remove_workload(ip)?;
            current.remove(&ip);
            tracing::info!(%ip, "unenrolled");
        }
        // Per interface: its IPs, then its flag, so a failure further on leaves every
        // interface done so far complete.
        for ifx in &wanted_ifs {
            for (ip, (_, id)) in desired.iter().filter(|(_, (i, _))| i == ifx) {
                if current.get(ip) != Some(ifx) {
                    self.dp.upsert_workload(*ip, *ifx)?;
                    current.insert(*ip, *ifx);
                    let ifname = names.get(ifx).copied().unwrap_or("?");
                    tracing::info!(workload = %id, %ip, interface = ifname, ifindex = ifx, "enrolled");
                }
            }
            // Held IPs (behind none) have no interface to flag.
            let v = values.get(ifx).copied().unwrap_or_default();
            if *ifx != 0 && v.flags & IF_WORKLOAD == 0 {
                self.dp.set_interface(*ifx, InterfaceValue { flags: v.flags | IF_WORKLOAD, ..v })?;
            }
        }
        Ok(())
    }
}

fn cidrs(nets: &[IpNet]) -> String {
    nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
