//! PROXY protocol v1 and v2 (parsed by `ppp`): the real client address when Tollgate sits
//! behind a TCP load balancer. The header is consumed exactly, so the HTTP bytes after it
//! are left in the socket for hyper.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest header: v2 with a UNIX address block and some TLVs.
const MAX_HEADER: usize = 536;

/// Reads the header; `Ok(None)` for a `LOCAL`/`UNKNOWN` header (health checks), which
/// keeps the socket peer as the client.
pub async fn read_header(stream: &mut TcpStream, timeout: Duration) -> io::Result<Option<SocketAddr>> {
    tokio::time::timeout(timeout, read(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no PROXY protocol header in time"))?
}

async fn read(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    let mut buf = [0u8; MAX_HEADER];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match parse(&buf[..n]) {
            // Part of the header is still in flight; it is at most a few hundred bytes.
            Parsed::Incomplete => tokio::time::sleep(Duration::from_millis(1)).await,
            Parsed::Invalid(reason) => return Err(invalid(reason)),
            Parsed::Header { len, source } => {
                let mut consumed = vec![0u8; len];
                stream.read_exact(&mut consumed).await?;
                return Ok(source);
            }
        }
    }
}

/// What the first bytes of a connection say as a PROXY protocol header.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    Invalid(&'static str),
    /// A header of `len` bytes; `source` is `None` for `LOCAL`/`UNKNOWN`.
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
}

/// Parses a PROXY protocol header at the start of `bytes` (a pure function: fuzzed).
pub fn parse(bytes: &[u8]) -> Parsed {
    let parsed = HeaderResult::parse(bytes);
    if parsed.is_incomplete() {
        return if bytes.len() >= MAX_HEADER {
            Parsed::Invalid("PROXY protocol header too long")
        } else {
            Parsed::Incomplete
        };
    }
    let (len, source) = match parsed {
        HeaderResult::V1(Ok(header)) => (header.header.len(), v1_source(&header.addresses)),
        HeaderResult::V2(Ok(header)) => (header.len(), v2_source(&header.addresses)),
        HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => {
            return Parsed::Invalid("malformed PROXY protocol header");
        }
    };
    if len > bytes.len() {
        return Parsed::Invalid("PROXY protocol header longer than what was read");
    }
    Parsed::Header { len, source }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

fn v1_source(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    }
}

fn v2_source(addresses: &v2::Addresses) -> Option<SocketAddr> {
    match addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}
