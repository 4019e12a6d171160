//! Fuzz targets for everything that reads what a caller sends (docs/security.md,
//! "Fuzzing"). Under `cargo test` each runs its committed corpus
//! (`tests/__fuzz__/fuzz__<target>/corpus`) and then random inputs for a short while
//! (`BOLERO_RANDOM_ITERATIONS` / `BOLERO_RANDOM_TEST_TIME_MS` make it longer); with
//! `cargo bolero test fuzz_<target> --test fuzz` the same targets run under libFuzzer or AFL.
//! Each checks properties, not only the absence of panics.

use std::net::SocketAddr;
use std::time::Duration;

use tollgate::listener::framing::{self, BodyLength};
use tollgate::listener::proxy_protocol::{self, Parsed};
use tollgate::proxy::{Credentials, Head, KeySource, presented_credentials};
use tollgate::router::{EscapedSlashes, Found, PathRules, RouteSpec, Router, normalize};

/// Long enough to explore, short enough for a 2-core CI machine (six targets).
const TEST_TIME: Duration = Duration::from_secs(3);

#[test]
fn fuzz_request_head() {
    bolero::check!().with_test_time(TEST_TIME).for_each(|bytes: &[u8]| {
        let whole = framing::check_head(bytes);
        if let Ok(body) = whole {
            // What the guard lets through, httparse reads completely, with one Host at most
            // and a framing hyper cannot read another way.
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut request = httparse::Request::new(&mut headers);
            assert!(matches!(request.parse(bytes), Ok(httparse::Status::Complete(_))));
            let count = |name: &str| {
                request
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .count()
            };
            assert!(count("host") <= 1);
            assert!(count("content-length") <= 1);
            if body == BodyLength::Chunked {
                assert_eq!(count("content-length"), 0);
            }
            assert!(!framing::has_bare_lf(bytes, 0));
            // A head accepted whole was never refused while it arrived.
            for cut in [1, bytes.len() / 2, bytes.len().saturating_sub(1)] {
                assert_eq!(framing::check_partial(&bytes[..cut.min(bytes.len())]), Ok(()));
            }
        }
    });
}

#[test]
fn fuzz_path_normalization() {
    let rules = [
        PathRules::default(),
        PathRules {
            merge_slashes: false,
            escaped_slashes: EscapedSlashes::Keep,
            ..PathRules::default()
        },
    ];
    bolero::check!().with_test_time(TEST_TIME).for_each(|bytes: &[u8]| {
        let Ok(path) = std::str::from_utf8(bytes) else { return };
        // Only origin-form paths are normalized; the head guard refuses other targets.
        if !path.starts_with('/') {
            return;
        }
        for rules in &rules {
            let Ok(normalized) = normalize(path, rules) else {
                continue;
            };
            let normalized = normalized.as_deref().unwrap_or(path);
            // Normalizing is idempotent, and what comes out has no dot segment left to
            // climb out of a prefix with.
            assert_eq!(
                normalize(normalized, rules).ok().flatten().as_deref(),
                None,
                "{path:?} → {normalized:?}"
            );
            assert!(
                !normalized.split('/').any(|s| s == ".." || s == "."),
                "{path:?} → {normalized:?}"
            );
            if rules.merge_slashes {
                assert!(!normalized.contains("//"), "{path:?} → {normalized:?}");
            }
        }
    });
}

#[test]
fn fuzz_proxy_protocol() {
    bolero::check!().with_test_time(TEST_TIME).for_each(|bytes: &[u8]| {
        if let Parsed::Header { len, source } = proxy_protocol::parse(bytes) {
            assert!(len > 0 && len <= bytes.len());
            // The same header parses the same way whatever follows it.
            let mut longer = bytes[..len].to_vec();
            longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(proxy_protocol::parse(&longer), Parsed::Header { len, source });
            let _: Option<SocketAddr> = source;
        }
    });
}

#[test]
fn fuzz_router() {
    bolero::check!()
        .with_test_time(TEST_TIME)
        .with_type::<(Vec<(u8, u8, u8)>, Vec<u8>, u8)>()
        .for_each(|(routes, path, method)| {
            const SEGMENTS: [&str; 4] = ["a", "b", "ab", "v1"];
            const METHODS: [&str; 3] = ["GET", "POST", "DELETE"];
            let segment = |n: u8| SEGMENTS[n as usize % SEGMENTS.len()];
            let specs: Vec<RouteSpec> = routes
                .iter()
                .take(8)
                .map(|(depth, first, methods)| RouteSpec {
                    hosts: Vec::new(),
                    path: (0..depth % 3).fold(String::new(), |p, i| p + "/" + segment(first.wrapping_add(i))) + "/",
                    methods: METHODS
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| methods & (1 << i) != 0)
                        .map(|(_, m)| m.to_string())
                        .collect(),
                })
                .collect();
            let request_path: String = path.iter().take(4).map(|n| format!("/{}", segment(*n))).collect();
            let request_path = if request_path.is_empty() {
                "/".to_string()
            } else {
                request_path
            };
            let method = METHODS[*method as usize % METHODS.len()];
            let router = Router::new(&specs);
            let on_boundary = |prefix: &str| {
                let prefix = prefix.trim_end_matches('/');
                prefix.is_empty()
                    || request_path == prefix
                    || request_path
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('/'))
            };
            let longest = specs
                .iter()
                .filter(|s| on_boundary(&s.path))
                .map(|s| s.path.trim_end_matches('/').len())
                .max();
            match router.find(None, method, &request_path) {
                Some(Found::Route(index)) => {
                    let spec = &specs[index];
                    assert!(on_boundary(&spec.path));
                    assert!(spec.methods.is_empty() || spec.methods.iter().any(|m| m == method));
                    // The longest matching prefix wins; never a shorter one.
                    assert_eq!(Some(spec.path.trim_end_matches('/').len()), longest);
                }
                Some(Found::MethodNotAllowed(allow)) => {
                    assert!(!allow.is_empty());
                    assert!(!allow.split(", ").any(|m| m == method));
                }
                None => assert_eq!(longest, None, "{request_path} has a matching route"),
            }
        });
}

#[test]
fn fuzz_credentials() {
    bolero::check!()
        .with_test_time(TEST_TIME)
        .with_type::<(String, String, String, bool, bool)>()
        .for_each(|(query, header, bearer, api_key, jwt)| {
            let mut builder = http::Request::builder();
            if let Ok(uri) = format!("/v1?{query}").parse::<http::Uri>() {
                builder = builder.uri(uri);
            }
            if let Ok(value) = http::HeaderValue::from_str(header) {
                builder = builder.header("x-api-key", value);
            }
            if let Ok(value) = http::HeaderValue::from_str(&format!("Bearer {bearer}")) {
                builder = builder.header("authorization", value);
            }
            let Ok(request) = builder.body(()) else { return };
            match presented_credentials(*api_key, *jwt, Head::of(&request)) {
                Credentials::Key(key, KeySource::Header) => {
                    assert!(*api_key);
                    // Its text, or empty (a wrong key) when it is not text.
                    let sent = request.headers()["x-api-key"].to_str().unwrap_or("").trim();
                    assert_eq!(key, sent);
                }
                Credentials::Key(key, KeySource::Bearer) => {
                    assert!(*api_key && !request.headers().contains_key("x-api-key"));
                    assert!(request.headers()["authorization"].to_str().unwrap().contains(key));
                }
                Credentials::Key(key, KeySource::Query) => {
                    assert!(*api_key);
                    let query = request.uri().query().unwrap_or("");
                    assert!(query.contains(&format!("api_key={key}")) || query.contains(&format!("api-key={key}")));
                }
                Credentials::Jwt(token) => {
                    assert!(*jwt);
                    assert!(!token.starts_with(tollgate::auth::KEY_PREFIX) || !*api_key);
                }
                Credentials::None => {}
            }
        });
}

#[test]
fn fuzz_config() {
    bolero::check!().with_test_time(TEST_TIME).for_each(|bytes: &[u8]| {
        let Ok(text) = std::str::from_utf8(bytes) else { return };
        // Any text is a configuration or a list of errors that name the file and a field.
        if let Err(errors) = tollgate::config::parse(std::path::Path::new("/fuzz/tollgate.toml"), text) {
            assert!(!errors.0.is_empty());
            for error in &errors.0 {
                assert_eq!(error.file, std::path::Path::new("/fuzz/tollgate.toml"));
                assert!(!error.message.is_empty());
            }
        }
    });
}
