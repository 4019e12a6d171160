//! A response body read by the purpose-built client: from the connection's buffer, then its
//! socket, by the framing the head gave; the connection goes back to the worker's pool as
//! soon as the last byte has been read.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::Conn;
use super::chunked::{Chunked, Step};

pub(super) enum Framing {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

/// The response body, read from the connection's buffer and socket; the connection goes
/// back to the pool as soon as the last byte has been read.
pub struct H1Body {
    pub(super) conn: Option<Box<Conn>>,
    pub(super) key: crate::upstream::client::IdleKey,
    pub(super) framing: Framing,
    pub(super) reusable: bool,
    /// The response's header fields as read, until the client's side takes them.
    pub(super) head: Option<crate::base::http1::RawHeaders>,
}

impl H1Body {
    /// The response's header fields as read (docs/architecture.md, "Two HTTP/1.1 paths").
    pub fn head(&self) -> Option<&crate::base::http1::RawHeaders> {
        self.head.as_ref()
    }

    pub fn take_head(&mut self) -> Option<crate::base::http1::RawHeaders> {
        self.head.take()
    }
}

impl H1Body {
    fn finish(&mut self) {
        self.framing = Framing::Done;
        self.release_if_done();
    }

    pub(super) fn release_if_done(&mut self) {
        if matches!(self.framing, Framing::Length(0)) {
            self.framing = Framing::Done;
        }
        if !matches!(self.framing, Framing::Done) {
            return;
        }
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            crate::upstream::client::release_h1(self.key, conn);
        }
    }
}

/// The body ended before its framing said it would, or broke its framing.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream body: {0}")]
    Malformed(&'static str),
    #[error("upstream body: {0}")]
    Io(#[from] std::io::Error),
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !conn.buf.is_empty() {
                        let take = (*left).min(conn.buf.len() as u64) as usize;
                        *left -= take as u64;
                        let data = conn.buf.split_to(take).freeze();
                        this.release_if_done();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(conn.poll_fill(cx))? == 0 {
                        this.conn = None;
                        return Poll::Ready(Some(Err(BodyError::Malformed("closed before the body's end"))));
                    }
                }
                Framing::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(conn.poll_fill(cx))? == 0 {
                        this.finish();
                        return Poll::Ready(None);
                    }
                }
                Framing::Chunked(chunked) => match chunked.step(&mut conn.buf) {
                    Err(why) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(BodyError::Malformed(why))));
                    }
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => {
                        if ready!(conn.poll_fill(cx))? == 0 {
                            this.conn = None;
                            return Poll::Ready(Some(Err(BodyError::Malformed("closed inside a chunked body"))));
                        }
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
