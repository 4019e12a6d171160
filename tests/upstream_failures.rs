//! Upstream timeouts and failures become the JSON errors of docs/operations.md.
mod common;

use std::time::{Duration, Instant};

use http::Request;

use common::*;

fn config_for(endpoint: &str, timeouts: &str) -> String {
    format!(
        "{}[upstreams.u]\nendpoints = [\"{endpoint}\"]\n\n[upstreams.u.timeouts]\n{timeouts}\n\n[[routes]]\nname = \"all\"\nupstream = \"u\"\n",
        base_config()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_gives_504_after_read_timeout() {
    let upstream = Upstream::start("slow").await;
    let gateway = Gateway::start(&config_for(&upstream.addr.to_string(), "read = \"300ms\""));
    let started = Instant::now();
    let reply = get(&gateway.url("/slow/3000")).await;
    let waited = started.elapsed();
    assert_eq!(reply.status, 504);
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(2500),
        "{waited:?}"
    );
    // Fast requests still pass.
    assert_eq!(get(&gateway.url("/slow/10")).await.status, 200);

    let metrics = admin(&gateway, "GET", "/metrics").await.text();
    assert!(
        metrics.contains("tollgate_upstream_errors_total{upstream=\"u\",kind=\"upstream_timeout\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_requests_total{route=\"all\",status=\"504\"} 1"),
        "{metrics}"
    );
}

/// The response head's deadline is the upstream connection's own timer, moved from one
/// request to the next rather than registered for each (docs/benchmarks.md): every request
/// on a reused connection gets its whole `read` time, counted from its own sending, and no
/// more. One client connection, so its requests reach one worker and its pooled upstream
/// connection.
#[tokio::test(flavor = "multi_thread")]
async fn each_request_on_a_reused_upstream_connection_gets_its_own_read_timeout() {
    let upstream = Upstream::start("slow").await;
    let gateway = Gateway::start(&config_for(&upstream.addr.to_string(), "read = \"600ms\""));
    let client = client();
    let get = |path: &str| send_with(&client, Request::get(gateway.url(path)).body(full("")).unwrap());
    for _ in 0..2 {
        assert_eq!(get("/slow/10").await.status, 200);
        // 350 ms on, a 400 ms answer is within its own 600 ms, not within the last
        // request's: a timer left at the earlier deadline would cut it at about 250 ms.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(get("/slow/400").await.status, 200);
    }
    // Past the connection's last deadline while it was idle in the pool (its timer fired
    // with nothing waiting), then a slow answer: cut after its own full 600 ms.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let started = Instant::now();
    let reply = get("/slow/3000").await;
    let waited = started.elapsed();
    assert_eq!(reply.status, 504);
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
    // Bounds wide for a loaded CI machine; the lower one is the point.
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_millis(2500),
        "{waited:?}"
    );
    // The connection that timed out is not reused; the next request is served.
    assert_eq!(get("/slow/10").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn total_timeout_cuts_a_response_before_its_head() {
    let upstream = Upstream::start("slow").await;
    let gateway = Gateway::start(&config_for(
        &upstream.addr.to_string(),
        "read = \"10s\"\ntotal = \"400ms\"",
    ));
    let started = Instant::now();
    let reply = get(&gateway.url("/slow/3000")).await;
    assert_eq!(reply.status, 504);
    assert!(started.elapsed() < Duration::from_millis(2500));
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_upstream_gives_502() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gateway = Gateway::start(&config_for(&format!("127.0.0.1:{port}"), "connect = \"1s\""));
    let reply = get(&gateway.url("/")).await;
    assert_eq!(reply.status, 502);
    let body = reply.json();
    assert_eq!(body["error"]["code"], "upstream_connect_failed");
    assert_eq!(
        body["error"]["request_id"],
        reply.headers["x-request-id"].to_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unresolvable_host_gives_503() {
    let gateway = Gateway::start(&config_for("no-such-host.invalid:80", "connect = \"1s\""));
    let reply = get(&gateway.url("/")).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_error_statuses_pass_through() {
    let upstream = Upstream::start("u").await;
    let gateway = Gateway::start(&config_for(&upstream.addr.to_string(), "read = \"5s\""));
    let reply = get(&gateway.url("/status/503")).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["upstream"], "u");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_kept_alive_and_reused() {
    let upstream = Upstream::start("u").await;
    let gateway = Gateway::start(&config_for(&upstream.addr.to_string(), "read = \"5s\""));
    for _ in 0..50 {
        assert_eq!(get(&gateway.url("/x")).await.status, 200);
    }
    // Sequential requests: at most one connection per worker (2).
    let opened = upstream.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=2).contains(&opened),
        "{opened} upstream connections for 50 requests"
    );

    // Streamed bodies also hand their connection back once read to the end.
    for _ in 0..10 {
        let reply = get(&gateway.url("/download/200000")).await;
        assert_eq!(reply.body.len(), 200_000);
    }
    let opened = upstream.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(opened <= 2, "{opened} upstream connections after streamed responses");
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_timeout_gives_504() {
    // A listener that never accepts, with a backlog of 0: once one connection waits in its
    // queue, the kernel drops further SYNs and a connect hangs until it times out.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let _queued = std::net::TcpStream::connect(addr).unwrap();
    let gateway = Gateway::start(&config_for(&addr.to_string(), "connect = \"300ms\"\nread = \"5s\""));
    let started = Instant::now();
    let reply = get(&gateway.url("/")).await;
    let waited = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}
