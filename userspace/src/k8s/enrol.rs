//! Which pods are enrolled, by Istio's rules, and what meshpath needs to know of them.
//!
//! - `istio.io/dataplane-mode=ambient` on a pod or its namespace enrols it;
//! - `istio.io/dataplane-mode=none` on a pod opts it out, whatever its namespace says;
//! - host-network pods are never enrolled (their IP is the node's);
//! - finished pods (Succeeded, Failed) are not enrolled: their IPs may already be reused;
//! - pods with an Istio sidecar (annotation `sidecar.istio.io/status`) are not: the sidecar
//!   already does the job, as Istio's ambient mode leaves them alone.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::workloads::{Workload, WorkloadFile};

use meshpath_common::names::{
    DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE, REDIRECTION_ANNOTATION, REDIRECTION_ENABLED,
    SIDECAR_STATUS_ANNOTATION,
};

fn label(labels: Option<&BTreeMap<String, String>>) -> Option<&str> {
    labels?.get(DATAPLANE_MODE_LABEL).map(String::as_str)
}

/// Whether `pod`, in a namespace with `ns_labels`, is in the mesh.
pub fn is_enrolled(pod: &Pod, ns_labels: Option<&BTreeMap<String, String>>) -> bool {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return false;
    }
    if matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return false;
    }
    if pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION)) {
        return false;
    }
    match label(pod.metadata.labels.as_ref()) {
        Some(DATAPLANE_MODE_NONE) => false,
        Some(DATAPLANE_MODE_AMBIENT) => true,
        _ => label(ns_labels) == Some(DATAPLANE_MODE_AMBIENT),
    }
}

/// The pod's IPs (`status.podIPs`, else `status.podIP`), canonical.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|l| l.iter().filter_map(|p| p.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    ips.iter().map(|ip: &IpAddr| ip.to_canonical()).collect()
}

/// Every pod (`namespace/name`) with an address: decided on, enrolled or not.
pub fn with_addresses<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> std::collections::BTreeSet<String> {
    pods.into_iter()
        .filter(|p| !pod_ips(p).is_empty())
        .filter_map(|p| Some(format!("{}/{}", p.metadata.namespace.as_deref()?, p.metadata.name.as_deref()?)))
        .collect()
}

/// Every enrolled pod of the cluster with an IP and a node, as the workload list the
/// datapath and the proxy work from. When two pods claim one IP (a finished pod's address
/// reused before the old object is gone), the newer pod keeps it.
pub fn enrolled_workloads<'a>(pods: impl IntoIterator<Item = &'a Pod>, namespaces: &[&Namespace]) -> WorkloadFile {
    let ns_labels: HashMap<&str, Option<&BTreeMap<String, String>>> =
        namespaces.iter().filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.as_ref()))).collect();
    let mut candidates: Vec<(&Pod, Workload)> = Vec::new();
    for pod in pods {
        let (Some(name), Some(namespace)) = (pod.metadata.name.as_deref(), pod.metadata.namespace.as_deref()) else {
            continue;
        };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else { continue };
        if !is_enrolled(pod, ns_labels.get(namespace).copied().flatten()) {
            continue;
        }
        let ips = pod_ips(pod);
        if ips.is_empty() {
            continue;
        }
        let service_account =
            pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".to_string());
        candidates.push((pod, Workload { name: name.into(), namespace: namespace.into(), service_account, node, ips }));
    }
    // Newest first, so a reused IP goes to the pod that has it now.
    candidates.sort_by(|a, b| b.0.metadata.creation_timestamp.cmp(&a.0.metadata.creation_timestamp));
    let mut owner: HashMap<IpAddr, String> = HashMap::new();
    let mut workloads = Vec::new();
    for (_, mut w) in candidates {
        let id = w.id();
        w.ips.retain(|ip| match owner.get(ip) {
            Some(first) => {
                tracing::warn!(%ip, kept = %first, dropped = %id, "two enrolled pods claim one IP; the newer keeps it");
                false
            }
            None => {
                owner.insert(*ip, id.clone());
                true
            }
        });
        if !w.ips.is_empty() {
            workloads.push(w);
        }
    }
    workloads.sort_by_key(|w| w.id());
    WorkloadFile { workloads }
}

/// Pods carrying the redirection annotation (`namespace/name` → node), enrolled or not.
pub fn annotated<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeMap<String, String> {
    pods.into_iter()
        .filter(|p| {
            let a = p.metadata.annotations.as_ref();
            a.and_then(|a| a.get(REDIRECTION_ANNOTATION)).is_some_and(|v| v == REDIRECTION_ENABLED)
        })
        .filter_map(|p| {
            let m = &p.metadata;
            let node = p.spec.as_ref()?.node_name.clone()?;
            Some((format!("{}/{}", m.namespace.as_deref()?, m.name.as_deref()?), node))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn labels(mode: Option<&str>) -> Option<BTreeMap<String, String>> {
        mode.map(|m| BTreeMap::from([(DATAPLANE_MODE_LABEL.to_string(), m.to_string())]))
    }

    fn pod(name: &str, ns: &str, mode: Option<&str>, ips: &[&str]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: labels(mode),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                service_account_name: Some(format!("sa-{name}")),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
                ..Default::default()
            }),
        }
    }

    fn ns(name: &str, mode: Option<&str>) -> Namespace {
        Namespace {
            metadata: ObjectMeta { name: Some(name.into()), labels: labels(mode), ..Default::default() },
            ..Default::default()
        }
    }

    fn enrolled(pods: &[Pod], namespaces: &[Namespace]) -> Vec<String> {
        let nss: Vec<&Namespace> = namespaces.iter().collect();
        enrolled_workloads(pods, &nss).workloads.iter().map(Workload::id).collect()
    }

    #[test]
    fn istio_labels_decide() {
        let namespaces = [ns("mesh", Some("ambient")), ns("plain", None)];
        let pods = [
            pod("a", "mesh", None, &["10.0.0.1"]),
            pod("out", "mesh", Some("none"), &["10.0.0.2"]),
            pod("in", "plain", Some("ambient"), &["10.0.0.3"]),
            pod("b", "plain", None, &["10.0.0.4"]),
            pod("orphan", "unknown-ns", None, &["10.0.0.5"]),
        ];
        assert_eq!(enrolled(&pods, &namespaces), ["mesh/a", "plain/in"]);
    }

    #[test]
    fn host_network_finished_and_ipless_pods_are_never_enrolled() {
        let namespaces = [ns("mesh", Some("ambient"))];
        let mut host = pod("host", "mesh", Some("ambient"), &["192.168.0.1"]);
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut done = pod("done", "mesh", None, &["10.0.0.2"]);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let pending = pod("pending", "mesh", None, &[]);
        let mut sidecar = pod("sidecar", "mesh", Some("ambient"), &["10.0.0.3"]);
        sidecar.metadata.annotations =
            Some(BTreeMap::from([(SIDECAR_STATUS_ANNOTATION.to_string(), "{}".to_string())]));
        assert!(enrolled(&[host, done, pending, sidecar], &namespaces).is_empty());
    }

    #[test]
    fn identity_and_ips_come_from_the_pod() {
        let w = enrolled_workloads(&[pod("a", "mesh", Some("ambient"), &["10.0.0.1", "fd00::1"])], &[]);
        let w = &w.workloads[0];
        assert_eq!((w.service_account.as_str(), w.node.as_str()), ("sa-a", "n1"));
        assert_eq!(w.ips, ["10.0.0.1".parse::<IpAddr>().unwrap(), "fd00::1".parse().unwrap()]);
        let mut single = pod("s", "mesh", Some("ambient"), &[]);
        single.status.as_mut().unwrap().pod_ip = Some("10.0.0.9".into());
        assert_eq!(enrolled_workloads(&[single], &[]).workloads[0].ips, ["10.0.0.9".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn a_reused_ip_goes_to_the_newer_pod() {
        let at = |s: i64| Some(Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap()));
        let mut old = pod("old", "mesh", Some("ambient"), &["10.0.0.1", "10.0.0.7"]);
        old.metadata.creation_timestamp = at(100);
        let mut new = pod("new", "mesh", Some("ambient"), &["10.0.0.1"]);
        new.metadata.creation_timestamp = at(200);
        let w = enrolled_workloads(&[old, new], &[]);
        let by_id: BTreeMap<String, Vec<IpAddr>> = w.workloads.into_iter().map(|w| (w.id(), w.ips)).collect();
        assert_eq!(by_id["mesh/new"], ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(by_id["mesh/old"], ["10.0.0.7".parse::<IpAddr>().unwrap()]);
    }
}
