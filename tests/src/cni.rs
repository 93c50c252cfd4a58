//! The lab as a container runtime: a pod's sandbox is set up by the lab's own wiring (the
//! pod network's plugin, [`Lab::add_pod`]), then the real `meshpath-cni` binary runs
//! chained after it, with the `CNI_*` environment and the configuration (with the previous
//! plugin's result) on stdin that containerd or CRI-O give it.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshpath_common::names::CNI_PLUGIN;
use serde_json::{Value, json};

use crate::lab::{BRIDGE_IF, Lab, LabError, Pod, Result, Topology};

/// Kubernetes namespace of the lab's pods in the workload file (the API server's put the
/// pods outside the mesh in another, [`Lab::pod_namespace`]).
pub const POD_NAMESPACE: &str = "lab";

/// What one run of the plugin did.
#[derive(Clone, Debug)]
pub struct CniRun {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl CniRun {
    /// The spec's error message (`msg`), for a failed run.
    pub fn msg(&self) -> String {
        serde_json::from_str::<Value>(&self.stdout)
            .ok()
            .and_then(|v| v.get("msg")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| self.stdout.clone())
    }

    /// The spec's error code, for a failed run.
    pub fn code(&self) -> Option<u64> {
        serde_json::from_str::<Value>(&self.stdout).ok()?.get("code")?.as_u64()
    }
}

/// A run of the plugin under way.
pub struct CniChild {
    child: std::process::Child,
    started: Instant,
    plugin: PathBuf,
}

impl CniChild {
    pub fn wait(self) -> Result<CniRun> {
        let out = self
            .child
            .wait_with_output()
            .map_err(|e| LabError::Spawn { cmd: self.plugin.display().to_string(), source: e })?;
        Ok(CniRun {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            took: self.started.elapsed(),
        })
    }
}

impl Lab {
    /// `meshpath-cni`, built beside the meshpath binary.
    pub fn cni_plugin(&self) -> PathBuf {
        self.binary.with_file_name(CNI_PLUGIN)
    }

    /// The result the pod network's plugin returned for `pod`: the host-side veth (and the
    /// bridge, in the bridge topology, as the bridge plugin lists it), `eth0` in the pod.
    pub fn prev_result(&self, pod: &Pod) -> Value {
        let sandbox = format!("/run/netns/{}", pod.netns);
        let mut interfaces = Vec::new();
        if self.topology == Topology::Bridge {
            interfaces.push(json!({ "name": BRIDGE_IF }));
        }
        interfaces.push(json!({ "name": pod.host_if }));
        interfaces.push(json!({ "name": "eth0", "sandbox": sandbox }));
        let eth0 = interfaces.len() - 1;
        let (v4, v6) = if self.topology == Topology::Bridge { (24, 64) } else { (32, 128) };
        json!({
            "cniVersion": "1.0.0",
            "interfaces": interfaces,
            "ips": [
                { "address": format!("{}/{v4}", pod.v4), "interface": eth0 },
                { "address": format!("{}/{v6}", pod.v6), "interface": eth0 },
            ],
        })
    }

    /// The chained plugin's configuration on `pod`'s node: deciding from the lab's API
    /// server once it runs, else from the lab's workload file.
    pub fn cni_conf(&self, pod: &Pod) -> Value {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "lab",
            "type": CNI_PLUGIN,
            "node": self.nodes[pod.node].name,
            "timeout_secs": 5,
            "prevResult": self.prev_result(pod),
        });
        match &self.cluster {
            Some(c) => conf["kubeconfig"] = json!(c.kubeconfig),
            None => conf["workloads"] = json!(self.workloads_path()),
        }
        conf
    }

    /// Runs the plugin for `pod` (`ADD`, `DEL`, `CHECK`) as a runtime would, the pod named
    /// in Kubernetes namespace `namespace`.
    pub fn cni_in(&self, pod: &str, namespace: &str, command: &str) -> Result<CniRun> {
        self.cni_spawn(pod, namespace, command)?.wait()
    }

    /// Starts the plugin as [`Lab::cni_in`] does, without waiting for it.
    pub fn cni_spawn(&self, pod: &str, namespace: &str, command: &str) -> Result<CniChild> {
        let p = self.pod(pod);
        let conf = self.cni_conf(p);
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=pod-{};K8S_POD_INFRA_CONTAINER_ID=sandbox-{}",
            p.name, p.name
        );
        let plugin = self.cni_plugin();
        let cmd = |e: std::io::Error| LabError::Spawn { cmd: plugin.display().to_string(), source: e };
        let started = Instant::now();
        // In the node's network namespace, where a runtime runs its plugins.
        let mut child = Command::new("/usr/bin/nsenter")
            .arg(format!("--net=/run/netns/{}", self.nodes[p.node].name))
            .arg(&plugin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("sandbox-{}", p.name))
            .env("CNI_NETNS", format!("/run/netns/{}", p.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", plugin.parent().unwrap_or(&plugin))
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(cmd)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(conf.to_string().as_bytes()).map_err(cmd)?;
        }
        Ok(CniChild { child, started, plugin })
    }

    /// [`Lab::cni_in`] in the pod's namespace: the workload file's, or the API server's.
    pub fn cni(&self, pod: &str, command: &str) -> Result<CniRun> {
        let namespace = if self.cluster.is_some() { self.pod_namespace(pod) } else { POD_NAMESPACE };
        self.cni_in(pod, namespace, command)
    }

    /// Runs ADD for every pod (enrolled or not) as a runtime starting them would: each pod
    /// and its run; an error at the first failure, with the plugin's message.
    pub fn cni_add_all(&self) -> Result<Vec<(&'static str, CniRun)>> {
        let names: Vec<&'static str> = self.pods.iter().map(|p| p.name).collect();
        let mut runs = Vec::new();
        for name in names {
            let run = self.cni(name, "ADD")?;
            if !run.ok {
                return Err(LabError::Other(format!("CNI ADD of pod {name} failed: {}", run.msg())));
            }
            runs.push((name, run));
        }
        Ok(runs)
    }
}
