//! Admin subcommands (`keys`, `plans`, `consumers`, `usage`): thin clients of the admin API
//! (the calls themselves are in `call`).

mod call;

use call::{Call, query, run};

use std::process::ExitCode;

use clap::{Args, Subcommand};
use http::Method;
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
    /// PEM file of the CA that signed the admin API's certificate (for `https://` URLs;
    /// default: the public webpki roots).
    #[arg(long, env = "TOLLGATE_ADMIN_CA", global = true)]
    ca: Option<std::path::PathBuf>,
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
    /// Change a key's plan (its usage is kept), expiry or routes.
    Update {
        id: String,
        #[command(flatten)]
        plan: PlanChange,
        #[arg(long)]
        expires_at: Option<i64>,
        /// Route the key may call (repeatable); replaces the list.
        #[arg(long = "route")]
        routes: Option<Vec<String>>,
    },
    Revoke {
        id: String,
    },
}

/// `--plan P` sets a plan, `--clear-plan` removes it; neither leaves it as it is.
#[derive(Args)]
pub struct PlanChange {
    #[arg(long, conflicts_with = "clear_plan")]
    plan: Option<String>,
    /// Follow the parent's plan again (a key its consumer's, a consumer the default).
    #[arg(long)]
    clear_plan: bool,
}

impl PlanChange {
    fn patch(self) -> serde_json::Map<String, Value> {
        let mut patch = serde_json::Map::new();
        if self.clear_plan {
            patch.insert("plan".into(), Value::Null);
        } else if let Some(plan) = self.plan {
            patch.insert("plan".into(), json!(plan));
        }
        patch
    }
}

#[derive(Args)]
pub struct UsageArgs {
    #[command(subcommand)]
    command: Option<UsageCommand>,
    #[command(flatten)]
    report: ReportArgs,
}

#[derive(Args, Default)]
pub struct ReportArgs {
    /// `day` or `month`.
    #[arg(long)]
    window: Option<String>,
    /// First day (YYYY-MM-DD or YYYY-MM); default: first of this month.
    #[arg(long)]
    from: Option<String>,
    /// Last day (YYYY-MM-DD or YYYY-MM); default: today.
    #[arg(long)]
    to: Option<String>,
    /// `key:ID`, `ip:ADDRESS` or `referer:HOST`.
    #[arg(long)]
    subject: Option<String>,
    #[arg(long)]
    key: Option<String>,
    #[arg(long)]
    consumer: Option<String>,
    #[arg(long)]
    route: Option<String>,
    /// Comma list of subject, consumer, route.
    #[arg(long)]
    group_by: Option<String>,
    /// Print CSV instead of a table.
    #[arg(long)]
    csv: bool,
}

#[derive(Subcommand)]
pub enum UsageCommand {
    /// The busiest subjects (or consumers) of a day or month.
    Top {
        #[arg(long)]
        window: Option<String>,
        /// YYYY-MM-DD (day) or YYYY-MM (month).
        #[arg(long)]
        date: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        /// `subject` or `consumer`.
        #[arg(long)]
        by: Option<String>,
        /// Only `key`, `ip` or `referer` subjects.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        csv: bool,
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
    /// Change a consumer's plan; its keys without a plan of their own follow.
    Update {
        id: String,
        #[command(flatten)]
        plan: PlanChange,
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
        KeysCommand::Update {
            id,
            plan,
            expires_at,
            routes,
        } => {
            let mut patch = plan.patch();
            if let Some(expires_at) = expires_at {
                patch.insert("expires_at".into(), json!(expires_at));
            }
            if let Some(routes) = routes {
                patch.insert("routes".into(), json!(routes));
            }
            Call::patch(&format!("/v1/keys/{id}"), Value::Object(patch))
        }
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
            raw: false,
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
        ConsumersCommand::Update { id, plan } => {
            Call::patch(&format!("/v1/consumers/{id}"), Value::Object(plan.patch()))
        }
        ConsumersCommand::Delete { id } => Call::delete(&format!("/v1/consumers/{id}")),
    };
    run(&remote, call)
}

pub fn usage(remote: Remote, args: UsageArgs) -> ExitCode {
    let (path, csv, columns) = match args.command {
        None => {
            let r = args.report;
            let by = r.group_by.clone().unwrap_or_else(|| {
                let mut by = vec!["subject"];
                if r.consumer.is_some() {
                    by.push("consumer");
                }
                if r.route.is_some() {
                    by.push("route");
                }
                by.join(",")
            });
            let mut columns = vec!["window"];
            for field in ["subject", "consumer", "route"] {
                if by.split(',').any(|f| f == field || (field == "subject" && f == "key")) {
                    columns.push(field);
                }
            }
            let path = format!(
                "/v1/usage{}",
                query(&[
                    ("window", r.window),
                    ("from", r.from),
                    ("to", r.to),
                    ("subject", r.subject),
                    ("key", r.key),
                    ("consumer", r.consumer),
                    ("route", r.route),
                    ("group_by", r.group_by),
                    ("format", r.csv.then(|| "csv".to_string())),
                ])
            );
            (path, r.csv, columns)
        }
        Some(UsageCommand::Top {
            window,
            date,
            limit,
            by,
            kind,
            csv,
        }) => {
            let first = if by.as_deref() == Some("consumer") {
                "consumer"
            } else {
                "subject"
            };
            let path = format!(
                "/v1/usage/top{}",
                query(&[
                    ("window", window),
                    ("date", date),
                    ("limit", limit.map(|l| l.to_string())),
                    ("by", by),
                    ("kind", kind),
                    ("format", csv.then(|| "csv".to_string())),
                ])
            );
            (path, csv, vec!["window", first])
        }
    };
    let mut columns = columns;
    columns.push("requests");
    let call = if csv {
        Call {
            raw: true,
            ..Call::get(&path)
        }
    } else {
        Call {
            table: Some(("rows", columns)),
            ..Call::get(&path)
        }
    };
    run(&remote, call)
}
