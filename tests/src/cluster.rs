//! The lab as a Kubernetes cluster: its namespaces, pods and services as API objects, for
//! the in-process API server ([`crate::apiserver`]) that daemons in Kubernetes mode follow.
//!
//! Namespace `lab` is enrolled (`istio.io/dataplane-mode=ambient`) and holds pods a, c and e;
//! namespace `plain` is not and holds b and d. Service `lab/web` (10.96.0.10:80, target port
//! named `http`) leads to c:8080; service `plain/echo` (10.96.0.20:80) to d:8080.

use std::net::SocketAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::apiserver::{self, ApiServer};
use crate::lab::{Lab, LabError, Result};
use crate::traffic;
use meshpath_common::names::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, SERVICE_NAME_LABEL};

/// Namespace of the lab's enrolled pods (the one their identities carry).
pub const MESH_NAMESPACE: &str = "lab";
/// Namespace of the lab's other pods.
pub const PLAIN_NAMESPACE: &str = "plain";
/// `lab/web`: its cluster IP and port, and the app port behind it (on c).
pub const WEB_SERVICE: &str = "10.96.0.10:80";
/// `plain/echo`: its cluster IP and port (on d).
pub const ECHO_SERVICE: &str = "10.96.0.20:80";

fn meta(name: &str, namespace: Option<&str>, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: (!labels.is_empty()).then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    }
}

pub fn namespace(name: &str, ambient: bool) -> Namespace {
    let labels: &[(&str, &str)] = if ambient { &[(DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT)] } else { &[] };
    Namespace { metadata: meta(name, None, labels), ..Default::default() }
}

impl Lab {
    /// The namespace a lab pod lives in: enrolled pods in `lab`, the others in `plain`.
    pub fn pod_namespace(&self, pod: &str) -> &'static str {
        if self.pod(pod).enrolled { MESH_NAMESPACE } else { PLAIN_NAMESPACE }
    }

    /// The API object of lab pod `name` (`pod-<name>`, service account `sa-<name>`), running
    /// on its node with its two IPs.
    pub fn pod_object(&self, name: &str) -> Pod {
        let p = self.pod(name);
        Pod {
            metadata: meta(&format!("pod-{name}"), Some(self.pod_namespace(name)), &[("app", name)]),
            spec: Some(PodSpec {
                node_name: Some(self.nodes[p.node].name.clone()),
                service_account_name: Some(format!("sa-{name}")),
                containers: vec![k8s_openapi::api::core::v1::Container { name: "app".into(), ..Default::default() }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(p.v4.to_string()),
                pod_ips: Some(vec![PodIP { ip: p.v4.to_string() }, PodIP { ip: p.v6.to_string() }]),
                ..Default::default()
            }),
        }
    }

    /// A Service with one port named `http` whose target port is the name `http`, and its
    /// EndpointSlice, which resolves that name to `app_port` on `backends` (all ready).
    pub fn service_objects(
        &self,
        namespace: &str,
        name: &str,
        addr: SocketAddr,
        backends: &[&str],
        app_port: u16,
    ) -> (Service, EndpointSlice) {
        let svc = Service {
            metadata: meta(name, Some(namespace), &[]),
            spec: Some(ServiceSpec {
                cluster_ip: Some(addr.ip().to_string()),
                cluster_ips: Some(vec![addr.ip().to_string()]),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: i32::from(addr.port()),
                    target_port: Some(IntOrString::String("http".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let endpoints = backends
            .iter()
            .map(|b| Endpoint {
                addresses: vec![self.pod(b).v4.to_string()],
                conditions: Some(EndpointConditions { ready: Some(true), ..Default::default() }),
                node_name: Some(self.nodes[self.pod(b).node].name.clone()),
                ..Default::default()
            })
            .collect();
        let slice = EndpointSlice {
            metadata: meta(&format!("{name}-1"), Some(namespace), &[(SERVICE_NAME_LABEL, name)]),
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(i32::from(app_port)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            endpoints: Some(endpoints),
        };
        (svc, slice)
    }

    /// Everything the lab's cluster starts with.
    pub fn cluster_objects(&self) -> ClusterObjects {
        let app = crate::smoke::APP_PORT;
        ClusterObjects {
            namespaces: vec![namespace(MESH_NAMESPACE, true), namespace(PLAIN_NAMESPACE, false)],
            pods: self.pods.iter().map(|p| self.pod_object(p.name)).collect(),
            services: vec![
                self.service_objects(MESH_NAMESPACE, "web", WEB_SERVICE.parse().expect("valid"), &["c"], app),
                self.service_objects(PLAIN_NAMESPACE, "echo", ECHO_SERVICE.parse().expect("valid"), &["d"], app),
            ],
        }
    }
}

/// Port of the lab's API server, on node 1's underlay address (reachable from both nodes).
pub const API_PORT: u16 = 6443;

/// The lab's API server: in this process, on its own runtime, listening inside node 1's
/// network namespace.
pub struct LabCluster {
    pub api: ApiServer,
    pub addr: SocketAddr,
    pub kubeconfig: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
}

impl LabCluster {
    /// Stops serving (an API server outage); the store is kept.
    pub fn stop(&self) {
        self.rt.block_on(self.api.stop());
    }

    /// The runtime the API server (and the lab's istiod) run on.
    pub(crate) fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    /// Serves again on the same address (the API server is back).
    pub fn restart(&self, lab_node1_netns: &str) -> Result<()> {
        let addr = self.addr;
        let listener = traffic::in_netns(lab_node1_netns, move || std::net::TcpListener::bind(addr))??;
        let _guard = self.rt.enter();
        self.api.start(listener).map_err(|e| LabError::Other(format!("restarting the API server: {e}")))?;
        Ok(())
    }
}

impl Lab {
    /// Starts the lab's API server with [`Lab::cluster_objects`] in it. Daemons started after
    /// this follow it (KUBECONFIG) instead of the workload file.
    pub fn start_cluster(&mut self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let addr = SocketAddr::new(self.nodes[0].underlay_v4, API_PORT);
        let listener = traffic::in_netns(&self.nodes[0].name, move || std::net::TcpListener::bind(addr))??;
        let api = ApiServer::new();
        {
            let _guard = rt.enter();
            api.start(listener).map_err(|e| LabError::Other(format!("starting the API server: {e}")))?;
        }
        let objects = self.cluster_objects();
        let apply = |r: std::result::Result<String, apiserver::ApiServerError>| {
            r.map(|_| ()).map_err(|e| LabError::Other(e.to_string()))
        };
        for n in &objects.namespaces {
            apply(api.apply(n))?;
        }
        for p in &objects.pods {
            apply(api.apply(p))?;
        }
        for (svc, slice) in &objects.services {
            apply(api.apply(svc))?;
            apply(api.apply(slice))?;
        }
        let kubeconfig = self.dir.join("kubeconfig");
        std::fs::write(&kubeconfig, apiserver::kubeconfig(&format!("http://{addr}")))?;
        self.cluster = Some(LabCluster { api, addr, kubeconfig, rt });
        Ok(())
    }

    /// The lab's API server; panics if [`Lab::start_cluster`] was not called (a test bug).
    pub fn cluster(&self) -> &LabCluster {
        self.cluster.as_ref().expect("start_cluster() first")
    }
}

/// The lab's cluster as API objects.
pub struct ClusterObjects {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub services: Vec<(Service, EndpointSlice)>,
}
