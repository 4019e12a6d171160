//! The admin API's client side: one call, its answer printed as a table, JSON or CSV.

use std::process::ExitCode;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::Remote;

/// Query string from present options, percent-encoded.
pub(super) fn query(pairs: &[(&str, Option<String>)]) -> String {
    let encoded: Vec<String> = pairs
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={}", encode(v))))
        .collect();
    if encoded.is_empty() {
        String::new()
    } else {
        format!("?{}", encoded.join("&"))
    }
}

fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' | b',' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(super) struct Call {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) body: Option<Value>,
    /// For lists: the array field and the columns to print.
    pub(super) table: Option<(&'static str, Vec<&'static str>)>,
    /// Print the body as it came (CSV).
    pub(super) raw: bool,
}

impl Call {
    pub(super) fn get(path: &str) -> Self {
        Call {
            method: Method::GET,
            path: path.to_string(),
            body: None,
            table: None,
            raw: false,
        }
    }

    pub(super) fn patch(path: &str, body: Value) -> Self {
        Call {
            method: Method::PATCH,
            body: Some(body),
            ..Call::get(path)
        }
    }

    pub(super) fn delete(path: &str) -> Self {
        Call {
            method: Method::DELETE,
            ..Call::get(path)
        }
    }

    pub(super) fn post(path: &str, body: Value) -> Self {
        Call {
            method: Method::POST,
            body: Some(body),
            ..Call::get(path)
        }
    }

    pub(super) fn list(path: &str, field: &'static str, columns: &'static [&'static str]) -> Self {
        Call {
            table: Some((field, columns.to_vec())),
            ..Call::get(path)
        }
    }
}

pub(super) fn run(remote: &Remote, call: Call) -> ExitCode {
    let token = match std::env::var("TOLLGATE_ADMIN_TOKEN") {
        // Set but empty is a mistake (a failed substitution), not "no token".
        Ok(token) if token.trim().is_empty() => {
            eprintln!("error: TOLLGATE_ADMIN_TOKEN is set but empty; unset it or give the token");
            return ExitCode::FAILURE;
        }
        Ok(token) => token,
        Err(_) => String::new(),
    };
    let result =
        super::super::runtime().and_then(|rt| rt.block_on(send(remote, &token, &call)).map_err(std::io::Error::other));
    match result {
        Ok((_, body)) if call.raw => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) if status.is_success() => {
            print_success(status, &body, call.table.as_ref().map(|(f, c)| (*f, c.as_slice())));
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let message = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(body);
            eprintln!("tollgate: {status}: {message}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("tollgate: cannot reach the admin API at {}: {error}", remote.admin_url);
            ExitCode::FAILURE
        }
    }
}

async fn send(
    remote: &Remote,
    token: &str,
    call: &Call,
) -> Result<(StatusCode, String), Box<dyn std::error::Error + Send + Sync>> {
    let tls = crate::tls::client_config(remote.ca.as_deref(), None, &[])?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
    let mut request = Request::builder().method(call.method.clone()).uri(format!(
        "{}{}",
        remote.admin_url.trim_end_matches('/'),
        call.path
    ));
    if !token.is_empty() {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = match &call.body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            Bytes::from(body.to_string())
        }
        None => Bytes::new(),
    };
    let response = client.request(request.body(Full::new(body))?).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

fn print_success(status: StatusCode, body: &str, table: Option<(&str, &[&str])>) {
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    match (table, &value) {
        (Some((field, columns)), Value::Object(map)) => {
            let rows = map.get(field).and_then(Value::as_array).cloned().unwrap_or_default();
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|row| {
                    columns
                        .iter()
                        .map(|c| match &row[*c] {
                            Value::Null => "-".to_string(),
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .collect();
            let widths: Vec<usize> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| cells.iter().map(|r| r[i].len()).chain([c.len()]).max().unwrap_or(0))
                .collect();
            let line = |cols: Vec<String>| {
                cols.iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            println!("{}", line(columns.iter().map(|c| c.to_uppercase()).collect()));
            for row in cells {
                println!("{}", line(row));
            }
            if let Some(total) = map.get("total") {
                println!("total requests: {total}");
            }
        }
        (_, Value::Null) => println!("{}", status.canonical_reason().unwrap_or("OK").to_lowercase()),
        _ => println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default()),
    }
}
