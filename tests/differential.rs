//! Differential fuzzing of the purpose-built HTTP/1.1 codecs against hyper's
//! (docs/benchmarks.md, "A purpose-built HTTP/1.1 path"): the same bytes go to both, and
//! where ours accepts, hyper must accept and read the same thing. Inputs are responses
//! built from random choices (well-formed, then possibly corrupted) and raw random bytes.
//! Runs a few seconds under `cargo test`, like tests/fuzz.rs.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TEST_TIME: Duration = Duration::from_secs(4);

/// What hyper's HTTP/1.1 client reads from `bytes` sent as the answer to a GET (or HEAD):
/// the status and body, or `None` when it refuses them.
fn hyper_reads(runtime: &tokio::runtime::Runtime, bytes: &[u8], head: bool) -> Option<(u16, Vec<u8>)> {
    let bytes = bytes.to_vec();
    runtime.block_on(async move {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(client))
                .await
                .ok()?;
        tokio::spawn(connection);
        tokio::spawn(async move {
            let mut scratch = [0u8; 4096];
            let _ = server.read(&mut scratch).await;
            let _ = server.write_all(&bytes).await;
            let _ = server.shutdown().await;
            // Keep the pipe open until the reader is done with it.
            let _ = server.read(&mut scratch).await;
        });
        let request = http::Request::builder()
            .method(if head { "HEAD" } else { "GET" })
            .uri("/")
            .header("host", "upstream")
            .body(Empty::new())
            .ok()?;
        let response = tokio::time::timeout(Duration::from_secs(2), sender.send_request(request))
            .await
            .ok()?
            .ok()?;
        let status = response.status().as_u16();
        let body = tokio::time::timeout(Duration::from_secs(2), response.into_body().collect())
            .await
            .ok()?
            .ok()?;
        Some((status, body.to_bytes().to_vec()))
    })
}

/// A response from `choices`: status line, framing headers and a body, well-formed unless
/// a later choice corrupts it. Returns the bytes and whether they were left well-formed.
fn build(choices: &[u8]) -> (Vec<u8>, bool) {
    let mut at = 0;
    let mut next = || {
        let byte = choices.get(at).copied().unwrap_or(0);
        at += 1;
        byte
    };
    let status = [200u16, 201, 204, 304, 404, 500, 302, 203][next() as usize % 8];
    let version = if next() % 5 == 0 { "1.0" } else { "1.1" };
    let body_len = (next() as usize) % 40;
    let body: Vec<u8> = (0..body_len).map(|i| b'a' + (i % 26) as u8).collect();
    let framing = match next() % 5 {
        // Chunked framing is HTTP/1.1's (RFC 9112 §6.1).
        1 if version == "1.0" => 0,
        framing => framing,
    };
    let mut out = Vec::new();
    if next() % 6 == 0 {
        out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    out.extend_from_slice(format!("HTTP/{version} {status} X\r\nServer: up\r\n").as_bytes());
    let bodiless = status == 204 || status == 304;
    match framing {
        0 if !bodiless => {
            out.extend_from_slice(format!("Content-Length: {body_len}\r\n\r\n").as_bytes());
            out.extend_from_slice(&body);
        }
        1 if !bodiless => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            let split = body_len / 2;
            for part in [&body[..split], &body[split..]] {
                if !part.is_empty() {
                    out.extend_from_slice(format!("{:x}", part.len()).as_bytes());
                    if next() % 3 == 0 {
                        out.extend_from_slice(b";ext=1");
                    }
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(part);
                    out.extend_from_slice(b"\r\n");
                }
            }
            out.extend_from_slice(b"0\r\n");
            if next() % 3 == 0 {
                out.extend_from_slice(b"X-Trailer: 1\r\n");
            }
            out.extend_from_slice(b"\r\n");
        }
        2 if !bodiless => {
            // No framing header: the body runs to the close.
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&body);
        }
        3 if !bodiless => {
            out.extend_from_slice(format!("Content-Length: {body_len}, {body_len}\r\n\r\n").as_bytes());
            out.extend_from_slice(&body);
        }
        _ => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
    }
    // Corruptions: a byte replaced, bytes cut off, or a conflicting length.
    let corrupt = next() % 4;
    let where_ = next() as usize;
    match corrupt {
        1 if !out.is_empty() => {
            let i = where_ % out.len();
            out[i] = next();
            (out, false)
        }
        2 if !out.is_empty() => {
            out.truncate(where_ % out.len());
            (out, false)
        }
        3 => {
            let text =
                String::from_utf8_lossy(&out).replacen("Server: up", "Content-Length: 3\r\nContent-Length: 4", 1);
            (text.into_bytes(), false)
        }
        _ => (out, true),
    }
}

fn compare(runtime: &tokio::runtime::Runtime, bytes: &[u8], head: bool, well_formed: bool) {
    let ours = tollgate::upstream::h1::decode_response(bytes, head);
    let theirs = hyper_reads(runtime, bytes, head);
    let shown = String::from_utf8_lossy(bytes);
    if let Ok((status, body, _)) = &ours {
        // Never more lenient than hyper, and the same reading where both accept.
        assert_eq!(
            theirs.as_ref(),
            Some(&(*status, body.clone())),
            "ours accepted {shown:?} as {status} {:?}",
            String::from_utf8_lossy(body)
        );
    }
    if well_formed {
        assert!(ours.is_ok(), "ours refused a well-formed response {shown:?}: {ours:?}");
    }
}

#[test]
fn the_upstream_codec_reads_responses_as_hyper_does() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut compared = 0u32;
    bolero::check!().with_test_time(TEST_TIME).for_each(|choices: &[u8]| {
        let head = choices.first().is_some_and(|b| b % 7 == 0);
        let (bytes, well_formed) = build(choices);
        compare(&runtime, &bytes, head, well_formed);
        // Raw bytes too, behind a valid status line so they get past the first check.
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        raw.extend_from_slice(choices);
        compare(&runtime, &raw, false, false);
        compared += 1;
    });
    assert!(compared > 0);
}
