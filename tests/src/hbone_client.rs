//! A hand-driven HBONE client for the lab: one TLS + HTTP/2 connection from inside a pod's
//! namespace, on which arbitrary requests are sent, so tests can see each status code the
//! server answers and that it keeps serving afterwards.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use rustls::ClientConfig;

use crate::traffic::in_netns;
use meshpath::tls;

/// What one request got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A status; for a 200, also what came back after sending the probe payload.
    Status(u16, Option<Vec<u8>>),
    /// The request or the connection failed before any status.
    Failed(String),
}

/// A request to send: method and URI (authority-form for CONNECT).
#[derive(Clone, Debug)]
pub struct Probe {
    pub method: Method,
    pub authority: String,
}

impl Probe {
    pub fn connect(authority: impl ToString) -> Self {
        Self { method: Method::CONNECT, authority: authority.to_string() }
    }
}

/// What one probe connection showed.
#[derive(Clone, Debug)]
pub struct Probed {
    /// Serial number of the certificate the server presented.
    pub server_serial: String,
    /// One per probe, in order.
    pub answers: Vec<Answer>,
}

/// From network namespace `ns`, opens one HBONE connection to `dst` with `config` and sends
/// `probes` one after the other on it. After a 200, `payload` is sent and the whole answer
/// read back. The whole exchange is bounded by `timeout`.
pub fn probe(
    ns: &str,
    config: Arc<ClientConfig>,
    dst: SocketAddr,
    probes: &[Probe],
    payload: &[u8],
    timeout: Duration,
) -> io::Result<Probed> {
    in_netns(ns, || -> io::Result<Probed> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            match tokio::time::timeout(timeout, run(config, dst, probes, payload)).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("HBONE probe of {dst} timed out"))),
            }
        })
    })?
}

async fn run(config: Arc<ClientConfig>, dst: SocketAddr, probes: &[Probe], payload: &[u8]) -> io::Result<Probed> {
    let tcp = tokio::net::TcpStream::connect(dst).await?;
    let tls = tokio_rustls::TlsConnector::from(config).connect(tls::server_name(), tcp).await?;
    let server_serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| {
            x509_parser::parse_x509_certificate(c).ok().map(|(_, c)| c.tbs_certificate.raw_serial_as_string())
        })
        .unwrap_or_default();
    let (send, conn) = match h2::client::handshake(tls).await {
        Ok(x) => x,
        // A server that refused our certificate says so with an alert right after the
        // handshake; it surfaces here.
        Err(e) => {
            return Ok(Probed {
                server_serial,
                answers: probes.iter().map(|_| Answer::Failed(e.to_string())).collect(),
            });
        }
    };
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut answers = Vec::new();
    for p in probes {
        answers.push(one(send.clone(), p, payload).await);
    }
    drop(send);
    driver.abort();
    Ok(Probed { server_serial, answers })
}

async fn one(send: h2::client::SendRequest<Bytes>, p: &Probe, payload: &[u8]) -> Answer {
    let req = match Request::builder().method(p.method.clone()).uri(p.authority.as_str()).body(()) {
        Ok(r) => r,
        Err(e) => return Answer::Failed(format!("building the request: {e}")),
    };
    let result = async {
        let mut send = send.ready().await?;
        let (resp, mut body_tx) = send.send_request(req, false)?;
        let resp = resp.await?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Ok::<_, h2::Error>(Answer::Status(status, None));
        }
        body_tx.send_data(Bytes::copy_from_slice(payload), true)?;
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        Ok(Answer::Status(status, Some(got)))
    }
    .await;
    result.unwrap_or_else(|e| Answer::Failed(e.to_string()))
}
