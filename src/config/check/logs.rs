//! `[logs]`: access logs (docs/access-logs.md).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml_edit::Table;

use super::super::error::ErrorSink;
use super::super::read::{field_span, read_section};
use super::super::schema::{LogsSection, LogsUploadSection};

/// `[logs]`, checked, with its directory resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct LogsConfig {
    pub section: LogsSection,
    pub dir: PathBuf,
}

pub(in crate::config) fn logs(
    sink: &mut ErrorSink<'_>,
    root: &Table,
    base: &Path,
    data_dir: &Path,
) -> Option<LogsConfig> {
    let item = root.get("logs")?;
    let section: LogsSection = read_section(sink, item, "logs")?;
    let span = |key: &str| field_span(item, key);
    if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&section.flush_interval) {
        sink.push(
            span("flush_interval"),
            "logs.flush_interval",
            "must be between 10ms and 60s",
        );
    }
    if !(4096..=16 << 20).contains(&section.buffer_bytes) {
        sink.push(
            span("buffer_bytes"),
            "logs.buffer_bytes",
            "must be between 4096 and 16777216",
        );
    }
    if section.memory_bytes < section.buffer_bytes.max(1 << 20) {
        sink.push(
            span("memory_bytes"),
            "logs.memory_bytes",
            "must be at least 1 MiB and at least buffer_bytes",
        );
    }
    if section.max_segment_bytes < 64 * 1024 {
        sink.push(
            span("max_segment_bytes"),
            "logs.max_segment_bytes",
            "must be at least 65536",
        );
    }
    if section.max_segment_age < Duration::from_secs(1) {
        sink.push(span("max_segment_age"), "logs.max_segment_age", "must be at least 1s");
    }
    if !(1..=19).contains(&section.compression_level) {
        sink.push(
            span("compression_level"),
            "logs.compression_level",
            "must be between 1 and 19",
        );
    }
    if !(section.sample > 0.0 && section.sample <= 1.0) {
        sink.push(span("sample"), "logs.sample", "must be above 0 and at most 1");
    }
    if let Some(upload) = &section.upload {
        let upload_item = item.get("upload");
        for (field, problem) in upload_problems(upload) {
            sink.push(
                upload_item.and_then(|i| field_span(i, field)),
                &format!("logs.upload.{field}"),
                problem,
            );
        }
    }
    let dir = match &section.dir {
        Some(dir) => base.join(dir),
        None => data_dir.join("logs"),
    };
    Some(LogsConfig { section, dir })
}

/// What is wrong with an upload destination: the URL's scheme and the option names the
/// store's builder knows.
fn upload_problems(upload: &LogsUploadSection) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let url: url::Url = match upload.url.parse() {
        Ok(url) => url,
        Err(e) => return vec![("url", format!("invalid URL {:?}: {e}", upload.url))],
    };
    let known = |key: &str| -> bool {
        match url.scheme() {
            "s3" | "s3a" => object_store::aws::AmazonS3ConfigKey::from_str(key).is_ok(),
            "gs" => object_store::gcp::GoogleConfigKey::from_str(key).is_ok(),
            "az" | "azure" | "abfs" | "abfss" | "adl" => object_store::azure::AzureConfigKey::from_str(key).is_ok(),
            _ => false,
        }
    };
    match url.scheme() {
        "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" | "adl" => {
            if url.host_str().is_none_or(str::is_empty) {
                problems.push(("url", "the URL names no bucket or container".to_string()));
            }
        }
        "file" => {
            if !upload.options.is_empty() {
                problems.push(("options", "file:// destinations take no options".to_string()));
            }
        }
        other => problems.push((
            "url",
            format!("unsupported scheme {other:?}: use s3://, gs://, az:// or file://"),
        )),
    }
    for key in upload.options.keys() {
        if url.scheme() != "file" && !known(key) {
            problems.push(("options", format!("unknown option {key:?} for {}://", url.scheme())));
        }
    }
    if upload.interval < Duration::from_millis(100) {
        problems.push(("interval", "must be at least 100ms".to_string()));
    }
    problems
}
