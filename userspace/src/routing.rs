//! The node's kernel routing state meshpath owns, managed over rtnetlink (no `ip`
//! subprocesses): the capture rule and local table, the NAT rule and its table of enrolled
//! IPs, plus interface discovery.
//!
//! Captured packets carry [`CAPTURE_MARK`]; the rule sends them to [`ROUTE_TABLE`], whose
//! only route is `local default dev lo`, so they are delivered to this host even when their
//! destination is a pod or another node. sk_lookup then picks the proxy's socket.
//!
//! Other TCP carries [`NAT_MARK`]; its rule looks in [`NAT_ROUTE_TABLE`], which holds a
//! local route per enrolled IP of this node: what a NAT turned toward one of those is
//! delivered to this host too, everything else falls through to the node's own rules.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use meshpath_common::names::{
    CAPTURE_MARK, CAPTURE_MASK, NAT_MARK, NAT_MASK, NAT_ROUTE_TABLE, NAT_RULE_PRIORITY, ROUTE_TABLE, RULE_PRIORITY,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("netlink {what}: {source}")]
    Netlink { what: String, source: rtnetlink::Error },
    #[error("no interface named {0}")]
    NoSuchInterface(String),
}

type Result<T, E = RoutingError> = std::result::Result<T, E>;

/// Route lookups [`Routing::interfaces_for`] (and route writes of the NAT table) keeps in
/// flight at once.
const LOOKUPS_IN_FLIGHT: usize = 64;

/// meshpath's rules: (priority, table, mark, mask).
const RULES: [(u32, u32, u32, u32); 2] = [
    (RULE_PRIORITY, ROUTE_TABLE, CAPTURE_MARK, CAPTURE_MASK),
    (NAT_RULE_PRIORITY, NAT_ROUTE_TABLE, NAT_MARK, NAT_MASK),
];

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let what = what.into();
    move |source| RoutingError::Netlink { what, source }
}

/// The errno inside a netlink error, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

const EEXIST: i32 = libc::EEXIST;
const ENOENT: i32 = libc::ENOENT;
const ESRCH: i32 = libc::ESRCH;
const ENETUNREACH: i32 = libc::ENETUNREACH;
const EHOSTUNREACH: i32 = libc::EHOSTUNREACH;

/// Route notifications as the netlink connection hands them over.
type Notifications = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A netlink connection in the calling thread's network namespace; with [`Routing::watch`],
/// also subscribed to changes of links, addresses, routes and rules, so the daemon acts when
/// something changed instead of looking every tick.
pub struct Routing {
    handle: Handle,
    notifications: Option<Notifications>,
    /// Notifications [`Routing::changed`] took, for the next [`Routing::changes`].
    pending: Vec<rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>>,
    pending_lost: bool,
}

/// An interface of this namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub loopback: bool,
    /// Administratively up with a carrier. IPv4 routes through an interface vanish when it
    /// goes down, without a route notification: callers compare this too.
    pub up: bool,
    /// Frames carry an Ethernet header (ARPHRD_ETHER); otherwise IP starts at offset 0.
    pub ethernet: bool,
    /// Its addresses, both families.
    pub addresses: Vec<IpAddr>,
    /// Enslaved to a bridge or bond (IFLA_MASTER), or the lower device of a VLAN or
    /// macvlan here: its traffic belongs to the device above, where its routes are.
    pub lower: bool,
    /// A Linux bridge.
    pub bridge: bool,
    /// The bridge or bond it is enslaved to (IFLA_MASTER).
    pub master: Option<u32>,
    /// For a veth whose peer is in another namespace: where that peer is.
    pub peer: Option<Peer>,
    /// Its link-layer address, when it has a 6-byte one.
    pub mac: Option<[u8; 6]>,
}

/// A veth's peer in another namespace, as this namespace names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The peer's ifindex in its namespace (IFLA_LINK).
    pub index: u32,
    /// Its namespace's id as this namespace numbers it (IFLA_LINK_NETNSID; see
    /// [`Routing::nsid_of`]).
    pub netns: i32,
}

/// A veth's peer in another namespace, from its IFLA_LINK and IFLA_LINK_NETNSID. A negative
/// id is the kernel's "none assigned": such a peer cannot be told apart from any other
/// namespace's interface of that index.
fn veth_peer(veth: bool, link: Option<u32>, netns: Option<i32>) -> Option<Peer> {
    match (link, netns) {
        (Some(index), Some(netns)) if veth && netns >= 0 => Some(Peer { index, netns }),
        _ => None,
    }
}

/// What the kernel announced since the last look.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Routes to these destinations (outside meshpath's table) were added, changed or removed.
    pub destinations: Vec<IpNet>,
    /// meshpath's rule or its table changed (or some rule did).
    pub capture: bool,
    /// An interface or an address came, went or changed.
    pub interfaces: bool,
    /// Notifications were lost (a full socket buffer, a dead socket): anything may have changed.
    pub lost: bool,
}

impl Changes {
    /// Adds `other`'s changes to these.
    pub fn merge(&mut self, other: Changes) {
        self.destinations.extend(other.destinations);
        self.capture |= other.capture;
        self.interfaces |= other.interfaces;
        self.lost |= other.lost;
    }

    pub fn any(&self) -> bool {
        !self.destinations.is_empty() || self.capture || self.interfaces || self.lost
    }
}

impl Routing {
    /// Opens the connection; must be called inside a tokio runtime.
    pub fn connect() -> Result<Self> {
        // Strict checking lets the kernel filter route dumps by table (Linux 4.20+): without
        // it, checking our two routes every tick dumps every route of the node, which with
        // thousands of pod routes is most of the daemon's idle CPU.
        let (conn, handle, _) = match rtnetlink::new_connection_with_strict_check() {
            Ok(c) => c,
            Err(e) => {
                // Before 4.20: unfiltered dumps, filtered here (see `table_routes`).
                tracing::debug!(error = %e, "no strict netlink checking; route dumps are filtered in user space");
                rtnetlink::new_connection().map_err(RoutingError::Connect)?
            }
        };
        tokio::spawn(conn);
        Ok(Self { handle, notifications: None, pending: Vec::new(), pending_lost: false })
    }

    /// Subscribes to changes of links, addresses, routes and rules (both families), on a
    /// socket of their own: a burst of notifications (thousands of pod routes at once) must
    /// not crowd out the replies to requests, which the kernel would drop just the same.
    pub fn watch(&mut self) -> Result<()> {
        use rtnetlink::sys::AsyncSocket as _;
        let (mut conn, _, notifications) = rtnetlink::new_connection().map_err(RoutingError::Connect)?;
        let socket = conn.socket_mut().socket_mut();
        // Nothing is ever sent on this socket, so it is bound here rather than on first use.
        socket.bind_auto().map_err(RoutingError::Connect)?;
        for group in [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_IPV4_IFADDR,
            libc::RTNLGRP_IPV6_IFADDR,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_IPV6_ROUTE,
            libc::RTNLGRP_IPV4_RULE,
            libc::RTNLGRP_IPV6_RULE,
        ] {
            socket.add_membership(group).map_err(RoutingError::Connect)?;
        }
        tokio::spawn(conn);
        self.notifications = Some(notifications);
        Ok(())
    }

    /// Waits until the kernel announces a change (forever when not watching); the change is
    /// kept for the next [`Self::changes`].
    pub async fn changed(&mut self) {
        use futures::StreamExt as _;
        let Some(n) = self.notifications.as_mut() else { return std::future::pending().await };
        match n.next().await {
            Some(m) => self.pending.push(m.0),
            // The watching connection ended: the next `changes` notices and re-subscribes.
            None => self.pending_lost = true,
        }
    }

    /// What changed since the last call, without waiting. Nothing when not watching.
    pub fn changes(&mut self) -> Changes {
        use rtnetlink::packet_core::NetlinkPayload;
        use rtnetlink::packet_route::RouteNetlinkMessage as M;
        let mut out = Changes { lost: std::mem::take(&mut self.pending_lost), ..Changes::default() };
        let mut messages = std::mem::take(&mut self.pending);
        if let Some(n) = self.notifications.as_mut() {
            loop {
                match n.try_recv() {
                    Ok((m, _)) => messages.push(m),
                    Err(e) if e.is_empty() => break,
                    Err(_) => {
                        out.lost = true;
                        break;
                    }
                }
            }
        }
        if out.lost && self.notifications.is_some() {
            // The watching connection ended (a socket error): watch anew, and treat
            // whatever happened meanwhile as unknown.
            tracing::warn!("routing notifications stopped; subscribing again");
            self.notifications = None;
            if let Err(e) = self.watch() {
                tracing::warn!(error = %e, "cannot follow routing changes; cached routes are re-checked on the safety tick instead");
            }
        }
        for msg in messages {
            match msg.payload {
                NetlinkPayload::InnerMessage(M::NewRoute(r) | M::DelRoute(r))
                    if matches!(route_table(&r), ROUTE_TABLE | NAT_ROUTE_TABLE) =>
                {
                    out.capture = true;
                }
                NetlinkPayload::InnerMessage(M::NewRoute(r) | M::DelRoute(r)) => {
                    out.destinations.extend(destination(&r))
                }
                NetlinkPayload::InnerMessage(M::NewRule(_) | M::DelRule(_)) => out.capture = true,
                NetlinkPayload::InnerMessage(
                    M::NewLink(_) | M::DelLink(_) | M::SetLink(_) | M::NewAddress(_) | M::DelAddress(_),
                ) => out.interfaces = true,
                NetlinkPayload::Overrun(_) => out.lost = true,
                _ => {}
            }
        }
        out
    }

    pub async fn interfaces(&self) -> Result<Vec<Interface>> {
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        // Devices stacked on a lower one in this namespace (a veth's peer elsewhere names
        // its namespace, and is no upper).
        let mut uppers_of = std::collections::BTreeSet::new();
        while let Some(msg) = links.try_next().await.map_err(nl("listing links"))? {
            let (mut name, mut master, mut link, mut netns) = (None, None, None, None);
            let (mut veth, mut bridge, mut mac) = (false, false, None);
            for a in &msg.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::Controller(m) => master = Some(*m),
                    LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                    LinkAttribute::Link(i) => link = Some(*i),
                    LinkAttribute::LinkNetNsId(id) => netns = Some(*id),
                    LinkAttribute::LinkInfo(info) => {
                        veth = info.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                        bridge = info.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
                    }
                    _ => {}
                }
            }
            // A veth's link is its peer, not a device it is stacked on; a device naming itself
            // as its link (some drivers do) is no lower device either.
            if let (Some(lower), None, false) = (link, netns, veth)
                && lower != msg.header.index
            {
                uppers_of.insert(lower);
            }
            if let Some(name) = name {
                out.push(Interface {
                    index: msg.header.index,
                    name,
                    loopback: msg.header.flags.contains(LinkFlags::Loopback),
                    up: msg.header.flags.contains(LinkFlags::Up) && msg.header.flags.contains(LinkFlags::LowerUp),
                    ethernet: msg.header.link_layer_type == LinkLayerType::Ether,
                    addresses: Vec::new(),
                    lower: master.is_some(),
                    bridge,
                    master,
                    peer: veth_peer(veth, link, netns),
                    mac,
                });
            }
        }
        for i in &mut out {
            i.lower |= uppers_of.contains(&i.index);
        }
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs.try_next().await.map_err(nl("listing addresses"))? {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let (Some(ip), Some(i)) = (ip, out.iter_mut().find(|i| i.index == msg.header.index)) {
                i.addresses.push(ip);
            }
        }
        Ok(out)
    }

    /// The id this connection's namespace gives the namespace `ns` (an open namespace file)
    /// is, if it gives it one (RTM_GETNSID). The kernel assigns one when a link whose peer is
    /// there is listed here, so every namespace a [`Peer`] of [`Self::interfaces`] names has
    /// one; asking does not assign any.
    pub async fn nsid_of(&self, ns: std::os::fd::BorrowedFd<'_>) -> Result<Option<i32>> {
        use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
        use rtnetlink::packet_route::RouteNetlinkMessage as M;
        use rtnetlink::packet_route::nsid::{NsidAttribute, NsidMessage};
        use std::os::fd::AsRawFd as _;
        let what = || nl("asking a namespace's id");
        let mut msg = NsidMessage::default();
        // An open descriptor is never negative.
        msg.attributes.push(NsidAttribute::Fd(ns.as_raw_fd().unsigned_abs()));
        let mut req = NetlinkMessage::from(M::GetNsId(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut replies = self.handle.clone().request(req).map_err(what())?;
        let mut id = None;
        while let Some(reply) = futures::StreamExt::next(&mut replies).await {
            match reply.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(what()(rtnetlink::Error::NetlinkError(e))),
                NetlinkPayload::InnerMessage(M::NewNsId(m)) => {
                    id = m.attributes.iter().find_map(|a| match a {
                        NsidAttribute::Id(i) if *i >= 0 => Some(*i),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        Ok(id)
    }

    /// The interface the kernel routes `ip` through (what `ip route get <ip>` says), if the
    /// route is a device route and not via a gateway. This is how a pod's host-side veth
    /// is found without guessing from names.
    pub async fn interface_for(&self, ip: IpAddr) -> Result<Option<u32>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(ip);
        msg.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
        msg.attributes.push(RouteAttribute::Destination(ip.into()));
        let mut routes = self.handle.route().get(msg).execute();
        let route = match routes.try_next().await {
            Ok(r) => r,
            Err(e) if matches!(errno(&e), Some(ENETUNREACH | EHOSTUNREACH | ESRCH | ENOENT)) => return Ok(None),
            Err(e) => return Err(nl(format!("route lookup for {ip}"))(e)),
        };
        let Some(route) = route else { return Ok(None) };
        if route.header.kind != RouteType::Unicast {
            return Ok(None);
        }
        let mut oif = None;
        for a in &route.attributes {
            match a {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => return Ok(None),
                _ => {}
            }
        }
        Ok(oif)
    }

    /// [`Self::interface_for`] for many IPs, with up to [`LOOKUPS_IN_FLIGHT`] requests
    /// outstanding: one at a time, each lookup costs a few thread wake-ups between the
    /// caller and the netlink task, which at 10 000 workloads is most of a full pass.
    pub async fn interfaces_for(&self, ips: impl IntoIterator<Item = IpAddr>) -> Result<BTreeMap<IpAddr, Option<u32>>> {
        use futures::StreamExt as _;
        futures::stream::iter(ips)
            .map(|ip| async move { self.interface_for(ip).await.map(|r| (ip, r)) })
            .buffer_unordered(LOOKUPS_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    async fn loopback_index(&self) -> Result<u32> {
        self.interfaces()
            .await?
            .into_iter()
            .find(|i| i.loopback)
            .map(|i| i.index)
            .ok_or_else(|| RoutingError::NoSuchInterface("lo".into()))
    }

    /// Installs the capture and NAT rules and the local routes of [`ROUTE_TABLE`] for both
    /// families. Idempotent: what already exists is kept. Returns whether anything was missing.
    pub async fn install_capture(&self) -> Result<bool> {
        // Two rules and one local route per family.
        const COMPLETE: usize = 6;
        let present = self.capture_rules().await?.len() + self.table_routes(ROUTE_TABLE).await?.len();
        if present >= COMPLETE {
            return Ok(false);
        }
        if present > 0 {
            tracing::warn!(present, "capture rules or routes were removed behind meshpath's back; restoring them");
        }
        let lo = self.loopback_index().await?;
        for v6 in [false, true] {
            let fam = if v6 { "IPv6" } else { "IPv4" };
            for (priority, table, mark, mask) in RULES {
                let rule = self.handle.rule().add().priority(priority).table_id(table).action(RuleAction::ToTable);
                let added = if v6 {
                    let mut r = rule.v6().fw_mark(mark);
                    r.message_mut().attributes.push(RuleAttribute::FwMask(mask));
                    r.execute().await
                } else {
                    let mut r = rule.v4().fw_mark(mark);
                    r.message_mut().attributes.push(RuleAttribute::FwMask(mask));
                    r.execute().await
                };
                ok_if_exists(added).map_err(nl(format!("adding the {fam} rule for table {table}")))?;
            }
            let route = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(Ipv6Addr::UNSPECIFIED, 0).build_local(lo)
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(Ipv4Addr::UNSPECIFIED, 0).build_local(lo)
            };
            ok_if_exists(self.handle.route().add(route).execute().await)
                .map_err(nl(format!("adding the {fam} local route to table {ROUTE_TABLE}")))?;
        }
        tracing::info!(
            mark = format_args!("{CAPTURE_MARK:#x}/{CAPTURE_MASK:#x}"),
            table = ROUTE_TABLE,
            priority = RULE_PRIORITY,
            nat_mark = format_args!("{NAT_MARK:#x}/{NAT_MASK:#x}"),
            nat_table = NAT_ROUTE_TABLE,
            nat_priority = NAT_RULE_PRIORITY,
            "capture and NAT rules and local routes in place"
        );
        Ok(true)
    }

    /// The IPs [`NAT_ROUTE_TABLE`] holds a local host route for. Any other route found there
    /// (meshpath writes none) is deleted: it would deliver to this host what a NAT turns
    /// toward addresses sk_lookup does not steer.
    pub async fn nat_routes(&self) -> Result<std::collections::BTreeSet<IpAddr>> {
        let mut hosts = std::collections::BTreeSet::new();
        for r in self.table_routes(NAT_ROUTE_TABLE).await? {
            match destination(&r) {
                Some(net) if net.prefix_len() == net.max_prefix_len() && r.header.kind == RouteType::Local => {
                    hosts.insert(net.addr());
                }
                net => {
                    let shown = net.map_or_else(|| "?".to_owned(), |n| n.to_string());
                    tracing::warn!(route = %shown, table = NAT_ROUTE_TABLE, "deleting a route meshpath did not write");
                    ok_if_missing(self.handle.route().del(r).execute().await)
                        .map_err(nl(format!("deleting the route to {shown} in table {NAT_ROUTE_TABLE}")))?;
                }
            }
        }
        Ok(hosts)
    }

    /// Adds (or, with `add` false, deletes) the local route of each of `ips` in
    /// [`NAT_ROUTE_TABLE`]. Idempotent.
    pub async fn set_nat_routes(&self, ips: &[IpAddr], add: bool) -> Result<()> {
        use futures::StreamExt as _;
        let lo = self.loopback_index().await?;
        let writes = futures::stream::iter(ips.iter().copied())
            .map(|ip| {
                let route = match ip {
                    IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(a, 32).nat_local(lo),
                    IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(a, 128).nat_local(lo),
                };
                let handle = self.handle.clone();
                async move {
                    let done = if add {
                        ok_if_exists(handle.route().add(route).execute().await)
                    } else {
                        ok_if_missing(handle.route().del(route).execute().await)
                    };
                    let what = if add { "adding" } else { "deleting" };
                    done.map_err(nl(format!("{what} the local route of {ip} in table {NAT_ROUTE_TABLE}")))
                }
            })
            .buffer_unordered(LOOKUPS_IN_FLIGHT);
        futures::pin_mut!(writes);
        while let Some(r) = writes.next().await {
            r?;
        }
        Ok(())
    }

    /// Deletes the clsact qdisc of `ifindex` (with whatever filters it still holds).
    pub async fn delete_clsact(&self, ifindex: u32) -> Result<()> {
        use rtnetlink::packet_route::tc::TcHandle;
        let handle = self.handle.clone();
        let mut req = handle.qdisc().del(ifindex as i32);
        req.message_mut().header.parent = TcHandle::CLSACT;
        req.message_mut().header.handle = TcHandle { major: 0xffff, minor: 0 };
        ok_if_missing(req.execute().await).map_err(nl(format!("deleting the clsact qdisc of ifindex {ifindex}")))
    }

    /// meshpath's rules (by priority and table, [`RULES`]) in both families.
    pub async fn capture_rules(&self) -> Result<Vec<RuleMessage>> {
        let mut out = Vec::new();
        for v in [IpVersion::V4, IpVersion::V6] {
            let mut rules = self.handle.rule().get(v).execute();
            while let Some(r) = rules.try_next().await.map_err(nl("listing rules"))? {
                if is_capture_rule(&r) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// Routes in `table`, both families.
    async fn table_routes(&self, table: u32) -> Result<Vec<RouteMessage>> {
        let mut out = Vec::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = fam;
            msg.attributes.push(RouteAttribute::Table(table));
            let mut routes = self.handle.route().get(msg).execute();
            while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
                // Kernels without strict dump filtering send every table: keep checking.
                if route_table(&r) == table {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// Removes meshpath's rules and its tables' routes. Returns how many were removed.
    pub async fn remove_capture(&self) -> Result<(usize, usize)> {
        let rules = self.capture_rules().await?;
        let n_rules = rules.len();
        for r in rules {
            ok_if_missing(self.handle.rule().del(r).execute().await).map_err(nl("deleting a capture rule"))?;
        }
        let mut n_routes = 0;
        for table in [ROUTE_TABLE, NAT_ROUTE_TABLE] {
            for r in self.table_routes(table).await? {
                ok_if_missing(self.handle.route().del(r).execute().await)
                    .map_err(nl(format!("deleting a route of table {table}")))?;
                n_routes += 1;
            }
        }
        Ok((n_rules, n_routes))
    }
}

/// A route's destination prefix (`0.0.0.0/0` or `::/0` when it has none: a default route).
fn destination(r: &RouteMessage) -> Option<IpNet> {
    use rtnetlink::packet_route::route::RouteAddress;
    let len = r.header.destination_prefix_length;
    let addr = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    });
    let addr = match (addr, r.header.address_family) {
        (Some(a), _) => a,
        (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    IpNet::new(addr, len).ok()
}

trait BuildLocal {
    /// A local route in [`ROUTE_TABLE`].
    fn build_local(self, lo: u32) -> RouteMessage;
    /// A local route in [`NAT_ROUTE_TABLE`].
    fn nat_local(self, lo: u32) -> RouteMessage;
}

impl<T> BuildLocal for RouteMessageBuilder<T> {
    fn build_local(self, lo: u32) -> RouteMessage {
        self.table_id(ROUTE_TABLE).kind(RouteType::Local).scope(RouteScope::Host).output_interface(lo).build()
    }

    fn nat_local(self, lo: u32) -> RouteMessage {
        self.table_id(NAT_ROUTE_TABLE).kind(RouteType::Local).scope(RouteScope::Host).output_interface(lo).build()
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 }
}

fn is_capture_rule(r: &RuleMessage) -> bool {
    let attr = |f: fn(&RuleAttribute) -> Option<u32>| r.attributes.iter().find_map(f);
    let table =
        attr(|a| if let RuleAttribute::Table(t) = a { Some(*t) } else { None }).unwrap_or(r.header.table as u32);
    let prio = attr(|a| if let RuleAttribute::Priority(p) = a { Some(*p) } else { None });
    RULES.iter().any(|(p, t, _, _)| table == *t && prio == Some(*p))
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(r.header.table as u32)
}

fn ok_if_exists(r: std::result::Result<(), rtnetlink::Error>) -> std::result::Result<(), rtnetlink::Error> {
    match r {
        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
        other => other,
    }
}

fn ok_if_missing(r: std::result::Result<(), rtnetlink::Error>) -> std::result::Result<(), rtnetlink::Error> {
    match r {
        Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH)) => Ok(()),
        other => other,
    }
}

/// The name of interface `ifindex` in this network namespace.
pub fn interface_name(ifindex: u32) -> Option<String> {
    // nix 0.31 does not see if_indextoname's NULL as failure: an unknown index comes back
    // as an empty name.
    nix::net::if_::if_indextoname(ifindex).ok().map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty())
}

/// Interface indexes by name, for messages.
pub fn names_by_index(ifaces: &[Interface]) -> BTreeMap<u32, String> {
    ifaces.iter().map(|i| (i.index, i.name.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_veths_peer_needs_its_namespaces_id() {
        assert_eq!(veth_peer(true, Some(2), Some(3)), Some(Peer { index: 2, netns: 3 }));
        // In this namespace (no id), with no id assigned (-1), or not a veth: no peer elsewhere.
        assert_eq!(veth_peer(true, Some(2), None), None);
        assert_eq!(veth_peer(true, Some(2), Some(-1)), None);
        assert_eq!(veth_peer(false, Some(2), Some(3)), None);
        assert_eq!(veth_peer(true, None, Some(3)), None);
    }

    fn route(family: AddressFamily, len: u8, dst: Option<IpAddr>) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.address_family = family;
        r.header.destination_prefix_length = len;
        if let Some(d) = dst {
            r.attributes.push(RouteAttribute::Destination(d.into()));
        }
        r
    }

    #[test]
    fn a_route_notification_names_the_destinations_it_covers() {
        let pod = route(AddressFamily::Inet, 32, Some("10.244.1.10".parse().unwrap()));
        assert_eq!(destination(&pod), Some("10.244.1.10/32".parse().unwrap()));
        let v6 = route(AddressFamily::Inet6, 64, Some("fd00:244:1::".parse().unwrap()));
        assert_eq!(destination(&v6), Some("fd00:244:1::/64".parse().unwrap()));
        // A default route has no destination attribute and covers everything of its family.
        let default = destination(&route(AddressFamily::Inet, 0, None)).unwrap();
        assert!(default.contains(&"192.0.2.1".parse::<IpAddr>().unwrap()));
        assert!(!default.contains(&"fd00::1".parse::<IpAddr>().unwrap()));
        assert_eq!(destination(&route(AddressFamily::Inet6, 0, None)), Some("::/0".parse().unwrap()));
        // Not IP: nothing to invalidate.
        assert_eq!(destination(&route(AddressFamily::Mpls, 20, None)), None);
    }
}
