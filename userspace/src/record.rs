//! What the proxy records of every connection it handled: the access log writes it, the
//! metrics count it, the tests read it. It lives below the proxy and the metrics so both
//! can use it.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// How a connection ended, as a stable code: `ok`, or why the proxy refused or lost it.
/// Logs, metrics (`reason` label) and tests use these codes, never message text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// A connection or stream to one of the proxy's own ports.
    SelfCall,
    /// A captured connection whose source is not (or no longer) an enrolled workload.
    UnknownSource,
    /// A captured pod the control plane has not described yet, still unknown after the
    /// bounded wait (istiod: its workload has not come by xDS).
    SourcePending,
    /// No workload of this node has the destination address.
    UnknownDestination,
    /// A hostname authority: meshpath resolves no service hostnames.
    UnknownService,
    /// A service address without a ready endpoint.
    NoEndpoint,
    /// The peer's proven identity is not the one its address belongs to (or the
    /// destination now has another identity than the tunnel's).
    IdentityMismatch,
    /// Plaintext to an enrolled pod on a node with the strict policy.
    PlaintextRefused,
    /// An authorization policy of the destination denied it.
    PolicyDenied,
    /// A destination behind a waypoint: refused until waypoint routing exists (sending it
    /// to the pod would bypass the waypoint's policy).
    WaypointUnsupported,
    /// An HBONE request that is not a CONNECT to `IP:port` of the dialed address.
    BadRequest,
    UpstreamConnectFailed,
    UpstreamConnectTimeout,
    /// No certificate for a local workload's identity.
    NoCertificate,
    TlsHandshakeFailed,
    TlsHandshakeTimeout,
    /// Opening an HBONE connection to the peer node failed (TCP, TLS or HTTP/2).
    HboneConnectFailed,
    /// The peer node answered the CONNECT with an error status, or not at all.
    HboneRefused,
    /// An HBONE connection that carried no CONNECT stream.
    NoStream,
    /// Either side reset the connection, or its stream, mid-relay.
    Reset,
    /// Refused at the door: the node's or the client address's connection limit is reached.
    OverLimit,
    /// Moved, both sockets, to a successor daemon during a takeover; the successor's record
    /// of the same connection (its bytes counted from the start) says how it ended.
    HandedOver,
    /// Ended by the daemon while open: still open at the drain's deadline, still open when
    /// the daemon stopped, or closed on request (`meshpath close`). Both sides are reset.
    Cut,
}

impl Outcome {
    pub const ALL: [Outcome; 24] = [
        Outcome::Ok,
        Outcome::SelfCall,
        Outcome::UnknownSource,
        Outcome::SourcePending,
        Outcome::UnknownDestination,
        Outcome::UnknownService,
        Outcome::NoEndpoint,
        Outcome::IdentityMismatch,
        Outcome::PlaintextRefused,
        Outcome::PolicyDenied,
        Outcome::WaypointUnsupported,
        Outcome::BadRequest,
        Outcome::UpstreamConnectFailed,
        Outcome::UpstreamConnectTimeout,
        Outcome::NoCertificate,
        Outcome::TlsHandshakeFailed,
        Outcome::TlsHandshakeTimeout,
        Outcome::HboneConnectFailed,
        Outcome::HboneRefused,
        Outcome::NoStream,
        Outcome::Reset,
        Outcome::OverLimit,
        Outcome::HandedOver,
        Outcome::Cut,
    ];

    /// The stable code (what the access log and the metrics carry).
    pub const fn code(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::SelfCall => "self_call",
            Outcome::UnknownSource => "unknown_source",
            Outcome::SourcePending => "source_pending",
            Outcome::UnknownDestination => "unknown_destination",
            Outcome::UnknownService => "unknown_service",
            Outcome::NoEndpoint => "no_endpoint",
            Outcome::IdentityMismatch => "identity_mismatch",
            Outcome::PlaintextRefused => "plaintext_refused",
            Outcome::PolicyDenied => "policy_denied",
            Outcome::WaypointUnsupported => "waypoint_unsupported",
            Outcome::BadRequest => "bad_request",
            Outcome::UpstreamConnectFailed => "upstream_connect_failed",
            Outcome::UpstreamConnectTimeout => "upstream_connect_timeout",
            Outcome::NoCertificate => "no_certificate",
            Outcome::TlsHandshakeFailed => "tls_handshake_failed",
            Outcome::TlsHandshakeTimeout => "tls_handshake_timeout",
            Outcome::HboneConnectFailed => "hbone_connect_failed",
            Outcome::HboneRefused => "hbone_refused",
            Outcome::NoStream => "no_stream",
            Outcome::Reset => "reset",
            Outcome::OverLimit => "over_limit",
            Outcome::HandedOver => "handed_over",
            Outcome::Cut => "cut",
        }
    }
}

/// What became of a connection that was open when its daemon stopped serving (a takeover or
/// a stop), or that a daemon took over from its predecessor. Stable codes, as [`Outcome`]'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DrainOutcome {
    /// Moved to the successor, both sockets (plain relays).
    HandedOver,
    /// Ended on its own within the drain deadline.
    Finished,
    /// Still open at the drain deadline: cut when the process exited.
    Cut,
    /// Taken over from a predecessor (counted by the successor).
    Adopted,
}

impl DrainOutcome {
    pub const ALL: [DrainOutcome; 4] =
        [DrainOutcome::HandedOver, DrainOutcome::Finished, DrainOutcome::Cut, DrainOutcome::Adopted];

    pub const fn code(self) -> &'static str {
        match self {
            DrainOutcome::HandedOver => "handed_over",
            DrainOutcome::Finished => "finished",
            DrainOutcome::Cut => "cut",
            DrainOutcome::Adopted => "adopted",
        }
    }
}

/// What became of the connections open when a daemon stopped serving (its own count, or its
/// predecessor's as the takeover reported it): the metrics count each under its
/// [`DrainOutcome`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainCounts {
    pub handed_over: u64,
    pub finished: u64,
    pub cut: u64,
}

impl DrainCounts {
    /// Each count with its outcome.
    pub fn by_outcome(&self) -> [(DrainOutcome, u64); 3] {
        [
            (DrainOutcome::HandedOver, self.handed_over),
            (DrainOutcome::Finished, self.finished),
            (DrainOutcome::Cut, self.cut),
        ]
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

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
    /// The address the client dialed when a NAT on this node (kube-proxy's for a Service,
    /// NodePort or external address; a hostPort) turned the connection toward `orig_dst`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<SocketAddr>,
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
    pub outcome: Outcome,
    /// What went wrong, in words, when the outcome is not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_serialized_names_and_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for o in Outcome::ALL {
            assert_eq!(serde_json::to_string(&o).expect("serializes"), format!("\"{}\"", o.code()));
            assert!(seen.insert(o.code()), "{o} twice");
        }
    }
}
