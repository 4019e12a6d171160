//! Three regions, each its own NATS server, joined as a supercluster; two gateway nodes
//! per region. Real processes on loopback.
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

struct Node {
    gateway: Gateway,
    _data: tempfile::TempDir,
}

/// Two gateway nodes per region, each talking to its own region's NATS server.
fn start_nodes(cluster: &Supercluster, upstream: std::net::SocketAddr) -> Vec<Node> {
    let mut nodes = Vec::new();
    for region in 0..cluster.regions.len() {
        for n in ["a", "b"] {
            let data = tempfile::tempdir().unwrap();
            let name = Supercluster::name(region);
            let config = cluster_node_config(
                upstream,
                data.path(),
                &cluster.url(region),
                &name,
                &format!("{name}{n}"),
                "",
            );
            nodes.push(Node {
                gateway: Gateway::start(&config),
                _data: data,
            });
        }
    }
    nodes
}

/// A consumer and key created in region 1, once the key works on every node.
async fn key_everywhere(nodes: &[Node]) -> (String, String) {
    admin_json(&nodes[0].gateway, "POST", "/v1/consumers", json!({"id": "acme"})).await;
    let (key_id, secret) = create_key(&nodes[0].gateway, json!({"consumer": "acme"})).await;
    for node in nodes {
        within(Duration::from_secs(2), || async {
            status_with_key(&node.gateway, &secret).await == 200
        })
        .await
        .expect("key everywhere");
    }
    (key_id, secret)
}

/// Requests to every node in turn for `duration`: (admitted, errors).
async fn load_all(nodes: &[Node], secret: &str, duration: Duration) -> (u64, u64) {
    let started = Instant::now();
    let (mut admitted, mut errors) = (0, 0);
    while started.elapsed() < duration {
        for node in nodes {
            match status_with_key(&node.gateway, secret).await {
                200 => admitted += 1,
                _ => errors += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (admitted, errors)
}

/// Waits until every node's report shows `expected`; returns the time it took.
async fn converge(nodes: &[Node], key_id: &str, expected: u64, limit: Duration) -> Duration {
    let started = Instant::now();
    for node in nodes {
        let ok = within(limit, || async { usage_total(&node.gateway, key_id).await == expected }).await;
        assert!(
            ok.is_some(),
            "a node reports {} of {expected}",
            usage_total(&node.gateway, key_id).await
        );
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_travel_between_regions_and_a_quota_is_global() {
    let cluster = Supercluster::start(3);
    let upstream = Upstream::start("u").await;
    let nodes = start_nodes(&cluster, upstream.addr);
    let (first, last) = (&nodes[0].gateway, &nodes[5].gateway);

    let reply = admin_json(first, "POST", "/v1/consumers", json!({"id": "acme", "plan": "metered"})).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let (key_id, secret) = create_key(first, json!({"consumer": "acme"})).await;
    let took = within(Duration::from_secs(1), || async {
        status_with_key(last, &secret).await == 200
    })
    .await;
    let took = took.unwrap_or_else(|| {
        panic!(
            "a key created in region 1 works in region 3 within 1 s\nr1a: {}\nr3b: {}",
            first.stderr(),
            last.stderr()
        )
    });
    println!("key created in r1 → accepted in r3 after {took:?}");
    let mut admitted = 1;

    // 150 requests spread over all six nodes at ~100/s; the plan allows 50 a day.
    for i in 0..150 {
        match status_with_key(&nodes[i % 6].gateway, &secret).await {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let over = admitted as f64 / 50.0 - 1.0;
    println!(
        "quota 50 over 6 nodes in 3 regions: {admitted} admitted ({:.0} % over)",
        over * 100.0
    );
    // Bound (docs/multi-region.md): total rate × (flush interval + propagation)
    // ≈ 100/s × 0.3 s = 30.
    assert!((50..=80).contains(&admitted), "admitted {admitted}");
    let took = converge(&nodes, &key_id, admitted, Duration::from_secs(5)).await;
    println!("every node's report equals the {admitted} admitted after {took:?}");

    // Convergence lag, 20 samples each: an admin write in r1 until it takes effect in r3,
    // and one admitted request in r1 until r3's view counts it.
    let mut write_lag = Vec::new();
    for i in 0..20 {
        let id = format!("lag{i}");
        admin_json(first, "POST", "/v1/consumers", json!({"id": id})).await;
        let (_, lag_secret) = create_key(first, json!({"consumer": id})).await;
        let started = Instant::now();
        within(Duration::from_secs(2), || async {
            status_with_key(last, &lag_secret).await == 200
        })
        .await
        .expect("key reaches r3");
        write_lag.push(started.elapsed());
    }
    let mut usage_lag = Vec::new();
    let (lag_key, lag_secret) = create_key(first, json!({"consumer": "lag0"})).await;
    within(Duration::from_secs(2), || async {
        status_with_key(last, &lag_secret).await == 200
    })
    .await
    .expect("key reaches r3");
    for _ in 0..20 {
        let before = usage_total(last, &lag_key).await;
        assert_eq!(status_with_key(first, &lag_secret).await, 200);
        let started = Instant::now();
        within(Duration::from_secs(3), || async {
            usage_total(last, &lag_key).await > before
        })
        .await
        .expect("usage reaches r3");
        usage_lag.push(started.elapsed());
    }
    for (what, lags) in [
        ("admin write r1 → effective in r3", &mut write_lag),
        ("usage r1 → visible in r3", &mut usage_lag),
    ] {
        lags.sort();
        println!(
            "{what}: p50 {:?}, p99 {:?} (n={})",
            lags[lags.len() / 2],
            lags[lags.len() * 99 / 100],
            lags.len()
        );
        assert!(lags[lags.len() / 2] < Duration::from_secs(1));
    }

    // Revocation in region 2 reaches region 1 within a second.
    assert_eq!(
        admin(&nodes[2].gateway, "DELETE", &format!("/v1/keys/{key_id}"))
            .await
            .status,
        204
    );
    let took = within(Duration::from_secs(1), || async {
        status_with_key(first, &secret).await == 403
    })
    .await
    .expect("revoked in r2 → refused in r1 within 1 s");
    println!("revoked in r2 → refused in r1 after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_without_nats_keeps_serving_and_nothing_is_lost() {
    let mut cluster = Supercluster::start(3);
    let upstream = Upstream::start("u").await;
    let nodes = start_nodes(&cluster, upstream.addr);
    let (key_id, secret) = key_everywhere(&nodes).await;

    // Region 3's NATS is down for 10 s while every node keeps taking requests.
    cluster.stop_region(2);
    let (served, errors) = load_all(&nodes, &secret, Duration::from_secs(10)).await;
    let admitted = nodes.len() as u64 + served;
    println!("10 s without region 3's NATS: {admitted} admitted, {errors} errors");
    assert_eq!(errors, 0, "every node kept serving");
    cluster.start_region(2, true);
    cluster.wait_formed();
    let took = converge(&nodes, &key_id, admitted, Duration::from_secs(20)).await;
    println!("after NATS returned, every node's report equals {admitted} after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_cut_off_keeps_serving_and_converges_after_rejoining() {
    let mut cluster = Supercluster::start(3);
    let upstream = Upstream::start("u").await;
    let nodes = start_nodes(&cluster, upstream.addr);
    let (key_id, secret) = key_everywhere(&nodes).await;

    // Region 3's server comes back without its gateway links: cut off from the others.
    cluster.start_region(2, false);
    let (served, errors) = load_all(&nodes, &secret, Duration::from_secs(4)).await;
    let admitted = nodes.len() as u64 + served;
    println!("region 3 cut off for 4 s: {admitted} admitted, {errors} errors");
    assert_eq!(errors, 0, "both sides kept serving");

    cluster.start_region(2, true);
    cluster.wait_formed();
    let took = converge(&nodes, &key_id, admitted, Duration::from_secs(20)).await;
    println!("after rejoining, every node's report equals {admitted} after {took:?}");
}
