//! Starting and stopping a node's access log: the writer threads and, with `[logs.upload]`,
//! the uploader task.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::upload::{Uploader, destination};
use super::writer::{Writer, WriterSettings};
use super::{AccessLog, LogStats, RecordSettings};
use crate::config::LogsConfig;

/// The running access log's background parts.
pub struct LogService {
    writer: Writer,
    uploader: Option<(JoinHandle<()>, watch::Sender<bool>)>,
}

/// Opens the log directory (recovering what a crash left there) and starts the writer,
/// and the uploader when configured. Call on the async runtime.
pub fn start(config: &LogsConfig, node: &str, region: Option<&str>) -> std::io::Result<(Arc<AccessLog>, LogService)> {
    let section = &config.section;
    let stats = Arc::new(LogStats::default());
    let settings = WriterSettings {
        dir: config.dir.clone(),
        node: node.to_string(),
        max_segment_bytes: section.max_segment_bytes,
        max_segment_age: section.max_segment_age,
        level: section.compression_level,
        memory_bytes: section.memory_bytes,
        retention_bytes: section.retention_bytes,
        retention_age: section.retention_age,
    };
    let cannot = |e: std::io::Error| std::io::Error::new(e.kind(), format!("access log {}: {e}", config.dir.display()));
    let writer = Writer::start(settings, stats.clone(), section.memory_bytes / section.buffer_bytes).map_err(cannot)?;
    let log = Arc::new(AccessLog::new(
        RecordSettings {
            node: node.into(),
            region: region.map(Into::into),
            sample: section.sample,
            include_query: section.include_query,
            buffer_bytes: section.buffer_bytes,
        },
        stats.clone(),
        section.flush_interval,
        writer.handle(),
    ));
    let uploader = match &section.upload {
        Some(upload) => {
            let destination = destination(&upload.url, &upload.options)
                .map_err(|e| std::io::Error::other(format!("[logs.upload]: {e}")))?;
            tracing::info!(?destination, "access-log segments are uploaded");
            let (finish, finishing) = watch::channel(false);
            let uploader = Uploader {
                destination,
                dir: config.dir.clone(),
                stats,
                interval: upload.interval,
            };
            let deadline = upload.shutdown_timeout;
            Some((tokio::spawn(uploader.run(finishing, deadline)), finish))
        }
        None => None,
    };
    Ok((log, LogService { writer, uploader }))
}

impl LogService {
    /// After the workers have stopped: writes every record handed over, closes the last
    /// segment, then lets the uploader make its last pass.
    pub async fn stop(self) {
        let LogService { writer, uploader } = self;
        // A writer stuck on a hung disk must not hold the node's stop forever.
        let writing = tokio::task::spawn_blocking(move || writer.stop());
        if tokio::time::timeout(Duration::from_secs(60), writing).await.is_err() {
            tracing::error!("the access-log writer did not finish within 60 s; records still queued are lost");
        }
        if let Some((task, finish)) = uploader {
            let _ = finish.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(600), task).await;
        }
    }
}
