//! The purpose-built HTTP/1.1 path and its hand-over to hyper, seen from a raw socket
//! (docs/architecture.md, "Two HTTP/1.1 paths"): one keep-alive connection carries
//! bodiless requests and bodies of declared length that arrive with their head (served
//! on the fast path), a chunked body (handed to hyper with the bytes already read), more
//! requests after it, and the hand-back once it was parked; framing is checked byte for
//! byte.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// One response read off `stream`: status line, lower-cased headers and the body, framed
/// by `Content-Length`, chunked encoding or (for HEAD) nothing.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: std::net::SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk).expect("read");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    fn take_line(&mut self) -> String {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.buf[..at].to_vec()).unwrap();
                self.buf.drain(..at + 2);
                return line;
            }
            assert!(self.fill() > 0, "closed inside a line");
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill() > 0, "closed inside a body");
        }
        self.buf.drain(..n).collect()
    }

    fn send(&mut self, request: &[u8]) {
        self.stream.write_all(request).unwrap();
    }

    fn response(&mut self, head_request: bool) -> Raw {
        let status_line = self.take_line();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status = status_line[9..12].parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let line = self.take_line();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut raw = Raw {
            status,
            headers,
            body: Vec::new(),
        };
        if head_request {
            return raw;
        }
        if raw.header("transfer-encoding") == Some("chunked") {
            assert!(raw.header("content-length").is_none());
            loop {
                let size = usize::from_str_radix(&self.take_line(), 16).unwrap();
                if size == 0 {
                    assert_eq!(self.take_line(), "");
                    break;
                }
                let data = self.take(size);
                raw.body.extend_from_slice(&data);
                assert_eq!(self.take_line(), "");
            }
        } else {
            let length: usize = raw
                .header("content-length")
                .expect("a framed response")
                .parse()
                .unwrap();
            raw.body = self.take(length);
        }
        raw
    }

    fn closed(&mut self) -> bool {
        self.buf.is_empty() && matches!(self.stream.read(&mut [0u8; 1]), Ok(0))
    }
}

fn config(upstream: std::net::SocketAddr) -> String {
    format!(
        "{}[upstreams.u]\nendpoints = [\"{upstream}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"u\"\n",
        base_config()
    )
}

/// The gateway's `tollgate_parked_connections` gauge.
async fn parked(gateway: &Gateway) -> i64 {
    admin(gateway, "GET", "/metrics")
        .await
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_parked_connections "))
        .and_then(|v| v.parse().ok())
        .expect("parked gauge")
}

fn json(raw: &Raw) -> serde_json::Value {
    serde_json::from_slice(&raw.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&raw.body)))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_connection_carries_fast_and_handed_over_requests_framed_exactly() {
    let upstream = Upstream::start("u").await;
    let gateway = Gateway::start(&config(upstream.addr));
    let mut conn = Conn::open(gateway.proxy);

    // Bodiless GET: the echo's JSON, with a length, a date and the request id.
    conn.send(b"GET /a?x=1 HTTP/1.1\r\nHost: api.example\r\nX-Custom: kept\r\n\r\n");
    let get = conn.response(false);
    assert_eq!(get.status, 200);
    let echo = json(&get);
    assert_eq!(echo["path"], "/a?x=1");
    assert_eq!(echo["headers"]["x-custom"], "kept");
    assert_eq!(echo["headers"]["x-forwarded-host"], "api.example");
    assert_eq!(get.header("content-length").unwrap(), get.body.len().to_string());
    assert!(get.header("date").is_some_and(|d| d.ends_with(" GMT")));
    assert_eq!(get.header("x-request-id").map(str::len), Some(32));

    // HEAD: the upstream's length of the GET body, and no body on the wire (the next
    // response must start right after the head).
    conn.send(b"HEAD /a?x=1 HTTP/1.1\r\nHost: api.example\r\nX-Custom: kept\r\n\r\n");
    let head = conn.response(true);
    assert_eq!(head.status, 200);
    assert!(head.header("content-length").is_some());

    // A chunked upstream body, decoded and re-framed as chunked for the client.
    conn.send(b"GET /download/100000 HTTP/1.1\r\nHost: a\r\n\r\n");
    let download = conn.response(false);
    assert_eq!(download.status, 200);
    assert_eq!(download.header("transfer-encoding"), Some("chunked"));
    assert_eq!(download.body.len(), 100_000);
    assert!(download.body.iter().all(|&b| b == b'x'));

    // An upstream error status passes through.
    conn.send(b"GET /status/503 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(conn.response(false).status, 503);

    // A body of declared length, written with its head, is served on this path.
    conn.send(b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
    let posted = conn.response(false);
    assert_eq!(posted.status, 200);
    assert_eq!(json(&posted)["bytes"], 5);

    // A chunked body goes to hyper with the bytes already read, on the same connection,
    // and arrives whole.
    conn.send(b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    let posted = conn.response(false);
    assert_eq!(posted.status, 200);
    assert_eq!(json(&posted)["bytes"], 5);

    // The connection goes on serving after the hand-over.
    conn.send(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n");
    let after = conn.response(false);
    assert_eq!(json(&after)["path"], "/b");

    // Idle past `park_idle_after`, the general path parks the connection and hands it
    // back: it is counted parked, and then serves again — a body, and bodiless requests.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(parked(&gateway).await, 1);
    conn.send(b"GET /e HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(json(&conn.response(false))["path"], "/e");
    conn.send(b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    assert_eq!(json(&conn.response(false))["bytes"], 3);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(parked(&gateway).await, 1);
    conn.send(b"GET /f HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(json(&conn.response(false))["path"], "/f");
    assert_eq!(parked(&gateway).await, 0);

    // `Connection: close` is answered in kind and the connection is closed.
    conn.send(b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let last = conn.response(false);
    assert_eq!(json(&last)["path"], "/c");
    assert_eq!(last.header("connection"), Some("close"));
    assert!(conn.closed(), "closed after Connection: close");

    // The same on the fast path from the first request, and a head sent in pieces.
    let mut conn = Conn::open(gateway.proxy);
    conn.send(b"GET /d HTTP/1.1\r\nHo");
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.send(b"st: a\r\nConnection: close\r\n\r\n");
    let pieces = conn.response(false);
    assert_eq!(json(&pieces)["path"], "/d");
    assert_eq!(pieces.header("connection"), Some("close"));
    assert!(conn.closed());

    // Error responses from the gateway itself are framed the same way (no route → 404,
    // JSON body with its length), and HEAD gets their length without the body.
    let gateway = Gateway::start(&format!(
        "{}[upstreams.u]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"v1\"\npath = \"/v1\"\nupstream = \"u\"\n",
        base_config(),
        upstream.addr
    ));
    let mut conn = Conn::open(gateway.proxy);
    conn.send(b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n");
    let missing = conn.response(false);
    assert_eq!(missing.status, 404);
    assert_eq!(json(&missing)["error"]["code"], "route_not_found");
    conn.send(b"HEAD /nowhere HTTP/1.1\r\nHost: a\r\n\r\n");
    let missing_head = conn.response(true);
    assert_eq!(missing_head.status, 404);
    assert_eq!(
        missing_head.header("content-length"),
        Some(missing.body.len().to_string().as_str())
    );
    conn.send(b"GET /v1/ok HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(json(&conn.response(false))["path"], "/v1/ok");
}

/// An upstream that answers every request on a keep-alive connection with the same head:
/// mixed-case names, hop-by-hop fields (one named by `Connection`), a repeated field, and
/// fields the gateway sets itself.
fn raw_upstream() -> std::net::SocketAddr {
    canned_upstream(
        "HTTP/1.1 200 OK\r\nServer: Raw/1\r\nConnection: keep-alive, X-Hop\r\n\
         X-Hop: secret\r\nKeep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nX-Request-Id: upstream-id\r\n\
         Strict-Transport-Security: max-age=1\r\nset-cookie: b=2\r\nContent-Length: 2\r\n\r\nok",
    )
}

/// An upstream that answers every bodiless request on a connection with `response`.
fn canned_upstream(response: &'static str) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..at + 4);
                        if stream.write_all(response.as_bytes()).is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_fields_are_forwarded_as_read_without_the_connections_own() {
    let upstream = raw_upstream();
    let gateway = Gateway::start(&format!(
        "{}[upstreams.u]\nendpoints = [\"{upstream}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"u\"\n\
         response_headers = {{ \"strict-transport-security\" = \"max-age=63072000\" }}\n",
        base_config()
    ));
    let check = |raw: &Raw, path: &str| {
        assert_eq!(raw.status, 200, "{path}");
        assert_eq!(raw.body, b"ok", "{path}");
        assert_eq!(raw.header("server"), Some("Raw/1"), "{path}");
        let cookies: Vec<&str> = raw
            .headers
            .iter()
            .filter(|(n, _)| n == "set-cookie")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(cookies, ["a=1", "b=2"], "{path}: both, in order");
        for hop in ["x-hop", "keep-alive"] {
            assert_eq!(raw.header(hop), None, "{path}: {hop} is the upstream connection's own");
        }
        assert_ne!(raw.header("connection"), Some("keep-alive, X-Hop"), "{path}");
        // The gateway's values replace the upstream's, once.
        let ids: Vec<&(String, String)> = raw.headers.iter().filter(|(n, _)| n == "x-request-id").collect();
        assert_eq!(ids.len(), 1, "{path}: {ids:?}");
        assert_eq!(ids[0].1, "client-id", "{path}");
        let hsts: Vec<&(String, String)> = raw
            .headers
            .iter()
            .filter(|(n, _)| n == "strict-transport-security")
            .collect();
        assert_eq!(hsts.len(), 1, "{path}: {hsts:?}");
        assert_eq!(hsts[0].1, "max-age=63072000", "{path}");
    };
    let mut conn = Conn::open(gateway.proxy);
    // The purpose-built path writes the fields as read.
    conn.send(b"GET /a HTTP/1.1\r\nHost: a\r\nX-Request-Id: client-id\r\n\r\n");
    check(&conn.response(false), "fast path");
    // hyper's path (a chunked body) gets them merged into its map.
    conn.send(b"POST /b HTTP/1.1\r\nHost: a\r\nX-Request-Id: client-id\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n");
    check(&conn.response(false), "hyper's path, body");
    // And a GET while the connection stays on hyper's side: the purpose-built client
    // read the upstream's head, hyper writes it.
    conn.send(b"GET /c HTTP/1.1\r\nHost: a\r\nX-Request-Id: client-id\r\n\r\n");
    check(&conn.response(false), "hyper's path, no body");
}

/// An upstream whose head mixes spellings: no space after a colon, trailing whitespace,
/// and lines ended by a bare LF (which RFC 9112 §2.2 lets a recipient accept).
fn spelled_upstream() -> std::net::SocketAddr {
    canned_upstream(
        "HTTP/1.1 200 OK\r\nX-Tight:v\r\nX-Case: Kept \r\nX-Lf: 1\n\
         X-After: 2\r\nConnection: keep-alive\r\nX-Last: 3\nContent-Length: 2\r\n\r\nok",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_lines_leave_as_read_and_bare_lf_ones_end_in_crlf() {
    let gateway = Gateway::start(&config(spelled_upstream()));
    let mut conn = Conn::open(gateway.proxy);
    conn.send(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n");
    // The head, byte for byte up to its blank line.
    let head: Vec<u8> = loop {
        if let Some(at) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break conn.buf.drain(..at + 4).collect();
        }
        assert!(conn.fill() > 0, "closed inside the head");
    };
    let head = String::from_utf8(head).unwrap();
    assert!(
        head.contains("\r\nX-Tight:v\r\nX-Case: Kept \r\n"),
        "adjacent lines as the upstream spelled them: {head:?}"
    );
    assert!(head.contains("\r\nX-Lf: 1\r\n"), "{head:?}");
    assert!(head.contains("\r\nX-After: 2\r\n"), "{head:?}");
    assert!(head.contains("\r\nX-Last: 3\r\n"), "{head:?}");
    assert!(
        !head.to_ascii_lowercase().contains("keep-alive"),
        "hop-by-hop: {head:?}"
    );
    assert_eq!(
        head.matches('\n').count(),
        head.matches("\r\n").count(),
        "every line ends in CRLF: {head:?}"
    );
    assert_eq!(conn.take(2), b"ok");
    // The connection goes on: the head was framed right.
    conn.send(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n");
    let raw = conn.response(false);
    assert_eq!(
        (raw.status, raw.header("x-last"), &raw.body[..]),
        (200, Some("3"), &b"ok"[..])
    );
}

/// An upstream that answers every request with the request itself as it arrived: its
/// head, then its body as framed by `Content-Length` or chunked (the chunks decoded).
/// Counts the requests it saw.
fn mirror_upstream() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut conn = Conn {
                    stream,
                    buf: Vec::new(),
                };
                conn.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                loop {
                    let mut head = String::new();
                    loop {
                        let Some(line) =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conn.take_line())).ok()
                        else {
                            return;
                        };
                        head.push_str(&line);
                        head.push_str("\r\n");
                        if line.is_empty() {
                            break;
                        }
                    }
                    let field = |name: &str| {
                        head.lines()
                            .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case(name)))
                            .map(|(_, v)| v.trim().to_string())
                    };
                    let mut body = Vec::new();
                    if field("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
                        loop {
                            let size = usize::from_str_radix(&conn.take_line(), 16).unwrap();
                            if size == 0 {
                                conn.take_line();
                                break;
                            }
                            body.extend(conn.take(size));
                            conn.take_line();
                        }
                    } else if let Some(length) = field("content-length") {
                        body = conn.take(length.parse().unwrap());
                    }
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut mirrored = head.into_bytes();
                    mirrored.extend_from_slice(&body);
                    let response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", mirrored.len());
                    let mut out = response.into_bytes();
                    out.extend_from_slice(&mirrored);
                    if conn.stream.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// What the mirror upstream saw: the head's lines (names lower-cased) and the body.
fn mirrored(raw: &Raw) -> (Vec<String>, Vec<u8>) {
    let at = raw
        .body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a mirrored head")
        + 4;
    let head = String::from_utf8(raw.body[..at].to_vec()).unwrap();
    let lines = head
        .lines()
        .map(|l| match l.split_once(':') {
            Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
            None => l.to_string(),
        })
        .collect();
    (lines, raw.body[at..].to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_of_declared_length_reach_the_upstream_whole_from_either_path() {
    let (upstream, seen) = mirror_upstream();
    let gateway = Gateway::start(&format!(
        "{}[upstreams.u]\nendpoints = [\"{upstream}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"u\"\n\
         max_body_bytes = 64\n",
        base_config()
    ));
    let mut conn = Conn::open(gateway.proxy);
    let framed_as = |lines: &[String], length: usize, what: &str| {
        let lengths: Vec<&String> = lines.iter().filter(|l| l.starts_with("content-length:")).collect();
        assert_eq!(lengths, [&format!("content-length: {length}")], "{what}: {lines:?}");
        assert!(
            !lines.iter().any(|l| l.starts_with("transfer-encoding:")),
            "{what}: {lines:?}"
        );
    };

    // Written with its head: the body behind the forwarded head, framed by its length.
    conn.send(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"q\":\"8.8.8.8\"}\r\n");
    let answer = conn.response(false);
    assert_eq!(answer.status, 200);
    let (lines, body) = mirrored(&answer);
    assert_eq!(lines[0], "POST /a HTTP/1.1");
    assert!(
        lines.contains(&"content-type: application/json".to_string()),
        "{lines:?}"
    );
    framed_as(&lines, 17, "whole with its head");
    assert_eq!(body, b"{\"q\":\"8.8.8.8\"}\r\n");

    // The head first and the body 50 ms later: streamed by the general path, the same
    // bytes arrive.
    conn.send(b"PUT /b HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n");
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.send(b"hello world");
    let answer = conn.response(false);
    assert_eq!(answer.status, 200);
    let (lines, body) = mirrored(&answer);
    assert_eq!(lines[0], "PUT /b HTTP/1.1");
    framed_as(&lines, 11, "sent in two pieces");
    assert_eq!(body, b"hello world");

    // A body with a request pipelined behind it: both answered, in order, each whole.
    conn.send(b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /d HTTP/1.1\r\nHost: a\r\n\r\n");
    let (lines, body) = mirrored(&conn.response(false));
    assert_eq!((lines[0].as_str(), body.as_slice()), ("POST /c HTTP/1.1", &b"abc"[..]));
    framed_as(&lines, 3, "pipelined");
    let (lines, body) = mirrored(&conn.response(false));
    assert_eq!(lines[0], "GET /d HTTP/1.1");
    assert!(body.is_empty());

    // An empty body of declared length stays framed as one.
    conn.send(b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
    let (lines, body) = mirrored(&conn.response(false));
    framed_as(&lines, 0, "empty");
    assert!(body.is_empty());

    // Over the route's limit, whole or not: refused with 413 before any upstream sees it.
    let before = seen.load(std::sync::atomic::Ordering::SeqCst);
    let mut big = b"POST /f HTTP/1.1\r\nHost: a\r\nContent-Length: 65\r\n\r\n".to_vec();
    big.extend_from_slice(&[b'x'; 65]);
    let mut refused = Conn::open(gateway.proxy);
    refused.send(&big);
    let answer = refused.response(false);
    assert_eq!(answer.status, 413);
    assert_eq!(
        json(&answer)["error"]["code"],
        "payload_too_large",
        "{:?}",
        json(&answer)
    );
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "no upstream saw it"
    );

    // The connection that carried the bodies still serves.
    conn.send(b"GET /g HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(mirrored(&conn.response(false)).0[0], "GET /g HTTP/1.1");
}
