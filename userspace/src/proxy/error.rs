//! Why the proxy refused or lost a connection. Each error has its stable
//! [`Outcome`] code (what the access log, the metrics and the tests use) and, on the HBONE
//! server, the HTTP status the stream is answered with.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use super::h2::RelayError;
use super::h2::client::ClientError;
use super::outbound::HboneConnectError;
use super::registry::Closed;
use crate::identity::IdentityError;
use crate::record::Outcome;
use crate::tls::TlsError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection to the proxy's own port {0}")]
    SelfCall(u16),
    #[error("the source {0} is not an enrolled workload")]
    UnknownSource(IpAddr),
    #[error("the control plane has not described the source {ip} after {waited:?}")]
    SourcePending { ip: IpAddr, waited: Duration },
    #[error("{0} is behind a waypoint, and meshpath does not route through waypoints yet")]
    Waypoint(String),
    #[error("no local workload has {0}")]
    UnknownDestination(IpAddr),
    #[error("no service {0:?} (hostnames are not resolved)")]
    UnknownService(String),
    #[error("service {0} has no ready endpoint")]
    NoEndpoint(String),
    #[error("{ip} belongs to {owner}, not to {presented}")]
    IdentityMismatch { ip: IpAddr, owner: String, presented: String },
    #[error("plaintext refused (strict mTLS)")]
    PlaintextRefused,
    #[error("denied by policy: {0}")]
    PolicyDenied(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("upstream connect to {dst} failed: {source}")]
    UpstreamConnect { dst: SocketAddr, source: std::io::Error },
    #[error("upstream connect to {dst} timed out after {after:?}")]
    UpstreamTimeout { dst: SocketAddr, after: Duration },
    #[error("no certificate for {identity}: {source}")]
    NoCertificate { identity: String, source: Box<IdentityError> },
    #[error("TLS set-up: {0}")]
    TlsConfig(TlsError),
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error("TLS handshake timed out after {0:?}")]
    TlsHandshakeTimeout(Duration),
    /// Shared: callers queued behind one failed connect all get its error.
    #[error("HBONE connection: {0}")]
    HboneConnect(Arc<HboneConnectError>),
    #[error("HBONE CONNECT {target}: {source}")]
    HboneStream { target: SocketAddr, source: Box<ClientError> },
    /// With the HTTP/2 error it ended on, if any.
    #[error("the HBONE connection closed without a CONNECT{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    NoStream(Option<h2::Error>),
    #[error("the stream went away before its 200: {0}")]
    StreamGone(h2::Error),
    #[error("reset: {0}")]
    Relay(#[from] RelayError),
    #[error("reset: {0}")]
    Reset(std::io::Error),
    #[error("{0}")]
    OverLimit(&'static str),
    /// Closed from outside while open: cut by a drain, or closed through its handle.
    #[error("{}", .0.reason)]
    Closed(Closed),
}

impl From<super::limits::Over> for Error {
    fn from(o: super::limits::Over) -> Self {
        Error::OverLimit(match o {
            super::limits::Over::Node => "the node's connection limit is reached",
            super::limits::Over::Source => "the client address's connection limit is reached",
        })
    }
}

impl Error {
    /// The stable code of this failure.
    pub fn outcome(&self) -> Outcome {
        match self {
            Error::SelfCall(_) => Outcome::SelfCall,
            Error::UnknownSource(_) => Outcome::UnknownSource,
            Error::SourcePending { .. } => Outcome::SourcePending,
            Error::Waypoint(_) => Outcome::WaypointUnsupported,
            Error::UnknownDestination(_) => Outcome::UnknownDestination,
            Error::UnknownService(_) => Outcome::UnknownService,
            Error::NoEndpoint(_) => Outcome::NoEndpoint,
            Error::IdentityMismatch { .. } => Outcome::IdentityMismatch,
            Error::PlaintextRefused => Outcome::PlaintextRefused,
            Error::PolicyDenied(_) => Outcome::PolicyDenied,
            Error::BadRequest(_) => Outcome::BadRequest,
            Error::UpstreamConnect { .. } => Outcome::UpstreamConnectFailed,
            Error::UpstreamTimeout { .. } => Outcome::UpstreamConnectTimeout,
            Error::NoCertificate { .. } | Error::TlsConfig(_) => Outcome::NoCertificate,
            Error::TlsHandshake(_) => Outcome::TlsHandshakeFailed,
            Error::TlsHandshakeTimeout(_) => Outcome::TlsHandshakeTimeout,
            Error::HboneConnect(_) => Outcome::HboneConnectFailed,
            Error::HboneStream { .. } => Outcome::HboneRefused,
            Error::NoStream(_) => Outcome::NoStream,
            Error::StreamGone(_) | Error::Relay(_) | Error::Reset(_) => Outcome::Reset,
            Error::OverLimit(_) => Outcome::OverLimit,
            Error::Closed(c) => c.outcome,
        }
    }

    /// The status an HBONE stream refused for this reason is answered with (ztunnel's).
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            // ztunnel's answer to a stream its policies deny.
            Error::PolicyDenied(_) => StatusCode::UNAUTHORIZED,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// An upstream connect error, telling a timeout from a refusal.
    pub fn upstream(dst: SocketAddr, e: std::io::Error, after: Duration) -> Self {
        if e.kind() == std::io::ErrorKind::TimedOut {
            Error::UpstreamTimeout { dst, after }
        } else {
            Error::UpstreamConnect { dst, source: e }
        }
    }

    /// The message for the access log: the error's text without the documentation links
    /// some crates append (rustls: "...: https://docs.rs/...").
    pub fn message(&self) -> String {
        without_urls(&self.to_string())
    }
}

/// `text` with every `http(s)://...` word (and the ": " before it) cut out.
fn without_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("https://").or_else(|| rest.find("http://")) {
        out.push_str(rest[..at].trim_end_matches([':', ' ']));
        rest = &rest[at..];
        rest = rest.find(char::is_whitespace).map_or("", |end| &rest[end..]);
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_lose_documentation_links() {
        let rustls_eof = "TLS handshake failed: peer closed connection without sending TLS close_notify: \
                          https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof";
        assert_eq!(
            without_urls(rustls_eof),
            "TLS handshake failed: peer closed connection without sending TLS close_notify"
        );
        assert_eq!(without_urls("see http://x.example/a then more"), "see then more");
        assert_eq!(without_urls("nothing to cut"), "nothing to cut");
    }

    #[test]
    fn timeouts_and_refusals_have_their_own_codes() {
        let dst: SocketAddr = "10.0.0.1:80".parse().expect("an address");
        let t = Error::upstream(dst, std::io::ErrorKind::TimedOut.into(), Duration::from_secs(1));
        let r = Error::upstream(dst, std::io::ErrorKind::ConnectionRefused.into(), Duration::from_secs(1));
        assert_eq!((t.outcome(), r.outcome()), (Outcome::UpstreamConnectTimeout, Outcome::UpstreamConnectFailed));
        assert_eq!(Error::BadRequest("x".into()).status(), StatusCode::BAD_REQUEST);
        assert_eq!(Error::SelfCall(15008).status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
