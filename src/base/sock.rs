//! Socket writes issued as system calls of their own, not through libc.
//!
//! libc's `send` is a thread-cancellation point: it brackets the call with two locked
//! instructions to switch cancellation on and off, about 9 ns each here, and Tollgate's
//! threads are never cancelled. rustix makes the same system call directly, without the
//! brackets (docs/benchmarks.md, "Locked instructions"). Readiness stays tokio's, as in
//! its own `poll_write`.

use std::io;
use std::task::{Context, Poll, ready};

use rustix::net::SendFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Writes what the socket takes of `buf` now, or waits until it is writable.
pub fn poll_send(stream: &TcpStream, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        // NOSIGNAL: a peer gone away is an error to handle, not a SIGPIPE.
        let sent = stream.try_io(Interest::WRITABLE, || {
            rustix::net::send(stream, buf, SendFlags::NOSIGNAL).map_err(io::Error::from)
        });
        match sent {
            // Not writable after all (tokio has cleared its readiness), or interrupted.
            Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            result => return Poll::Ready(result),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn sends_bytes_waits_when_full_and_reports_a_closed_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();

        let sent = std::future::poll_fn(|cx| poll_send(&client, cx, b"hello"))
            .await
            .unwrap();
        assert_eq!(sent, 5);
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");

        // Fill the socket buffers: a send then waits (Pending) rather than failing.
        let chunk = vec![7u8; 64 * 1024];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut pending = false;
        for _ in 0..1024 {
            match poll_send(&client, &mut cx, &chunk) {
                Poll::Ready(Ok(n)) => assert!(n > 0),
                Poll::Ready(Err(error)) => panic!("{error}"),
                Poll::Pending => {
                    pending = true;
                    break;
                }
            }
        }
        assert!(pending, "the socket never filled");

        // The peer closes with unread data (RST): the send fails with an error, no signal.
        drop(server);
        let failed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                if let Err(error) = std::future::poll_fn(|cx| poll_send(&client, cx, &chunk)).await {
                    return error;
                }
            }
        })
        .await
        .expect("a send to a closed peer kept succeeding");
        assert!(
            matches!(
                failed.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{failed:?}"
        );
    }
}
