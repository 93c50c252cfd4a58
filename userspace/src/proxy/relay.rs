//! The plain relay between two TCP connections, with buffers that follow the traffic: none
//! while a direction is idle (an idle connection costs its sockets and little else), a small
//! one for the first bytes, doubling while reads fill it up to [`MAX_BUFFER`] for bulk
//! transfers. End of data is passed on per direction (half-close works).

use std::io;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::watch;

use super::registry::Meter;

/// The first buffer of a direction that wakes up.
pub const MIN_BUFFER: usize = 4 * 1024;
/// What a bulk transfer grows to: 64 KiB reads take an eighth of the wake-ups and syscalls
/// of tokio's default 8 KiB (measured: `cargo xtask bench`, 1-stream throughput).
pub const MAX_BUFFER: usize = 64 * 1024;

/// How a relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relayed {
    /// Both directions ended.
    Finished,
    /// Stopped on request where no byte was held in user space (each direction waiting for
    /// data, or ended): the sockets can carry on in another process.
    Paused,
}

/// Relays until both directions have ended, or until `pause` turns true (`None`: never).
/// Bytes are counted as they move, `a` to `b` in `up`, back in `down`.
pub async fn relay(
    a: &mut TcpStream,
    b: &mut TcpStream,
    up: Meter<'_>,
    down: Meter<'_>,
    pause: Option<watch::Receiver<bool>>,
) -> io::Result<Relayed> {
    let (ar, aw) = a.split();
    let (br, bw) = b.split();
    let (x, y) = tokio::try_join!(copy(ar, bw, up, pause.clone()), copy(br, aw, down, pause))?;
    Ok(if x == Relayed::Paused || y == Relayed::Paused { Relayed::Paused } else { Relayed::Finished })
}

/// One direction: reads while `from` has data, writes it all to `to`, and shuts `to` down
/// for writing at the end of `from`'s data. A pause is taken only while waiting for data.
async fn copy(
    from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    count: Meter<'_>,
    pause: Option<watch::Receiver<bool>>,
) -> io::Result<Relayed> {
    let mut size = MIN_BUFFER;
    loop {
        tokio::select! {
            biased;
            r = from.readable() => r?,
            () = paused(pause.clone()) => return Ok(Relayed::Paused),
        }
        // Allocated only now that there is something to read, and dropped (below) once the
        // socket is drained: a direction waiting for data holds no buffer.
        let mut buf = vec![0u8; size];
        loop {
            match from.try_read(&mut buf) {
                Ok(0) => {
                    return match to.shutdown().await {
                        // The other side already closed both ways: nothing left to tell it.
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(Relayed::Finished),
                        other => other.map(|()| Relayed::Finished),
                    };
                }
                Ok(n) => {
                    to.write_all(&buf[..n]).await?;
                    count.add(n as u64);
                    size = next_size(size, n);
                    if buf.len() < size {
                        buf.resize(size, 0);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Resolves once `pause` is true; never without one, or once its sender is gone.
async fn paused(pause: Option<watch::Receiver<bool>>) {
    if let Some(mut p) = pause
        && p.wait_for(|p| *p).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// The buffer for the next read: doubled after a read that filled it, halved after one that
/// used less than a quarter, within [`MIN_BUFFER`]..=[`MAX_BUFFER`].
fn next_size(size: usize, read: usize) -> usize {
    if read == size {
        (size * 2).min(MAX_BUFFER)
    } else if read < size / 4 {
        (size / 2).max(MIN_BUFFER)
    } else {
        size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::registry::testing::entry as test_entry;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    #[test]
    fn buffers_grow_with_full_reads_and_shrink_with_small_ones() {
        let mut s = MIN_BUFFER;
        for _ in 0..10 {
            s = next_size(s, s);
        }
        assert_eq!(s, MAX_BUFFER);
        assert_eq!(next_size(MAX_BUFFER, MAX_BUFFER / 2), MAX_BUFFER);
        for _ in 0..10 {
            s = next_size(s, 10);
        }
        assert_eq!(s, MIN_BUFFER);
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn a_paused_relay_leaves_every_byte_to_the_next_one() {
        // client <-> (a | relay | b) <-> server, the relay paused and started again (as a
        // successor does with the handed-over sockets).
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let (pause, paused) = watch::channel(false);
        let first = tokio::spawn(async move {
            let e = test_entry();
            let r = relay(&mut a, &mut b, e.request(), e.response(), Some(paused)).await;
            (r.unwrap(), e.bytes(), a, b)
        });
        client.write_all(b"before").await.unwrap();
        let mut got = [0u8; 6];
        server.read_exact(&mut got).await.unwrap();
        pause.send_replace(true);
        let (ended, moved, mut a, mut b) = first.await.unwrap();
        assert_eq!((ended, moved.0), (Relayed::Paused, 6));
        // Written while no relay runs: it waits in the kernel, not in a lost buffer.
        client.write_all(b" and after").await.unwrap();
        client.shutdown().await.unwrap();
        let second = tokio::spawn(async move {
            let e = test_entry();
            relay(&mut a, &mut b, e.request(), e.response(), None).await.map(|r| (r, e.bytes()))
        });
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b" and after");
        server.shutdown().await.unwrap();
        let (ended, moved) = second.await.unwrap().unwrap();
        assert_eq!((ended, moved), (Relayed::Finished, (10, 0)));
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts_bytes() {
        // client <-> (a | relay | b) <-> server
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let e = Arc::new(test_entry());
        let counted = e.clone();
        let relay = tokio::spawn(async move {
            relay(&mut a, &mut b, e.request(), e.response(), None).await.map(|r| (r, e.bytes()))
        });
        let request: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&request).await.unwrap();
        let mut got = vec![0u8; 1000];
        server.read_exact(&mut got).await.unwrap();
        assert!(counted.bytes().0 >= 1000, "bytes are counted as they move, not at the end");
        client.shutdown().await.unwrap();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, request, "the request arrives whole, and its end too");
        server.write_all(b"answer after the half-close").await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer after the half-close");
        let (ended, moved) = relay.await.unwrap().unwrap();
        assert_eq!(ended, Relayed::Finished);
        assert_eq!(moved, (300_000, 27));
    }
}
