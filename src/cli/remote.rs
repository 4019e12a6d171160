//! Admin subcommands (`keys`, `plans`, `consumers`): thin clients of the admin API.

use std::process::ExitCode;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

#[derive(Args)]
pub struct Remote {
    /// Admin API base URL.
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:9901",
        global = true
    )]
    admin_url: String,
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints its secret once.
    Create {
        #[arg(long)]
        consumer: String,
        #[arg(long)]
        plan: Option<String>,
        /// Unix seconds after which the key stops working.
        #[arg(long)]
        expires_at: Option<i64>,
        /// Route the key may call (repeatable); none = all routes.
        #[arg(long = "route")]
        routes: Vec<String>,
    },
    List,
    Get {
        id: String,
    },
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum PlansCommand {
    List,
    /// Create or replace a plan.
    Create {
        name: String,
        #[arg(long)]
        rate: Option<u32>,
        #[arg(long)]
        burst: Option<u32>,
        #[arg(long)]
        daily: Option<u64>,
        #[arg(long)]
        monthly: Option<u64>,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum ConsumersCommand {
    List,
    Create {
        id: String,
        #[arg(long)]
        plan: Option<String>,
    },
    Get {
        id: String,
    },
    /// Delete a consumer and revoke its keys.
    Delete {
        id: String,
    },
}

pub fn keys(remote: Remote, command: KeysCommand) -> ExitCode {
    let call = match command {
        KeysCommand::Create {
            consumer,
            plan,
            expires_at,
            routes,
        } => Call::post(
            "/v1/keys",
            json!({"consumer": consumer, "plan": plan, "expires_at": expires_at, "routes": routes}),
        ),
        KeysCommand::List => Call::list("/v1/keys", "keys", &["id", "consumer", "plan", "prefix", "revoked"]),
        KeysCommand::Get { id } => Call::get(&format!("/v1/keys/{id}")),
        KeysCommand::Revoke { id } => Call::delete(&format!("/v1/keys/{id}")),
    };
    run(&remote, call)
}

pub fn plans(remote: Remote, command: PlansCommand) -> ExitCode {
    let call = match command {
        PlansCommand::List => Call::list(
            "/v1/plans",
            "plans",
            &["name", "rate_per_second", "burst", "daily", "monthly"],
        ),
        PlansCommand::Create {
            name,
            rate,
            burst,
            daily,
            monthly,
        } => Call {
            method: Method::PUT,
            path: format!("/v1/plans/{name}"),
            body: Some(json!({"rate_per_second": rate, "burst": burst, "daily": daily, "monthly": monthly})),
            table: None,
        },
        PlansCommand::Delete { name } => Call::delete(&format!("/v1/plans/{name}")),
    };
    run(&remote, call)
}

pub fn consumers(remote: Remote, command: ConsumersCommand) -> ExitCode {
    let call = match command {
        ConsumersCommand::List => Call::list("/v1/consumers", "consumers", &["id", "plan", "created_at"]),
        ConsumersCommand::Create { id, plan } => Call::post("/v1/consumers", json!({"id": id, "plan": plan})),
        ConsumersCommand::Get { id } => Call::get(&format!("/v1/consumers/{id}")),
        ConsumersCommand::Delete { id } => Call::delete(&format!("/v1/consumers/{id}")),
    };
    run(&remote, call)
}

struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
    /// For lists: the array field and the columns to print.
    table: Option<(&'static str, &'static [&'static str])>,
}

impl Call {
    fn get(path: &str) -> Self {
        Call {
            method: Method::GET,
            path: path.to_string(),
            body: None,
            table: None,
        }
    }

    fn delete(path: &str) -> Self {
        Call {
            method: Method::DELETE,
            ..Call::get(path)
        }
    }

    fn post(path: &str, body: Value) -> Self {
        Call {
            method: Method::POST,
            body: Some(body),
            ..Call::get(path)
        }
    }

    fn list(path: &str, field: &'static str, columns: &'static [&'static str]) -> Self {
        Call {
            table: Some((field, columns)),
            ..Call::get(path)
        }
    }
}

fn run(remote: &Remote, call: Call) -> ExitCode {
    let token = std::env::var("TOLLGATE_ADMIN_TOKEN").unwrap_or_default();
    let result =
        super::runtime().and_then(|rt| rt.block_on(send(remote, &token, &call)).map_err(std::io::Error::other));
    match result {
        Ok((status, body)) if status.is_success() => {
            print_success(status, &body, call.table);
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
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
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
        }
        (_, Value::Null) => println!("{}", status.canonical_reason().unwrap_or("OK").to_lowercase()),
        _ => println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default()),
    }
}
