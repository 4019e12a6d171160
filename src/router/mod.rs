//! Route matching, compiled once per configuration.
//!
//! Hosts are looked up in hash maps (exact, then wildcard suffixes longest first, then
//! routes without hosts); paths are matched on segment boundaries by looking up each
//! prefix of the request path from the longest down, so a request costs a handful of
//! hash lookups however many routes there are.

mod normalize;

use rustc_hash::FxHashMap as HashMap;

pub use normalize::{EscapedSlashes, PathError, PathRules, normalize};

use crate::config::RouteSection;

/// What the router needs to know about one route.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub hosts: Vec<String>,
    pub path: String,
    pub methods: Vec<String>,
}

impl From<&RouteSection> for RouteSpec {
    fn from(route: &RouteSection) -> Self {
        RouteSpec {
            hosts: route.hosts.clone(),
            path: route.path.clone(),
            methods: route.methods.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct PathTable {
    /// Normalised prefix → routes in configuration order.
    by_prefix: HashMap<Box<str>, Vec<Candidate>>,
}

#[derive(Debug)]
struct Candidate {
    index: usize,
    /// Empty = any method.
    methods: Box<[Box<str>]>,
}

impl PathTable {
    fn insert(&mut self, prefix: &str, candidate: Candidate) {
        self.by_prefix.entry(prefix.into()).or_default().push(candidate);
    }

    /// The route of the longest prefix that has routes; if none of that prefix's routes
    /// takes `method`, the request is refused with the methods they do take — it never falls
    /// through to a shorter prefix, whose route may have weaker auth.
    fn find(&self, method: &str, path: &str) -> Option<Found> {
        let mut candidate = normalize_prefix(path);
        loop {
            if let Some(routes) = self.by_prefix.get(candidate) {
                return Some(
                    match routes
                        .iter()
                        .find(|r| r.methods.is_empty() || r.methods.iter().any(|m| &**m == method))
                    {
                        Some(route) => Found::Route(route.index),
                        None => Found::MethodNotAllowed(allowed_methods(routes)),
                    },
                );
            }
            if candidate == "/" {
                return None;
            }
            candidate = match candidate.rfind('/') {
                Some(0) | None => "/",
                Some(pos) => &candidate[..pos],
            };
        }
    }
}

/// What the router found for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The index of the route in configuration order.
    Route(usize),
    /// The best-matching path has routes, none for this method: `405` with `Allow` (the
    /// methods those routes take, comma-separated).
    MethodNotAllowed(String),
}

fn allowed_methods(routes: &[Candidate]) -> String {
    let mut methods: Vec<&str> = routes.iter().flat_map(|r| r.methods.iter().map(|m| &**m)).collect();
    methods.sort_unstable();
    methods.dedup();
    methods.join(", ")
}

/// Routes compiled for lookup; `find` returns the index of the route in configuration order.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<Box<str>, PathTable>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<Box<str>, PathTable>,
    any_host: PathTable,
}

impl Router {
    pub fn new(routes: &[RouteSpec]) -> Self {
        let mut router = Router::default();
        for (index, route) in routes.iter().enumerate() {
            let prefix = normalize_prefix(&route.path);
            let methods: Box<[Box<str>]> = route.methods.iter().map(|m| m.as_str().into()).collect();
            let candidate = || Candidate {
                index,
                methods: methods.clone(),
            };
            if route.hosts.is_empty() {
                router.any_host.insert(prefix, candidate());
            }
            for host in &route.hosts {
                let host = host.to_ascii_lowercase();
                match host.strip_prefix("*.") {
                    Some(suffix) => router
                        .wildcard
                        .entry(suffix.into())
                        .or_default()
                        .insert(prefix, candidate()),
                    None => router.exact.entry(host.into()).or_default().insert(prefix, candidate()),
                }
            }
        }
        router
    }

    /// Some route names a host: only then does `find` read the one asked for (the caller
    /// may skip making it text when none does).
    pub fn routes_by_host(&self) -> bool {
        !(self.exact.is_empty() && self.wildcard.is_empty())
    }

    /// Finds the route for a request. `host` may carry a port and any letter case.
    pub fn find(&self, host: Option<&str>, method: &str, path: &str) -> Option<Found> {
        if let Some(host) = host.map(strip_port).filter(|h| !h.is_empty())
            && self.routes_by_host()
        {
            let lowered;
            let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                lowered = host.to_ascii_lowercase();
                lowered.as_str()
            } else {
                host
            };
            if let Some(found) = self.exact.get(host).and_then(|t| t.find(method, path)) {
                return Some(found);
            }
            for (pos, _) in host.match_indices('.') {
                if let Some(found) = self.wildcard.get(&host[pos + 1..]).and_then(|t| t.find(method, path)) {
                    return Some(found);
                }
            }
        }
        self.any_host.find(method, path)
    }
}

/// `/v1/lookup/` and `/v1/lookup` are the same prefix; `/` stays `/`.
fn normalize_prefix(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() { "/" } else { trimmed }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: keep the brackets, drop the port.
        return rest.find(']').map_or(host, |end| &host[..end + 2]);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
}

/// The path sent upstream when a route strips its prefix: `/v1/lookup/1.2.3.4` under
/// prefix `/v1/lookup` becomes `/1.2.3.4`; the bare prefix becomes `/`.
pub fn strip_route_prefix<'a>(prefix: &str, path: &'a str) -> &'a str {
    let prefix = normalize_prefix(prefix);
    if prefix == "/" {
        return path;
    }
    match path.get(prefix.len()..) {
        Some("") | None => "/",
        Some(rest) => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hosts: &[&str], path: &str, methods: &[&str]) -> RouteSpec {
        RouteSpec {
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            path: path.to_string(),
            methods: methods.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let router = Router::new(&[
            spec(&[], "/", &[]),
            spec(&[], "/v1", &[]),
            spec(&[], "/v1/lookup/", &[]),
        ]);
        assert_eq!(router.find(None, "GET", "/v1/lookup/1.2.3.4"), Some(Found::Route(2)));
        assert_eq!(router.find(None, "GET", "/v1/lookup"), Some(Found::Route(2)));
        assert_eq!(router.find(None, "GET", "/v1/lookupx"), Some(Found::Route(1)));
        assert_eq!(router.find(None, "GET", "/v1"), Some(Found::Route(1)));
        assert_eq!(router.find(None, "GET", "/v2"), Some(Found::Route(0)));
        assert_eq!(router.find(None, "GET", "/"), Some(Found::Route(0)));
    }

    #[test]
    fn no_match_without_root_route() {
        let router = Router::new(&[spec(&[], "/v1", &[])]);
        assert_eq!(router.find(None, "GET", "/v2/x"), None);
        assert_eq!(router.find(None, "GET", "/"), None);
    }

    #[test]
    fn hosts_exact_then_wildcard_then_any() {
        let router = Router::new(&[
            spec(&["api.example.com"], "/", &[]),
            spec(&["*.example.com"], "/", &[]),
            spec(&[], "/", &[]),
            spec(&["*.eu.example.com"], "/", &[]),
        ]);
        assert_eq!(router.find(Some("api.example.com"), "GET", "/x"), Some(Found::Route(0)));
        assert_eq!(
            router.find(Some("API.Example.com:8080"), "GET", "/x"),
            Some(Found::Route(0))
        );
        assert_eq!(router.find(Some("www.example.com"), "GET", "/x"), Some(Found::Route(1)));
        assert_eq!(router.find(Some("a.b.example.com"), "GET", "/x"), Some(Found::Route(1)));
        assert_eq!(
            router.find(Some("a.eu.example.com"), "GET", "/x"),
            Some(Found::Route(3))
        );
        assert_eq!(router.find(Some("example.com"), "GET", "/x"), Some(Found::Route(2)));
        assert_eq!(router.find(Some("other.org"), "GET", "/x"), Some(Found::Route(2)));
        assert_eq!(router.find(None, "GET", "/x"), Some(Found::Route(2)));
        assert!(router.routes_by_host());
        assert!(Router::new(&[spec(&["*.example.com"], "/", &[])]).routes_by_host());
        let any_host = Router::new(&[spec(&[], "/", &[]), spec(&[], "/v1", &["GET"])]);
        assert!(!any_host.routes_by_host(), "no route names a host");
        assert_eq!(
            any_host.find(Some("api.example.com"), "GET", "/x"),
            Some(Found::Route(0))
        );
    }

    #[test]
    fn host_route_falls_back_to_shorter_any_host_route() {
        let router = Router::new(&[spec(&["api.example.com"], "/admin", &[]), spec(&[], "/", &[])]);
        assert_eq!(
            router.find(Some("api.example.com"), "GET", "/admin/x"),
            Some(Found::Route(0))
        );
        assert_eq!(
            router.find(Some("api.example.com"), "GET", "/public"),
            Some(Found::Route(1))
        );
    }

    #[test]
    fn methods_filter_and_never_fall_through() {
        let router = Router::new(&[
            spec(&[], "/items", &["POST"]),
            spec(&[], "/items", &["GET", "HEAD"]),
            spec(&[], "/", &["GET"]),
        ]);
        assert_eq!(router.find(None, "POST", "/items"), Some(Found::Route(0)));
        assert_eq!(router.find(None, "HEAD", "/items/3"), Some(Found::Route(1)));
        // The best-matching prefix has routes, none for DELETE: refused with what they
        // take, not handed to the shorter `/` route.
        assert_eq!(
            router.find(None, "DELETE", "/items"),
            Some(Found::MethodNotAllowed("GET, HEAD, POST".into()))
        );
        assert_eq!(
            router.find(None, "POST", "/other"),
            Some(Found::MethodNotAllowed("GET".into()))
        );
        assert_eq!(router.find(None, "GET", "/other"), Some(Found::Route(2)));
    }

    #[test]
    fn strip_prefix() {
        assert_eq!(strip_route_prefix("/v1/lookup", "/v1/lookup/1.2.3.4"), "/1.2.3.4");
        assert_eq!(strip_route_prefix("/v1/lookup/", "/v1/lookup"), "/");
        assert_eq!(strip_route_prefix("/", "/a"), "/a");
    }

    #[test]
    fn ports_and_ipv6_hosts() {
        assert_eq!(strip_port("a.com:80"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.com"), "a.com");
    }
}
