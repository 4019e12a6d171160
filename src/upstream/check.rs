//! Active health checks: one probe per endpoint every `health.interval` (jittered), HTTP
//! or TCP, run as a background task that follows configuration reloads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::health::now_ms;
use super::{Endpoint, Pool, UpstreamTls};
use crate::base::{Shutdown, stopped};
use crate::config::{HealthKind, HealthSection};

/// Probes one address; true when healthy. `tls`: the pool's TLS settings and the name to
/// verify, so a check sees what requests see.
pub async fn probe(
    addr: std::net::SocketAddr,
    host: &str,
    check: &HealthSection,
    tls: Option<(&UpstreamTls, ServerName<'static>)>,
) -> bool {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        match tls {
            None if check.kind == HealthKind::Tcp => Some(true),
            None => http_status(stream, host, check).await,
            Some((tls, name)) => {
                let stream = tls.connector.connect(name, stream).await.ok()?;
                if check.kind == HealthKind::Tcp {
                    return Some(true);
                }
                http_status(stream, host, check).await
            }
        }
    };
    matches!(tokio::time::timeout(check.timeout, attempt).await, Ok(Some(true)))
}

/// Sends the check's request on `stream`; whether the status is one it expects.
async fn http_status<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    check: &HealthSection,
) -> Option<bool> {
    let request = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: tollgate-health-check\r\nConnection: close\r\n\r\n",
        check.method,
        check.path,
        check.host.as_deref().unwrap_or(host)
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream.read(&mut head[read..]).await.ok()?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let line = std::str::from_utf8(&head[..read]).ok()?;
    let status: u16 = line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()?;
    Some(if check.expected_statuses.is_empty() {
        (200..400).contains(&status)
    } else {
        check.expected_statuses.contains(&status)
    })
}

/// Checks every endpoint of every pool that has a `[health]` section, each at its own
/// interval with ±10 % jitter, until `shutdown` turns.
pub async fn run(mut pools: impl FnMut() -> Vec<Arc<Pool>>, mut shutdown: Shutdown) {
    let mut due: HashMap<usize, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stopped(&mut shutdown) => return,
        }
        let now = Instant::now();
        let mut live = Vec::new();
        for pool in pools() {
            let Some(check) = &pool.health_check else {
                continue;
            };
            for endpoint in &pool.endpoints {
                // Endpoints are shared across reloads, so their schedule is too.
                let key = Arc::as_ptr(endpoint) as usize;
                live.push(key);
                let next = due.entry(key).or_insert(now);
                if *next > now {
                    continue;
                }
                let jitter = 0.9 + fastrand::f64() * 0.2;
                *next = now + check.interval.mul_f64(jitter);
                tokio::spawn(check_endpoint(pool.clone(), endpoint.clone(), check.clone()));
            }
        }
        // Endpoints a reload removed are forgotten.
        due.retain(|key, _| live.contains(key));
    }
}

async fn check_endpoint(pool: Arc<Pool>, endpoint: Arc<Endpoint>, check: HealthSection) {
    let Some(target) = endpoint.target() else { return };
    let tls = match pool.tls.as_deref() {
        Some(tls) => match tls.name_for(&endpoint) {
            Some(name) => Some((tls, name)),
            // No name to verify: the check fails as a request would.
            None => return record(&pool, &endpoint, &check, false),
        },
        None => None,
    };
    let ok = probe(target, &endpoint.address, &check, tls).await;
    record(&pool, &endpoint, &check, ok);
}

fn record(pool: &Pool, endpoint: &Endpoint, check: &HealthSection, ok: bool) {
    let transition = endpoint
        .health
        .record_active(ok, check.healthy_threshold, check.unhealthy_threshold, now_ms());
    if let Some(transition) = transition {
        pool.report(endpoint, transition);
    }
}
