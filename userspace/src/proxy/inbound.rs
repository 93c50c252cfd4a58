//! The inbound listeners: HBONE (15008) from other nodes' proxies, and plaintext (15006)
//! from clients outside the mesh.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response};
use tokio::net::TcpStream;

use super::{Error, PlaintextPolicy, Proxy, is_proxy_port, socket};
use crate::identity::{Identity, WorkloadCertificate};
use crate::record::ConnectionRecord;
use crate::state::{WorkloadIndex, WorkloadInfo, canonical};
use crate::sync::lock;
use crate::tls;

/// A local workload's TLS server configuration and the certificate it was built from.
pub(super) struct ServerTls {
    cert: Arc<WorkloadCertificate>,
    config: Arc<rustls::ServerConfig>,
}

/// Plaintext to an enrolled pod: delivered with the client's address, or refused.
pub(super) async fn plaintext(
    p: &Proxy,
    index: &WorkloadIndex,
    client: &mut TcpStream,
    rec: &mut ConnectionRecord,
) -> Result<(), Error> {
    if let Some(w) = index.get(rec.orig_dst.ip()) {
        rec.dst_identity = Some(w.identity.to_string());
    }
    match p.cfg.plaintext {
        PlaintextPolicy::Strict => Err(Error::PlaintextRefused),
        PlaintextPolicy::Permissive => {
            p.open(rec);
            p.relay_plain(client, rec.orig_dst, Some(rec.src.ip()), rec).await
        }
    }
}

/// One HBONE connection: TLS as the dialed workload, then one task per CONNECT stream.
/// `rec` describes the connection; it is logged only if the connection fails before its
/// first stream, each stream logging a record of its own.
pub(super) async fn hbone(p: Arc<Proxy>, index: Arc<WorkloadIndex>, tcp: TcpStream, mut rec: ConnectionRecord) {
    let started = Instant::now();
    let dialed = rec.orig_dst;
    // The connection was dialed to a pod's IP; we answer as that pod.
    let local = match index.get(dialed.ip()) {
        Some(w) if w.node == p.cfg.node => w.clone(),
        _ => {
            socket::reset_on_close(&tcp);
            return p.finish(rec, started, Err(Error::UnknownDestination(dialed.ip())));
        }
    };
    rec.dst_identity = Some(local.identity.to_string());
    let config = match server_tls(&p, &local).await {
        Ok(c) => c,
        Err(e) => return p.finish(rec, started, Err(e)),
    };
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let tls = match tokio::time::timeout(p.cfg.connect_timeout, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return p.finish(rec, started, Err(Error::TlsHandshake(e))),
        Err(_) => return p.finish(rec, started, Err(Error::TlsHandshakeTimeout(p.cfg.connect_timeout))),
    };
    let peer_id = tls::peer_identity(tls.get_ref().1.peer_certificates(), &local.identity.trust_domain);
    rec.src_identity = peer_id.as_ref().map(ToString::to_string);
    // The app will see the tunnel's source IP as its client: an IP of a known workload must
    // belong to the identity the peer just proved, or one workload could speak as another.
    if let Some(owner) = index.get(rec.src.ip()) {
        if Some(&owner.identity) != peer_id.as_ref() {
            let presented = rec.src_identity.clone().unwrap_or_else(|| "no identity".into());
            let e = Error::IdentityMismatch { ip: rec.src.ip(), owner: owner.identity.to_string(), presented };
            return p.finish(rec, started, Err(e));
        }
        // Proven by the certificate, not by the address alone.
        rec.src_workload = Some(owner.id.clone());
    }
    rec.mtls = true;
    let label = format!("{} -> {dialed}", rec.src);
    let template = rec.clone();
    let served = super::h2::server::serve(tls, &label, p.cfg.connect_timeout, p.drain.subscribe(), |req, respond| {
        stream(p.clone(), local.clone(), template.clone(), req, respond)
    })
    .await;
    match served {
        Ok(0) => p.finish(rec, started, Err(Error::NoStream)),
        Ok(_) => {}
        Err(e) => tracing::info!(conn = %label, "HBONE connection ended: {e}"),
    }
}

/// The TLS configuration for `w`, built once per certificate.
async fn server_tls(p: &Proxy, w: &WorkloadInfo) -> Result<Arc<rustls::ServerConfig>, Error> {
    let cert = p
        .certs
        .get(&w.identity)
        .await
        .map_err(|source| Error::NoCertificate { identity: w.identity.to_string(), source: Box::new(source) })?;
    let mut cache = lock(&p.server_tls);
    if let Some(s) = cache.get(&w.identity).filter(|s| Arc::ptr_eq(&s.cert, &cert)) {
        return Ok(s.config.clone());
    }
    let config = tls::server_config(&cert).map_err(Error::TlsConfig)?;
    cache.insert(w.identity.clone(), ServerTls { cert, config: config.clone() });
    Ok(config)
}

/// One CONNECT stream: checked, connected upstream with the client's address, relayed.
async fn stream(
    p: Arc<Proxy>,
    local: Arc<WorkloadInfo>,
    mut rec: ConnectionRecord,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    // The template is the connection's: each stream starts when it arrives.
    rec.start_ms = super::unix_ms();
    let result = serve_stream(&p, &local, &mut rec, req, respond).await;
    p.finish(rec, started, result);
}

async fn serve_stream(
    p: &Proxy,
    local: &WorkloadInfo,
    rec: &mut ConnectionRecord,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Result<(), Error> {
    // Each stream holds a connection upstream: it takes a slot of its own.
    let _slot = p
        .limits
        .admit(rec.src.ip())
        .map_err(Error::from)
        .inspect_err(|e| super::h2::server::reject(&mut respond, e.status()))?;
    // The index of now, not of the connection's start: a workload that left since gets 503.
    let checked = check_request(req.method(), req.uri(), rec.orig_dst.ip(), &local.identity, &p.index(), &p.cfg.node);
    let target = checked.inspect_err(|e| super::h2::server::reject(&mut respond, e.status()))?;
    rec.orig_dst = target;
    rec.dst_workload = Some(local.id.clone());
    p.open(rec);
    // The outer connection comes from the client pod's IP (the peer proxy dials from it):
    // the app sees its real client.
    let timeout = p.cfg.connect_timeout;
    let mut upstream = socket::connect_upstream(target, Some(rec.src.ip()), timeout)
        .await
        .map_err(|e| Error::upstream(target, e, timeout))
        .inspect_err(|e| super::h2::server::reject(&mut respond, e.status()))?;
    rec.upstream_src = upstream.local_addr().ok().map(canonical);
    let send = respond.send_response(Response::new(()), false).map_err(Error::StreamGone)?;
    let (n, result) = super::h2::relay(&mut upstream, send, req.into_body()).await;
    // On this side the stream is what arrives from the client.
    rec.bytes_sent = n.received;
    rec.bytes_received = n.sent;
    result.map_err(Error::Relay)
}

/// Validates a CONNECT request the way ztunnel does ([`Error::status`] is what to answer).
/// `serving` is the identity this connection's TLS presented: a stream may only reach a
/// workload that still has it (an IP can pass to another pod while a connection lives).
pub fn check_request(
    method: &Method,
    uri: &http::Uri,
    dialed: IpAddr,
    serving: &Identity,
    index: &WorkloadIndex,
    node: &str,
) -> Result<SocketAddr, Error> {
    if method != Method::CONNECT {
        return Err(Error::BadRequest(format!("method {method} is not CONNECT")));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    let target: SocketAddr = match authority.parse() {
        Ok(a) => canonical(a),
        // ztunnel takes `name:port` as a service hostname and answers 503 when it knows
        // no such service; meshpath resolves no hostnames, so every one is unknown.
        Err(_) if uri.port_u16().is_some() && uri.host().is_some_and(|h| !h.is_empty()) => {
            return Err(Error::UnknownService(authority.to_owned()));
        }
        Err(_) => return Err(Error::BadRequest(format!("authority {authority:?} is not IP:port"))),
    };
    if target.ip() != dialed.to_canonical() {
        return Err(Error::BadRequest(format!("authority {target} does not match the dialed address {dialed}")));
    }
    if is_proxy_port(target.port()) {
        return Err(Error::SelfCall(target.port()));
    }
    match index.get(target.ip()) {
        Some(w) if w.node == node && w.identity == *serving => Ok(target),
        Some(w) if w.node == node => Err(Error::IdentityMismatch {
            ip: target.ip(),
            owner: w.identity.to_string(),
            presented: serving.to_string(),
        }),
        _ => Err(Error::UnknownDestination(target.ip())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Outcome;
    use crate::workloads::WorkloadFile;
    use http::StatusCode;

    fn index() -> WorkloadIndex {
        let f = WorkloadFile::parse(
            "workloads:\n  - {name: a, namespace: ns, serviceAccount: sa, node: n1, ips: [10.0.0.1, \"fd00::1\"]}\n  \
             - {name: c, namespace: ns, serviceAccount: sc, node: n2, ips: [10.0.0.3]}\n",
            "t",
        )
        .unwrap();
        WorkloadIndex::from_file(&f, "td")
    }

    fn check(method: Method, authority: &str, dialed: &str) -> Result<SocketAddr, StatusCode> {
        let uri: http::Uri = authority.parse().unwrap_or_default();
        let serving = Identity::new("td", "ns", "sa");
        check_request(&method, &uri, dialed.parse().unwrap(), &serving, &index(), "n1").map_err(|e| e.status())
    }

    #[test]
    fn status_codes_follow_ztunnel() {
        assert_eq!(check(Method::CONNECT, "10.0.0.1:8080", "10.0.0.1"), Ok("10.0.0.1:8080".parse().unwrap()));
        assert_eq!(check(Method::CONNECT, "[fd00::1]:80", "fd00::1"), Ok("[fd00::1]:80".parse().unwrap()));
        assert_eq!(check(Method::GET, "10.0.0.1:8080", "10.0.0.1"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(check(Method::POST, "10.0.0.1:8080", "10.0.0.1"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(check(Method::CONNECT, "web.shop:8080", "10.0.0.1"), Err(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(check(Method::CONNECT, "10.0.0.1", "10.0.0.1"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(check(Method::CONNECT, "10.0.0.9:8080", "10.0.0.1"), Err(StatusCode::BAD_REQUEST));
        for port in [15001, 15006, 15008] {
            assert_eq!(
                check(Method::CONNECT, &format!("10.0.0.1:{port}"), "10.0.0.1"),
                Err(StatusCode::SERVICE_UNAVAILABLE)
            );
        }
        // Known, but on another node; and not known at all.
        assert_eq!(check(Method::CONNECT, "10.0.0.3:80", "10.0.0.3"), Err(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(check(Method::CONNECT, "10.0.0.7:80", "10.0.0.7"), Err(StatusCode::SERVICE_UNAVAILABLE));
        // The IP now belongs to a workload with another identity than the one presented.
        let uri: http::Uri = "10.0.0.1:80".parse().unwrap();
        let other = Identity::new("td", "ns", "someone-else");
        let r = check_request(&Method::CONNECT, &uri, "10.0.0.1".parse().unwrap(), &other, &index(), "n1");
        assert_eq!(
            r.map_err(|e| (e.status(), e.outcome())),
            Err((StatusCode::SERVICE_UNAVAILABLE, Outcome::IdentityMismatch))
        );
    }
}
