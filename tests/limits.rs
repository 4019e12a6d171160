//! Plans end to end: rate limits, quotas, usage counters on disk, reports.
mod common;

use std::time::Duration;

use common::*;
use http::Request;
use serde_json::json;

fn config(upstream: std::net::SocketAddr, data_dir: &std::path::Path) -> String {
    format!(
        r#"data_dir = "{data}"

[server]
listen = ["127.0.0.1:0"]
workers = 2
trusted_proxies = ["127.0.0.1"]

[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[upstreams.u]
endpoints = ["{upstream}"]

[[routes]]
name = "api"
path = "/v1"
upstream = "u"
auth = ["api_key"]

[[routes]]
name = "batch"
path = "/batch"
upstream = "u"
auth = ["api_key"]
group = "batch"

[[routes]]
name = "free"
path = "/free"
upstream = "u"
auth = ["anonymous"]

[plans.exact]
daily = 100

[plans.small]
daily = 5

[plans.tiny]
daily = 4

[plans.burst]
rate = {{ per_second = 10, burst = 5 }}

[plans.calendar]
daily = 2
monthly = 3

[plans.grouped]
daily = 100
[plans.grouped.groups.batch]
daily = 2

[plans.anon]
daily = 3

[anonymous]
plan = "anon"
by = ["ip", "referer"]

[usage]
flush_interval = "100ms"
"#,
        data = data_dir.display()
    )
}

async fn consumer(gateway: &Gateway, id: &str, plan: Option<&str>) {
    let reply = admin_json(gateway, "POST", "/v1/consumers", json!({"id": id, "plan": plan})).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
}

/// A consumer on `plan` with one key; returns (key id, secret).
async fn keyed(gateway: &Gateway, consumer_id: &str, plan: &str) -> (String, String) {
    consumer(gateway, consumer_id, Some(plan)).await;
    create_key(gateway, json!({"consumer": consumer_id})).await
}

async fn with_key(gateway: &Gateway, path: &str, secret: &str) -> Reply {
    call(gateway, path, Some(("x-api-key", secret.to_string()))).await
}

async fn count_ok(gateway: &Gateway, path: &str, secret: &str, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        let reply = with_key(gateway, path, secret).await;
        match reply.status.as_u16() {
            200 => ok += 1,
            429 => {}
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    ok
}

async fn anonymous(gateway: &Gateway, ip: &str, referer: Option<&str>) -> u16 {
    let mut request = Request::get(gateway.url("/free/x")).header("x-forwarded-for", ip);
    if let Some(referer) = referer {
        request = request.header("referer", referer);
    }
    send(request.body(full("")).unwrap()).await.status.as_u16()
}

async fn report(gateway: &Gateway, query: &str) -> Reply {
    admin(gateway, "GET", &format!("/v1/usage{query}")).await
}

fn rows(reply: &Reply) -> Vec<(String, u64)> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let label = ["window", "subject", "consumer", "route"]
                .iter()
                .filter_map(|f| r[*f].as_str())
                .collect::<Vec<_>>()
                .join(" ");
            (label, r["requests"].as_u64().unwrap())
        })
        .collect()
}

fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    tollgate::limits::window::format_day((secs / 86_400) as u32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_the_quota_is_admitted_under_64_concurrent_clients() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = std::sync::Arc::new(Gateway::start(&config(upstream.addr, data.path())));
    let (key_id, secret) = keyed(&gateway, "acme", "exact").await;

    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (gateway, secret) = (gateway.clone(), secret.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..5 {
                    let reply = with_key(&gateway, "/v1/x", &secret).await;
                    if reply.status == 429 {
                        assert_eq!(reply.json()["error"]["code"], "quota_exceeded");
                    }
                    statuses.push(reply.status.as_u16());
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.extend(task.await.unwrap());
    }
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    println!("64 clients × 5 requests, quota 100: {admitted} admitted, {refused} refused");
    assert_eq!((admitted, refused), (100, 220));
    assert_eq!(upstream.hits(), 100, "refused requests never reach the upstream");

    // The report agrees, through JSON and CSV.
    let reply = report(&gateway, &format!("?key={key_id}")).await;
    assert_eq!(rows(&reply), vec![(format!("{} key:{key_id}", today()), 100)]);
    assert_eq!(reply.json()["total"], 100);
    let csv = report(&gateway, &format!("?subject=key:{key_id}&window=month&format=csv")).await;
    assert_eq!(csv.headers["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        csv.text(),
        format!("window,subject,requests\n{},key:{key_id},100\n", &today()[..7])
    );

    // The counters gauge is set by the flusher: wait for a flush after the requests.
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = admin(&gateway, "GET", "/metrics").await.text();
        if metrics.contains("tollgate_usage_counters 1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for line in [
        "tollgate_limit_decisions_total{plan=\"exact\",decision=\"admitted\"} 100",
        "tollgate_limit_decisions_total{plan=\"exact\",decision=\"quota_exceeded\"} 220",
        "tollgate_usage_counters 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    assert!(!metrics.contains("tollgate_usage_flush_duration_seconds_count 0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn burst_then_steady_rate() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, data.path()));
    let (_, secret) = keyed(&gateway, "fast", "burst").await;

    let started = std::time::Instant::now();
    let mut admitted = 0;
    let mut last_refusal = None;
    for _ in 0..20 {
        let reply = with_key(&gateway, "/v1/x", &secret).await;
        match reply.status.as_u16() {
            200 => admitted += 1,
            429 => last_refusal = Some(reply),
            other => panic!("unexpected {other}"),
        }
    }
    // Burst of 5, plus one per 100 ms that passed while sending.
    let refilled = (started.elapsed().as_millis() / 100) as usize;
    println!("20 back-to-back requests: {admitted} admitted ({refilled} refills possible)");
    assert!((5..=5 + refilled).contains(&admitted), "admitted {admitted}");
    let refusal = last_refusal.expect("the burst ran out");
    assert_eq!(refusal.json()["error"]["code"], "rate_limited");
    assert_eq!(refusal.headers["retry-after"], "1");
    assert_eq!(refusal.headers["ratelimit-policy"], "\"rate\";q=5;w=1");
    assert_eq!(refusal.json()["error"]["limit"], 5);

    // At the plan's pace (10/s) nothing is refused.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for i in 0..15 {
        let reply = with_key(&gateway, "/v1/x", &secret).await;
        assert_eq!(reply.status, 200, "request {i} at the steady rate");
        tokio::time::sleep(Duration::from_millis(110)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_and_the_429_body() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, data.path()));
    let (_, secret) = keyed(&gateway, "acme", "small").await;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    let reset = |value: &str| -> u64 { value.rsplit("t=").next().unwrap().parse().unwrap() };
    for remaining in (0..5).rev() {
        let reply = with_key(&gateway, "/v1/x", &secret).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.headers["ratelimit-policy"], "\"daily\";q=5;w=86400");
        let current = reply.headers["ratelimit"].to_str().unwrap();
        assert!(current.starts_with(&format!("\"daily\";r={remaining};t=")), "{current}");
        assert!(reset(current).abs_diff(to_midnight) <= 2, "{current} vs {to_midnight}");
    }
    let reply = with_key(&gateway, "/v1/x", &secret).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.headers["content-type"], "application/json");
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "quota_exceeded");
    assert_eq!(error["limit"], 5);
    assert_eq!(error["window"], "day");
    assert_eq!(error["policy"], "daily");
    assert_eq!(error["remaining"], 0);
    let tomorrow = tollgate::limits::window::format_day((now / 86_400 + 1) as u32);
    assert_eq!(error["reset"], format!("{tomorrow}T00:00:00Z"));
    let retry_after: u64 = reply.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(error["retry_after"], retry_after);
    assert!(retry_after.abs_diff(to_midnight) <= 2);
    assert_eq!(error["request_id"], reply.headers["x-request-id"].to_str().unwrap());
    assert!(
        reply.headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"daily\";r=0;")
    );
    assert!(error["message"].as_str().unwrap().contains("daily quota of 5"));
    assert_eq!(upstream.hits(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_ip_and_referer_are_counted_separately() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, data.path()));
    let shop = Some("https://shop.example/page");

    // Two IPs, one Referer: the Referer's 3 run out.
    assert_eq!(anonymous(&gateway, "203.0.113.1", shop).await, 200);
    assert_eq!(anonymous(&gateway, "203.0.113.1", shop).await, 200);
    assert_eq!(anonymous(&gateway, "203.0.113.2", shop).await, 200);
    assert_eq!(anonymous(&gateway, "203.0.113.2", shop).await, 429);
    // The second IP still has room without that Referer.
    assert_eq!(anonymous(&gateway, "203.0.113.2", None).await, 200);

    // One IP, two Referers: the IP's 3 run out.
    assert_eq!(
        anonymous(&gateway, "198.51.100.7", Some("https://a.example/")).await,
        200
    );
    assert_eq!(
        anonymous(&gateway, "198.51.100.7", Some("https://a.example/")).await,
        200
    );
    assert_eq!(
        anonymous(&gateway, "198.51.100.7", Some("https://b.example/")).await,
        200
    );
    assert_eq!(
        anonymous(&gateway, "198.51.100.7", Some("https://b.example/")).await,
        429
    );

    let mut counted = rows(&report(&gateway, "").await);
    counted.sort();
    let day = today();
    let expected: Vec<(String, u64)> = [
        ("ip:198.51.100.7", 3),
        ("ip:203.0.113.1", 2),
        ("ip:203.0.113.2", 2),
        ("referer:a.example", 2),
        ("referer:b.example", 1),
        ("referer:shop.example", 3),
    ]
    .iter()
    .map(|(s, n)| (format!("{day} {s}"), *n))
    .collect();
    assert_eq!(counted, expected);
    let top = admin(&gateway, "GET", "/v1/usage/top?kind=referer&limit=1").await;
    assert_eq!(rows(&top), vec![(format!("{day} referer:shop.example"), 3)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_counts() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let config = config(upstream.addr, data.path());
    let mut gateway = Gateway::start(&config);
    let (_, secret) = keyed(&gateway, "acme", "small").await;
    assert_eq!(count_ok(&gateway, "/v1/x", &secret, 3).await, 3);
    // Graceful stop flushes whatever the last interval had not written.
    gateway.signal(15);
    assert!(gateway.wait_exit(Duration::from_secs(10)).unwrap().success());

    let mut gateway = Gateway::start(&config);
    assert_eq!(count_ok(&gateway, "/v1/x", &secret, 3).await, 2);
    // A killed node loses at most one flush interval; after one, nothing.
    tokio::time::sleep(Duration::from_millis(400)).await;
    gateway.signal(9);
    gateway.wait_exit(Duration::from_secs(10)).unwrap();
    let gateway = Gateway::start(&config);
    assert_eq!(count_ok(&gateway, "/v1/x", &secret, 2).await, 0);
    assert_eq!(upstream.hits(), 5);
    // The SQLite file holds the count.
    let db = rusqlite_count(&data.path().join("tollgate.db"));
    assert_eq!(db, 5);
}

/// Sum of stored per-subject day slots, read straight from the database file.
fn rusqlite_count(path: &std::path::Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.starts_with(b"SQLite format 3\0"));
    let store = tollgate::state::SqliteBackend::open(path).unwrap();
    let mut total = 0;
    let scan = tollgate::usage::report::UsageScan {
        from_day: 0,
        to_day: u32::MAX,
        subject: None,
        subject_prefix: None,
        consumer: None,
        scope: tollgate::usage::report::ScopeFilter::Total,
    };
    tollgate::state::UsageStore::scan_usage(&store, &scan, &mut |row| total += row.row.count).unwrap();
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_changes_apply_at_once_and_keep_usage() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, data.path()));
    let (key_id, secret) = keyed(&gateway, "acme", "small").await;
    assert_eq!(count_ok(&gateway, "/v1/x", &secret, 3).await, 3);

    // Lowering: 4 a day, 3 used.
    let reply = admin_json(
        &gateway,
        "PATCH",
        &format!("/v1/keys/{key_id}"),
        json!({"plan": "tiny"}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["plan"], "tiny");
    assert_eq!(count_ok(&gateway, "/v1/x", &secret, 3).await, 1);

    // Raising the plan itself through the admin API: 10 a day, 4 used.
    let reply = admin_json(&gateway, "PUT", "/v1/plans/tiny", json!({"daily": 10})).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(count_ok(&gateway, "/v1/x", &secret, 10).await, 6);

    // Back to the consumer's plan (small, 5): already over it.
    let reply = admin_json(&gateway, "PATCH", &format!("/v1/keys/{key_id}"), json!({"plan": null})).await;
    assert_eq!(reply.json()["plan"], serde_json::Value::Null);
    assert_eq!(count_ok(&gateway, "/v1/x", &secret, 1).await, 0);
    // The consumer moves to `exact` (100): its keys follow.
    let reply = admin_json(&gateway, "PATCH", "/v1/consumers/acme", json!({"plan": "exact"})).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(count_ok(&gateway, "/v1/x", &secret, 2).await, 2);
    let reply = report(&gateway, &format!("?key={key_id}")).await;
    assert_eq!(reply.json()["total"], 12);

    let bad = admin_json(
        &gateway,
        "PATCH",
        &format!("/v1/keys/{key_id}"),
        json!({"colour": "red"}),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        admin_json(&gateway, "PATCH", "/v1/keys/key_nope", json!({"plan": "x"}))
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn route_group_quotas() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, data.path()));
    let (_, secret) = keyed(&gateway, "acme", "grouped").await;
    assert_eq!(count_ok(&gateway, "/batch/x", &secret, 2).await, 2);
    let reply = with_key(&gateway, "/batch/x", &secret).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.json()["error"]["policy"], "batch-daily");
    assert_eq!(reply.headers["ratelimit-policy"], "\"batch-daily\";q=2;w=86400");
    assert_eq!(count_ok(&gateway, "/v1/x", &secret, 3).await, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_sum_by_consumer_route_and_window() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, data.path()));
    let (acme_1, acme_secret_1) = keyed(&gateway, "acme", "exact").await;
    let (_, acme_secret_2) = create_key(&gateway, json!({"consumer": "acme"})).await;
    let (_, beta_secret) = keyed(&gateway, "beta", "exact").await;
    assert_eq!(count_ok(&gateway, "/v1/x", &acme_secret_1, 7).await, 7);
    assert_eq!(count_ok(&gateway, "/batch/x", &acme_secret_1, 2).await, 2);
    assert_eq!(count_ok(&gateway, "/v1/x", &acme_secret_2, 4).await, 4);
    assert_eq!(count_ok(&gateway, "/v1/x", &beta_secret, 5).await, 5);

    let day = today();
    let by_consumer = report(&gateway, "?group_by=consumer").await;
    assert_eq!(
        rows(&by_consumer),
        vec![(format!("{day} acme"), 13), (format!("{day} beta"), 5)]
    );
    let per_route = report(&gateway, "?consumer=acme&group_by=consumer,route").await;
    assert_eq!(
        rows(&per_route),
        vec![(format!("{day} acme api"), 11), (format!("{day} acme batch"), 2)]
    );
    let one_route = report(&gateway, "?route=batch&window=month").await;
    assert_eq!(rows(&one_route), vec![(format!("{} key:{acme_1} batch", &day[..7]), 2)]);
    let csv = report(&gateway, "?group_by=consumer,route&format=csv").await.text();
    assert_eq!(
        csv,
        format!("window,consumer,route,requests\n{day},acme,api,11\n{day},beta,api,5\n{day},acme,batch,2\n")
    );
    let top = admin(&gateway, "GET", "/v1/usage/top?by=consumer&limit=1").await;
    assert_eq!(rows(&top), vec![(format!("{day} acme"), 13)]);

    // The CLI prints the same as a table.
    let output = std::process::Command::new(binary())
        .args(["usage", "--group-by", "consumer", "--admin-url"])
        .arg(format!("http://{}", gateway.admin))
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{table}");
    assert!(table.starts_with("WINDOW      CONSUMER  REQUESTS\n"), "{table}");
    assert!(table.contains(&format!("{day}  acme      13\n")), "{table}");
    assert!(table.contains("total requests: 18"), "{table}");

    // Bad parameters: 400 with the JSON error body, naming the parameter.
    for (query, mentions) in [
        ("?colour=red", "colour"),
        ("?from=2026-02-30", "from"),
        ("?to=tomorrow", "to"),
        ("?window=week", "window"),
        ("?from=2026-11-20&to=2026-11-01", "after"),
    ] {
        let reply = report(&gateway, query).await;
        assert_eq!(reply.status, 400, "{query}");
        let error = &reply.json()["error"];
        assert_eq!(error["code"], "invalid_request");
        assert!(
            error["message"].as_str().unwrap().contains(mentions),
            "{query}: {error}"
        );
        assert!(!error["request_id"].as_str().unwrap().is_empty());
    }
    let reply = admin(&gateway, "GET", "/v1/usage/top?limit=lots").await;
    assert_eq!(reply.status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn quotas_follow_the_calendar_across_midnight_and_month_end() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    // The gateway's clock starts two seconds before February.
    let gateway = Gateway::start_with_env(
        &config(upstream.addr, data.path()),
        &[("TOLLGATE_CLOCK_START", "2026-01-31T23:59:58Z")],
    );
    let (key_id, secret) = keyed(&gateway, "acme", "calendar").await;
    assert_eq!(count_ok(&gateway, "/v1/x", &secret, 3).await, 2);
    let refused = with_key(&gateway, "/v1/x", &secret).await;
    assert_eq!(refused.json()["error"]["reset"], "2026-02-01T00:00:00Z");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // February 1: a new day and a new month.
    assert_eq!(count_ok(&gateway, "/v1/x", &secret, 3).await, 2);
    let daily = report(&gateway, &format!("?key={key_id}&from=2026-01&to=2026-02")).await;
    assert_eq!(
        rows(&daily),
        vec![
            (format!("2026-01-31 key:{key_id}"), 2),
            (format!("2026-02-01 key:{key_id}"), 2)
        ]
    );
    let monthly = report(&gateway, &format!("?key={key_id}&window=month&from=2026-01")).await;
    assert_eq!(
        rows(&monthly),
        vec![
            (format!("2026-01 key:{key_id}"), 2),
            (format!("2026-02 key:{key_id}"), 2)
        ]
    );
}
