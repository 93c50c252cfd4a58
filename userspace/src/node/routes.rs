//! Which interface the kernel routes each workload IP to, cached between passes.
//!
//! A cached lookup holds while the interfaces are the same (index, name, up state) and no
//! route covering it changed. Route notifications drop exactly the lookups they cover; as a
//! safety net for lost notifications, a slice of the cache is looked up again on every pass
//! that looks at everything (once a minute), all of it once per [`ROUTE_RECHECK`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Bound;
use std::time::Duration;

use ipnet::IpNet;

use super::kernel::{Kernel, KernelError};
use crate::routing::{Changes, Interface};

/// At 10 000 workloads the rolling re-check is ~330 lookups a minute, not a burst.
pub(super) const ROUTE_RECHECK: Duration = Duration::from_secs(30 * 60);

/// An interface as far as the validity of route lookups goes: an interface going down
/// takes its IPv4 routes along without a route notification.
type InterfaceKey = (u32, String, bool);

/// What [`RouteCache::track`] did.
#[derive(Debug, Default)]
pub(super) struct Tracked {
    /// The interfaces changed: every lookup is made again.
    pub relisted: bool,
    /// Some cached lookups were dropped.
    pub forgot: bool,
}

#[derive(Default)]
pub(super) struct RouteCache {
    /// IP → the interface its route leads to (only resolved IPs are kept).
    routes: BTreeMap<IpAddr, u32>,
    /// The interfaces the lookups were made with.
    interfaces: Vec<InterfaceKey>,
    /// Where the rolling re-check stopped last tick.
    cursor: Option<IpAddr>,
}

impl RouteCache {
    /// Follows what the kernel announced: new interfaces drop the whole cache
    /// (`relisted`); otherwise announced changes drop what they cover and, on a safety
    /// tick, a slice of the rest is looked up again. `forgot` when any cached lookup went.
    pub(super) async fn track(
        &mut self,
        kernel: &mut impl Kernel,
        ifaces: &[Interface],
        changes: &Changes,
        safety: bool,
        tick: Duration,
    ) -> Result<Tracked, KernelError> {
        let mut out = Tracked::default();
        if changes.lost {
            tracing::info!("routing notifications were lost; looking up every workload's interface again");
            self.routes.clear();
            out.forgot = true;
        }
        for net in &changes.destinations {
            if forget_routes_in(&mut self.routes, net) {
                tracing::debug!(%net, "route changed; its workloads' interfaces are looked up again");
                out.forgot = true;
            }
        }
        let now: Vec<InterfaceKey> = ifaces.iter().map(|i| (i.index, i.name.clone(), i.up)).collect();
        if now != self.interfaces {
            self.routes.clear();
            self.interfaces = now;
            out.relisted = true;
            return Ok(out);
        }
        if safety {
            let slice = refresh_slice(&self.routes, &mut self.cursor, tick);
            for (ip, route) in kernel.routes(slice).await? {
                if self.routes.get(&ip).copied() != route {
                    tracing::debug!(%ip, ?route, "route changed");
                    self.routes.remove(&ip);
                    out.forgot = true;
                }
            }
        }
        Ok(out)
    }

    /// The interface of each of `ips` (`None`: no device route to it), looking up those not
    /// cached. Afterwards the cache holds exactly the resolved ones among `ips`: unresolved
    /// IPs are asked again next pass, their veth may come up any moment.
    pub(super) async fn resolve(
        &mut self,
        kernel: &mut impl Kernel,
        ips: impl IntoIterator<Item = IpAddr>,
    ) -> Result<BTreeMap<IpAddr, Option<u32>>, KernelError> {
        let ips: Vec<IpAddr> = ips.into_iter().collect();
        let unknown: Vec<IpAddr> = ips.iter().filter(|ip| !self.routes.contains_key(ip)).copied().collect();
        let looked_up = kernel.routes(unknown).await?;
        let resolved: BTreeMap<IpAddr, Option<u32>> = ips
            .into_iter()
            .map(|ip| (ip, self.routes.get(&ip).copied().or_else(|| looked_up.get(&ip).copied().flatten())))
            .collect();
        self.routes = resolved.iter().filter_map(|(ip, r)| r.map(|r| (*ip, r))).collect();
        Ok(resolved)
    }
}

/// Drops the cached lookups of the IPs inside `net`, which are one contiguous range of keys
/// (a burst of thousands of pod-route notifications then costs a lookup each, not a scan of
/// the cache each). Whether any was cached.
fn forget_routes_in(routes: &mut BTreeMap<IpAddr, u32>, net: &IpNet) -> bool {
    let inside: Vec<IpAddr> = routes.range(net.network()..=net.broadcast()).map(|(ip, _)| *ip).collect();
    for ip in &inside {
        routes.remove(ip);
    }
    !inside.is_empty()
}

/// The next cached IPs to look up again, after where the last slice stopped and wrapping
/// around: enough per tick that the whole cache is re-checked once per ROUTE_RECHECK.
fn refresh_slice(routes: &BTreeMap<IpAddr, u32>, cursor: &mut Option<IpAddr>, tick: Duration) -> Vec<IpAddr> {
    let ticks = (ROUTE_RECHECK.as_millis() / tick.as_millis().max(1)).max(1) as usize;
    let after = cursor.map_or(Bound::Unbounded, Bound::Excluded);
    let slice: Vec<IpAddr> = routes
        .range((after, Bound::Unbounded))
        .chain(routes.iter())
        .map(|(ip, _)| *ip)
        .take(routes.len().div_ceil(ticks))
        .collect();
    *cursor = slice.last().copied();
    slice
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an IP")
    }

    #[test]
    fn a_changed_route_forgets_exactly_the_ips_it_covers() {
        let ips = ["10.244.1.10", "10.244.1.11", "10.244.2.10", "fd00:244:1::10", "fd00:244:2::10"];
        let cache = || -> BTreeMap<IpAddr, u32> { ips.iter().map(|i| (ip(i), 3)).collect() };
        let left = |net: &str| {
            let mut c = cache();
            let any = forget_routes_in(&mut c, &net.parse().expect("a net"));
            (any, c.keys().map(|k| k.to_string()).collect::<Vec<_>>())
        };
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            left("10.244.1.11/32"),
            (true, strings(&["10.244.1.10", "10.244.2.10", "fd00:244:1::10", "fd00:244:2::10"]))
        );
        assert_eq!(left("10.244.1.0/24"), (true, strings(&["10.244.2.10", "fd00:244:1::10", "fd00:244:2::10"])));
        assert_eq!(
            left("fd00:244:2::/48"),
            (true, strings(&["10.244.1.10", "10.244.1.11", "10.244.2.10", "fd00:244:1::10"]))
        );
        // A default route covers its whole family, and only it.
        assert_eq!(left("0.0.0.0/0").1, strings(&["fd00:244:1::10", "fd00:244:2::10"]));
        assert_eq!(left("10.9.0.0/16"), (false, strings(&ips)));
    }

    #[test]
    fn rolling_refresh_covers_every_route_once_per_recheck_period_and_wraps() {
        let routes: BTreeMap<IpAddr, u32> =
            (0..1000u32).map(|i| (IpAddr::from((0x0a00_0000 + i).to_be_bytes()), 3)).collect();
        let tick = Duration::from_millis(250);
        let ticks = (ROUTE_RECHECK.as_millis() / tick.as_millis()) as usize;
        let mut cursor = None;
        let mut seen = BTreeSet::new();
        let mut calls = 0;
        while seen.len() < routes.len() {
            let slice = refresh_slice(&routes, &mut cursor, tick);
            assert!(!slice.is_empty() && slice.len() <= routes.len().div_ceil(ticks), "a tick did more than its share");
            seen.extend(slice);
            calls += 1;
            assert!(calls <= ticks, "some routes were not re-checked within one period");
        }
        // The next round starts over from the beginning.
        let again = refresh_slice(&routes, &mut cursor, tick);
        assert_eq!(again.first(), routes.keys().next());
        // An empty cache asks for nothing; a tiny one is checked whole every tick.
        assert!(refresh_slice(&BTreeMap::new(), &mut None, tick).is_empty());
        let one: BTreeMap<IpAddr, u32> = [(ip("10.0.0.1"), 1)].into();
        let mut c = None;
        for _ in 0..3 {
            assert_eq!(refresh_slice(&one, &mut c, tick).len(), 1);
        }
    }
}
