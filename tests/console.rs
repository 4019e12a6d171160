//! The operator console and the customer usage page, as their users meet them: a real
//! headless Chromium (Debian's, driven by Playwright from `tests/console/console.mjs`)
//! against a running gateway with traffic, and plain HTTP for the page's JSON and errors.
//! `./test.sh` installs Chromium and the driver; screenshots land in
//! `target/tmp/console-screenshots/` (the ones in `docs/console/` are copies).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Two pools: `geo` answers; `flaky` has a second endpoint nothing listens on, so the
/// console has a down endpoint to show.
fn config(geo: &Upstream, dead: u16) -> String {
    format!(
        "{}[upstreams.geo]\nendpoints = [\"{}\"]\n\n[upstreams.flaky]\nendpoints = [\"{}\", \"127.0.0.1:{dead}\"]\n\
         [upstreams.flaky.health]\nkind = \"tcp\"\ninterval = \"200ms\"\n\n\
         [[routes]]\nname = \"geo\"\npath = \"/v1/geo\"\nupstream = \"geo\"\nauth = [\"api_key\"]\n\n\
         [[routes]]\nname = \"status\"\npath = \"/status\"\nupstream = \"flaky\"\n\n\
         [plans.pro]\nrate = {{ per_second = 100 }}\ndaily = 500\nmonthly = 10000\n\n\
         [plans.starter]\ndaily = 20\n\n\
         [usage_page]\nrate_per_minute = 5\n",
        base_config(),
        geo.addr,
        geo.addr
    )
}

async fn setup() -> (Upstream, Gateway) {
    let geo = Upstream::start("geo").await;
    let dead = free_port();
    let gateway = Gateway::start(&config(&geo, dead));
    for (id, plan) in [("acme", "pro"), ("globex", "starter")] {
        let reply = admin_json(&gateway, "POST", "/v1/consumers", json!({"id": id, "plan": plan})).await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    (geo, gateway)
}

async fn hit(gateway: &Gateway, path: &str, key: Option<&str>, times: usize) {
    for _ in 0..times {
        call(gateway, path, key.map(|k| ("x-api-key", k.to_string()))).await;
    }
}

/// Every `tollgate_requests_total` of `route`, summed over statuses.
async fn route_total(gateway: &Gateway, route: &str) -> u64 {
    let text = admin(gateway, "GET", "/metrics").await.text();
    let prefix = format!("tollgate_requests_total{{route=\"{route}\",");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_in_a_real_browser_shows_what_the_admin_api_says_and_manages_keys() {
    let (_geo, gateway) = setup().await;
    let (acme_id, acme) = create_key(&gateway, json!({"consumer": "acme"})).await;
    let (globex_id, globex) = create_key(&gateway, json!({"consumer": "globex"})).await;
    hit(&gateway, "/v1/geo", Some(&acme), 30).await;
    hit(&gateway, "/v1/geo", Some(&globex), 12).await;
    hit(&gateway, "/v1/geo", None, 5).await;
    hit(&gateway, "/status", None, 8).await;
    // The dead endpoint is found by its health check (every 200 ms).
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let output = tokio::task::spawn_blocking({
        let (admin_url, proxy_url, shots) = (gateway.admin_url(""), gateway.url(""), shots.clone());
        let page_key = acme.clone();
        move || {
            std::process::Command::new("node")
                .arg(fixture("tests/console/console.mjs"))
                .env("ADMIN_URL", admin_url)
                .env("PROXY_URL", proxy_url)
                .env("TOKEN", ADMIN_TOKEN)
                .env("CONSUMER", "globex")
                .env("PAGE_KEY", page_key)
                .env("SHOTS", shots)
                .output()
                .expect("node is needed (./test.sh installs Chromium and playwright-core)")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let seen: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "the driver printed no result ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    println!("browser saw: {seen:#}");
    assert!(seen["failed"].is_null(), "the browser run failed: {}", seen["failed"]);
    assert_eq!(seen["errors"], json!([]), "console errors");
    assert_eq!(seen["external"], json!([]), "requests outside the gateway");

    // Login.
    assert!(seen["wrong_token"]["message"].as_str().unwrap().contains("refused"));
    assert_eq!(seen["wrong_token"]["app_hidden"], true);
    assert_eq!(seen["signed_in"]["url_has_token"], false);
    assert_eq!(seen["signed_in"]["stored"], true);
    assert_eq!(seen["session_kept"], true);
    assert_eq!(seen["signed_out"]["stored"], Value::Null);

    // Traffic: the routes table's counts are the counters' (no traffic since, except the
    // browser's own two calls on `geo` and the page view, made after the table was read).
    assert!(seen["traffic"]["points"].as_u64().unwrap() >= 1);
    assert!(seen["traffic"]["latency_series"].as_u64().unwrap() >= 2, "p50 and p99");
    assert_eq!(seen["traffic"]["routes"]["geo"], 47);
    assert_eq!(seen["traffic"]["routes"]["status"], 8);
    assert_eq!(route_total(&gateway, "geo").await, 47 + 2);

    // Upstreams: the dead endpoint is down, the live ones up.
    let flaky = seen["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pool"] == "flaky")
        .expect("flaky pool shown");
    let statuses: Vec<&str> = flaky["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == "down").count(), 1, "{flaky}");
    assert_eq!(statuses.iter().filter(|s| **s == "up").count(), 1, "{flaky}");

    // Usage: the top lists are the admin API's.
    let top = admin(&gateway, "GET", "/v1/usage/top?window=day&limit=10").await.json();
    let api_rows: Vec<(String, u64)> = top["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["subject"].as_str().unwrap().to_string(),
                r["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(api_rows[0], (format!("key:{acme_id}"), 30));
    assert_eq!(api_rows[1], (format!("key:{globex_id}"), 12));
    let shown: Vec<(String, u64)> = seen["usage"]["top_day"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r["requests"].as_u64().unwrap()))
        .collect();
    assert_eq!(shown, api_rows[..shown.len()].to_vec());
    assert_eq!(seen["usage"]["top_month"][0]["requests"], 30);
    assert_eq!(
        seen["usage"]["consumers_day"][0],
        json!({"name": "acme", "requests": 30})
    );
    // The first key's 30 days: today's bar holds its 30 calls, under pro's daily line.
    let bars = seen["usage"]["detail"]["bars"].as_array().unwrap();
    assert_eq!(bars.len(), 30);
    assert_eq!(bars.last().unwrap(), 30);
    assert_eq!(bars.iter().map(|b| b.as_u64().unwrap()).sum::<u64>(), 30);
    assert_eq!(seen["usage"]["detail"]["quota"], json!([500]));

    // Keys: the new key worked through the proxy until it was revoked in the table.
    assert_eq!(seen["keys"]["before"], 2);
    assert_eq!(seen["keys"]["plans"], json!(["pro", "starter"]));
    let created = &seen["keys"]["created"];
    assert_eq!(created["secret_prefix"], "tg_live_");
    assert_eq!(created["status_before"], 200);
    assert_eq!(created["status_after"], 403);
    assert_eq!(seen["keys"]["secret_hidden"], true);
    let id = created["id"].as_str().unwrap();
    let stored = admin(&gateway, "GET", &format!("/v1/keys/{id}")).await.json();
    assert_eq!(
        (stored["consumer"].as_str(), stored["revoked"].as_bool()),
        (Some("globex"), Some(true))
    );

    // Cluster (single node here).
    assert_eq!(seen["cluster"][0], "single node");

    // The customer page as a browser shows it: the key's own numbers.
    assert_eq!(seen["customer"]["today"], 30);
    assert_eq!(seen["customer"]["month"], 30);
    assert_eq!(seen["customer"]["bars"], 30);
    assert!(seen["customer"]["plan"].as_str().unwrap().contains("pro"));

    for name in [
        "login",
        "traffic",
        "upstreams",
        "usage",
        "keys",
        "cluster",
        "customer-usage",
    ] {
        let size = std::fs::metadata(shots.join(format!("{name}.png"))).map_or(0, |m| m.len());
        assert!(size > 10_000, "screenshot {name}.png is {size} bytes");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_is_self_contained_and_its_data_needs_the_token() {
    let (_geo, gateway) = setup().await;
    // The page and its files are served without the token (they hold no data) ...
    let page = get(&gateway.admin_url("/console")).await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let policy = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        policy.contains("default-src 'none'") && policy.contains("frame-ancestors 'none'"),
        "{policy}"
    );
    let html = page.text();
    let mut assets = vec![("/console".to_string(), html.clone())];
    for path in ["/console/app.js", "/console/app.css", "/console/icon.svg"] {
        assert!(html.contains(path), "the page loads {path}");
        let reply = get(&gateway.admin_url(path)).await;
        assert_eq!(reply.status, 200, "{path}");
        assets.push((path.to_string(), reply.text()));
    }
    // ... and name nothing outside the gateway: the only absolute URL is SVG's namespace
    // name, which is an identifier, never fetched.
    for (path, text) in &assets {
        for (at, _) in text.match_indices("://") {
            let start = text[..at]
                .rfind(|c: char| !c.is_ascii_alphanumeric())
                .map_or(0, |i| i + 1);
            let url: String = text[start..].chars().take_while(|c| !"\"' )`".contains(*c)).collect();
            assert_eq!(url, "http://www.w3.org/2000/svg", "{path} names an outside URL");
        }
        assert!(!text.contains("cdn"), "{path}");
    }
    // The data is the token's.
    for path in ["/v1/traffic", "/v1/cluster"] {
        let refused = get(&gateway.admin_url(path)).await;
        assert_eq!(refused.status, 401, "{path}");
        assert_eq!(refused.json()["error"]["code"], "unauthorized");
    }
    hit(&gateway, "/status", None, 6).await;
    let traffic = admin(&gateway, "GET", "/v1/traffic?minutes=5").await;
    assert_eq!(traffic.status, 200);
    let traffic = traffic.json();
    assert_eq!(traffic["traffic"]["routes"][0], "(all)");
    // Requests made within the last second may sit in no point yet (a partial point needs
    // a second of its own): wait for them rather than for a fixed time.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    loop {
        let traffic = admin(&gateway, "GET", "/v1/traffic?minutes=5").await.json();
        let sum: u64 = traffic["traffic"]["series"]["status"]
            .as_array()
            .map_or(0, |points| points.iter().map(|p| p["requests"].as_u64().unwrap()).sum());
        if sum == 6 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "traffic never showed 6 requests: {traffic}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let bad = admin(&gateway, "GET", "/v1/traffic?minutes=0").await;
    assert_eq!(bad.status, 400);
    let cluster = admin(&gateway, "GET", "/v1/cluster").await.json();
    assert_eq!(cluster["mode"], "single");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_customer_page_shows_a_key_its_own_usage_and_nothing_else() {
    let (_geo, gateway) = setup().await;
    let (acme_id, acme) = create_key(&gateway, json!({"consumer": "acme"})).await;
    let (_, globex) = create_key(&gateway, json!({"consumer": "globex"})).await;
    hit(&gateway, "/v1/geo", Some(&acme), 7).await;
    hit(&gateway, "/v1/geo", Some(&globex), 3).await;

    let page = |key: Option<&str>, accept: Option<&str>| {
        let mut request = hyper::Request::get(gateway.url("/usage"));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        send(request.body(full("")).unwrap())
    };
    let reply = page(Some(&acme), Some("application/json")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["cache-control"], "private, no-store");
    let mine = reply.json();
    let report = admin(&gateway, "GET", &format!("/v1/usage?key={acme_id}")).await.json();
    let reported: u64 = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(reported, 7);
    assert_eq!(mine["key"], acme_id);
    assert_eq!(mine["today"]["used"], 7);
    assert_eq!(mine["month"]["used"], reported);
    assert_eq!(mine["today"]["quota"], 500);
    assert_eq!(mine["today"]["remaining"], 493);
    assert_eq!(mine["month"]["quota"], 10000);
    assert_eq!(mine["plan"]["name"], "pro");
    assert_eq!(mine["days"].as_array().unwrap().len(), 30);
    assert!(mine["today"]["resets_in_seconds"].as_u64().unwrap() <= 86_400);
    // Nothing of the other customer: neither their numbers nor their names.
    let text = reply.text();
    assert!(!text.contains("globex") && !text.contains("starter"), "{text}");

    // HTML for a browser: no script, every number the JSON's.
    let html = page(Some(&acme), Some("text/html")).await;
    assert_eq!(html.status, 200);
    assert!(html.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let body = html.text();
    assert!(body.contains("data-used=\"7\"") && !body.contains("<script"), "{body}");
    assert!(
        html.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );

    // The page counts against nobody's quota: still 7 after the views.
    let again = page(Some(&acme), Some("application/json")).await.json();
    assert_eq!(again["today"]["used"], 7);
    let report = admin(&gateway, "GET", &format!("/v1/usage?key={acme_id}")).await.json();
    assert_eq!(report["rows"][0]["requests"], 7);

    // Without a key (or with a wrong one): the proxy's JSON errors.
    let missing = page(None, None).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"]["code"], "missing_credentials");
    let wrong = page(Some("tg_live_nope"), None).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error"]["code"], "invalid_api_key");
    let post = send(
        hyper::Request::post(gateway.url("/usage"))
            .header("x-api-key", &acme)
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, 405);
    assert_eq!(post.headers["allow"], "GET, HEAD");

    // Rate-limited per key: acme has used 3 of its 5 views a minute; globex has its own.
    for _ in 0..2 {
        assert_eq!(page(Some(&acme), None).await.status, 200);
    }
    let limited = page(Some(&acme), None).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.json()["error"]["code"], "rate_limited");
    assert!(limited.headers.contains_key("retry-after"));
    let other = page(Some(&globex), Some("application/json")).await;
    assert_eq!(other.status, 200);
    assert_eq!(other.json()["today"]["used"], 3);
    assert_eq!(other.json()["today"]["quota"], 20);

    // Counted as its own "route" in the metrics, and a revoked key sees nothing.
    assert!(route_total(&gateway, "(usage_page)").await >= 8);
    assert_eq!(
        admin(&gateway, "DELETE", &format!("/v1/keys/{acme_id}")).await.status,
        204
    );
    let revoked = page(Some(&acme), None).await;
    assert_eq!(revoked.status, 403);
    assert_eq!(revoked.json()["error"]["code"], "key_revoked");
}
