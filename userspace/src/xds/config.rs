//! The xDS client's settings, under the names ztunnel's chart and ztunnel itself give them
//! (`XDS_ADDRESS`, `CLUSTER_ID`, `POD_NAME`, `POD_NAMESPACE`, `NODE_NAME`, `INSTANCE_IP`,
//! `AUTH_TOKEN`, `XDS_ROOT_CA`, `ISTIO_META_*`), so a chart's values carry over; and the node
//! istiod is told about, as ztunnel describes itself.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;
use prost_types::value::Kind;
use prost_types::{Struct, Value};

use super::proto::envoy::service::discovery::v3::Node;

/// The cluster id when none is set (ztunnel's and istiod's default).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// Environment variables with this prefix become node metadata, without it (as in ztunnel).
pub const ISTIO_META_PREFIX: &str = "ISTIO_META_";
/// Port of an address given without one (it is a URI: https).
const DEFAULT_PORT: u16 = 443;

#[derive(Clone, Debug, Args)]
pub struct XdsArgs {
    /// istiod's workload xDS: `host:port` or `https://host:port`; the server's certificate
    /// must name `host`.
    #[arg(long, env = "XDS_ADDRESS", default_value = "istiod.istio-system.svc:15012")]
    pub xds_address: String,
    /// The cluster this node is in, sent to istiod (`clusterid` header, node metadata);
    /// `ISTIO_META_CLUSTER_ID`, which ztunnel's chart sets, takes precedence.
    #[arg(long, env = "CLUSTER_ID", default_value = DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,
    /// This node proxy's pod (the downward API's metadata.name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// This node proxy's namespace: istiod requires it to be the token's.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// The Kubernetes node this runs on (spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node proxy's pod IP (status.podIP).
    #[arg(long, env = "INSTANCE_IP")]
    pub instance_ip: Option<IpAddr>,
    /// The service-account token istiod authenticates (audience istio-ca); read again on
    /// every connection, as the kubelet rotates it.
    #[arg(long = "xds-token-file", env = "AUTH_TOKEN", default_value = "/var/run/secrets/tokens/istio-token")]
    pub token_file: PathBuf,
    /// The mesh root (PEM) istiod's certificate must chain to; read again on every connection.
    #[arg(long = "xds-root-cert", env = "XDS_ROOT_CA", default_value = "/var/run/secrets/istio/root-cert.pem")]
    pub root_cert: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not set: istiod identifies this node proxy by it")]
    Missing(&'static str),
    #[error("{var}={value:?} cannot be part of the node id (no '~', not empty)")]
    BadName { var: &'static str, value: String },
    #[error("XDS_ADDRESS={address:?}: {reason}")]
    Address { address: String, reason: String },
}

/// Where istiod is: the host (also the name its certificate must carry) and the port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsAddress {
    pub host: String,
    pub port: u16,
}

impl XdsAddress {
    /// Parses `host:port`, `https://host:port` or `https://[v6]:port`; plaintext is refused.
    pub fn parse(address: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::Address { address: address.to_owned(), reason: reason.to_owned() };
        let full = if address.contains("://") { address.to_owned() } else { format!("https://{address}") };
        let uri: http::Uri = full.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("istiod is reached over TLS only (https)"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("an address has no path"));
        }
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        // `Uri::port` is silent about a port that is not a number.
        let port = match uri.authority().and_then(|a| a.as_str().rsplit_once(':')).filter(|(_, p)| !p.contains(']')) {
            None => DEFAULT_PORT,
            Some((_, p)) => p.parse().map_err(|_| bad("the port is not a number"))?,
        };
        Ok(Self { host, port })
    }
}

impl fmt::Display for XdsAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => write!(f, "[{}]:{}", self.host, self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// Everything the client needs, checked.
#[derive(Clone, Debug)]
pub struct XdsSettings {
    pub address: XdsAddress,
    pub cluster_id: String,
    pub token_file: PathBuf,
    pub root_cert: PathBuf,
    pub node: Node,
}

impl XdsArgs {
    /// The checked settings; `env` is the process environment (its `ISTIO_META_*` entries
    /// become node metadata).
    pub fn settings(&self, env: impl IntoIterator<Item = (String, String)>) -> Result<XdsSettings, ConfigError> {
        let address = XdsAddress::parse(&self.xds_address)?;
        let meta = istio_meta(env);
        let cluster_id = meta.get("CLUSTER_ID").cloned().unwrap_or_else(|| self.cluster_id.clone());
        let pod = ProxyPod {
            name: id_part("POD_NAME", self.pod_name.as_deref())?,
            namespace: id_part("POD_NAMESPACE", self.pod_namespace.as_deref())?,
            node_name: self.node_name.clone().filter(|n| !n.is_empty()).ok_or(ConfigError::Missing("NODE_NAME"))?,
            ip: self.instance_ip.ok_or(ConfigError::Missing("INSTANCE_IP"))?,
        };
        let node = pod.node(&cluster_id, meta);
        Ok(XdsSettings {
            address,
            cluster_id,
            token_file: self.token_file.clone(),
            root_cert: self.root_cert.clone(),
            node,
        })
    }
}

/// This node proxy's own pod, as the node id and metadata describe it.
struct ProxyPod {
    name: String,
    namespace: String,
    node_name: String,
    ip: IpAddr,
}

impl ProxyPod {
    /// ztunnel's node: `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` (istiod reads the type
    /// and the namespace from it), metadata with the pod's names, then every `ISTIO_META_*`.
    fn node(&self, cluster_id: &str, meta: BTreeMap<String, String>) -> Node {
        let ip = self.ip.to_string();
        let mut fields: BTreeMap<String, String> = [
            ("NAME", self.name.as_str()),
            ("NAMESPACE", self.namespace.as_str()),
            ("INSTANCE_IPS", ip.as_str()),
            ("NODE_NAME", self.node_name.as_str()),
            ("CLUSTER_ID", cluster_id),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        fields.extend(meta);
        let fields = fields.into_iter().map(|(k, v)| (k, Value { kind: Some(Kind::StringValue(v)) })).collect();
        Node {
            id: format!("ztunnel~{ip}~{}.{ns}~{ns}.svc.cluster.local", self.name, ns = self.namespace),
            metadata: Some(Struct { fields }),
        }
    }
}

/// The `ISTIO_META_*` variables of `env`, without the prefix.
fn istio_meta(env: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    env.into_iter()
        .filter_map(|(k, v)| k.strip_prefix(ISTIO_META_PREFIX).filter(|k| !k.is_empty()).map(|k| (k.to_owned(), v)))
        .collect()
}

fn id_part(var: &'static str, value: Option<&str>) -> Result<String, ConfigError> {
    let value = value.ok_or(ConfigError::Missing(var))?;
    if value.is_empty() || value.contains('~') {
        return Err(ConfigError::BadName { var, value: value.to_owned() });
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        xds: XdsArgs,
    }

    fn args(extra: &[&str]) -> XdsArgs {
        let base = ["t", "--pod-name", "mp-abc", "--pod-namespace", "istio-system", "--node-name", "n1"];
        let all: Vec<&str> = base.iter().chain(["--instance-ip", "10.0.0.5"].iter()).chain(extra).copied().collect();
        Cli::try_parse_from(all).expect("parses").xds
    }

    fn meta(node: &Node) -> BTreeMap<String, String> {
        let fields = &node.metadata.as_ref().expect("metadata").fields;
        fields
            .iter()
            .map(|(k, v)| match &v.kind {
                Some(Kind::StringValue(s)) => (k.clone(), s.clone()),
                other => panic!("{k} is not a string: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_node_is_described_as_ztunnel_describes_itself() {
        let env = [("ISTIO_META_DNS_CAPTURE", "true"), ("PATH", "/bin"), ("ISTIO_META_", "x")];
        let s = args(&[]).settings(env.map(|(k, v)| (k.to_owned(), v.to_owned()))).expect("settings");
        assert_eq!(s.node.id, "ztunnel~10.0.0.5~mp-abc.istio-system~istio-system.svc.cluster.local");
        let expected: BTreeMap<String, String> = [
            ("NAME", "mp-abc"),
            ("NAMESPACE", "istio-system"),
            ("INSTANCE_IPS", "10.0.0.5"),
            ("NODE_NAME", "n1"),
            ("CLUSTER_ID", "Kubernetes"),
            ("DNS_CAPTURE", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(meta(&s.node), expected);
        assert_eq!(s.address, XdsAddress { host: "istiod.istio-system.svc".into(), port: 15012 });
        assert_eq!(s.token_file, PathBuf::from("/var/run/secrets/tokens/istio-token"));
        assert_eq!(s.root_cert, PathBuf::from("/var/run/secrets/istio/root-cert.pem"));
    }

    #[test]
    fn istio_meta_cluster_id_wins_over_cluster_id() {
        let env = [("ISTIO_META_CLUSTER_ID".to_owned(), "east".to_owned())];
        let s = args(&["--cluster-id", "west"]).settings(env).expect("settings");
        assert_eq!(s.cluster_id, "east");
        assert_eq!(meta(&s.node)["CLUSTER_ID"], "east");
        let s = args(&["--cluster-id", "west"]).settings([]).expect("settings");
        assert_eq!((s.cluster_id.as_str(), meta(&s.node)["CLUSTER_ID"].as_str()), ("west", "west"));
    }

    #[test]
    fn a_node_without_its_pod_is_refused_naming_what_is_missing() {
        let none = Cli::try_parse_from(["t"]).expect("parses").xds;
        let err = none.settings([]).expect_err("refused").to_string();
        assert!(err.starts_with("POD_NAME is not set"), "{err}");
        let mut tilde = args(&[]);
        tilde.pod_namespace = Some("a~b".into());
        let err = tilde.settings([]).expect_err("refused").to_string();
        assert!(err.contains("POD_NAMESPACE=\"a~b\""), "{err}");
    }

    #[test]
    fn addresses_parse_as_ztunnel_takes_them() {
        let ok = [
            ("istiod.istio-system.svc:15012", "istiod.istio-system.svc", 15012),
            ("https://istiod:15012", "istiod", 15012),
            ("https://istiod", "istiod", 443),
            ("[::1]:15012", "::1", 15012),
            ("127.0.0.1:9", "127.0.0.1", 9),
        ];
        for (text, host, port) in ok {
            let a = XdsAddress::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((a.host.as_str(), a.port), (host, port), "{text}");
        }
        assert_eq!(XdsAddress::parse("[::1]:15012").expect("parses").to_string(), "[::1]:15012");
        for bad in ["http://istiod:15010", "https://istiod:15012/path", "https://:15012", "istiod:notaport"] {
            assert!(XdsAddress::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
