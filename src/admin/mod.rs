//! The admin API (axum) on its own listener: probes, metrics and configuration reload.
//! Everything except `/healthz` and `/readyz` requires `Authorization: Bearer <token>`
//! when `[admin] token` is set.

mod console;
mod state_api;
mod usage_api;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use serde_json::json;
use state_api as api;
use tokio::sync::watch;

use crate::base::{error_body, new_request_id};
use crate::gateway::{Gateway, Snapshot};

#[derive(Clone)]
pub(crate) struct AdminState {
    gateway: Arc<Gateway>,
    token: Option<Arc<str>>,
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    let token = gateway
        .snapshot()
        .config
        .admin
        .token
        .clone()
        .filter(|t| !t.is_empty())
        .map(Arc::from);
    let state = AdminState { gateway, token };
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/reload", post(reload))
        .route("/v1/plans", get(api::list_plans).post(api::create_plan))
        .route(
            "/v1/plans/{name}",
            get(api::get_plan).put(api::put_plan).delete(api::delete_plan),
        )
        .route("/v1/consumers", get(api::list_consumers).post(api::create_consumer))
        .route(
            "/v1/consumers/{id}",
            get(api::get_consumer)
                .patch(api::update_consumer)
                .delete(api::delete_consumer),
        )
        .route("/v1/keys", get(api::list_keys).post(api::create_key))
        .route(
            "/v1/keys/{id}",
            get(api::get_key).patch(api::update_key).delete(api::revoke_key),
        )
        .route("/v1/upstreams", get(upstreams))
        .route("/v1/usage", get(usage_api::usage_report))
        .route("/v1/usage/top", get(usage_api::usage_top))
        .route("/v1/traffic", get(console::traffic))
        .route("/v1/cluster", get(console::cluster))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // The console's files hold no data; what they show is read with the token.
        .route("/console", get(console::index))
        .route("/console/", get(console::index))
        .route("/console/app.js", get(console::script))
        .route("/console/app.css", get(console::style))
        .route("/console/icon.svg", get(console::icon))
        .merge(protected)
        .fallback(not_found)
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` turns true; over HTTPS when `tls`
/// is given (`[admin] tls`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<Arc<crate::tls::ServerTls>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = router(gateway);
    let stop = async move { crate::base::stopped(&mut shutdown).await };
    let result = match tls {
        Some(tls) => {
            axum::serve(TlsListener { tcp: listener, tls }, app)
                .with_graceful_shutdown(stop)
                .await
        }
        None => axum::serve(listener, app).with_graceful_shutdown(stop).await,
    };
    if let Err(error) = result {
        tracing::error!(%error, "admin listener failed");
    }
}

/// The admin listener over TLS: each accepted connection is handed on once its handshake
/// completes (within 10 s); failed handshakes are skipped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    tls: Arc<crate::tls::ServerTls>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = match self.tcp.accept().await {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            };
            let handshake = self.tls.acceptor().accept(stream);
            match tokio::time::timeout(std::time::Duration::from_secs(10), handshake).await {
                Ok(Ok(stream)) => return (stream, peer),
                Ok(Err(error)) => tracing::debug!(%peer, %error, "admin TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// The JSON error body of docs/operations.md, shared with the proxy's.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let request_id = new_request_id();
    let body = error_body(code, message, request_id.as_str());
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.token {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            return json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid admin token",
            );
        }
    }
    next.run(request).await
}

/// Compares without an early exit, so timing does not reveal how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[utoipa::path(get, path = "/healthz", security(()), responses((status = 200, description = "The process is up")))]
async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", security(()), responses((status = 200, description = "Serving"), (status = 503, body = ErrorBody)))]
async fn readyz(State(state): State<AdminState>) -> Response {
    if state.gateway.is_ready() {
        // The access log failing does not stop the proxy: ready, with the detail.
        match state.gateway.access_log.as_ref().and_then(|log| log.stats.health()) {
            Some(access_log) => axum::Json(json!({"status": "ready", "access_log": access_log})).into_response(),
            None => axum::Json(json!({"status": "ready"})).into_response(),
        }
    } else {
        json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the gateway is starting or stopping",
        )
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut text = state.gateway.metrics.render();
    render_endpoints(&state.gateway.snapshot(), &mut text);
    if let Some(log) = &state.gateway.access_log {
        log.stats.render(&mut text);
    }
    if let Some(tls) = &state.gateway.tls {
        render_tls(tls, &mut text);
    }
    if let Some(replica) = state.gateway.replica.clone() {
        // Backend lines may read the local store: off the async runtime.
        text = tokio::task::spawn_blocking(move || {
            replica.render_metrics(&mut text);
            text
        })
        .await
        .unwrap_or_default();
    }
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Per-endpoint gauges: whether it takes traffic, and its breaker state.
fn render_endpoints(snapshot: &Snapshot, out: &mut String) {
    use std::fmt::Write;
    let now = crate::upstream::health::now_ms();
    crate::metrics::describe(
        out,
        "tollgate_upstream_endpoint_available",
        "gauge",
        "1 when the endpoint takes traffic (resolved, healthy, not ejected).",
    );
    crate::metrics::describe(
        out,
        "tollgate_upstream_breaker_state",
        "gauge",
        "The endpoint's breaker: 0 closed, 1 half-open, 2 open.",
    );
    for upstream in snapshot.pools.values() {
        let pool = &upstream.pool;
        for e in &pool.endpoints {
            let available = e.is_resolved() && !e.health.is_active_down() && !e.health.is_ejected(now);
            let breaker = match e.health.breaker_state(now) {
                "closed" => 0,
                "half_open" => 1,
                _ => 2,
            };
            let labels = format!("upstream=\"{}\",endpoint=\"{}\"", pool.name, e.address);
            let _ = writeln!(
                out,
                "tollgate_upstream_endpoint_available{{{labels}}} {}",
                u8::from(available)
            );
            let _ = writeln!(out, "tollgate_upstream_breaker_state{{{labels}}} {breaker}");
        }
    }
}

/// The listener's certificates (seconds until each expires) and handshake counts.
fn render_tls(tls: &crate::tls::ServerTls, out: &mut String) {
    use std::fmt::Write;
    let now = crate::auth::unix_now();
    crate::metrics::describe(
        out,
        "tollgate_tls_cert_expiry_seconds",
        "gauge",
        "Seconds until the certificate expires (negative once it has), by its first name.",
    );
    for cert in tls.certificates().iter() {
        let _ = writeln!(
            out,
            "tollgate_tls_cert_expiry_seconds{{name=\"{}\"}} {}",
            cert.label.replace('\\', "\\\\").replace('"', "\\\""),
            cert.not_after - now
        );
    }
    let (ok, failed, reloads_failed) = tls.counts();
    crate::metrics::describe(
        out,
        "tollgate_tls_handshakes_total",
        "counter",
        "TLS handshakes on the proxy listeners, by result.",
    );
    let _ = writeln!(out, "tollgate_tls_handshakes_total{{result=\"success\"}} {ok}");
    let _ = writeln!(out, "tollgate_tls_handshakes_total{{result=\"failure\"}} {failed}");
    crate::metrics::single(
        out,
        "tollgate_tls_reloads_failed_total",
        "counter",
        "Certificate reloads refused (bad files); the running certificates stayed.",
        reloads_failed,
    );
}

/// Every pool's endpoints with their health, breaker state and load.
#[utoipa::path(get, path = "/v1/upstreams", responses((status = 200, description = "Pools and endpoints: `healthy` (active checks), `breaker` (closed/open/half_open), `inflight`, `consecutive_failures`, `failures`, `ejections`")))]
async fn upstreams(State(state): State<AdminState>) -> Response {
    let snapshot = state.gateway.snapshot();
    let now = crate::upstream::health::now_ms();
    let pools: Vec<serde_json::Value> = snapshot
        .pools
        .values()
        .map(|upstream| {
            let pool = &upstream.pool;
            let endpoints: Vec<serde_json::Value> = pool
                .endpoints
                .iter()
                .map(|e| {
                    json!({
                        "address": e.address,
                        "weight": e.weight,
                        "resolved": e.resolved_addrs(),
                        "healthy": !e.health.is_active_down(),
                        "breaker": e.health.breaker_state(now),
                        "available": e.is_resolved() && !e.health.is_active_down() && !e.health.is_ejected(now),
                        "inflight": e.inflight(),
                        "consecutive_failures": e.health.consecutive_failures(),
                        "failures": e.health.total_failures.load(std::sync::atomic::Ordering::Relaxed),
                        "ejections": e.health.ejections(),
                    })
                })
                .collect();
            json!({
                "name": pool.name,
                "active_checks": pool.health_check.is_some(),
                "endpoints": endpoints,
            })
        })
        .collect();
    axum::Json(json!({ "upstreams": pools })).into_response()
}

#[utoipa::path(post, path = "/v1/reload", responses((status = 200, description = "Reloaded"), (status = 400, description = "Invalid configuration; `error.details` lists every error", body = ErrorBody)))]
async fn reload(State(state): State<AdminState>) -> Response {
    match state.gateway.reload().await {
        Ok(()) => axum::Json(json!({"status": "reloaded"})).into_response(),
        Err(errors) => {
            let details: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            let body = json!({
                "error": {
                    "code": "invalid_config",
                    "message": "configuration rejected; the running configuration is unchanged",
                    "request_id": new_request_id().as_str(),
                    "details": details,
                }
            });
            (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
        }
    }
}

/// The JSON error body every endpoint uses (docs/operations.md).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    code: String,
    message: String,
    request_id: String,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Tollgate admin API", description = "Plans, consumers, API keys, usage reports, probes and reload."),
    paths(
        healthz, readyz, reload, upstreams,
        api::list_plans, api::get_plan, api::create_plan, api::put_plan, api::delete_plan,
        api::list_consumers, api::get_consumer, api::create_consumer, api::update_consumer, api::delete_consumer,
        api::list_keys, api::get_key, api::create_key, api::update_key, api::revoke_key,
        usage_api::usage_report, usage_api::usage_top,
        console::traffic, console::cluster,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new("admin_token", Vec::<String>::new())]);
        document_common_errors(openapi);
    }
}

/// Every `/v1` operation can answer a missing token (401), unreadable input (400) and an
/// unreachable shared state (503) with the JSON error body; the handlers' annotations list
/// only what is particular to them. A schema-driven fuzzer (`tests/admin_schema.rs`)
/// holds the server to this document.
fn document_common_errors(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
    };
    let common = [
        ("400", "Malformed input (the JSON error body says which)"),
        ("401", "Missing or invalid admin token"),
        ("503", "The shared state cannot be reached; retry"),
    ];
    for (path, item) in openapi.paths.paths.iter_mut() {
        if !path.starts_with("/v1/") {
            continue;
        }
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            for (status, description) in common {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| error(description).into());
            }
        }
    }
}

/// The OpenAPI 3.1 document of this API, generated from the handlers' annotations.
async fn openapi() -> Response {
    axum::Json(<ApiDoc as utoipa::OpenApi>::openapi()).into_response()
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
