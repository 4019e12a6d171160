//! `tollgate demo`: a gateway in front of a built-in example API, with commands to try.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Proxy listen address (a free port is picked if it is taken).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Admin API listen address (a free port is picked if it is taken).
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin_listen: SocketAddr,
    /// Run the sample requests, print them, and exit instead of serving until Ctrl-C.
    #[arg(long)]
    once: bool,
}

pub fn run(args: DemoArgs) -> ExitCode {
    let result = super::runtime().and_then(|rt| rt.block_on(demo(args)));
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tollgate demo: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: DemoArgs) -> std::io::Result<ExitCode> {
    let upstream = start_example_upstream().await?;
    let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let token = crate::base::new_request_id().as_str().to_string();
    let config_path = dir.join("tollgate.toml");
    std::fs::write(
        &config_path,
        demo_config(
            free_or_any(args.listen),
            free_or_any(args.admin_listen),
            upstream,
            &token,
            &dir,
        ),
    )?;
    let config = crate::config::load(&config_path)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let signals = super::serve::Signals::install()?;
    let running = super::serve::start(config).await?;
    let proxy = running.proxy_addrs[0];
    let admin = running.admin_addr;

    println!("Tollgate demo");
    println!("  gateway      http://{proxy}");
    println!("  example API  http://{upstream} (fake IP geolocation)");
    println!("  admin API    http://{admin}  token {token}");
    println!("  console      http://{admin}/console  (sign in with the token)");
    println!(
        "  config       {}  (edit it, then: kill -HUP {})",
        config_path.display(),
        std::process::id()
    );
    println!();
    let keys = match (
        demo_key(admin, &token, "demo", "free").await,
        demo_key(admin, &token, "trial-user", "trial").await,
    ) {
        (Ok(key), Ok(trial)) => (key, trial),
        (Err(error), _) | (_, Err(error)) => {
            running.stop().await;
            return Err(std::io::Error::other(format!("cannot create the demo keys: {error}")));
        }
    };
    let (key, trial_key) = keys;
    println!("  demo key     {key}  (consumer \"demo\", plan \"free\": 5/s, 1000/day)");
    println!("  trial key    {trial_key}  (consumer \"trial-user\", plan \"trial\": 3/day)");
    println!();
    println!("Try:");
    let lookup = format!("http://{proxy}/v1/lookup/8.8.8.8");
    let admin_auth = format!("Bearer {token}");
    let samples = [
        (
            "an authorised lookup",
            lookup.clone(),
            Some(("X-API-Key", key.as_str())),
        ),
        (
            "the same without a key: the anonymous free tier",
            lookup.clone(),
            Some(("Referer", "https://blog.example.org/")),
        ),
        (
            "with a bad key (401 invalid_api_key)",
            lookup.clone(),
            Some(("X-API-Key", "tg_live_not-a-real-key")),
        ),
        (
            "a path with no route (404 JSON error)",
            format!("http://{proxy}/nowhere"),
            None,
        ),
        (
            "the key's own usage page (JSON; open it in a browser with ?api_key=... for the page)",
            format!("http://{proxy}/usage?format=json"),
            Some(("X-API-Key", key.as_str())),
        ),
        (
            "the admin metrics",
            format!("http://{admin}/metrics"),
            Some(("Authorization", admin_auth.as_str())),
        ),
    ];
    let mut ok = true;
    for (what, url, header) in &samples {
        let shown = header.map_or(String::new(), |(name, value)| format!("-H '{name}: {value}' "));
        println!("  # {what}");
        println!("  curl -i {shown}{url}");
        ok &= show(fetch(url, *header).await);
        println!();
    }
    println!("  # the trial plan allows 3 calls a day: the 4th gets 429 with Retry-After");
    println!("  for i in 1 2 3 4; do curl -i -H 'X-API-Key: {trial_key}' {lookup}; done");
    let mut refused = false;
    for _ in 0..4 {
        let result = fetch(&lookup, Some(("X-API-Key", trial_key.as_str()))).await;
        refused = matches!(&result, Ok((status, _, _)) if *status == StatusCode::TOO_MANY_REQUESTS);
        ok &= show(result);
    }
    ok &= refused;
    println!();
    println!(
        "  # today's usage per key, from the admin API (also: TOLLGATE_ADMIN_TOKEN={token} tollgate usage --admin-url http://{admin})"
    );
    println!("  curl -H 'Authorization: Bearer {token}' 'http://{admin}/v1/usage?window=day&format=csv'");
    let report = format!("http://{admin}/v1/usage?window=day&format=csv");
    match fetch(&report, Some(("Authorization", admin_auth.as_str()))).await {
        Ok((status, _, body)) if status.is_success() => body.lines().for_each(|line| println!("  {line}")),
        other => ok &= show(other),
    }
    println!();
    let logs = running.gateway.snapshot().config.logs.as_ref().map(|l| l.dir.clone());
    if let Some(dir) = logs {
        println!("  # the access log: one record per request (docs/access-logs.md)");
        println!("  tollgate logs --dir {} --format table", dir.display());
        // Workers hand their records over every flush interval.
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        print_access_log(&dir);
        println!();
    }
    if args.once {
        running.stop().await;
        return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    println!("Serving; press Ctrl-C to stop.");
    running.run_until_signalled(signals).await?;
    Ok(ExitCode::SUCCESS)
}

fn free_or_any(addr: SocketAddr) -> SocketAddr {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => addr,
        Err(_) => SocketAddr::new(addr.ip(), 0),
    }
}

fn demo_config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    token: &str,
    dir: &std::path::Path,
) -> String {
    let data_dir: PathBuf = dir.join("data");
    format!(
        r#"# Generated by `tollgate demo`.
data_dir = "{data}"

[server]
listen = ["{listen}"]

[admin]
listen = "{admin}"
token = "{token}"

[upstreams.geo]
endpoints = ["{upstream}"]
lb = "round_robin"

[[routes]]
name = "lookup"
path = "/v1/lookup"
methods = ["GET", "HEAD"]
upstream = "geo"
auth = ["api_key", "anonymous"]

[plans.free]
rate = {{ per_second = 5, burst = 10 }}
daily = 1000

[plans.trial]
daily = 3

# The no-sign-up tier: each client IP and each Referer host gets 100 calls a day.
[plans.anonymous]
rate = {{ per_second = 2, burst = 5 }}
daily = 100

[anonymous]
plan = "anonymous"
by = ["ip", "referer"]

[usage]
flush_interval = "200ms"

# Each key's own usage page: http://{listen}/usage?api_key=... (docs/customer-usage.md).
[usage_page]
path = "/usage"

[logs]
dir = "{data}/logs"
flush_interval = "200ms"
"#,
        data = data_dir.display()
    )
}

/// The records written so far, as `tollgate logs --format table` prints them.
fn print_access_log(dir: &std::path::Path) {
    use crate::logs::read;
    println!("  {}", read::table_header());
    for segment in read::local_segments(dir).unwrap_or_default() {
        let (records, _) = read::decode_frames(&std::fs::read(&segment).unwrap_or_default());
        for line in records.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(record) = serde_json::from_slice::<serde_json::Value>(line) {
                println!("  {}", read::table_row(&record));
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Fetched = (StatusCode, http::HeaderMap, String);

async fn fetch(url: &str, header: Option<(&str, &str)>) -> Result<Fetched, BoxError> {
    let mut request = Request::get(url);
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    send(request.body(Full::new(Bytes::new()))?).await
}

async fn send(request: Request<Full<Bytes>>) -> Result<Fetched, BoxError> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client.request(request).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// Prints the answer's status, limit headers and first line; false on a failure.
fn show(result: Result<Fetched, BoxError>) -> bool {
    match result {
        Ok((status, headers, body)) => {
            let first_line = body
                .lines()
                .find(|l| !l.starts_with('#'))
                .unwrap_or("")
                .chars()
                .take(160)
                .collect::<String>();
            println!("  → {status} {first_line}");
            for name in ["ratelimit-policy", "ratelimit", "retry-after"] {
                if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) {
                    println!("      {name}: {value}");
                }
            }
            status.is_success() || status.is_client_error()
        }
        Err(error) => {
            println!("  → failed: {error}");
            false
        }
    }
}

/// Creates a consumer on `plan` and a key for it, through the admin API.
async fn demo_key(admin: SocketAddr, token: &str, consumer: &str, plan: &str) -> Result<String, BoxError> {
    let post = |path: &str, body: serde_json::Value| {
        Request::post(format!("http://{admin}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
    };
    let (status, _, text) = send(post(
        "/v1/consumers",
        serde_json::json!({"id": consumer, "plan": plan}),
    )?)
    .await?;
    if !status.is_success() && status != StatusCode::CONFLICT {
        return Err(format!("{status}: {text}").into());
    }
    let (status, _, text) = send(post("/v1/keys", serde_json::json!({"consumer": consumer}))?).await?;
    if !status.is_success() {
        return Err(format!("{status}: {text}").into());
    }
    let created: serde_json::Value = serde_json::from_str(&text)?;
    created["key"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "no key in the answer".into())
}

/// The built-in example API: `GET /v1/lookup/{ip}` returns a made-up location.
pub async fn start_example_upstream() -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    service_fn(|req: Request<Incoming>| async move { Ok::<_, Infallible>(example_api(&req)) });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn example_api(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const PLACES: [(&str, &str, f64, f64); 5] = [
        ("US", "Mountain View", 37.386, -122.084),
        ("DE", "Berlin", 52.52, 13.405),
        ("JP", "Tokyo", 35.676, 139.65),
        ("BR", "São Paulo", -23.55, -46.633),
        ("ZA", "Cape Town", -33.925, 18.424),
    ];
    let path = req.uri().path();
    let Some(ip) = path
        .rsplit('/')
        .next()
        .filter(|s| s.parse::<std::net::IpAddr>().is_ok())
    else {
        let body = crate::base::error_body("invalid_ip", "expected /v1/lookup/{ip}", "");
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let index = ip
        .bytes()
        .fold(0usize, |acc, b| acc.wrapping_mul(31).wrapping_add(b as usize))
        % PLACES.len();
    let (country, city, lat, lon) = PLACES[index];
    let body = serde_json::json!({
        "ip": ip, "country": country, "city": city, "latitude": lat, "longitude": lon,
        "served_by": "tollgate-demo-upstream",
        "consumer": req.headers().get("x-consumer-id").and_then(|v| v.to_str().ok()),
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    response
        .headers_mut()
        .insert("content-type", http::HeaderValue::from_static("application/json"));
    response
}
