//! The operator console (docs/console.md): a page, a script and a style sheet embedded in
//! the binary and served at `/console`, plus the two reads only it needs — the last hour
//! of traffic and the cluster's state. The page holds no data: the script asks the admin
//! API for everything, with the token the operator typed into its login form (kept in the
//! tab's `sessionStorage`, sent as `Authorization: Bearer`, never put in a URL).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AdminState, json_error};

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");
const ICON: &str = include_str!("icon.svg");

/// Everything the page loads comes from this listener; nothing may frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    // The assets change with the binary: a browser revalidates rather than keep an old
    // script against a new API.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

pub async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

pub async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

pub async fn icon() -> Response {
    asset(ICON, "image/svg+xml")
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficQuery {
    minutes: Option<u64>,
}

/// Requests/s, error rate and p50/p99 latency of each route over the last `minutes`
/// (1–60, default 60), one point per 5 s sample plus a partial last one, as sampled by
/// this node from its own counters.
#[utoipa::path(get, path = "/v1/traffic",
    params(("minutes" = Option<u64>, Query, description = "1..=60, default 60")),
    responses((status = 200, description = "`interval_seconds`, `routes` (`(all)` first) and `series`: per route, points of `t`, `requests`, `rps`, `errors`, `error_rate`, `refused`, `p50_ms`, `p99_ms`"), (status = 400, body = super::ErrorBody)))]
pub async fn traffic(State(state): State<AdminState>, query: Result<Query<TrafficQuery>, QueryRejection>) -> Response {
    let minutes = match query {
        Ok(Query(q)) => q.minutes.unwrap_or(60),
        Err(rejection) => return json_error(StatusCode::BAD_REQUEST, "invalid_request", &rejection.body_text()),
    };
    if !(1..=60).contains(&minutes) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "parameter `minutes`: expected 1..=60",
        );
    }
    let metrics = &state.gateway.metrics;
    let now = crate::auth::unix_now() as u64;
    let current = (now, std::time::Instant::now(), metrics.route_counts());
    let traffic = metrics.traffic.series(now.saturating_sub(minutes * 60), Some(current));
    axum::Json(json!({
        "node": crate::gateway::node_name(&state.gateway.snapshot().config),
        "open_connections": metrics.open_connections(),
        "traffic": traffic,
    }))
    .into_response()
}

/// This node's view of its cluster: `mode` is `single` without `[cluster]`; in global
/// mode, the live nodes, each region's streams with how long since they answered and how
/// far this node trails them, and the outbox.
#[utoipa::path(get, path = "/v1/cluster",
    responses((status = 200, description = "`mode` (`single` or `global`); in global mode `node`, `region`, `connected`, `attached`, `live_nodes`, `nodes`, `regions` (per region `usage` and `catalog`: `heard_ms_ago`, `stale`, `applied`, `behind`) and `outbox_slots`")))]
pub async fn cluster(State(state): State<AdminState>) -> Response {
    let Some(replica) = state.gateway.replica.clone() else {
        return axum::Json(
            json!({"mode": "single", "node": crate::gateway::node_name(&state.gateway.snapshot().config)}),
        )
        .into_response();
    };
    // The outbox count reads the node's SQLite file.
    match tokio::task::spawn_blocking(move || replica.status()).await {
        Ok(status) => {
            let mut body = serde_json::to_value(status).unwrap_or_default();
            body["mode"] = json!("global");
            axum::Json(body).into_response()
        }
        Err(_) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "state_unavailable",
            "the cluster state could not be read",
        ),
    }
}
