//! `tollgate logs`: reads access-log segments from the log directory or from the upload
//! destination, filters them, and prints NDJSON or a table; `--follow` keeps printing
//! records as the writer flushes them (docs/access-logs.md).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use crate::logs::read::{self, Filter, StatusFilter};

#[derive(clap::Args)]
pub struct LogsArgs {
    /// The gateway's configuration: its `[logs] dir`, or with `--remote` its
    /// `[logs.upload]` destination.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// A log directory to read (instead of `--config`).
    #[arg(long, conflicts_with = "config")]
    dir: Option<PathBuf>,
    /// Read the uploaded segments (the config's `[logs.upload]`, or `--url`).
    #[arg(long)]
    remote: bool,
    /// A destination to read, such as `s3://bucket/prefix` (implies `--remote`).
    #[arg(long)]
    url: Option<String>,
    /// A store option for `--url` (`endpoint=http://127.0.0.1:9000`), repeatable.
    #[arg(long = "option", value_name = "KEY=VALUE")]
    options: Vec<String>,
    /// Records at or after this time (`2026-12-02T10:00:00Z`) or age (`15m`).
    #[arg(long)]
    since: Option<String>,
    /// Records before this time or age.
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    consumer: Option<String>,
    /// A key id (never the key itself).
    #[arg(long = "key")]
    key_id: Option<String>,
    #[arg(long)]
    route: Option<String>,
    /// A status (`404`) or class (`4xx`).
    #[arg(long)]
    status: Option<StatusFilter>,
    /// `admitted`, or the limit that refused: `rate`, `daily`, `monthly`, `<group>-daily`.
    #[arg(long)]
    decision: Option<String>,
    /// `ndjson` (default) or `table`.
    #[arg(long, default_value = "ndjson")]
    format: Format,
    /// Keep reading the directory and print records as they are written.
    #[arg(long, short)]
    follow: bool,
    /// Stop after this many records.
    #[arg(long)]
    limit: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Ndjson,
    Table,
}

/// Prints matching records; counts them against `--limit`.
struct Printer {
    filter: Filter,
    format: Format,
    left: Option<u64>,
    out: std::io::BufWriter<std::io::Stdout>,
}

impl Printer {
    /// Prints the matching records of an NDJSON buffer; false once done (limit reached or
    /// stdout closed).
    fn print(&mut self, ndjson: &[u8]) -> bool {
        for line in ndjson.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(record) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            if !self.filter.matches(&record) {
                continue;
            }
            let written = match self.format {
                Format::Ndjson => self.out.write_all(line).and_then(|()| self.out.write_all(b"\n")),
                Format::Table => writeln!(self.out, "{}", read::table_row(&record)),
            };
            if written.is_err() {
                return false;
            }
            if let Some(left) = &mut self.left {
                *left -= 1;
                if *left == 0 {
                    return false;
                }
            }
        }
        self.out.flush().is_ok()
    }
}

pub fn run(args: LogsArgs) -> ExitCode {
    match run_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tollgate logs: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: LogsArgs) -> Result<(), String> {
    let now = SystemTime::now();
    let filter = Filter {
        since: args.since.as_deref().map(|t| read::time_bound(t, now)).transpose()?,
        until: args.until.as_deref().map(|t| read::time_bound(t, now)).transpose()?,
        consumer: args.consumer.clone(),
        key_id: args.key_id.clone(),
        route: args.route.clone(),
        status: args.status,
        decision: args.decision.clone(),
    };
    let mut printer = Printer {
        filter,
        format: args.format,
        left: args.limit.filter(|l| *l > 0),
        out: std::io::BufWriter::new(std::io::stdout()),
    };
    if args.format == Format::Table {
        let _ = writeln!(printer.out, "{}", read::table_header());
    }
    let config = match &args.config {
        Some(path) => Some(crate::config::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    if args.remote || args.url.is_some() {
        if args.follow {
            return Err("--follow reads the local directory; leave out --remote".into());
        }
        let (url, options) = match (&args.url, config.as_ref().and_then(|c| c.logs.as_ref())) {
            (Some(url), _) => {
                let mut options = BTreeMap::new();
                for option in &args.options {
                    let (key, value) = option
                        .split_once('=')
                        .ok_or_else(|| format!("--option {option:?}: expected KEY=VALUE"))?;
                    options.insert(key.to_string(), value.to_string());
                }
                (url.clone(), options)
            }
            (None, Some(logs)) => match &logs.section.upload {
                Some(upload) => (upload.url.clone(), upload.options.clone()),
                None => return Err("the configuration has no [logs.upload]".into()),
            },
            (None, None) => return Err("--remote needs --config with [logs.upload], or --url".into()),
        };
        return read_remote(&url, &options, &mut printer);
    }
    let dir = match (&args.dir, &config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(config)) => config
            .logs
            .as_ref()
            .map(|l| l.dir.clone())
            .ok_or("the configuration has no [logs] section")?,
        (None, None) => return Err("give --config or --dir".into()),
    };
    read_local(&dir, &mut printer, args.follow)
}

/// The segment's name without `.open`: the same segment before and after it is closed.
fn segment_key(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.strip_suffix(".open").unwrap_or(name).to_string()
}

fn read_local(dir: &Path, printer: &mut Printer, follow: bool) -> Result<(), String> {
    // Compressed bytes already read of each segment, for --follow.
    let mut read_up_to: HashMap<String, usize> = HashMap::new();
    loop {
        let segments = read::local_segments(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for path in &segments {
            let key = segment_key(path);
            let name = key.as_str();
            if let Some((stamp, _)) = crate::logs::segment::parse_name(name)
                && !printer.filter.may_hold(stamp)
            {
                continue;
            }
            let Ok(bytes) = std::fs::read(path) else {
                continue; // uploaded and removed meanwhile
            };
            let done = read_up_to.entry(key).or_insert(0);
            if bytes.len() <= *done {
                continue;
            }
            let (records, used) = read::decode_frames(&bytes[*done..]);
            *done += used;
            if !printer.print(&records) {
                return Ok(());
            }
        }
        if !follow {
            return Ok(());
        }
        let present: Vec<String> = segments.iter().map(|p| segment_key(p)).collect();
        read_up_to.retain(|key, _| present.contains(key));
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn read_remote(url: &str, options: &BTreeMap<String, String>, printer: &mut Printer) -> Result<(), String> {
    use futures_util::TryStreamExt;
    use object_store::ObjectStoreExt;
    let destination = crate::logs::upload::destination(url, options)?;
    let runtime = super::runtime().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let prefix = (!destination.prefix.as_ref().is_empty()).then_some(&destination.prefix);
        let mut objects: Vec<object_store::ObjectMeta> = destination
            .store
            .list(prefix)
            .try_collect()
            .await
            .map_err(|e| format!("listing {url}: {e}"))?;
        objects.retain(|o| o.location.as_ref().ends_with(crate::logs::segment::SUFFIX));
        // Keys sort by hour; within an hour by node, then time.
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        for object in objects {
            // `<node>-<stamp>.ndjson.zst`: a segment started after `--until` holds nothing
            // wanted, and is not fetched.
            let stamp = object
                .location
                .filename()
                .and_then(|name| name.strip_suffix(crate::logs::segment::SUFFIX))
                .and_then(|stem| stem.rsplit_once('-'))
                .map(|(_, stamp)| stamp.to_string());
            if stamp.is_some_and(|stamp| !printer.filter.may_hold(&stamp)) {
                continue;
            }
            let bytes = destination
                .store
                .get(&object.location)
                .await
                .map_err(|e| format!("{}: {e}", object.location))?
                .bytes()
                .await
                .map_err(|e| format!("{}: {e}", object.location))?;
            let (records, _) = read::decode_frames(&bytes);
            if !printer.print(&records) {
                break;
            }
        }
        Ok(())
    })
}
