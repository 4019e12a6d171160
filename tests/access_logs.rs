//! Access logs end to end (docs/access-logs.md): real gateway processes, real upstreams,
//! the `zstd` CLI, DuckDB, a real S3-compatible server (moto) and a real full disk.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::Request;
use serde_json::json;

fn logs_config(upstream: &Upstream, logs: &str) -> String {
    format!(
        r#"{base}
[upstreams.api]
endpoints = ["{addr}"]

[[routes]]
name = "keyed"
path = "/v1"
upstream = "api"
auth = ["api_key"]

[[routes]]
name = "open"
path = "/public"
upstream = "api"

[[routes]]
name = "count"
path = "/count"
upstream = "api"

[plans.default]
rate = {{ per_second = 1000000 }}

[plans.tiny]
daily = 100

{logs}
"#,
        base = base_config(),
        addr = upstream.addr,
    )
}

/// Every record in the segments of `dir` (closed and open), decompressed by the `zstd`
/// CLI, which must accept every closed segment.
fn records_by_cli(dir: &Path) -> Vec<serde_json::Value> {
    let mut records = Vec::new();
    for path in segment_files(dir) {
        let output = Command::new("zstd").arg("-dc").arg(&path).output().expect("zstd CLI");
        assert!(
            output.status.success(),
            "zstd -dc {}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        for line in output.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            records.push(serde_json::from_slice(line).expect("every line is JSON"));
        }
    }
    records
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".ndjson.zst"))
        .collect();
    files.sort();
    files
}

/// Every byte of every file under `dir`, raw and (for segments) decompressed.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let raw = std::fs::read(&path).unwrap();
        if path.to_string_lossy().contains(".ndjson.zst") {
            bytes.extend_from_slice(&tollgate::logs::read::decode_frames(&raw).0);
        }
        bytes.extend_from_slice(&raw);
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn stop(gateway: &mut Gateway) {
    gateway.signal(15);
    let status = gateway.wait_exit(Duration::from_secs(60)).expect("graceful stop");
    assert!(status.success(), "{}", gateway.stderr());
}

/// `requests` GETs of `path` with `headers`, `concurrency` at a time; returns statuses.
async fn load(
    gateway: &Gateway,
    path: &str,
    headers: Vec<(&'static str, String)>,
    requests: usize,
    concurrency: usize,
) -> Vec<u16> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, url, headers) = (next.clone(), gateway.url(path), headers.clone());
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut statuses = Vec::new();
            while (next.fetch_add(1, Ordering::Relaxed) as usize) < requests {
                let mut request = Request::get(&url);
                for (name, value) in &headers {
                    request = request.header(*name, value);
                }
                let response = client.request(request.body(full("")).unwrap()).await.expect("request");
                let status = response.status().as_u16();
                let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                statuses.push(status);
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.extend(task.await.unwrap());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_recorded_rotated_readable_and_free_of_secrets() {
    let upstream = Upstream::start("api").await;
    let mut gateway = Gateway::start(&logs_config(
        &upstream,
        "[logs]\ndir = \"logs\"\nflush_interval = \"200ms\"\nmax_segment_bytes = 65536\n",
    ));
    let dir = gateway.dir.path().join("logs");
    for (consumer, plan) in [("acme", "default"), ("small", "tiny")] {
        let reply = admin_json(&gateway, "POST", "/v1/consumers", json!({"id": consumer, "plan": plan})).await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let (good_id, good_key) = create_key(&gateway, json!({"consumer": "acme"})).await;
    let (tiny_id, tiny_key) = create_key(&gateway, json!({"consumer": "small"})).await;

    // 100,000 requests: keyed successes, a plan that runs out, no key, a wrong key, a
    // public route with a cookie, and credentials in the query.
    let good = load(
        &gateway,
        "/v1/lookup",
        vec![("x-api-key", good_key.clone())],
        90_000,
        16,
    )
    .await;
    assert!(good.iter().all(|s| *s == 200));
    let tiny = load(
        &gateway,
        "/v1/lookup",
        vec![("authorization", format!("Bearer {tiny_key}"))],
        4_000,
        4,
    )
    .await;
    assert_eq!(tiny.iter().filter(|s| **s == 200).count(), 100);
    assert_eq!(tiny.iter().filter(|s| **s == 429).count(), 3_900);
    let none = load(&gateway, "/v1/lookup", vec![], 2_000, 4).await;
    assert!(none.iter().all(|s| *s == 401));
    let wrong = load(
        &gateway,
        "/v1/lookup",
        vec![("x-api-key", "tg_live_wrongwrongwrongwrong".into())],
        2_000,
        4,
    )
    .await;
    assert!(wrong.iter().all(|s| *s == 401));
    let cookie = load(
        &gateway,
        "/public/page",
        vec![("cookie", "session=cookie-secret-value".into())],
        1_000,
        4,
    )
    .await;
    assert!(cookie.iter().all(|s| *s == 200));
    let query = load(
        &gateway,
        &format!("/v1/lookup?api_key={good_key}&q=1"),
        vec![],
        1_000,
        4,
    )
    .await;
    assert!(query.iter().all(|s| *s == 200));
    stop(&mut gateway);

    let records = records_by_cli(&dir);
    assert_eq!(records.len(), 100_000, "one record per request after a graceful stop");
    let closed = segment_files(&dir);
    assert!(closed.len() >= 3, "rotation by size made several segments: {closed:?}");
    assert!(
        closed.iter().all(|p| p.to_string_lossy().ends_with(".ndjson.zst")),
        "all closed at stop"
    );
    let count = |f: &dyn Fn(&serde_json::Value) -> bool| records.iter().filter(|r| f(r)).count();
    assert_eq!(
        count(&|r| r["key_id"] == good_id.as_str()
            && r["consumer"] == "acme"
            && r["status"] == 200
            && r["decision"] == "admitted"
            && r["auth"] == "api_key"),
        91_000
    );
    assert_eq!(
        count(&|r| r["key_id"] == tiny_id.as_str()
            && r["status"] == 429
            && r["decision"] == "daily"
            && r["error"] == "quota_exceeded"),
        3_900
    );
    assert_eq!(
        count(&|r| r["key_id"] == tiny_id.as_str() && r["status"] == 200 && r["decision"] == "admitted"),
        100
    );
    assert_eq!(
        count(&|r| r["status"] == 401 && r["key_id"].is_null() && r["decision"].is_null()),
        4_000
    );
    assert_eq!(
        count(&|r| r["route"] == "open" && r["auth"] == "none" && r["status"] == 200),
        1_000
    );
    let sample = records
        .iter()
        .find(|r| r["status"] == 200 && r["route"] == "keyed")
        .unwrap();
    for field in [
        "time",
        "request_id",
        "node",
        "client_ip",
        "method",
        "path",
        "upstream",
        "latency_ms",
        "upstream_latency_ms",
    ] {
        assert!(!sample[field].is_null(), "{field} in {sample}");
    }
    // A record's latency runs from the head's arrival to the response written out, so it
    // holds the upstream's (sent to answered), whichever clock read ended it.
    for proxied in records.iter().filter(|r| r["status"] == 200 && r["route"] == "keyed") {
        let (total, upstream) = (&proxied["latency_ms"], &proxied["upstream_latency_ms"]);
        assert!(total.as_f64().unwrap() >= upstream.as_f64().unwrap(), "{proxied}");
    }
    assert_eq!(sample["upstream_status"], 200);
    assert_eq!(sample["tries"], 1);
    assert_eq!(sample["completed"], true);
    assert!(sample["bytes_out"].as_u64().unwrap() > 0);
    assert!(sample["query"].is_null(), "the query is not recorded unless configured");

    // Secrets: not in any byte written, compressed or not.
    let bytes = all_bytes(&dir);
    for secret in [
        good_key.as_str(),
        tiny_key.as_str(),
        "tg_live_wrongwrongwrongwrong",
        "cookie-secret-value",
        "Bearer",
    ] {
        assert!(!contains(&bytes, secret), "{secret:?} was written to the access log");
    }

    // `tollgate logs` filters and formats.
    let logs = |args: &[&str]| {
        let output = Command::new(binary())
            .arg("logs")
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(logs(&["--consumer", "small", "--status", "4xx"]).lines().count(), 3_900);
    assert_eq!(
        logs(&["--key", &tiny_id, "--decision", "admitted"]).lines().count(),
        100
    );
    assert_eq!(logs(&["--route", "open", "--limit", "10"]).lines().count(), 10);
    assert_eq!(
        logs(&["--status", "401", "--until", "2000-01-01T00:00:00Z"])
            .lines()
            .count(),
        0
    );
    assert_eq!(logs(&["--status", "401", "--since", "1h"]).lines().count(), 4_000);
    let table = logs(&["--status", "429", "--limit", "3", "--format", "table"]);
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(table.lines().next().unwrap().contains("status"), "{table}");
    assert!(table.lines().nth(1).unwrap().contains(" 429 GET"), "{table}");

    // DuckDB reads the same files (the query in docs/access-logs.md).
    let query = format!(
        "SELECT status, decision, count(*) AS n FROM read_ndjson('{}/*.ndjson.zst') GROUP BY ALL ORDER BY n DESC",
        dir.display()
    );
    let output = Command::new("python3")
        .args([
            "-c",
            "import duckdb,sys,json; print(json.dumps(duckdb.sql(sys.argv[1]).fetchall()))",
            &query,
        ])
        .output()
        .expect("python3");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: Vec<(u16, Option<String>, u64)> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(rows[0], (200, Some("admitted".to_string()), 92_100), "{rows:?}");
    assert!(rows.contains(&(429, Some("daily".to_string()), 3_900)), "{rows:?}");
    assert!(rows.contains(&(401, None, 4_000)), "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_at_most_about_one_flush_interval() {
    let upstream = Upstream::start("api").await;
    let config = logs_config(&upstream, "[logs]\ndir = \"logs\"\nflush_interval = \"200ms\"\n");
    let mut gateway = Gateway::start(&config);
    let dir = gateway.dir.path().join("logs");
    let answered = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (answered, running, url) = (answered.clone(), running.clone(), gateway.url("/public/x"));
        tasks.push(tokio::spawn(async move {
            let client = client();
            while running.load(Ordering::Relaxed) {
                match client.request(Request::get(&url).body(full("")).unwrap()).await {
                    Ok(response) => {
                        if http_body_util::BodyExt::collect(response.into_body()).await.is_ok() {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = answered.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rate = (answered.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64();
    gateway.signal(9);
    gateway.wait_exit(Duration::from_secs(10)).expect("killed");
    running.store(false, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let answered = answered.load(Ordering::Relaxed);
    // What the open segment holds, read as `tollgate logs` does (complete frames).
    let mut written = 0;
    for path in segment_files(&dir) {
        let (records, _) = tollgate::logs::read::decode_frames(&std::fs::read(&path).unwrap());
        written += records.iter().filter(|b| **b == b'\n').count() as u64;
    }
    let lost = answered.saturating_sub(written);
    let interval_worth = rate * 0.2;
    println!(
        "kill -9: {answered} answered, {written} recorded, {lost} lost; {rate:.0} req/s, one 200 ms interval = {interval_worth:.0} records"
    );
    assert!(
        written > 0 && written <= answered + 8,
        "{written} recorded of {answered}"
    );
    // Bounded generously (×2 and +50): the machine is shared by the load, the gateway and
    // the test, so a flush tick can run late.
    assert!(
        (lost as f64) <= interval_worth * 2.0 + 50.0,
        "lost {lost} records, one flush interval is {interval_worth:.0}"
    );

    // The next start recovers the open segment: closed, whole, readable by the CLI.
    let mut restarted = Gateway::start(&config.replace("dir = \"logs\"", &format!("dir = \"{}\"", dir.display())));
    stop(&mut restarted);
    assert!(
        segment_files(&dir)
            .iter()
            .all(|p| p.to_string_lossy().ends_with(".ndjson.zst"))
    );
    assert_eq!(records_by_cli(&dir).len() as u64, written);
}

/// A tmpfs of `kib` KiB at `path`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, kib: u32) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(path)
            .status()
            .expect("mount");
        assert!(status.success(), "this test mounts a small tmpfs (it needs root)");
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_counted_records_and_never_a_request() {
    let upstream = Upstream::start("api").await;
    let mount = tempfile::tempdir().unwrap();
    let _tmpfs = Tmpfs::mount(mount.path(), 256);
    let gateway = Gateway::start(&logs_config(
        &upstream,
        &format!(
            "[logs]\ndir = \"{}\"\nflush_interval = \"50ms\"\nmax_segment_bytes = 65536\n",
            mount.path().display()
        ),
    ));
    // Paths that do not compress well fill the disk sooner.
    let mut answered = 0;
    for round in 0..60 {
        let path = format!("/public/{round}-{}", fastrand_hex(400));
        let statuses = load(&gateway, &path, vec![], 500, 8).await;
        assert!(statuses.iter().all(|s| *s == 200), "the proxy kept answering");
        answered += statuses.len();
        if metric(&gateway, "tollgate_access_log_dropped_total{reason=\"disk\"}").await > 0 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dropped = metric(&gateway, "tollgate_access_log_dropped_total{reason=\"disk\"}").await;
    let written = metric(&gateway, "tollgate_access_log_records_total").await;
    println!("disk full: {answered} answered, {written} written, {dropped} dropped (counted)");
    assert!(dropped > 0, "the disk filled up and drops were counted");
    let ready = admin(&gateway, "GET", "/readyz").await;
    assert_eq!(ready.status, 200, "the proxy stays ready");
    let detail = ready.json();
    assert_eq!(detail["access_log"]["status"], "dropping", "{detail}");
    assert!(
        detail["access_log"]["write"]["error"]
            .as_str()
            .unwrap()
            .contains("No space"),
        "{detail}"
    );
    // Still answering once full.
    assert_eq!(call(&gateway, "/public/after", None).await.status, 200);
}

fn fastrand_hex(len: usize) -> String {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            char::from(b"0123456789abcdef"[(seed % 16) as usize])
        })
        .collect()
}

/// A moto S3 server on a free loopback port.
struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]')");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }

    fn python(&self, code: &str) -> String {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', region_name='us-east-1', aws_access_key_id='test', aws_secret_access_key='test')\n{code}",
            self.port
        );
        let output = Command::new("python3").args(["-c", &script]).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    fn keys(&self) -> Vec<String> {
        self.python("for page in s3.get_paginator('list_objects_v2').paginate(Bucket='logs'):\n    [print(o['Key']) for o in page.get('Contents', [])]")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn signal(&self, signal: &str) {
        assert!(
            Command::new("kill")
                .args([signal, &self.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for(what: &str, timeout: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_reach_s3_and_an_outage_only_grows_the_spool() {
    let moto = Moto::start();
    moto.python("s3.create_bucket(Bucket='logs')");
    let upstream = Upstream::start("api").await;
    let logs = format!(
        r#"[logs]
dir = "logs"
flush_interval = "100ms"
max_segment_age = "1s"

[logs.upload]
url = "s3://logs/edge/prod"
interval = "200ms"
shutdown_timeout = "20s"
options = {{ endpoint = "http://127.0.0.1:{port}", allow_http = "true", region = "us-east-1", access_key_id = "test", secret_access_key = "test", timeout = "2s", connect_timeout = "1s" }}
"#,
        port = moto.port
    );
    let mut gateway = Gateway::start(&logs_config(&upstream, &logs));
    let dir = gateway.dir.path().join("logs");
    assert_eq!(load(&gateway, "/public/a", vec![], 2_000, 8).await.len(), 2_000);
    wait_for("a first upload", Duration::from_secs(30), async || {
        metric(&gateway, "tollgate_access_log_segments_uploaded_total").await > 0
    })
    .await;
    let keys = moto.keys();
    let layout = |key: &str| {
        let parts: Vec<&str> = key.split('/').collect();
        parts.len() == 7
            && parts[..2] == ["edge", "prod"]
            && parts[2].len() == 4
            && [parts[3], parts[4], parts[5]]
                .iter()
                .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit()))
            && parts[6].ends_with(".ndjson.zst")
            && tollgate::logs::segment::parse_name(&{
                // `<node>-<stamp>.ndjson.zst` back to the local `<stamp>-<node>` form.
                let stem = parts[6].trim_end_matches(".ndjson.zst");
                let (node, stamp) = stem.rsplit_once('-').unwrap();
                format!("{stamp}-{node}.ndjson.zst")
            })
            .is_some()
    };
    assert!(!keys.is_empty() && keys.iter().all(|k| layout(k)), "{keys:?}");

    // The store stops answering: uploads fail, the spool grows, nothing is lost.
    moto.signal("-STOP");
    assert_eq!(load(&gateway, "/public/b", vec![], 3_000, 8).await.len(), 3_000);
    wait_for("failed uploads", Duration::from_secs(30), async || {
        metric(&gateway, "tollgate_access_log_upload_failures_total").await > 0
    })
    .await;
    wait_for("a spool", Duration::from_secs(30), async || {
        metric(&gateway, "tollgate_access_log_spool_segments").await > 0
    })
    .await;
    let ready = admin(&gateway, "GET", "/readyz").await.json();
    assert!(ready["access_log"]["upload"]["error"].is_string(), "{ready}");
    let spooled = segment_files(&dir).len();
    assert!(spooled > 0);

    // Back: the spool drains.
    moto.signal("-CONT");
    wait_for("the spool to drain", Duration::from_secs(60), async || {
        metric(&gateway, "tollgate_access_log_spool_segments").await == 0
    })
    .await;
    stop(&mut gateway);
    assert!(
        segment_files(&dir).is_empty(),
        "every segment uploaded, then deleted locally"
    );

    // Everything arrived: read back through `tollgate logs --url`.
    let output = Command::new(binary())
        .args(["logs", "--url", "s3://logs/edge/prod"])
        .args(["--option", &format!("endpoint=http://127.0.0.1:{}", moto.port)])
        .args(["--option", "allow_http=true", "--option", "region=us-east-1"])
        .args(["--option", "access_key_id=test", "--option", "secret_access_key=test"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines = String::from_utf8(output.stdout).unwrap();
    assert_eq!(lines.lines().count(), 5_000, "every request's record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_prints_records_as_they_are_flushed() {
    use std::io::BufRead;
    let upstream = Upstream::start("api").await;
    let gateway = Gateway::start(&logs_config(
        &upstream,
        "[logs]\ndir = \"logs\"\nflush_interval = \"100ms\"\n",
    ));
    let mut follower = Command::new(binary())
        .args(["logs", "--follow", "--route", "open", "--config"])
        .arg(&gateway.config_path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if lines.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    for round in 0..2 {
        for i in 0..5 {
            assert_eq!(call(&gateway, &format!("/public/{round}/{i}"), None).await.status, 200);
        }
        assert_eq!(call(&gateway, "/v1/not-followed", None).await.status, 401);
        // Workers flush on their own, so records of different connections may come in
        // any order.
        let mut paths: Vec<String> = (0..5)
            .map(|_| {
                let line = seen.recv_timeout(Duration::from_secs(10)).expect("a followed record");
                let record: serde_json::Value = serde_json::from_str(&line).unwrap();
                record["path"].as_str().unwrap().to_string()
            })
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            (0..5).map(|i| format!("/public/{round}/{i}")).collect::<Vec<_>>()
        );
    }
    let _ = follower.kill();
    let _ = follower.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_heads_are_recorded_without_their_query() {
    let upstream = Upstream::start("api").await;
    let mut gateway = Gateway::start(&logs_config(
        &upstream,
        "[logs]\ndir = \"logs\"\nflush_interval = \"100ms\"\n",
    ));
    let dir = gateway.dir.path().join("logs");
    let proxy = gateway.proxy;
    let refused = tokio::task::spawn_blocking(move || {
        [
            raw_exchange(
                proxy,
                b"GET /a<b?api_key=tg_live_secretinquery HTTP/1.1\r\nHost: x\r\n\r\n",
                Duration::from_secs(5),
            ),
            raw_exchange(
                proxy,
                b"POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                Duration::from_secs(5),
            ),
        ]
    })
    .await
    .unwrap();
    assert!(refused.iter().all(|r| r.starts_with("HTTP/1.1 400")), "{refused:?}");
    assert_eq!(call(&gateway, "/public/fine", None).await.status, 200);
    // A chunked body: its size is counted as it streams (the upstream's `/count` reads it
    // whole before answering).
    let chunked = tokio::task::spawn_blocking(move || {
        raw_exchange(
            proxy,
            b"POST /count/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap();
    assert!(chunked.starts_with("HTTP/1.1 200"), "{chunked}\n{}", gateway.stderr());
    stop(&mut gateway);
    let records = records_by_cli(&dir);
    assert_eq!(records.len(), 4, "{records:?}");
    assert_eq!(
        records.iter().find(|r| r["path"] == "/count/chunked").unwrap()["bytes_in"],
        11
    );
    let by_path = |path: &str| {
        records
            .iter()
            .find(|r| r["path"] == path)
            .unwrap_or_else(|| panic!("{path} in {records:?}"))
    };
    let first = by_path("/a<b");
    assert_eq!(first["status"], 400);
    assert_eq!(first["method"], "GET");
    assert_eq!(first["error"], "bad_request");
    assert!(first["query"].is_null());
    assert_eq!(by_path("/smuggle")["method"], "POST");
    assert!(!contains(&all_bytes(&dir), "tg_live_secretinquery"));
    // The same fields as a proxied request's record.
    let keys = |r: &serde_json::Value| r.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(first), keys(by_path("/public/fine")));
    assert_eq!(keys(first).len(), 26, "{:?}", keys(first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_keeps_every_error_and_a_share_of_successes() {
    let upstream = Upstream::start("api").await;
    let mut gateway = Gateway::start(&logs_config(&upstream, "[logs]\ndir = \"logs\"\nsample = 0.1\n"));
    let dir = gateway.dir.path().join("logs");
    assert!(
        load(&gateway, "/public/ok", vec![], 2_000, 8)
            .await
            .iter()
            .all(|s| *s == 200)
    );
    assert!(
        load(&gateway, "/v1/nokey", vec![], 300, 4)
            .await
            .iter()
            .all(|s| *s == 401)
    );
    let sampled_out = metric(&gateway, "tollgate_access_log_sampled_out_total").await;
    stop(&mut gateway);
    let records = records_by_cli(&dir);
    let errors = records.iter().filter(|r| r["status"] == 401).count();
    let successes = records.iter().filter(|r| r["status"] == 200).count() as u64;
    assert_eq!(errors, 300, "errors are always kept");
    assert_eq!(
        successes + sampled_out,
        2_000,
        "every success is either kept or counted"
    );
    // 10 % of 2,000: mean 200, standard deviation ~13; bounded at about ±7 deviations.
    assert!(
        (110..=290).contains(&successes),
        "{successes} of 2000 kept at sample = 0.1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_reach_a_file_destination_with_the_same_layout() {
    let upstream = Upstream::start("api").await;
    let bucket = tempfile::tempdir().unwrap();
    let logs = format!(
        "[logs]\ndir = \"logs\"\nflush_interval = \"100ms\"\nmax_segment_age = \"1s\"\n\n[logs.upload]\nurl = \"file://{}/archive\"\ninterval = \"200ms\"\n",
        bucket.path().display()
    );
    let mut gateway = Gateway::start(&logs_config(&upstream, &logs));
    assert_eq!(load(&gateway, "/public/a", vec![], 500, 4).await.len(), 500);
    stop(&mut gateway);
    // Everything uploaded at the graceful stop, under prefix/YYYY/MM/DD/HH/.
    let mut uploaded = Vec::new();
    let mut stack = vec![bucket.path().join("archive")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                uploaded.push(path);
            }
        }
    }
    assert!(!uploaded.is_empty());
    let mut records = 0;
    for path in &uploaded {
        let relative = path.strip_prefix(bucket.path().join("archive")).unwrap();
        assert_eq!(
            relative.components().count(),
            5,
            "YYYY/MM/DD/HH/<node>-<stamp>.ndjson.zst: {relative:?}"
        );
        let (ndjson, _) = tollgate::logs::read::decode_frames(&std::fs::read(path).unwrap());
        records += ndjson.iter().filter(|b| **b == b'\n').count();
    }
    assert_eq!(records, 500);
    assert!(
        segment_files(&gateway.dir.path().join("logs")).is_empty(),
        "the spool is empty"
    );
}
