//! Prometheus metrics, served on 15020 `/metrics`: Istio's TCP metrics with its standard
//! labels (as far as meshpath knows them), the datapath's kernel counters, and the HBONE
//! pool's occupancy.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::record::{ConnectionRecord, DrainOutcome, Outcome};

/// Istio's standard labels for TCP metrics, those meshpath can fill. Unknown values are
/// `unknown`, as Istio writes them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` on the client's node (outbound), `destination` on the server's.
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub request_protocol: &'static str,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    pub fn of(rec: &ConnectionRecord) -> Self {
        let split = |w: &Option<String>| match w.as_deref().and_then(|w| w.split_once('/')) {
            Some((ns, name)) => (name.to_owned(), ns.to_owned()),
            None => ("unknown".to_owned(), "unknown".to_owned()),
        };
        let (source_workload, source_workload_namespace) = split(&rec.src_workload);
        let (destination_workload, destination_workload_namespace) = split(&rec.dst_workload);
        let principal = |p: &Option<String>| p.clone().unwrap_or_else(|| "unknown".into());
        Self {
            reporter: if rec.listener == meshpath_common::Listener::Outbound.name() { "source" } else { "destination" },
            source_workload,
            source_workload_namespace,
            source_principal: principal(&rec.src_identity),
            destination_workload,
            destination_workload_namespace,
            destination_principal: principal(&rec.dst_identity),
            request_protocol: "tcp",
            connection_security_policy: if rec.mtls { "mutual_tls" } else { "none" },
        }
    }
}

/// One open connection's labelled series, looked up once when it opens: its bytes are then
/// counted as they move, one atomic add per chunk, with no lookup (a connection that lives
/// for hours shows its bytes all along, not at its close).
#[derive(Clone, Debug)]
pub struct ConnCounters {
    closed: Counter,
    /// Istio's `received_bytes`: client to server.
    request: Counter,
    /// Istio's `sent_bytes`: server to client.
    response: Counter,
}

impl ConnCounters {
    /// Bytes the client sent towards the server.
    pub fn request(&self, n: u64) {
        self.request.inc_by(n);
    }

    /// Bytes the server sent back.
    pub fn response(&self, n: u64) {
        self.response.inc_by(n);
    }

    pub fn closed(&self) {
        self.closed.inc();
    }
}

/// HBONE pool occupancy, for metrics and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub connections: usize,
    pub streams: usize,
}

/// Labels of connections that did not end `ok`: the listener and the outcome's code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub listener: String,
    pub reason: &'static str,
}

/// Labels of connections a stop or takeover dealt with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DrainLabels {
    pub outcome: &'static str,
}

/// Where the scrape-time figures come from.
pub trait Sources: Send + Sync + 'static {
    /// The datapath's kernel counters, by name.
    fn datapath_counters(&self) -> Option<Vec<(&'static str, u64)>>;
    fn pool(&self) -> PoolStats;
    /// Connections (and HBONE streams) the proxy holds, and its limit.
    fn connections(&self) -> (usize, usize);
    /// The control plane's stream and the mesh it described (`None` without one).
    fn control_plane(&self) -> Option<ControlPlaneStats>;
}

/// What the metrics show of istiod's stream and of the mesh it describes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ControlPlaneStats {
    pub connected: bool,
    pub attempts: u64,
    pub nacks: u64,
    /// Workload and service addresses the node knows.
    pub workload_addresses: usize,
    pub service_addresses: usize,
}

pub struct Metrics {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    failed: Family<FailureLabels, Counter>,
    drained: Family<DrainLabels, Counter>,
    sources: Arc<OnceLock<Box<dyn Sources>>>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let (opened, closed, sent, received) =
            (Family::default(), Family::default(), Family::default(), Family::default());
        registry.register("istio_tcp_connections_opened", "Total TCP connections opened", opened.clone());
        registry.register("istio_tcp_connections_closed", "Total TCP connections closed", closed.clone());
        // Istio's meaning: "sent" is the response (server to client), "received" the request.
        registry.register("istio_tcp_sent_bytes", "Bytes sent during response of TCP connections", sent.clone());
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during request of TCP connections",
            received.clone(),
        );
        let failed = Family::default();
        registry.register(
            "meshpath_connections_failed",
            "Connections and HBONE streams the proxy refused or lost, by listener and reason code",
            failed.clone(),
        );
        let drained = Family::default();
        registry.register(
            "meshpath_drain_connections",
            "Connections open when this daemon stopped serving, by what became of them (handed_over to the \
             successor, finished within the drain, cut at its deadline), and those it adopted from its predecessor",
            drained.clone(),
        );
        let sources: Arc<OnceLock<Box<dyn Sources>>> = Arc::default();
        registry.register_collector(Box::new(ScrapeTime(sources.clone())));
        Arc::new(Self { registry, opened, closed, sent, received, failed, drained, sources })
    }

    /// Tells the metrics where the datapath and the pool are (once, when they exist).
    pub fn set_sources(&self, s: impl Sources) {
        let _ = self.sources.set(Box::new(s));
    }

    /// Counts a connection as opened under `labels`, and gives the series its bytes and its
    /// close are counted in.
    pub fn open(&self, labels: &TcpLabels) -> ConnCounters {
        self.opened.get_or_create(labels).inc();
        ConnCounters {
            closed: self.closed.get_or_create(labels).clone(),
            request: self.received.get_or_create(labels).clone(),
            response: self.sent.get_or_create(labels).clone(),
        }
    }

    /// Counts `n` connections of a stop or takeover under what became of them.
    pub fn drained(&self, outcome: DrainOutcome, n: u64) {
        self.drained.get_or_create(&DrainLabels { outcome: outcome.code() }).inc_by(n);
    }

    /// Counts a connection that did not end `ok` (nor moved on to a successor) under its
    /// reason code.
    pub fn finished(&self, rec: &ConnectionRecord) {
        if !matches!(rec.outcome, Outcome::Ok | Outcome::HandedOver) {
            self.failed_at(&rec.listener, rec.outcome);
        }
    }

    /// Counts a connection of `listener` that failed with `outcome`, with no record (those
    /// refused at the door under a flood).
    pub fn failed_at(&self, listener: &str, outcome: Outcome) {
        let labels = FailureLabels { listener: listener.to_owned(), reason: outcome.code() };
        self.failed.get_or_create(&labels).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics failed: {e}");
        }
        out
    }
}

#[derive(Debug)]
struct ScrapeTime(Arc<OnceLock<Box<dyn Sources>>>);

impl std::fmt::Debug for dyn Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sources")
    }
}

impl Collector for ScrapeTime {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(s) = self.0.get() else { return Ok(()) };
        if let Some(counters) = s.datapath_counters() {
            for (name, value) in counters {
                let c = ConstCounter::new(value);
                let help = format!("Datapath kernel counter {name} (summed over CPUs)");
                c.encode(encoder.encode_descriptor(
                    &format!("meshpath_datapath_{name}"),
                    &help,
                    None,
                    c.metric_type(),
                )?)?;
            }
        }
        let pool = s.pool();
        let (open, limit) = s.connections();
        for (name, help, v) in [
            ("meshpath_hbone_pool_connections", "HBONE connections in the outbound pool", pool.connections),
            ("meshpath_hbone_pool_streams", "Streams open on pooled HBONE connections", pool.streams),
            ("meshpath_proxy_connections_open", "Connections and HBONE streams the proxy holds", open),
            ("meshpath_proxy_connections_limit", "Connections and HBONE streams the proxy holds at most", limit),
        ] {
            let g = ConstGauge::new(v as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        if let Some(cp) = s.control_plane() {
            encode_control_plane(&cp, &mut encoder)?;
        }
        Ok(())
    }
}

fn encode_control_plane(cp: &ControlPlaneStats, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    for (name, help, v) in [
        ("meshpath_xds_connection_attempts", "Connection attempts to istiod's xDS", cp.attempts),
        ("meshpath_xds_nacks", "xDS responses answered with a NACK", cp.nacks),
    ] {
        let c = ConstCounter::new(v);
        c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
    }
    for (name, help, v) in [
        ("meshpath_xds_connected", "1 while a stream to istiod's xDS is open", usize::from(cp.connected)),
        ("meshpath_mesh_workload_addresses", "Workload addresses the mesh description holds", cp.workload_addresses),
        ("meshpath_mesh_service_addresses", "Service addresses the mesh description holds", cp.service_addresses),
    ] {
        let g = ConstGauge::new(v as i64);
        g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(listener: &str, mtls: bool) -> ConnectionRecord {
        ConnectionRecord {
            start_ms: 0,
            duration_ms: 1,
            node: "n1".into(),
            listener: listener.into(),
            src: "10.0.0.1:1000".parse().unwrap(),
            orig_dst: "10.0.0.2:80".parse().unwrap(),
            frontend: None,
            src_workload: Some("shop/web-0".into()),
            dst_workload: None,
            dst_service: None,
            src_identity: Some("spiffe://td/ns/shop/sa/web".into()),
            dst_identity: None,
            mtls,
            upstream_src: None,
            bytes_sent: 100,
            bytes_received: 2000,
            outcome: Outcome::Ok,
            error: None,
        }
    }

    #[test]
    fn istio_names_and_labels() {
        let m = Metrics::new();
        let r = rec("outbound", true);
        let l = TcpLabels::of(&r);
        let c = m.open(&l);
        c.request(40);
        let text = m.render();
        let open = r#"{reporter="source",source_workload="web-0",source_workload_namespace="shop",source_principal="spiffe://td/ns/shop/sa/web",destination_workload="unknown",destination_workload_namespace="unknown",destination_principal="unknown",request_protocol="tcp",connection_security_policy="mutual_tls"}"#;
        assert!(
            text.lines().any(|l| l == format!("istio_tcp_received_bytes_total{open} 40")),
            "bytes show while the connection is open:\n{text}"
        );
        c.request(60);
        c.response(2000);
        c.closed();
        let text = m.render();
        let want = r#"{reporter="source",source_workload="web-0",source_workload_namespace="shop",source_principal="spiffe://td/ns/shop/sa/web",destination_workload="unknown",destination_workload_namespace="unknown",destination_principal="unknown",request_protocol="tcp",connection_security_policy="mutual_tls"}"#;
        for line in [
            format!("istio_tcp_connections_opened_total{want} 1"),
            format!("istio_tcp_connections_closed_total{want} 1"),
            format!("istio_tcp_received_bytes_total{want} 100"),
            format!("istio_tcp_sent_bytes_total{want} 2000"),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert_eq!(TcpLabels::of(&rec("hbone", true)).reporter, "destination");
        assert_eq!(TcpLabels::of(&rec("inbound_plain", false)).connection_security_policy, "none");
    }

    struct Fixed;
    impl Sources for Fixed {
        fn datapath_counters(&self) -> Option<Vec<(&'static str, u64)>> {
            Some(vec![("steered", 7)])
        }
        fn pool(&self) -> PoolStats {
            PoolStats { connections: 2, streams: 3 }
        }
        fn connections(&self) -> (usize, usize) {
            (4, 100)
        }
        fn control_plane(&self) -> Option<ControlPlaneStats> {
            let (workload_addresses, service_addresses) = (6, 2);
            Some(ControlPlaneStats { connected: true, attempts: 3, nacks: 1, workload_addresses, service_addresses })
        }
    }

    #[test]
    fn scrape_time_figures() {
        let m = Metrics::new();
        m.set_sources(Fixed);
        let text = m.render();
        for line in [
            "meshpath_datapath_steered_total 7",
            "meshpath_hbone_pool_connections 2",
            "meshpath_hbone_pool_streams 3",
            "meshpath_proxy_connections_open 4",
            "meshpath_proxy_connections_limit 100",
            "meshpath_xds_connection_attempts_total 3",
            "meshpath_xds_nacks_total 1",
            "meshpath_xds_connected 1",
            "meshpath_mesh_workload_addresses 6",
            "meshpath_mesh_service_addresses 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }
}
