//! The chunked transfer coding's decoder (RFC 9112 §7.1), over the connection's buffer:
//! data is handed out as slices of it; extensions are skipped and trailers checked as
//! header lines, each within a limit.

use bytes::{Buf, Bytes, BytesMut};

/// Chunk extensions and trailers are skipped, up to these many bytes per body.
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// Where a chunked body's decoder stands (RFC 9112 §7.1).
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the chunk size's hex digits (`digits` so far).
    #[default]
    Size,
    /// Whitespace after the size; then an extension or CR.
    SizeLws,
    /// An extension, skipped up to CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line, or of the final CRLF.
    TrailerStart,
    TrailerLine,
    EndLf,
    End,
}

#[derive(Default, Debug)]
pub(super) struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
    /// Extension bytes skipped so far.
    skipped: usize,
    /// The trailer section, checked as header lines once it ends, then dropped (trailers
    /// are not forwarded).
    trailers: Vec<u8>,
}

pub(super) enum Step {
    Data(Bytes),
    /// The buffer holds no more of the body.
    More,
    End,
}

impl Chunked {
    /// Consumes framing from the front of `buf` up to the next data or the end.
    pub(super) fn step(&mut self, buf: &mut BytesMut) -> Result<Step, &'static str> {
        use ChunkState::*;
        loop {
            if self.state == End {
                return Ok(Step::End);
            }
            if self.state == Data {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = self.size.min(buf.len() as u64) as usize;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                return Ok(Step::Data(buf.split_to(take).freeze()));
            }
            let Some(&byte) = buf.first() else {
                return Ok(Step::More);
            };
            buf.advance(1);
            self.state = match (self.state, byte) {
                (Size, b) if b.is_ascii_hexdigit() => {
                    if self.digits == 16 {
                        return Err("chunk size too large");
                    }
                    self.digits += 1;
                    self.size = self.size << 4 | u64::from((b as char).to_digit(16).unwrap_or(0));
                    Size
                }
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Size, b';') if self.digits > 0 => Extension,
                (Size, b' ' | b'\t') if self.digits > 0 => SizeLws,
                (SizeLws, b' ' | b'\t') => SizeLws,
                (SizeLws, b';') => Extension,
                (SizeLws, b'\r') => SizeLf,
                (SizeLws, _) => return Err("bad chunk size"),
                (Size, _) => return Err("bad chunk size"),
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err("bare LF in a chunk header"),
                (Extension, _) => {
                    self.skipped += 1;
                    if self.skipped > MAX_CHUNK_EXTENSIONS {
                        return Err("chunk extensions too long");
                    }
                    Extension
                }
                (SizeLf, b'\n') => {
                    self.digits = 0;
                    if self.size == 0 { TrailerStart } else { Data }
                }
                (SizeLf, _) => return Err("chunk header not ended by CRLF"),
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size,
                (DataCr | DataLf, _) => return Err("chunk not ended by CRLF"),
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart, b'\n') => return Err("bare LF in trailers"),
                (TrailerStart | TrailerLine, _) => {
                    if self.trailers.len() >= MAX_TRAILERS {
                        return Err("trailers too long");
                    }
                    if byte == b'\n' && self.trailers.last() != Some(&b'\r') {
                        return Err("bare LF in trailers");
                    }
                    self.trailers.push(byte);
                    if byte == b'\n' { TrailerStart } else { TrailerLine }
                }
                (EndLf, b'\n') => {
                    if !self.trailers.is_empty() {
                        self.trailers.extend_from_slice(b"\r\n");
                        let mut slots = [httparse::EMPTY_HEADER; 64];
                        if !matches!(
                            httparse::parse_headers(&self.trailers, &mut slots),
                            Ok(httparse::Status::Complete(_))
                        ) {
                            return Err("malformed trailers");
                        }
                        self.trailers = Vec::new();
                    }
                    End
                }
                (EndLf, _) => return Err("chunked body not ended by CRLF"),
                // Handled before a byte is taken.
                (Data | End, _) => return Err("decoder state"),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> Result<(Vec<u8>, bool), &'static str> {
        let mut chunked = Chunked::default();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match chunked.step(&mut buf)? {
                Step::Data(data) => out.extend_from_slice(&data),
                Step::More => return Ok((out, false)),
                Step::End => return Ok((out, true)),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        assert_eq!(decode(b"5\r\nhello\r\n0\r\n\r\n"), Ok((b"hello".to_vec(), true)));
        assert_eq!(
            decode(b"3;name=v\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n"),
            Ok((b"abc0123456789".to_vec(), true))
        );
        assert_eq!(decode(b"5\r\nhel"), Ok((b"hel".to_vec(), false)));
    }

    #[test]
    fn chunked_bodies_decode_a_byte_at_a_time() {
        let input = b"4\r\nWiki\r\n5;x\r\npedia\r\n0\r\nT: 1\r\n\r\n";
        let mut chunked = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut ended = false;
        for &byte in input {
            buf.extend_from_slice(&[byte]);
            loop {
                match chunked.step(&mut buf).unwrap() {
                    Step::Data(data) => out.extend_from_slice(&data),
                    Step::More => break,
                    Step::End => {
                        ended = true;
                        break;
                    }
                }
            }
        }
        assert!(ended);
        assert_eq!(out, b"Wikipedia");
    }

    #[test]
    fn broken_chunked_framing_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello",
            b"5\r\nhelloXX",
            b"11111111111111111\r\n",
            b"5 \n",
            b"0\r\n\r\r",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
