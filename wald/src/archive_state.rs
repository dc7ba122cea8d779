//! `archive.state`: how far the WAL archiver (`stemectl wal archive`) got.
//!
//! The archiver writes this file in the WAL directory after every segment
//! it has uploaded *and verified* (size and checksum read back). walld reads
//! it at Truncate and Status time: with `archive_required`, truncation
//! follows `min(checkpoint, archived)`, so a segment that is not archived is
//! never removed.
//!
//! # Update (crash-safe)
//! 1. write `archive.state.tmp`, fsync it;
//! 2. rename it over `archive.state`;
//! 3. fsync the directory.
//!
//! A crash before step 2 leaves the old state (the archiver re-uploads the
//! segment, finds identical bytes and counts it archived again); a crash
//! after step 2 leaves the new one. A torn or damaged file fails its CRC and
//! is treated as "nothing archived", which only delays truncation.
//!
//! # Invariants
//! - `archived_through_lsn` only grows: every record with an LSN at or below
//!   it is in the archive, verified.
//! - The file knows nothing about where the archive is.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The file name inside the WAL directory.
pub const FILE_NAME: &str = "archive.state";
const TMP_SUFFIX: &str = ".tmp";
/// "STMARCST" as 8 bytes.
pub const MAGIC: &[u8; 8] = b"STMARCST";
pub const FORMAT_VERSION: u32 = 1;
const ENCODED_BYTES: usize = 48;

/// The archiver's progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArchiveState {
    /// Every record with an LSN <= this is archived and verified.
    pub archived_through_lsn: u64,
    /// Uploads or verifications that failed (each retried), ever.
    pub failures_total: u64,
    /// Segments archived (verified), ever.
    pub segments_archived_total: u64,
    /// When the state was written, microseconds since the Unix epoch.
    pub updated_at_micros: i64,
}

pub fn path(wal_dir: &Path) -> PathBuf {
    wal_dir.join(FILE_NAME)
}

// Format: { magic "STMARCST" | version u32 LE | archived_through_lsn u64 LE |
//           failures_total u64 LE | segments_archived_total u64 LE |
//           updated_at_micros i64 LE | crc32c u32 LE over the preceding 44 bytes }
pub fn encode(state: &ArchiveState) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENCODED_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&state.archived_through_lsn.to_le_bytes());
    out.extend_from_slice(&state.failures_total.to_le_bytes());
    out.extend_from_slice(&state.segments_archived_total.to_le_bytes());
    out.extend_from_slice(&state.updated_at_micros.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(out.len(), ENCODED_BYTES);
    out
}

pub fn decode(buf: &[u8]) -> Result<ArchiveState, &'static str> {
    if buf.len() != ENCODED_BYTES {
        return Err("archive state has the wrong size");
    }
    let word = |a: usize| -> [u8; 8] { buf[a..a + 8].try_into().unwrap_or_default() };
    let crc = u32::from_le_bytes(buf[44..48].try_into().unwrap_or_default());
    if crc32c::crc32c(&buf[..44]) != crc {
        return Err("archive state CRC mismatch");
    }
    if &buf[..8] != MAGIC {
        return Err("archive state magic mismatch");
    }
    if u32::from_le_bytes(buf[8..12].try_into().unwrap_or_default()) != FORMAT_VERSION {
        return Err("unsupported archive state format version");
    }
    Ok(ArchiveState {
        archived_through_lsn: u64::from_le_bytes(word(12)),
        failures_total: u64::from_le_bytes(word(20)),
        segments_archived_total: u64::from_le_bytes(word(28)),
        updated_at_micros: i64::from_le_bytes(word(36)),
    })
}

/// Reads the state; `Ok(None)` when the archiver never wrote one.
pub fn read(wal_dir: &Path) -> Result<Option<ArchiveState>, String> {
    let p = path(wal_dir);
    match std::fs::read(&p) {
        Ok(bytes) => decode(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("read {}: {e}", p.display())),
    }
}

/// Writes the state: tmp, fsync, rename, fsync(dir).
pub fn write(wal_dir: &Path, state: &ArchiveState) -> std::io::Result<()> {
    let final_path = path(wal_dir);
    let tmp = wal_dir.join(format!("{FILE_NAME}{TMP_SUFFIX}"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode(state))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &final_path)?;
    std::fs::File::open(wal_dir)?.sync_all()
}

/// The LSN Truncate may use when archiving is required: segments whose
/// records are all below it are archived.
pub fn truncate_bound(requested_below_lsn: u64, state: Option<&ArchiveState>) -> u64 {
    let archived_below = state.map_or(0, |s| s.archived_through_lsn.saturating_add(1));
    requested_below_lsn.min(archived_below)
}

/// Sealed segments (all but the last, given their first LSNs in order)
/// holding a record above `archived_through_lsn`.
pub fn lag_segments(first_lsns: &[u64], archived_through_lsn: u64) -> u64 {
    first_lsns
        .windows(2)
        .filter(|w| w[1] - 1 > archived_through_lsn)
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_any_flip_is_rejected() {
        let s = ArchiveState {
            archived_through_lsn: 99,
            failures_total: 3,
            segments_archived_total: 7,
            updated_at_micros: 1_700_000_000_000_000,
        };
        let bytes = encode(&s);
        assert_eq!(decode(&bytes), Ok(s));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(decode(&bad).is_err(), "flip at {i} not detected");
        }
        assert!(decode(&bytes[..47]).is_err());
    }

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let s = ArchiveState {
            archived_through_lsn: 5,
            ..ArchiveState::default()
        };
        write(dir.path(), &s).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(s));
        std::fs::write(path(dir.path()), b"garbage").unwrap();
        assert!(read(dir.path()).unwrap_err().contains("archive.state"));
    }

    #[test]
    fn truncation_follows_the_archive() {
        let s = ArchiveState {
            archived_through_lsn: 19,
            ..ArchiveState::default()
        };
        assert_eq!(truncate_bound(100, Some(&s)), 20);
        assert_eq!(truncate_bound(10, Some(&s)), 10);
        assert_eq!(truncate_bound(100, None), 0);
        // Segments 1, 10, 20 (active), 30 (active): 1..9 and 10..19 archived.
        assert_eq!(lag_segments(&[1, 10, 20], 19), 0);
        assert_eq!(lag_segments(&[1, 10, 20, 30], 19), 1);
        assert_eq!(lag_segments(&[1, 10, 20], 0), 2);
        assert_eq!(lag_segments(&[1], 0), 0);
    }
}
