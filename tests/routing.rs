//! Routing and request rewriting through the real binary, against real upstreams.
mod common;

use common::*;
use http::Request;

async fn setup() -> (Gateway, Vec<Upstream>) {
    let names = ["root", "v1", "lookup", "api_host", "wild", "posts", "strip"];
    let mut upstreams = Vec::new();
    for name in names {
        upstreams.push(Upstream::start(name).await);
    }
    let mut config = base_config();
    for u in &upstreams {
        config += &format!("[upstreams.{}]\nendpoints = [\"{}\"]\n\n", u.name, u.addr);
    }
    config += r#"
[[routes]]
name = "root"
path = "/"
upstream = "root"

[[routes]]
name = "v1"
path = "/v1"
upstream = "v1"

[[routes]]
name = "lookup"
path = "/v1/lookup"
upstream = "lookup"

[[routes]]
name = "api-host"
hosts = ["api.example.com"]
path = "/v1"
upstream = "api_host"

[[routes]]
name = "wildcard"
hosts = ["*.example.com"]
path = "/"
upstream = "wild"

[[routes]]
name = "posts-write"
path = "/posts"
methods = ["POST", "PUT"]
upstream = "posts"

[[routes]]
name = "strip"
path = "/strip/me/"
strip_prefix = true
upstream = "strip"
"#;
    (Gateway::start(&config), upstreams)
}

async fn which(gateway: &Gateway, method: &str, host: Option<&str>, path: &str) -> (u16, serde_json::Value) {
    let mut request = Request::builder().method(method).uri(gateway.url(path));
    if let Some(host) = host {
        request = request.header("host", host);
    }
    let reply = send(request.body(full("")).unwrap()).await;
    (reply.status.as_u16(), reply.json())
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_by_host_wildcard_prefix_and_method() {
    let (gateway, _upstreams) = setup().await;
    let cases: &[(&str, Option<&str>, &str, &str)] = &[
        ("GET", None, "/", "root"),
        ("GET", None, "/anything/else", "root"),
        ("GET", None, "/v1", "v1"),
        ("GET", None, "/v1/other", "v1"),
        ("GET", None, "/v1/lookup/1.2.3.4", "lookup"),
        ("GET", None, "/v1/lookupx", "v1"),
        ("GET", Some("api.example.com"), "/v1/lookup/1.2.3.4", "api_host"),
        ("GET", Some("API.EXAMPLE.COM:8080"), "/v1/x", "api_host"),
        ("GET", Some("api.example.com"), "/other", "wild"),
        ("GET", Some("www.example.com"), "/v1/lookup", "wild"),
        ("GET", Some("deep.eu.example.com"), "/", "wild"),
        ("GET", Some("example.com"), "/v1", "v1"),
        ("POST", None, "/posts/1", "posts"),
        ("PUT", None, "/posts", "posts"),
    ];
    for (method, host, path, expected) in cases {
        let (status, body) = which(&gateway, method, *host, path).await;
        assert_eq!(status, 200, "{method} {host:?} {path}");
        assert_eq!(body["upstream"], *expected, "{method} {host:?} {path}: {body}");
        assert_eq!(body["method"], *method);
    }
    // A method the best-matching route does not take is refused with what it takes; it
    // never falls through to the shorter `/` route.
    let reply = send(
        Request::builder()
            .method("GET")
            .uri(gateway.url("/posts/1"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.headers["allow"], "POST, PUT");
    assert_eq!(reply.json()["error"]["code"], "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread")]
async fn strip_prefix_rewrites_path_and_keeps_query() {
    let (gateway, _upstreams) = setup().await;
    let (_, body) = which(&gateway, "GET", None, "/strip/me/deeper/path?q=1&r=2").await;
    assert_eq!(body["upstream"], "strip");
    assert_eq!(body["path"], "/deeper/path?q=1&r=2");
    let (_, body) = which(&gateway, "GET", None, "/strip/me").await;
    assert_eq!(body["path"], "/");
    let (_, body) = which(&gateway, "GET", None, "/v1/lookup/8.8.8.8?x=y").await;
    assert_eq!(body["path"], "/v1/lookup/8.8.8.8?x=y");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_route_gives_404_json_body() {
    let upstream = Upstream::start("only").await;
    let config = format!(
        "{}[upstreams.only]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"only\"\npath = \"/v1\"\nmethods = [\"GET\"]\nupstream = \"only\"\n",
        base_config(),
        upstream.addr
    );
    let gateway = Gateway::start(&config);
    for (method, path) in [("GET", "/v2/x"), ("GET", "/")] {
        let reply = send(
            Request::builder()
                .method(method)
                .uri(gateway.url(path))
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, 404, "{method} {path}");
        assert_eq!(reply.headers["content-type"], "application/json");
        let body = reply.json();
        assert_eq!(body["error"]["code"], "route_not_found");
        assert!(body["error"]["message"].as_str().unwrap().len() > 5);
        let request_id = reply.headers["x-request-id"].to_str().unwrap();
        assert_eq!(body["error"]["request_id"], request_id);
        assert_eq!(request_id.len(), 32);
    }
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_request_id_and_hop_by_hop() {
    let (gateway, _upstreams) = setup().await;
    let reply = send(
        Request::get(gateway.url("/v1/x"))
            .header("host", "shop.test")
            .header("x-request-id", "client-chosen-id-1")
            .header("x-forwarded-for", "203.0.113.9")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("x-end-to-end", "kept")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["x-request-id"], "client-chosen-id-1");
    let seen = &reply.json()["headers"];
    assert_eq!(seen["x-request-id"], "client-chosen-id-1");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.test");
    assert_eq!(seen["host"], "shop.test");
    assert_eq!(seen["x-end-to-end"], "kept");
    for hop in ["x-hop", "keep-alive", "te"] {
        assert!(seen.get(hop).is_none(), "{hop} was forwarded: {seen}");
    }

    // Without a client id, one is generated and is the same upstream and downstream.
    let reply = get(&gateway.url("/v1/y")).await;
    let id = reply.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(reply.json()["headers"]["x-request-id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn preserve_host_false_sends_endpoint_address() {
    let upstream = Upstream::start("u").await;
    let config = format!(
        "{}[upstreams.u]\nendpoints = [\"localhost:{}\"]\npreserve_host = false\n\n[[routes]]\nname = \"all\"\nupstream = \"u\"\n",
        base_config(),
        upstream.addr.port()
    );
    let gateway = Gateway::start(&config);
    let reply = send(
        Request::get(gateway.url("/h"))
            .header("host", "public.test")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = &reply.json()["headers"];
    assert_eq!(seen["host"], format!("localhost:{}", upstream.addr.port()));
    assert_eq!(seen["x-forwarded-host"], "public.test");
}
