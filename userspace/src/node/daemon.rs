//! The driver of a daemon's life: one function per [`Phase`], each returning the
//! [`Event`] that ends it; [`Phase::next`] alone decides what comes next.
//!
//! A *term* is one stretch of serving: a loaded datapath, listeners in the SOCKMAP, the
//! admin ports, the handover socket. A daemon usually has one; a daemon taken over whose
//! successor dies starts another (see [`super::lifecycle`]).

use std::collections::BTreeSet;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};

use meshpath_common::Listener;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::annotate::{Annotations, Wanted};
use super::instance::Instance;
use super::kernel::{Kernel, System};
use super::lifecycle::{Condition, Event, Phase, Readiness};
use super::reconcile::{Desired, Reconciler, Trigger};
use super::releases::Releases;
use super::source::StateRx;
use super::takeover::{self, Predecessor, Successors};
use super::{NodeConfig, NodeError, SAFETY_TICK};
use crate::admin;
use crate::datapath;
use crate::drain::{self, Mode};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::proxy::{self, Proxy};
use crate::record::DrainCounts;
use crate::state::{DesiredState, WorkloadIndex};
use crate::workloads::WorkloadFile;

/// The stop signal, pinned for the daemon's whole life.
pub(super) type Shutdown<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send)>;

/// What a daemon holds across its terms.
pub(super) struct Daemon {
    pub cfg: NodeConfig,
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
    pub desired: StateRx,
    /// The identities of the node's workloads, for the certificates' prefetch.
    pub identities: tokio::sync::watch::Sender<BTreeSet<Identity>>,
    /// The source's latest state (`None` before its first).
    pub state: Option<Arc<DesiredState>>,
    pub releases: Releases,
    pub ready: Readiness,
    pub instance: Option<Instance>,
    /// Tasks that live as long as the process (drop events): they stop with it.
    pub tasks: drain::Watcher,
    /// The redirection annotation of the node's pods (with Kubernetes only).
    pub annotations: Option<Annotations>,
    /// Pods this daemon last wanted annotated.
    pub annotated: BTreeSet<String>,
    /// What the CNI plugin handed over, and its socket's answers.
    pub cni: super::cni::Plugin,
    pub phase: Phase,
    /// The stop signal came.
    pub signalled: bool,
}

/// One stretch of serving.
pub(super) struct Term {
    reconciler: Reconciler<System>,
    /// The probe and metrics ports.
    admin: drain::Trigger,
    /// The proxy's listeners and connections: a graceful drain closes the listeners (and
    /// asks HBONE peers to go away), an immediate one cuts what is left.
    serve: drain::Trigger,
    proxy_task: tokio::task::JoinHandle<()>,
    successors: Option<Successors>,
    /// The cookies of this term's sockets, by slot.
    own_slots: Vec<Option<u64>>,
    /// Second fds of the listeners, to put them back into slots emptied behind this daemon.
    listeners: Vec<(Listener, bool, OwnedFd)>,
    /// The CNI plugin's socket, answered while this term serves.
    cni: Option<super::cni::Listening>,
}

/// What is left of a term once it no longer accepts.
struct Closed {
    admin: drain::Trigger,
    serve: drain::Trigger,
}

/// What a new desired state changed.
enum Followed {
    /// The source ended: the last state stays.
    Ended,
    /// Only the control plane's mesh: the proxy has it, the kernel has nothing to do.
    MeshOnly,
    Changed,
}

/// What the SOCKMAP slots say of a serving term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slots {
    Ours,
    /// A slot holds another daemon's socket.
    TakenOver,
    /// Some of this term's slots are empty, and no other daemon's socket is there (a
    /// successor that died right after taking over, an edit of the map).
    Lost,
}

impl Daemon {
    /// Lives until stopped; `fresh`: nothing of the node was pinned before this daemon (a
    /// start that fails then removes what it put into the kernel).
    pub async fn live(
        &mut self,
        mut shutdown: Shutdown<'_>,
        mut predecessor: Option<Predecessor>,
        fresh: bool,
    ) -> Result<(), NodeError> {
        let mut term: Option<Term> = None;
        let mut first = true;
        loop {
            let event = match self.phase {
                Phase::Starting => match self.start(&mut shutdown, predecessor.take()).await {
                    Ok(Some(t)) => {
                        term = Some(t);
                        Event::Started
                    }
                    Ok(None) => return super::undo_start(&self.cfg.node, fresh && first, Ok(())).await,
                    Err(e) => return super::undo_start(&self.cfg.node, fresh && first, Err(e)).await,
                },
                Phase::Serving => self.serve(term.as_mut().expect("a serving daemon has a term"), &mut shutdown).await,
                Phase::SteppingDown => {
                    self.step_down(term.take().expect("a daemon stepping down has a term"), &mut shutdown).await
                }
                Phase::Standby => self.standby(&mut shutdown).await,
                Phase::Draining => {
                    self.drain(term.take().expect("a draining daemon has a term")).await;
                    Event::Drained
                }
                Phase::Stopped => return Ok(()),
            };
            first = false;
            self.enter(event);
        }
    }

    /// Moves to the phase `event` leads to, telling the instance note and the log.
    fn enter(&mut self, event: Event) {
        let Some(next) = self.phase.next(event) else {
            tracing::error!(phase = self.phase.code(), ?event, "lifecycle: an event that cannot happen here; ignored");
            return;
        };
        tracing::debug!(from = self.phase.code(), to = next.code(), ?event, "lifecycle");
        self.phase = next;
        if let Some(i) = self.instance.as_mut() {
            i.set(next.into(), None);
        }
    }

    /// The start sequence: probes answer (503) at once; the datapath is loaded and attached
    /// ahead of any predecessor's; the first state is applied and reconciled; only then do
    /// the listeners go into the SOCKMAP, the moment this daemon serves (and takes the node
    /// over from a predecessor). `None`: stopped before the first state.
    async fn start(
        &mut self,
        shutdown: &mut Shutdown<'_>,
        predecessor: Option<Predecessor>,
    ) -> Result<Option<Term>, NodeError> {
        self.ready.unmet(Condition::PodsPlaced);
        self.ready.unmet(Condition::ListenersRegistered);
        self.ready.set_handing_over(false);
        let admin = self.serve_admin().await?;
        let listeners = proxy::bind_listeners()?;
        let mut reconciler = super::load_kernel(&self.cfg).await?;
        // The pods the plugin handed over so far are in the first pass.
        self.cni.reload();
        if let Some(events) = reconciler.kernel().dp.take_events() {
            super::drops::spawn(events, self.tasks.clone());
        }
        if !self.first_state(shutdown).await? {
            admin.stop(Duration::from_secs(1)).await;
            return Ok(None);
        }
        self.ready.met(Condition::FirstState);
        self.apply(&mut reconciler);
        reconciler.reconcile(Trigger::Safety).await?;
        self.confirm_releases(&mut reconciler);
        self.cni.mapped(reconciler.mapped(), &self.releases.effective(), &self.cfg.node);
        self.ready.met(Condition::PodsPlaced);
        if predecessor.is_some() && !self.ready_to_take_over(shutdown).await {
            admin.stop(Duration::from_secs(1)).await;
            return Ok(None);
        }
        let dups = listeners
            .iter()
            .map(|l| Ok((l.role, l.ipv6, l.socket.as_fd().try_clone_to_owned()?)))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(NodeError::Listeners)?;
        let fds: Vec<_> = dups.iter().map(|(r, v6, fd)| (*r, *v6, fd.as_fd())).collect();
        let own_slots = reconciler.register(&fds)?;
        drop(fds);
        // The plugin is answered by the daemon that serves: a successor takes the socket only
        // now, so one that fails before taking over leaves it with the serving daemon.
        let cni = self.cni.listen(&self.cfg.node);
        tracing::info!(count = listeners.len(), "proxy listeners registered in the SOCKMAP");
        let (serve, watcher) = drain::new();
        let proxy_task = tokio::spawn(self.proxy.clone().serve(listeners, watcher));
        if let Some(p) = predecessor {
            tokio::spawn(p.adopt_relays(self.proxy.clone()));
        }
        let successors = Successors::listen(&self.cfg.node, self.ready.clone())
            .inspect_err(|e| {
                tracing::warn!(
                    "a successor will find no handover channel (its takeover still works, without moving relays): {e}"
                )
            })
            .ok();
        self.ready.met(Condition::ListenersRegistered);
        self.annotate(&reconciler);
        if let Some(i) = self.instance.as_mut() {
            i.set(Phase::Serving.into(), Some(own_slots.iter().flatten().copied().collect()));
        }
        match self.ready.why_not() {
            None => tracing::info!(node = %self.cfg.node, control_plane = ?self.cfg.control_plane, "node ready"),
            Some(why) => tracing::info!(
                node = %self.cfg.node,
                control_plane = ?self.cfg.control_plane,
                "serving; not ready yet: {why}"
            ),
        }
        Ok(Some(Term { reconciler, admin, serve, proxy_task, successors, own_slots, listeners: dups, cni }))
    }

    /// A successor takes the node over only with what serving needs from a control plane
    /// (its first push, every local certificate): until then the predecessor serves on.
    /// `false` when the stop signal came first.
    async fn ready_to_take_over(&mut self, shutdown: &mut Shutdown<'_>) -> bool {
        let needed = [Condition::ControlPlaneSynced, Condition::Certificates];
        let mut told = false;
        loop {
            let missing: Vec<&str> = needed.iter().filter(|c| !self.ready.is_met(**c)).map(|c| c.code()).collect();
            if missing.is_empty() {
                return true;
            }
            if !told {
                tracing::info!(waiting_for = %missing.join(", "), "not taking the node over yet; the serving daemon serves on");
                told = true;
            }
            tokio::select! {
                _ = shutdown.as_mut() => {
                    self.signalled = true;
                    return false;
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Probes (`/healthz/ready`) and metrics, on their own trigger: a daemon taken over gives
    /// the ports up at once, for the successor's answers.
    async fn serve_admin(&self) -> Result<drain::Trigger, NodeError> {
        let probe = admin::bind(self.cfg.readiness_port).await?;
        let metrics = admin::bind(self.cfg.metrics_port).await?;
        let (trigger, watcher) = drain::new();
        let routes = admin::Routes { ready: Arc::new(self.ready.clone()), metrics: self.metrics.clone() };
        tokio::spawn(admin::serve(probe, routes.clone(), watcher.clone()));
        tokio::spawn(admin::serve(metrics, routes, watcher));
        Ok(trigger)
    }

    /// Waits for the source's first state; `false` when the stop signal came first.
    async fn first_state(&mut self, shutdown: &mut Shutdown<'_>) -> Result<bool, NodeError> {
        if self.state.is_some() {
            return Ok(true);
        }
        if self.desired.borrow().is_none() {
            tracing::info!(
                "waiting for the first full state (with Kubernetes: pods, namespaces, services, endpoint slices)"
            );
        }
        loop {
            let latest = self.desired.borrow_and_update().clone();
            if let Some(s) = latest {
                self.take_state(s);
                return Ok(true);
            }
            tokio::select! {
                _ = shutdown.as_mut() => {
                    self.signalled = true;
                    return Ok(false);
                }
                r = self.desired.changed() => r.map_err(|_| NodeError::Sync)?,
            }
        }
    }

    /// A new state from the source: releases it makes are held back ([`Releases`]).
    fn take_state(&mut self, state: Arc<DesiredState>) {
        let workloads = self.cni.merge(&state, &self.cfg.node);
        self.releases.update(workloads, tokio::time::Instant::now().into_std());
        self.state = Some(state);
    }

    /// The plugin handed a pod over or took one back: the state is merged with it again.
    fn follow_cni(&mut self, reconciler: &mut Reconciler<System>) {
        if let Some(state) = self.state.clone() {
            self.take_state(state);
            self.apply(reconciler);
        }
    }

    /// Hands the state (with the releases held back) to the proxy and the reconciler.
    fn apply(&self, reconciler: &mut Reconciler<System>) {
        let workloads = self.releases.effective();
        self.update_proxy(&workloads);
        reconciler.set_desired(Desired { file: workloads, held: self.releases.held(), ports: self.cni.ports.clone() });
    }

    /// Gives the proxy the index (a control plane's, or the one the workloads make) and the
    /// certificates' prefetch the node's identities.
    fn update_proxy(&self, workloads: &WorkloadFile) {
        let state = self.state.as_deref();
        let index = match state.and_then(|s| s.mesh.clone()) {
            Some(mesh) => mesh.captured_here(workloads.on_node(&self.cfg.node).flat_map(|w| w.ips.iter().copied())),
            None => {
                let (services, authorization) =
                    state.map(|s| (s.services.clone(), s.authorization.clone())).unwrap_or_default();
                let state =
                    DesiredState { workloads: workloads.clone(), services, authorization, ..Default::default() };
                WorkloadIndex::new(&state, &self.cfg.trust_domain)
            }
        };
        let local = super::local_identities(workloads, &self.cfg.node, &self.cfg.trust_domain);
        self.proxy.set_workloads(index, &local);
        self.identities.send_if_modified(|ids| {
            let changed = *ids != local;
            *ids = local;
            changed
        });
    }

    /// Ends the holds the last pass found gone; the proxy forgets them at once.
    fn confirm_releases(&mut self, reconciler: &mut Reconciler<System>) {
        let gone = reconciler.take_released();
        if self.releases.confirm(&gone) {
            self.apply(reconciler);
        }
    }

    /// Wants the annotation on every pod of this node whose IPs are all in the map behind
    /// its interface (this daemon serves: its listeners are registered), and off the ones it
    /// annotated before or that carry it but are not captured.
    fn annotate(&mut self, reconciler: &Reconciler<System>) {
        let Some(annotations) = &self.annotations else { return };
        let enrolled = reconciler.enrolled();
        let effective = self.releases.effective();
        let captured: BTreeSet<String> = effective
            .on_node(&self.cfg.node)
            .filter(|w| w.ips.iter().all(|ip| enrolled.contains(&ip.to_canonical())))
            .map(|w| w.id())
            .collect();
        let carrying = self.state.iter().flat_map(|s| s.annotated.iter()).filter(|(_, n)| **n == self.cfg.node);
        let mut wanted: Wanted = carrying.map(|(pod, _)| (pod.clone(), false)).collect();
        wanted.extend(self.annotated.iter().map(|pod| (pod.clone(), false)));
        wanted.extend(captured.iter().map(|pod| (pod.clone(), true)));
        annotations.want(wanted);
        self.annotated = captured;
    }

    /// Serves until the stop signal or a takeover: each change of the desired state or the
    /// kernel, each hold that ends and each safety tick ends in one reconcile pass; a failing
    /// pass is logged once per streak and retried.
    async fn serve(&mut self, term: &mut Term, shutdown: &mut Shutdown<'_>) -> Event {
        let mut safety = tokio::time::interval(SAFETY_TICK);
        safety.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        safety.reset();
        let mut slots = tokio::time::interval(takeover::WATCH);
        slots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut following, mut failing) = (true, false);
        // Set by a stop signal while a successor starts: serve until it takes over, or this.
        let mut stopping: Option<tokio::time::Instant> = None;
        loop {
            // The slots are watched closely only while a successor is on its way; the safety
            // tick catches one that never said hello.
            let watching = stopping.is_some() || term.successors.as_ref().is_some_and(Successors::pending);
            let hold_ends = self.releases.next_deadline().map(tokio::time::Instant::from_std);
            let trigger = tokio::select! {
                _ = shutdown.as_mut(), if stopping.is_none() => match self.on_stop(term) {
                    Ok(event) => return event,
                    Err(wait_until) => {
                        stopping = Some(wait_until);
                        continue;
                    }
                },
                _ = slots.tick(), if watching => {
                    if let Some(event) = self.watch_slots(term, stopping) {
                        return event;
                    }
                    continue;
                }
                _ = safety.tick() => {
                    if self.check_slots(term) == Slots::TakenOver {
                        return Event::TakenOver { signalled: false };
                    }
                    // Only the daemon answering the plugin writes the node's file.
                    if term.cni.as_ref().is_some_and(super::cni::Listening::owns) {
                        self.cni.prune();
                    }
                    Trigger::Safety
                }
                () = self.cni.changed() => {
                    self.follow_cni(&mut term.reconciler);
                    Trigger::Change
                }
                _ = super::sleep_until(hold_ends) => {
                    self.releases.expire(tokio::time::Instant::now().into_std());
                    self.apply(&mut term.reconciler);
                    Trigger::Change
                }
                () = hello(term.successors.as_ref()) => continue,
                _ = term.reconciler.kernel_changed() => Trigger::Change,
                changed = self.desired.changed(), if following => {
                    match self.on_desired(changed.is_ok(), &mut term.reconciler) {
                        Followed::Ended => following = false,
                        Followed::MeshOnly => continue,
                        Followed::Changed => {}
                    }
                    Trigger::Change
                }
            };
            failing = self.pass(term, trigger, failing).await;
        }
    }

    /// The stop signal while serving: taken over already, stop now, or (`Err`) wait until
    /// this deadline for a successor on its way.
    fn on_stop(&mut self, term: &mut Term) -> Result<Event, tokio::time::Instant> {
        self.signalled = true;
        if self.check_slots(term) == Slots::TakenOver {
            return Ok(Event::TakenOver { signalled: true });
        }
        if !term.successors.as_ref().is_some_and(Successors::pending) {
            return Ok(Event::Stop);
        }
        tracing::info!(wait = ?self.cfg.drain_timeout, "stop signal while a successor starts: serving until it takes over");
        Err(tokio::time::Instant::now() + self.cfg.drain_timeout)
    }

    /// A look at the slots while a successor is on its way (or the stop signal waits for it).
    fn watch_slots(&mut self, term: &mut Term, stopping: Option<tokio::time::Instant>) -> Option<Event> {
        if self.check_slots(term) == Slots::TakenOver {
            return Some(Event::TakenOver { signalled: stopping.is_some() });
        }
        if stopping.is_some_and(|at| tokio::time::Instant::now() >= at) {
            tracing::warn!("the successor did not take over in time; stopping without it");
            return Some(Event::Stop);
        }
        None
    }

    /// A new desired state (or the source's end). A change of the control plane's mesh
    /// alone goes to the proxy only: the kernel's part follows the node's pods.
    fn on_desired(&mut self, changed: bool, reconciler: &mut Reconciler<System>) -> Followed {
        if !changed {
            tracing::error!("the source of the desired state stopped; keeping the last state");
            return Followed::Ended;
        }
        let Some(state) = self.desired.borrow_and_update().clone() else { return Followed::Changed };
        let mesh_only = self.state.as_deref().is_some_and(|old| {
            old.workloads == state.workloads && old.annotated == state.annotated && old.decided == state.decided
        });
        if mesh_only {
            self.state = Some(state);
            self.update_proxy(&self.releases.effective());
            return Followed::MeshOnly;
        }
        self.take_state(state);
        self.apply(reconciler);
        Followed::Changed
    }

    /// What the slots say of this term. Slots emptied behind it (a successor that died as
    /// it took over, someone's edit of the map) get its listeners back, and the handover
    /// socket, which a dead successor may have taken, is listened on again.
    fn check_slots(&mut self, term: &mut Term) -> Slots {
        let slots = term.slots();
        if slots == Slots::Lost {
            match term.reregister() {
                Ok(()) => tracing::warn!(
                    "listener slots were emptied behind this daemon (a successor that died as it took over?); registered its listeners again"
                ),
                Err(e) => tracing::error!("registering the listeners again failed: {e}"),
            }
            term.successors = Successors::listen(&self.cfg.node, self.ready.clone())
                .inspect_err(|e| tracing::warn!("listening on the handover socket again failed: {e}"))
                .ok();
            term.cni = self.cni.listen(&self.cfg.node);
        }
        slots
    }

    /// One reconcile pass; whether it failed (a failure streak is logged once).
    async fn pass(&mut self, term: &mut Term, trigger: Trigger, failing: bool) -> bool {
        // During a takeover the other daemon answers the plugin and writes the node's file:
        // read before every pass, so a full one never unmaps a pod handed over to it.
        self.cni.reload();
        if self.cni.pending() {
            self.follow_cni(&mut term.reconciler);
        }
        match term.reconciler.reconcile(trigger).await {
            Ok(()) => {
                if failing {
                    tracing::info!("reconcile recovered: the kernel matches the desired state again");
                }
                self.confirm_releases(&mut term.reconciler);
                self.annotate(&term.reconciler);
                self.cni.mapped(term.reconciler.mapped(), &self.releases.effective(), &self.cfg.node);
                false
            }
            Err(e) => {
                if !failing {
                    tracing::error!("reconcile failed (retrying on the next change or within {SAFETY_TICK:?}): {e}");
                }
                true
            }
        }
    }

    /// A daemon taken over: gives up its probe ports, keeps accepting what its listeners
    /// still queue for [`takeover::LINGER`], closes them and its program links (the
    /// successor's run ahead of them), hands its plain relays over and lets the rest finish.
    /// Should the node be left unserved meanwhile (the successor died), it stops there and
    /// starts serving again.
    async fn step_down(&mut self, mut term: Term, shutdown: &mut Shutdown<'_>) -> Event {
        self.ready.unmet(Condition::ListenersRegistered);
        term.admin.start(Mode::Graceful);
        tracing::info!(
            linger = ?takeover::LINGER,
            "taken over: new connections go to the successor; accepting what is still queued here, then draining"
        );
        let node = self.cfg.node.clone();
        let proxy = self.proxy.clone();
        let timeout = self.cfg.drain_timeout;
        let successors = term.successors.take();
        let work = async move {
            tokio::time::sleep(takeover::LINGER).await;
            let closed = term.close().await;
            hand_over_and_drain(&proxy, &closed.serve, successors, timeout).await
        };
        tokio::pin!(work);
        loop {
            tokio::select! {
                drained = &mut work => {
                    self.proxy.count_drained(&drained);
                    return Event::SteppedDown { signalled: self.signalled };
                }
                () = unserved(&node) => {
                    tracing::warn!("the node has no serving daemon any more (the successor died?): serving it again");
                    return Event::Unserved;
                }
                _ = shutdown.as_mut(), if !self.signalled => self.signalled = true,
            }
        }
    }

    /// Stepped down: waits for the stop signal, and serves again if the node is left
    /// unserved.
    async fn standby(&mut self, shutdown: &mut Shutdown<'_>) -> Event {
        tracing::info!(
            "taken over and drained; waiting for the stop signal (kubelet sends it once the successor is ready)"
        );
        tokio::select! {
            _ = shutdown.as_mut() => {
                tracing::info!("stopped after a takeover; the successor serves the node");
                Event::Stop
            }
            () = unserved(&self.cfg.node) => {
                tracing::warn!("the node has no serving daemon any more (the successor died?): serving it again");
                Event::Unserved
            }
        }
    }

    /// Stopping with no successor: listeners close at once (new connections are dropped,
    /// fail closed), open ones may finish until the drain deadline.
    async fn drain(&mut self, mut term: Term) {
        self.ready.unmet(Condition::ListenersRegistered);
        if let Some(s) = term.successors.take() {
            s.close();
        }
        let closed = term.close().await;
        let drained = super::drain(&self.proxy, &closed.serve, self.cfg.drain_timeout, 0).await;
        self.proxy.count_drained(&drained);
        closed.admin.stop(Duration::from_secs(1)).await;
        tracing::info!(
            pin_dir = %datapath::node_pin_dir(&self.cfg.node).map(|p| p.display().to_string()).unwrap_or_default(),
            "stopped; the datapath stays pinned and drops enrolled traffic until a daemon takes over (`meshpath uninstall` removes it)"
        );
    }
}

impl Term {
    /// What the slots say of this term. Also notices a successor that went away before
    /// taking over (and pins this daemon's links again).
    fn slots(&mut self) -> Slots {
        if let Some(s) = &self.successors
            && s.went_away()
        {
            match self.reconciler.kernel().dp.reclaim_pins() {
                Ok(n) => tracing::info!(links = n, "pinned this daemon's links again in place of the successor's"),
                Err(e) => tracing::error!("pinning this daemon's links again failed: {e}"),
            }
        }
        match self.reconciler.kernel().listener_cookies() {
            Ok(now) => classify(&now, &self.own_slots),
            Err(e) => {
                tracing::debug!("reading the listener slots: {e}");
                Slots::Ours
            }
        }
    }

    /// Puts this term's listeners back into their slots.
    fn reregister(&mut self) -> Result<(), super::kernel::KernelError> {
        let fds: Vec<_> = self.listeners.iter().map(|(r, v6, fd)| (*r, *v6, fd.as_fd())).collect();
        self.reconciler.register(&fds).map(|_| ())
    }

    /// Stops accepting (the listeners close, and leave the SOCKMAP; HBONE peers are asked
    /// to go away) and closes the program links; what is open keeps going, under the
    /// returned triggers.
    async fn close(self) -> Closed {
        // The second fds first: the listeners must close with the accept loops.
        drop(self.listeners);
        self.serve.start(Mode::Graceful);
        let _ = self.proxy_task.await;
        drop(self.reconciler);
        Closed { admin: self.admin, serve: self.serve }
    }
}

/// The slots `now` against this term's `own`, slot by slot.
fn classify(now: &[Option<u64>], own: &[Option<u64>]) -> Slots {
    let pairs = || now.iter().zip(own);
    if pairs().any(|(n, o)| n.is_some() && n != o) {
        Slots::TakenOver
    } else if pairs().any(|(n, o)| o.is_some() && n.is_none()) {
        Slots::Lost
    } else {
        Slots::Ours
    }
}

/// Hands the plain relays to the successor (if one said hello) and drains the rest.
async fn hand_over_and_drain(
    proxy: &Arc<Proxy>,
    serve: &drain::Trigger,
    successors: Option<Successors>,
    timeout: Duration,
) -> DrainCounts {
    let open = proxy.open_connections();
    let sender = successors.and_then(|s| s.take()).map(|successor| {
        let (outbox, relays) = tokio::sync::mpsc::channel(64);
        proxy.hand_over_relays(outbox);
        tokio::spawn(async move {
            let n = successor.hand_over(relays).await;
            (successor, n)
        })
    });
    let mut drained = super::drain(proxy, serve, timeout, open).await;
    // No relay moves after the deadline: the channel closes, and the successor learns what
    // became of the rest.
    proxy.stop_handing_over();
    if let Some(Ok((successor, n))) = match sender {
        Some(task) => Some(task.await),
        None => None,
    } {
        drained.handed_over = n;
        drained.finished = drained.finished.saturating_sub(n);
        successor.report(&drained).await;
    }
    tracing::info!(
        handed_over = drained.handed_over,
        finished = drained.finished,
        cut = drained.cut,
        "stepped down: plain relays moved to the successor, the rest finished or were cut"
    );
    drained
}

/// Resolves once no slot of the node holds a socket (for two looks in a row: a successor
/// that dies takes its sockets along at once).
async fn unserved(node: &str) {
    let mut empty = 0;
    loop {
        tokio::time::sleep(takeover::WATCH).await;
        let none = datapath::pinned_listener_cookies(node).is_ok_and(|s| s.iter().all(Option::is_none));
        empty = if none { empty + 1 } else { 0 };
        if empty >= 2 {
            return;
        }
    }
}

/// Resolves at a successor's hello; never without a handover socket.
async fn hello(successors: Option<&Successors>) {
    match successors {
        Some(s) => s.hello().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_tell_a_takeover_from_a_loss() {
        let own = [Some(1), Some(2), None];
        assert_eq!(classify(&[Some(1), Some(2), None], &own), Slots::Ours);
        assert_eq!(classify(&[Some(7), Some(8), None], &own), Slots::TakenOver);
        // A successor that registered some slots only, then died: still another's.
        assert_eq!(classify(&[Some(7), None, None], &own), Slots::TakenOver);
        assert_eq!(classify(&[None, None, None], &own), Slots::Lost);
        assert_eq!(classify(&[Some(1), None, None], &own), Slots::Lost);
        // A slot this daemon never filled (no IPv6) that stays empty is no loss.
        assert_eq!(classify(&[Some(1), Some(2), None], &[Some(1), Some(2), None]), Slots::Ours);
    }
}
