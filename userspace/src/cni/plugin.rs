//! The chained plugin's work: decide whether the pod is in the mesh (itself, from the API
//! server or the workload file, so that a daemon outage never holds up a pod outside the
//! mesh), and for one that is, hand it to the node's daemon and return only once the daemon
//! has it in the map behind its interface. Until then the runtime starts none of the pod's
//! containers: nothing it sends can go around the proxy.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use meshpath_common::names::{CNI_SOCKET, STATE_DIR};

use super::spec::{Code, Command, Invocation, NetConf, PluginConf, PrevResult, SpecError};
use super::wire::{self, PodRef, Reply, Request, Sandbox};
use crate::k8s::enrol;
use crate::workloads::WorkloadFile;

/// How long a DEL waits for the daemon: a teardown is never held up, the daemon also lets
/// a pod go once its namespace is gone.
const DEL_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a pod is in the mesh, as the plugin decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Enrolled(PodRef),
    /// Not in the mesh, and why (for the log).
    Outside(String),
}

/// The daemon's socket for `node`.
pub fn socket_path(node: &str) -> PathBuf {
    Path::new(STATE_DIR).join(node).join(CNI_SOCKET)
}

/// Runs one invocation: what to print on stdout, and whether it succeeded. Every outcome
/// is one log line.
pub async fn run(inv: &Invocation, stdin: &str) -> Result<String, SpecError> {
    if inv.command == Command::Version {
        return Ok(super::spec::version_json(&super::spec::cni_version(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    match inv.command {
        Command::Add => add(inv, &conf).await,
        Command::Del => {
            del(inv, &conf).await;
            Ok(String::new())
        }
        // The daemon keeps a pod enrolled for as long as its namespace lives; a CHECK has
        // nothing to repair that the daemon would not.
        Command::Check | Command::Gc | Command::Status | Command::Version => Ok(String::new()),
    }
}

async fn add(inv: &Invocation, conf: &NetConf) -> Result<String, SpecError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        SpecError::new(Code::InvalidConfig, "no prevResult: meshpath-cni runs chained after the pod network's plugin")
    })?;
    let pass = || Ok(super::spec::pass_through(prev, &conf.cni_version));
    let (Some(namespace), Some(name)) = (inv.pod.namespace.as_deref(), inv.pod.name.as_deref()) else {
        tracing::info!(container = %inv.container_id, "ADD: not a Kubernetes pod (no K8S_POD_NAME in CNI_ARGS); left alone");
        return pass();
    };
    let started = Instant::now();
    let pod = match decide(&conf.meshpath, namespace, name).await? {
        Decision::Outside(why) => {
            tracing::info!(pod = %format!("{namespace}/{name}"), "ADD: not in the mesh ({why}); left alone");
            return pass();
        }
        Decision::Enrolled(pod) => pod,
    };
    let result = PrevResult::parse(prev)?;
    if result.ips.is_empty() {
        return Err(SpecError::new(
            Code::InvalidConfig,
            format!("{}: the prevResult gives the pod no address", pod.id()),
        ));
    }
    let netns = inv.netns.clone().unwrap_or_default();
    let sandbox = Sandbox {
        pod: pod.clone(),
        container_id: inv.container_id.clone(),
        netns,
        host_interfaces: result.host_interfaces,
        ips: result.ips,
    };
    let socket = socket_path(&conf.meshpath.node);
    let timeout = Duration::from_secs(conf.meshpath.timeout_secs);
    let fail = |why: String| {
        let msg = format!(
            "{}: the meshpath daemon at {} {why}; the pod must not start before it is captured",
            pod.id(),
            socket.display()
        );
        // Logged once, with every other failure, by the binary.
        SpecError::new(Code::TryAgain, msg)
    };
    match ask(&socket, &Request::Add(sandbox.clone()), timeout).await {
        Ok(Reply::Enrolled { interface }) => {
            tracing::info!(
                pod = %pod.id(),
                ips = ?sandbox.ips,
                interface,
                took_ms = started.elapsed().as_millis() as u64,
                "ADD: enrolled"
            );
            pass()
        }
        Ok(Reply::Refused { reason }) => Err(fail(format!("refused it: {reason}"))),
        Ok(Reply::Released) => Err(fail("gave an answer to another question".into())),
        Err(e) => Err(fail(e)),
    }
}

async fn del(inv: &Invocation, conf: &NetConf) {
    let (Some(namespace), Some(name)) = (inv.pod.namespace.clone(), inv.pod.name.clone()) else { return };
    if conf.meshpath.exclude_namespaces.contains(&namespace) {
        return;
    }
    let socket = socket_path(&conf.meshpath.node);
    let req = Request::Del { namespace: namespace.clone(), name: name.clone(), container_id: inv.container_id.clone() };
    match ask(&socket, &req, DEL_TIMEOUT).await {
        Ok(_) => tracing::info!(pod = %format!("{namespace}/{name}"), "DEL: told the daemon"),
        // The daemon lets the pod go when its namespace is gone: a teardown never fails here.
        Err(e) => tracing::info!(
            pod = %format!("{namespace}/{name}"),
            "DEL: the daemon at {} {e}; it releases the pod once its namespace is gone",
            socket.display()
        ),
    }
}

/// Whether the pod is in the mesh: excluded namespaces without a look, else the workload
/// file or the API server (pod and namespace labels, by the daemon's own rules).
pub async fn decide(conf: &PluginConf, namespace: &str, name: &str) -> Result<Decision, SpecError> {
    if conf.exclude_namespaces.iter().any(|n| n == namespace) {
        return Ok(Decision::Outside(format!("namespace {namespace} is excluded")));
    }
    let timeout = Duration::from_secs(conf.timeout_secs);
    if let Some(path) = &conf.workloads {
        let file = WorkloadFile::load(path)
            .map_err(|e| SpecError::new(Code::TryAgain, format!("deciding on {namespace}/{name}: {e}")))?;
        return Ok(from_file(&file, &conf.node, namespace, name));
    }
    let kubeconfig = conf.kubeconfig.as_deref().unwrap_or(Path::new(""));
    let unreachable =
        |e: String| SpecError::new(Code::TryAgain, format!("asking the API server about {namespace}/{name}: {e}"));
    tokio::time::timeout(timeout, from_api(kubeconfig, namespace, name))
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
        .map_err(unreachable)
}

/// The workload file's word: listed on this node, it is in the mesh.
pub fn from_file(file: &WorkloadFile, node: &str, namespace: &str, name: &str) -> Decision {
    match file.on_node(node).find(|w| w.namespace == namespace && w.name == name) {
        Some(w) => Decision::Enrolled(PodRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: None,
            service_account: w.service_account.clone(),
        }),
        None => Decision::Outside(format!("the workload file lists no {namespace}/{name} on node {node}")),
    }
}

async fn from_api(kubeconfig: &Path, namespace: &str, name: &str) -> Result<Decision, String> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
    let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
    let pod = Api::<Pod>::namespaced(client.clone(), namespace).get(name).await.map_err(|e| format!("pod: {e}"))?;
    let ns = Api::<Namespace>::all(client).get(namespace).await.map_err(|e| format!("namespace: {e}"))?;
    Ok(from_objects(&pod, &ns))
}

/// The API server's word, by the rules the daemon's Kubernetes source applies.
pub fn from_objects(pod: &Pod, ns: &Namespace) -> Decision {
    let (namespace, name) =
        (pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
    if !enrol::is_enrolled(pod, ns.metadata.labels.as_ref()) {
        return Decision::Outside("its pod and namespace labels leave it out".into());
    }
    let service_account =
        pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".to_owned());
    Decision::Enrolled(PodRef { namespace, name, uid: pod.metadata.uid.clone(), service_account })
}

/// One request, one answer, within `timeout`; the error says what went wrong in words
/// that follow "the daemon at <socket>".
async fn ask(socket: &Path, req: &Request, timeout: Duration) -> Result<Reply, String> {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "is not running (nothing listens there)".to_owned()
            }
            _ => format!("cannot be reached: {e}"),
        })?;
        wire::send(&mut stream, req).await.map_err(|e| format!("did not take the request: {e}"))?;
        wire::receive::<Reply>(&mut stream).await.map_err(|e| format!("did not answer: {e}"))
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| format!("did not enrol it within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_file_decides_by_namespace_name_and_node() {
        let file = WorkloadFile::parse(
            "workloads:\n  - {name: cart, namespace: shop, serviceAccount: carts, node: n1, ips: [10.244.1.5]}\n",
            "test",
        )
        .expect("valid");
        let Decision::Enrolled(p) = from_file(&file, "n1", "shop", "cart") else { panic!("enrolled") };
        assert_eq!((p.id(), p.service_account.as_str()), ("shop/cart".to_owned(), "carts"));
        assert!(matches!(from_file(&file, "n2", "shop", "cart"), Decision::Outside(_)));
        assert!(matches!(from_file(&file, "n1", "shop", "till"), Decision::Outside(_)));
    }

    #[test]
    fn the_api_servers_objects_decide_by_the_daemons_rules() {
        let pod = |labels: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "cart", "namespace": "shop", "uid": "u-1", "labels": labels},
                "spec": {"containers": [], "serviceAccountName": "carts"}
            }))
            .expect("pod")
        };
        let ns = |labels: serde_json::Value| -> Namespace {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "shop", "labels": labels}})).expect("ns")
        };
        let ambient = serde_json::json!({"istio.io/dataplane-mode": "ambient"});
        let none = serde_json::json!({"istio.io/dataplane-mode": "none"});
        let Decision::Enrolled(p) = from_objects(&pod(serde_json::json!({})), &ns(ambient.clone())) else {
            panic!("the namespace enrols it")
        };
        assert_eq!((p.uid.as_deref(), p.service_account.as_str()), (Some("u-1"), "carts"));
        assert!(matches!(from_objects(&pod(none), &ns(ambient.clone())), Decision::Outside(_)));
        assert!(matches!(from_objects(&pod(ambient), &ns(serde_json::json!({}))), Decision::Enrolled(_)));
        assert!(matches!(from_objects(&pod(serde_json::json!({})), &ns(serde_json::json!({}))), Decision::Outside(_)));
    }

    #[tokio::test]
    async fn excluded_namespaces_are_decided_without_a_look_and_a_missing_daemon_is_named() {
        let conf = PluginConf {
            node: "n1".into(),
            kubeconfig: Some("/nonexistent/kubeconfig".into()),
            workloads: None,
            exclude_namespaces: vec!["kube-system".into()],
            timeout_secs: 1,
        };
        assert!(matches!(decide(&conf, "kube-system", "coredns").await, Ok(Decision::Outside(_))));
        let e = decide(&conf, "shop", "cart").await.expect_err("no kubeconfig");
        assert_eq!(e.code, Code::TryAgain);
        assert!(e.msg.contains("/nonexistent/kubeconfig"), "{}", e.msg);
        let socket = std::env::temp_dir().join(format!("meshpath-cni-test-{}.sock", std::process::id()));
        let req = Request::Del { namespace: "a".into(), name: "b".into(), container_id: "c".into() };
        let e = ask(&socket, &req, Duration::from_secs(1)).await.expect_err("nothing listens");
        assert_eq!(e, "is not running (nothing listens there)");
    }
}
