//! One JSON line per finished connection: what the proxy saw and did. This is the evidence
//! the lab and the tests read to prove a connection went through the proxy.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::record::{ConnectionRecord, Outcome};
use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
#[error("opening access log {path}: {source}")]
pub struct AccessLogError {
    path: String,
    source: std::io::Error,
}

/// Where records go: a file (appended) and `tracing`; failures are rate-limited in both.
pub struct AccessLog {
    file: Option<Mutex<std::fs::File>>,
    failures: Failures,
}

/// Failed connections logged per outcome and interval before the rest are only counted.
const FAILURES_PER_INTERVAL: u32 = 10;
const FAILURE_INTERVAL: Duration = Duration::from_secs(10);

/// Per outcome: the current interval's start, lines written in it, lines held back.
#[derive(Default)]
struct Failures(Mutex<HashMap<Outcome, Window>>);

type Window = (Option<Instant>, u32, u64);

impl Failures {
    /// Whether a failed connection with `outcome` gets its own line; the first one after a
    /// held-back stretch also says how many were held back.
    fn allow(&self, outcome: Outcome) -> bool {
        let mut map = lock(&self.0);
        let (start, written, held) = map.entry(outcome).or_default();
        if start.is_none_or(|s| s.elapsed() >= FAILURE_INTERVAL) {
            if *held > 0 {
                tracing::info!(target: "access", %outcome, held_back = *held, "connections ended {outcome} without a line each");
            }
            *start = Some(Instant::now());
            *written = 0;
            *held = 0;
        }
        if *written < FAILURES_PER_INTERVAL {
            *written += 1;
            true
        } else {
            *held += 1;
            false
        }
    }
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
        Ok(Self { file, failures: Failures::default() })
    }

    pub fn record(&self, r: &ConnectionRecord) {
        // A flood of refusals is a summary line per interval (see `Failures`), not a line
        // each, in the log and in the file alike. A relay handed to a successor is no
        // failure, and a cut is the daemon's doing (no client can cause a flood of them):
        // their records always go.
        if !matches!(r.outcome, Outcome::Ok | Outcome::HandedOver | Outcome::Cut) && !self.failures.allow(r.outcome) {
            return;
        }
        tracing::info!(
            target: "access",
            listener = %r.listener,
            src = %r.src,
            orig_dst = %r.orig_dst,
            frontend = %r.frontend.map_or_else(|| "-".to_owned(), |f| f.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_one_failure_gets_a_few_lines_then_a_count() {
        let f = Failures::default();
        let allowed = (0..1000).filter(|_| f.allow(Outcome::PlaintextRefused)).count();
        assert_eq!(allowed, FAILURES_PER_INTERVAL as usize);
        assert_eq!(lock(&f.0)[&Outcome::PlaintextRefused].2, 1000 - u64::from(FAILURES_PER_INTERVAL));
        // Another outcome has its own allowance.
        assert!(f.allow(Outcome::SelfCall));
    }
}
