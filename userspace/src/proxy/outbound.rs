//! The outbound listener (15001): connections of this node's enrolled pods.

use std::net::SocketAddr;
use std::sync::Arc;

use meshpath_common::names::PORT_HBONE;
use tokio::net::TcpStream;

use super::conn::{Conn, unless_stopped};
use super::h2::client::{ClientError, H2Client};
use super::pool::PoolKey;
use super::registry::Kind;
use super::{Error, Proxy, is_proxy_port};
use crate::identity::IdentityError;
use crate::state::{Tunnel, WorkloadIndex, WorkloadInfo, canonical};
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum HboneConnectError {
    #[error("no certificate for {identity}: {source}")]
    Identity { identity: String, source: IdentityError },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("connecting to {dst}: {source}")]
    Connect { dst: SocketAddr, source: std::io::Error },
    #[error("TLS handshake with {dst}: {source}")]
    Handshake { dst: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    H2(#[from] ClientError),
}

/// Routes one captured connection by what its destination is.
pub(super) async fn handle(
    p: &Proxy,
    index: &WorkloadIndex,
    client: &mut TcpStream,
    conn: &mut Conn,
) -> Result<(), Error> {
    let client_ip = conn.rec.src.ip();
    // A pod captured before the control plane described it: wait for that, bounded.
    let waited;
    let index = match index.get(client_ip) {
        None if !p.cfg.source_wait.is_zero() => {
            waited = p.index_knowing(client_ip).await?;
            conn.rec.src_workload = waited.get(client_ip).map(|w| w.id.clone());
            &*waited
        }
        _ => index,
    };
    let rec = &mut conn.rec;
    // A service address (seen before any DNAT) leads to one of its ready endpoints.
    let target = match index.resolve_service(rec.orig_dst) {
        None => rec.orig_dst,
        Some((service, endpoint)) => {
            rec.dst_service = Some(service.service.clone());
            if service.waypoint {
                return Err(Error::Waypoint(service.service.clone()));
            }
            endpoint.ok_or_else(|| Error::NoEndpoint(service.service.clone()))?
        }
    };
    rec.dst_workload = index.get(target.ip()).map(|w| w.id.clone());
    let src = index.get(client_ip).cloned();
    let Some(dst) = index.get(target.ip()).cloned() else {
        // Not in the mesh: plain TCP, as ambient does. Pod destinations keep the client's
        // address (the reply comes back through this node); others leave from the node's.
        let source = p.is_pod_ip(index, target.ip()).then_some(client_ip);
        return p.relay_plain(client, target, source, conn, Kind::PlainRelay).await;
    };
    if dst.waypoint {
        return Err(Error::Waypoint(dst.id.clone()));
    }
    // The datapath only captures enrolled sources, so a miss is a race with an unenrolment:
    // without the client's identity nothing can be presented.
    let src = src.ok_or(Error::UnknownSource(client_ip))?;
    if dst.tunnel == Tunnel::Plain {
        // A pod no node proxy captures (the control plane says so): plain, from the client.
        return p.relay_plain(client, target, Some(client_ip), conn, Kind::PlainRelay).await;
    }
    if dst.node == p.cfg.node {
        // A hand-over to one of our own ports would loop (across nodes the peer refuses
        // it with 503, as ztunnel does).
        if is_proxy_port(target.port()) {
            return Err(Error::SelfCall(target.port()));
        }
        // Same node: the bytes never leave this host's memory and the kernel vouches for
        // the source (the classifier drops enrolled IPs arriving from a foreign interface),
        // so the hand-over is direct and TLS would only encrypt a memory copy.
        rec.src_identity = Some(src.identity.to_string());
        rec.dst_identity = Some(dst.identity.to_string());
        // The destination's policies, as its HBONE listener would check them.
        super::authorize::authorize(index, rec.src, Some(&src.identity), &dst, target)?;
        return p.relay_plain(client, target, Some(client_ip), conn, Kind::SameNode).await;
    }
    rec.src_identity = Some(src.identity.to_string());
    rec.dst_identity = Some(dst.identity.to_string());
    hbone(p, client, conn, target, &src, &dst).await
}

/// Tunnels the connection to the destination's node inside HBONE.
async fn hbone(
    p: &Proxy,
    client: &mut TcpStream,
    conn: &mut Conn,
    target: SocketAddr,
    src: &Arc<WorkloadInfo>,
    dst: &Arc<WorkloadInfo>,
) -> Result<(), Error> {
    let key = PoolKey {
        src_id: src.identity.clone(),
        dst_id: dst.identity.clone(),
        dst: SocketAddr::new(target.ip(), PORT_HBONE),
        src_ip: conn.rec.src.ip(),
    };
    conn.rec.mtls = true;
    let entry = conn.open(Kind::HboneStream, target);
    // A pooled connection can start draining (GOAWAY) just as we pick it: then it is marked
    // and the next checkout opens or picks another. Once is enough.
    let mut retried = false;
    let (lease, send, recv) = loop {
        let lease = p.pool.checkout(&key, || connect(p, &key)).await.map_err(Error::HboneConnect)?;
        match lease.conn.client.connect(target, conn.rec.src, p.cfg.flags.connect_timeout).await {
            Ok((send, recv)) => break (lease, send, recv),
            Err(ClientError::Unavailable(_)) if !retried => retried = true,
            Err(source) => return Err(Error::HboneStream { target, source: Box::new(source) }),
        }
    };
    conn.rec.upstream_src = Some(canonical(lease.conn.client.local));
    let mut stop = conn.stop();
    let relayed = unless_stopped!(stop, super::h2::relay(client, send, recv, entry.request(), entry.response()));
    drop(lease);
    // A stream dropped with its relay (closed or cut) is cancelled towards the peer by h2;
    // the caller resets the client.
    relayed.map_err(Error::Closed)?.map_err(Error::Relay)
}

/// A new HBONE connection for `key`: TCP from the client pod's IP to `podIP:15008`, TLS with
/// the source workload's certificate, then HTTP/2.
async fn connect(p: &Proxy, key: &PoolKey) -> Result<H2Client, HboneConnectError> {
    let cert = p
        .certs
        .get(&key.src_id)
        .await
        .map_err(|source| HboneConnectError::Identity { identity: key.src_id.to_string(), source })?;
    let config = tls::client_config(&cert, &key.dst_id)?;
    let tcp = p
        .sockets
        .connect(key.dst, Some(key.src_ip), p.cfg.flags.connect_timeout)
        .await
        .map_err(|source| HboneConnectError::Connect { dst: key.dst, source })?;
    let local = tcp.local_addr().map_err(|source| HboneConnectError::Connect { dst: key.dst, source })?;
    let handshake = tokio_rustls::TlsConnector::from(config).connect(tls::server_name(), tcp);
    let stream = match tokio::time::timeout(p.cfg.flags.connect_timeout, handshake).await {
        Ok(r) => r.map_err(|source| HboneConnectError::Handshake { dst: key.dst, source })?,
        Err(_) => {
            let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
            return Err(HboneConnectError::Handshake { dst: key.dst, source });
        }
    };
    let label = format!("{local}->{} ({} -> {})", key.dst, key.src_id, key.dst_id);
    let client = H2Client::handshake(stream, local, label.clone()).await?;
    tracing::debug!(conn = %label, "HBONE connection established");
    Ok(client)
}
