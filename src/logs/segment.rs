//! Segment files: zstd-compressed NDJSON, one zstd frame per flush, so every flushed
//! frame of the segment being written is readable by `zstd -d` even after a crash.
//!
//! Names sort by time and carry the node: `20261202T104418.123456Z-<node>.ndjson.zst`;
//! the segment being written ends in `.open` until it is closed (fsync'd and renamed).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::record::file_stamp;

pub const SUFFIX: &str = ".ndjson.zst";
pub const OPEN_SUFFIX: &str = ".ndjson.zst.open";

/// The segment being written.
pub struct OpenSegment {
    file: File,
    path: PathBuf,
    /// Length of the file up to its last complete frame.
    len: u64,
    opened: std::time::Instant,
}

impl OpenSegment {
    pub fn create(dir: &Path, node: &str) -> io::Result<OpenSegment> {
        let path = dir.join(format!("{}-{node}{OPEN_SUFFIX}", file_stamp(SystemTime::now())));
        let file = OpenOptions::new().create_new(true).write(true).open(&path)?;
        Ok(OpenSegment {
            file,
            path,
            len: 0,
            opened: std::time::Instant::now(),
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn age(&self) -> std::time::Duration {
        self.opened.elapsed()
    }

    /// Appends one whole frame. A failed write is cut off again, so the file never holds
    /// half a frame while the node runs.
    pub fn append(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.file.write_all(frame) {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(())
            }
            Err(error) => {
                let _ = self.file.set_len(self.len);
                Err(error)
            }
        }
    }

    /// fsyncs the segment and gives it its closed name; returns that path.
    pub fn close(self) -> io::Result<PathBuf> {
        self.file.sync_all()?;
        let closed = closed_path(&self.path);
        std::fs::rename(&self.path, &closed)?;
        sync_dir(closed.parent().unwrap_or(Path::new(".")));
        Ok(closed)
    }

    /// Removes a segment that never received a frame.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn closed_path(open: &Path) -> PathBuf {
    let name = open.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    open.with_file_name(name.strip_suffix(".open").unwrap_or(name))
}

pub fn sync_dir(dir: &Path) {
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}

/// The length of `bytes` up to the end of its last complete zstd frame.
pub fn complete_frames_len(bytes: &[u8]) -> usize {
    let mut at = 0;
    while at < bytes.len() {
        match zstd::zstd_safe::find_frame_compressed_size(&bytes[at..]) {
            Ok(size) if size > 0 && at + size <= bytes.len() => at += size,
            _ => break,
        }
    }
    at
}

/// At start: segments left open by a crash are cut to their last complete frame and
/// closed (or removed when they hold none). Returns how many were recovered.
pub fn recover(dir: &Path) -> io::Result<usize> {
    let mut recovered = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_open = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(OPEN_SUFFIX));
        if !is_open {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let complete = complete_frames_len(&bytes);
        if complete == 0 {
            std::fs::remove_file(&path)?;
            continue;
        }
        if complete < bytes.len() {
            tracing::warn!(
                segment = %path.display(),
                cut = bytes.len() - complete,
                "access-log segment ended in a partial frame (a crash): cut to its last complete frame"
            );
            OpenOptions::new().write(true).open(&path)?.set_len(complete as u64)?;
        }
        let file = File::open(&path)?;
        file.sync_all()?;
        std::fs::rename(&path, closed_path(&path))?;
        recovered += 1;
    }
    sync_dir(dir);
    Ok(recovered)
}

/// A closed segment in the directory.
#[derive(Debug, Clone)]
pub struct Closed {
    pub path: PathBuf,
    pub name: String,
    pub bytes: u64,
}

/// Closed segments, oldest first.
pub fn closed(dir: &Path) -> io::Result<Vec<Closed>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !name.ends_with(SUFFIX) || parse_name(&name).is_none() {
            continue;
        }
        let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
        segments.push(Closed {
            path: entry.path(),
            name,
            bytes,
        });
    }
    segments.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(segments)
}

/// A segment name's stamp (`20261202T104418.123456Z`) and node.
pub fn parse_name(name: &str) -> Option<(&str, &str)> {
    let stem = name.strip_suffix(".open").unwrap_or(name).strip_suffix(SUFFIX)?;
    let (stamp, node) = stem.split_once('-')?;
    let valid = stamp.len() == 23
        && stamp.as_bytes()[8] == b'T'
        && stamp.ends_with('Z')
        && stamp.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'.',
            22 => b == b'Z',
            _ => b.is_ascii_digit(),
        });
    (valid && !node.is_empty()).then_some((stamp, node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_time_and_node() {
        assert_eq!(
            parse_name("20261202T104418.123456Z-eu-1.ndjson.zst"),
            Some(("20261202T104418.123456Z", "eu-1"))
        );
        assert_eq!(
            parse_name("20261202T104418.123456Z-n.ndjson.zst.open"),
            Some(("20261202T104418.123456Z", "n"))
        );
        assert_eq!(parse_name("notes.ndjson.zst"), None);
        assert_eq!(parse_name("20261202T104418.123456Z-.ndjson.zst"), None);
    }

    #[test]
    fn a_crashed_segment_is_cut_to_its_complete_frames() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = OpenSegment::create(dir.path(), "n1").unwrap();
        let one = zstd::bulk::compress(b"{\"a\":1}\n", 3).unwrap();
        let two = zstd::bulk::compress(b"{\"a\":2}\n", 3).unwrap();
        segment.append(&one).unwrap();
        segment.append(&two).unwrap();
        let path = segment.path.clone();
        drop(segment);
        // A third frame half written when the process died.
        let three = zstd::bulk::compress(b"{\"a\":3}\n", 3).unwrap();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&three[..three.len() / 2]).unwrap();
        assert_eq!(recover(dir.path()).unwrap(), 1);
        let segments = closed(dir.path()).unwrap();
        assert_eq!(segments.len(), 1);
        let bytes = std::fs::read(&segments[0].path).unwrap();
        assert_eq!(bytes.len(), one.len() + two.len());
        assert_eq!(zstd::stream::decode_all(&bytes[..]).unwrap(), b"{\"a\":1}\n{\"a\":2}\n");
    }
}
