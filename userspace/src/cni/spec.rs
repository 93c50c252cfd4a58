//! The CNI protocol as a runtime (containerd, CRI-O) speaks it to a chained plugin: the
//! `CNI_*` environment, the network configuration on stdin with the previous plugin's result,
//! and what the plugin prints back (SPEC.md of containernetworking/cni, versions 0.3.0 to
//! 1.1.0).

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Value, json};

use meshpath_common::names::CNI_PLUGIN;

/// The versions this plugin answers `VERSION` with: every one whose results carry `ips` and
/// `interfaces` as 1.0 does.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Error codes of the spec this plugin uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 4: invalid necessary environment variables.
    BadEnvironment = 4,
    /// 6: failed to decode content (the configuration on stdin).
    BadConfig = 6,
    /// 7: invalid network config.
    InvalidConfig = 7,
    /// 11: try again later: the daemon or the API server is not there yet.
    TryAgain = 11,
}

#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct SpecError {
    pub code: Code,
    pub msg: String,
}

impl SpecError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self { code, msg: msg.into() }
    }

    /// The error as the spec prints it on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        json!({ "cniVersion": cni_version, "code": self.code as u32, "msg": self.msg }).to_string()
    }
}

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    /// 1.1's garbage collection and status: nothing of meshpath's to collect or report.
    Gc,
    Status,
}

impl Command {
    fn parse(s: &str) -> Result<Self, SpecError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            other => return Err(SpecError::new(Code::BadEnvironment, format!("unknown CNI_COMMAND {other:?}"))),
        })
    }
}

/// The pod a Kubernetes runtime names in `CNI_ARGS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub infra_container_id: Option<String>,
}

impl PodArgs {
    /// `K8S_POD_NAMESPACE=ns;K8S_POD_NAME=name;...`; other keys are ignored.
    pub fn parse(args: &str) -> Self {
        let mut out = Self::default();
        for (k, v) in args.split(';').filter_map(|kv| kv.split_once('=')) {
            let v = Some(v.to_owned()).filter(|v| !v.is_empty());
            match k {
                "K8S_POD_NAMESPACE" => out.namespace = v,
                "K8S_POD_NAME" => out.name = v,
                "K8S_POD_INFRA_CONTAINER_ID" => out.infra_container_id = v,
                _ => {}
            }
        }
        out
    }
}

/// One call of the plugin, from its environment.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub pod: PodArgs,
}

impl Invocation {
    /// Reads the `CNI_*` variables through `var`. `VERSION` needs none but the command.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, SpecError> {
        let need = |k: &str| {
            var(k)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| SpecError::new(Code::BadEnvironment, format!("{k} is not set")))
        };
        let command = Command::parse(&need("CNI_COMMAND")?)?;
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = if needs_container { need("CNI_CONTAINERID")? } else { String::new() };
        let ifname = if needs_container { need("CNI_IFNAME")? } else { String::new() };
        // DEL may come after the namespace is gone: no CNI_NETNS then.
        let netns = var("CNI_NETNS").filter(|v| !v.is_empty()).map(PathBuf::from);
        if matches!(command, Command::Add | Command::Check) && netns.is_none() {
            return Err(SpecError::new(Code::BadEnvironment, "CNI_NETNS is not set"));
        }
        let pod = PodArgs::parse(&var("CNI_ARGS").unwrap_or_default());
        Ok(Self { command, container_id, netns, ifname, pod })
    }
}

/// The network configuration on stdin: the spec's fields and meshpath's own.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// What the plugins before this one made (absent for DEL with some runtimes).
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(flatten)]
    pub meshpath: PluginConf,
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".to_owned()]
}

fn default_timeout() -> u64 {
    10
}

/// meshpath's part of the configuration, written by `meshpath cni install`.
#[derive(Clone, Debug, Deserialize)]
/// Other keys are the runtime's (`name`, `runtimeConfig`, `args`...) and left alone.
#[serde(rename_all = "snake_case")]
pub struct PluginConf {
    /// The node whose daemon enrols the pod (`<STATE_DIR>/<node>/cni.sock`).
    pub node: String,
    /// Enrolment is decided from the API server through this kubeconfig...
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// ...or from this workload file (a node run without Kubernetes).
    #[serde(default)]
    pub workloads: Option<PathBuf>,
    /// Namespaces never enrolled, and never looked up: their pods start whatever the daemon
    /// and the API server do (CoreDNS must start on a node whose daemon is down).
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// How long an ADD waits for the daemon, and for the API server.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

impl NetConf {
    pub fn parse(stdin: &str) -> Result<Self, SpecError> {
        let conf: Self = serde_json::from_str(stdin)
            .map_err(|e| SpecError::new(Code::BadConfig, format!("the network configuration on stdin: {e}")))?;
        if conf.kind != CNI_PLUGIN {
            return Err(SpecError::new(
                Code::InvalidConfig,
                format!("this is {CNI_PLUGIN}, configured as type {:?}", conf.kind),
            ));
        }
        match (&conf.meshpath.kubeconfig, &conf.meshpath.workloads) {
            (Some(_), Some(_)) | (None, None) => Err(SpecError::new(
                Code::InvalidConfig,
                "exactly one of \"kubeconfig\" and \"workloads\" must say where enrolment is decided",
            )),
            _ if conf.meshpath.node.is_empty() => Err(SpecError::new(Code::InvalidConfig, "\"node\" is empty")),
            _ if conf.meshpath.timeout_secs == 0 => {
                Err(SpecError::new(Code::InvalidConfig, "\"timeout_secs\" must be at least 1"))
            }
            _ => Ok(conf),
        }
    }
}

/// What the pod got from the plugins before this one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrevResult {
    /// Interfaces in the node's namespace (no `sandbox`): the pod's veth, and for a bridge
    /// CNI the bridge too.
    pub host_interfaces: Vec<String>,
    /// Addresses of the pod's own interfaces.
    pub ips: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct RawResult {
    #[serde(default)]
    interfaces: Vec<RawInterface>,
    #[serde(default)]
    ips: Vec<RawIp>,
}

#[derive(Deserialize)]
struct RawInterface {
    name: String,
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Deserialize)]
struct RawIp {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

impl PrevResult {
    pub fn parse(v: &Value) -> Result<Self, SpecError> {
        let bad = |e: String| SpecError::new(Code::BadConfig, format!("prevResult: {e}"));
        let raw: RawResult = serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?;
        let in_sandbox = |i: &RawInterface| i.sandbox.as_deref().is_some_and(|s| !s.is_empty());
        let host_interfaces = raw.interfaces.iter().filter(|i| !in_sandbox(i)).map(|i| i.name.clone()).collect();
        let mut ips = Vec::new();
        for ip in &raw.ips {
            // An address on a host-side interface (a bridge's gateway) is not the pod's.
            if ip.interface.and_then(|i| raw.interfaces.get(i)).is_some_and(|i| !in_sandbox(i)) {
                continue;
            }
            let net: IpNet = ip.address.parse().map_err(|e| bad(format!("address {:?}: {e}", ip.address)))?;
            ips.push(net.addr().to_canonical());
        }
        Ok(Self { host_interfaces, ips })
    }
}

/// The `cniVersion` the runtime's configuration on stdin names (1.0.0 when it names none):
/// what every answer, errors included, carries.
pub fn cni_version(stdin: &str) -> String {
    serde_json::from_str::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".to_owned())
}

/// The answer to `VERSION`.
pub fn version_json(cni_version: &str) -> String {
    json!({ "cniVersion": cni_version, "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

/// What a chained plugin prints for ADD: the previous result, unchanged but for the version.
pub fn pass_through(prev: &Value, cni_version: &str) -> String {
    let mut out = prev.clone();
    if let Some(o) = out.as_object_mut() {
        o.insert("cniVersion".into(), Value::String(cni_version.to_owned()));
    }
    out.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn the_environment_names_the_pod_and_add_needs_a_namespace() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_INFRA_CONTAINER_ID=abc"),
        ];
        let i = Invocation::from_env(env(&vars)).expect("valid");
        assert_eq!(i.command, Command::Add);
        assert_eq!(i.pod.namespace.as_deref(), Some("shop"));
        assert_eq!(i.pod.name.as_deref(), Some("cart-1"));
        assert_eq!(i.pod.infra_container_id.as_deref(), Some("abc"));
        let e = Invocation::from_env(env(&vars[..2])).expect_err("no ifname");
        assert_eq!((e.code, e.msg.as_str()), (Code::BadEnvironment, "CNI_IFNAME is not set"));
        let no_netns = [vars[0], vars[1], vars[3]];
        assert_eq!(Invocation::from_env(env(&no_netns)).expect_err("").msg, "CNI_NETNS is not set");
        let del = [("CNI_COMMAND", "DEL"), vars[1], vars[3]];
        assert!(Invocation::from_env(env(&del)).expect("DEL without a namespace").netns.is_none());
        let e = Invocation::from_env(env(&[("CNI_COMMAND", "UPDATE")])).expect_err("unknown");
        assert_eq!(e.msg, "unknown CNI_COMMAND \"UPDATE\"");
        assert_eq!(Invocation::from_env(env(&[("CNI_COMMAND", "VERSION")])).expect("").command, Command::Version);
    }

    #[test]
    fn the_configuration_says_where_enrolment_is_decided() {
        let ok = r#"{"cniVersion":"1.0.0","name":"k8s","type":"meshpath-cni","node":"n1","workloads":"/w.yaml"}"#;
        let c = NetConf::parse(ok).expect("valid");
        assert_eq!(c.meshpath.exclude_namespaces, ["kube-system"]);
        assert_eq!(c.meshpath.timeout_secs, 10);
        for (text, says) in [
            (r#"{"cniVersion":"1.0.0","name":"k8s","type":"meshpath-cni","node":"n1"}"#, "exactly one of"),
            (
                r#"{"cniVersion":"1.0.0","name":"k8s","type":"meshpath-cni","node":"n1","workloads":"/w","kubeconfig":"/k"}"#,
                "exactly one of",
            ),
            (r#"{"cniVersion":"1.0.0","name":"k8s","type":"bridge","node":"n1","workloads":"/w"}"#, "type \"bridge\""),
            (
                r#"{"cniVersion":"1.0.0","name":"k8s","type":"meshpath-cni","node":"n1","workload":"/w"}"#,
                "exactly one of",
            ),
            (r#"{"cniVersion":"1.0.0""#, "stdin"),
        ] {
            let e = NetConf::parse(text).expect_err(text);
            assert!(e.msg.contains(says), "{text}: {}", e.msg);
        }
    }

    #[test]
    fn the_previous_result_gives_the_host_side_and_the_pods_addresses() {
        // What the bridge plugin returns: the bridge and the veth on the host, eth0 in the pod.
        let bridge = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/cni-1"}
            ],
            "ips": [
                {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 2},
                {"address": "fd00:244:1::5/64", "interface": 2},
                {"address": "10.244.1.1/24", "interface": 0}
            ]
        });
        let r = PrevResult::parse(&bridge).expect("valid");
        assert_eq!(r.host_interfaces, ["cni0", "veth1234"]);
        assert_eq!(r.ips, ["10.244.1.5".parse::<IpAddr>().expect(""), "fd00:244:1::5".parse().expect("")]);
        let bad = json!({"ips": [{"address": "10.244.1.500/24"}]});
        assert!(PrevResult::parse(&bad).expect_err("bad address").msg.contains("10.244.1.500/24"));
        let out: Value = serde_json::from_str(&pass_through(&bridge, "1.1.0")).expect("json");
        assert_eq!(out["cniVersion"], "1.1.0");
        assert_eq!(out["ips"], bridge["ips"]);
    }
}
