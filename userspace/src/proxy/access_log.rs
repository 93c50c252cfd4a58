//! One JSON line per finished connection: what the proxy saw and did. This is the evidence
//! the lab and the tests read to prove a connection went through the proxy.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use crate::record::ConnectionRecord;
use crate::sync::lock;

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
            error = r.error.as_deref().unwrap_or("-"),
            "connection closed"
        );
        if let Some(f) = &self.file {
            let mut line = serde_json::to_vec(r).expect("a record always serializes");
            line.push(b'\n');
            // One write per line keeps lines whole under O_APPEND.
            let mut f = lock(f);
            if let Err(e) = f.write_all(&line) {
                tracing::warn!(error = %e, "writing the access log failed");
            }
        }
    }
}
