//! The admin endpoints: readiness (`GET /healthz/ready`, on 15021 as Istio's probes expect)
//! and Prometheus metrics (`GET /metrics`, on 15020). Deliberately tiny: one response per
//! connection, no keep-alive; both ports answer both paths.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
#[error("binding the readiness endpoint on {addr}: {source}")]
pub struct AdminError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// What readiness is asked: `None` when ready, else why not (the 503's body). The node
/// defines what it means (its lifecycle's `Readiness`).
pub trait Ready: Send + Sync {
    fn why_not(&self) -> Option<String>;
}

/// Kubelet probes a hostNetwork pod on the node's address, so this listens on all of them.
/// SO_REUSEPORT: during a takeover the old and the new daemon (two pods of one DaemonSet
/// on the node) both hold the ports; the old one closes its own once taken over.
pub async fn bind(port: u16) -> Result<TcpListener, AdminError> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let bind = || -> std::io::Result<TcpListener> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM.nonblocking(), None)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&addr.into())?;
        s.listen(128)?;
        TcpListener::from_std(s.into())
    };
    bind().map_err(|source| AdminError { addr, source })
}

/// What the endpoints answer from.
#[derive(Clone)]
pub struct Routes {
    pub ready: Arc<dyn Ready>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Answers until a drain starts (the port closes with the listener).
pub async fn serve(listener: TcpListener, routes: Routes, mut drain: crate::drain::Watcher) {
    loop {
        let (mut stream, _) = tokio::select! {
            _ = drain.signalled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut buf)).await;
            let Ok(Ok(n)) = n else { return };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let plain = "text/plain";
            let (status, content_type, body) = match (path, routes.ready.why_not()) {
                ("/healthz/ready", None) => ("200 OK", plain, "ready\n".to_string()),
                ("/healthz/ready", Some(why)) => ("503 Service Unavailable", plain, format!("not ready: {why}\n")),
                ("/metrics" | "/stats/prometheus", _) => {
                    ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", routes.metrics.render())
                }
                _ => ("404 Not Found", plain, "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}
