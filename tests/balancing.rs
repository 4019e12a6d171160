//! Load-balancing policies, observed as request counts at real upstreams.
mod common;

use std::collections::HashMap;

use common::*;
use http::Request;

async fn pool_config(upstreams: &[Upstream], weights: &[u32], extra: &str) -> String {
    let endpoints: Vec<String> = upstreams
        .iter()
        .zip(weights)
        .map(|(u, w)| format!("{{ address = \"{}\", weight = {w} }}", u.addr))
        .collect();
    format!(
        "{}[upstreams.pool]\nendpoints = [{}]\n{extra}\n\n[[routes]]\nname = \"all\"\nupstream = \"pool\"\n",
        base_config(),
        endpoints.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_follows_weights_exactly() {
    let upstreams = vec![
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let gateway = Gateway::start(&pool_config(&upstreams, &[1, 2, 1], "lb = \"round_robin\"").await);
    for _ in 0..400 {
        assert_eq!(get(&gateway.url("/")).await.status, 200);
    }
    let hits: Vec<usize> = upstreams.iter().map(Upstream::hits).collect();
    assert_eq!(hits, vec![100, 200, 100]);
}

#[tokio::test(flavor = "multi_thread")]
async fn least_requests_avoids_the_busy_endpoint() {
    let upstreams = vec![Upstream::start("a").await, Upstream::start("b").await];
    let gateway = Gateway::start(&pool_config(&upstreams, &[1, 1], "lb = \"least_requests\"").await);
    // Occupy the pool with 8 slow requests; least-requests spreads them 4/4 on average,
    // then fast requests must prefer whichever endpoint has fewer in flight. Make endpoint
    // "a" busy by sending slow requests until 6 of them sit on it.
    let mut slow = Vec::new();
    for _ in 0..16 {
        let url = gateway.url("/slow/1500");
        slow.push(tokio::spawn(async move { get(&url).await }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let in_flight_a = upstreams[0].hits();
    let in_flight_b = upstreams[1].hits();
    assert_eq!(in_flight_a + in_flight_b, 16);
    // With P2C over two endpoints both are always compared, so slow requests split evenly.
    assert!(in_flight_a.abs_diff(in_flight_b) <= 2, "{in_flight_a} vs {in_flight_b}");
    for task in slow {
        assert_eq!(task.await.unwrap().status, 200);
    }

    // Now a sustained imbalance: endpoint weights 1:3 under concurrent slow load.
    let upstreams = vec![Upstream::start("a").await, Upstream::start("b").await];
    let gateway = Gateway::start(&pool_config(&upstreams, &[1, 3], "lb = \"least_requests\"").await);
    let mut slow = Vec::new();
    for _ in 0..40 {
        let url = gateway.url("/slow/800");
        slow.push(tokio::spawn(async move { get(&url).await }));
    }
    for task in slow {
        assert_eq!(task.await.unwrap().status, 200);
    }
    let (a, b) = (upstreams[0].hits(), upstreams[1].hits());
    assert_eq!(a + b, 40);
    assert!(b >= 2 * a, "weighted least-requests should favour b: a={a} b={b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn consistent_hash_by_header_is_sticky() {
    let upstreams = vec![
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let gateway = Gateway::start(
        &pool_config(
            &upstreams,
            &[1, 1, 1],
            "lb = \"consistent_hash\"\nhash_key = \"header:x-user\"",
        )
        .await,
    );
    let mut owner: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for user in 0..60 {
            let reply = send(
                Request::get(gateway.url("/"))
                    .header("x-user", format!("user-{user}"))
                    .body(full(""))
                    .unwrap(),
            )
            .await;
            let served = reply.json()["upstream"].as_str().unwrap().to_string();
            let previous = owner.entry(format!("user-{user}")).or_insert_with(|| served.clone());
            assert_eq!(*previous, served, "user-{user} moved in round {round}");
        }
    }
    // Keys spread over all three endpoints.
    let per_endpoint: Vec<usize> = upstreams.iter().map(Upstream::hits).collect();
    assert!(per_endpoint.iter().all(|&h| h >= 3 * 5), "{per_endpoint:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn consistent_hash_by_client_ip_pins_one_client() {
    let upstreams = vec![
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let gateway = Gateway::start(&pool_config(&upstreams, &[1, 1, 1], "lb = \"consistent_hash\"").await);
    for _ in 0..30 {
        assert_eq!(get(&gateway.url("/")).await.status, 200);
    }
    let hits: Vec<usize> = upstreams.iter().map(Upstream::hits).collect();
    assert_eq!(
        hits.iter().filter(|&&h| h == 30).count(),
        1,
        "one client IP → one endpoint: {hits:?}"
    );
}
