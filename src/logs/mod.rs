//! Access logs (docs/access-logs.md): one NDJSON record per request, assembled on the
//! request path into the worker's own buffer ([`lane`]), handed in chunks to the node's
//! writer ([`writer`]) which compresses them into rotated zstd segments ([`segment`]),
//! optionally shipped to object storage ([`upload`]); `tollgate logs` reads them back
//! ([`read`]).
//!
//! Nothing here blocks a request: a chunk the writer cannot take is dropped and counted,
//! by reason, in `tollgate_access_log_dropped_total`.

pub mod lane;
pub mod read;
pub mod record;
pub(crate) use record::log_key;
pub mod segment;
pub mod service;
pub mod upload;
pub mod writer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use lane::Pending;

/// A batch of whole records from one worker.
pub struct Chunk {
    pub bytes: Vec<u8>,
    pub records: u64,
}

/// Why records were lost; each is a label of `tollgate_access_log_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The writer's queue was full: the writer is stuck (a hung disk).
    QueueFull,
    /// The log directory could not be written (full, read-only, gone).
    Disk,
    /// The writer had stopped (records finished after shutdown began).
    Stopped,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [DropReason::QueueFull, DropReason::Disk, DropReason::Stopped];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Disk => "disk",
            DropReason::Stopped => "stopped",
        }
    }
}

/// The access log's counters, shared by the workers, the writer and the uploader; read by
/// `/metrics` and `/readyz`.
#[derive(Default)]
pub struct LogStats {
    dropped: [AtomicU64; 3],
    /// Records written into segments (compressed frames on disk).
    pub written: AtomicU64,
    /// Records not kept by `sample` (successful requests only).
    pub sampled_out: AtomicU64,
    /// Records written raw to the spill directory because the writer fell behind.
    pub spilled: AtomicU64,
    /// Bytes waiting in spill files.
    pub spill_bytes: AtomicU64,
    pub segments_closed: AtomicU64,
    pub segments_uploaded: AtomicU64,
    pub upload_failures: AtomicU64,
    /// Closed segments deleted before upload because the spool passed its retention.
    pub segments_expired: AtomicU64,
    /// Bytes of closed segments waiting in the directory (the upload spool).
    pub spool_bytes: AtomicU64,
    pub spool_segments: AtomicU64,
    /// The last write or upload failure and when; cleared by the next success.
    problem: Mutex<Option<(String, SystemTime)>>,
    upload_problem: Mutex<Option<(String, SystemTime)>>,
}

impl LogStats {
    pub fn dropped(&self, reason: DropReason, records: u64) {
        self.dropped[reason as usize].fetch_add(records, Ordering::Relaxed);
    }

    pub fn dropped_total(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    pub fn set_problem(&self, problem: Option<String>) {
        if let Ok(mut slot) = self.problem.lock() {
            *slot = problem.map(|p| (p, SystemTime::now()));
        }
    }

    pub fn set_upload_problem(&self, problem: Option<String>) {
        if let Ok(mut slot) = self.upload_problem.lock() {
            *slot = problem.map(|p| (p, SystemTime::now()));
        }
    }

    /// What `/readyz` says of the access log: `None` when all is well.
    pub fn health(&self) -> Option<serde_json::Value> {
        let problem = self.problem.lock().ok().and_then(|p| p.clone());
        let upload = self.upload_problem.lock().ok().and_then(|p| p.clone());
        if problem.is_none() && upload.is_none() {
            return None;
        }
        let describe = |(text, since): (String, SystemTime)| serde_json::json!({"error": text, "since": record::rfc3339_micros(since)});
        let dropped: serde_json::Map<String, serde_json::Value> = DropReason::ALL
            .iter()
            .map(|r| (r.label().to_string(), self.dropped_total(*r).into()))
            .collect();
        Some(serde_json::json!({
            "status": if problem.is_some() { "dropping" } else { "degraded" },
            "write": problem.map(describe),
            "upload": upload.map(describe),
            "dropped": dropped,
            "spool_bytes": self.spool_bytes.load(Ordering::Relaxed),
        }))
    }

    pub fn render(&self, out: &mut String) {
        use crate::metrics::{labelled, single};
        let dropped = DropReason::ALL.map(|r| (r.label(), self.dropped_total(r)));
        labelled(
            out,
            "tollgate_access_log_dropped_total",
            "counter",
            "Access-log records lost, by reason.",
            "reason",
            &dropped,
        );
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        single(
            out,
            "tollgate_access_log_records_total",
            "counter",
            "Access-log records written to segments.",
            load(&self.written),
        );
        single(
            out,
            "tollgate_access_log_sampled_out_total",
            "counter",
            "Records of successful requests left out by sampling.",
            load(&self.sampled_out),
        );
        single(
            out,
            "tollgate_access_log_spilled_total",
            "counter",
            "Records spilled to disk uncompressed while the writer was behind.",
            load(&self.spilled),
        );
        single(
            out,
            "tollgate_access_log_spill_bytes",
            "gauge",
            "Bytes waiting in spill files.",
            load(&self.spill_bytes),
        );
        single(
            out,
            "tollgate_access_log_segments_closed_total",
            "counter",
            "Segments closed (rotated).",
            load(&self.segments_closed),
        );
        single(
            out,
            "tollgate_access_log_segments_uploaded_total",
            "counter",
            "Segments uploaded to object storage.",
            load(&self.segments_uploaded),
        );
        single(
            out,
            "tollgate_access_log_upload_failures_total",
            "counter",
            "Failed segment uploads (retried).",
            load(&self.upload_failures),
        );
        single(
            out,
            "tollgate_access_log_segments_expired_total",
            "counter",
            "Segments deleted before upload by the spool retention.",
            load(&self.segments_expired),
        );
        single(
            out,
            "tollgate_access_log_spool_bytes",
            "gauge",
            "Bytes of closed segments in the log directory.",
            load(&self.spool_bytes),
        );
        single(
            out,
            "tollgate_access_log_spool_segments",
            "gauge",
            "Closed segments in the log directory.",
            load(&self.spool_segments),
        );
    }
}

/// What the request path needs to know of `[logs]`.
#[derive(Debug, Clone)]
pub struct RecordSettings {
    pub node: Arc<str>,
    pub region: Option<Arc<str>>,
    /// Share of successful requests kept (errors are always kept).
    pub sample: f64,
    pub include_query: bool,
    /// A worker hands its buffer to the writer when it holds this much.
    pub buffer_bytes: usize,
}

/// A node's access log: what workers need to hand records over.
pub struct AccessLog {
    pub settings: RecordSettings,
    pub stats: Arc<LogStats>,
    pub flush_interval: Duration,
    writer: writer::Handle,
    /// Tells a worker's lane which log it belongs to (several gateways may share a
    /// process in tests).
    id: u64,
    /// `,"node":…,"region":…` as every record of this node has them, rendered once.
    node_fields: Box<[u8]>,
}

static NEXT_LOG_ID: AtomicU64 = AtomicU64::new(1);

impl AccessLog {
    pub fn new(
        settings: RecordSettings,
        stats: Arc<LogStats>,
        flush_interval: Duration,
        writer: writer::Handle,
    ) -> AccessLog {
        let mut node_fields = Vec::new();
        let mut object = record::JsonObject::resume(&mut node_fields);
        // Node names are checked tokens, or host names reduced to them.
        object.trusted(log_key!("node"), &settings.node);
        object.opt_str(log_key!("region"), settings.region.as_deref());
        AccessLog {
            settings,
            stats,
            flush_interval,
            writer,
            id: NEXT_LOG_ID.fetch_add(1, Ordering::Relaxed),
            node_fields: node_fields.into(),
        }
    }

    /// Hands a chunk to the writer without waiting; counts it as dropped when it cannot.
    pub fn send(&self, chunk: Chunk) {
        if chunk.records == 0 {
            return;
        }
        let records = chunk.records;
        if let Err(reason) = self.writer.send(chunk) {
            self.stats.dropped(reason, records);
        }
    }
}
