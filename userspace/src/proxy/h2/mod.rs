//! HTTP/2 for HBONE: the settings ztunnel uses, PING keepalive, and the relay between a TCP
//! connection and a CONNECT stream.

pub mod client;
pub mod server;

use std::future::poll_fn;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::registry::Meter;
use super::socket;

/// Flow-control windows and frame size (ztunnel's values): large enough that one stream can
/// fill a fast link without waiting for WINDOW_UPDATEs.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Streams a client opens on one connection before opening another.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// What a server accepts per connection (more than clients use, as in ztunnel).
pub const SERVER_MAX_STREAMS: u32 = 200;
/// PING every interval; a connection whose PONG takes longer than the timeout is dead.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Bytes read from TCP per DATA frame at most.
const READ_CHUNK: usize = 64 * 1024;

/// Pings the peer until a PONG does not come back in time; returns why it stopped.
pub async fn keepalive(mut pp: h2::PingPong) -> String {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("ping failed: {e}"),
            Err(_) => return format!("no PONG within {PING_TIMEOUT:?}"),
        }
    }
}

/// How a relay ended badly.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The TCP side reset or failed; the stream was reset towards the peer.
    #[error("tcp side: {0}")]
    Tcp(std::io::Error),
    /// The stream was reset (or its connection died); the TCP side was reset.
    #[error("stream reset: {0}")]
    Stream(h2::Error),
}

/// Relays between `tcp` and a CONNECT stream until both directions are done, counting bytes
/// as they move: from `tcp` into the stream in `from_tcp`, back in `to_tcp`.
///
/// End of data is passed on as end of data (FIN ↔ END_STREAM), each direction on its own,
/// so half-closed connections work. A reset on one side becomes a reset on the other:
/// RST_STREAM(CANCEL) towards the peer, a TCP RST towards the local socket.
pub async fn relay(
    tcp: &mut TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    from_tcp: Meter<'_>,
    to_tcp: Meter<'_>,
) -> Result<(), RelayError> {
    let result = {
        let (mut rd, mut wr) = tcp.split();
        let up = tcp_to_stream(&mut rd, &mut send, from_tcp);
        let down = stream_to_tcp(&mut recv, &mut wr, to_tcp);
        tokio::try_join!(up, down).map(|_| ())
    };
    match &result {
        Ok(()) => {}
        Err(RelayError::Tcp(_)) => send.send_reset(h2::Reason::CANCEL),
        Err(RelayError::Stream(_)) => {
            socket::reset_on_close(tcp);
            send.send_reset(h2::Reason::CANCEL);
        }
    }
    result
}

async fn tcp_to_stream(
    rd: &mut tokio::net::tcp::ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    count: Meter<'_>,
) -> Result<(), RelayError> {
    let mut buf = BytesMut::new();
    loop {
        // While waiting for the local side, notice a reset of the stream: the local side
        // may never send again. The buffer is taken only once there is data: an idle
        // stream holds none.
        let read = tokio::select! {
            r = rd.readable() => match r {
                Ok(()) => {
                    buf.reserve(READ_CHUNK);
                    match rd.try_read_buf(&mut buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        r => r,
                    }
                }
                Err(e) => Err(e),
            },
            r = poll_fn(|cx| send.poll_reset(cx)) => return match r {
                // The peer wants no more data but did not fail (HTTP/2 allows that after a
                // complete answer): stop sending, as ztunnel reads it.
                Ok(h2::Reason::NO_ERROR) => Ok(()),
                Ok(reason) => Err(RelayError::Stream(h2::Error::from(reason))),
                Err(e) => Err(RelayError::Stream(e)),
            },
        };
        match read {
            Ok(0) => {
                send.send_data(Bytes::new(), true).map_err(RelayError::Stream)?;
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => return Err(RelayError::Tcp(e)),
        }
        // The whole buffer goes: its spare room is not kept for an idle stream.
        let mut chunk = std::mem::take(&mut buf).freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(RelayError::Stream(e)),
                None => return Err(RelayError::Stream(h2::Error::from(h2::Reason::STREAM_CLOSED))),
            };
            let part = chunk.split_to(granted.min(chunk.len()));
            count.add(part.len() as u64);
            send.send_data(part, false).map_err(RelayError::Stream)?;
        }
    }
}

async fn stream_to_tcp(
    recv: &mut RecvStream,
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
    count: Meter<'_>,
) -> Result<(), RelayError> {
    while let Some(chunk) = recv.data().await {
        let chunk = match chunk {
            Ok(c) => c,
            // Reset without error: end of data, not a failure.
            Err(e) if e.reason() == Some(h2::Reason::NO_ERROR) => break,
            Err(e) => return Err(RelayError::Stream(e)),
        };
        wr.write_all(&chunk).await.map_err(RelayError::Tcp)?;
        count.add(chunk.len() as u64);
        // Window credit goes back only once the bytes are written: TCP back-pressure
        // reaches the sender.
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    match wr.shutdown().await {
        Ok(()) => Ok(()),
        // The local side already closed both ways: nothing left to tell it.
        Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(RelayError::Tcp(e)),
    }
}
