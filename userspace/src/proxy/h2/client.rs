//! The client end of an HBONE connection: one HTTP/2 connection over TLS, driven by a task
//! of its own that also keeps it alive with PINGs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW, keepalive};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP/2 handshake: {0}")]
    Handshake(h2::Error),
    /// The connection takes no new streams (GOAWAY, refused stream, dead connection):
    /// another connection may.
    #[error("connection unusable: {0}")]
    Unavailable(h2::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("no response within {0:?}")]
    Timeout(std::time::Duration),
    #[error("peer answered {0}")]
    Status(StatusCode),
    #[error("bad CONNECT request: {0}")]
    Request(#[from] http::Error),
}

/// An established HBONE connection. Cheap to share: streams are opened on clones of the
/// same `SendRequest`.
pub struct H2Client {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// Local address of the underlying TCP connection.
    pub local: std::net::SocketAddr,
}

impl H2Client {
    /// Runs the HTTP/2 handshake over `io` (an established TLS stream) and spawns the task
    /// that drives the connection. `label` names it in logs.
    pub async fn handshake<T>(io: T, local: std::net::SocketAddr, label: String) -> Result<Self, ClientError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .initial_max_send_streams(MAX_STREAMS_PER_CONNECTION)
            .max_header_list_size(16 * 1024)
            .max_send_buffer_size(STREAM_WINDOW as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(ClientError::Handshake)?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let ping = conn.ping_pong();
        tokio::spawn(async move {
            let alive = async {
                match ping {
                    Some(pp) => keepalive(pp).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut conn => match r {
                    Ok(()) => tracing::debug!(conn = %label, "HBONE connection closed"),
                    Err(e) => tracing::info!(conn = %label, "HBONE connection failed: {e}"),
                },
                why = alive => tracing::warn!(conn = %label, "HBONE connection dropped: {why}"),
            }
            flag.store(true, Ordering::Release);
        });
        Ok(Self { send, closed, local })
    }

    /// Whether the connection can take no more streams (closed, failed or unresponsive).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Streams this connection may carry: ours, or fewer if the server says so.
    pub fn stream_limit(&self) -> usize {
        self.send.current_max_send_streams().min(MAX_STREAMS_PER_CONNECTION)
    }

    /// Opens a CONNECT stream to `authority` and waits up to `timeout` for the 200.
    pub async fn connect(
        &self,
        authority: std::net::SocketAddr,
        forwarded_for: std::net::SocketAddr,
        timeout: std::time::Duration,
    ) -> Result<(SendStream<Bytes>, RecvStream), ClientError> {
        let req = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(authority.to_string())
            .header("forwarded", format!("for=\"{forwarded_for}\""))
            .body(())?;
        // A failure before the request is out means this connection is draining or dead:
        // mark it so the pool hands out no more streams on it.
        let unavailable = |e: h2::Error| {
            self.closed.store(true, Ordering::Release);
            ClientError::Unavailable(e)
        };
        let mut send = self.send.clone().ready().await.map_err(unavailable)?;
        let (response, stream) = send.send_request(req, false).map_err(unavailable)?;
        let response = match tokio::time::timeout(timeout, response).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away() => {
                return Err(unavailable(e));
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(ClientError::Timeout(timeout)),
        };
        if response.status() != StatusCode::OK {
            return Err(ClientError::Status(response.status()));
        }
        Ok((stream, response.into_body()))
    }
}
