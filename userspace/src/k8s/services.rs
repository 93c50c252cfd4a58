//! Service resolution: `ClusterIP:port` → the ready endpoints behind it, from Services and
//! their EndpointSlices. A slice's port carries the number the Service's target port (named
//! or not) resolved to for that slice's pods, so matching ports by name resolves named target
//! ports as kube-proxy does.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use meshpath_common::names::SERVICE_NAME_LABEL;

use crate::state::{ServiceBackends, ServiceTable};

pub fn service_table<'a>(services: impl IntoIterator<Item = &'a Service>, slices: &[&EndpointSlice]) -> ServiceTable {
    // Slices by (namespace, service name).
    let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        let (Some(ns), Some(svc)) =
            (s.metadata.namespace.as_deref(), s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)))
        else {
            continue;
        };
        by_service.entry((ns, svc.as_str())).or_default().push(s);
    }
    let mut table = ServiceTable::new();
    for svc in services {
        let (Some(ns), Some(name), Some(spec)) =
            (svc.metadata.namespace.as_deref(), svc.metadata.name.as_deref(), svc.spec.as_ref())
        else {
            continue;
        };
        let mut ips: Vec<IpAddr> = spec.cluster_ips.iter().flatten().filter_map(|ip| ip.parse().ok()).collect();
        if ips.is_empty()
            && let Some(ip) = spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        let slices = by_service.get(&(ns, name)).map(Vec::as_slice).unwrap_or(&[]);
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let port_name = port.name.as_deref().unwrap_or("");
            let mut endpoints = Vec::new();
            for slice in slices {
                // The slice's number for this service port, matched by name ("" when unnamed).
                let Some(target) = slice.ports.iter().flatten().find(|p| {
                    p.name.as_deref().unwrap_or("") == port_name && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                }) else {
                    continue;
                };
                let Some(target) = target.port.and_then(|p| u16::try_from(p).ok()) else { continue };
                for ep in slice.endpoints.iter().flatten() {
                    // Unset "ready" means unknown, which consumers treat as ready.
                    if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                        continue;
                    }
                    endpoints.extend(
                        ep.addresses
                            .iter()
                            .filter_map(|a| a.parse::<IpAddr>().ok())
                            .map(|ip| SocketAddr::new(ip, target)),
                    );
                }
            }
            endpoints.sort();
            endpoints.dedup();
            let Ok(service_port) = u16::try_from(port.port) else { continue };
            for ip in &ips {
                // Each family's cluster IP leads to that family's endpoints.
                let same_family: Vec<SocketAddr> =
                    endpoints.iter().filter(|e| e.is_ipv4() == ip.is_ipv4()).copied().collect();
                table.insert(
                    SocketAddr::new(ip.to_canonical(), service_port),
                    ServiceBackends { service: format!("{ns}/{name}"), endpoints: same_family, waypoint: false },
                );
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn service(name: &str, ips: &[&str], ports: &[(Option<&str>, i32, IntOrString)]) -> Service {
        Service {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some("shop".into()), ..Default::default() },
            spec: Some(ServiceSpec {
                cluster_ip: ips.first().map(|s| s.to_string()),
                cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p, t)| ServicePort {
                            name: n.map(Into::into),
                            port: *p,
                            target_port: Some(t.clone()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(svc: &str, ports: &[(Option<&str>, i32)], endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{svc}-x")),
                namespace: Some("shop".into()),
                labels: Some(BTreeMap::from([(SERVICE_NAME_LABEL.into(), svc.into())])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort { name: n.map(Into::into), port: Some(*p), ..Default::default() })
                    .collect(),
            ),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(ip, ready)| Endpoint {
                        addresses: vec![ip.to_string()],
                        conditions: Some(EndpointConditions { ready: *ready, ..Default::default() }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn named_target_ports_resolve_through_the_slices_and_only_ready_endpoints_count() {
        let svc = service(
            "web",
            &["10.96.0.10"],
            &[(Some("http"), 80, IntOrString::String("web".into())), (Some("admin"), 9000, IntOrString::Int(9000))],
        );
        let s = slice(
            "web",
            &[(Some("http"), 8080), (Some("admin"), 9000)],
            &[("10.244.1.10", Some(true)), ("10.244.2.10", None), ("10.244.2.11", Some(false))],
        );
        let t = service_table([&svc], &[&s]);
        assert_eq!(t[&sa("10.96.0.10:80")].endpoints, [sa("10.244.1.10:8080"), sa("10.244.2.10:8080")]);
        assert_eq!(t[&sa("10.96.0.10:9000")].endpoints, [sa("10.244.1.10:9000"), sa("10.244.2.10:9000")]);
        assert_eq!(t[&sa("10.96.0.10:80")].service, "shop/web");
    }

    #[test]
    fn headless_other_services_and_udp_are_left_out() {
        let headless = service("db", &["None"], &[(None, 5432, IntOrString::Int(5432))]);
        let mut udp = service("dns", &["10.96.0.53"], &[(None, 53, IntOrString::Int(53))]);
        udp.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
        let other = slice("not-web", &[(None, 8080)], &[("10.244.1.10", Some(true))]);
        let lonely = service("web", &["10.96.0.10"], &[(None, 80, IntOrString::Int(8080))]);
        let t = service_table([&headless, &udp, &lonely], &[&other]);
        assert_eq!(t.len(), 1);
        assert!(t[&sa("10.96.0.10:80")].endpoints.is_empty(), "no slice of its own: no endpoints");
    }

    #[test]
    fn dual_stack_cluster_ips_lead_to_their_own_family() {
        let svc = service("web", &["10.96.0.10", "fd00:96::10"], &[(None, 80, IntOrString::Int(8080))]);
        let v4 = slice("web", &[(None, 8080)], &[("10.244.1.10", Some(true))]);
        let mut v6 = slice("web", &[(None, 8080)], &[("fd00:244:1::10", Some(true))]);
        v6.metadata.name = Some("web-v6".into());
        let t = service_table([&svc], &[&v4, &v6]);
        assert_eq!(t[&sa("10.96.0.10:80")].endpoints, [sa("10.244.1.10:8080")]);
        assert_eq!(t[&sa("[fd00:96::10]:80")].endpoints, [sa("[fd00:244:1::10]:8080")]);
    }
}
