//! Shipping closed segments to object storage (S3 and S3-compatible servers, GCS, Azure,
//! or a local path) through `object_store`. The log directory is the spool: a segment is
//! deleted only after its upload was confirmed, so the spool survives restarts and
//! outages; failed uploads are retried with backoff (docs/access-logs.md).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme};
use tokio::sync::watch;

use super::LogStats;
use super::segment;

/// Where segments go: a store and the key prefix within it.
#[derive(Clone)]
pub struct Destination {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: ObjectPath,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (prefix {:?})", self.store, self.prefix.as_ref())
    }
}

/// Builds the store for `url` (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///…`),
/// with `options` given to the store's builder (`endpoint`, `region`, `allow_http`,
/// credentials; see docs/access-logs.md). Credentials missing from `options` come from the
/// usual environment variables (`AWS_ACCESS_KEY_ID`, …).
pub fn destination(url: &str, options: &BTreeMap<String, String>) -> Result<Destination, String> {
    // The store's HTTP client takes rustls's process default provider; the proxy's own
    // TLS names ring explicitly. Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let parsed: url::Url = url.parse().map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    let (scheme, prefix) = ObjectStoreScheme::parse(&parsed).map_err(|e| format!("{url:?}: {e}"))?;
    let retry = object_store::RetryConfig {
        backoff: object_store::BackoffConfig::default(),
        // The uploader retries on its own schedule; a request gives up quickly so an
        // outage shows in the metrics and /readyz rather than in a stuck upload.
        max_retries: 2,
        retry_timeout: Duration::from_secs(20),
    };
    let client = object_store::ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120));
    // The three cloud builders share their shape: environment first, then the URL, our
    // retry and client settings, then the file's options over them.
    macro_rules! cloud {
        ($builder:ty) => {{
            let mut builder = <$builder>::from_env()
                .with_url(url)
                .with_retry(retry)
                .with_client_options(client);
            for (key, value) in options {
                let parsed = key
                    .parse()
                    .map_err(|e: object_store::Error| format!("option {key:?}: {e}"))?;
                builder = builder.with_config(parsed, value);
            }
            Arc::new(builder.build().map_err(|e| e.to_string())?) as Arc<dyn ObjectStore>
        }};
    }
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => cloud!(object_store::aws::AmazonS3Builder),
        ObjectStoreScheme::GoogleCloudStorage => cloud!(object_store::gcp::GoogleCloudStorageBuilder),
        ObjectStoreScheme::MicrosoftAzure => cloud!(object_store::azure::MicrosoftAzureBuilder),
        ObjectStoreScheme::Local => {
            if !options.is_empty() {
                return Err("file:// destinations take no options".into());
            }
            Arc::new(object_store::local::LocalFileSystem::new())
        }
        _ => return Err(format!("{url:?}: use s3://, gs://, az:// or file://")),
    };
    Ok(Destination { store, prefix })
}

/// `prefix/YYYY/MM/DD/HH/<node>-<stamp>.ndjson.zst` for a local segment name (the hour is
/// the segment's start, UTC).
pub fn object_key(prefix: &ObjectPath, name: &str) -> Option<ObjectPath> {
    let (stamp, node) = segment::parse_name(name)?;
    let key = format!(
        "{}/{}/{}/{}/{}/{node}-{stamp}{}",
        prefix.as_ref(),
        &stamp[0..4],
        &stamp[4..6],
        &stamp[6..8],
        &stamp[9..11],
        segment::SUFFIX
    );
    Some(ObjectPath::from(key.trim_start_matches('/')))
}

/// The uploader service.
pub struct Uploader {
    pub destination: Destination,
    pub dir: PathBuf,
    pub stats: Arc<LogStats>,
    pub interval: Duration,
}

impl Uploader {
    /// Uploads closed segments every `interval` (sooner after a closed segment is
    /// announced on `closed`), backing off while the store fails. When `finish` turns
    /// true (the writer has closed its last segment) it makes a last pass, bounded by
    /// `deadline`, and returns.
    pub async fn run(self, mut finish: watch::Receiver<bool>, deadline: Duration) {
        let mut backoff = Duration::ZERO;
        loop {
            let wait = if backoff.is_zero() { self.interval } else { backoff };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = finish.wait_for(|done| *done) => break,
            }
            backoff = match self.upload_spool().await {
                Ok(()) => Duration::ZERO,
                Err(()) => (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60)),
            };
        }
        match tokio::time::timeout(deadline, self.upload_spool()).await {
            Ok(Ok(())) => {}
            _ => tracing::warn!(
                spool = %self.dir.display(),
                "access-log segments left in the spool at shutdown; they are uploaded after the next start"
            ),
        }
    }

    /// One pass over the spool, oldest first; stops at the first failure.
    pub async fn upload_spool(&self) -> Result<(), ()> {
        let dir = self.dir.clone();
        let segments = tokio::task::spawn_blocking(move || segment::closed(&dir))
            .await
            .map_err(|_| ())?
            .map_err(|_| ())?;
        for closed in segments {
            let Some(key) = object_key(&self.destination.prefix, &closed.name) else {
                continue;
            };
            let bytes = match tokio::fs::read(&closed.path).await {
                Ok(bytes) => bytes,
                // Deleted by retention meanwhile.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    self.stats
                        .set_upload_problem(Some(format!("{}: {error}", closed.path.display())));
                    return Err(());
                }
            };
            match self.destination.store.put(&key, bytes.into()).await {
                Ok(_) => {
                    let _ = tokio::fs::remove_file(&closed.path).await;
                    self.stats.segments_uploaded.fetch_add(1, Ordering::Relaxed);
                    let _ = self
                        .stats
                        .spool_bytes
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                            Some(b.saturating_sub(closed.bytes))
                        });
                    let _ = self
                        .stats
                        .spool_segments
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
                    self.stats.set_upload_problem(None);
                    tracing::debug!(segment = %closed.name, key = %key, "access-log segment uploaded");
                }
                Err(error) => {
                    self.stats.upload_failures.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .set_upload_problem(Some(format!("upload of {}: {error}", closed.name)));
                    tracing::warn!(segment = %closed.name, %error, "access-log upload failed; retrying later");
                    return Err(());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let key = object_key(
            &ObjectPath::from("logs/prod"),
            "20261202T104418.000042Z-eu-1.ndjson.zst",
        )
        .unwrap();
        assert_eq!(
            key.as_ref(),
            "logs/prod/2026/12/02/10/eu-1-20261202T104418.000042Z.ndjson.zst"
        );
        let bare = object_key(&ObjectPath::from(""), "20261202T104418.000042Z-n.ndjson.zst").unwrap();
        assert_eq!(bare.as_ref(), "2026/12/02/10/n-20261202T104418.000042Z.ndjson.zst");
    }

    #[test]
    fn destinations_are_checked() {
        let none = BTreeMap::new();
        assert!(destination("ftp://x/y", &none).is_err());
        assert!(destination("s3://bucket/prefix", &none).is_ok());
        let bad: BTreeMap<String, String> = [("no_such_option".to_string(), "1".to_string())].into();
        assert!(
            destination("s3://bucket/prefix", &bad)
                .unwrap_err()
                .contains("no_such_option")
        );
        let local = destination("file:///tmp/tollgate-logs", &none).unwrap();
        assert_eq!(local.prefix.as_ref(), "tmp/tollgate-logs");
    }
}
