//! The server end of an HBONE connection: accepts CONNECT streams and hands each to a
//! handler task, pinging the client to notice a dead peer.

use std::future::Future;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{CONNECTION_WINDOW, MAX_FRAME_SIZE, SERVER_MAX_STREAMS, STREAM_WINDOW, keepalive};
use crate::drain::{Mode, Watcher};

/// Serves HTTP/2 on `io` until the client goes away; each request runs `handler` on a task
/// of its own. Returns the number of streams accepted, and how the connection ended. A
/// client that does not complete the
/// HTTP/2 handshake within `handshake_timeout` is dropped. On a graceful drain the client is
/// told to go away (GOAWAY): the streams it has finish, no new one is accepted; on an
/// immediate one the connection is dropped (its streams end on the same signal).
pub async fn serve<T, H, F>(
    io: T,
    label: &str,
    handshake_timeout: std::time::Duration,
    mut drain: Watcher,
    handler: H,
) -> (u64, Result<(), h2::Error>)
where
    T: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request<RecvStream>, SendResponse<Bytes>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut conn = match tokio::time::timeout(handshake_timeout, handshake(io)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return (0, Err(e)),
        Err(_) => return (0, Err(h2::Error::from(h2::Reason::SETTINGS_TIMEOUT))),
    };
    let ping = conn.ping_pong();
    let alive = async {
        match ping {
            Some(pp) => keepalive(pp).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(alive);
    let mut streams = 0;
    let mut dead = false;
    // What to wait for next: a graceful drain, then an immediate one.
    let mut next = Mode::Graceful;
    loop {
        tokio::select! {
            () = drain.at_least(next) => {
                if drain.mode() == Some(Mode::Immediate) {
                    return (streams, Ok(()));
                }
                conn.graceful_shutdown();
                next = Mode::Immediate;
            }
            req = conn.accept() => match req {
                Some(Ok((req, respond))) => {
                    streams += 1;
                    tokio::spawn(handler(req, respond));
                }
                Some(Err(e)) => return (streams, Err(e)),
                None => return (streams, Ok(())),
            },
            why = &mut alive, if !dead => {
                tracing::warn!(conn = %label, "closing HBONE connection: {why}");
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                dead = true;
            }
        }
    }
}

/// The server side of the HTTP/2 handshake, with ztunnel's settings.
async fn handshake<T: AsyncRead + AsyncWrite + Unpin>(io: T) -> Result<h2::server::Connection<T, Bytes>, h2::Error> {
    h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .max_header_list_size(64 * 1024)
        .max_send_buffer_size(400 * 1024)
        .handshake::<_, Bytes>(io)
        .await
}

/// Answers a stream with `status` and no body.
pub fn reject(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder().status(status).body(()).expect("a status-only response is valid");
    let _ = respond.send_response(resp, true);
}
