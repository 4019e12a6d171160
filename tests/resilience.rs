//! Fault tests: three real upstream endpoints under steady load of idempotent requests,
//! one of which dies, hangs or fails; the client-visible errors are counted and printed.
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::Request;

fn config(endpoints: &[std::net::SocketAddr]) -> String {
    let list: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"{base}
[upstreams.u]
endpoints = [{list}]
lb = "round_robin"
slow_start = "1s"

[upstreams.u.health]
kind = "http"
path = "/"
interval = "200ms"
timeout = "150ms"
healthy_threshold = 2
unhealthy_threshold = 2

[upstreams.u.outlier]
consecutive_failures = 3
base_ejection_time = "1s"
max_ejection_percent = 34

[upstreams.u.retries]
attempts = 2
per_try_timeout = "300ms"
on_statuses = [500, 502, 503, 504]

[[routes]]
name = "api"
path = "/"
upstream = "u"
"#,
        base = base_config(),
        list = list.join(", ")
    )
}

struct Load {
    ok: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// `clients` loops of GETs against the gateway until stopped.
fn load(gateway: &Gateway, clients: usize) -> Load {
    let (ok, errors, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let tasks = (0..clients)
        .map(|_| {
            let (ok, errors, stop) = (ok.clone(), errors.clone(), stop.clone());
            let url = gateway.url("/item");
            tokio::spawn(async move {
                let client = client();
                while !stop.load(Ordering::Relaxed) {
                    let request = Request::get(&url).body(full("")).unwrap();
                    let status = match client.request(request).await {
                        Ok(response) => {
                            let status = response.status();
                            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                            status.as_u16()
                        }
                        Err(_) => 0,
                    };
                    if status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    Load {
        ok,
        errors,
        stop,
        tasks,
    }
}

impl Load {
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        (self.ok.load(Ordering::Relaxed), self.errors.load(Ordering::Relaxed))
    }
}

async fn endpoint_state(gateway: &Gateway, address: std::net::SocketAddr) -> serde_json::Value {
    let reply = admin(gateway, "GET", "/v1/upstreams").await;
    let json = reply.json();
    json["upstreams"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == address.to_string())
        .cloned()
        .unwrap()
}

/// Polls until the endpoint is out of rotation; returns how long it took.
async fn out_of_rotation(gateway: &Gateway, address: std::net::SocketAddr, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if endpoint_state(gateway, address).await["available"] == false {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

async fn three() -> (Upstream, Upstream, Upstream) {
    (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_endpoint_costs_no_client_errors() {
    let (a, b, c) = three().await;
    let gateway = Gateway::start(&config(&[a.addr, b.addr, c.addr]));
    let load = load(&gateway, 8);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let killed_at = Instant::now();
    b.kill();
    let detected = out_of_rotation(&gateway, b.addr, Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (ok, errors) = load.finish().await;
    println!(
        "killed: {ok} ok, {errors} client errors; out of rotation after {detected:?} (killed {:?} ago)",
        killed_at.elapsed()
    );
    assert!(detected.is_some(), "the dead endpoint is taken out");
    assert_eq!(errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_endpoint_is_ejected_and_retries_hide_it() {
    let (a, b, c) = three().await;
    let gateway = Gateway::start(&config(&[a.addr, b.addr, c.addr]));
    let load = load(&gateway, 8);
    tokio::time::sleep(Duration::from_millis(700)).await;
    b.set_mode(MODE_HANG);
    let detected = out_of_rotation(&gateway, b.addr, Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (ok, errors) = load.finish().await;
    println!("hang: {ok} ok, {errors} client errors; out of rotation after {detected:?}");
    // The active check interval is 200 ms, timeout 150 ms, 2 failures: within ~0.6 s.
    let detected = detected.expect("the hanging endpoint is taken out");
    assert!(detected < Duration::from_millis(1500), "{detected:?}");
    // At most the requests in flight when it hung (8 clients) could fail, and only without
    // a retry; per-try timeouts move them to another endpoint.
    assert!(errors <= 8, "{errors} errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_failing_for_a_while_is_ejected_then_back_with_slow_start() {
    let (a, b, c) = three().await;
    let gateway = Gateway::start(&config(&[a.addr, b.addr, c.addr]));
    let load = load(&gateway, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.set_mode(MODE_FAIL);
    let detected = out_of_rotation(&gateway, b.addr, Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = b.hits();
    b.set_mode(MODE_OK);
    let recovered_at = Instant::now();
    let mut back = None;
    while recovered_at.elapsed() < Duration::from_secs(5) {
        if endpoint_state(&gateway, b.addr).await["available"] == true && b.hits() > during + 20 {
            back = Some(recovered_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, errors) = load.finish().await;
    let state = endpoint_state(&gateway, b.addr).await;
    println!(
        "500s: {ok} ok, {errors} client errors; ejected after {detected:?}; serving again {back:?} after recovery; {state}"
    );
    assert!(detected.is_some(), "the failing endpoint is taken out");
    assert!(back.is_some(), "and comes back");
    assert!(state["ejections"].as_u64().unwrap() >= 1 || state["healthy"] == true);
    assert_eq!(errors, 0, "retries on 5xx hide the failing endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_endpoints_dead_answers_503_at_once_then_recovers() {
    let (a, b, c) = three().await;
    let gateway = Gateway::start(&config(&[a.addr, b.addr, c.addr]));
    assert_eq!(get(&gateway.url("/item")).await.status, 200);
    let a_addr = a.addr;
    a.kill();
    b.kill();
    c.kill();
    // Active checks take them out within two intervals.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let started = Instant::now();
    let reply = get(&gateway.url("/item")).await;
    let took = started.elapsed();
    println!("all dead: {} in {took:?}", reply.status);
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    // Well under one per-try timeout (300 ms): nothing was tried.
    assert!(took < Duration::from_millis(250), "no timeout wait: {took:?}");
    let metrics = admin(&gateway, "GET", "/metrics").await.text();
    for dead in [a_addr, b.addr, c.addr] {
        let line = format!("tollgate_upstream_endpoint_available{{upstream=\"u\",endpoint=\"{dead}\"}} 0");
        assert!(metrics.contains(&line), "missing {line}");
    }
    assert!(metrics.contains("tollgate_upstream_events_total{upstream=\"u\",event=\"active_unhealthy\"} 3"));

    let revived = Upstream::start_on("a", a_addr).await;
    let started = Instant::now();
    let mut recovered = None;
    while started.elapsed() < Duration::from_secs(5) {
        if get(&gateway.url("/item")).await.status == 200 {
            recovered = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("one endpoint back: serving again after {recovered:?}");
    assert!(recovered.is_some());
    assert!(revived.hits() > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_that_reached_a_dying_endpoint_is_not_retried() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gateway = Gateway::start(&config(&[a.addr, b.addr]));
    a.set_mode(MODE_RESET);
    b.set_mode(MODE_RESET);
    let post = || send(Request::post(gateway.url("/item")).body(full("order=1")).unwrap());
    let reply = post().await;
    let reached = a.hits() + b.hits();
    println!(
        "POST to a dying endpoint: {} after reaching {reached} endpoint(s)",
        reply.status
    );
    assert_eq!(reply.status, 502);
    assert_eq!(reached, 1, "sent once, never again");
    // The same for a GET is retried on the other endpoint.
    let before = a.hits() + b.hits();
    let reply = get(&gateway.url("/item")).await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        a.hits() + b.hits() - before,
        2,
        "a GET is retried once on the other endpoint"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_at_max_requests_answers_503_at_once() {
    let a = Upstream::start("a").await;
    let config = config(&[a.addr])
        .replace("slow_start = \"1s\"", "slow_start = \"1s\"\nmax_requests = 1")
        .replace("per_try_timeout = \"300ms\"", "per_try_timeout = \"2s\"");
    let gateway = Gateway::start(&config);
    let slow = tokio::spawn(get_owned(gateway.url("/slow/1000")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let reply = get(&gateway.url("/item")).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["code"], "upstream_overloaded");
    // Not queued behind the slow request (which holds the only slot for 900 ms more).
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(get(&gateway.url("/item")).await.status, 200);
}

async fn get_owned(url: String) -> u16 {
    get(&url).await.status.as_u16()
}
