//! Global mode: gateway nodes sharing keys, plans and usage through real nats-server
//! processes on loopback.
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn node_config(upstream: std::net::SocketAddr, data_dir: &std::path::Path, nats: &Nats, node: &str) -> String {
    cluster_node_config(upstream, data_dir, &nats.url(), "r1", node, "")
}

/// Consumer `acme` (on `plan`) and a key created on `a`, once the key works on `b`.
async fn key_on_both(a: &Gateway, b: &Gateway, plan: Option<&str>) -> (String, String) {
    let reply = admin_json(a, "POST", "/v1/consumers", json!({"id": "acme", "plan": plan})).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let (key_id, secret) = create_key(a, json!({"consumer": "acme"})).await;
    within(Duration::from_secs(1), || async {
        status_with_key(b, &secret).await == 200
    })
    .await
    .expect("the key works on the other node within 1 s");
    (key_id, secret)
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_plans_written_on_one_node_work_on_another_within_a_second() {
    let nats = Nats::start();
    let upstream = Upstream::start("u").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Gateway::start(&node_config(upstream.addr, dir_a.path(), &nats, "a"));
    let b = Gateway::start(&node_config(upstream.addr, dir_b.path(), &nats, "b"));

    let reply = admin_json(&a, "POST", "/v1/consumers", json!({"id": "acme", "plan": "metered"})).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let (key_id, secret) = create_key(&a, json!({"consumer": "acme"})).await;
    let took = within(Duration::from_secs(1), || async {
        status_with_key(&b, &secret).await == 200
    })
    .await
    .expect("key created on A works on B within 1 s");
    println!("key created on A → accepted by B after {took:?}");
    // The consumer's plan and the key's plan are visible through B's admin API too.
    assert_eq!(admin(&b, "GET", "/v1/consumers/acme").await.json()["plan"], "metered");
    // Both nodes list the key.
    for node in [&a, &b] {
        let listed = admin(node, "GET", "/v1/keys").await;
        assert_eq!(listed.status, 200);
        assert!(listed.text().contains(&key_id), "{}", listed.text());
    }

    // Revocation through B reaches A.
    assert_eq!(admin(&b, "DELETE", &format!("/v1/keys/{key_id}")).await.status, 204);
    let took = within(Duration::from_secs(1), || async {
        status_with_key(&a, &secret).await == 403
    })
    .await
    .expect("revocation on B effective on A within 1 s");
    println!("revoked on B → refused by A after {took:?}");

    // A plan edited on A is enforced on B.
    let (_, secret) = create_key(&a, json!({"consumer": "acme", "plan": "tight"})).await;
    let reply = admin_json(&a, "PUT", "/v1/plans/tight", json!({"daily": 2})).await;
    assert_eq!(reply.status, 200);
    within(Duration::from_secs(1), || async {
        status_with_key(&b, &secret).await == 200
    })
    .await
    .expect("second key reaches B");
    let refused = within(Duration::from_secs(3), || async {
        status_with_key(&b, &secret).await == 429
    })
    .await;
    assert!(refused.is_some(), "B enforces the plan created on A");

    // Deleting the consumer on B revokes its keys, including those created after the
    // keys bucket was opened, everywhere.
    assert_eq!(admin(&b, "DELETE", "/v1/consumers/acme").await.status, 204);
    within(Duration::from_secs(1), || async {
        status_with_key(&a, &secret).await == 403
    })
    .await
    .expect("the consumer's key is refused on A within 1 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quota_is_shared_by_every_node_and_reports_converge() {
    let nats = Nats::start();
    let upstream = Upstream::start("u").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Gateway::start(&node_config(upstream.addr, dir_a.path(), &nats, "a"));
    let b = Gateway::start(&node_config(upstream.addr, dir_b.path(), &nats, "b"));
    let (key_id, secret) = key_on_both(&a, &b, Some("metered")).await;

    // 120 requests alternating between the nodes, paced like a modest client (every
    // 10 ms); the plan allows 50 a day across all nodes.
    let mut admitted = 1; // the probe above
    for i in 0..120 {
        let node = if i % 2 == 0 { &a } else { &b };
        match status_with_key(node, &secret).await {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("quota 50 over 2 nodes: {admitted} admitted");
    // Bound: (nodes − 1) × rate × (flush interval + propagation) ≈ 1 × 100/s × 0.2 s = 20.
    assert!((50..=70).contains(&admitted), "admitted {admitted}");

    // Both nodes' reports converge on the exact number admitted.
    for node in [&a, &b] {
        let converged = within(Duration::from_secs(3), || async {
            usage_total(node, &key_id).await == admitted
        })
        .await;
        assert!(
            converged.is_some(),
            "report shows {} of {admitted}",
            usage_total(node, &key_id).await
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_outage_keeps_serving_and_loses_nothing() {
    let mut nats = Nats::start();
    let upstream = Upstream::start("u").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Gateway::start(&node_config(upstream.addr, dir_a.path(), &nats, "a"));
    let b = Gateway::start(&node_config(upstream.addr, dir_b.path(), &nats, "b"));
    let (key_id, secret) = key_on_both(&a, &b, Some("metered")).await;

    let (port, monitor, dir) = (nats.port, nats.monitor, nats.dir.clone());
    nats.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Known keys keep working and are counted; an unknown key is not admitted.
    let mut admitted = 1;
    for _ in 0..10 {
        assert_eq!(status_with_key(&a, &secret).await, 200);
        admitted += 1;
    }
    let unknown = call(&a, "/v1/x", Some(("x-api-key", "tg_live_unknown".to_string()))).await;
    assert_eq!(unknown.status, 503, "{}", unknown.text());
    assert_eq!(unknown.json()["error"]["code"], "state_unavailable");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = admin(&a, "GET", "/metrics").await.text();
    assert!(metrics.contains("tollgate_cluster_connected 0"), "{metrics}");
    assert!(
        !metrics.contains("tollgate_usage_outbox_slots 0\n"),
        "the counts wait in the outbox"
    );

    // NATS returns: A's counts reach B, nothing lost and nothing doubled.
    let _nats = Nats::start_at(&dir, port, monitor);
    let converged = within(Duration::from_secs(10), || async {
        usage_total(&b, &key_id).await == admitted
    })
    .await;
    assert!(
        converged.is_some(),
        "B's report shows {} of {admitted}\nA: {}\nB: {}",
        usage_total(&b, &key_id).await,
        a.stderr(),
        b.stderr()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(usage_total(&a, &key_id).await, admitted);
    assert_eq!(usage_total(&b, &key_id).await, admitted);
    let metrics = admin(&a, "GET", "/metrics").await.text();
    assert!(metrics.contains("tollgate_cluster_connected 1"), "{metrics}");
    assert!(metrics.contains("tollgate_usage_outbox_slots 0\n"), "{metrics}");
}

/// What NATS acknowledged of `node`'s slots for `subject`, read from the node's disk.
fn published_on_disk(data_dir: &std::path::Path, node: &str, subject: &str) -> u64 {
    let db = rusqlite::Connection::open(data_dir.join("tollgate.db")).unwrap();
    db.query_row(
        "SELECT COALESCE(SUM(published), 0) FROM usage WHERE node = ?1 AND subject = ?2 AND scope = ''",
        rusqlite::params![node, subject],
        |row| row.get::<_, i64>(0),
    )
    .unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_loses_at_most_one_flush_interval_and_a_new_node_rebuilds_the_view() {
    // A 500 ms flush interval keeps the bound meaningful on a loaded CI machine, where one
    // flush (SQLite write, NATS acknowledgement) can itself take tens of milliseconds.
    const FLUSH: Duration = Duration::from_millis(500);
    let nats = Nats::start();
    let upstream = Upstream::start("u").await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let config = |dir: &std::path::Path, node: &str| {
        node_config(upstream.addr, dir, &nats, node).replace("flush_interval = \"100ms\"", "flush_interval = \"500ms\"")
    };
    let mut a = Gateway::start(&config(dirs[0].path(), "a"));
    let b = Gateway::start(&config(dirs[1].path(), "b"));
    let (key_id, secret) = key_on_both(&a, &b, None).await;
    let mut admitted_b = 1;

    // Load on both nodes; A is killed (SIGKILL) in the middle of it. A's client notes when
    // each of its requests was answered.
    let a_url = a.url("/v1/x");
    let load_a = tokio::spawn({
        let secret = secret.clone();
        async move {
            let mut answered = Vec::new();
            let client = client();
            loop {
                let request = http::Request::get(&a_url)
                    .header("x-api-key", &secret)
                    .body(full(""))
                    .unwrap();
                match client.request(request).await {
                    Ok(response) if response.status() == 200 => answered.push(Instant::now()),
                    Ok(_) => {}
                    Err(_) => return answered,
                }
            }
        }
    });
    let started = Instant::now();
    while started.elapsed() < FLUSH * 5 {
        if started.elapsed() > FLUSH * 3 + FLUSH / 3 && a.child.try_wait().unwrap().is_none() {
            a.signal(9);
        }
        assert_eq!(status_with_key(&b, &secret).await, 200);
        admitted_b += 1;
    }
    a.wait_exit(Duration::from_secs(5)).expect("A is gone");
    let answered_a = load_a.await.unwrap();
    let admitted_a = answered_a.len() as u64;
    let admitted = admitted_a + admitted_b;
    let acknowledged_a = published_on_disk(dirs[0].path(), "a", &format!("key:{key_id}"));

    // A new node with an empty disk rebuilds the view from the stream before it is ready.
    let c = Gateway::start(&config(dirs[2].path(), "c"));
    let ready = within(Duration::from_secs(10), || async {
        admin(&c, "GET", "/readyz").await.status == 200
    })
    .await;
    println!("new node ready after {ready:?}");
    assert!(ready.is_some());
    tokio::time::sleep(FLUSH * 2).await;
    let on_c = usage_total(&c, &key_id).await;
    let on_b = usage_total(&b, &key_id).await;
    let lost = admitted - on_c;
    // The lost requests are A's last ones: how long before A died was the first of them answered?
    let lost_span = match answered_a.len().checked_sub(lost as usize) {
        Some(first_lost) if lost > 0 => answered_a[answered_a.len() - 1] - answered_a[first_lost],
        Some(_) => Duration::ZERO,
        None => panic!("lost {lost}, more than A ever admitted ({admitted_a})"),
    };
    println!(
        "admitted {admitted} (A {admitted_a}, of which NATS acknowledged {acknowledged_a}; B {admitted_b}); \
         view on C {on_c}, on B {on_b}; lost {lost}, answered by A in its last {lost_span:?}"
    );
    assert_eq!(on_b, on_c, "every node sees the same counts");
    assert!(on_c <= admitted, "nothing counted twice");
    assert!(
        on_c >= acknowledged_a + admitted_b,
        "what NATS acknowledged for A is in the view"
    );
    assert!(
        lost_span <= FLUSH * 2,
        "lost {lost} requests, A's last {lost_span:?}: more than one flush interval ({FLUSH:?}) and a flush"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_node_rebuilds_from_a_snapshot_after_the_stream_aged_out() {
    let nats = Nats::start();
    let upstream = Upstream::start("u").await;
    let (dir_a, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The stream keeps batches for 2 s only; snapshots are written every 500 ms.
    let extra = "usage_max_age = \"2s\"\nsnapshot_interval = \"500ms\"";
    let a = Gateway::start(&cluster_node_config(
        upstream.addr,
        dir_a.path(),
        &nats.url(),
        "r1",
        "a",
        extra,
    ));
    admin_json(&a, "POST", "/v1/consumers", json!({"id": "acme"})).await;
    let (key_id, secret) = create_key(&a, json!({"consumer": "acme"})).await;
    within(Duration::from_secs(1), || async {
        status_with_key(&a, &secret).await == 200
    })
    .await
    .expect("key on A");
    for _ in 0..29 {
        assert_eq!(status_with_key(&a, &secret).await, 200);
    }
    // Every batch has aged out of the stream by now; a snapshot holds the counts.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let c = Gateway::start(&cluster_node_config(
        upstream.addr,
        dir_c.path(),
        &nats.url(),
        "r1",
        "c",
        extra,
    ));
    within(Duration::from_secs(5), || async {
        admin(&c, "GET", "/readyz").await.status == 200
    })
    .await
    .expect("C ready");
    assert!(c.stderr().contains("usage snapshot loaded"), "{}", c.stderr());
    assert_eq!(usage_total(&c, &key_id).await, 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_divide_rate_the_live_nodes_share_a_rate_limit() {
    let nats = Nats::start();
    let upstream = Upstream::start("u").await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let config = |dir: &std::path::Path, node: &str| {
        cluster_node_config(upstream.addr, dir, &nats.url(), "r1", node, "divide_rate = true")
    };
    let a = Gateway::start(&config(dirs[0].path(), "a"));
    let mut b = Gateway::start(&config(dirs[1].path(), "b"));
    let plan = json!({"name": "ten", "rate_per_second": 10, "burst": 10});
    let reply = admin_json(&a, "POST", "/v1/plans", plan).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let (_, secret) = key_on_both(&a, &b, Some("ten")).await;
    let live_nodes = |n: u32| {
        let a = &a;
        move || async move {
            let metrics = admin(a, "GET", "/metrics").await.text();
            metrics.contains(&format!("tollgate_cluster_live_nodes {n}\n"))
        }
    };
    let burst_on_a = |requests: usize| {
        let (a, secret) = (&a, &secret);
        async move {
            let mut admitted = 0;
            for _ in 0..requests {
                admitted += usize::from(status_with_key(a, secret).await == 200);
            }
            admitted
        }
    };

    // Two live nodes: A's share is half the plan's burst of 10.
    let heard = within(Duration::from_secs(5), live_nodes(2)).await;
    assert!(heard.is_some(), "A hears B's heartbeats");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let shared = burst_on_a(10).await;
    // B stops: after 3.5 s unheard it no longer counts, and A has the whole burst again.
    b.signal(15);
    b.wait_exit(Duration::from_secs(10)).expect("B stopped");
    let alone = within(Duration::from_secs(8), live_nodes(1)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let whole = burst_on_a(15).await;
    println!("A's burst with B alive: {shared} of 10; B gone after {alone:?}: {whole} of 15");
    // Sequential requests on a slow machine may earn one or two refills meanwhile.
    assert!((5..=7).contains(&shared), "shared burst: {shared}");
    assert!(alone.is_some(), "B no longer counted");
    assert!((10..=13).contains(&whole), "whole burst: {whole}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_restarted_while_nats_is_down_serves_from_its_disk_and_catches_up() {
    let mut nats = Nats::start();
    let upstream = Upstream::start("u").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The key exists before A first starts, so A learns it from its start-up load.
    let b = Gateway::start(&node_config(upstream.addr, dir_b.path(), &nats, "b"));
    let reply = admin_json(&b, "POST", "/v1/consumers", json!({"id": "acme", "plan": "metered"})).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let (key_id, secret) = create_key(&b, json!({"consumer": "acme"})).await;
    let mut a = Gateway::start(&node_config(upstream.addr, dir_a.path(), &nats, "a"));
    let mut admitted = 0;
    for _ in 0..3 {
        assert_eq!(status_with_key(&a, &secret).await, 200);
        admitted += 1;
    }
    a.signal(15);
    a.wait_exit(Duration::from_secs(10)).expect("A stopped");

    // NATS goes down, then A starts again: from its own disk.
    let (port, monitor, dir) = (nats.port, nats.monitor, nats.dir.clone());
    nats.kill();
    let started = Instant::now();
    let a = Gateway::start(&node_config(upstream.addr, dir_a.path(), &nats, "a"));
    let ready = within(Duration::from_secs(15), || async {
        admin(&a, "GET", "/readyz").await.status == 200
    })
    .await;
    println!("A ready without NATS after {:?}", started.elapsed());
    assert!(ready.is_some(), "A serves from its disk: {}", a.stderr());
    for _ in 0..4 {
        assert_eq!(status_with_key(&a, &secret).await, 200, "a cached key works");
        admitted += 1;
    }
    let unknown = call(&a, "/v1/x", Some(("x-api-key", "tg_live_unknown".to_string()))).await;
    assert_eq!(unknown.status, 503, "{}", unknown.text());
    let usage = admin(&a, "GET", &format!("/v1/usage?key={key_id}")).await.json();
    assert_eq!(
        usage["total"].as_u64(),
        Some(admitted),
        "counts restored from disk: {usage}"
    );

    // NATS returns: A attaches, sees writes made elsewhere, and its counts reach B.
    let _nats = Nats::start_at(&dir, port, monitor);
    let attached = within(Duration::from_secs(15), || async {
        admin(&a, "GET", "/metrics")
            .await
            .text()
            .contains("tollgate_cluster_connected 1")
    })
    .await;
    assert!(attached.is_some(), "A reaches JetStream again: {}", a.stderr());
    let (_, new_secret) = create_key(&b, json!({"consumer": "acme"})).await;
    let known = within(Duration::from_secs(5), || async {
        status_with_key(&a, &new_secret).await == 200
    })
    .await;
    assert!(known.is_some(), "a key created on B after NATS returned works on A");
    let converged = within(Duration::from_secs(10), || async {
        usage_total(&b, &key_id).await == admitted
    })
    .await;
    assert!(
        converged.is_some(),
        "B's report shows {} of {admitted}",
        usage_total(&b, &key_id).await
    );
    println!("A attached after {attached:?}; B's report equals {admitted} after {converged:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_token_and_user_password_authentication_are_used() {
    let upstream = Upstream::start("u").await;
    // Each server refuses clients without its credentials, so a node that serves a key
    // created through it has authenticated.
    for (options, credentials) in [
        (&["--auth", "s3cret-token"][..], "token = \"s3cret-token\""),
        (
            &["--user", "gateway", "--pass", "s3cret-pass"][..],
            "user = \"gateway\"\npassword = \"s3cret-pass\"",
        ),
    ] {
        let nats = Nats::start_with(options);
        let dir = tempfile::tempdir().unwrap();
        let node = Gateway::start(&cluster_node_config(
            upstream.addr,
            dir.path(),
            &nats.url(),
            "r1",
            "a",
            credentials,
        ));
        let reply = admin_json(&node, "POST", "/v1/consumers", json!({"id": "acme"})).await;
        assert_eq!(reply.status, 201, "{credentials}: {}", reply.text());
        let (_, secret) = create_key(&node, json!({"consumer": "acme"})).await;
        assert_eq!(status_with_key(&node, &secret).await, 200, "{credentials}");
        let metrics = admin(&node, "GET", "/metrics").await.text();
        assert!(metrics.contains("tollgate_cluster_connected 1"), "{credentials}");
        // The server does require them: its greeting says so.
        let mut anonymous = std::net::TcpStream::connect(("127.0.0.1", nats.port)).unwrap();
        let mut banner = [0u8; 1024];
        let n = std::io::Read::read(&mut anonymous, &mut banner).unwrap();
        let info = String::from_utf8_lossy(&banner[..n]);
        assert!(info.contains("\"auth_required\":true"), "{info}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn during_an_outage_a_node_spends_its_lease_then_follows_the_plans_partition_mode() {
    let mut nats = Nats::start();
    let upstream = Upstream::start("u").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Gateway::start(&node_config(upstream.addr, dir_a.path(), &nats, "a"));
    let b = Gateway::start(&node_config(upstream.addr, dir_b.path(), &nats, "b"));
    for (plan, body) in [
        ("strict", json!({"daily": 100, "on_partition": "strict"})),
        (
            "available",
            json!({"daily": 100, "on_partition": "available", "partition_allowance": 3}),
        ),
    ] {
        let reply = admin_json(&a, "PUT", &format!("/v1/plans/{plan}"), body).await;
        assert!(reply.status.as_u16() < 300, "{}", reply.text());
    }
    let mut keys = Vec::new();
    for plan in ["strict", "available"] {
        let reply = admin_json(&a, "POST", "/v1/consumers", json!({"id": plan, "plan": plan})).await;
        assert_eq!(reply.status, 201, "{}", reply.text());
        let (key_id, secret) = create_key(&a, json!({"consumer": plan})).await;
        within(Duration::from_secs(2), || async {
            admin(&b, "GET", &format!("/v1/keys/{key_id}")).await.status == 200
        })
        .await
        .expect("the key reaches B");
        keys.push((key_id, secret));
    }
    let [(strict_id, strict), (available_id, available)] = <[_; 2]>::try_from(keys).unwrap();
    // Two live nodes known: the first lease is a quarter of the quota (half of what is
    // left, shared by two): A may count up to 25.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for secret in [&strict, &available] {
        for _ in 0..10 {
            assert_eq!(status_with_key(&a, secret).await, 200);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before_strict, before_available) = (usage_total(&a, &strict_id).await, usage_total(&a, &available_id).await);
    nats.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut admitted = [0, 0];
    for (i, secret) in [&strict, &available].into_iter().enumerate() {
        for _ in 0..40 {
            match status_with_key(&a, secret).await {
                200 => admitted[i] += 1,
                429 => {}
                other => panic!("unexpected {other}"),
            }
        }
    }
    println!(
        "NATS down: strict plan admitted {} more (view had {before_strict}), available plan {} more (view had {before_available})",
        admitted[0], admitted[1]
    );
    let leased = |before: u64| 25 - before.min(25);
    assert_eq!(
        admitted[0],
        leased(before_strict),
        "strict: what the lease holds, no more"
    );
    assert_eq!(
        admitted[1],
        leased(before_available) + 3,
        "available: the lease plus the allowance"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_starting_at_once_on_an_empty_jetstream_are_all_ready_promptly() {
    let upstream = Upstream::start("u").await;
    // Three rounds, each on a fresh server: the streams, buckets and stores are created by
    // whichever node gets there first, and the others find them.
    for round in 0..3 {
        let nats = Nats::start();
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let started = Instant::now();
        let nodes: Vec<Gateway> = dirs
            .iter()
            .enumerate()
            .map(|(i, dir)| Gateway::start(&node_config(upstream.addr, dir.path(), &nats, &format!("n{i}"))))
            .collect();
        for node in &nodes {
            let ready = within(Duration::from_secs(8), || async {
                admin(node, "GET", "/readyz").await.status == 200
            })
            .await;
            assert!(ready.is_some(), "round {round}: a node not ready: {}", node.stderr());
        }
        println!(
            "round {round}: three nodes started at once, all ready after {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_left_idle_goes_back_to_the_nodes_still_serving() {
    let nats = Nats::start();
    let upstream = Upstream::start("u").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Gateway::start(&node_config(upstream.addr, dir_a.path(), &nats, "a"));
    let b = Gateway::start(&node_config(upstream.addr, dir_b.path(), &nats, "b"));
    let reply = admin_json(&a, "PUT", "/v1/plans/hundred", json!({"daily": 100})).await;
    assert!(reply.status.as_u16() < 300, "{}", reply.text());
    let reply = admin_json(&a, "POST", "/v1/consumers", json!({"id": "mover", "plan": "hundred"})).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let (key_id, secret) = create_key(&a, json!({"consumer": "mover"})).await;
    within(Duration::from_secs(2), || async {
        admin(&b, "GET", &format!("/v1/keys/{key_id}")).await.status == 200
    })
    .await
    .expect("the key reaches B");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The caller's traffic is on A, then moves to B for good.
    for _ in 0..30 {
        assert_eq!(status_with_key(&a, &secret).await, 200);
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut on_b = 0;
    for _ in 0..120 {
        if status_with_key(&b, &secret).await == 200 {
            on_b += 1;
        }
    }
    let released = metric(&a, "tollgate_quota_lease_claims_total{outcome=\"released\"}").await;
    println!("A spent 30 and released {released} lease(s); B then admitted {on_b}");
    assert!(released >= 1, "A gave back what it held");
    assert_eq!(on_b, 70, "B gets all that A did not spend");
}
