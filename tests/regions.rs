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
    // Every node knows the key before the quota is spread over them (one node lagging a
    // few ms behind r3 under a loaded CI machine would answer 401; that is propagation,
    // measured above, not what this part tests). Asked through the admin API, which
    // charges nothing.
    for node in &nodes {
        let known = within(Duration::from_secs(2), || async {
            admin(&node.gateway, "GET", &format!("/v1/keys/{key_id}")).await.status == 200
        })
        .await;
        assert!(known.is_some(), "a node never learned the key");
    }
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
    let cluster = Supercluster::start(3);
    let upstream = Upstream::start("u").await;
    let nodes = start_nodes(&cluster, upstream.addr);
    let (key_id, secret) = key_everywhere(&nodes).await;
    // The console's cluster view (`GET /v1/cluster`): every node and region, all fresh.
    let view = |i: usize| admin_get(&nodes[i].gateway, "/v1/cluster");
    let region3 = Supercluster::name(2);
    let stale = |body: &serde_json::Value, region: &str| {
        body["regions"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["region"] == region))
            .map(|r| r["usage"]["stale"] == true || r["catalog"]["stale"] == true)
    };
    let deadline = Instant::now() + Duration::from_secs(8);
    let whole = loop {
        let (status, body) = view(0).await;
        assert_eq!(status, 200);
        if body["live_nodes"] == 6 && body["regions"].as_array().is_some_and(|r| r.len() == 3) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster view never showed 6 nodes in 3 regions: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (whole["mode"].as_str(), whole["region"].as_str()),
        (Some("global"), Some(Supercluster::name(0).as_str()))
    );
    assert_eq!(whole["nodes"].as_array().unwrap().len(), 6, "{whole}");
    assert_eq!(stale(&whole, &region3), Some(false), "{whole}");

    // Region 3's links to the others are cut; every server keeps running.
    cluster.cut_region(2);
    let (served, errors) = load_all(&nodes, &secret, Duration::from_secs(4)).await;
    let admitted = nodes.len() as u64 + served;
    println!("region 3 cut off for 4 s: {admitted} admitted, {errors} errors");
    assert_eq!(errors, 0, "both sides kept serving");
    // Region 1's nodes see region 3 stale and its nodes gone.
    let (_, cut) = view(0).await;
    assert_eq!(stale(&cut, &region3), Some(true), "{cut}");
    assert_eq!(cut["live_nodes"], 4, "{cut}");

    cluster.heal_region(2);
    let healed = Instant::now();
    cluster.wait_formed();
    let formed = healed.elapsed();
    converge(&nodes, &key_id, admitted, Duration::from_secs(20)).await;
    let took = healed.elapsed();
    println!(
        "links back: gateways formed after {formed:?}; every node's report equals {admitted} {took:?} after the links returned"
    );
    // The target is 2 s (docs/multi-region.md) from the moment NATS's gateways are back;
    // how long nats-server takes to re-form them is its own reconnect backoff (seen from
    // 0.1 s to 4.9 s on a loaded 2-core machine), so Tollgate's part is bounded from
    // there. The bound is doubled because this test shares two cores with the rest of the
    // suite, whose load stretches every timeout; the whole is bounded too.
    assert!(
        took.saturating_sub(formed) < Duration::from_secs(4),
        "converged {:?} after the gateways formed",
        took.saturating_sub(formed)
    );
    assert!(
        took < Duration::from_secs(15),
        "converged {took:?} after the links returned"
    );
    // Fresh again in the cluster view (heard within its 3 s window).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = view(0).await;
        if stale(&body, &region3) == Some(false) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "region 3 still stale after rejoining: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET path` on an admin API: (status, JSON body).
async fn admin_get(gateway: &Gateway, path: &str) -> (u16, serde_json::Value) {
    let reply = admin(gateway, "GET", path).await;
    let body = serde_json::from_str(&reply.text()).unwrap_or(serde_json::Value::Null);
    (reply.status.as_u16(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_first_region_stops_nothing_among_the_others() {
    let mut cluster = Supercluster::start(3);
    let upstream = Upstream::start("u").await;
    // Region 1's nodes start first: before regions were peers, its server held every
    // bucket and stream.
    let nodes = start_nodes(&cluster, upstream.addr);
    let (key_id, secret) = key_everywhere(&nodes).await;
    let (b, c) = (&nodes[2].gateway, &nodes[4].gateway);
    // Region 1 is lost once what it wrote has reached the others: every view counts the
    // six requests, and a second more lets each region's copy (a stream source, which
    // trails direct following by milliseconds) hold them too. What a region wrote in its
    // last milliseconds reaches a node restarted on an empty disk only when it returns.
    converge(&nodes, &key_id, nodes.len() as u64, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    cluster.stop_region(0);
    // Usage admitted in region 2 reaches region 3's view within a second.
    let mut lags = Vec::new();
    for _ in 0..5 {
        let before = usage_total(c, &key_id).await;
        assert_eq!(status_with_key(b, &secret).await, 200);
        let started = Instant::now();
        let seen = within(Duration::from_secs(3), || async {
            usage_total(c, &key_id).await > before
        })
        .await;
        assert!(seen.is_some(), "region 2's usage reaches region 3 without region 1");
        lags.push(started.elapsed());
    }
    lags.sort();
    println!("without region 1: usage r2 → r3 in {lags:?}");
    assert!(lags[2] < Duration::from_secs(1), "median {:?}", lags[2]);

    // Admin writes in regions 2 and 3 succeed, and take effect in the other.
    let reply = admin_json(b, "POST", "/v1/consumers", json!({"id": "during"})).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    within(Duration::from_secs(2), || async {
        admin(c, "GET", "/v1/consumers/during").await.status == 200
    })
    .await
    .expect("consumer created in r2 reaches r3");
    let (new_key, new_secret) = create_key(c, json!({"consumer": "during"})).await;
    within(Duration::from_secs(2), || async {
        status_with_key(b, &new_secret).await == 200
    })
    .await
    .expect("key created in r3 works in r2");

    // Unknown keys: 401 on the majority side, 503 where the region's NATS is gone.
    assert_eq!(status_with_key(b, "tg_live_unknown").await, 401);
    assert_eq!(status_with_key(&nodes[0].gateway, "tg_live_unknown").await, 503);
    // Region 1's nodes still answer reads from their own copy, at once, marked stale.
    let (status, keys) = admin_get(&nodes[0].gateway, "/v1/keys").await;
    assert_eq!(status, 200);
    assert!(keys.to_string().contains(&key_id), "{keys}");
    let started = Instant::now();
    let (status, report) = admin_get(&nodes[0].gateway, &format!("/v1/usage?key={key_id}")).await;
    let took = started.elapsed();
    println!("report on a node whose NATS is gone: {status} in {took:?}: {report}");
    assert_eq!(status, 200);
    assert_eq!(report["stale"], true, "{report}");
    assert!(took < Duration::from_millis(100), "{took:?}");
    // Served meanwhile in region 1 (from memory) and in the others.
    let (mut served, errors) = load_all(&nodes, &secret, Duration::from_secs(2)).await;
    assert_eq!(errors, 0);

    // Nodes restarted while region 1 is gone: r2b on an empty disk, r3b with its disk.
    // Region 1's catalog and usage reach them from their own region's copy.
    let mut nodes = nodes;
    for (index, keep_disk) in [(3usize, false), (5usize, true)] {
        let region = index / 2;
        let name = Supercluster::name(region);
        nodes[index].gateway.signal(15);
        nodes[index]
            .gateway
            .wait_exit(Duration::from_secs(10))
            .expect("stopped");
        if !keep_disk {
            nodes[index]._data = tempfile::tempdir().unwrap();
        }
        let config = cluster_node_config(
            upstream.addr,
            nodes[index]._data.path(),
            &cluster.url(region),
            &name,
            &format!("{name}{}", ["a", "b"][index % 2]),
            "",
        );
        let started = Instant::now();
        nodes[index].gateway = Gateway::start(&config);
        let restarted = &nodes[index].gateway;
        within(Duration::from_secs(15), || async {
            admin(restarted, "GET", "/readyz").await.status == 200
        })
        .await
        .expect("restarted node ready");
        println!(
            "{name} node restarted (disk kept: {keep_disk}) without region 1: ready after {:?}",
            started.elapsed()
        );
        assert_eq!(
            status_with_key(restarted, &secret).await,
            200,
            "the key made in region 1 is known"
        );
        served += 1;
        let peer = &nodes[index - 1].gateway;
        let same = within(Duration::from_secs(5), || async {
            usage_total(restarted, &key_id).await == usage_total(peer, &key_id).await
        })
        .await;
        assert!(
            same.is_some(),
            "restarted node's view {} equals its region peer's {}",
            usage_total(restarted, &key_id).await,
            usage_total(peer, &key_id).await
        );
    }

    let restarted = Instant::now();
    cluster.start_region(0, true);
    cluster.wait_formed();
    let healthy = cluster.wait_healthy(0);
    let total = nodes.len() as u64 + 5 + served;
    let took = converge(&nodes, &key_id, total, Duration::from_secs(10)).await;
    println!(
        "region 1 back: its JetStream current {healthy:?} after the gateways formed; every view equals {total} \
         {took:?} later ({:?} after the restart)",
        restarted.elapsed()
    );
    // Target 2 s; doubled for a loaded 2-core machine (see the cut-off test).
    assert!(
        took < Duration::from_secs(4),
        "converged {took:?} after region 1's JetStream was back"
    );
    within(Duration::from_secs(2), || async {
        status_with_key(&nodes[0].gateway, &new_secret).await == 200
    })
    .await
    .expect("the key created without region 1 works there once it is back");
    let (_, report) = admin_get(&nodes[0].gateway, &format!("/v1/usage?key={new_key}")).await;
    assert_eq!(report["stale"], false, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicting_writes_during_a_partition_converge_everywhere() {
    let cluster = Supercluster::start(3);
    let upstream = Upstream::start("u").await;
    let nodes = start_nodes(&cluster, upstream.addr);
    let (key_id, secret) = key_everywhere(&nodes).await;
    let (r1, r3) = (&nodes[0].gateway, &nodes[4].gateway);
    for plan in ["gold", "silver"] {
        let reply = admin_json(r1, "PUT", &format!("/v1/plans/{plan}"), json!({"daily": 1000})).await;
        assert!(reply.status.as_u16() < 300, "{}", reply.text());
    }
    within(Duration::from_secs(2), || async {
        admin(r3, "GET", "/v1/plans/silver").await.status == 200
    })
    .await
    .expect("plans everywhere");

    // Region 3 cut off (its server keeps running); both sides write to the same records.
    cluster.cut_region(2);
    within(Duration::from_secs(10), || async {
        status_with_key(r3, "tg_live_unknown").await == 503
    })
    .await
    .expect("the cut-off side says it cannot know unknown keys");
    assert_eq!(
        status_with_key(r1, "tg_live_unknown").await,
        401,
        "the majority side can"
    );
    let probe = within(Duration::from_secs(30), || async {
        admin_json(r3, "POST", "/v1/consumers", json!({"id": "probe"}))
            .await
            .status
            .as_u16()
            == 201
    })
    .await;
    println!("r3 accepts writes while cut off after {probe:?}");
    let write = |gateway: &'static str, method: &'static str, path: String, body: serde_json::Value| {
        (gateway, method, path, body)
    };
    let steps = [
        write("r3", "DELETE", format!("/v1/keys/{key_id}"), json!(null)),
        write("r1", "PATCH", format!("/v1/keys/{key_id}"), json!({"plan": "gold"})),
        write("r1", "PATCH", "/v1/consumers/acme".into(), json!({"plan": "gold"})),
        write("r3", "PATCH", "/v1/consumers/acme".into(), json!({"plan": "silver"})),
        write("r1", "PUT", "/v1/plans/shared".into(), json!({"daily": 10})),
        write("r3", "PUT", "/v1/plans/shared".into(), json!({"daily": 20})),
        write("r3", "POST", "/v1/consumers".into(), json!({"id": "made-in-r3"})),
    ];
    for (side, method, path, body) in steps {
        let gateway = if side == "r1" { r1 } else { r3 };
        let reply = if body.is_null() {
            admin(gateway, method, &path).await
        } else {
            admin_json(gateway, method, &path, body).await
        };
        assert!(
            reply.status.as_u16() < 300,
            "{side} {method} {path}: {} {}\n{}",
            reply.status,
            reply.text(),
            r3.stderr()
        );
        // Stamps are milliseconds: keep the order of the steps unambiguous.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, r3_secret) = create_key(r3, json!({"consumer": "made-in-r3"})).await;
    assert_eq!(
        status_with_key(r1, &r3_secret).await,
        401,
        "not known across the partition yet"
    );

    cluster.heal_region(2);
    cluster.wait_formed();
    let started = Instant::now();
    let expected = |view: &[(u16, serde_json::Value)]| {
        view[0].1["revoked"] == true
            && view[0].1["plan"] == "gold"
            && view[1].1["plan"] == "silver"
            && view[2].1["daily"] == 20
    };
    for node in &nodes {
        let agreed = within(Duration::from_secs(10), || async {
            let view = [
                admin_get(&node.gateway, &format!("/v1/keys/{key_id}")).await,
                admin_get(&node.gateway, "/v1/consumers/acme").await,
                admin_get(&node.gateway, "/v1/plans/shared").await,
            ];
            expected(&view)
        })
        .await;
        assert!(
            agreed.is_some(),
            "a node disagrees: key {:?}, consumer {:?}, plan {:?}",
            admin_get(&node.gateway, &format!("/v1/keys/{key_id}")).await,
            admin_get(&node.gateway, "/v1/consumers/acme").await,
            admin_get(&node.gateway, "/v1/plans/shared").await
        );
        assert_eq!(status_with_key(&node.gateway, &secret).await, 403, "revocation wins");
        let works = within(Duration::from_secs(5), || async {
            status_with_key(&node.gateway, &r3_secret).await == 200
        })
        .await;
        assert!(
            works.is_some(),
            "the key made in r3 during the partition works everywhere"
        );
    }
    println!("after healing, all six nodes agree after {:?}", started.elapsed());
}

/// Sends requests with `secret` to every node, spread evenly, from `tasks` concurrent
/// clients, for `duration`; each client sends one request every `pace` (none: as fast as
/// it can). Returns (200s, 429s, anything else); 503s (a lease not granted within the wait)
/// count as "anything else" and are also printed.
async fn hammer(
    nodes: &[Node],
    secret: &str,
    tasks: usize,
    duration: Duration,
    pace: Option<Duration>,
) -> (u64, u64, u64) {
    let urls: Vec<String> = nodes.iter().map(|n| n.gateway.url("/v1/x")).collect();
    let deadline = Instant::now() + duration;
    let mut handles = Vec::new();
    for task in 0..tasks {
        let (urls, secret) = (urls.clone(), secret.to_string());
        handles.push(tokio::spawn(async move {
            let client = client();
            let (mut ok, mut limited, mut other) = (0, 0, 0);
            let mut i = task;
            let mut next = Instant::now();
            while Instant::now() < deadline {
                if let Some(pace) = pace {
                    tokio::time::sleep_until(next.into()).await;
                    next += pace;
                }
                let request = http::Request::get(&urls[i % urls.len()])
                    .header("x-api-key", &secret)
                    .body(full(""))
                    .unwrap();
                i += 1;
                match client.request(request).await.map(|r| r.status().as_u16()) {
                    Ok(200) => ok += 1,
                    Ok(429) => limited += 1,
                    _ => other += 1,
                }
            }
            (ok, limited, other)
        }));
    }
    let mut totals = (0, 0, 0);
    for handle in handles {
        let (ok, limited, other) = handle.await.unwrap();
        totals = (totals.0 + ok, totals.1 + limited, totals.2 + other);
    }
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_key_stays_within_its_quota_through_six_nodes_in_three_regions() {
    let cluster = Supercluster::start(3);
    let upstream = Upstream::start("u").await;
    let nodes = start_nodes(&cluster, upstream.addr);
    let first = &nodes[0].gateway;
    // Heartbeats tell every node how many share the quotas.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut table = Vec::new();
    for (quota, pace, label) in [
        (500, None, "full speed"),
        (1000, None, "full speed"),
        // 40 clients, one request each per 20 ms: 2,000 requests/s.
        (500, Some(Duration::from_millis(20)), "2,000/s"),
        (1000, Some(Duration::from_millis(20)), "2,000/s"),
    ] {
        let plan = format!("q{quota}");
        let reply = admin_json(first, "PUT", &format!("/v1/plans/{plan}"), json!({"daily": quota})).await;
        assert!(reply.status.as_u16() < 300, "{}", reply.text());
        let consumer = format!("hot-{}-{}", quota, table.len());
        let reply = admin_json(first, "POST", "/v1/consumers", json!({"id": consumer, "plan": plan})).await;
        assert_eq!(reply.status, 201, "{}", reply.text());
        let (key_id, secret) = create_key(first, json!({"consumer": consumer})).await;
        for node in &nodes {
            within(Duration::from_secs(3), || async {
                admin(&node.gateway, "GET", &format!("/v1/keys/{key_id}")).await.status == 200
            })
            .await
            .expect("key everywhere");
        }
        let seconds = if pace.is_some() { 2 } else { 3 };
        let (admitted, limited, other) = hammer(&nodes, &secret, 40, Duration::from_secs(seconds), pace).await;
        let bound = quota + (quota / 100).max(5);
        println!(
            "quota {quota}, 6 nodes in 3 regions, {label}: {admitted} admitted, {limited} refused (429), {other} other"
        );
        table.push((quota, label, admitted, limited));
        // Every request is answered 200 or 429; a few 503s (no lease within the 1.5 s a
        // request waits) are tolerated only because this test may share two cores with
        // other multi-region tests, which stretches every claim's round trip.
        assert!(
            other * 200 <= admitted + limited,
            "{other} answered neither 200 nor 429"
        );
        assert!(
            admitted <= bound,
            "{admitted} admitted of a quota of {quota} (bound {bound})"
        );
        // A slow client may not even reach the quota; then nothing may be refused.
        if limited == 0 {
            assert!(admitted <= quota, "all {admitted} sent were admitted");
        } else {
            assert!(admitted >= quota * 95 / 100, "only {admitted} admitted of {quota}");
        }
        let took = converge(&nodes, &key_id, admitted, Duration::from_secs(5)).await;
        println!("  every node's report equals the {admitted} admitted after {took:?}");
    }
    let lease_claims = metric(first, "tollgate_quota_lease_claims_total{outcome=\"granted\"}").await;
    println!("node r1a: {lease_claims} lease claims granted");
    assert!(lease_claims > 0);
}
