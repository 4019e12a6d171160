//! HTTP/2, WebSocket, streaming bodies and malformed requests.
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio_tungstenite::tungstenite::Message;

fn single_upstream(addr: std::net::SocketAddr, upstream_extra: &str, server_extra: &str) -> String {
    let base = base_config().replace("workers = 2\n", &format!("workers = 2\n{server_extra}\n"));
    format!(
        "{base}[upstreams.u]\nendpoints = [\"{addr}\"]\n{upstream_extra}\n\n[[routes]]\nname = \"all\"\nupstream = \"u\"\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_downstream_and_upstream() {
    let upstream = Upstream::start("h2").await;
    let gateway = Gateway::start(&single_upstream(upstream.addr, "protocol = \"http2\"", ""));
    let client = h2_client();
    for _ in 0..5 {
        let reply = send_with(&client, Request::get(gateway.url("/v1/x?y=1")).body(full("")).unwrap()).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.version, Version::HTTP_2, "client side is HTTP/2");
        let body = reply.json();
        assert_eq!(body["version"], "HTTP/2.0", "upstream side is HTTP/2");
        assert_eq!(body["path"], "/v1/x?y=1");
        assert!(reply.headers.contains_key("x-request-id"));
    }

    // HTTP/1.1 client to an HTTP/2 upstream, and HTTP/2 client to an HTTP/1.1 upstream.
    let reply = get(&gateway.url("/a")).await;
    assert_eq!(
        (reply.version, reply.json()["version"].as_str().unwrap()),
        (Version::HTTP_11, "HTTP/2.0")
    );
    let h1_upstream = Upstream::start("h1").await;
    let gateway = Gateway::start(&single_upstream(h1_upstream.addr, "", ""));
    let reply = send_with(&client, Request::get(gateway.url("/b")).body(full("")).unwrap()).await;
    assert_eq!(
        (reply.version, reply.json()["version"].as_str().unwrap()),
        (Version::HTTP_2, "HTTP/1.1")
    );
    assert!(
        reply.json()["headers"]["host"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
}

/// A WebSocket echo server (not hyper: a different implementation on the far side).
async fn websocket_echo() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() || message.is_binary() {
                        if ws.send(message).await.is_err() {
                            return;
                        }
                    } else if message.is_close() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_echoes_both_ways() {
    let echo = websocket_echo().await;
    // A short idle timeout proves the upgraded connection is no longer watched as HTTP.
    let gateway = Gateway::start(&single_upstream(echo, "", "idle_timeout = \"300ms\""));
    let stream = tokio::net::TcpStream::connect(gateway.proxy).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(format!("ws://{}/chat", gateway.proxy), stream)
        .await
        .expect("websocket handshake through the gateway");
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key("x-request-id"));
    for i in 0..20 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
        if i == 10 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    let big = vec![7u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data().as_ref(), &big[..]);
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn hundred_mib_bodies_stream_without_buffering() {
    const SIZE: usize = 100 * 1024 * 1024;
    let upstream = Upstream::start("big").await;
    // Over the 10 MiB default body limit: the operator raised it.
    let gateway = Gateway::start(&single_upstream(upstream.addr, "", "max_body_bytes = 200_000_000"));
    assert_eq!(get(&gateway.url("/warm")).await.status, 200);
    let rss_before = gateway.rss_kib();

    // Upload: a chunked body produced on the fly.
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let stream = futures_util::stream::iter(
        (0..SIZE / chunk.len()).map(move |_| Ok::<_, hyper::Error>(Frame::data(chunk.clone()))),
    );
    let body = BodyExt::boxed(StreamBody::new(stream));
    let reply = send(Request::post(gateway.url("/count")).body(body).unwrap()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["bytes"], SIZE as u64);
    let rss_after_upload = gateway.rss_kib();

    // Download: read it chunk by chunk, counting.
    let response = client()
        .request(
            Request::get(gateway.url(&format!("/download/{SIZE}")))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0usize;
    let mut peak_rss = 0;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len());
        if received % (16 * 1024 * 1024) < 64 * 1024 {
            peak_rss = peak_rss.max(gateway.rss_kib());
        }
    }
    assert_eq!(received, SIZE);
    let grown = rss_after_upload.max(peak_rss).saturating_sub(rss_before);
    // Buffering 100 MiB would grow RSS by ~100 000 KiB; streaming stays within socket buffers.
    assert!(
        grown < 24 * 1024,
        "gateway RSS grew by {grown} KiB while streaming 100 MiB"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_are_refused_before_routing() {
    let upstream = Upstream::start("u").await;
    let gateway = Gateway::start(&single_upstream(
        upstream.addr,
        "",
        "header_read_timeout = \"500ms\"\nmax_header_bytes = 4096",
    ));

    // Conflicting Content-Length and Transfer-Encoding (request smuggling vector) → 400.
    let response = raw_exchange(
        gateway.proxy,
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert_eq!(raw_json_body(&response)["error"]["code"], "bad_request");

    // Oversized head → 431.
    let mut big = b"GET /x HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..100 {
        big.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "f".repeat(60)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let response = raw_exchange(gateway.proxy, &big, Duration::from_secs(3));
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    assert_eq!(raw_json_body(&response)["error"]["code"], "headers_too_large");

    // A head that never completes → 408 after header_read_timeout.
    let started = std::time::Instant::now();
    let response = raw_exchange(gateway.proxy, b"GET /x HTTP/1.1\r\nHost: a\r\n", Duration::from_secs(5));
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert_eq!(raw_json_body(&response)["error"]["code"], "request_timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    // A second, slow head on a keep-alive connection gets the same treatment.
    let response = raw_exchange(
        gateway.proxy,
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\n",
        Duration::from_secs(5),
    );
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("HTTP/1.1 408"), "{response}");

    // A smuggling attempt pipelined behind an innocent request is refused as a whole.
    let response = raw_exchange(
        gateway.proxy,
        b"GET /innocent HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");

    assert_eq!(upstream.hits(), 1, "only the one valid request reached the upstream");
    // Normal requests still work.
    assert_eq!(get(&gateway.url("/ok")).await.status, 200);
}

/// Reads one HTTP/1.1 response with a Content-Length body from a raw stream.
fn read_response(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).expect("read");
        assert!(
            n > 0,
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&data).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connections_are_parked_and_resumed() {
    use std::io::{Read, Write};
    let upstream = Upstream::start("u").await;
    let gateway = Gateway::start(&single_upstream(
        upstream.addr,
        "",
        "park_idle_after = \"200ms\"\nidle_timeout = \"3s\"\nheader_read_timeout = \"500ms\"",
    ));
    let parked = |text: &str| -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix("tollgate_parked_connections "))
            .and_then(|v| v.parse().ok())
            .expect("parked gauge")
    };
    let mut stream = std::net::TcpStream::connect(gateway.proxy).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for round in 0..3 {
        stream
            .write_all(format!("GET /round/{round} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .unwrap();
        let response = read_response(&mut stream);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains(&format!("\"path\":\"/round/{round}\"")), "{response}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            parked(&admin(&gateway, "GET", "/metrics").await.text()),
            1,
            "round {round}"
        );
    }
    // A resumed connection still gets the head timeout: half a head, then nothing.
    stream.write_all(b"GET /slow-head HTTP/1.1\r\n").unwrap();
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 408"), "{rest}");
    assert_eq!(parked(&admin(&gateway, "GET", "/metrics").await.text()), 0);

    // A parked connection is closed at idle_timeout, counted from its last response.
    let mut idle = std::net::TcpStream::connect(gateway.proxy).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    idle.write_all(b"GET /once HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    assert!(read_response(&mut idle).starts_with("HTTP/1.1 200"));
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(idle.read(&mut buf).unwrap(), 0, "server closes the idle connection");
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_millis(2500) && waited < Duration::from_millis(4500),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_tunnel_is_closed_after_tunnel_idle_timeout() {
    let echo = websocket_echo().await;
    let gateway = Gateway::start(&single_upstream(echo, "", "tunnel_idle_timeout = \"1s\""));
    let stream = tokio::net::TcpStream::connect(gateway.proxy).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/chat", gateway.proxy), stream)
        .await
        .expect("websocket handshake through the gateway");
    // Traffic keeps it open past the timeout.
    for i in 0..4 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        assert!(ws.next().await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Silence closes it: the next read ends instead of waiting (bounded at 10 s, well past
    // the 1 s timeout, for a slow CI machine).
    let started = std::time::Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    assert!(next.is_ok(), "the idle tunnel was not closed");
    assert!(!matches!(next, Ok(Some(Ok(Message::Text(_))))), "{next:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_disconnected_after_send_timeout() {
    use std::io::{Read, Write};
    let upstream = Upstream::start("big").await;
    let gateway = Gateway::start(&single_upstream(upstream.addr, "", "send_timeout = \"1s\""));
    let proxy = gateway.proxy;
    let read = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(proxy).unwrap();
        stream
            .write_all(b"GET /download/1073741824 HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        // Read nothing while the socket buffers fill and the gateway's writes block.
        std::thread::sleep(Duration::from_secs(4));
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break total,
                Ok(n) => total += n as u64,
            }
        }
    })
    .await
    .unwrap();
    // Only what the socket buffers held arrived, not the gigabyte.
    assert!(read < 256 << 20, "{read} bytes read");
    let metrics = admin(&gateway, "GET", "/metrics").await.text();
    assert!(
        metrics.contains("tollgate_protections_total{limit=\"send_timeout\"} 1"),
        "{metrics}"
    );
}
