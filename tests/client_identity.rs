//! Who the client is: socket peer, trusted proxies, PROXY protocol; anonymous callers.
mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use http::Request;

fn config(upstream: std::net::SocketAddr, server_extra: &str, data: &std::path::Path) -> String {
    let base = base_config().replace("workers = 2\n", &format!("workers = 2\n{server_extra}\n"));
    format!(
        "data_dir = \"{}\"\n{base}[upstreams.u]\nendpoints = [\"{upstream}\"]\n\n\
         [anonymous]\nplan = \"free\"\nby = [\"ip\", \"referer\"]\n\n[plans.free]\n\n\
         [[routes]]\nname = \"lookup\"\npath = \"/\"\nupstream = \"u\"\nauth = [\"api_key\", \"anonymous\"]\n",
        data.display()
    )
}

fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    // One response, then the test closes; the body is small JSON with a content-length.
    while let Ok(n) = stream.read(&mut chunk) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            if length.is_some_and(|l| body.len() >= l) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn spoofed_forwarded_for_from_untrusted_peer_is_ignored() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(
        upstream.addr,
        "trusted_proxies = [\"10.0.0.0/8\"]",
        data.path(),
    ));
    let reply = send(
        Request::get(gateway.url("/x"))
            .header("x-forwarded-for", "6.6.6.6")
            .body(full(""))
            .unwrap(),
    )
    .await;
    let seen = &reply.json()["headers"];
    assert_eq!(seen["x-real-ip"], "127.0.0.1", "{seen}");
    assert_eq!(seen["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_peer_yields_the_rightmost_untrusted_address() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(
        upstream.addr,
        "trusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\"]",
        data.path(),
    ));
    let reply = send(
        Request::get(gateway.url("/x"))
            .header("x-forwarded-for", "6.6.6.6, 198.51.100.4, 10.1.2.3")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.json()["headers"]["x-real-ip"], "198.51.100.4");
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_protocol_v1_and_v2_give_the_client_address() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, "proxy_protocol = true", data.path()));

    let response = raw(
        gateway.proxy,
        b"PROXY TCP4 198.51.100.9 10.0.0.1 5555 80\r\nGET /v1 HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body: serde_json::Value = serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["headers"]["x-real-ip"], "198.51.100.9");
    assert_eq!(body["headers"]["x-forwarded-for"], "198.51.100.9");

    let mut v2 = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "[2001:db8::7]:4444".parse::<std::net::SocketAddr>().unwrap(),
            "[2001:db8::1]:443".parse::<std::net::SocketAddr>().unwrap(),
        ),
    )
    .build()
    .unwrap();
    v2.extend_from_slice(b"GET /v2 HTTP/1.1\r\nHost: a\r\n\r\n");
    let response = raw(gateway.proxy, &v2);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"x-real-ip\":\"2001:db8::7\""), "{response}");

    // Without the header the connection is refused before any HTTP.
    let response = raw(gateway.proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(response, "");
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_callers_get_the_free_plan_but_bad_keys_are_refused() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, "", data.path()));
    let reply = send(
        Request::get(gateway.url("/v1/lookup/1.2.3.4"))
            .header("referer", "https://blog.example.org/post")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = &reply.json()["headers"];
    assert_eq!(seen["x-plan"], "free");
    assert!(seen.get("x-consumer-id").is_none());
    let reply = send(
        Request::get(gateway.url("/v1/lookup/1.2.3.4"))
            .header("x-api-key", "tg_live_bogus")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["error"]["code"], "invalid_api_key");
}
