//! Request paths are normalized before routing: a path spelled differently cannot reach a
//! keyed route through a public one, and the upstream receives the normalized path.

mod common;

use std::time::Duration;

use common::*;

fn gateway(upstream: std::net::SocketAddr, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "{}{extra}\n[upstreams.api]\nendpoints = [\"{upstream}\"]\n\n[[routes]]\nname = \"public\"\npath = \"/public\"\nupstream = \"api\"\n\n[[routes]]\nname = \"keyed\"\npath = \"/v1\"\nupstream = \"api\"\nauth = [\"api_key\"]\n",
        base_config()
    ))
}

fn status_of(response: &str) -> u16 {
    response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn raw_get(gateway: &Gateway, path: &str) -> String {
    raw_exchange(
        gateway.proxy,
        format!("GET {path} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_prefix_cannot_reach_a_keyed_route() {
    let upstream = Upstream::start("api").await;
    let gw = gateway(upstream.addr, "");
    assert_eq!(status_of(&raw_get(&gw, "/public/x")), 200);
    for path in [
        "/public/../v1/x",
        "/public/%2e%2e/v1/x",
        "/public/./%2E%2E/v1/x",
        "/public/..//v1/x",
    ] {
        let response = raw_get(&gw, path);
        assert_eq!(status_of(&response), 401, "{path}: {response}");
        assert_eq!(
            raw_json_body(&response)["error"]["code"],
            "missing_credentials",
            "{path}"
        );
    }
    // Encoded slashes and backslashes are refused outright (the JSON error body).
    for path in ["/public/..%2fv1/x", "/public/..%5Cv1/x", "/public/%zz"] {
        let response = raw_get(&gw, path);
        assert_eq!(status_of(&response), 400, "{path}: {response}");
        assert_eq!(raw_json_body(&response)["error"]["code"], "bad_request", "{path}");
    }
    assert_eq!(
        upstream.hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only /public/x went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_receives_the_normalized_path() {
    let upstream = Upstream::start("api").await;
    let gw = gateway(upstream.addr, "");
    let response = raw_get(&gw, "/public//a/./b/../%7Ec?q=%2e");
    assert_eq!(status_of(&response), 200, "{response}");
    assert_eq!(raw_json_body(&response)["path"], "/public/a/~c?q=%2e");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normalization_can_be_turned_off() {
    let upstream = Upstream::start("api").await;
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\nnormalize_path = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[upstreams.api]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"all\"\npath = \"/\"\nupstream = \"api\"\n",
        upstream.addr
    ));
    let response = raw_get(&gw, "/a/../b");
    assert_eq!(status_of(&response), 200, "{response}");
    assert_eq!(raw_json_body(&response)["path"], "/a/../b");
}

/// HTTP/2 carries a path's bytes past ASCII (the `http` crate takes them; HTTP/1.1's guard
/// refuses them): they reach the upstream as they were sent, with the dot segments gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_utf8_path_over_http2_is_normalized_byte_for_byte() {
    let upstream = Upstream::start("api").await;
    let gw = gateway(upstream.addr, "");
    let request = http::Request::get(gw.url("/public/caf\u{e9}/./%41/../\u{1f600}"))
        .body(full(""))
        .unwrap();
    let reply = send_with(&h2_client(), request).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.version, http::Version::HTTP_2);
    assert_eq!(reply.json()["path"], "/public/caf\u{e9}/\u{1f600}");
}
