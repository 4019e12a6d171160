//! Admin endpoints for plans, consumers and API keys (docs/admin-api.md). Writes go to the state
//! backend first, then to the in-memory tables the proxy reads; a key secret is returned
//! once, at creation, and never stored or logged.
// Handlers short-circuit with a ready `Response` as the error; this is the admin path,
// where the size of that value does not matter.
#![allow(clippy::result_large_err)]

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{AdminState, json_error};
use crate::auth::{KEY_PREFIX, generate_secret, hash_key, unix_now};
use crate::gateway::KeyChange;
use crate::model::{ApiKey, Consumer, Plan};
use crate::state::StateError;

fn state_error(error: StateError) -> Response {
    match error {
        StateError::NotFound(what) => json_error(StatusCode::NOT_FOUND, "not_found", &format!("{what} not found")),
        StateError::Conflict(what) => json_error(StatusCode::CONFLICT, "conflict", &format!("{what} already exists")),
        StateError::Unavailable(message) => {
            tracing::warn!(%message, "state unavailable");
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "state_unavailable",
                &format!("the shared state is unreachable: {message}"),
            )
        }
        StateError::Backend(message) => {
            tracing::error!(%message, "state backend failed");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "state_unavailable",
                "the state store failed",
            )
        }
    }
}

fn bad_request(message: &str) -> Response {
    json_error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, Response> {
    payload
        .map(|Json(v)| v)
        .map_err(|rejection| bad_request(&rejection.body_text()))
}

/// The answer to a write: `ok` on success, the error's response otherwise.
fn written(result: Result<(), StateError>, ok: impl FnOnce() -> Response) -> Response {
    match result {
        Ok(()) => ok(),
        Err(error) => state_error(error),
    }
}

// ----- plans

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    name: Option<String>,
    rate_per_second: Option<u32>,
    burst: Option<u32>,
    daily: Option<u64>,
    monthly: Option<u64>,
    #[serde(default)]
    groups: std::collections::BTreeMap<String, crate::model::GroupQuota>,
    on_partition: Option<crate::model::PartitionMode>,
    partition_allowance: Option<u64>,
}

#[utoipa::path(get, path = "/v1/plans", responses((status = 200, description = "All plans: the file's, and stored ones (which override a file plan of the same name)")))]
pub async fn list_plans(State(state): State<AdminState>) -> Response {
    let plans = state.gateway.effective_plans();
    Json(json!({ "plans": plans.values().collect::<Vec<_>>() })).into_response()
}

#[utoipa::path(get, path = "/v1/plans/{name}", params(("name" = String, Path)), responses((status = 200, body = crate::model::Plan), (status = 404, body = super::ErrorBody)))]
pub async fn get_plan(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match state.gateway.effective_plans().get(&name) {
        Some(plan) => Json(plan).into_response(),
        None => state_error(StateError::NotFound(format!("plan {name}"))),
    }
}

#[utoipa::path(post, path = "/v1/plans", request_body = PlanBody, responses((status = 201, body = crate::model::Plan), (status = 400, body = super::ErrorBody)))]
pub async fn create_plan(State(state): State<AdminState>, payload: Result<Json<PlanBody>, JsonRejection>) -> Response {
    let plan = match body(payload) {
        Ok(plan) => plan,
        Err(response) => return response,
    };
    let Some(name) = plan.name.clone() else {
        return bad_request("missing field `name`");
    };
    save_plan(&state, name, plan, StatusCode::CREATED).await
}

#[utoipa::path(put, path = "/v1/plans/{name}", params(("name" = String, Path)), request_body = PlanBody, responses((status = 200, body = crate::model::Plan), (status = 400, body = super::ErrorBody)))]
pub async fn put_plan(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    payload: Result<Json<PlanBody>, JsonRejection>,
) -> Response {
    match body(payload) {
        Ok(plan) => save_plan(&state, name, plan, StatusCode::OK).await,
        Err(response) => response,
    }
}

async fn save_plan(state: &AdminState, name: String, body: PlanBody, status: StatusCode) -> Response {
    if !crate::gateway::valid_id(&name) {
        return bad_request("field `name`: use letters, digits, '-', '_', '.' (at most 128)");
    }
    if body.name.as_ref().is_some_and(|n| *n != name) {
        return bad_request("field `name` does not match the path");
    }
    let plan = Plan {
        name,
        rate_per_second: body.rate_per_second,
        burst: body.burst,
        daily: body.daily,
        monthly: body.monthly,
        groups: body.groups,
        on_partition: body.on_partition,
        partition_allowance: body.partition_allowance,
    };
    if let Some(Err(message)) = plan.rate_per_second.map(crate::config::check_rate) {
        return bad_request(&format!(
            "field `rate_per_second`: {message} (omit it for no rate limit)"
        ));
    }
    let saved = plan.clone();
    written(state.gateway.put_plan(plan).await, || {
        (status, Json(saved)).into_response()
    })
}

#[utoipa::path(delete, path = "/v1/plans/{name}", params(("name" = String, Path)), responses((status = 204, description = "Deleted"), (status = 404, body = super::ErrorBody)))]
pub async fn delete_plan(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    written(state.gateway.delete_plan(&name).await, || {
        StatusCode::NO_CONTENT.into_response()
    })
}

// ----- consumers

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerBody {
    id: String,
    plan: Option<String>,
}

#[utoipa::path(get, path = "/v1/consumers", responses((status = 200, description = "All consumers")))]
pub async fn list_consumers(State(state): State<AdminState>) -> Response {
    Json(json!({ "consumers": state.gateway.consumers() })).into_response()
}

#[utoipa::path(get, path = "/v1/consumers/{id}", params(("id" = String, Path)), responses((status = 200, body = crate::model::Consumer), (status = 404, body = super::ErrorBody)))]
pub async fn get_consumer(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.gateway.consumer(&id) {
        Some(consumer) => Json(consumer).into_response(),
        None => state_error(StateError::NotFound(format!("consumer {id}"))),
    }
}

#[utoipa::path(post, path = "/v1/consumers", request_body = ConsumerBody, responses((status = 201, body = crate::model::Consumer), (status = 400, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub async fn create_consumer(
    State(state): State<AdminState>,
    payload: Result<Json<ConsumerBody>, JsonRejection>,
) -> Response {
    let body = match body(payload) {
        Ok(body) => body,
        Err(response) => return response,
    };
    if !crate::gateway::valid_id(&body.id) {
        return bad_request("field `id`: use letters, digits, '-', '_', '.', '@' (at most 128)");
    }
    let consumer = Consumer {
        id: body.id,
        plan: body.plan,
        created_at: unix_now(),
    };
    let created = consumer.clone();
    let warning = plan_warning(&state, created.plan.as_deref());
    written(state.gateway.create_consumer(consumer).await, || {
        with_warning((StatusCode::CREATED, Json(created)).into_response(), warning)
    })
}

/// A plan that is not defined: the write succeeds (the plan may be created next), and
/// the response says that callers on it are refused until then.
fn plan_warning(state: &AdminState, plan: Option<&str>) -> Option<http::HeaderValue> {
    let plan = plan?;
    if plan == crate::gateway::DEFAULT_PLAN || state.gateway.effective_plans().contains_key(plan) {
        return None;
    }
    http::HeaderValue::from_str(&format!(
        "plan {plan:?} is not defined: requests on it are refused (403 plan_not_found) until it is"
    ))
    .ok()
}

fn with_warning(mut response: Response, warning: Option<http::HeaderValue>) -> Response {
    if let Some(warning) = warning {
        response.headers_mut().insert("tollgate-warning", warning);
    }
    response
}

/// `null` and absent differ for PATCH: `"plan": null` clears the plan.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerPatch {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    plan: Option<Option<String>>,
}

#[utoipa::path(patch, path = "/v1/consumers/{id}", params(("id" = String, Path)), request_body = ConsumerPatch, responses((status = 200, body = crate::model::Consumer), (status = 404, body = super::ErrorBody)))]
pub async fn update_consumer(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    payload: Result<Json<ConsumerPatch>, JsonRejection>,
) -> Response {
    let patch = match body(payload) {
        Ok(patch) => patch,
        Err(response) => return response,
    };
    match state.gateway.set_consumer_plan(&id, patch.plan).await {
        Ok(consumer) => Json(consumer).into_response(),
        Err(error) => state_error(error),
    }
}

#[utoipa::path(delete, path = "/v1/consumers/{id}", params(("id" = String, Path)), responses((status = 204, description = "Deleted; its keys are revoked"), (status = 404, body = super::ErrorBody)))]
pub async fn delete_consumer(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    written(state.gateway.delete_consumer(&id).await, || {
        StatusCode::NO_CONTENT.into_response()
    })
}

// ----- keys

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    consumer: String,
    plan: Option<String>,
    /// Unix seconds.
    expires_at: Option<i64>,
    #[serde(default)]
    routes: Vec<String>,
}

/// A key as the admin API shows it: never the secret.
#[derive(Serialize, utoipa::ToSchema)]
pub struct KeyView<'a> {
    id: &'a str,
    consumer: &'a str,
    plan: Option<&'a str>,
    prefix: &'a str,
    created_at: i64,
    expires_at: Option<i64>,
    routes: &'a [String],
    revoked: bool,
}

fn view(key: &ApiKey) -> KeyView<'_> {
    KeyView {
        id: &key.id,
        consumer: &key.consumer,
        plan: key.plan.as_deref(),
        prefix: &key.prefix,
        created_at: key.created_at,
        expires_at: key.expires_at,
        routes: &key.allowed_routes,
        revoked: key.revoked,
    }
}

#[utoipa::path(post, path = "/v1/keys", request_body = KeyBody, responses((status = 201, description = "The key, with its secret in `key` (shown once)", body = KeyView), (status = 404, body = super::ErrorBody)))]
pub async fn create_key(State(state): State<AdminState>, payload: Result<Json<KeyBody>, JsonRejection>) -> Response {
    let body = match body(payload) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let secret = match generate_secret() {
        Ok(secret) => secret,
        Err(error) => {
            tracing::error!(%error, "no randomness for a new key");
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "cannot generate a key",
            );
        }
    };
    let id = match generate_secret() {
        Ok(random) => format!("key_{}", &random[KEY_PREFIX.len()..KEY_PREFIX.len() + 20]),
        Err(_) => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "cannot generate a key id",
            );
        }
    };
    let key = ApiKey {
        id,
        consumer: body.consumer,
        plan: body.plan,
        hash: hash_key(&secret),
        prefix: secret[..KEY_PREFIX.len() + 4].to_string(),
        created_at: unix_now(),
        expires_at: body.expires_at,
        allowed_routes: body.routes,
        revoked: false,
    };
    let mut shown = serde_json::to_value(view(&key)).unwrap_or_default();
    shown["key"] = json!(secret);
    let warning = plan_warning(&state, key.plan.as_deref());
    written(state.gateway.create_key(key).await, || {
        with_warning((StatusCode::CREATED, Json(shown)).into_response(), warning)
    })
}

#[utoipa::path(get, path = "/v1/keys/{id}", params(("id" = String, Path)), responses((status = 200, body = KeyView), (status = 404, body = super::ErrorBody)))]
pub async fn get_key(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.gateway.get_key(&id).await {
        Ok(Some(key)) => Json(view(&key)).into_response(),
        Ok(None) => state_error(StateError::NotFound(format!("key {id}"))),
        Err(error) => state_error(error),
    }
}

#[utoipa::path(get, path = "/v1/keys", responses((status = 200, description = "All keys, without secrets")))]
pub async fn list_keys(State(state): State<AdminState>) -> Response {
    match state.gateway.list_keys().await {
        Ok(keys) => Json(json!({ "keys": keys.iter().map(view).collect::<Vec<_>>() })).into_response(),
        Err(error) => state_error(error),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    plan: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    expires_at: Option<Option<i64>>,
    routes: Option<Vec<String>>,
}

/// Changes a key's plan, expiry or routes. A plan change applies from the next request
/// and keeps the key's usage: quotas are counted per key, not per plan.
#[utoipa::path(patch, path = "/v1/keys/{id}", params(("id" = String, Path)), request_body = KeyPatch, responses((status = 200, body = KeyView), (status = 404, body = super::ErrorBody)))]
pub async fn update_key(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    payload: Result<Json<KeyPatch>, JsonRejection>,
) -> Response {
    let patch = match body(payload) {
        Ok(patch) => patch,
        Err(response) => return response,
    };
    let change = KeyChange {
        plan: patch.plan,
        expires_at: patch.expires_at,
        routes: patch.routes,
    };
    match state.gateway.update_key(&id, change).await {
        Ok(key) => Json(view(&key)).into_response(),
        Err(error) => state_error(error),
    }
}

#[utoipa::path(delete, path = "/v1/keys/{id}", params(("id" = String, Path)), responses((status = 204, description = "Revoked"), (status = 404, body = super::ErrorBody)))]
pub async fn revoke_key(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    written(state.gateway.revoke_key(&id).await, || {
        StatusCode::NO_CONTENT.into_response()
    })
}
