//! Recovery: rebuilds the log state from the segment files at start.
//!
//! # Policy
//! - A torn tail is expected after a crash: the last segment may end in an
//!   incomplete frame, a frame with a bad CRC, or preallocated zeroes. If no
//!   valid frame follows the bad spot in that segment, the tail is cut
//!   logically: the torn bytes are zeroed (so later, shorter writes cannot
//!   resurrect them) and the writer continues after the last valid record.
//!   This is logged with file and offset.
//! - Anything else is damage: a bad frame followed by a valid one, a bad
//!   frame in a segment that is not the last, a bad header, or an LSN gap
//!   between segments. In `RecoveryMode::Refuse` (the default) walld
//!   refuses to start and names the file and offset. In
//!   `RecoveryMode::TruncateAtDamage` the log is cut at the damage: the
//!   rest of that segment is zeroed and all later segments are deleted.

use std::path::{Path, PathBuf};

use crate::error::{Result, WalError};
use crate::fs;
use crate::record::{self, Decoded, FRAME_HEADER_BYTES};
use crate::segment::{self, SegmentEntry, HEADER_BYTES};

/// What to do when recovery finds damage (not just a torn tail).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryMode {
    /// Refuse to start; an operator must look at the named file and offset.
    #[default]
    Refuse,
    /// Cut the log at the damage and delete everything after it.
    TruncateAtDamage,
}

impl RecoveryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryMode::Refuse => "refuse",
            RecoveryMode::TruncateAtDamage => "truncate-at-damage",
        }
    }
}

/// The state rebuilt from disk.
#[derive(Debug)]
pub struct Recovered {
    /// Segments in LSN order; empty for a new WAL.
    pub segments: Vec<SegmentEntry>,
    /// The LSN the next appended record gets.
    pub next_lsn: u64,
    /// Byte offset after the last valid record of the last segment.
    pub active_offset: u64,
    /// (file, offset) of every torn tail that was cut.
    pub torn_tails: Vec<(PathBuf, u64)>,
    /// (file, offset) where the log was cut in truncate-at-damage mode.
    pub damage_truncated: Option<(PathBuf, u64)>,
}

/// How the scan of one segment ended.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// Only zero bytes follow the last record.
    Clean,
    /// An invalid frame at this offset.
    Bad { offset: usize, reason: String },
}

#[derive(Debug)]
struct Scan {
    records: u64,
    end_offset: usize,
    stop: Stop,
}

/// Scans the frames of one segment whose first record must be `first_lsn`.
fn scan(data: &[u8], first_lsn: u64) -> Scan {
    let mut offset = HEADER_BYTES as usize;
    let mut expected = first_lsn;
    let stop = loop {
        let Some(rest) = data.get(offset..) else {
            break Stop::Clean;
        };
        match record::decode(rest) {
            // The writer never assigns it (the next LSN would overflow), so
            // a frame claiming it is damage, whatever its CRC says.
            Decoded::Record { lsn: u64::MAX, .. } => {
                let reason = "frame LSN is u64::MAX, past the end of the LSN space".to_string();
                break Stop::Bad { offset, reason };
            }
            Decoded::Record {
                lsn, frame_bytes, ..
            } if lsn == expected => {
                offset += frame_bytes;
                expected += 1;
            }
            Decoded::Record { lsn, .. } => {
                let reason = format!("frame LSN {lsn}, expected {expected}");
                break Stop::Bad { offset, reason };
            }
            Decoded::End => break Stop::Clean,
            Decoded::Invalid(reason) => {
                break Stop::Bad {
                    offset,
                    reason: reason.to_string(),
                };
            }
        }
    };
    Scan {
        records: expected - first_lsn,
        end_offset: offset,
        stop,
    }
}

/// True if any valid frame starts after `bad` (real damage, not a torn tail).
fn valid_frame_after(data: &[u8], bad: usize) -> bool {
    let end = data.len().saturating_sub(FRAME_HEADER_BYTES);
    (bad + 1..=end).any(|off| {
        let rest = &data[off..];
        match record::peek_header(rest) {
            Some((len, lsn)) if lsn != 0 && len <= rest.len() - FRAME_HEADER_BYTES => {
                matches!(record::decode(rest), Decoded::Record { .. })
            }
            _ => false,
        }
    })
}

/// Offset just past the last non-zero byte.
fn nonzero_end(data: &[u8]) -> usize {
    data.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1)
}

/// Overwrites `[from, to)` of the file with zeroes and makes it durable.
fn zero_range(path: &Path, from: usize, to: usize) -> Result<()> {
    if from >= to {
        return Ok(());
    }
    let file =
        fs::open_rw(path).map_err(|e| WalError::io(format!("open {}", path.display()), e))?;
    let chunk_bytes_max = 1 << 20;
    let zeroes = vec![0u8; chunk_bytes_max.min(to - from)];
    let mut offset = from;
    while offset < to {
        let n = zeroes.len().min(to - offset);
        fs::write_all_at(&file, &zeroes[..n], offset as u64)
            .map_err(|(_, e)| WalError::io(format!("zero torn tail of {}", path.display()), e))?;
        offset += n;
    }
    fs::fdatasync(&file).map_err(|e| WalError::FsyncFailed(format!("{}: {e}", path.display())))
}

/// Lists segment files in LSN order and deletes leftover `.tmp` files.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    let mut removed_tmp = false;
    let entries =
        std::fs::read_dir(dir).map_err(|e| WalError::io(format!("list {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| WalError::io("list WAL dir", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(segment::TMP_SUFFIX) {
            tracing::info!(file = %entry.path().display(), "removing unfinished temporary file");
            fs::remove_file(&entry.path()).map_err(|e| WalError::io("remove tmp", e))?;
            removed_tmp = true;
        } else if let Some(first_lsn) = segment::parse_file_name(&name) {
            segments.push((first_lsn, entry.path()));
        }
    }
    if removed_tmp {
        fs::fsync_dir(dir).map_err(|e| WalError::FsyncFailed(format!("WAL directory: {e}")))?;
    }
    segments.sort();
    Ok(segments)
}

/// Where damage was found.
struct Damage {
    index: usize,
    offset: usize,
    reason: String,
}

/// Rebuilds the log state from `dir`. See the module docs for the policy.
pub fn recover(dir: &Path, mode: RecoveryMode) -> Result<Recovered> {
    let files = list_segments(dir)?;
    let mut out = Recovered {
        segments: Vec::new(),
        // A file named for LSN 0 is never written (LSN 0 means "no record")
        // and is always damage; if truncation deletes it, start at 1.
        next_lsn: files.first().map_or(1, |f| f.0.max(1)),
        active_offset: HEADER_BYTES,
        torn_tails: Vec::new(),
        damage_truncated: None,
    };
    for (index, (first_lsn, path)) in files.iter().enumerate() {
        let is_last = index + 1 == files.len();
        let data =
            std::fs::read(path).map_err(|e| WalError::io(format!("read {}", path.display()), e))?;
        match check_segment(&data, *first_lsn, out.next_lsn, is_last) {
            Ok(scan) => {
                if let Stop::Bad { offset, reason } = &scan.stop {
                    cut_torn_tail(path, &data, *offset, reason)?;
                    out.torn_tails.push((path.clone(), *offset as u64));
                }
                out.next_lsn = first_lsn + scan.records;
                out.active_offset = scan.end_offset as u64;
                out.segments.push(SegmentEntry {
                    first_lsn: *first_lsn,
                    path: path.clone(),
                });
            }
            Err((offset, reason)) => {
                let damage = Damage {
                    index,
                    offset,
                    reason,
                };
                handle_damage(dir, &files, &data, damage, mode, &mut out)?;
                break;
            }
        }
    }
    assert!(out
        .segments
        .windows(2)
        .all(|w| w[0].first_lsn < w[1].first_lsn));
    Ok(out)
}

/// Validates one segment. Err carries the damage offset and reason.
fn check_segment(
    data: &[u8],
    first_lsn: u64,
    expected_lsn: u64,
    is_last: bool,
) -> Result<Scan, (usize, String)> {
    match segment::decode_header(data) {
        Ok(lsn) if lsn == first_lsn => {}
        Ok(lsn) => {
            return Err((
                0,
                format!("header first LSN {lsn} does not match the file name"),
            ))
        }
        Err(reason) => return Err((0, reason.to_string())),
    }
    if first_lsn != expected_lsn {
        return Err((0, format!("LSN gap: expected the segment to start at {expected_lsn}, it starts at {first_lsn}")));
    }
    let scan = scan(data, first_lsn);
    if let Stop::Bad { offset, reason } = &scan.stop {
        if !is_last {
            return Err((*offset, format!("{reason}; a later segment exists")));
        }
        if valid_frame_after(data, *offset) {
            return Err((*offset, format!("{reason}; valid records follow")));
        }
    }
    Ok(scan)
}

fn cut_torn_tail(path: &Path, data: &[u8], offset: usize, reason: &str) -> Result<()> {
    let end = nonzero_end(data);
    tracing::warn!(
        file = %path.display(), offset, torn_bytes = end.saturating_sub(offset), reason,
        "torn tail at the end of the WAL: cutting it (records after it were never acknowledged)"
    );
    zero_range(path, offset, end)
}

fn handle_damage(
    dir: &Path,
    files: &[(u64, PathBuf)],
    data: &[u8],
    damage: Damage,
    mode: RecoveryMode,
    out: &mut Recovered,
) -> Result<()> {
    let (first_lsn, path) = &files[damage.index];
    if mode == RecoveryMode::Refuse {
        tracing::error!(file = %path.display(), offset = damage.offset, reason = %damage.reason,
            "WAL damage found; refusing to start (see docs/operations/wal-recovery.md)");
        return Err(WalError::Corrupt {
            file: path.clone(),
            offset: damage.offset as u64,
            reason: damage.reason,
        });
    }
    tracing::error!(file = %path.display(), offset = damage.offset, reason = %damage.reason,
        later_segments_deleted = files.len() - damage.index - 1,
        "WAL damage found; truncating the log at the damage (recovery mode truncate-at-damage)");
    let keep_this = damage.offset > 0;
    if keep_this {
        zero_range(path, damage.offset, nonzero_end(data))?;
        let scan = scan(data, *first_lsn);
        out.next_lsn = first_lsn + scan.records;
        out.active_offset = damage.offset as u64;
        out.segments.push(SegmentEntry {
            first_lsn: *first_lsn,
            path: path.clone(),
        });
    }
    let first_deleted = if keep_this {
        damage.index + 1
    } else {
        damage.index
    };
    for (_, later) in &files[first_deleted..] {
        fs::remove_file(later)
            .map_err(|e| WalError::io(format!("remove {}", later.display()), e))?;
    }
    fs::fsync_dir(dir).map_err(|e| WalError::FsyncFailed(format!("WAL directory: {e}")))?;
    out.damage_truncated = Some((path.clone(), damage.offset as u64));
    Ok(())
}
