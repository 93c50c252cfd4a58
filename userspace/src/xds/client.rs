//! The workload xDS client's transport: one gRPC stream (tonic) at a time to istiod, over a TLS
//! connection it makes itself (so each failure is named: unreachable, TLS, refused), carrying
//! the [`Session`]'s messages; reconnecting with backoff for as long as it runs.
//!
//! As ztunnel connects: the server verified against the mesh root (no client certificate),
//! `authorization: Bearer <token>` with the token read from its file on every connection
//! (the kubelet rotates it), `clusterid: <cluster>`, HTTP/2 PINGs every 30 s (10 s timeout),
//! backoff from 10 ms doubling to 15 s, back to 10 ms once a stream has carried a response.
//! One log line per attempt, never a flood.

use std::convert::Infallible;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::codegen::Service;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status, Streaming};
use tracing::{debug, info, warn};

use super::config::{XdsAddress, XdsSettings};
use super::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use super::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use super::session::{Applier, Outcome, Session};
use crate::drain;

/// The first wait after a failed attempt; it doubles with each failure, up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// For the TCP connection and, again, the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// istiod sends every workload of the mesh in one response; ztunnel allows this much.
const MAX_MESSAGE_BYTES: usize = 200 * 1024 * 1024;
/// Answers queued for the stream (each response gets one; the queue only smooths bursts).
const ANSWERS_QUEUED: usize = 16;
const AUTHORIZATION: &str = "authorization";
const CLUSTER_ID: &str = "clusterid";

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("token file {path}: {reason}")]
    Token { path: String, reason: String },
    #[error("mesh root file {path}: {reason}")]
    Root { path: String, reason: String },
    #[error("the {0} header cannot carry this value (printable ASCII only)")]
    Header(&'static str),
    #[error("istiod at {address} is unreachable: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("TLS with istiod at {address} failed: {reason}")]
    Tls { address: String, reason: String },
    #[error("istiod refused the token: {0}")]
    TokenRefused(String),
    #[error("istiod refused this node: {0}")]
    Denied(String),
    #[error("the stream with istiod failed ({code:?}): {message}")]
    Stream { code: Code, message: String },
    #[error("istiod ended the stream")]
    Closed,
}

/// What kind of failure ended a stream, with a stable code for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    Token,
    Root,
    Header,
    Unreachable,
    Tls,
    TokenRefused,
    Denied,
    Stream,
    Closed,
}

impl FailureKind {
    pub fn code(self) -> &'static str {
        match self {
            FailureKind::Token => "token_unreadable",
            FailureKind::Root => "root_unusable",
            FailureKind::Header => "bad_header",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Tls => "tls",
            FailureKind::TokenRefused => "token_refused",
            FailureKind::Denied => "denied",
            FailureKind::Stream => "stream_error",
            FailureKind::Closed => "closed",
        }
    }
}

impl StreamError {
    pub fn kind(&self) -> FailureKind {
        match self {
            StreamError::Token { .. } => FailureKind::Token,
            StreamError::Root { .. } => FailureKind::Root,
            StreamError::Header(_) => FailureKind::Header,
            StreamError::Unreachable { .. } => FailureKind::Unreachable,
            StreamError::Tls { .. } => FailureKind::Tls,
            StreamError::TokenRefused(_) => FailureKind::TokenRefused,
            StreamError::Denied(_) => FailureKind::Denied,
            StreamError::Stream { .. } => FailureKind::Stream,
            StreamError::Closed => FailureKind::Closed,
        }
    }

    /// istiod refuses a token with `Unauthenticated` and a node with `PermissionDenied`.
    fn from_status(status: Status) -> Self {
        let message = describe(&status);
        match status.code() {
            Code::Unauthenticated => StreamError::TokenRefused(message),
            Code::PermissionDenied => StreamError::Denied(message),
            code => StreamError::Stream { code, message },
        }
    }
}

/// The last failure, as the status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// What the client is doing, for readiness, status and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XdsStatus {
    /// The first response of every type has been applied (stays so across reconnects: the
    /// node keeps serving with the last state).
    pub ready: bool,
    /// A stream is open.
    pub connected: bool,
    /// Connection attempts so far.
    pub attempts: u64,
    /// Responses answered with a NACK so far.
    pub nacks: u64,
    pub last_failure: Option<Failure>,
}

/// The wait between attempts: [`INITIAL_BACKOFF`] doubling to [`MAX_BACKOFF`].
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: INITIAL_BACKOFF }
    }
}

impl Backoff {
    /// The wait before the next attempt; the one after is twice as long, up to the cap.
    pub fn step(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        wait
    }

    pub fn reset(&mut self) {
        self.next = INITIAL_BACKOFF;
    }
}

/// The client: give it the settings and what applies the changes, then [`XdsClient::run`] it.
pub struct XdsClient<A> {
    settings: XdsSettings,
    session: Session,
    applier: A,
    status: watch::Sender<XdsStatus>,
}

impl<A: Applier + Send> XdsClient<A> {
    pub fn new(settings: XdsSettings, applier: A) -> Self {
        let session = Session::new(settings.node.clone());
        Self { settings, session, applier, status: watch::channel(XdsStatus::default()).0 }
    }

    /// Follows what the client does (readiness waits on `ready`).
    pub fn status(&self) -> watch::Receiver<XdsStatus> {
        self.status.subscribe()
    }

    /// Streams from istiod, reconnecting, until `stop` is signalled.
    pub async fn run(mut self, mut stop: drain::Watcher) {
        tokio::select! {
            _ = stop.signalled() => info!(address = %self.settings.address, "xds: stopped"),
            never = self.reconnect() => match never {},
        }
    }

    async fn reconnect(&mut self) -> Infallible {
        let mut backoff = Backoff::default();
        loop {
            self.status.send_modify(|s| s.attempts += 1);
            let mut progressed = false;
            let Err(e) = self.stream(&mut progressed).await;
            if progressed {
                backoff.reset();
            }
            let wait = backoff.step();
            let address = &self.settings.address;
            match e {
                StreamError::Closed => info!(%address, retry_in = ?wait, "xds: {e}"),
                _ => warn!(%address, code = e.kind().code(), retry_in = ?wait, "xds: {e}"),
            }
            let failure = Failure { kind: e.kind(), message: e.to_string() };
            self.status.send_modify(|s| {
                s.connected = false;
                s.last_failure = Some(failure);
            });
            tokio::time::sleep(wait).await;
        }
    }

    /// One stream, until it fails; `progressed` says whether it carried a response.
    async fn stream(&mut self, progressed: &mut bool) -> Result<Infallible, StreamError> {
        let (mut responses, answers) = self.open().await?;
        info!(address = %self.settings.address, "xds: stream open");
        self.status.send_modify(|s| s.connected = true);
        while let Some(response) = responses.message().await.map_err(StreamError::from_status)? {
            *progressed = true;
            let outcome = self.session.handle(response, &mut self.applier);
            self.report(&outcome);
            answers.send(outcome.answer).await.map_err(|_| StreamError::Closed)?;
        }
        Err(StreamError::Closed)
    }

    /// Connects and opens the stream, the initial requests first.
    async fn open(
        &self,
    ) -> Result<(Streaming<DeltaDiscoveryResponse>, mpsc::Sender<DeltaDiscoveryRequest>), StreamError> {
        let s = &self.settings;
        let token = read_token(&s.token_file).await?;
        let cluster: MetadataValue<Ascii> =
            s.cluster_id.as_str().try_into().map_err(|_| StreamError::Header(CLUSTER_ID))?;
        let tls = tls_config(&s.root_cert).await?;
        let channel = channel(&s.address, connect(&s.address, tls).await?).await?;
        let (tx, rx) = mpsc::channel(ANSWERS_QUEUED);
        let answers = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|a| (a, rx)) });
        let mut request = Request::new(futures::stream::iter(self.session.initial_requests()).chain(answers));
        request.metadata_mut().insert(AUTHORIZATION, token);
        request.metadata_mut().insert(CLUSTER_ID, cluster);
        let response = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .delta_aggregated_resources(request)
            .await
            .map_err(StreamError::from_status)?;
        Ok((response.into_inner(), tx))
    }

    fn report(&self, outcome: &Outcome) {
        let type_url = outcome.answer.type_url.as_str();
        let nonce = outcome.answer.response_nonce.as_str();
        match outcome.nack() {
            Some(why) => warn!(type_url, nonce, rejected = outcome.rejected.len(), "xds: NACK: {why}"),
            None => debug!(type_url, nonce, updated = outcome.updated, removed = outcome.removed, "xds: ACK"),
        }
        let (ready, nack) = (self.session.ready(), outcome.nack().is_some());
        self.status.send_if_modified(|s| {
            let changed = s.ready != ready || nack;
            s.ready = ready;
            s.nacks += u64::from(nack);
            changed
        });
    }
}

/// `Bearer <token>` from the token file, read now (the kubelet rewrites it as it rotates).
async fn read_token(path: &Path) -> Result<MetadataValue<Ascii>, StreamError> {
    let bad = |reason: &str| StreamError::Token { path: path.display().to_string(), reason: reason.to_owned() };
    let text = tokio::fs::read_to_string(path).await.map_err(|e| bad(&e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("it is empty"));
    }
    let mut value: MetadataValue<Ascii> =
        format!("Bearer {token}").try_into().map_err(|_| bad("it is not printable ASCII"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// A TLS client trusting only the mesh root(s) in `path`, presenting no certificate.
async fn tls_config(path: &Path) -> Result<Arc<ClientConfig>, StreamError> {
    let bad = |reason: String| StreamError::Root { path: path.display().to_string(), reason };
    let pem = tokio::fs::read(path).await.map_err(|e| bad(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|e| bad(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| bad(format!("not a usable root: {e}")))?;
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// TCP to the first address of `address` that answers, then the TLS handshake, the server's
/// certificate checked for `address.host`.
async fn connect(address: &XdsAddress, tls: Arc<ClientConfig>) -> Result<TlsStream<TcpStream>, StreamError> {
    let tls_err = |reason: String| StreamError::Tls { address: address.to_string(), reason };
    let name = ServerName::try_from(address.host.clone()).map_err(|e| tls_err(format!("bad server name: {e}")))?;
    let tcp =
        tokio::time::timeout(CONNECT_TIMEOUT, tcp_connect(address)).await.map_err(|_| StreamError::Unreachable {
            address: address.to_string(),
            reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
        })??;
    tokio::time::timeout(CONNECT_TIMEOUT, TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| tls_err(format!("no handshake within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| tls_err(e.to_string()))
}

async fn tcp_connect(address: &XdsAddress) -> Result<TcpStream, StreamError> {
    let unreachable = |reason: String| StreamError::Unreachable { address: address.to_string(), reason };
    let addrs = tokio::net::lookup_host((address.host.as_str(), address.port))
        .await
        .map_err(|e| unreachable(format!("resolving {}: {e}", address.host)))?;
    let mut last = format!("{} resolves to no address", address.host);
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                // Answers are small and each waits for the one before: no Nagle delay.
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(unreachable(last))
}

/// HTTP/2 over the connection made above (tonic sees plain `http`: the TLS is ours).
async fn channel(address: &XdsAddress, io: TlsStream<TcpStream>) -> Result<Channel, StreamError> {
    let failed = |message: String| StreamError::Stream { code: Code::Unavailable, message };
    Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| failed(e.to_string()))?
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector(Handover(Some(io)))
        .await
        .map_err(|e| failed(format!("HTTP/2 with istiod: {}", chain(&e))))
}

/// Hands tonic the one connection made for this stream; a stream that fails is not redialled
/// by tonic but by [`XdsClient`], which reads the token again.
struct Handover(Option<TlsStream<TcpStream>>);

impl Service<Uri> for Handover {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let io = self.0.take().map(TokioIo::new);
        std::future::ready(io.ok_or_else(|| io::Error::other("the connection to istiod is closed")))
    }
}

/// A status's message with its causes (a transport failure's status says only "transport error").
fn describe(status: &Status) -> String {
    let mut message = status.message().to_owned();
    if let Some(source) = std::error::Error::source(status) {
        message.push_str(": ");
        message.push_str(&chain(source));
    }
    message
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_10ms_to_15s_and_resets() {
        let mut b = Backoff::default();
        let steps: Vec<u128> = (0..13).map(|_| b.step().as_millis()).collect();
        assert_eq!(steps, [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 15000, 15000]);
        b.reset();
        assert_eq!(b.step(), INITIAL_BACKOFF);
    }

    #[test]
    fn istiods_refusals_are_named_by_their_code() {
        let e = StreamError::from_status(Status::unauthenticated("authentication failure"));
        assert_eq!(e.kind(), FailureKind::TokenRefused);
        assert_eq!(e.to_string(), "istiod refused the token: authentication failure");
        assert_eq!(StreamError::from_status(Status::permission_denied("x")).kind(), FailureKind::Denied);
        let e = StreamError::from_status(Status::invalid_argument("missing node information"));
        assert!(matches!(e, StreamError::Stream { code: Code::InvalidArgument, .. }), "{e:?}");
    }

    #[tokio::test]
    async fn the_token_is_read_trimmed_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("meshpath-xds-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("token");
        std::fs::write(&path, "abc.def\n").expect("write");
        let value = read_token(&path).await.expect("read");
        assert_eq!(value.to_str().expect("ascii"), "Bearer abc.def");
        assert!(!format!("{value:?}").contains("abc"), "a sensitive value is not printed");
        std::fs::write(&path, "  \n").expect("write");
        let err = read_token(&path).await.expect_err("empty").to_string();
        assert!(err.ends_with("it is empty"), "{err}");
        std::fs::remove_file(&path).expect("remove");
        let err = read_token(&path).await.expect_err("missing");
        assert_eq!(err.kind(), FailureKind::Token);
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
