//! Socket reads and writes issued as system calls of their own, not through libc.
//!
//! libc's `send` and `recv` are thread-cancellation points: in a process with more than
//! one thread they bracket the call with two locked instructions to switch cancellation
//! on and off, about 9 ns each here, and Tollgate's threads are never cancelled. rustix
//! makes the same system calls directly, without the brackets (docs/benchmarks.md,
//! "Locked instructions"). Readiness stays tokio's, as in its own `poll_write` and
//! `poll_read`.

use std::cell::RefCell;
use std::io;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use rustix::net::{RecvFlags, SendFlags};
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

/// The most one [`poll_recv_small`] reads.
const SMALL_READ_BYTES: usize = 8 * 1024;

thread_local! {
    /// Where [`poll_recv_small`] reads: initialized once per thread, so the system call
    /// can write into it without `unsafe` (a `BytesMut`'s spare room is uninitialized).
    static SCRATCH: RefCell<[u8; SMALL_READ_BYTES]> = const { RefCell::new([0; SMALL_READ_BYTES]) };
}

/// Reads what the socket has (up to [`SMALL_READ_BYTES`]) onto the end of `buf`, or
/// waits until it is readable; `Ok(0)` at the end of input. For heads and what comes
/// with them: the bytes are copied once more, from a per-thread buffer, which costs less
/// than libc's brackets for a read of a few hundred bytes and more for a bulk body, which
/// is read through tokio instead.
pub fn poll_recv_small(stream: &TcpStream, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        // A read shorter than asked for drained the socket, and tokio's own `poll_read`
        // then forgets the readiness it saw before the read, so that the next read waits
        // for the next event instead of making a system call that would block. `try_io`
        // does that when its closure says `WouldBlock`; a short read says it after
        // keeping its bytes, which `drained` hands out.
        let mut drained = None;
        // The thread's buffer; tokio's read if it were ever unavailable (nothing here
        // borrows it twice, and it has no destructor to have run), so no panic is possible.
        let read = match SCRATCH.try_with(|scratch| {
            scratch
                .try_borrow_mut()
                .ok()
                .map(|mut scratch| recv_onto(stream, &mut scratch[..], buf, &mut drained))
        }) {
            Ok(Some(read)) => read,
            _ => recv_through_tokio(stream, buf),
        };
        if let Some(read) = drained {
            return Poll::Ready(Ok(read));
        }
        match read {
            // Not readable after all (tokio has cleared its readiness), or interrupted.
            Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            result => return Poll::Ready(result),
        }
    }
}

/// One `recv` into `scratch`, its bytes appended to `buf`. A short read is returned in
/// `drained` and reported to `try_io` as `WouldBlock` (see [`poll_recv_small`]).
fn recv_onto(
    stream: &TcpStream,
    scratch: &mut [u8],
    buf: &mut BytesMut,
    drained: &mut Option<usize>,
) -> io::Result<usize> {
    stream.try_io(Interest::READABLE, || {
        let (read, _) = rustix::net::recv(stream, &mut *scratch, RecvFlags::empty())?;
        buf.extend_from_slice(scratch.get(..read).unwrap_or_default());
        if read > 0 && read < scratch.len() {
            *drained = Some(read);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(read)
    })
}

/// The read through tokio and libc, for a thread whose buffer is unavailable: kept apart,
/// so that the common path's `try_io` stays inlined.
#[cold]
#[inline(never)]
fn recv_through_tokio(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    stream.try_read_buf(buf)
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

    #[tokio::test]
    async fn small_reads_append_wait_for_bytes_and_see_the_end() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();

        // Nothing sent yet: the read waits, and leaves the buffer as it was.
        let mut buf = BytesMut::from(&b"kept:"[..]);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(poll_recv_small(&server, &mut cx, &mut buf).is_pending());
        assert_eq!(&buf[..], b"kept:");

        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let read = std::future::poll_fn(|cx| poll_recv_small(&server, cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(read, 18);
        assert_eq!(&buf[..], b"kept:GET / HTTP/1.1\r\n\r\n");

        // More than one read's worth arrives whole, in reads of at most SMALL_READ_BYTES.
        let big: Vec<u8> = (0..SMALL_READ_BYTES * 3 + 17).map(|i| (i % 251) as u8).collect();
        client.write_all(&big).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = BytesMut::new();
        loop {
            let read = std::future::poll_fn(|cx| poll_recv_small(&server, cx, &mut got))
                .await
                .unwrap();
            assert!(read <= SMALL_READ_BYTES);
            if read == 0 {
                break;
            }
        }
        assert_eq!(&got[..], &big[..]);
    }
}
