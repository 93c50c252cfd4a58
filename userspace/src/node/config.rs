//! `meshpath node`'s settings, defined once: the command line parses straight into them
//! (every flag is also a `MESHPATH_*` environment variable, which is how a DaemonSet sets
//! them), and the daemon hands each part on whole (the proxy its [`ProxyFlags`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;

use super::source::{IstiodSource, Source};
use crate::datapath::AttachMode;
use crate::flags;
use crate::identity::istiod::{IstiodCa, IstiodCaArgs};
use crate::identity::{CertificateProvider, IdentityError, ca, files};
use crate::policy::PolicyDefaults;
use crate::policy::istio::MtlsMode;
use crate::proxy::ProxyFlags;
use crate::xds::config::{ConfigError, XdsArgs};

#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    #[error("--{0} cannot be used with --control-plane istiod (istiod's CA issues the certificates)")]
    NotWithIstiod(&'static str),
    #[error(
        "--{0} cannot be used with --control-plane istiod (istiod's PeerAuthentication and AuthorizationPolicy objects decide)"
    )]
    PolicyWithIstiod(&'static str),
    #[error("--workloads cannot be used with --control-plane istiod: capture follows Kubernetes, the mesh istiod")]
    WorkloadFileWithIstiod,
    #[error(transparent)]
    Xds(#[from] ConfigError),
}

#[derive(Clone, Debug, Args)]
pub struct NodeConfig {
    /// Name of this node (the pin directory /sys/fs/bpf/meshpath/<node>).
    #[arg(long, env = "MESHPATH_NODE", default_value_t = flags::hostname())]
    pub node: String,
    /// Who says what the mesh is: meshpath itself (the built-in CA, and Kubernetes or the
    /// workload file), or istiod (its workload xDS and CA; capture still follows Kubernetes).
    #[arg(long, env = "MESHPATH_CONTROL_PLANE", default_value = "standalone")]
    pub control_plane: ControlPlane,
    #[command(flatten, next_help_heading = "istiod (--control-plane istiod)")]
    pub xds: XdsArgs,
    #[command(flatten, next_help_heading = "istiod (--control-plane istiod)")]
    pub istiod_ca: IstiodCaArgs,
    /// YAML file listing the enrolled workloads; changes are applied live. Without it,
    /// meshpath follows the Kubernetes API (KUBECONFIG, ~/.kube/config or in-cluster).
    #[arg(long, env = "MESHPATH_WORKLOADS")]
    pub workloads: Option<PathBuf>,
    /// Interfaces to classify on (default: every non-loopback interface, as they come).
    #[arg(long = "interface", env = "MESHPATH_INTERFACES", value_delimiter = ',')]
    pub interfaces: Vec<String>,
    /// Pod networks; outbound connections to them keep the client pod's source IP.
    #[arg(long = "pod-cidr", env = "MESHPATH_POD_CIDRS", value_delimiter = ',')]
    pub pod_cidrs: Vec<IpNet>,
    /// Where pods' network namespaces are pinned (ip netns, containerd, CRI-O): behind a pod
    /// bridge (flannel's cni0), each pod's port is read from its namespace.
    #[arg(long, env = "MESHPATH_NETNS_DIR", default_value = "/run/netns")]
    pub netns_dir: PathBuf,
    /// Append one JSON line per finished connection to this file.
    #[arg(long, env = "MESHPATH_ACCESS_LOG")]
    pub access_log: Option<PathBuf>,
    #[arg(long, env = "MESHPATH_READINESS_PORT", default_value_t = meshpath_common::names::PORT_READINESS)]
    pub readiness_port: u16,
    /// Port of the Prometheus endpoint (`/metrics`), on every address of the node.
    #[arg(long, env = "MESHPATH_METRICS_PORT", default_value_t = meshpath_common::names::PORT_METRICS)]
    pub metrics_port: u16,
    /// How often the workload file is checked for changes (the kernel's interfaces and routes
    /// are followed by notification).
    #[arg(long = "poll-interval-ms", value_name = "MS", env = "MESHPATH_POLL_INTERVAL_MS", default_value = "250", value_parser = flags::millis(10..=60_000))]
    pub poll_interval: Duration,
    /// How to attach the TC classifier: TCX where the kernel has it (auto), or force one.
    #[arg(long, env = "MESHPATH_TC_ATTACH", default_value = "auto")]
    pub tc_attach: TcAttach,
    /// Trust domain of workload identities (spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
    #[arg(long, env = "MESHPATH_TRUST_DOMAIN", default_value = "cluster.local", value_parser = flags::trust_domain)]
    pub trust_domain: String,
    /// Built-in CA: directory of its root (root-cert.pem, root-key.pem), created there if
    /// absent. Without it (and without --cert-dir) the root lives in memory and only this
    /// node trusts it.
    #[arg(long, env = "MESHPATH_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Read workload certificates from <dir>/<namespace>/<service-account>/ instead of
    /// minting them (cert-chain.pem, key.pem, root-cert.pem; reloaded when they change).
    #[arg(long, env = "MESHPATH_CERT_DIR", conflicts_with = "ca_dir")]
    pub cert_dir: Option<PathBuf>,
    /// Lifetime of certificates the built-in CA mints; they are renewed at half-life.
    #[arg(long = "cert-ttl-secs", value_name = "SECS", env = "MESHPATH_CERT_TTL_SECS", default_value = "86400", value_parser = flags::secs(10..=365 * 24 * 3600))]
    pub cert_ttl: Duration,
    /// The mesh-wide PeerAuthentication mode, where no PeerAuthentication sets one: plaintext
    /// to enrolled pods delivered (`permissive`) or refused (`strict`). [default: permissive]
    #[arg(long = "inbound-plaintext", env = "MESHPATH_INBOUND_PLAINTEXT")]
    pub inbound_plaintext: Option<PlaintextDefault>,
    /// Istio's root namespace: its AuthorizationPolicies without selector apply to the whole
    /// mesh, its PeerAuthentication without selector sets the mesh-wide mode. [default: istio-system]
    #[arg(long, env = "MESHPATH_ROOT_NAMESPACE", value_parser = flags::dns_label)]
    pub root_namespace: Option<String>,
    #[command(flatten)]
    pub proxy: ProxyFlags,
    /// Run only the proxy, without loading or touching the datapath: connections must reach
    /// its listeners some other way. For the benchmarks' iptables baselines (TPROXY rules
    /// deliver to the same proxy); not for a node (docs/benchmarks.md).
    #[arg(long, env = "MESHPATH_PROXY_ONLY", hide = true)]
    pub proxy_only: bool,
    /// On SIGTERM, how long open connections and HBONE streams may finish (new ones are
    /// refused at once, until a successor serves); keep it under the pod's
    /// terminationGracePeriodSeconds. 0 exits at once, cutting them.
    #[arg(long = "drain-timeout-secs", value_name = "SECS", env = "MESHPATH_DRAIN_TIMEOUT_SECS", default_value = "5", value_parser = flags::secs(0..=3600))]
    pub drain_timeout: Duration,
    /// How long a workload IP that leaves the desired state stays captured, in case it comes
    /// back (a file written in place, a watch relisting); released at once when its pod's
    /// interface or namespace is gone, or another pod takes the address. 0 releases at once.
    #[arg(long = "release-hold-secs", value_name = "SECS", env = "MESHPATH_RELEASE_HOLD_SECS", default_value = "5", value_parser = flags::secs(0..=300))]
    pub release_hold: Duration,
}

/// The mesh-wide mTLS mode for plaintext to enrolled pods, before any PeerAuthentication.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PlaintextDefault {
    /// Deliver it, recorded as not mTLS (Istio's default, PeerAuthentication PERMISSIVE).
    #[default]
    Permissive,
    /// Refuse it: enrolled pods accept only mTLS (PeerAuthentication STRICT).
    Strict,
}

/// Istio's default root namespace.
const ROOT_NAMESPACE: &str = "istio-system";

/// Who says what the mesh is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ControlPlane {
    /// The built-in CA (or certificate files), and Kubernetes or the workload file.
    Standalone,
    /// istiod: workloads, services and policies by xDS, certificates from its CA.
    Istiod,
}

/// How long a captured connection waits for istiod to describe its source pod.
const SOURCE_WAIT: Duration = Duration::from_secs(5);

/// How the classifier is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX where the kernel has it, else netlink.
    Auto,
    Tcx,
    /// clsact qdisc + cls_bpf filter over netlink (kernels before 6.6).
    Netlink,
}

impl NodeConfig {
    /// Checks the settings of the control plane chosen; `env` is the process environment
    /// (its `ISTIO_META_*` entries become xDS node metadata).
    pub fn check(&mut self, env: impl IntoIterator<Item = (String, String)>) -> Result<(), NodeConfigError> {
        if self.control_plane == ControlPlane::Standalone {
            return Ok(());
        }
        for (flag, set) in [("ca-dir", self.ca_dir.is_some()), ("cert-dir", self.cert_dir.is_some())] {
            if set {
                return Err(NodeConfigError::NotWithIstiod(flag));
            }
        }
        if self.workloads.is_some() {
            return Err(NodeConfigError::WorkloadFileWithIstiod);
        }
        let policy_flags = [
            ("inbound-plaintext", self.inbound_plaintext.is_some()),
            ("root-namespace", self.root_namespace.is_some()),
        ];
        if let Some((flag, _)) = policy_flags.into_iter().find(|(_, set)| *set) {
            return Err(NodeConfigError::PolicyWithIstiod(flag));
        }
        self.xds.node_name.get_or_insert_with(|| self.node.clone());
        let settings = self.xds.settings(env)?;
        // The CA takes the cluster and the token from the xDS settings: one definition each.
        self.istiod_ca.cluster_id = settings.cluster_id.clone();
        self.istiod_ca.token = settings.token_file.clone();
        Ok(())
    }

    /// Where the desired state comes from (after [`NodeConfig::check`]).
    pub fn source(&self) -> Result<Source, NodeConfigError> {
        Ok(match (&self.control_plane, &self.workloads) {
            (ControlPlane::Istiod, _) => Source::Istiod(Box::new(IstiodSource {
                node: self.node.clone(),
                trust_domain: self.trust_domain.clone(),
                xds: self.xds.settings(std::env::vars())?,
            })),
            (ControlPlane::Standalone, Some(path)) => Source::File(path.clone(), self.policy_defaults()),
            (ControlPlane::Standalone, None) => Source::Kubernetes(self.policy_defaults()),
        })
    }

    /// What standalone policies start from, before any Kubernetes object.
    pub fn policy_defaults(&self) -> PolicyDefaults {
        let mode = match self.inbound_plaintext.unwrap_or_default() {
            PlaintextDefault::Permissive => MtlsMode::Permissive,
            PlaintextDefault::Strict => MtlsMode::Strict,
        };
        let root_namespace = self.root_namespace.clone().unwrap_or_else(|| ROOT_NAMESPACE.to_owned());
        PolicyDefaults { root_namespace, mode }
    }

    /// How long a captured connection waits for the control plane to describe its source.
    pub fn source_wait(&self) -> Duration {
        match self.control_plane {
            ControlPlane::Istiod => SOURCE_WAIT,
            ControlPlane::Standalone => Duration::ZERO,
        }
    }

    pub fn attach_mode(&self) -> AttachMode {
        match self.tc_attach {
            TcAttach::Auto => AttachMode::detect(),
            TcAttach::Tcx => AttachMode::Tcx,
            TcAttach::Netlink => AttachMode::Netlink,
        }
    }

    /// Where workload certificates come from.
    pub fn certificates(&self) -> CertSource {
        match (&self.control_plane, &self.cert_dir) {
            (ControlPlane::Istiod, _) => CertSource::Istiod(Box::new(self.istiod_ca.clone())),
            (ControlPlane::Standalone, Some(dir)) => CertSource::Files { dir: dir.clone() },
            (ControlPlane::Standalone, None) => CertSource::BuiltinCa { dir: self.ca_dir.clone(), ttl: self.cert_ttl },
        }
    }
}

/// Where workload certificates come from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// The built-in CA, with its root in `dir` (created there if absent) or in memory.
    BuiltinCa { dir: Option<PathBuf>, ttl: Duration },
    /// `<dir>/<namespace>/<service-account>/{cert-chain,key,root-cert}.pem`.
    Files { dir: PathBuf },
    /// istiod's CA.
    Istiod(Box<IstiodCaArgs>),
}

impl CertSource {
    pub fn provider(&self, trust_domain: &str) -> Result<Box<dyn CertificateProvider>, IdentityError> {
        Ok(match self {
            CertSource::BuiltinCa { dir, ttl } => {
                let ca = ca::BuiltinCa::open(dir.as_deref(), trust_domain, *ttl)?;
                tracing::info!(root = %ca.origin, ttl = ?ttl, "workload certificates come from the built-in CA");
                Box::new(ca::CaProvider(ca))
            }
            CertSource::Files { dir } => {
                tracing::info!(dir = %dir.display(), "workload certificates come from files");
                Box::new(files::FileProvider::new(dir)?)
            }
            CertSource::Istiod(args) => {
                tracing::info!(address = %args.address, ttl = ?args.ttl, "workload certificates come from istiod's CA");
                Box::new(IstiodCa::new(args.as_ref().clone())?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Node {
        #[command(flatten)]
        cfg: NodeConfig,
    }

    fn parse(args: &[&str]) -> NodeConfig {
        Node::try_parse_from(std::iter::once("node").chain(args.iter().copied())).expect("parses").cfg
    }

    fn defaults(root: &str, mode: MtlsMode) -> PolicyDefaults {
        PolicyDefaults { root_namespace: root.into(), mode }
    }

    #[test]
    fn policy_defaults_standalone_and_refused_under_istiod() {
        assert_eq!(parse(&[]).policy_defaults(), defaults("istio-system", MtlsMode::Permissive));
        let set = parse(&["--inbound-plaintext", "strict", "--root-namespace", "mesh-root"]);
        assert_eq!(set.policy_defaults(), defaults("mesh-root", MtlsMode::Strict));
        for (flag, value) in [("--inbound-plaintext", "permissive"), ("--root-namespace", "istio-system")] {
            let mut cfg = parse(&["--control-plane", "istiod", flag, value]);
            let err = cfg.check(Vec::new()).expect_err("refused under istiod");
            assert!(matches!(err, NodeConfigError::PolicyWithIstiod(f) if format!("--{f}") == flag), "{err}");
        }
        assert!(Node::try_parse_from(["node", "--root-namespace", "Istio-System"]).is_err());
        assert!(Node::try_parse_from(["node", "--inbound-plaintext", "disable"]).is_err());
    }
}
