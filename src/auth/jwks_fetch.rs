//! Fetching JWKS documents over HTTP or HTTPS (rustls, webpki roots), off the request path.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::jwt::JwtVerifier;

const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_JWKS_BYTES: usize = 1 << 20;

pub async fn fetch(url: &str) -> Result<String, String> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector);
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let response = tokio::time::timeout(FETCH_TIMEOUT, client.get(uri))
        .await
        .map_err(|_| format!("{url}: timed out"))?
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: status {}", response.status()));
    }
    let body = http_body_util::Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|e| format!("{url}: {e}"))
}

/// Fetches the JWKS of every URL issuer for which `due(index)` holds; failures are logged
/// and keep the previous keys.
pub async fn refresh(verifier: &JwtVerifier, mut due: impl FnMut(usize) -> bool) {
    for (index, url, _) in verifier.jwks_urls() {
        if !due(index) {
            continue;
        }
        match fetch(&url).await.and_then(|text| verifier.set_jwks(index, &text)) {
            Ok(count) => tracing::debug!(%url, keys = count, "JWKS refreshed"),
            Err(error) => tracing::warn!(%error, "JWKS refresh failed; keeping the previous keys"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn https_and_http_failures_are_errors_not_panics() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(super::fetch(&format!("https://127.0.0.1:{port}/jwks")).await.is_err());
        assert!(super::fetch(&format!("http://127.0.0.1:{port}/jwks")).await.is_err());
        assert!(super::fetch("not a url").await.is_err());
    }
}
