//! The `tollgate` command line.

mod demo;
mod logs;
mod remote;
pub mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "A self-hosted API gateway for metered APIs")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (proxy listeners and admin API).
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file; print every error with its location; exit 1 on error.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start the gateway with a built-in example upstream and show it working.
    Demo(demo::DemoArgs),
    /// API keys, through the admin API (token from TOLLGATE_ADMIN_TOKEN).
    Keys {
        #[command(flatten)]
        remote: remote::Remote,
        #[command(subcommand)]
        command: remote::KeysCommand,
    },
    /// Plans, through the admin API.
    Plans {
        #[command(flatten)]
        remote: remote::Remote,
        #[command(subcommand)]
        command: remote::PlansCommand,
    },
    /// Consumers, through the admin API.
    Consumers {
        #[command(flatten)]
        remote: remote::Remote,
        #[command(subcommand)]
        command: remote::ConsumersCommand,
    },
    /// Access logs: read, filter and follow the segments of `[logs]`, locally or in the
    /// upload destination.
    Logs(Box<logs::LogsArgs>),
    /// Usage reports as a table (or `--csv`): `tollgate usage [--window month] [--consumer ID]`,
    /// `tollgate usage top`.
    #[command(args_conflicts_with_subcommands = true)]
    Usage {
        #[command(flatten)]
        remote: remote::Remote,
        #[command(flatten)]
        args: Box<remote::UsageArgs>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();

    match cli.command {
        Command::Check { config } => check(&config),
        Command::Serve { config } => serve_file(&config),
        Command::Demo(args) => demo::run(args),
        Command::Keys { remote, command } => remote::keys(remote, command),
        Command::Plans { remote, command } => remote::plans(remote, command),
        Command::Consumers { remote, command } => remote::consumers(remote, command),
        Command::Usage { remote, args } => remote::usage(remote, *args),
        Command::Logs(args) => logs::run(*args),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: a container's or systemd's log, or a file,
    // would keep the escape codes as text; `NO_COLOR` turns them off too.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
}

fn check(path: &std::path::Path) -> ExitCode {
    match crate::config::load(path) {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!("{}: warning: {warning}", path.display());
            }
            println!(
                "{}: OK ({} routes, {} upstreams)",
                path.display(),
                config.routes.len(),
                config.upstreams.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

fn serve_file(path: &std::path::Path) -> ExitCode {
    let config = match crate::config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("refusing to start: {} configuration error(s)", errors.0.len());
            return ExitCode::FAILURE;
        }
    };
    for warning in &config.warnings {
        tracing::warn!("{}: {warning}", path.display());
    }
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let signals = serve::Signals::install()?;
            let running = serve::start(config).await?;
            print_ready(&running);
            running.run_until_signalled(signals).await
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tollgate: {error}");
            ExitCode::FAILURE
        }
    }
}

/// One line on stdout that scripts (and the tests) wait for.
fn print_ready(running: &serve::Running) {
    use std::io::Write;
    let list = |addrs: &[std::net::SocketAddr]| addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let tls = if running.tls_addrs.is_empty() {
        String::new()
    } else {
        format!(" tls={}", list(&running.tls_addrs))
    };
    println!(
        "tollgate ready proxy={} admin={}{tls}",
        list(&running.proxy_addrs),
        running.admin_addr
    );
    let _ = std::io::stdout().flush();
}
