//! Configuration: the TOML file format ([`schema`]) is read, every error in it is collected
//! with its file, line and field ([`ConfigErrors`]), and the result is a checked [`Config`]
//! snapshot that the rest of the gateway compiles into its runtime tables.

mod check;
mod error;
mod read;
pub mod schema;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use error::ErrorSink;
use read::read_section;

pub use check::{LogsConfig, MAX_RATE_PER_SECOND, check_rate};
pub use error::{ConfigError, ConfigErrors};
pub use read::expand_env;
pub use schema::{
    AdminSection, AnonymousBy, AnonymousSection, AuthMethod, EndpointSpec, JwtSection, LbPolicy, PlanSection,
    RouteSection, ServerSection, TimeoutsSection, UpstreamProtocol, UpstreamSection, UsageSection,
};
pub use schema::{ClusterSection, HealthKind, HealthSection, OutlierSection, RetriesSection};

/// A checked configuration. Only [`load`] and [`parse`] build one.
#[derive(Debug, Clone)]
pub struct Config {
    /// Mistakes that are not errors (a plan referred to but not defined here, which the
    /// admin API may still create): printed by `check`, logged at start.
    pub warnings: Vec<String>,
    /// The file it was read from; reloads read it again.
    pub path: PathBuf,
    pub data_dir: PathBuf,
    pub server: ServerSection,
    pub listen: Vec<SocketAddr>,
    pub admin: AdminSection,
    pub admin_listen: SocketAddr,
    pub upstreams: BTreeMap<String, UpstreamSection>,
    pub routes: Vec<RouteSection>,
    pub plans: BTreeMap<String, PlanSection>,
    pub anonymous: AnonymousSection,
    pub jwt: JwtSection,
    pub usage: UsageSection,
    /// `[logs]`, when present and enabled.
    pub logs: Option<LogsConfig>,
    /// Present in global mode.
    pub cluster: Option<ClusterSection>,
    /// `[usage_page]`, when present and enabled.
    pub usage_page: Option<schema::UsagePageSection>,
    /// `server.trusted_proxies`, parsed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `[server.tls]`, checked: its certificates load.
    pub tls: Option<TlsConfig>,
    /// `[admin] tls`: the admin API's own certificate, checked.
    pub admin_tls: Option<crate::tls::TlsOptions>,
}

/// The HTTPS listeners and their settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub listen: Vec<SocketAddr>,
    pub options: crate::tls::TlsOptions,
}

/// How a consistent-hash pool picks its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    /// Lower-case header name.
    Header(String),
}

impl HashKey {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            None if text == "client_ip" => Ok(HashKey::ClientIp),
            Some(("header", name)) if http::HeaderName::from_bytes(name.trim().as_bytes()).is_ok() => {
                Ok(HashKey::Header(name.trim().to_ascii_lowercase()))
            }
            _ => Err(format!(
                "invalid hash_key {text:?}: expected \"client_ip\" or \"header:<name>\""
            )),
        }
    }
}

/// Reads and checks a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let source = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read file: {e}"),
        }])
    })?;
    parse(path, &source)
}

/// Checks configuration text; `path` is used for error locations and relative paths.
/// Every section is checked (one checker each, in `check`), so one run reports every
/// error, sorted by position.
pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigErrors> {
    let mut sink = ErrorSink::new(path, source);
    let doc = match toml_edit::Document::parse(source) {
        Ok(doc) => doc,
        Err(e) => {
            sink.push(e.span(), "", e.message().to_string());
            return Err(ConfigErrors(sink.errors));
        }
    };
    let root = doc.as_table();
    check::unknown_sections(&mut sink, root);
    let data_dir: Option<String> = root
        .get("data_dir")
        .and_then(|item| read_section(&mut sink, item, "data_dir"));
    let server = check::server(&mut sink, root);
    let tls = check::tls(&mut sink, root, path);
    let admin = check::admin(&mut sink, root);
    let admin_tls = admin
        .as_ref()
        .and_then(|(admin, _)| check::admin_tls(&mut sink, root, admin, path));
    let upstreams = check::upstreams(&mut sink, root, path);
    let anonymous = check::anonymous(&mut sink, root);
    let jwt = check::jwt(&mut sink, root, path);
    let plans = check::plans(&mut sink, root);
    let usage = check::usage(&mut sink, root);
    let cluster = check::cluster(&mut sink, root);
    let usage_page = check::usage_page(&mut sink, root);
    let routes = check::routes(&mut sink, root);
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let data_dir = base.join(data_dir.unwrap_or_else(|| "./data".to_string()));
    let logs = check::logs(&mut sink, root, base, &data_dir).filter(|l| l.section.enabled);
    if !sink.errors.is_empty() {
        sink.errors.sort_by_key(|e| (e.line, e.column));
        return Err(ConfigErrors(sink.errors));
    }
    // No errors: every checker that can fail produced its section.
    let (Some((server, listen, trusted_proxies)), Some((admin, admin_listen)), Some(anonymous)) =
        (server, admin, anonymous)
    else {
        return Err(ConfigErrors(sink.errors));
    };
    let mut warnings = Vec::new();
    if routes.iter().any(|r| r.auth.contains(&AuthMethod::Anonymous)) && !plans.contains_key(&anonymous.plan) {
        warnings.push(format!(
            "anonymous.plan {:?} is not defined in [plans]: anonymous callers are refused (403 plan_not_found) \
             unless a plan of that name is created through the admin API",
            anonymous.plan
        ));
    }
    Ok(Config {
        warnings,
        path: path.to_path_buf(),
        data_dir,
        server,
        listen,
        admin,
        admin_listen,
        upstreams,
        routes,
        plans,
        anonymous,
        jwt,
        usage,
        logs,
        cluster,
        usage_page,
        trusted_proxies,
        tls,
        admin_tls,
    })
}

#[cfg(test)]
mod tests {
    use super::read::expand_with;
    use super::*;

    fn errors(src: &str) -> Vec<ConfigError> {
        parse(Path::new("t.toml"), src)
            .expect_err("config should be rejected")
            .0
    }

    const VALID: &str = r#"
[server]
listen = ["127.0.0.1:0"]

[upstreams.geo]
endpoints = ["127.0.0.1:9000", { address = "localhost:9001", weight = 3 }]
lb = "least_requests"

[[routes]]
name = "lookup"
path = "/v1/lookup"
upstream = "geo"
"#;

    #[test]
    fn valid_config_parses() {
        let config = parse(Path::new("/etc/t.toml"), VALID).expect("valid");
        assert_eq!(config.routes.len(), 1);
        assert_eq!(config.upstreams["geo"].endpoints[1].weight, 3);
        assert_eq!(config.upstreams["geo"].lb, LbPolicy::LeastRequests);
        assert_eq!(config.data_dir, PathBuf::from("/etc/./data"));
    }

    #[test]
    fn every_error_is_reported_with_line_and_field() {
        let src = r#"
[server]
listen = ["127.0.0.1:0"]
lsten = 3

[upstreams.geo]
endpoints = ["127.0.0.1:9000"]
lb = "fastest"

[[routes]]
name = "a"
upstream = "nope"
"#;
        let errs = errors(src);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert_eq!((errs[0].line, errs[0].field.as_str()), (4, "server.lsten"));
        assert!(errs[0].message.contains("unknown field"), "{}", errs[0].message);
        assert_eq!((errs[1].line, errs[1].field.as_str()), (8, "upstreams.geo.lb"));
        assert_eq!((errs[2].line, errs[2].field.as_str()), (12, "routes[0].upstream"));
    }

    #[test]
    fn syntax_error_names_the_line() {
        let errs = errors("[server]\nlisten = [\"a\"\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].line >= 2, "{:?}", errs[0]);
    }

    #[test]
    fn env_substitution() {
        let path = std::env::var("PATH").expect("PATH is set");
        let src = format!("{VALID}\n[admin]\ntoken = \"x${{PATH}}y\"\n");
        let config = parse(Path::new("t.toml"), &src).expect("valid");
        assert_eq!(config.admin.token, Some(format!("x{path}y")));
        let fake = |name: &str| (name == "A").then(|| "1".to_string());
        assert_eq!(expand_with("${A}-${A}", fake).unwrap(), "1-1");
        assert!(expand_with("${A", fake).is_err());
        let src = format!("{VALID}\n[admin]\ntoken = \"${{TG_TEST_UNSET_VAR}}\"\n");
        let errs = errors(&src);
        assert_eq!(errs[0].field, "admin.token");
        assert!(errs[0].message.contains("TG_TEST_UNSET_VAR"));
        assert_eq!(expand_env("a$${b}c$").unwrap(), "a${b}c$");
    }

    #[test]
    fn bad_duration_and_hash_key() {
        let src = r#"
[upstreams.geo]
endpoints = ["127.0.0.1:9000"]
lb = "consistent_hash"
hash_key = "cookie:x"

[upstreams.geo.timeouts]
connect = "3 parsecs"
"#;
        let errs = errors(src);
        assert!(
            errs.iter()
                .any(|e| e.field == "upstreams.geo.timeouts.connect" && e.line == 8),
            "{errs:?}"
        );
    }

    #[test]
    fn semantic_errors() {
        let src = r#"
[server]
listen = ["nowhere"]

[admin]
listen = "0.0.0.0:9901"

[upstreams.geo]
endpoints = ["bad host:80", { address = "127.0.0.1:1", weight = 0 }]
hash_key = "cookie:x"

[[routes]]
name = "a"
path = "v1"
hosts = ["*.*.x"]
methods = ["get"]
upstream = "geo"

[[routes]]
name = "a"
upstream = "geo"
"#;
        let fields: Vec<String> = errors(src).into_iter().map(|e| e.field).collect();
        for expected in [
            "server.listen",
            "admin.token",
            "upstreams.geo.endpoints[0]",
            "upstreams.geo.endpoints[1].weight",
            "upstreams.geo.hash_key",
            "routes[0].path",
            "routes[0].hosts",
            "routes[0].methods",
            "routes[1].name",
        ] {
            assert!(fields.iter().any(|f| f == expected), "missing {expected} in {fields:?}");
        }
    }
}
