//! Hot reload, graceful shutdown and the admin API, against the running binary.
mod common;

use std::time::{Duration, Instant};

use common::*;
use http::Request;

fn config_with_routes(a: std::net::SocketAddr, b: std::net::SocketAddr, routes: &str) -> String {
    format!(
        "{}[upstreams.a]\nendpoints = [\"{a}\"]\n\n[upstreams.b]\nendpoints = [\"{b}\"]\n\n{routes}",
        base_config()
    )
}

const ROUTES_V1: &str = "[[routes]]\nname = \"old\"\npath = \"/\"\nupstream = \"a\"\n";
const ROUTES_V2: &str = "[[routes]]\nname = \"old\"\npath = \"/\"\nupstream = \"a\"\n\n[[routes]]\nname = \"new\"\npath = \"/new\"\nupstream = \"b\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn reload_keeps_in_flight_requests_and_applies_new_routes() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gateway = Gateway::start(&config_with_routes(a.addr, b.addr, ROUTES_V1));
    assert_eq!(get(&gateway.url("/new/x")).await.json()["upstream"], "a");

    let long_url = gateway.url("/slow/2000");
    let long = tokio::spawn(async move { get(&long_url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    gateway.write_config(&config_with_routes(a.addr, b.addr, ROUTES_V2));
    let reply = admin(&gateway, "POST", "/v1/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["status"], "reloaded");
    assert_eq!(get(&gateway.url("/new/x")).await.json()["upstream"], "b");
    assert_eq!(get(&gateway.url("/other")).await.json()["upstream"], "a");

    let long = long.await.unwrap();
    assert_eq!(long.status, 200, "the in-flight request survived the reload");
    assert_eq!(long.json()["upstream"], "a");

    // SIGHUP does the same.
    gateway.write_config(&config_with_routes(a.addr, b.addr, ROUTES_V1));
    gateway.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&gateway.url("/new/x")).await.json()["upstream"] != "a" {
        assert!(Instant::now() < deadline, "SIGHUP reload not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = admin(&gateway, "GET", "/metrics").await.text();
    assert!(
        metrics.contains("tollgate_config_reloads_total{result=\"success\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_reload_is_rejected_and_old_config_keeps_serving() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gateway = Gateway::start(&config_with_routes(a.addr, b.addr, ROUTES_V1));
    let broken = config_with_routes(
        a.addr,
        b.addr,
        "[[routes]]\nname = \"x\"\npath = \"/\"\nupstream = \"missing\"\nbogus = 1\n",
    );
    gateway.write_config(&broken);
    let reply = admin(&gateway, "POST", "/v1/reload").await;
    assert_eq!(reply.status, 400);
    let body = reply.json();
    assert_eq!(body["error"]["code"], "invalid_config");
    let details: Vec<String> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    assert!(details.iter().any(|d| d.contains("routes[0].bogus")), "{details:?}");
    assert_eq!(get(&gateway.url("/x")).await.json()["upstream"], "a");

    gateway.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&gateway.url("/x")).await.status, 200);
    let log = gateway.stderr();
    assert!(log.contains("reload rejected"));
    // Written to a file, not a terminal: plain text, as a container's or systemd's log.
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log:?}");
    let metrics = admin(&gateway, "GET", "/metrics").await.text();
    assert!(
        metrics.contains("tollgate_config_reloads_total{result=\"failure\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let mut gateway = Gateway::start(&config_with_routes(a.addr, b.addr, ROUTES_V1));
    let mut in_flight = Vec::new();
    for _ in 0..5 {
        let url = gateway.url("/slow/1500");
        in_flight.push(tokio::spawn(async move { get(&url).await }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gateway.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // No longer accepting.
    assert!(
        std::net::TcpStream::connect(gateway.proxy).is_err(),
        "listener still open after SIGTERM"
    );
    for task in in_flight {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "in-flight request was cut off");
    }
    let status = gateway
        .wait_exit(Duration::from_secs(10))
        .expect("gateway did not exit");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_grace_bounds_the_drain() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let config = config_with_routes(a.addr, b.addr, ROUTES_V1)
        .replace("workers = 2\n", "workers = 2\nshutdown_grace = \"500ms\"\n");
    let mut gateway = Gateway::start(&config);
    let url = gateway.url("/slow/10000");
    let stuck = tokio::spawn(async move { client().request(Request::get(url).body(full("")).unwrap()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    gateway.signal(libc::SIGTERM);
    gateway
        .wait_exit(Duration::from_secs(5))
        .expect("grace period not enforced");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        stuck.await.unwrap().is_err(),
        "the request past the grace period is cut"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_requires_token_except_probes() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gateway = Gateway::start(&config_with_routes(a.addr, b.addr, ROUTES_V1));
    for path in ["/metrics"] {
        let reply = get(&gateway.admin_url(path)).await;
        assert_eq!(reply.status, 401, "{path}");
        assert_eq!(reply.json()["error"]["code"], "unauthorized");
        let wrong = send(
            Request::get(gateway.admin_url(path))
                .header("authorization", "Bearer nope")
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert_eq!(wrong.status, 401);
    }
    let reload = send(Request::post(gateway.admin_url("/v1/reload")).body(full("")).unwrap()).await;
    assert_eq!(reload.status, 401);
    assert_eq!(get(&gateway.admin_url("/healthz")).await.status, 200);
    let ready = get(&gateway.admin_url("/readyz")).await;
    assert_eq!(
        (ready.status.as_u16(), ready.json()["status"].as_str()),
        (200, Some("ready"))
    );
    let missing = admin(&gateway, "GET", "/v1/nothing").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "not_found");

    for _ in 0..3 {
        get(&gateway.url("/x")).await;
    }
    let metrics = admin(&gateway, "GET", "/metrics").await;
    assert!(
        metrics.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = metrics.text();
    assert!(
        text.contains("tollgate_requests_total{route=\"old\",status=\"200\"} 3"),
        "{text}"
    );
    assert!(text.contains("tollgate_request_duration_seconds_count{route=\"old\"} 3"));
    assert!(text.contains("# TYPE tollgate_open_connections gauge"));
}
