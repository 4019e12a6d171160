//! Usage reports (docs/admin-api.md): `GET /v1/usage` and `GET /v1/usage/top`, as JSON or CSV.
//! A report first flushes this node's counters, so it includes every admitted request.
// Handlers short-circuit with a ready `Response` as the error (admin path; size is moot).
#![allow(clippy::result_large_err)]

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AdminState, json_error};
use crate::limits::window;
use crate::usage::report::{self, ReportRow, UsageQuery};

type Pairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

fn pairs(query: Pairs) -> Result<Vec<(String, String)>, Response> {
    query
        .map(|Query(pairs)| pairs)
        .map_err(|rejection| json_error(StatusCode::BAD_REQUEST, "invalid_request", &rejection.body_text()))
}

async fn rows(state: &AdminState, query: &UsageQuery) -> Result<Vec<ReportRow>, Response> {
    let unavailable = |error: &dyn std::fmt::Display| {
        tracing::error!(%error, "usage report failed");
        json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "state_unavailable",
            "the usage store is unavailable",
        )
    };
    state.gateway.usage.report(query).await.map_err(|e| unavailable(&e))
}

/// `stale`: regions this node's view has not heard from recently (global mode); the
/// report is then what the view holds, which may be behind.
fn render(query: &UsageQuery, rows: Vec<ReportRow>, stale: Vec<String>) -> Response {
    let stale_header = (!stale.is_empty())
        .then(|| HeaderValue::from_str(&stale.join(",")).ok())
        .flatten();
    if query.csv {
        let mut response = report::to_csv(&rows, query.group_by).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        if let Some(regions) = stale_header {
            response.headers_mut().insert("x-tollgate-stale-regions", regions);
        }
        return response;
    }
    let total: u64 = rows.iter().map(|r| r.requests).sum();
    Json(json!({
        "window": query.window,
        "from": window::format_day(query.scan.from_day),
        "to": window::format_day(query.scan.to_day),
        "group_by": query.group_by,
        "total": total,
        "stale": !stale.is_empty(),
        "stale_regions": stale,
        "rows": rows,
    }))
    .into_response()
}

/// Requests admitted per window, summed over every node's slots.
#[utoipa::path(get, path = "/v1/usage",
    params(
        ("window" = Option<String>, Query, description = "`day` (default) or `month`"),
        ("from" = Option<String>, Query, description = "First day, `YYYY-MM-DD` or `YYYY-MM`; default: first of this month"),
        ("to" = Option<String>, Query, description = "Last day, `YYYY-MM-DD` or `YYYY-MM`; default: today"),
        ("subject" = Option<String>, Query, description = "`key:ID`, `ip:ADDRESS` or `referer:HOST`"),
        ("key" = Option<String>, Query, description = "Same as `subject=key:ID`"),
        ("consumer" = Option<String>, Query),
        ("route" = Option<String>, Query, description = "Per-route usage (API-key and JWT callers)"),
        ("group_by" = Option<String>, Query, description = "Comma list of `subject`, `consumer`, `route`; default `subject`"),
        ("format" = Option<String>, Query, description = "`json` (default) or `csv`"),
    ),
    responses((status = 200, description = "Rows of window, grouping and requests"), (status = 400, body = super::ErrorBody)))]
pub async fn usage_report(State(state): State<AdminState>, query: Pairs) -> Response {
    answer(&state, query, |pairs, today| {
        report::parse_query(pairs, today).map(|q| (q, None))
    })
    .await
}

/// The busiest subjects (or consumers) of one day or month.
#[utoipa::path(get, path = "/v1/usage/top",
    params(
        ("window" = Option<String>, Query, description = "`day` (default) or `month`"),
        ("date" = Option<String>, Query, description = "`YYYY-MM-DD` (day) or `YYYY-MM` (month); default: the current one"),
        ("limit" = Option<usize>, Query, description = "1..=10000, default 20"),
        ("by" = Option<String>, Query, description = "`subject` (default) or `consumer`"),
        ("kind" = Option<String>, Query, description = "Only `key`, `ip` or `referer` subjects"),
        ("format" = Option<String>, Query, description = "`json` (default) or `csv`"),
    ),
    responses((status = 200, description = "Rows, most requests first"), (status = 400, body = super::ErrorBody)))]
pub async fn usage_top(State(state): State<AdminState>, query: Pairs) -> Response {
    answer(&state, query, |pairs, today| {
        report::parse_top(pairs, today).map(|top| (top.query, Some(top.limit)))
    })
    .await
}

/// Parses the parameters with `parse` (today's date given), reads the rows and renders
/// them, keeping the busiest `limit` when there is one.
async fn answer(
    state: &AdminState,
    query: Pairs,
    parse: impl FnOnce(&[(String, String)], u32) -> Result<(UsageQuery, Option<usize>), String>,
) -> Response {
    let pairs = match pairs(query) {
        Ok(pairs) => pairs,
        Err(response) => return response,
    };
    let today = state.gateway.usage.clock.now().day();
    let (query, limit) = match parse(&pairs, today) {
        Ok(parsed) => parsed,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, "invalid_request", &message),
    };
    match rows(state, &query).await {
        Ok(rows) => {
            let rows = match limit {
                Some(limit) => report::top(rows, limit),
                None => rows,
            };
            render(&query, rows, state.gateway.usage.stale_regions())
        }
        Err(response) => response,
    }
}
