//! Segment files: naming, the header format, creation and the shared index.
//!
//! A segment is named after the LSN of its first record
//! (`00000000000000000001.wal`) and preallocated to `segment_bytes`.
//!
//! # Creation (crash-safe)
//! 1. create `<name>.tmp`, fallocate to the segment size, zero-fill, fsync (done ahead
//!    of time by the preparer thread, see `log::Preparer`);
//! 2. write the header with the first LSN, fdatasync;
//! 3. rename to the final name, fsync the directory.
//!
//! A crash before step 3 leaves only a `.tmp` file, which recovery deletes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Result, WalError};
use crate::fs;

/// Bytes reserved for the header at the start of every segment.
pub const HEADER_BYTES: u64 = 4096;
/// "STMWALSG" as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"STMWALSG");
pub const FORMAT_VERSION: u32 = 1;
const HEADER_ENCODED_BYTES: usize = 28;
const SUFFIX: &str = ".wal";
pub const TMP_SUFFIX: &str = ".tmp";

/// The file name of the segment whose first record is `first_lsn`.
pub fn file_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}{SUFFIX}")
}

/// The first LSN encoded in a segment file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

// Format: { magic u64 LE "STMWALSG" | version u32 LE | first_lsn u64 LE |
//           header_bytes u32 LE | crc32c u32 LE over the preceding 24 bytes }
// followed by zero padding up to HEADER_BYTES.
/// Encodes the header of a segment starting at `first_lsn`.
pub fn encode_header(first_lsn: u64) -> Vec<u8> {
    assert!(first_lsn > 0);
    let mut out = Vec::with_capacity(HEADER_ENCODED_BYTES);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&first_lsn.to_le_bytes());
    out.extend_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(out.len(), HEADER_ENCODED_BYTES);
    out
}

/// Decodes and validates a segment header; returns its first LSN.
pub fn decode_header(buf: &[u8]) -> Result<u64, &'static str> {
    let Some(h) = buf.get(..HEADER_ENCODED_BYTES) else {
        return Err("segment shorter than its header");
    };
    let word = |a: usize, b: usize| &h[a..b];
    let crc = u32::from_le_bytes(word(24, 28).try_into().map_err(|_| "bad header")?);
    if crc32c::crc32c(word(0, 24)) != crc {
        return Err("segment header CRC mismatch");
    }
    if u64::from_le_bytes(word(0, 8).try_into().map_err(|_| "bad header")?) != MAGIC {
        return Err("segment header magic mismatch");
    }
    if u32::from_le_bytes(word(8, 12).try_into().map_err(|_| "bad header")?) != FORMAT_VERSION {
        return Err("unsupported segment format version");
    }
    let header_bytes = u32::from_le_bytes(word(20, 24).try_into().map_err(|_| "bad header")?);
    if u64::from(header_bytes) != HEADER_BYTES {
        return Err("unsupported segment header size");
    }
    let first_lsn = u64::from_le_bytes(word(12, 20).try_into().map_err(|_| "bad header")?);
    if first_lsn == 0 {
        return Err("segment first LSN is 0");
    }
    Ok(first_lsn)
}

/// Step 1 of creation: a preallocated, fsynced temporary file.
pub fn prepare_tmp(path: &Path, segment_bytes: u64) -> Result<File> {
    let result = (|| {
        let file = fs::create(path).map_err(|e| WalError::io("create segment", e))?;
        fs::fallocate(&file, segment_bytes).map_err(|e| WalError::io("fallocate segment", e))?;
        zero_fill(&file, segment_bytes)?;
        fs::fsync(&file).map_err(|e| WalError::FsyncFailed(format!("prepared segment: {e}")))?;
        Ok(file)
    })();
    if result.is_err() {
        // A half-allocated file would keep holding disk space.
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Writes zeroes over the whole preallocated file. fallocate alone leaves
/// "unwritten" extents (ext4, xfs): the first write into each one makes the
/// next fdatasync commit an extent conversion to the journal, which on this
/// class of disk costs about four times a plain data flush. Writing the
/// zeroes ahead of time (in the preparer thread) keeps every append an
/// overwrite, so its fdatasync flushes data only.
fn zero_fill(file: &File, segment_bytes: u64) -> Result<()> {
    const CHUNK_BYTES: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK_BYTES.min(segment_bytes) as usize];
    let mut offset = 0;
    while offset < segment_bytes {
        let n = CHUNK_BYTES.min(segment_bytes - offset) as usize;
        fs::write_all_at(file, &zeroes[..n], offset)
            .map_err(|(_, e)| WalError::io("zero-fill segment", e))?;
        offset += n as u64;
    }
    Ok(())
}

/// Steps 2 and 3 of creation: header, fdatasync, rename, fsync(dir).
pub fn install(dir: &Path, tmp: &Path, file: &File, first_lsn: u64) -> Result<PathBuf> {
    let header = encode_header(first_lsn);
    fs::write_all_at(file, &header, 0).map_err(|(_, e)| WalError::io("write segment header", e))?;
    fs::fdatasync(file).map_err(|e| WalError::FsyncFailed(format!("segment header: {e}")))?;
    let path = dir.join(file_name(first_lsn));
    fs::rename(tmp, &path).map_err(|e| WalError::io("rename segment", e))?;
    fs::fsync_dir(dir).map_err(|e| WalError::FsyncFailed(format!("WAL directory: {e}")))?;
    Ok(path)
}

/// One segment as seen by readers and truncation.
#[derive(Debug, Clone)]
pub struct SegmentEntry {
    pub first_lsn: u64,
    pub path: PathBuf,
}

/// The ordered list of segments, shared by the writer (which appends on
/// rotation), readers (which look segments up) and truncation.
///
/// # Invariants
/// - entries are sorted by `first_lsn`, strictly increasing;
/// - the last entry is the active segment and is never removed;
/// - every record of entry `i` has an LSN below `entries[i + 1].first_lsn`.
#[derive(Debug, Default)]
pub struct SegmentIndex {
    entries: Mutex<Vec<SegmentEntry>>,
}

impl SegmentIndex {
    pub fn new(entries: Vec<SegmentEntry>) -> Self {
        assert!(!entries.is_empty());
        assert!(entries.windows(2).all(|w| w[0].first_lsn < w[1].first_lsn));
        SegmentIndex {
            entries: Mutex::new(entries),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<SegmentEntry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, entry: SegmentEntry) {
        let mut entries = self.lock();
        assert!(entries.last().is_none_or(|l| l.first_lsn < entry.first_lsn));
        entries.push(entry);
    }

    pub fn first_lsn(&self) -> u64 {
        self.lock().first().map_or(1, |e| e.first_lsn)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.lock().iter().map(|e| e.path.clone()).collect()
    }

    /// The segment that holds `lsn`: the last one starting at or below it.
    pub fn find(&self, lsn: u64) -> Option<SegmentEntry> {
        let entries = self.lock();
        entries.iter().rev().find(|e| e.first_lsn <= lsn).cloned()
    }

    /// Removes the leading segments whose records are all below
    /// `below_lsn`, never the last (active) one. Returns the removed ones.
    pub fn take_below(&self, below_lsn: u64) -> Vec<SegmentEntry> {
        let mut entries = self.lock();
        let mut count = 0;
        while count + 1 < entries.len() && entries[count + 1].first_lsn <= below_lsn {
            count += 1;
        }
        let removed: Vec<SegmentEntry> = entries.drain(..count).collect();
        assert!(!entries.is_empty());
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(file_name(1), "00000000000000000001.wal");
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name("42.wal"), None);
        assert_eq!(parse_file_name("00000000000000000001.wal.tmp"), None);
    }

    #[test]
    fn header_round_trip_and_corruption() {
        let h = encode_header(77);
        assert_eq!(decode_header(&h), Ok(77));
        for i in 0..h.len() {
            let mut bad = h.clone();
            bad[i] ^= 0x10;
            assert!(decode_header(&bad).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn take_below_keeps_active() {
        let e = |l| SegmentEntry {
            first_lsn: l,
            path: PathBuf::from(file_name(l)),
        };
        let index = SegmentIndex::new(vec![e(1), e(10), e(20)]);
        assert_eq!(index.take_below(9).len(), 0);
        assert_eq!(index.take_below(10).len(), 1);
        assert_eq!(index.take_below(11).len(), 0);
        assert_eq!(index.take_below(u64::MAX).len(), 1);
        assert_eq!(index.len(), 1);
        assert_eq!(index.first_lsn(), 20);
    }
}
