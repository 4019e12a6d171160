//! `[logs]` and `[logs.upload]`: access logs (docs/access-logs.md).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{default_true, duration, optional_duration};

/// `[logs]`: access logs (docs/access-logs.md). Off unless the section is present.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsSection {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Where segments (and `spill/`) live; relative to the config file. Default:
    /// `<data_dir>/logs`.
    #[serde(default)]
    pub dir: Option<String>,
    /// How often each worker hands its buffered records to the writer: at most this much
    /// is lost when the process is killed.
    #[serde(default = "default_logs_flush_interval", deserialize_with = "duration")]
    pub flush_interval: Duration,
    /// A worker hands its buffer over sooner when it holds this many bytes.
    #[serde(default = "default_logs_buffer_bytes")]
    pub buffer_bytes: usize,
    /// Records waiting for compression in memory before they spill to disk.
    #[serde(default = "default_logs_memory_bytes")]
    pub memory_bytes: usize,
    #[serde(default = "default_logs_segment_bytes")]
    pub max_segment_bytes: u64,
    #[serde(default = "default_logs_segment_age", deserialize_with = "duration")]
    pub max_segment_age: Duration,
    /// zstd level (1..=19).
    #[serde(default = "default_logs_level")]
    pub compression_level: i32,
    /// Share of successful requests recorded (errors and refusals are always recorded).
    #[serde(default = "default_sample")]
    pub sample: f64,
    /// Record the query string (credential parameters removed).
    #[serde(default)]
    pub include_query: bool,
    /// Closed segments kept in `dir` (the upload spool): oldest deleted past this size
    /// (0 = no limit) or age.
    #[serde(default)]
    pub retention_bytes: u64,
    #[serde(default, deserialize_with = "optional_duration")]
    pub retention_age: Option<Duration>,
    pub upload: Option<LogsUploadSection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsUploadSection {
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`, `file:///path`.
    pub url: String,
    /// Store options (`endpoint`, `region`, `allow_http`, `access_key_id`, …), passed to
    /// the store's builder.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// How often the spool is scanned for closed segments.
    #[serde(default = "default_upload_interval", deserialize_with = "duration")]
    pub interval: Duration,
    /// How long a graceful stop waits for the last uploads.
    #[serde(default = "default_upload_shutdown", deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
}

fn default_logs_flush_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_logs_buffer_bytes() -> usize {
    // Fewer, larger hand-overs: each wakes the writer's two threads (docs/benchmarks.md).
    256 * 1024
}
fn default_logs_memory_bytes() -> usize {
    32 << 20
}
fn default_logs_segment_bytes() -> u64 {
    64 << 20
}
fn default_logs_segment_age() -> Duration {
    Duration::from_secs(300)
}
fn default_logs_level() -> i32 {
    // zstd's fastest positive level: as small as level 3 on access-log records here, at
    // about half the instructions (docs/benchmarks.md).
    1
}
fn default_sample() -> f64 {
    1.0
}
fn default_upload_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_upload_shutdown() -> Duration {
    Duration::from_secs(30)
}
