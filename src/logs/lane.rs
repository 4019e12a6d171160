//! A worker's own access-log buffer, and the record of a request in progress.
//!
//! Every worker is one thread with one runtime, so its buffer is a thread-local: appending
//! a record takes no lock and no syscall, and the buffer goes to the writer whole, when it
//! is full or when the worker's flush tick comes (`[logs] flush_interval`), whichever is
//! first. A record finished on a thread without the log's lane (a body dropped after its
//! worker stopped) goes to the writer on its own.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::log_key;
use super::record::JsonObject;
use super::{AccessLog, Chunk};

struct Lane {
    log: Arc<AccessLog>,
    /// A monotonic instant and the wall-clock time it was (since the Unix epoch),
    /// refreshed at every flush tick: a request's arrival time is read off it without
    /// another clock read, in one subtraction of instants.
    anchor: (Instant, Duration),
    buf: Vec<u8>,
    records: u64,
    /// Record buffers of finished requests, reused by the next ones.
    spare: Vec<Vec<u8>>,
    second: super::record::SecondCache,
}

impl Lane {
    fn hand_over(&mut self) {
        if self.records == 0 {
            return;
        }
        let bytes = std::mem::replace(&mut self.buf, Vec::with_capacity(self.log.settings.buffer_bytes + 1024));
        self.log.send(Chunk {
            bytes,
            records: std::mem::take(&mut self.records),
        });
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.hand_over();
    }
}

thread_local! {
    static LANE: RefCell<Option<Lane>> = const { RefCell::new(None) };
}

fn anchor_now() -> (Instant, Duration) {
    (
        Instant::now(),
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(),
    )
}

/// Gives the current thread (a worker) a buffer for `log`'s records.
pub fn install(log: &Arc<AccessLog>) {
    LANE.with(|lane| {
        *lane.borrow_mut() = Some(Lane {
            log: log.clone(),
            anchor: anchor_now(),
            buf: Vec::with_capacity(log.settings.buffer_bytes + 1024),
            records: 0,
            spare: Vec::new(),
            second: Default::default(),
        });
    });
}

/// Hands the current thread's buffered records to the writer (the flush tick).
pub fn flush() {
    LANE.with(|lane| {
        if let Ok(mut lane) = lane.try_borrow_mut()
            && let Some(lane) = lane.as_mut()
        {
            lane.hand_over();
            lane.anchor = anchor_now();
        }
    });
}

/// Flushes and removes the current thread's lane (a worker stopping).
pub fn close() {
    LANE.with(|lane| {
        if let Ok(mut lane) = lane.try_borrow_mut() {
            lane.take();
        }
    });
}

/// One request's record, from the head's fields to the last byte of its response. Lives
/// in the response body, so `bytes_out` and `latency_ms` cover the whole response; the
/// record is finished when it is dropped.
pub struct Pending {
    /// Which log the record belongs to; its lane is found by this.
    log_id: u64,
    /// Held only when the record was started off the log's worker threads: on a worker
    /// the lane holds the log, and a clone per request would cost two atomic operations.
    fallback: Option<Arc<AccessLog>>,
    line: Vec<u8>,
    start: Instant,
    /// When the response was written out, if whoever wrote it read the clock already.
    ended: Option<Instant>,
    bytes_out: u64,
    completed: bool,
    keep: bool,
}

impl Pending {
    /// Starts a record: time (the request's arrival), node and region.
    pub fn begin(log: &Arc<AccessLog>, start: Instant) -> Pending {
        let line = LANE.with(|lane| {
            let mut lane = lane.try_borrow_mut().ok()?;
            let lane = lane.as_mut().filter(|l| l.log.id == log.id)?;
            let (instant, wall) = lane.anchor;
            // A request that arrived before the last tick is rare (one in flight across it).
            let arrived = match start.checked_duration_since(instant) {
                Some(after) => wall + after,
                None => wall.saturating_sub(instant.saturating_duration_since(start)),
            };
            let mut line = lane.spare.pop().unwrap_or_else(|| Vec::with_capacity(640));
            JsonObject::open(&mut line).time_cached(log_key!("time"), arrived, &mut lane.second);
            Some(line)
        });
        let on_lane = line.is_some();
        let mut line = line.unwrap_or_else(|| {
            let arrived = SystemTime::now()
                .checked_sub(start.elapsed())
                .unwrap_or_else(SystemTime::now);
            let mut line = Vec::with_capacity(640);
            JsonObject::open(&mut line).time(log_key!("time"), arrived);
            line
        });
        line.extend_from_slice(&log.node_fields);
        Pending {
            log_id: log.id,
            fallback: (!on_lane).then(|| log.clone()),
            line,
            start,
            ended: None,
            bytes_out: 0,
            completed: false,
            keep: true,
        }
    }

    /// The record's object, to add fields to.
    pub fn fields(&mut self) -> JsonObject<'_> {
        JsonObject::resume(&mut self.line)
    }

    /// Leaves the record out (sampling); it is counted, not written.
    pub fn sample_out(&mut self) {
        self.keep = false;
    }

    pub fn sent(&mut self, bytes: usize) {
        self.bytes_out += bytes as u64;
    }

    /// The response body reached its end (otherwise the client or upstream went away).
    pub fn completed(&mut self) {
        self.completed = true;
    }

    /// The response was written out at `at`: the record's latency ends there, without a
    /// clock read of its own (docs/benchmarks.md, "One clock read for the response's end").
    pub fn ended_at(&mut self, at: Instant) {
        self.ended = Some(at);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut line = std::mem::take(&mut self.line);
        if self.keep {
            let mut object = JsonObject::resume(&mut line);
            object
                .u64(log_key!("bytes_out"), self.bytes_out)
                .millis(
                    log_key!("latency_ms"),
                    self.ended
                        .unwrap_or_else(Instant::now)
                        .saturating_duration_since(self.start)
                        .as_micros() as u64,
                )
                .bool(log_key!("completed"), self.completed);
            object.close_line();
        }
        let (keep, log_id) = (self.keep, self.log_id);
        let handed = LANE.with(|lane| {
            let Ok(mut lane) = lane.try_borrow_mut() else {
                return false;
            };
            let Some(lane) = lane.as_mut().filter(|l| l.log.id == log_id) else {
                return false;
            };
            if keep {
                lane.buf.extend_from_slice(&line);
                lane.records += 1;
            } else {
                lane.log.stats.sampled_out.fetch_add(1, Ordering::Relaxed);
            }
            line.clear();
            if lane.spare.len() < 64 && line.capacity() <= 4096 {
                lane.spare.push(std::mem::take(&mut line));
            }
            if lane.buf.len() >= lane.log.settings.buffer_bytes {
                lane.hand_over();
            }
            true
        });
        if handed {
            return;
        }
        // Off the worker that started it (or its lane already gone): on its own.
        let Some(log) = self.fallback.take() else {
            return;
        };
        if keep {
            log.send(Chunk {
                bytes: line,
                records: 1,
            });
        } else {
            log.stats.sampled_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}
