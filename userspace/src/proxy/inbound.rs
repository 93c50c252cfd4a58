//! The inbound listeners: HBONE (15008) from other nodes' proxies, and plaintext (15006)
//! from clients outside the mesh.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response};
use tokio::net::TcpStream;

use super::authorize::authorize;
use super::conn::{Conn, unless_stopped};
use super::registry::{Closed, Kind};
use super::{Error, Proxy, is_proxy_port, socket};
use crate::drain::Mode;
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

/// Plaintext to an enrolled pod: delivered with the client's address if its policies allow
/// a connection without identity (PeerAuthentication STRICT arrives as a DENY policy that
/// refuses it, as istiod sends it and as meshpath's `--inbound-plaintext strict` makes it).
pub(super) async fn plaintext(
    p: &Proxy,
    index: &WorkloadIndex,
    client: &mut TcpStream,
    conn: &mut Conn,
) -> Result<(), Error> {
    let dst = conn.rec.orig_dst;
    // Only enrolled pods are steered here; one the index does not know has no policies
    // to decide by yet.
    let Some(w) = index.get(dst.ip()) else { return Err(Error::UnknownDestination(dst.ip())) };
    conn.rec.dst_identity = Some(w.identity.to_string());
    // Turned to this pod by a NAT on this node: the service the client dialed, if known.
    conn.rec.dst_service = conn.rec.frontend.and_then(|f| index.service(f)).map(|s| s.service.clone());
    authorize(index, conn.rec.src, None, w, dst)?;
    let src = conn.rec.src.ip();
    p.relay_plain(client, dst, Some(src), conn, Kind::PlainRelay).await
}

/// One HBONE connection: TLS as the dialed workload, then one task per CONNECT stream. The
/// connection's own record is written only if it fails before its first stream (each stream
/// writes a record of its own).
pub(super) async fn hbone(p: &Arc<Proxy>, index: &WorkloadIndex, tcp: TcpStream, conn: &mut Conn) -> Result<(), Error> {
    let dialed = conn.rec.orig_dst;
    // The connection was dialed to a pod's IP; we answer as that pod.
    let local = match index.get(dialed.ip()) {
        Some(w) if w.node == p.cfg.node => w.clone(),
        _ => {
            socket::reset_on_close(&tcp);
            return Err(Error::UnknownDestination(dialed.ip()));
        }
    };
    conn.rec.dst_identity = Some(local.identity.to_string());
    let config = server_tls(p, &local).await?;
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let tls = match tokio::time::timeout(p.cfg.flags.connect_timeout, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(Error::TlsHandshake(e)),
        Err(_) => return Err(Error::TlsHandshakeTimeout(p.cfg.flags.connect_timeout)),
    };
    let peer_id = tls::peer_identity(tls.get_ref().1.peer_certificates(), &local.identity.trust_domain);
    check_peer(&mut conn.rec, index, peer_id.as_ref())?;
    let peer_id = peer_id.map(Arc::new);
    let label = format!("{} -> {dialed}", conn.rec.src);
    let template = conn.rec.clone();
    let stop = conn.stop().drain();
    let served = super::h2::server::serve(tls, &label, p.cfg.flags.connect_timeout, stop.clone(), |req, respond| {
        // Opened before its task runs, as every connection's account.
        let mut conn = p.conn(template.clone(), None);
        // The template is the connection's: each stream starts when it arrives.
        conn.rec.start_ms = super::unix_ms();
        stream(p.clone(), local.clone(), peer_id.clone(), conn, req, respond)
    })
    .await;
    match served {
        (0, _) if stop.mode() == Some(Mode::Immediate) => Err(Error::Closed(Closed::cut())),
        (0, ended) => Err(Error::NoStream(ended.err())),
        (_, ended) => {
            if let Err(e) = ended {
                tracing::info!(conn = %label, "HBONE connection ended: {e}");
            }
            conn.dismiss();
            Ok(())
        }
    }
}

/// The app will see the tunnel's source IP as its client: an IP of a known workload must
/// belong to the identity the peer just proved, or one workload could speak as another.
fn check_peer(rec: &mut ConnectionRecord, index: &WorkloadIndex, peer_id: Option<&Identity>) -> Result<(), Error> {
    rec.src_identity = peer_id.map(ToString::to_string);
    if let Some(owner) = index.get(rec.src.ip()) {
        if Some(&owner.identity) != peer_id {
            let presented = rec.src_identity.clone().unwrap_or_else(|| "no identity".into());
            return Err(Error::IdentityMismatch { ip: rec.src.ip(), owner: owner.identity.to_string(), presented });
        }
        // Proven by the certificate, not by the address alone.
        rec.src_workload = Some(owner.id.clone());
    }
    rec.mtls = true;
    Ok(())
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
    peer: Option<Arc<Identity>>,
    mut conn: Conn,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let mut stop = conn.stop();
    let result = tokio::select! {
        biased;
        r = serve_stream(&p, &local, peer.as_deref(), &mut conn, req, respond) => r,
        c = stop.wait() => Err(Error::Closed(c)),
    };
    conn.finish(result);
}

async fn serve_stream(
    p: &Proxy,
    local: &Arc<WorkloadInfo>,
    peer: Option<&Identity>,
    conn: &mut Conn,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Result<(), Error> {
    let reject = |respond: &mut SendResponse<Bytes>, e: &Error| super::h2::server::reject(respond, e.status());
    // Each stream holds a connection upstream: it takes a slot of its own.
    let slot = p.limits.admit(conn.rec.src.ip()).map_err(Error::from).inspect_err(|e| reject(&mut respond, e))?;
    conn.hold(slot);
    // The index of now, not of the connection's start: a workload that left since gets 503,
    // and the policies of now decide.
    let index = p.index();
    let checked = check_request(req.method(), req.uri(), conn.rec.orig_dst.ip(), &local.identity, &index, &p.cfg.node);
    let target = checked.inspect_err(|e| reject(&mut respond, e))?;
    conn.rec.orig_dst = target;
    // The workload as described now (check_request found it): the policies it names may
    // have changed since the connection was accepted.
    let dst = index.get(target.ip()).unwrap_or(local).clone();
    authorize(&index, conn.rec.src, peer, &dst, target).inspect_err(|e| reject(&mut respond, e))?;
    conn.rec.dst_workload = Some(dst.id.clone());
    let entry = conn.open(Kind::HboneStream, target);
    // The outer connection comes from the client pod's IP (the peer proxy dials from it):
    // the app sees its real client.
    let timeout = p.cfg.flags.connect_timeout;
    let mut upstream = p
        .sockets
        .connect(target, Some(conn.rec.src.ip()), timeout)
        .await
        .map_err(|e| Error::upstream(target, e, timeout))
        .inspect_err(|e| reject(&mut respond, e))?;
    conn.rec.upstream_src = upstream.local_addr().ok().map(canonical);
    let send = respond.send_response(Response::new(()), false).map_err(Error::StreamGone)?;
    // On this side the stream is what arrives from the client: the request.
    let mut stop = conn.stop();
    let relayed = unless_stopped!(
        stop,
        super::h2::relay(&mut upstream, send, req.into_body(), entry.response(), entry.request())
    );
    match relayed {
        Ok(r) => r.map_err(Error::Relay),
        Err(closed) => {
            // The stream was dropped with the relay: h2 cancels it towards the peer.
            socket::reset_on_close(&upstream);
            Err(Error::Closed(closed))
        }
    }
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
