//! Writing a response on the purpose-built path: the head from the response's header map,
//! the body framed by its known length or chunked, small bodies behind the head in one
//! write, every write under `send_timeout`.

use std::io;
use std::pin::Pin;
use std::task::{Poll, ready};
use std::time::Duration;

use http::StatusCode;
use http::header::CONNECTION;
use hyper::body::Body;
use tokio::time::Instant;

use super::Exchange;
use crate::base::Deadline;
use crate::base::http1::{has_token, push_decimal, same_name, write_field};
use crate::listener::Transport;
use crate::metrics::{Metrics, Protection};
use crate::proxy::ProxyBody;

/// Body data up to this size is copied behind the head so both leave in one write.
const COALESCE_BYTES: usize = 16 * 1024;

/// Whether the connection goes on after a response.
pub(super) enum Next {
    KeepAlive,
    Close,
}

impl Exchange<'_> {
    /// Writes the response: the head, then the body, framed by its known length or
    /// chunked; a body that fails after the head was sent ends the connection. Borrowed,
    /// not taken: each move of a response is a 256-byte copy, and the caller drops it as
    /// soon as this returns (docs/benchmarks.md, "Responses written where they lie").
    pub(super) async fn respond<S: Transport>(
        &mut self,
        stream: &mut S,
        response: &mut http::Response<ProxyBody>,
        head_only: bool,
        close: bool,
    ) -> io::Result<Next> {
        let status = response.status();
        // A walk over the map's few fields (the upstream's travel as read): cheaper than
        // hashing the name.
        let close = close
            || response
                .headers()
                .iter()
                .any(|(name, v)| name == CONNECTION && has_token(v.as_bytes(), b"close"));
        let bodiless = head_only
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let body = response.body();
        let length = body.size_hint().exact();
        let chunked = !bodiless && length.is_none();
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut has_date = false;
        let mut has_length = false;
        let headers = response.headers();
        // The upstream's fields as read (its hop-by-hop ones already marked), then the
        // map, whose names (the route's `response_headers`) replace theirs.
        let mut written = |name: &[u8]| {
            if same_name(name, b"transfer-encoding") || same_name(name, b"connection") {
                return false;
            }
            if same_name(name, b"content-length") {
                // A HEAD or 304 answer keeps the length of what a GET would get.
                if !bodiless {
                    return false;
                }
                has_length = true;
            }
            has_date |= same_name(name, b"date");
            true
        };
        // The pipeline's own fields (`None`: in the map) replace both.
        let set = body.set_fields();
        let replaced = |name: &[u8]| set.is_some_and(|set| set.sets(name));
        if let Some(read) = body.upstream_head() {
            read.write_forwarded(out, |name| {
                !headers.keys().any(|set| same_name(set.as_str().as_bytes(), name)) && !replaced(name) && written(name)
            });
        }
        for (name, value) in headers {
            let name = name.as_str().as_bytes();
            if !replaced(name) && written(name) {
                write_field(out, name, value.as_bytes());
            }
        }
        if let Some(set) = set {
            set.write(out);
        }
        if !has_date {
            out.extend_from_slice(b"date: ");
            http_date(out);
            out.extend_from_slice(b"\r\n");
        }
        match (bodiless, length) {
            (false, Some(n)) => write_length(out, n),
            (true, Some(n)) if head_only && !has_length && n > 0 => write_length(out, n),
            (false, None) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            _ => {}
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        let send_timeout = self.settings.limits.send_timeout;
        let metrics = &self.worker.gateway.metrics;
        if bodiless {
            write_all(stream, out, send_timeout, metrics).await?;
            self.responded(response);
            return Ok(if close { Next::Close } else { Next::KeepAlive });
        }
        let mut body = Pin::new(response.body_mut());
        let mut head_sent = false;
        loop {
            let frame = if head_sent {
                std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            } else {
                // The body's first data, when it is at hand, leaves with the head.
                match std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        write_all(stream, out, send_timeout, metrics).await?;
                        out.clear();
                        head_sent = true;
                        continue;
                    }
                }
            };
            let data = match frame {
                None => break,
                Some(Err(error)) => return Err(io::Error::other(error)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue,
                },
            };
            if chunked {
                write_chunk_size(out, data.len());
            }
            if data.len() <= COALESCE_BYTES {
                out.extend_from_slice(&data);
            } else {
                write_all(stream, out, send_timeout, metrics).await?;
                out.clear();
                write_all(stream, &data, send_timeout, metrics).await?;
            }
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            if !body.is_end_stream() {
                // More is coming, maybe not soon: what is here leaves now.
                write_all(stream, out, send_timeout, metrics).await?;
                out.clear();
                head_sent = true;
            }
        }
        if chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        if !out.is_empty() {
            write_all(stream, out, send_timeout, metrics).await?;
            out.clear();
        }
        self.responded(response);
        Ok(if close { Next::Close } else { Next::KeepAlive })
    }

    /// `response` was written out. One clock read ends its access-log record and starts
    /// the idle wait that follows (docs/benchmarks.md, "One clock read for the response's
    /// end"); the body's drop, by the caller, finishes the record and frees the upstream's
    /// slot.
    fn responded(&mut self, response: &mut http::Response<ProxyBody>) {
        let at = Instant::now();
        response.body_mut().ended_at(at);
        self.responded_at = Some(at);
    }
}

fn write_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    push_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

fn write_chunk_size(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` value of the current second, formatted once per second per worker.
    static DATE_CACHE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((0, [0; 29])) };
}

/// Appends the current time as an HTTP date (RFC 9110 §5.6.7).
fn http_date(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE_CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                cache.1.copy_from_slice(text.as_bytes());
                cache.0 = secs;
            }
        }
        out.extend_from_slice(&cache.1);
    });
}

/// Writes all of `bytes`, giving up when a write stays blocked for `send_timeout` (the
/// client stopped reading); flushes what a TLS stream buffered.
async fn write_all<S: Transport>(
    stream: &mut S,
    bytes: &[u8],
    send_timeout: Duration,
    metrics: &Metrics,
) -> io::Result<()> {
    let mut written = 0;
    let mut timer: Option<Deadline> = None;
    std::future::poll_fn(|cx| {
        loop {
            let step = if written < bytes.len() {
                stream.poll_send(cx, &bytes[written..])
            } else {
                Pin::new(&mut *stream).poll_flush(cx).map_ok(|()| usize::MAX)
            };
            match step {
                Poll::Ready(Ok(usize::MAX)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    written += n;
                    timer = None;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    let timer = timer.get_or_insert_with(|| Deadline::new(Instant::now() + send_timeout));
                    ready!(timer.poll_expired(cx));
                    metrics.protected(Protection::SendTimeout);
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_chunk_sizes_are_written_without_formatting() {
        let mut out = Vec::new();
        write_length(&mut out, 0);
        write_length(&mut out, 1234567);
        write_chunk_size(&mut out, 0x1f);
        write_chunk_size(&mut out, 0);
        assert_eq!(out, b"content-length: 0\r\ncontent-length: 1234567\r\n1f\r\n0\r\n");
    }

    #[test]
    fn dates_are_rfc_9110_imf_fixdate() {
        let mut out = Vec::new();
        http_date(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.len(), 29);
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
    }
}
