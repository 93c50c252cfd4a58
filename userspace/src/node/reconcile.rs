//! Makes the kernel match the desired state: the capture rule and routes, the classifier on
//! every interface it should be on, and the workload maps.
//!
//! Each pass: attach (and prune) first, then resolve each local workload IP to the interface
//! the kernel routes it to, then write the difference into the maps. The classifier goes
//! first so an IP is never in the map while its interface lacks the program.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::NodeError;
use super::routes::RouteCache;
use crate::datapath::Datapath;
use crate::routing::{self, Interface, Routing};
use crate::workloads::WorkloadFile;

/// How long the map's contents are trusted before they are read again (meshpath is their only
/// writer; this catches anyone else's edits).
const FULL_PASS: Duration = Duration::from_secs(10);

/// Where a local workload IP should be in the map: its interface, and its workload (for logs).
type DesiredMap = BTreeMap<IpAddr, (u32, String)>;

pub(super) struct Reconciler {
    node: String,
    /// Interfaces named on the command line; empty means every non-loopback one.
    interfaces: Vec<String>,
    tick: Duration,
    routing: Routing,
    dp: Datapath,
    file: WorkloadFile,
    routes: RouteCache,
    /// Workload IPs whose interface could not be found, with the last reason logged.
    unresolved: BTreeMap<IpAddr, String>,
    /// What the workload map holds: meshpath is its only writer, so this is read from the
    /// kernel only on full passes.
    map: Option<BTreeMap<IpAddr, u32>>,
    last_full: Instant,
    /// The desired state changed since the last pass over the workloads.
    dirty: bool,
    /// Interfaces carrying the classifier at the last pass.
    last_attached: BTreeSet<u32>,
}

impl Reconciler {
    pub(super) fn new(node: &str, interfaces: &[String], tick: Duration, routing: Routing, dp: Datapath) -> Self {
        Self {
            node: node.to_owned(),
            interfaces: interfaces.to_vec(),
            tick,
            routing,
            dp,
            file: WorkloadFile::default(),
            routes: RouteCache::default(),
            unresolved: BTreeMap::new(),
            map: None,
            last_full: Instant::now(),
            dirty: true,
            last_attached: BTreeSet::new(),
        }
    }

    pub(super) fn datapath(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    pub(super) fn set_file(&mut self, file: WorkloadFile) {
        self.file = file;
        self.dirty = true;
    }

    /// One pass. Nothing is redone when nothing changed: the same workloads over the same
    /// interfaces with the same classifiers, all resolved, recently checked.
    pub(super) async fn reconcile(&mut self) -> Result<(), NodeError> {
        let ifaces = self.routing.interfaces().await?;
        let attached = self.attach(&ifaces).await?;
        let relisted = self.routes.track(&mut self.routing, &ifaces, self.tick, &mut self.dirty).await?;
        let full = relisted || self.map.is_none() || self.last_full.elapsed() >= FULL_PASS;
        if !full && !self.dirty && attached == self.last_attached && self.unresolved.is_empty() {
            return Ok(());
        }
        if full {
            self.last_full = Instant::now();
            self.map = Some(self.dp.workloads()?);
        }
        let names = routing::names_by_index(&ifaces);
        let desired = self.resolve(&attached, &names).await?;
        self.apply(&desired, &names)?;
        // Only a pass that went through clears the flags: a failed one is retried next tick.
        self.dirty = false;
        self.last_attached = attached;
        Ok(())
    }

    /// Restores the capture rule and routes, attaches the classifier where it should be and
    /// prunes attachments of vanished interfaces; the interfaces that carry it.
    async fn attach(&mut self, ifaces: &[Interface]) -> Result<BTreeSet<u32>, NodeError> {
        let wanted: Vec<&Interface> = if self.interfaces.is_empty() {
            ifaces.iter().filter(|i| !i.loopback).collect()
        } else {
            let named = |name: &String| ifaces.iter().find(|i| &i.name == name);
            self.interfaces
                .iter()
                .map(|n| named(n).ok_or_else(|| NodeError::NoSuchInterface(n.clone())))
                .collect::<Result<_, _>>()?
        };
        // Someone may have flushed our rule or routes: put them back (idempotent).
        self.routing.install_capture().await?;
        for i in wanted {
            // An interface can vanish between listing and attaching (pod churn): skip it,
            // the next pass sees the new state.
            if let Err(e) = self.dp.attach_tc(i.index, &i.name) {
                tracing::warn!(interface = %i.name, "attaching the classifier failed (will retry): {e}");
            }
        }
        self.dp.prune_tc(&ifaces.iter().map(|i| i.index).collect())?;
        Ok(self.dp.attached_interfaces())
    }

    /// This node's workload IPs → the interface the kernel routes them to, for those routed
    /// to an interface with the classifier; the others are kept (and logged once) as
    /// unresolved, to be retried every tick.
    async fn resolve(
        &mut self,
        attached: &BTreeSet<u32>,
        names: &BTreeMap<u32, String>,
    ) -> Result<DesiredMap, NodeError> {
        let local: Vec<(IpAddr, String)> =
            self.file.on_node(&self.node).flat_map(|w| w.ips.iter().map(|ip| (ip.to_canonical(), w.id()))).collect();
        let routes = self.routes.resolve(&self.routing, local.iter().map(|(ip, _)| *ip)).await?;
        let mut desired = DesiredMap::new();
        let mut unresolved = BTreeMap::new();
        for (ip, id) in local {
            let problem = match routes.get(&ip).copied().flatten() {
                Some(ifx) if attached.contains(&ifx) => {
                    desired.insert(ip, (ifx, id));
                    continue;
                }
                Some(ifx) => format!(
                    "routed via {} which meshpath is not attached to (see --interfaces)",
                    names.get(&ifx).map(String::as_str).unwrap_or("?")
                ),
                None => "no device route to it on this node (is its veth up?)".to_string(),
            };
            if self.unresolved.get(&ip) != Some(&problem) {
                tracing::warn!(workload = %id, %ip, "not enrolled yet: {problem}");
            }
            unresolved.insert(ip, problem);
        }
        self.unresolved = unresolved;
        Ok(desired)
    }

    /// Writes the difference between `desired` and the map. Interface flags go after their
    /// IPs on the way in and before them on the way out, so a workload's own TCP is never
    /// dropped as coming from an unenrolled source.
    fn apply(&mut self, desired: &DesiredMap, names: &BTreeMap<u32, String>) -> Result<(), NodeError> {
        let wanted_ifs: BTreeSet<u32> = desired.values().map(|(ifx, _)| *ifx).collect();
        let keep_ifs = self.dp.workload_interfaces()?.intersection(&wanted_ifs).copied().collect();
        self.dp.set_workload_interfaces(&keep_ifs)?;
        let current = self.map.get_or_insert_with(BTreeMap::new);
        let stale: Vec<IpAddr> = current.keys().filter(|ip| !desired.contains_key(ip)).copied().collect();
        for ip in stale {
            self.dp.remove_workload(ip)?;
            current.remove(&ip);
            tracing::info!(%ip, "unenrolled");
        }
        for (ip, (ifx, id)) in desired {
            if current.get(ip) != Some(ifx) {
                self.dp.upsert_workload(*ip, *ifx)?;
                current.insert(*ip, *ifx);
                let ifname = names.get(ifx).map(String::as_str).unwrap_or("?");
                tracing::info!(workload = %id, %ip, interface = ifname, ifindex = ifx, "enrolled");
            }
        }
        self.dp.set_workload_interfaces(&wanted_ifs)?;
        Ok(())
    }
}
