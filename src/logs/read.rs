//! Reading access logs back: segments decoded frame by frame (an open segment's partial
//! last frame is left for later), and the filters of `tollgate logs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::segment::{self, OPEN_SUFFIX, SUFFIX};

/// The records of the complete frames in `bytes`, and how many bytes those frames take.
/// A frame that does not decode ends the reading (a segment cut by a crash or still being
/// written).
pub fn decode_frames(bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let size = match zstd::zstd_safe::find_frame_compressed_size(&bytes[at..]) {
            Ok(size) if size > 0 && at + size <= bytes.len() => size,
            _ => break,
        };
        match zstd::stream::decode_all(&bytes[at..at + size]) {
            Ok(records) => out.extend_from_slice(&records),
            Err(_) => break,
        }
        at += size;
    }
    (out, at)
}

/// Segment files in `dir` (closed and open), oldest first.
pub fn local_segments(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| (n.ends_with(SUFFIX) || n.ends_with(OPEN_SUFFIX)) && segment::parse_name(n).is_some())
        })
        .collect();
    files.sort();
    Ok(files)
}

/// `20261202T104418.123456Z` → the time it names.
pub fn parse_stamp(stamp: &str) -> Option<SystemTime> {
    let digits = |range: std::ops::Range<usize>| stamp.get(range)?.parse::<u32>().ok();
    let month = time::Month::try_from(u8::try_from(digits(4..6)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(digits(0..4)?).ok()?,
        month,
        u8::try_from(digits(6..8)?).ok()?,
    )
    .ok()?;
    let clock = time::Time::from_hms_micro(
        u8::try_from(digits(9..11)?).ok()?,
        u8::try_from(digits(11..13)?).ok()?,
        u8::try_from(digits(13..15)?).ok()?,
        digits(16..22)?,
    )
    .ok()?;
    let at = time::PrimitiveDateTime::new(date, clock).assume_utc();
    let secs = u64::try_from(at.unix_timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(u64::from(at.microsecond())))
}

/// A status filter: `2xx`..`5xx`, or one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Class(u16),
    Exact(u16),
}

impl std::str::FromStr for StatusFilter {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        if let Some(class) = lower.strip_suffix("xx")
            && let Ok(class @ 1..=5) = class.parse::<u16>()
        {
            return Ok(StatusFilter::Class(class));
        }
        match text.parse::<u16>() {
            Ok(status @ 100..=599) => Ok(StatusFilter::Exact(status)),
            _ => Err(format!("{text:?}: expected a status (404) or a class (4xx)")),
        }
    }
}

/// Which records `tollgate logs` prints.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// RFC 3339 bounds on `time`, rendered like the records' own so they compare as text.
    pub since: Option<String>,
    pub until: Option<String>,
    pub consumer: Option<String>,
    pub key_id: Option<String>,
    pub route: Option<String>,
    pub status: Option<StatusFilter>,
    /// `admitted`, or the limit that refused (`rate`, `daily`, `monthly`, `<group>-daily`).
    pub decision: Option<String>,
}

/// A time the user wrote (`2026-12-02T10:00:00Z`, `2026-12-02 10:00:00`, or an age such
/// as `15m` meaning that long ago) in the records' own format.
pub fn time_bound(text: &str, now: SystemTime) -> Result<String, String> {
    let at = match humantime::parse_rfc3339_weak(text) {
        Ok(at) => at,
        Err(_) => match crate::base::time::parse_duration(text) {
            Ok(ago) => now.checked_sub(ago).unwrap_or(UNIX_EPOCH),
            Err(_) => {
                return Err(format!(
                    "{text:?}: expected a time (2026-12-02T10:00:00Z) or an age (15m, 2h)"
                ));
            }
        },
    };
    Ok(super::record::rfc3339_micros(at))
}

impl Filter {
    pub fn matches(&self, record: &serde_json::Value) -> bool {
        let text = |field: &str| record.get(field).and_then(|v| v.as_str());
        let time = text("time").unwrap_or_default();
        if self.since.as_deref().is_some_and(|since| time < since) {
            return false;
        }
        if self.until.as_deref().is_some_and(|until| time >= until) {
            return false;
        }
        let same = |wanted: &Option<String>, field: &str| wanted.as_deref().is_none_or(|w| text(field) == Some(w));
        if !(same(&self.consumer, "consumer")
            && same(&self.key_id, "key_id")
            && same(&self.route, "route")
            && same(&self.decision, "decision"))
        {
            return false;
        }
        let status = record.get("status").and_then(|s| s.as_u64()).unwrap_or(0) as u16;
        match self.status {
            Some(StatusFilter::Class(class)) => status / 100 == class,
            Some(StatusFilter::Exact(wanted)) => status == wanted,
            None => true,
        }
    }

    /// Whether a segment started at `stamp` can hold records before `until` (segments
    /// hold records from their start on, so later ones are skipped).
    pub fn may_hold(&self, stamp: &str) -> bool {
        let Some(until) = &self.until else {
            return true;
        };
        let Some(start) = parse_stamp(stamp) else {
            return true;
        };
        super::record::rfc3339_micros(start).as_str() < until.as_str()
    }
}

/// A table row for the terminal.
pub fn table_row(record: &serde_json::Value) -> String {
    let text = |field: &str| match record.get(field) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".to_string(),
        Some(other) => other.to_string(),
    };
    row(&[
        &text("time"),
        &text("status"),
        &text("method"),
        &text("path"),
        &text("consumer"),
        &text("key_id"),
        &text("decision"),
        &text("latency_ms"),
    ])
}

/// The table's column names, aligned like its rows.
pub fn table_header() -> String {
    row(&[
        "time",
        "status",
        "method",
        "path",
        "consumer",
        "key_id",
        "decision",
        "latency_ms",
    ])
}

fn row(cells: &[&str; 8]) -> String {
    format!(
        "{:<27} {:>6} {:<6} {:<28} {:<12} {:<24} {:<10} {:>10}",
        cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7]
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn stamps_round_trip() {
        let at = parse_stamp("20261202T104418.000042Z").unwrap();
        assert_eq!(super::super::record::file_stamp(at), "20261202T104418.000042Z");
        assert_eq!(parse_stamp("2026120XT104418.000042Z"), None);
    }

    #[test]
    fn filters() {
        let record = json!({"time": "2026-12-02T10:44:18.000042Z", "status": 429, "consumer": "acme",
            "key_id": "k1", "route": "lookup", "decision": "daily"});
        let mut filter = Filter::default();
        assert!(filter.matches(&record));
        filter.status = Some("4xx".parse().unwrap());
        filter.decision = Some("daily".into());
        filter.consumer = Some("acme".into());
        assert!(filter.matches(&record));
        filter.status = Some("5xx".parse().unwrap());
        assert!(!filter.matches(&record));
        filter.status = Some("429".parse().unwrap());
        filter.since = Some(time_bound("2026-12-02T10:44:18Z", SystemTime::now()).unwrap());
        assert!(filter.matches(&record));
        filter.until = Some(time_bound("2026-12-02T10:44:18Z", SystemTime::now()).unwrap());
        assert!(!filter.matches(&record), "until is exclusive");
        assert!("6xx".parse::<StatusFilter>().is_err());
        assert!(time_bound("yesterday", SystemTime::now()).is_err());
    }

    #[test]
    fn partial_frames_wait() {
        let one = zstd::bulk::compress(b"{\"a\":1}\n", 3).unwrap();
        let two = zstd::bulk::compress(b"{\"a\":2}\n", 3).unwrap();
        let mut bytes = one.clone();
        bytes.extend_from_slice(&two[..3]);
        let (records, used) = decode_frames(&bytes);
        assert_eq!(records, b"{\"a\":1}\n");
        assert_eq!(used, one.len());
    }
}
