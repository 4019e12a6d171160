//! The node's access-log writer: two threads, so taking chunks from the workers never
//! waits on compression or the disk.
//!
//! - Workers put their chunks straight into the compressor's queue, bounded by
//!   `memory_bytes` ([`Handle::send`]). Past that (the writer fell behind) they hand them
//!   to the *receiver* through a channel instead, which appends them raw to a spill file
//!   in `spill/`, and when even that fails drops them, counted. The receiver is woken
//!   only then: a chunk that fits wakes the compressor alone, one thread rather than two
//!   preempting the worker on its core (docs/benchmarks.md, eighteenth round).
//! - The *compressor* turns what is queued into one zstd frame per wake-up and appends it
//!   to the open segment, rotates segments by size and age, then compresses spill files
//!   back in, and applies the directory's retention.
//!
//! Blocking threads rather than tasks: compression is CPU work and file writes block.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use super::segment::{self, OpenSegment};
use super::{Chunk, DropReason, LogStats};

/// What reaches the receiver.
pub enum Message {
    Chunk(Chunk),
    /// Every worker has handed its last records over: write everything and stop.
    Stop,
}

#[derive(Debug, Clone)]
pub struct WriterSettings {
    pub dir: PathBuf,
    pub node: String,
    pub max_segment_bytes: u64,
    pub max_segment_age: Duration,
    pub level: i32,
    /// Queued chunks held in memory before they spill to disk.
    pub memory_bytes: usize,
    /// Closed segments kept in the directory (0 = no limit), oldest deleted first.
    pub retention_bytes: u64,
    pub retention_age: Option<Duration>,
}

/// The queue between the receiver and the compressor.
#[derive(Default)]
struct Queue {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    /// The receiver is spilling: workers hand chunks to it, not to the queue, until it
    /// has drained to half, so that a spill file's records stay in their order.
    spilling: bool,
    stopping: bool,
}

impl Queue {
    fn fits(&self, chunk: &Chunk, limit: usize) -> bool {
        self.bytes + chunk.bytes.len() <= limit
    }

    fn push(&mut self, chunk: Chunk) {
        self.bytes += chunk.bytes.len();
        self.chunks.push_back(chunk);
    }
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    settings: WriterSettings,
    stats: Arc<LogStats>,
}

/// The running writer.
pub struct Writer {
    handle: Handle,
    receiver: Option<JoinHandle<()>>,
    compressor: Option<JoinHandle<()>>,
}

/// The workers' side of the writer.
#[derive(Clone)]
pub struct Handle {
    sender: SyncSender<Message>,
    shared: Arc<Shared>,
}

impl Handle {
    /// Takes `chunk` without waiting: into the compressor's queue when it has room and
    /// nothing is being spilled, else into the receiver's channel. When neither takes it,
    /// why it is dropped: `QueueFull` (both full) or `Stopped`.
    pub fn send(&self, chunk: Chunk) -> Result<(), DropReason> {
        if let Ok(mut queue) = self.shared.queue.lock() {
            if queue.stopping {
                return Err(DropReason::Stopped);
            }
            if !queue.spilling && queue.fits(&chunk, self.shared.settings.memory_bytes) {
                queue.push(chunk);
                drop(queue);
                self.shared.ready.notify_one();
                return Ok(());
            }
        }
        match self.sender.try_send(Message::Chunk(chunk)) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Full(_)) => Err(DropReason::QueueFull),
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Err(DropReason::Stopped),
        }
    }
}

/// Spill files are cut at this size, so the compressor reads one back in bounded memory.
const SPILL_FILE_BYTES: u64 = 16 << 20;

impl Writer {
    /// Recovers what a crash left (open segments, spill files) and starts both threads.
    /// `channel_chunks`: how many chunks may wait for the receiver.
    pub fn start(settings: WriterSettings, stats: Arc<LogStats>, channel_chunks: usize) -> std::io::Result<Writer> {
        std::fs::create_dir_all(settings.dir.join("spill"))?;
        let recovered = segment::recover(&settings.dir)?;
        if recovered > 0 {
            tracing::warn!(recovered, dir = %settings.dir.display(), "closed access-log segments left open by a crash");
        }
        recover_spill(&settings.dir.join("spill"), &stats)?;
        let (sender, receiver) = std::sync::mpsc::sync_channel(channel_chunks.max(4));
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            settings,
            stats,
        });
        let receiving = shared.clone();
        let handle = Handle {
            sender,
            shared: shared.clone(),
        };
        let receiver = std::thread::Builder::new()
            .name("tollgate-log-receiver".into())
            .spawn(move || receive(receiving, receiver))?;
        let compressor = std::thread::Builder::new()
            .name("tollgate-log-writer".into())
            .spawn(move || compress(shared))?;
        Ok(Writer {
            handle,
            receiver: Some(receiver),
            compressor: Some(compressor),
        })
    }

    /// The workers' side.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Writes everything handed over so far, closes the open segment and stops. Blocks:
    /// call it off the async runtime.
    pub fn stop(mut self) {
        let _ = self.handle.sender.send(Message::Stop);
        for thread in [self.receiver.take(), self.compressor.take()].into_iter().flatten() {
            let _ = thread.join();
        }
    }
}

fn receive(shared: Arc<Shared>, receiver: Receiver<Message>) {
    let mut spill: Option<SpillFile> = None;
    let limit = shared.settings.memory_bytes;
    // Until `Stop` (or every sender gone).
    while let Ok(Message::Chunk(chunk)) = receiver.recv() {
        let mut queue = match shared.queue.lock() {
            Ok(queue) => queue,
            Err(_) => break,
        };
        if queue.fits(&chunk, limit) && spill.is_none() {
            queue.push(chunk);
            queue.spilling = false;
            drop(queue);
            shared.ready.notify_one();
            continue;
        }
        // Behind: once spilling, keep spilling until the queue has drained to half, so
        // the records keep their order within the spill. Workers send here meanwhile.
        let resume = queue.bytes <= limit / 2 && spill.is_some();
        queue.spilling = !resume;
        drop(queue);
        if resume && let Some(file) = spill.take() {
            file.finish(&shared.stats);
            shared.ready.notify_one();
            if let Ok(mut queue) = shared.queue.lock() {
                queue.push(chunk);
            }
            shared.ready.notify_one();
            continue;
        }
        spill_chunk(&shared, &mut spill, chunk);
    }
    if let Some(file) = spill.take() {
        file.finish(&shared.stats);
    }
    if let Ok(mut queue) = shared.queue.lock() {
        queue.stopping = true;
    }
    shared.ready.notify_one();
}

/// A spill file being appended to: `spill/<stamp>.ndjson.part`, renamed to `.ndjson` when
/// done so the compressor only reads whole files.
struct SpillFile {
    file: std::fs::File,
    path: PathBuf,
    len: u64,
}

impl SpillFile {
    fn finish(self, stats: &LogStats) {
        let done = self.path.with_extension("");
        if let Err(error) = std::fs::rename(&self.path, &done) {
            stats.set_problem(Some(format!("spill {}: {error}", self.path.display())));
        }
    }
}

fn spill_chunk(shared: &Shared, spill: &mut Option<SpillFile>, chunk: Chunk) {
    let stats = &shared.stats;
    if spill.as_ref().is_some_and(|f| f.len >= SPILL_FILE_BYTES)
        && let Some(file) = spill.take()
    {
        file.finish(stats);
        shared.ready.notify_one();
    }
    if spill.is_none() {
        let path = shared
            .settings
            .dir
            .join("spill")
            .join(format!("{}.ndjson.part", super::record::file_stamp(SystemTime::now())));
        match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
            Ok(file) => *spill = Some(SpillFile { file, path, len: 0 }),
            Err(error) => {
                stats.dropped(DropReason::Disk, chunk.records);
                stats.set_problem(Some(format!("spill: {error}")));
                return;
            }
        }
    }
    let Some(file) = spill.as_mut() else {
        return;
    };
    match file.file.write_all(&chunk.bytes) {
        Ok(()) => {
            file.len += chunk.bytes.len() as u64;
            stats.spilled.fetch_add(chunk.records, Ordering::Relaxed);
            stats.spill_bytes.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
        }
        Err(error) => {
            let _ = file.file.set_len(file.len);
            stats.dropped(DropReason::Disk, chunk.records);
            stats.set_problem(Some(format!("spill: {error}")));
        }
    }
}

/// Spill files a crash left being written are cut to their last whole line and kept.
fn recover_spill(dir: &Path, stats: &LogStats) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".ndjson.part") {
            let bytes = std::fs::read(&path)?;
            let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(whole as u64)?;
            std::fs::rename(&path, path.with_extension(""))?;
        }
    }
    for entry in std::fs::read_dir(dir)? {
        if let Ok(meta) = entry?.metadata() {
            stats.spill_bytes.fetch_add(meta.len(), Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The compressor's state.
struct Output {
    segment: Option<OpenSegment>,
    last_retention: std::time::Instant,
    /// One zstd context for every frame (creating one per frame costs more than
    /// compressing a small frame).
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

/// zstd's context for `level`. At level 1, the default, its match-finder's table is 4 KiB
/// entries rather than the 8 KiB zstd picks for a 256 KiB input: 16 KiB that stays in the
/// L1 cache of the core the proxy shares with it. Measured on access-log records, 24–33 %
/// faster at a ratio within 0.3 % (docs/benchmarks.md, "zstd's table in the L1 cache").
fn compressor(level: i32) -> Option<zstd::bulk::Compressor<'static>> {
    let mut compressor = zstd::bulk::Compressor::new(level).ok()?;
    if level == 1 {
        // Refused only by a zstd without the parameter: its own table is then kept.
        let _ = compressor.set_parameter(zstd::stream::raw::CParameter::HashLog(12));
    }
    Some(compressor)
}

fn compress(shared: Arc<Shared>) {
    let settings = &shared.settings;
    let stats = &shared.stats;
    let mut output = Output {
        segment: None,
        last_retention: std::time::Instant::now() - Duration::from_secs(3600),
        zstd: compressor(settings.level),
    };
    // Wakes at least this often to rotate by age and apply retention.
    let tick = Duration::from_millis(500).min(settings.max_segment_age);
    loop {
        let (batch, stopping) = {
            let Ok(queue) = shared.queue.lock() else {
                break;
            };
            let Ok((mut queue, _)) = shared
                .ready
                .wait_timeout_while(queue, tick, |q| q.chunks.is_empty() && !q.stopping)
            else {
                break;
            };
            let batch: Vec<Chunk> = queue.chunks.drain(..).collect();
            queue.bytes = 0;
            (batch, queue.stopping)
        };
        if !batch.is_empty() {
            write_batch(settings, stats, &mut output, &batch);
        } else if let Some(spilled) = oldest_spill(&settings.dir.join("spill")) {
            write_spill(settings, stats, &mut output, &spilled);
        } else if stopping {
            break;
        }
        rotate_if_due(settings, stats, &mut output);
        if output.last_retention.elapsed() >= Duration::from_secs(5) {
            output.last_retention = std::time::Instant::now();
            apply_retention(settings, stats);
        }
    }
    if let Some(segment) = output.segment.take() {
        close(stats, segment);
    }
    apply_retention(settings, stats);
}

fn write_batch(settings: &WriterSettings, stats: &LogStats, output: &mut Output, batch: &[Chunk]) {
    // A full worker buffer is a frame of its own; smaller chunks (a quiet flush tick) are
    // joined first, so frames stay large enough to compress well.
    let mut small = Vec::new();
    let mut small_records = 0;
    for chunk in batch {
        if chunk.bytes.len() >= FRAME_BYTES {
            write_frame(settings, stats, output, &chunk.bytes, chunk.records);
        } else {
            small.extend_from_slice(&chunk.bytes);
            small_records += chunk.records;
            if small.len() >= FRAME_BYTES {
                write_frame(settings, stats, output, &small, small_records);
                small.clear();
                small_records = 0;
            }
        }
    }
    if small_records > 0 {
        write_frame(settings, stats, output, &small, small_records);
    }
}

/// A chunk this large is compressed on its own.
const FRAME_BYTES: usize = 32 * 1024;

/// Compresses `ndjson` into one frame and appends it to the open segment (opening one
/// when needed). On failure the records are dropped, counted and reported.
fn write_frame(settings: &WriterSettings, stats: &LogStats, output: &mut Output, ndjson: &[u8], records: u64) -> bool {
    let compressed = match output.zstd.as_mut() {
        Some(zstd) => zstd.compress(ndjson),
        None => zstd::bulk::compress(ndjson, settings.level),
    };
    let frame = match compressed {
        Ok(frame) => frame,
        Err(error) => {
            stats.dropped(DropReason::Disk, records);
            stats.set_problem(Some(format!("compress: {error}")));
            return false;
        }
    };
    if output.segment.is_none() {
        match OpenSegment::create(&settings.dir, &settings.node) {
            Ok(segment) => output.segment = Some(segment),
            Err(error) => {
                stats.dropped(DropReason::Disk, records);
                stats.set_problem(Some(format!("{}: {error}", settings.dir.display())));
                return false;
            }
        }
    }
    let Some(segment) = output.segment.as_mut() else {
        return false;
    };
    match segment.append(&frame) {
        Ok(()) => {
            stats.written.fetch_add(records, Ordering::Relaxed);
            stats.set_problem(None);
            true
        }
        Err(error) => {
            stats.dropped(DropReason::Disk, records);
            stats.set_problem(Some(format!("{}: {error}", settings.dir.display())));
            // A segment that never took a frame is not kept.
            if segment.is_empty()
                && let Some(segment) = output.segment.take()
            {
                segment.discard();
            }
            false
        }
    }
}

fn oldest_spill(dir: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    files.sort();
    files.into_iter().next()
}

/// Compresses a spill file into the open segment, in frames of whole lines, then removes
/// it. A spill file the disk will not let us write is kept for a later try.
fn write_spill(settings: &WriterSettings, stats: &LogStats, output: &mut Output, path: &Path) {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) => {
            stats.set_problem(Some(format!("spill {}: {error}", path.display())));
            return;
        }
    };
    let mut at = 0;
    while at < bytes.len() {
        let end = (at + (4 << 20)).min(bytes.len());
        let end = bytes[at..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(bytes.len(), |i| at + i + 1);
        let piece = &bytes[at..end];
        let records = memchr::memchr_iter(b'\n', piece).count() as u64;
        if !write_frame(settings, stats, output, piece, records) {
            // Counted as dropped by `write_frame`; the rest stays spilled for a later try.
            let _ = std::fs::write(path, &bytes[end..]);
            stats.spill_bytes.fetch_sub(
                (end as u64).min(stats.spill_bytes.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            return;
        }
        at = end;
        rotate_if_due(settings, stats, output);
    }
    let _ = std::fs::remove_file(path);
    let _ = stats
        .spill_bytes
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            Some(b.saturating_sub(bytes.len() as u64))
        });
}

fn rotate_if_due(settings: &WriterSettings, stats: &LogStats, output: &mut Output) {
    let due = output.segment.as_ref().is_some_and(|s| {
        s.len() >= settings.max_segment_bytes || (s.age() >= settings.max_segment_age && !s.is_empty())
    });
    if due && let Some(segment) = output.segment.take() {
        close(stats, segment);
    }
}

fn close(stats: &LogStats, segment: OpenSegment) {
    if segment.is_empty() {
        segment.discard();
        return;
    }
    match segment.close() {
        Ok(_) => {
            stats.segments_closed.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => stats.set_problem(Some(format!("closing a segment: {error}"))),
    }
}

/// Deletes the oldest closed segments beyond the directory's size or age limit, and
/// updates the spool gauges.
pub fn apply_retention(settings: &WriterSettings, stats: &LogStats) {
    let Ok(mut segments) = segment::closed(&settings.dir) else {
        return;
    };
    let mut total: u64 = segments.iter().map(|s| s.bytes).sum();
    let now = SystemTime::now();
    let too_old = |name: &str| {
        let Some(age) = settings.retention_age else {
            return false;
        };
        segment::parse_name(name)
            .and_then(|(stamp, _)| super::read::parse_stamp(stamp))
            .is_some_and(|at| now.duration_since(at).unwrap_or_default() > age)
    };
    while let Some(oldest) = segments.first() {
        let over = settings.retention_bytes > 0 && total > settings.retention_bytes;
        if !over && !too_old(&oldest.name) {
            break;
        }
        if std::fs::remove_file(&oldest.path).is_ok() {
            tracing::warn!(segment = %oldest.name, "access-log segment deleted by retention");
            stats.segments_expired.fetch_add(1, Ordering::Relaxed);
        }
        total -= oldest.bytes;
        segments.remove(0);
    }
    stats.spool_bytes.store(total, Ordering::Relaxed);
    stats.spool_segments.store(segments.len() as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(first: u64, records: u64) -> Chunk {
        let mut bytes = Vec::new();
        for n in first..first + records {
            // Noise, so segments fill up after compression.
            let pad: String = (0..8)
                .map(|i| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&(n * 8 + i).to_le_bytes())))
                .collect();
            bytes.extend_from_slice(format!("{{\"n\":{n},\"pad\":\"{pad}\"}}\n").as_bytes());
        }
        Chunk { bytes, records }
    }

    /// The default level's context, with its smaller match table, makes frames any zstd
    /// reads back, and each frame on its own: a reused context carries nothing over.
    #[test]
    fn the_default_levels_frames_read_back() {
        let mut zstd = compressor(1).expect("a level-1 context");
        for (first, records) in [(0, 3_000), (3_000, 10), (3_010, 5_000)] {
            let ndjson = chunk(first, records).bytes;
            let frame = zstd.compress(&ndjson).unwrap();
            assert!(frame.len() < ndjson.len());
            assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), ndjson);
        }
        assert!(compressor(19).is_some());
    }

    #[test]
    fn a_writer_behind_spills_to_disk_and_loses_nothing() {
        // Less than one chunk: everything the workers hand over goes through the receiver
        // and waits on disk.
        let spilled = write_200_chunks(10_000);
        assert!(spilled > 0, "the queue overflowed to disk");
    }

    #[test]
    fn chunks_that_fit_go_to_the_queue_and_the_rest_to_the_spill_in_one_run() {
        // Room for a few chunks: the queue takes them while the compressor keeps up, the
        // receiver spills whatever finds it full, and either way every record is written
        // once and none is dropped.
        write_200_chunks(64 * 1024);
    }

    /// Hands 200 chunks of 50 records to a writer with `memory_bytes`, stops it, checks
    /// that every record was written once, and returns how many records were spilled.
    fn write_200_chunks(memory_bytes: usize) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(LogStats::default());
        let settings = WriterSettings {
            dir: dir.path().to_path_buf(),
            node: "n1".into(),
            max_segment_bytes: 16 * 1024,
            max_segment_age: Duration::from_secs(60),
            level: 3,
            memory_bytes,
            retention_bytes: 0,
            retention_age: None,
        };
        let writer = Writer::start(settings, stats.clone(), 1024).unwrap();
        let handle = writer.handle();
        for i in 0..200 {
            // The channel holds 1,024 chunks: whatever the queue cannot take, it can.
            handle.send(chunk(i * 50, 50)).expect("every chunk taken");
        }
        writer.stop();
        assert_eq!(stats.written.load(Ordering::Relaxed), 10_000);
        assert_eq!(
            stats.spill_bytes.load(Ordering::Relaxed),
            0,
            "the spill was compressed back in"
        );
        let mut seen = vec![false; 10_000];
        let segments = segment::closed(dir.path()).unwrap();
        assert!(segments.len() > 1, "rotated by size");
        for closed in segments {
            let (records, _) = super::super::read::decode_frames(&std::fs::read(&closed.path).unwrap());
            for line in records.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let value: serde_json::Value = serde_json::from_slice(line).unwrap();
                let n = value["n"].as_u64().unwrap() as usize;
                assert!(!seen[n], "record {n} twice");
                seen[n] = true;
            }
        }
        assert!(seen.iter().all(|s| *s), "every record written once");
        assert_eq!(std::fs::read_dir(dir.path().join("spill")).unwrap().count(), 0);
        stats.spilled.load(Ordering::Relaxed)
    }
}
