//! One JSON line per finished connection: what the proxy saw and did. This is the evidence
//! the lab and the tests read to prove a connection went through the proxy.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// Unix time in milliseconds when the connection was accepted.
    pub start_ms: u64,
    pub duration_ms: u64,
    pub node: String,
    /// Listener role that accepted it (`outbound`, `inbound_plain`, `hbone`).
    pub listener: String,
    /// The client as the proxy saw it (peer address of the accepted socket).
    pub src: SocketAddr,
    /// The original destination (local address of the accepted socket).
    pub orig_dst: SocketAddr,
    /// Workload identities, when known.
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    /// The service (`namespace/name`) when the destination was a service address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_service: Option<String>,
    /// SPIFFE identities: proven by the peer's certificate on HBONE, taken from the
    /// workload index elsewhere.
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    /// Whether the bytes crossed the network inside mutual TLS.
    pub mtls: bool,
    /// Local address of the upstream connection, when one was made.
    pub upstream_src: Option<SocketAddr>,
    /// Bytes from client to upstream, and back.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// `ok`, or what went wrong.
    pub outcome: String,
    /// Whether the connection was counted as opened in the metrics (so its close is too).
    #[serde(skip)]
    pub opened: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("opening access log {path}: {source}")]
pub struct AccessLogError {
    path: String,
    source: std::io::Error,
}

/// Where records go: a file (appended) or nowhere but `tracing`.
pub struct AccessLog {
    file: Option<Mutex<std::fs::File>>,
}

impl AccessLog {
    pub fn open(path: Option<&Path>) -> Result<Self, AccessLogError> {
        let file = match path {
            None => None,
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| AccessLogError { path: p.display().to_string(), source })?,
            )),
        };
        Ok(Self { file })
    }

    pub fn record(&self, r: &ConnectionRecord) {
        tracing::info!(
            target: "access",
            listener = %r.listener,
            src = %r.src,
            orig_dst = %r.orig_dst,
            src_workload = r.src_workload.as_deref().unwrap_or("-"),
            dst_workload = r.dst_workload.as_deref().unwrap_or("-"),
            dst_service = r.dst_service.as_deref().unwrap_or("-"),
            src_identity = r.src_identity.as_deref().unwrap_or("-"),
            dst_identity = r.dst_identity.as_deref().unwrap_or("-"),
            mtls = r.mtls,
            bytes_sent = r.bytes_sent,
            bytes_received = r.bytes_received,
            duration_ms = r.duration_ms,
            outcome = %r.outcome,
            "connection closed"
        );
        if let Some(f) = &self.file {
            let mut line = serde_json::to_vec(r).expect("a record always serializes");
            line.push(b'\n');
            // One write per line keeps lines whole under O_APPEND.
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = f.write_all(&line) {
                tracing::warn!(error = %e, "writing the access log failed");
            }
        }
    }
}

/// Reads every record of an access log file (for tests and the lab).
pub fn read_records(path: &Path) -> std::io::Result<Vec<ConnectionRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    // A line still being written has no newline yet: leave it for the next read.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
        .collect()
}
